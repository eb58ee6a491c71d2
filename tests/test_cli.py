"""The command line's refusals and output (issue 14 items 7 and 10; issue 15: runs without a GPU,
the sweep's dry run, log and resume lines). Every bad input exits 2 with a message, never a traceback."""

import json

import pytest
import yaml

from bench.schema import new_row
from ftmem.cli import main
from tests.test_sweep_run import BASE

RUN = ["run", "--model", "qwen3-tiny", "--method", "lora", "--seq-len", "16", "--batch-size", "1"]
CAPACITY = ["capacity", "--model", "qwen3-tiny", "--method", "lora", "--budget-gb", "24"]


def _refused(argv, capsys) -> str:
    """stderr of a command argparse refuses (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_cells(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a cell ran although the command was refused")

    monkeypatch.setattr("bench.cell.runner.run_cell", boom)


@pytest.fixture
def sweep_file(tmp_path):
    def write(data, name="s.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump({"name": "t", **data}))
        return str(path)

    return write


# -- issue 14 item 10: flags that are not spec fields ---------------------------------------------
@pytest.mark.parametrize("value", ["-1", "0", "inf", "nan", "soon"])
def test_run_timeout_must_be_finite_and_positive(capsys, value, no_cells):
    err = _refused([*RUN, "--device", "cpu", "--timeout", value], capsys)
    assert f"argument --timeout: {value!r} is not allowed; seconds, a finite number > 0" in err


@pytest.mark.parametrize("flag", ["--timeout", "--stop-after"])
def test_sweep_time_flags_must_be_finite_and_positive(capsys, sweep_file, flag):
    err = _refused(["sweep", sweep_file({"base": BASE}), flag, "-5"], capsys)
    assert f"argument {flag}: '-5' is not allowed" in err


def test_max_cells_must_be_a_positive_integer(capsys, sweep_file):
    err = _refused(["sweep", sweep_file({"base": BASE}), "--dry-run", "--max-cells", "0"], capsys)
    assert "argument --max-cells: '0' is not allowed; an integer >= 1" in err


@pytest.mark.parametrize(
    "flag, value",
    [("--seq-lens", ","), ("--seq-lens", "0,-5"), ("--batch-sizes", "1,two"), ("--batch-sizes", "")],
)
def test_capacity_grids_name_their_flag(capsys, flag, value):
    err = _refused([*CAPACITY, flag, value], capsys)
    assert f"argument {flag}: {value!r} is not allowed; comma-separated integers >= 1" in err
    assert "seq_len:" not in err and "Traceback" not in err


# -- issue 14 item 7: a budget of inf on the command line -------------------------------------------
@pytest.mark.parametrize(
    "command", [["predict", "--model", "qwen3-tiny", "--method", "lora", "--seq-len", "16"]]
)
@pytest.mark.parametrize("budget", ["inf", "1e400", "-3"])
def test_an_infinite_budget_is_refused_with_the_range(capsys, command, budget):
    assert main([*command, "--batch-size", "1", "--budget-gb", budget]) == 2
    err = capsys.readouterr().err
    assert "error: budget_gb:" in err and "> 0 and <= 1000" in err and "Traceback" not in err


# -- issue 15: without a GPU, say so once and stop before any row ------------------------------------
@pytest.fixture
def no_gpu(monkeypatch):
    """No GPU visible, on any machine (on a CPU build of torch that alone is the reason given)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def test_run_without_cuda_says_so_once_and_writes_nothing(tmp_path, capsys, no_gpu, no_cells):
    out = tmp_path / "r.jsonl"
    assert main([*RUN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("no CUDA GPU here") == 1 and "--device cpu" in err and "Traceback" not in err
    assert not out.exists()


def test_a_sweep_without_cuda_stops_before_any_row(tmp_path, capsys, sweep_file, no_gpu, no_cells):
    out = tmp_path / "r.jsonl"
    gpu_base = {k: v for k, v in BASE.items() if k != "device"}
    path = sweep_file(
        {
            "base": gpu_base,
            "axes": {"seq_len": [16, 32]},
            "include": [{"attn_impl": "flash_attention_2", "precision": "fp32"}],
        }
    )
    assert main(["sweep", path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("no CUDA GPU here") == 1 and "2 cells need device cuda" in err
    assert "sweeps/smoke-cpu.yaml" in err and not out.exists()  # not even the invalid cell's row
    assert main(["sweep", path, "--out", str(out), "--dry-run"]) == 0  # a dry run only warns
    assert "a run here would stop" in capsys.readouterr().err


def test_capacity_verify_without_cuda_stops_before_any_row(tmp_path, capsys, no_gpu, no_cells):
    out = tmp_path / "v.jsonl"
    argv = [*CAPACITY, "--seq-lens", "64,128", "--batch-sizes", "1", "--verify", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("no CUDA GPU here") == 1 and "--verify measures the frontier on a GPU" in err
    assert not out.exists()


def test_a_cpu_cell_runs_without_cuda(tmp_path, capsys, monkeypatch, no_gpu):
    ran = []

    def fake_run_cell(spec, timeout_s, artifacts_dir=None):
        ran.append(spec)
        return new_row(spec.to_dict(), spec.cell_id, "ok")

    monkeypatch.setattr("bench.cell.runner.run_cell", fake_run_cell)
    out = tmp_path / "r.jsonl"
    assert main([*RUN, "--device", "cpu", "--json", "--out", str(out)]) == 0
    assert [s.device for s in ran] == ["cpu"] and json.loads(out.read_text())["status"] == "ok"


# -- issue 15: the dry run tells the cells apart --------------------------------------------------------
def test_dry_run_shows_the_model_and_every_field_that_varies(capsys, sweep_file, tmp_path):
    path = sweep_file(
        {
            "base": {**BASE, "method": "qlora"},
            "axes": {"optimizer": ["adamw", "sgd"], "compile": [False, True], "quant_type": ["nf4", "fp4"]},
            "include": [{"method": "full"}],
        }
    )
    assert main(["sweep", path, "--dry-run", "--out", str(tmp_path / "r.jsonl")]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "cell_id" in line)
    columns = [c.strip() for c in header.strip("┃ ").split("┃")]
    assert columns[:4] == ["cell_id", "rep", "model", "method"]
    assert {"optimizer", "compile", "quant_type"} <= set(columns)
    # lora_r is 8 wherever it applies (None for full): no column of its own
    assert "lora_r" not in columns and "double_quant" not in columns


# -- issue 15: a sweep piped to a log prints a line per cell, and a resumed one says what was done ------
def test_a_logged_sweep_prints_a_line_per_cell_and_a_resume_says_what_was_done(tmp_path, capsys, sweep_file):
    out = str(tmp_path / "r.jsonl")
    invalid = [{"attn_impl": "flash_attention_2", "precision": "fp32", "seq_len": s} for s in (16, 32)]
    path = sweep_file({"base": BASE, "include": invalid})  # rows without running a cell
    assert main(["sweep", path, "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == ["[1/2]", "[2/2]"]
    assert all("invalid" in line for line in lines[:-1])
    assert json.loads(lines[-1])["invalid"] == 2
    more = [*invalid, {**invalid[0], "seq_len": 48}]
    path = sweep_file({"base": BASE, "include": more})
    assert main(["sweep", path, "--out", out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"resuming {out}: 2 cells already done, 1 to run"
    assert lines[1].startswith("[1/1]") and json.loads(lines[-1])["already_done"] == 2
