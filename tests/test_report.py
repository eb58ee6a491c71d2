"""The report (issue 5): loading results, claim verdicts, fits, tables, plots, CLI and notebooks.

Every row here is constructed: in code, or in tests/fixtures/report_rows.jsonl, a SYNTHETIC fixture
(env.gpu_name "synthetic-fixture", every version "synthetic") whose numbers were chosen to exercise
each verdict; none of it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from analysis import claims as C
from analysis.fits import capacity_frontier, fit_families, fit_family, with_family
from analysis.load import MalformedResults, load_results, predictor, rows_to_frame
from analysis.report import build_report, write_report
from analysis.tables import claims_table, savings_table, smallest_card
from bench.cards import CARD_MIB, GB, GIB, MIB
from bench.model.registry import architecture, parameter_counts
from bench.schema import new_row
from bench.spec import CellSpec
from ftmem.commands.report import register

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "report_rows.jsonl"
RTX4090 = CARD_MIB["rtx4090-24gb"] * MIB


def make_row(
    status: str = "ok",
    *,
    alloc: float | None = None,
    reserved: float | None = None,
    nvml: float | None = None,
    gpu_total: float = 150e9,
    torch: str = "t1",
    **spec,
) -> dict:
    """A schema row of qwen3-14b LoRA (GC on, seq 2048, batch 1 unless given); peaks in GiB."""
    cell = CellSpec.create(
        **{
            "model": "qwen3-14b",
            "method": "lora",
            "seq_len": 2048,
            "batch_size": 1,
            "gradient_checkpointing": True,
            **spec,
        }
    )
    peaks = {"peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved, "nvml_peak_process_bytes": nvml}
    values = {k: int(v * GIB) for k, v in peaks.items() if v is not None}
    env = {"gpu_name": "synthetic-test", "gpu_total_bytes": int(gpu_total), "torch": torch}
    return new_row(cell.to_dict(), cell.cell_id, status, budget_bytes=cell.budget_bytes, env=env, **values)


def frame(*rows: dict):
    return rows_to_frame(list(rows), source="constructed")


# -- loading -------------------------------------------------------------------------------------
def test_load_flattens_types_and_derives(tmp_path):
    df = load_results([FIXTURE])
    assert len(df) == 11 and set(df["env_gpu_name"]) == {"synthetic-fixture"}
    first = df.iloc[0]
    assert first["method"] == "lora" and first["seq_len"] == 512 and isinstance(first["lora_targets"], tuple)
    assert (
        str(df["peak_allocated_bytes"].dtype) == "Int64"
        and str(df["gradient_checkpointing"].dtype) == "boolean"
    )
    assert first["peak_allocated_gib"] == pytest.approx(28.5)
    assert first["footprint_basis"] == "nvml" and first["footprint_gib"] == pytest.approx(30.25)
    assert first["source_file"] == "tests/fixtures/report_rows.jsonl" and first["source_line"] == 1
    assert df.loc[7, "sweep_claims"] == ("C6", "C15", "C18") and df.loc[0, "sweep_claims"] == ()
    assert df.loc[5, "budget_emulated"] and df.loc[5, "cap_bytes"] == RTX4090
    assert not df.loc[0, "budget_emulated"] and df.loc[0, "cap_bytes"] == 150_000_000_000


def test_load_default_reads_shipped_results_folder():
    df = load_results()
    assert len(df) >= 1 and df["source_file"].str.startswith("results/").all()


def test_footprint_falls_back_to_reserved_then_allocated():
    df = frame(make_row(alloc=10, reserved=12), make_row(alloc=10, seq_len=1024))
    assert list(df["footprint_basis"]) == ["reserved", "allocated"]
    assert list(df["footprint_gib"]) == [12, 10]


def _write(path: Path, lines: list[str], trailing_newline: bool) -> Path:
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def test_malformed_line_names_file_and_line(tmp_path):
    good = json.dumps(make_row(alloc=1))
    path = _write(tmp_path / "bad.jsonl", [good, "{not json", good], trailing_newline=True)
    with pytest.raises(MalformedResults, match=r"bad\.jsonl:2: not a JSON row"):
        load_results([path])


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    path = _write(tmp_path / "odd.jsonl", [json.dumps(make_row(alloc=1)), "[1, 2]"], trailing_newline=True)
    with pytest.raises(MalformedResults, match=r"odd\.jsonl:2: .*JSON object.*fix or delete"):
        load_results([path])


@pytest.mark.parametrize("line, why", [('{"status": "ok"}', "no 'spec'"), ('{"spec": {}}', "no 'status'")])
def test_rows_that_are_not_rows_are_skipped_and_named(tmp_path, line, why):
    path = _write(tmp_path / "odd.jsonl", [json.dumps(make_row(alloc=1)), line], trailing_newline=True)
    with pytest.warns(UserWarning, match=rf"odd\.jsonl:2: skipped: .*{why}"):
        assert len(load_results([path])) == 1


def test_truncated_last_line_is_skipped_with_warning(tmp_path):
    good = json.dumps(make_row(alloc=1))
    path = _write(tmp_path / "cut.jsonl", [good, good[:40]], trailing_newline=False)
    with pytest.warns(UserWarning, match=r"cut\.jsonl:2: skipped: a truncated last line"):
        df = load_results([path])
    assert len(df) == 1


def test_bad_last_line_with_newline_is_not_a_truncation(tmp_path):
    path = _write(tmp_path / "end.jsonl", [json.dumps(make_row(alloc=1)), "{oops"], trailing_newline=True)
    with pytest.raises(MalformedResults, match=r"end\.jsonl:2"):
        load_results([path])


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_results([tmp_path / "nowhere.jsonl"])


def test_rows_of_different_stacks_stay_apart():
    df = frame(make_row(alloc=50, gradient_checkpointing=False, torch="t1"), make_row(alloc=30, torch="t2"))
    assert df["env_stack"].nunique() == 2
    assert savings_table(df).empty  # a pair must share the software stack


def test_empty_results_give_every_claim_no_measurement():
    verdicts = {r.verdict for r in C.evaluate_claims(rows_to_frame([]))}
    assert verdicts == {"not measured", "not measurable"}


# -- claims: data --------------------------------------------------------------------------------
def test_claims_yaml_is_complete_and_consistent():
    guide = C.load_guide()
    assert [c.id for c in guide.claims] == [f"C{i}" for i in range(1, 21)]
    spec_fields = set(CellSpec.__dataclass_fields__)
    for claim in guide.claims:
        assert claim.statement and claim.guide_figure and claim.checks
        assert set(claim.others) <= set(guide.predictions), claim.id
        filters = [claim.config] + [check.get("config") or {} for check in claim.checks]
        assert all(set(f) <= spec_fields for f in filters), claim.id
        if claim.example:
            assert C.example_spec(guide, claim) is not None, claim.id


def test_card_budget_is_the_nvidia_smi_total():
    assert C.budget_of({"card": "rtx4090-24gb"}) == (24564 * MIB, "rtx4090-24gb")
    assert C.budget_of({"gb": 24}) == (24 * GB, "24 GB")


def test_other_predictions_follow_the_estimators_formulas():
    counts = parameter_counts(architecture("qwen3-14b"))
    without_head = counts["total"] - counts["lm_head"]
    estimate = C.prediction_bytes
    assert estimate({"formula": {"accelerate": "adam", "dtype": "float16"}}) == 8 * without_head
    assert estimate({"formula": {"accelerate": "adam", "dtype": "float32"}}) == 16 * without_head
    assert estimate({"formula": {"accelerate": "load", "dtype": "int4"}}) == 4 * without_head // 8
    assert estimate({"formula": {"deepspeed": "zero2", "gpus": 1}}) == 20 * counts["total"]
    largest = 151936 * 5120
    assert estimate({"formula": {"deepspeed": "zero3", "gpus": 2}}) == 4 * largest + 9 * counts["total"]
    assert estimate({"gb": 32}) == 32 * GB


# -- claims: verdicts per kind -------------------------------------------------------------------
def judge(check: dict, *rows: dict) -> C.CheckResult:
    return C._CHECKS[check["kind"]](frame(*rows), check)


@pytest.mark.parametrize(
    "nvml_gib, verdict", [(20.0, "supported"), (23.5, "marginal"), (24.9, "marginal"), (25.5, "refuted")]
)
def test_fits_budget_margins(nvml_gib, verdict):
    result = judge(
        {"kind": "fits_budget", "card": "rtx4090-24gb"}, make_row(alloc=nvml_gib - 2, nvml=nvml_gib)
    )
    assert result.verdict == verdict
    assert result.measured_gib == pytest.approx(nvml_gib) and result.budget_gib == pytest.approx(
        RTX4090 / GIB
    )


def test_fits_uses_nvml_over_reserved_over_allocated():
    check = {"kind": "fits_budget", "card": "rtx4090-24gb"}
    assert judge(check, make_row(alloc=20, reserved=21, nvml=27)).verdict == "refuted"
    assert judge(check, make_row(alloc=20, reserved=21)).verdict == "supported"


def test_min_memory_takes_the_cheapest_configuration():
    check = {"kind": "min_memory", "card": "t4-16gb"}
    rows = [make_row(alloc=30, nvml=32), make_row(alloc=12, nvml=13, seq_len=256)]
    result = judge(check, *rows)
    assert result.verdict == "supported" and "seq 256" in result.summary
    assert judge(check, rows[0]).verdict == "refuted"


def test_oom_under_the_budget_refutes_and_emulation_is_named():
    oom = make_row("oom", budget_gb="rtx4090-24gb")
    result = judge({"kind": "fits_budget", "card": "rtx4090-24gb"}, oom, make_row(alloc=10, nvml=12))
    assert result.verdict == "refuted" and "emulated on synthetic-test" in result.summary


def test_oom_under_a_smaller_cap_says_nothing_about_a_larger_card():
    oom = make_row("oom", budget_gb="t4-16gb")
    assert judge({"kind": "fits_budget", "card": "a100-40gb"}, oom).verdict == "not measured"
    assert judge({"kind": "fits_budget", "card": "t4-16gb"}, oom).verdict == "refuted"


def test_uncapped_oom_counts_under_the_whole_gpu():
    oom = make_row("oom", gpu_total=150e9)
    assert judge({"kind": "fits_budget", "card": "h100-80gb"}, oom).verdict == "refuted"


def test_fits_over_all_and_coverage():
    rows = [make_row(alloc=20, nvml=22), make_row(alloc=60, nvml=62, batch_size=4)]
    assert judge({"kind": "fits_budget", "card": "a100-40gb"}, *rows).verdict == "supported"
    assert judge({"kind": "fits_budget", "card": "a100-40gb", "over": "all"}, *rows).verdict == "refuted"
    covered = {"kind": "fits_budget", "card": "a100-40gb", "over": "all", "covers": {"batch_size": [1, 4]}}
    result = judge(covered, rows[0])
    assert result.verdict == "not measured" and "batch_size 4" in result.summary


def test_fits_expect_false():
    check = {"kind": "fits_budget", "card": "h100-80gb", "expect": False}
    full = {"method": "full", "budget_gb": "h100-80gb"}
    assert judge(check, make_row("oom", **full)).verdict == "supported"
    assert (
        judge(check, make_row("oom", **full), make_row(alloc=60, nvml=62, seq_len=128, method="full")).verdict
        == "refuted"
    )


@pytest.mark.parametrize(
    "nvml_gb, verdict", [(22.5, "supported"), (23.8, "marginal"), (30.0, "refuted"), (20.0, "refuted")]
)
def test_memory_figure(nvml_gb, verdict):
    row = make_row(alloc=1, nvml=nvml_gb * GB / GIB)
    assert judge({"kind": "memory_figure", "min_gb": 22, "max_gb": 23}, row).verdict == verdict


def test_memory_figure_from_oom_lower_bound():
    oom = make_row("oom", method="full", budget_gb="h100-80gb")
    assert judge({"kind": "memory_figure", "min_gb": 60}, oom).verdict == "supported"
    assert judge({"kind": "memory_figure", "min_gb": 20, "max_gb": 30}, oom).verdict == "refuted"
    assert judge({"kind": "memory_figure", "min_gb": 80, "max_gb": 120}, oom).verdict == "not measured"


GC_SAVING = {
    "kind": "saving_percent",
    "flag": "gradient_checkpointing",
    "from": False,
    "to": True,
    "min_pct": 30,
}


@pytest.mark.parametrize("after, verdict", [(65, "supported"), (71, "marginal"), (90, "refuted")])
def test_saving_percent_pairs(after, verdict):
    base = make_row(alloc=100, nvml=100, gradient_checkpointing=False)
    variant = make_row(alloc=after, nvml=after)  # GC on: gc_reentrant differs too, and may (DEPENDENT)
    result = judge({**GC_SAVING, "max_pct": 40}, base, variant)
    assert result.verdict == verdict and f"{100 - after:.1f}%" in result.summary


def test_saving_pairs_match_every_other_field():
    base = make_row(alloc=100, nvml=100, gradient_checkpointing=False)
    other = make_row(alloc=65, nvml=65, seq_len=1024)
    assert judge(GC_SAVING, base, other).verdict == "not measured"


def test_savings_table_reports_gib_and_percent():
    table = savings_table(
        frame(
            make_row(alloc=50, reserved=52, nvml=53, gradient_checkpointing=False),
            make_row(alloc=30, reserved=32, nvml=33),
        )
    )
    row = table.iloc[0]
    assert row["optimisation"] == "gradient checkpointing"
    assert row["allocated_saved_gib"] == pytest.approx(20) and row["allocated_saved_pct"] == pytest.approx(40)
    assert row["nvml_saved_pct"] == pytest.approx(100 * 20 / 53)


def test_multi_gpu_and_qualitative():
    assert (
        judge({"kind": "multi_gpu", "gpus": 2, "card": "h100-80gb"}, make_row(alloc=1)).verdict
        == "not measured"
    )
    assert judge({"kind": "qualitative", "reason": "stability"}).verdict == "not measurable"


def test_multi_gpu_fit_is_not_refuted_while_a_strategy_has_no_answer():
    check = {"kind": "multi_gpu", "gpus": 2, "card": "rtx4090-24gb"}
    zero2 = make_row("oom", gpus=2, dist="deepspeed_zero2", budget_gb="rtx4090-24gb")
    zero3 = make_row("timeout", gpus=2, dist="deepspeed_zero3", budget_gb="rtx4090-24gb")
    assert judge(check, zero2).verdict == "refuted"
    pending = judge(check, zero2, zero3)
    assert pending.verdict == "not measured" and "deepspeed_zero3 (timeout)" in pending.summary
    fits = make_row(alloc=15, nvml=17, gpus=2, dist="deepspeed_zero3", budget_gb="rtx4090-24gb")
    assert judge(check, zero2, fits).verdict == "supported"


def test_a_configuration_measured_under_the_card_cap_is_judged_by_that_row():
    """Under a cap the caching allocator holds less (as on the smaller card): the capped row decides."""
    check = {"kind": "fits_budget", "card": "rtx4090-24gb"}
    free = make_row(alloc=21.3, nvml=26.5, budget_gb="h100-80gb")
    capped = make_row(alloc=21.3, nvml=22.0, budget_gb="rtx4090-24gb")
    assert judge(check, free).verdict == "refuted"
    both = judge(check, free, capped)
    assert both.verdict == "supported" and "22.00 GiB" in both.summary


def test_a_host_oom_is_no_answer_about_gpu_memory():
    """ZeRO-3 with optimizer offload that ran out of host memory says nothing about whether the GPUs
    suffice: it neither refutes a fit as a GPU OOM would nor settles the check."""
    check = {"kind": "multi_gpu", "gpus": 2, "card": "h100-80gb"}
    zero3 = make_row("oom", method="full", gpus=2, dist="deepspeed_zero3", budget_gb="h100-80gb")
    offload = make_row(
        "oom", method="full", gpus=2, dist="deepspeed_zero3", zero_offload="optimizer", budget_gb="h100-80gb"
    )
    offload.update(host_oom=True, host_total_bytes=256 * GIB)
    rows = frame(zero3, offload)
    assert rows["cap_bytes"].isna().tolist() == [False, True]
    assert judge(check, zero3).verdict == "refuted"
    pending = judge(check, zero3, offload)
    assert pending.verdict == "not measured"
    assert "deepspeed_zero3 offload optimizer (ran out of host memory of 256.0 GiB" in pending.summary


def test_combine_verdicts():
    assert C.combine(["supported", "refuted", "not measured"]) == "refuted"
    assert C.combine(["supported", "marginal"]) == "marginal"
    part = C.ClaimResult(
        C.load_guide().claim("C9"),
        "supported in part",
        (
            C.CheckResult("saving_percent", "not measured", "-"),
            C.CheckResult("saving_percent", "supported", "-", headline="saves 4.3%"),
        ),
    )
    assert part.headline == "saves 4.3%"  # the measured part that holds speaks for it
    # a part not yet measured keeps "supported" from standing for the whole claim
    assert C.combine(["not measured", "supported"]) == "supported in part"
    assert C.combine(["not measured", "marginal"]) == "marginal"
    assert C.combine(["not measurable", "supported"]) == "supported"  # a part about no memory
    assert C.combine(["not measured", "not measurable"]) == "not measured"
    assert C.combine(["not measurable"]) == "not measurable"


def test_fixture_verdicts_end_to_end():
    results = {r.claim.id: r for r in C.evaluate_claims(load_results([FIXTURE]))}
    expected = {
        "C1": "refuted",
        "C3": "refuted",
        "C4": "supported",
        "C5": "marginal",
        "C6": "supported",
        "C7": "supported in part",  # its 80-120 GB part has no row
        "C8": "refuted",
        "C11": "not measurable",
        "C13": "not measured",
        "C16": "refuted",
        "C17": "not measured",
    }
    assert {k: results[k].verdict for k in expected} == expected
    table = claims_table(list(results.values()))
    assert "tests/fixtures/report_rows.jsonl:1" in table.set_index("id").loc["C1", "figures"]


def test_smallest_card():
    assert smallest_card(20 * GIB) == "rtx4090-24gb"
    assert smallest_card(23.5 * GIB) == "rtx4090-24gb (tight)"
    assert smallest_card(100 * GIB).startswith("none")


# -- fits ----------------------------------------------------------------------------------------
def _synthetic(peak, attn_impl: str = "sdpa") -> list[dict]:
    shapes = [(512, 1), (1024, 1), (2048, 1), (1024, 2), (2048, 4), (4096, 2)]
    return [make_row(alloc=peak(s, b) / GIB, seq_len=s, batch_size=b, attn_impl=attn_impl) for s, b in shapes]


def test_linear_fit_recovers_known_coefficients():
    a, b = 20 * GIB, 3 * MIB
    fits = fit_families(frame(*_synthetic(lambda s, n: a + b * s * n)), measures=("peak_allocated_bytes",))
    (fit,) = fits
    assert fit.a == pytest.approx(a, rel=1e-6) and fit.b == pytest.approx(b, rel=1e-6) and fit.c is None
    assert fit.r2 == pytest.approx(1.0) and abs(fit.residuals).max() < 1e3
    assert fit.max_seq_len(int(a + b * 8192), 1) == pytest.approx(8192, abs=1)


def test_eager_fit_adds_the_quadratic_term():
    a, b, c = 20 * GIB, 2 * MIB, 80.0
    (fit,) = fit_families(
        frame(*_synthetic(lambda s, n: a + b * s * n + c * n * s * s, "eager")),
        measures=("peak_allocated_bytes",),
    )
    assert fit.c == pytest.approx(c, rel=1e-4) and fit.b == pytest.approx(b, rel=1e-4)
    budget = fit.peak(3000, 2)
    assert fit.max_seq_len(int(budget), 2) == pytest.approx(3000, abs=1)


def test_fit_residuals_and_r2_on_noisy_rows():
    noise = [0.5, -0.5, 0.25, -0.25, 0.0, 0.0]
    rows = _synthetic(lambda s, n: 20 * GIB + MIB * s * n)
    for row, e in zip(rows, noise, strict=True):
        row["peak_allocated_bytes"] += int(e * GIB)
    (fit,) = fit_families(frame(*rows), measures=("peak_allocated_bytes",))
    assert 0 < fit.r2 < 1 and abs(fit.residuals.sum()) < 1e-3 * GIB and len(fit.residuals) == 6


def test_too_few_rows_give_no_fit():
    df = with_family(frame(make_row(alloc=30)))
    assert fit_family(df, "peak_allocated_bytes") is None


def test_capacity_frontier_beside_measured_boundary():
    rows = _synthetic(lambda s, n: 20 * GIB + MIB * s * n)
    rows.append(make_row("oom", seq_len=8192, batch_size=1, budget_gb="rtx4090-24gb"))
    df = frame(*rows)
    table = capacity_frontier(df, fit_families(df, measures=("footprint_bytes",)), cards=("rtx4090-24gb",))
    row = table.set_index("batch_size").loc[1]
    expected = (RTX4090 - 20 * GIB) // MIB
    assert row["fit_max_seq_len"] == pytest.approx(expected, abs=1)
    assert row["measured_longest_fitting"] == 2048 and row["measured_shortest_not_fitting"] == 8192


# -- report, CLI, notebooks ----------------------------------------------------------------------
def _links(page: Path) -> list[Path]:
    import re

    targets = re.findall(r"\]\(([^)]+)\)", page.read_text())
    return [page.parent / target for target in targets if not target.startswith("http")]


def test_report_end_to_end_on_fixture(tmp_path):
    index = write_report([FIXTURE], tmp_path / "report")
    text = index.read_text()
    assert "## The guide's claims" in text and "| C1 |" in text and "## Measured peaks" in text
    pages = [p for p in _links(index) if p.suffix == ".md" and p.parent == index.parent]
    assert {p.name for p in pages} >= {"claims.md", "guide.md", "cells.md", "sources.md", "plots.md"}
    for page in [index, *pages]:
        assert all(p.exists() for p in _links(page)), page
    assert "synthetic-fixture" in (tmp_path / "report" / "sources.md").read_text()
    for name in (
        "claims",
        "guide_method",
        "guide_measured",
        "guide_scenario",
        "savings",
        "fits",
        "capacity_frontier",
        "peaks",
    ):
        assert (tmp_path / "report" / "tables" / f"{name}.csv").exists()
    for name in ("peak_vs_seq_lora", "savings", "card_map"):
        assert (tmp_path / "report" / "plots" / f"{name}.png").stat().st_size > 1000


def test_report_without_predictor(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "analysis.predict", None)  # import fails as if the module were missing
    assert predictor() is None
    report = build_report([FIXTURE], tmp_path)
    assert "measured_vs_predicted" not in report.plots and "not available" in report.index.read_text()
    assert "ftmem predicted NVML GiB" not in report.tables["guide_method"].columns


class _FakePrediction:
    def __init__(self, spec: dict):
        self.peak_allocated_bytes = 20 * GIB + spec["seq_len"] * spec["batch_size"] * MIB
        self.peak_reserved_bytes = self.peak_allocated_bytes + GIB
        self.nvml_process_bytes = self.peak_reserved_bytes + GIB
        self.components = {"weights": 20 * GIB, "activations": self.peak_allocated_bytes - 20 * GIB}


def test_report_with_a_predictor(tmp_path, monkeypatch):
    monkeypatch.setattr("analysis.report.predictor", lambda: _FakePrediction)
    report = build_report([FIXTURE], tmp_path)
    assert (tmp_path / "plots" / "measured_vs_predicted.png").exists() and (
        tmp_path / "plots" / "components.png"
    ).exists()
    assert report.tables["guide_method"]["ftmem predicted NVML GiB"].notna().any()
    compared = report.tables["measured_vs_predicted"]
    assert set(compared["measure"]) == {"allocated", "reserved", "NVML process"}


def test_report_on_no_rows(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    report = build_report([empty], tmp_path / "out")
    text = report.index.read_text()
    assert "0 result rows" in text and "no row measured anything" in text and "empty.jsonl: no rows" in text
    assert {r.verdict for r in report.results} <= {"not measured", "not measurable"}


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ftmem")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_report_and_readme(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n<!-- claims:start -->\nSTALE TABLE\n<!-- claims:end -->\ntext\n<!-- plots:start -->\n<!-- plots:end -->\n"
    )
    assert _cli("report", str(FIXTURE), "--out", str(tmp_path / "r"), "--readme", str(readme)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == 11 and (tmp_path / "r" / "index.md").exists()
    text = readme.read_text()
    assert "STALE TABLE" not in text and "| C1 |" in text and "text\n" in text
    assert "![peak_vs_seq](docs/peak_vs_seq.png)" in text and (tmp_path / "docs" / "peak_vs_seq.png").exists()
    assert (tmp_path / "docs" / "savings.png").exists()


def test_cli_errors_exit_2(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert _cli("report", str(FIXTURE), "--out", str(tmp_path / "r"), "--readme", str(readme)) == 2
    assert "<!-- claims:start -->" in capsys.readouterr().err and readme.read_text() == "no markers\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{x\n{}\n")
    assert _cli("report", str(bad), "--out", str(tmp_path / "r2")) == 2


def test_analysis_never_imports_torch(tmp_path):
    code = (
        "import sys; import ftmem.commands.report; from analysis.report import write_report; "
        "write_report([sys.argv[1]], sys.argv[2]); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(FIXTURE), str(tmp_path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", ["guide_claims.ipynb", "measured_vs_predicted.ipynb"])
def test_notebooks_execute(name, tmp_path, monkeypatch):
    monkeypatch.setenv("FTMEM_RESULTS", str(FIXTURE))
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stripped
    NotebookClient(
        notebook, kernel_name="python3", timeout=180, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        str(o.get("text", "")) + json.dumps(o.get("data", {}))
        for c in notebook.cells
        for o in c.get("outputs", [])
    )
    assert "11 rows" in text


def test_families_that_read_alike_are_told_apart():
    from analysis.fits import _distinct_names

    a = {"method": "qlora", "steps": 2, "seq_len": 512, "profile_memory": None}
    b = {"method": "qlora", "steps": 3, "seq_len": 1024, "profile_memory": False}
    names = _distinct_names(["ka", "kb", "ka"], ["q", "q", "q"], [a, b, a])
    assert names == ["q [steps 2]", "q [steps 3]", "q [steps 2]"]  # profile_memory None reads as False
    assert _distinct_names(["ka"], ["q"], [a]) == ["q"]


def test_a_profiled_cell_measured_again_is_shown_by_its_latest_row():
    from analysis.timeline import profiled_rows

    rows = []
    for started, other in (("2026-11-28T10:00:00+00:00", 9), ("2026-11-28T12:00:00+00:00", 1)):
        row = make_row(alloc=20, profile_memory=True)
        row["env"]["started_at"] = started
        row["profile_categories_bytes"] = {"parameters": 10, "other": other}
        rows.append(row)
    repeat = make_row(alloc=20, profile_memory=True)
    repeat.update(repeat=1, profile_categories_bytes={"parameters": 10, "other": 5})
    shown = profiled_rows(frame(rows[1], rows[0], repeat))
    assert sorted(c["other"] for c in shown["profile_categories_bytes"]) == [1, 5]


def test_markdown_tables_show_bytes_as_integers_and_gaps_as_dashes():
    import pandas as pd

    from analysis.tables import to_markdown

    table = pd.DataFrame({"peak_allocated_bytes": [23991076864, None], "step_time_s": [0.8234, 1.0]})
    lines = to_markdown(table).splitlines()
    assert lines[2] == "| 23991076864 | 0.82 |" and lines[3] == "| - | 1.00 |"


def test_describe_spec_names_expandable_segments():
    from analysis.load import describe_spec

    spec = {"method": "full", "precision": "bf16", "seq_len": 2048, "batch_size": 1,
            "gradient_checkpointing": True, "expandable_segments": True}
    assert describe_spec(spec) == "full bf16 seq 2048 x b1 GC expandable segments"
    assert "expandable" not in describe_spec({**spec, "expandable_segments": False})
