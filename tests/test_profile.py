"""Issue 8: where the memory goes. A real tiny CPU cell under torch's memory profiler, the spec
rules of profile_memory / snapshot, the timeline plot, the measured-vs-predicted table and the
report's hook. The timeline of test_timeline_plot_* is constructed, not measured."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from analysis import timeline as T
from analysis.load import rows_to_frame
from analysis.predict import predict
from analysis.report import write_report
from bench.cell import artifacts
from bench.cell.runner import run_cell
from bench.schema import check_row
from bench.spec import LATER_FIELDS, CellSpec, SpecError
from tests.conftest import TINY

#: Full fine-tuning, fp32, AdamW (torch's for-loop implementation on CPU), one warm-up step.
FULL = {**TINY, "method": "full", "precision": "fp32"}


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """One profiled cell run through the runner (fresh process), its artifacts in a temp folder."""
    folder = tmp_path_factory.mktemp("profiled")
    results = folder / "results.jsonl"
    spec = CellSpec.create(**FULL, profile_memory=True)
    row = run_cell(spec, timeout_s=180, artifacts_dir=artifacts.beside(results))
    results.write_text(json.dumps(row) + "\n")
    return spec, row, results


def test_profiled_cell_breakdown_sums_to_the_peak_and_matches_the_row(profiled):
    spec, row, results = profiled
    assert row["status"] == "ok", row["error"]
    assert check_row(row) == []
    cats = row["profile_categories_bytes"]
    assert set(cats) == {"parameters", "gradients", "optimizer_state", "activations", "temporaries", "other"}
    # The categories are the columns of the profiler's timeline at its peak: they sum to it exactly
    # (tolerance 0 bytes; every tensor byte on the device falls in one category, `other` included).
    assert sum(cats.values()) == row["profile_peak_bytes"] > 0
    # Against the row's own figures (bench.model.build), within 1%: every parameter and the whole AdamW
    # state are resident through the measured step; parameter bytes are the storages' bytes, the
    # state includes the 4-byte step counters as optimizer_state_bytes does.
    assert cats["parameters"] == pytest.approx(row["param_bytes"], rel=0.01)
    assert cats["optimizer_state"] == pytest.approx(row["optimizer_state_bytes"], rel=0.01)
    assert row["profile_peak_bytes"] >= row["param_bytes"] + row["optimizer_state_bytes"]
    # Nothing the profiler counts can exceed what the process held.
    assert row["profile_peak_bytes"] < row["peak_rss_bytes"]
    # The timeline file lies beside the results, its path relative to the results file's folder.
    path = results.parent / row["profile_timeline_file"]
    assert path.is_file() and row["profile_timeline_file"].startswith("results.artifacts/")
    assert path.name == f"{spec.cell_id}-r0.timeline.json"
    timeline = json.loads(path.read_text())
    # At the end of backward every gradient exists: the gradient category's maximum is grad_bytes.
    assert timeline["category_max"]["gradients"] == pytest.approx(row["grad_bytes"], rel=0.01)
    assert timeline["peak"]["total"] == row["profile_peak_bytes"]
    assert [m["name"] for m in timeline["markers"] if m["name"].startswith("step:")] == [
        "step:warmup 1",
        "step:measured 1",
    ]
    assert row["profile_analysis_s"] > 0 and row["snapshot_file"] is None


def test_peak_phase_of_full_adamw_on_the_tiny_model(profiled):
    """Where the peak must fall, worked out from the sizes of the tiny model (P = 919,040 B of fp32
    parameters; 64 tokens x vocab 1024 fp32 logits = 256 KiB each).

    Warm-up step: AdamW creates its state (2P) lazily inside optimizer.step(), so that step's peak is
    there: P weights + P grads + 2P state (+ small for-loop temporaries) = 4P, about 3.7 MB. Its
    forward and backward hold only P + activations + grads, far less.

    Measured step: P + 2P are resident from the start. In optimizer.step() the grads add P again (3.7 MB
    in all); early in backward the activations saved by the forward (about 1.1 MB, the logits among
    them) are still held, with the two gradients of the cross-entropy's backward on top (torch's
    autograd detail, 256 KiB each, made and freed in backward: temporaries to bench.cell.profile): about
    1.6 MB > P. So the profiled peak is in the measured step's backward, above the warm-up step's peak,
    with few gradients made yet."""
    _, row, results = profiled
    assert row["profile_peak_step"] == "measured 1"
    assert row["profile_peak_phase"] == "backward"
    cats = row["profile_categories_bytes"]
    assert cats["activations"] + cats["other"] > row["param_bytes"]
    assert cats["temporaries"] >= 2 * 64 * 1024 * 4
    assert cats["gradients"] < row["grad_bytes"]
    timeline = json.loads((results.parent / row["profile_timeline_file"]).read_text())
    steps = {p["step"]: p for p in timeline["step_peaks"]}
    assert steps["warmup 1"]["phase"] == "optimizer_step"
    assert steps["warmup 1"]["total"] < steps["measured 1"]["total"] == row["profile_peak_bytes"]


def test_report_plots_profiled_rows_and_compares_with_the_predictor(profiled, tmp_path):
    _, row, results = profiled
    index = write_report([results], tmp_path / "report")
    text = index.read_text()
    assert "Where the memory goes" in text
    assert (tmp_path / "report" / "plots" / f"profile_timeline_{row['cell_id']}_r0.png").is_file()
    assert (tmp_path / "report" / "plots" / "profile_components.svg").is_file()
    table = T.component_table(rows_to_frame([row], source=str(results)), predict)
    assert list(table["category"]) == [*T.CATEGORIES, "working set", "total"]
    measured = table.set_index("category")["measured_bytes"]
    assert measured["total"] == row["profile_peak_bytes"]
    # The parameter bytes are a count both sides agree on exactly (fp32 weights of the tiny model).
    assert table.set_index("category")["predicted_bytes"]["parameters"] == row["param_bytes"]


def test_overhead_pairs_rows_differing_only_in_profiling():
    base = CellSpec.create(**{**FULL, "device": "cuda"})
    on = CellSpec.create(**{**FULL, "device": "cuda", "profile_memory": True})
    env = {"gpu_name": "synthetic", "torch": "t"}

    def row(spec, peak):
        return {
            "cell_id": spec.cell_id,
            "spec": spec.to_dict(),
            "status": "ok",
            "peak_allocated_bytes": peak,
            "step_time_s": 1.0,
            "env": env,
        }

    frame = rows_to_frame([row(base, 1000), row(on, 1300)])
    table = T.overhead_table(frame)
    assert len(table) == 1 and table.iloc[0]["peak_allocated_diff_bytes"] == 300
    assert table.iloc[0]["profiled"] == "profile_memory"


def test_snapshot_is_rejected_on_cpu_and_accepted_on_cuda():
    with pytest.raises(SpecError) as err:
        CellSpec.create(**FULL, snapshot=True)
    assert err.value.key == "snapshot" and "cuda" in str(err.value)
    assert CellSpec.create(**{**FULL, "device": "cuda"}, snapshot=True).snapshot is True


def test_profile_flags_default_off_and_leave_cell_ids_unchanged():
    assert LATER_FIELDS["profile_memory"] is False and LATER_FIELDS["snapshot"] is False
    plain = CellSpec.create(**FULL)
    assert not plain.profile_memory and not plain.snapshot
    assert "profile_memory" not in plain.canonical_json() and "snapshot" not in plain.canonical_json()
    assert CellSpec.create(**FULL, profile_memory=False).cell_id == plain.cell_id
    # Profiling costs memory, so a profiled cell is a cell of its own.
    assert CellSpec.create(**FULL, profile_memory=True).cell_id != plain.cell_id
    with pytest.raises(SpecError):
        CellSpec.create(**FULL, profile_memory="yes")


def test_cli_flags_come_from_the_spec():
    from ftmem.args import spec_from_args
    from ftmem.cli import build_parser

    args = build_parser().parse_args(
        [
            "run",
            "--model",
            "qwen3-tiny",
            "--method",
            "lora",
            "--seq-len",
            "8",
            "--batch-size",
            "1",
            "--device",
            "cuda",
            "--profile-memory",
            "--snapshot",
        ]
    )
    spec = spec_from_args(args)
    assert spec.profile_memory and spec.snapshot


def constructed_timeline() -> dict:
    """A made-up timeline in bench.cell.profile's format: two steps, the peak in the second backward."""
    cats = [
        "parameters",
        "gradients",
        "optimizer_state",
        "activations",
        "temporaries",
        "autograd_detail",
        "inputs",
        "unknown",
    ]
    g = 2**30
    points = [
        (0.0, [4 * g, 0, 0, 0, 0, 0, 0, 0]),
        (1.0, [4 * g, 0, 0, 6 * g, 0, 0, 0, 0]),
        (2.0, [4 * g, 2 * g, 0, 2 * g, 0, g, 0, 0]),
        (3.0, [4 * g, 4 * g, 8 * g, 0, g, 0, 0, 0]),
        (4.0, [4 * g, 0, 8 * g, 6 * g, 0, g, 0, 0]),
        (5.0, [4 * g, 4 * g, 8 * g, 0, 0, 0, 0, 0]),
    ]
    peak = dict(zip(cats, points[4][1], strict=True))
    return {
        "format": "ftmem-memory-timeline/1",
        "device": "cuda:0",
        "categories": cats,
        "t": [p[0] for p in points],
        "bytes": [p[1] for p in points],
        "markers": [
            {"name": "step:warmup 1", "step": "warmup 1", "start": 0.0, "end": 3.5},
            {"name": "forward", "step": "warmup 1", "start": 0.0, "end": 1.5},
            {"name": "backward", "step": "warmup 1", "start": 1.5, "end": 2.5},
            {"name": "optimizer_step", "step": "warmup 1", "start": 2.5, "end": 3.5},
            {"name": "step:measured 1", "step": "measured 1", "start": 3.5, "end": 6.0},
            {"name": "backward", "step": "measured 1", "start": 3.8, "end": 4.5},
        ],
        "peak": {
            "t": 4.0,
            "total": sum(points[4][1]),
            "categories": peak,
            "phase": "backward",
            "step": "measured 1",
        },
    }


def test_timeline_plot_on_a_constructed_timeline(tmp_path):
    timeline = constructed_timeline()
    times, series = T.row_series(timeline)
    assert series["other"][4] == 2**30 and sum(v[4] for v in series.values()) == timeline["peak"]["total"]
    paths = T.plot_timeline(timeline, tmp_path, "constructed", "a constructed timeline")
    assert [p.suffix for p in paths] == [".png", ".svg"] and all(p.stat().st_size > 0 for p in paths)
    svg = paths[1].read_text()
    assert "GiB (2^30 bytes)" in svg and "measured 1" in svg


def test_component_mapping_covers_the_predictors_components():
    """Every component the predictor names, for a spread of specs, has a category in the one table."""
    specs = [
        dict(model="qwen3-14b", method="lora", seq_len=2048, batch_size=1, gradient_checkpointing=True),
        dict(model="qwen3-14b", method="qlora", seq_len=1024, batch_size=2),
        dict(model="qwen3-0.6b", method="full", seq_len=512, batch_size=2, grad_accum=2, attn_impl="eager"),
    ]
    for spec in specs:
        components = predict(spec).components
        for name in components:
            category = T.component_category(name)
            assert category in (*T.CATEGORIES, T.NOT_PROFILED)
            matched = name in T.COMPONENT_CATEGORY or any(
                p.endswith("_") and name.startswith(p) for p in T.COMPONENT_CATEGORY
            )
            assert matched, f"{name} is not in COMPONENT_CATEGORY"
        assert sum(T.predicted_categories(components).values()) == sum(components.values())


def test_artifact_paths_are_relative_to_the_results_folder(tmp_path):
    folder = artifacts.beside(tmp_path / "sweep.jsonl")
    assert folder == tmp_path / "sweep.artifacts"
    row = {"profile_timeline_file": str(folder / "abc-r0.timeline.json"), "snapshot_file": None}
    assert (
        artifacts.relativise(row, folder)["profile_timeline_file"] == "sweep.artifacts/abc-r0.timeline.json"
    )
    env = artifacts.child_env("abc", 2, folder)
    assert env[artifacts.ENV_STEM] == "abc-r2" and Path(env[artifacts.ENV_DIR]).is_absolute()


@pytest.mark.gpu
def test_snapshot_and_profile_on_cuda(tmp_path):
    """On a GPU: a profiled, snapshotted tiny cell writes both files and a peak at or under the
    allocator's (the profiler counts tensor bytes, the allocator rounds blocks up)."""
    spec = CellSpec.create(**{**FULL, "device": "cuda"}, profile_memory=True, snapshot=True)
    row = run_cell(spec, timeout_s=300, artifacts_dir=tmp_path / "art")
    assert row["status"] == "ok", row["error"]
    assert (tmp_path / row["snapshot_file"]).is_file() and (tmp_path / row["profile_timeline_file"]).is_file()
    # warmup_steps 1: the profiled steps are the first step and the first measured one.
    allocator_peak = max(row["first_step_peak_allocated_bytes"], row["peak_allocated_bytes"])
    assert 0 < row["profile_peak_bytes"] <= allocator_peak
    assert row["profile_categories_bytes"]["parameters"] == pytest.approx(row["param_bytes"], rel=0.01)
    # The allocator's history runs from before the build: its trace reserves at least the build's peak.
    with open(tmp_path / row["snapshot_file"], "rb") as f:
        trace = pickle.load(f)["device_traces"][0]
    reserved_in_trace = sum(e["size"] for e in trace if e["action"] == "segment_alloc")
    assert reserved_in_trace >= row["build_peak_reserved_bytes"] > 0


def test_tensors_the_profiler_cannot_place_are_placed_by_lifetime():
    """Constructed events: what torch's memory profiler gave on an H200, most forward outputs with no
    category. Made in forward and freed in backward: activations; made and freed in one phase:
    temporaries; made in one step and freed in the next: still unknown."""
    from collections import namedtuple
    from types import SimpleNamespace

    import torch
    from torch.profiler._memory_profiler import Action

    from bench.cell.profile import BY_LIFETIME, TIMELINE_CATEGORIES, coalesce, row_categories

    marks = [
        {"name": "step:warmup 1", "step": "warmup 1", "start": 0, "end": 100},
        {"name": "forward", "step": "warmup 1", "start": 0, "end": 40},
        {"name": "backward", "step": "warmup 1", "start": 41, "end": 80},
        {"name": "step:measured 1", "step": "measured 1", "start": 101, "end": 200},
        {"name": "forward", "step": "measured 1", "start": 101, "end": 140},
    ]
    cpu = torch.device("cpu")
    key = namedtuple("Key", "device name")  # hashable, as torch's TensorKey is
    saved, scratch, carried = (key(cpu, n) for n in ("saved", "scratch", "carried"))
    events = [
        (10, Action.CREATE, (saved, 0), 1000),
        (12, Action.CREATE, (scratch, 0), 300),
        (15, Action.DESTROY, (scratch, 0), 300),
        (20, Action.CREATE, (carried, 0), 50),
        (60, Action.DESTROY, (saved, 0), 1000),
        (120, Action.DESTROY, (carried, 0), 50),
    ]
    timeline = SimpleNamespace(timeline=events, categories=SimpleNamespace(get=lambda key, version: None))
    times, sizes = coalesce(timeline, cpu, marks)
    at = {t: dict(zip(TIMELINE_CATEGORIES, s, strict=True)) for t, s in zip(times, sizes, strict=True)}
    assert at[12][BY_LIFETIME["temporaries"]] == 300 and at[12][BY_LIFETIME["activations"]] == 1000
    assert at[20]["unknown"] == 50
    assert row_categories(at[20]) == {
        "parameters": 0, "gradients": 0, "optimizer_state": 0, "activations": 1000, "temporaries": 0, "other": 50,
    }  # fmt: skip
    unplaced = coalesce(timeline, cpu)  # without the step markers nothing is placed
    assert dict(zip(TIMELINE_CATEGORIES, unplaced[1][1], strict=True))["unknown"] == 1300


#: QLoRA (NF4, double quantization, fp32 upcast of the unquantized weights, LoRA r 8) with gradient
#: checkpointing: the setup of the H200's Qwen3-14B cell whose `other` was 42% of the peak.
QLORA = {**TINY, "method": "qlora", "gradient_checkpointing": True}


@pytest.fixture(scope="module")
def profiled_qlora(tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiled_qlora")
    spec = CellSpec.create(**QLORA, profile_memory=True)
    row = run_cell(spec, timeout_s=180, artifacts_dir=artifacts.beside(folder / "results.jsonl"))
    timeline = json.loads((folder / row["profile_timeline_file"]).read_text())
    return row, timeline


def test_qlora_peak_leaves_little_in_other(profiled_qlora):
    """The tiny QLoRA cell on CPU repeats what the H200 showed: torch's profiler files the frozen 4-bit
    weights and their quantization constants as inputs and the cross-entropy's two logit-sized
    gradients as autograd detail (before bench.cell.profile placed them: `other` 594,704 of 1,796,744 B at
    this peak, 33%). Placed, `other` keeps only the token batch (2 x 32 int64 = 512 B) and CPU
    allocations that hold no tensor: under 2% of the peak."""
    row, timeline = profiled_qlora
    assert row["status"] == "ok", row["error"]
    assert check_row(row) == []
    cats, peak = row["profile_categories_bytes"], row["profile_peak_bytes"]
    assert sum(cats.values()) == peak == timeline["peak"]["total"]  # every byte in one category
    assert cats["other"] < 0.02 * peak
    # The model's own state is parameters: the 4-bit weights, absmax and code, the fp32 embedding,
    # norms and head, the LoRA adapters (row's param_bytes, bench.model.build.model_state), within 1%.
    assert cats["parameters"] == pytest.approx(row["param_bytes"], rel=0.01)
    at_peak = timeline["peak"]["categories"]
    assert at_peak["parameters_by_storage"] > 0 and at_peak["inputs"] == 2 * 32 * 8
    assert at_peak["autograd_detail"] == 0
    # The two fp32 gradients of the loss (64 tokens x vocab 1024 x 4 B each), made and freed in backward.
    assert at_peak["temporaries_by_lifetime"] >= 2 * 64 * 1024 * 4
    placed = ("parameters_by_storage", "activations_by_lifetime", "temporaries_by_lifetime")
    assert row["profile_by_lifetime_bytes"] == sum(at_peak[c] for c in placed)


def test_placement_of_what_torch_files_as_inputs_autograd_detail_or_unknown():
    """Constructed events with torch's own keys and categories, as the H200's QLoRA profile had them:
    a frozen 4-bit weight and the token batch (INPUT, alive throughout), the embedding's output (INPUT,
    forward to backward), a gradient of the logits (AUTOGRAD_DETAIL, within backward), a reused
    address (INPUT, at a model pointer but freed) and two allocations without a tensor (one Key)."""
    from types import SimpleNamespace

    import torch
    from torch.profiler._memory_profiler import Action, Category, Key, TensorKey, _Storage

    from bench.cell.profile import TIMELINE_CATEGORIES, coalesce, row_categories

    marks = [
        {"name": "step:measured 1", "step": "measured 1", "start": 0, "end": 100},
        {"name": "forward", "step": "measured 1", "start": 0, "end": 40},
        {"name": "backward", "step": "measured 1", "start": 41, "end": 80},
    ]
    cpu = torch.device("cpu")
    tensor = {
        n: TensorKey(cpu, i, _Storage(1000 * i, i))
        for i, n in enumerate(["weight", "batch", "emb", "grad"], 1)
    }
    tensor["reused"] = TensorKey(cpu, 9, _Storage(tensor["weight"].storage.ptr + 1, 9))
    category = {"weight": Category.INPUT, "batch": Category.INPUT, "emb": Category.INPUT,
                "reused": Category.INPUT, "grad": Category.AUTOGRAD_DETAIL}  # fmt: skip
    by_key = {k: category[n] for n, k in tensor.items()}
    no_tensor = Key(cpu)
    events = [
        (-1, Action.PREEXISTING, (tensor["weight"], 0), 4000),
        (-1, Action.PREEXISTING, (tensor["batch"], 0), 16),
        (5, Action.CREATE, (no_tensor, 0), 7),
        (8, Action.DESTROY, (no_tensor, 0), 7),
        (10, Action.CREATE, (tensor["emb"], 0), 300),
        (12, Action.CREATE, (tensor["reused"], 0), 50),
        (45, Action.CREATE, (no_tensor, 0), 64),
        (50, Action.CREATE, (tensor["grad"], 0), 200),
        (60, Action.DESTROY, (tensor["grad"], 0), 200),
        (70, Action.DESTROY, (tensor["emb"], 0), 300),
        (72, Action.DESTROY, (tensor["reused"], 0), 50),
        (75, Action.DESTROY, (no_tensor, 0), 64),
    ]
    timeline = SimpleNamespace(timeline=events, categories=SimpleNamespace(get=lambda k, v: by_key.get(k)))
    model_ptrs = frozenset({tensor["weight"].storage.ptr, tensor["reused"].storage.ptr})
    times, sizes = coalesce(timeline, cpu, marks, model_ptrs)
    at = {t: dict(zip(TIMELINE_CATEGORIES, s, strict=True)) for t, s in zip(times, sizes, strict=True)}
    assert at[50]["parameters_by_storage"] == 4000 and at[50]["inputs"] == 16
    assert at[50]["activations_by_lifetime"] == 300 + 50 and at[50]["temporaries_by_lifetime"] == 200
    # Allocations without a tensor share one key: never placed (first made in forward, last freed in
    # backward would have read as an activation), so a cuBLAS workspace stays `other`.
    assert at[50]["unknown"] == 64 and at[50]["autograd_detail"] == 0
    assert row_categories(at[50]) == {
        "parameters": 4000, "gradients": 0, "optimizer_state": 0, "activations": 350, "temporaries": 200,
        "other": 80,
    }  # fmt: skip
    # Without the model's pointers and the markers, torch's labels stand.
    bare = dict(zip(TIMELINE_CATEGORIES, coalesce(timeline, cpu)[1][times.index(50)], strict=True))
    assert (bare["inputs"], bare["autograd_detail"], bare["unknown"]) == (4000 + 16 + 300 + 50, 200, 64)
