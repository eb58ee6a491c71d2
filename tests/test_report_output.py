"""Issue 15's report: what a run writes into --out (only what it made, nothing stale, never a user's
file), drawing only what changed, the plots' layout, CPU rows, and how long it takes.

Rows here are constructed (tests/test_report.make_row) or the shipped results, read as they are.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis import plots, timeline
from analysis.load import analysis_view, read_results, rows_to_frame
from analysis.outputs import MANIFEST, OutputDir, fingerprint
from analysis.report import build_report
from bench.cards import GIB
from tests.test_report import FIXTURE, _cli, frame, make_row

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# -- the output folder ------------------------------------------------------------------------------
def test_a_rerun_on_the_same_rows_draws_and_rewrites_nothing(tmp_path):
    first = build_report([FIXTURE], tmp_path)
    assert first.drawn and (tmp_path / MANIFEST).is_file()
    before = mtimes(tmp_path)
    second = build_report([FIXTURE], tmp_path)
    assert second.drawn == [] and second.removed == []
    after = mtimes(tmp_path)
    assert {k: v for k, v in after.items() if k != MANIFEST} == {
        k: v for k, v in before.items() if k != MANIFEST
    }


def test_a_rerun_removes_what_it_no_longer_makes_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    build_report([FIXTURE], out)
    assert (out / "plots" / "savings.png").exists() and (out / "tables" / "savings_compact.md").exists()
    mine = [out / "notes.txt", out / "plots" / "my_plot.png", out / "tables" / "mine.csv"]
    for path in mine:
        path.write_text("a user's file")
    one = write(tmp_path / "one.jsonl", [make_row(alloc=30, nvml=31)])  # no pairs, no savings plot
    report = build_report([one], out)
    assert not (out / "plots" / "savings.png").exists() and not (out / "plots" / "savings.svg").exists()
    assert out / "plots" / "savings.png" in report.removed
    assert all(path.read_text() == "a user's file" for path in mine)
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert "plots/savings.png" not in listed and "notes.txt" not in listed and "index.md" in listed


def test_a_folder_without_manifest_loses_nothing_and_says_so(tmp_path, capsys):
    (tmp_path / "plots").mkdir()
    old = tmp_path / "plots" / "oom_frontier_t4-16gb.png"  # an older report's plot: not in any manifest
    old.write_text("old")
    report = build_report([FIXTURE], tmp_path)
    assert old.read_text() == "old" and report.unlisted == [old]
    assert _cli("report", str(FIXTURE), "--out", str(tmp_path)) == 0
    assert "1 file(s) in" in capsys.readouterr().err and old.exists()


@pytest.mark.parametrize(
    "manifest", ["{not json", '{"files": ["a"]}', '{"files": {"../outside.txt": "x", "/etc/x": "y"}}']
)
def test_a_broken_or_hostile_manifest_removes_nothing_outside(tmp_path, manifest):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(manifest)
    build_report([FIXTURE], out)
    assert outside.read_text() == "keep" and (out / "index.md").exists()


def test_only_the_figure_whose_rows_changed_is_redrawn(tmp_path):
    rows = [make_row(alloc=30, nvml=31, seq_len=s) for s in (512, 1024, 2048)]
    qlora = [make_row(alloc=15, nvml=17, method="qlora", seq_len=s) for s in (512, 1024)]
    build_report([write(tmp_path / "rows.jsonl", rows + qlora)], tmp_path / "out")
    rows[-1] = make_row(alloc=33, nvml=35, seq_len=2048)
    report = build_report([write(tmp_path / "rows.jsonl", rows + qlora)], tmp_path / "out")
    assert "peak_vs_seq_lora" in report.drawn and "peak_vs_seq_qlora" not in report.drawn


def test_fingerprint_sees_values_not_identity():
    a = frame(make_row(alloc=30, nvml=31))
    b = frame(make_row(alloc=30, nvml=31))
    assert fingerprint(a, {"x": 1.0}) == fingerprint(b, {"x": 1.0}) != fingerprint(b, {"x": 1.0000001})


def test_write_text_rewrites_only_changed_text(tmp_path):
    out = OutputDir.open(tmp_path)
    path = out.write_text("tables/a.md", "one")
    out.finish()
    stamp = path.stat().st_mtime_ns
    again = OutputDir.open(tmp_path)
    again.write_text("tables/a.md", "one")
    again.finish()
    assert path.stat().st_mtime_ns == stamp


# -- plots ------------------------------------------------------------------------------------------
def test_full_fine_tuning_shows_every_configuration_with_the_one_that_fit():
    view = analysis_view(read_results(None).frame)
    full = view[(view["method"] == "full") & (view["model"] == "qwen3-14b")]
    job = next(j for j in plots.peak_vs_seq_jobs(full, []) if j.name == "configs_full")
    assert job.draw is plots.draw_config_bars
    bars = job.args[1]
    fit = bars[bars["label"].str.contains("expandable segments")]
    assert len(fit) == 1 and not fit["oom"].iloc[0] and fit["gib"].iloc[0] > 130
    assert bars["label"].is_unique and bars["oom"].any() and set(bars["gpus"]) == {1, 2, 4}


def _laid_out(figure):
    """The figure drawn once (constrained layout runs then); its renderer, for text extents."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_every_configuration_is_in_a_figure():
    """Families at several lengths get line panels (at most six a method); every other configuration a bar."""
    rows = [make_row(alloc=30, nvml=31, seq_len=s, batch_size=b) for s in (512, 1024) for b in (1, 2)]
    rows += [
        make_row(alloc=40, nvml=42, fused_ce=True),
        make_row("oom", budget_gb="rtx4090-24gb", compile=True),
    ]
    jobs = {j.name: j for j in plots.peak_vs_seq_jobs(frame(*rows), [])}
    assert set(jobs) == {"peak_vs_seq_lora", "configs_lora"}
    bars = jobs["configs_lora"].args[1]
    assert len(bars) == 2 and list(bars["oom"]) == [True, False]  # the OOM under 24 GB is the lighter bound


def test_panel_titles_do_not_overlap():
    view = analysis_view(read_results(None).frame)
    job = next(j for j in plots.peak_vs_seq_jobs(view, []) if j.name == "peak_vs_seq_lora")
    figure = job.draw(*job.args)
    renderer = _laid_out(figure)
    titles = [ax.title.get_window_extent(renderer) for ax in figure.axes if ax.get_visible()]
    assert len(titles) >= 4
    assert not any(_overlap(a, b) for i, a in enumerate(titles) for b in titles[i + 1 :])
    width = figure.bbox.width
    assert all(t.x0 >= 0 and t.x1 <= width for t in titles)


def test_timeline_names_each_step_once_inside_the_plot():
    path = next((ROOT / "results").rglob("*.timeline.json"))
    data = timeline.load_timeline(path)
    figure = timeline.timeline_figure(data, "t")
    renderer = _laid_out(figure)
    ax = figure.axes[0]
    steps = [t for t in ax.texts if t.get_text() in timeline.step_spans(data["markers"])]
    assert sorted(t.get_text() for t in steps) == sorted(timeline.step_spans(data["markers"]))
    box = ax.get_window_extent(renderer)
    assert all(
        box.x0 <= t.get_window_extent(renderer).x0 and t.get_window_extent(renderer).x1 <= box.x1
        for t in steps
    )


def test_thinning_keeps_the_peak():
    times = list(range(10_000))
    series = {"a": [1] * 10_000, "b": [0] * 10_000}
    series["b"][7_777] = 50
    thin_times, thin = timeline.thinned(times, series, limit=500)
    assert len(thin_times) <= 502 and 7_777 in thin_times and max(thin["b"]) == 50


# -- CPU rows -----------------------------------------------------------------------------------------
def cpu_row(seq_len: int, rss_gib: float, method: str = "lora") -> dict:
    row = make_row(model="qwen3-tiny", device="cpu", method=method, seq_len=seq_len, batch_size=2)
    row.update(peak_rss_bytes=int(rss_gib * GIB), baseline_rss_bytes=int(0.25 * GIB))
    row["env"] = {"torch": "t1"}
    return row


def test_cpu_rows_show_what_was_measured(tmp_path):
    rows = [cpu_row(64, 0.37), cpu_row(128, 0.38), cpu_row(64, 0.33, "full")]
    report = build_report([write(tmp_path / "cpu.jsonl", rows)], tmp_path / "out")
    text = report.index.read_text()
    assert "No row measured" not in text and "qwen3-tiny lora r8 bf16_mixed GC | 64 | 0.37" in text
    assert "none of these rows is one; what they measured is under Measured peaks" in text
    assert rows_to_frame(rows)["footprint_basis"].eq("rss").all()
    assert (tmp_path / "out" / "plots" / "peak_vs_seq_lora.png").exists()
    assert (tmp_path / "out" / "plots" / "configs_full.png").exists()  # one shape: a bar


# -- time -----------------------------------------------------------------------------------------------
def test_report_on_the_shipped_rows_is_quick(tmp_path):
    """Issue 15: 34 s before; the target is 10 s on 2 cores (bounds here are generous: CI machines vary)."""
    start = time.perf_counter()
    build_report(None, tmp_path)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    again = build_report(None, tmp_path)
    rerun = time.perf_counter() - start
    assert again.drawn == []
    assert fresh < 30 and rerun < 10, (fresh, rerun)


def _replicate():
    spec = importlib.util.spec_from_file_location(
        "replicate_results", ROOT / "scripts" / "replicate_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_report_on_four_times_the_rows(tmp_path):
    """1,250 rows (the shipped ones 4x, each copy a configuration of its own): target 30 s on 2 cores."""
    rows = _replicate().replicate(ROOT / "results", tmp_path / "rows", 4)
    assert rows >= 1200
    start = time.perf_counter()
    report = build_report([tmp_path / "rows"], tmp_path / "out")
    elapsed = time.perf_counter() - start
    shipped = read_results(None).frame
    assert len(report.frame) == 4 * len(shipped)
    assert report.frame["cell_id"].nunique() == 4 * shipped["cell_id"].nunique()
    assert elapsed < 90, elapsed


def test_replicated_rows_keep_the_measured_numbers(tmp_path):
    module = _replicate()
    source = next((ROOT / "results").rglob("foundation.jsonl"))
    module.replicate(source.parent, tmp_path, 2)
    original = [json.loads(line) for line in source.read_text().splitlines() if line]
    copy = [json.loads(line) for line in (tmp_path / "copy-1" / source.name).read_text().splitlines() if line]
    assert [r["peak_allocated_bytes"] for r in copy] == [r["peak_allocated_bytes"] for r in original]
    assert not {r["cell_id"] for r in copy} & {r["cell_id"] for r in original}
    with pytest.raises(SystemExit):
        module.replicate(source.parent, ROOT / "results" / "copies", 2)
