import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.cell.rows import failure_row
from bench.schema import new_row
from bench.store import ResultsLocked, acquire, append_row, read_rows
from bench.sweep.grid import expand, parse_sweep
from bench.sweep.run import Shard, make_plan, run_sweep

BASE = {"model": "qwen3-tiny", "method": "lora", "seq_len": 32, "batch_size": 1, "device": "cpu"}
ROOT = Path(__file__).resolve().parent.parent


def sweep_of(axes, repeats=1):
    return parse_sweep({"name": "t", "base": BASE, "axes": axes, "repeats": repeats}, "t.yaml")


def fake_runner(oom_over_tokens=None, calls=None):
    """Stands in for bench.cell.runner.run_cell: OOM when seq*batch exceeds a threshold."""

    def run(spec, timeout_s, repeat=0):
        if calls is not None:
            calls.append(spec.cell_id)
        big = oom_over_tokens is not None and spec.seq_len * spec.batch_size > oom_over_tokens
        return new_row(
            spec.to_dict(),
            spec.cell_id,
            status="oom" if big else "ok",
            repeat=repeat,
            peak_allocated_bytes=None if big else spec.seq_len * spec.batch_size,
        )

    return run


def test_oom_pruning_skips_larger_cells_and_names_the_cause(tmp_path):
    out = tmp_path / "r.jsonl"
    calls = []
    sweep = sweep_of({"seq_len": [32, 64, 128], "batch_size": [1, 2]})
    rows = run_sweep(sweep, str(out), runner=fake_runner(oom_over_tokens=64, calls=calls))
    by_size = {(r["spec"]["seq_len"], r["spec"]["batch_size"]): r for r in rows}
    assert by_size[(64, 2)]["status"] == "oom"
    skipped = by_size[(128, 2)]
    assert skipped["status"] == "skipped" and skipped["implied_by"] in {
        by_size[(128, 1)]["cell_id"],
        by_size[(64, 2)]["cell_id"],
    }
    assert len(calls) == 5 and len(read_rows(out)) == 6


def test_no_prune_runs_everything(tmp_path):
    calls = []
    sweep = sweep_of({"seq_len": [32, 64, 128], "batch_size": [1, 2]})
    run_sweep(sweep, str(tmp_path / "r.jsonl"), prune=False, runner=fake_runner(64, calls))
    assert len(calls) == 6


def test_resume_skips_done_cells_and_retry_failed_reruns_errors(tmp_path):
    out = tmp_path / "r.jsonl"
    sweep = sweep_of({"seq_len": [32, 64]}, repeats=2)
    first = run_sweep(sweep, str(out), runner=fake_runner())
    assert len(first) == 4 and {r["repeat"] for r in first} == {0, 1}
    assert run_sweep(sweep, str(out), runner=fake_runner()) == []
    # An error row is done unless --retry-failed.
    spec = make_plan(sweep, []).todo[0][0].spec
    append_row(out, {**failure_row(spec, "error", "boom"), "repeat": 0})
    assert run_sweep(sweep, str(out), runner=fake_runner()) == []
    again = run_sweep(sweep, str(out), retry_failed=True, runner=fake_runner())
    assert [r["cell_id"] for r in again] == [spec.cell_id] and again[0]["status"] == "ok"


def test_shards_partition_the_cells():
    sweep = sweep_of({"seq_len": [32, 64, 128, 256], "batch_size": [1, 2, 3]})
    ids = [{c.cell_id for c, _ in make_plan(sweep, [], Shard(i, 3)).todo} for i in range(3)]
    assert sum(len(s) for s in ids) == 12 and set.union(*ids) == {
        c.cell_id for c, _ in make_plan(sweep, []).todo
    }
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    with pytest.raises(ValueError, match="0 <= i < n"):
        Shard.parse("3/3")
    with pytest.raises(ValueError, match="i/n"):
        Shard.parse("half")


def test_invalid_cells_get_rows_and_do_not_stop_the_sweep(tmp_path):
    sweep = sweep_of({"attn_impl": ["sdpa", "flash_attention_2"]})
    rows = run_sweep(sweep, str(tmp_path / "r.jsonl"), runner=fake_runner())
    assert sorted(r["status"] for r in rows) == ["invalid", "ok"]
    assert all(r["sweep"]["name"] == "t" for r in rows)


def test_truncated_last_line_is_tolerated_and_repaired(tmp_path):
    out = tmp_path / "r.jsonl"
    sweep = sweep_of({"seq_len": [32, 64]})
    run_sweep(sweep, str(out), runner=fake_runner())
    with open(out, "a") as f:
        f.write('{"cell_id": "abc", "sta')  # a write cut short by a crash
    assert len(read_rows(out)) == 2
    append_row(out, {"cell_id": "x", "status": "ok"})
    assert [r["cell_id"] for r in read_rows(out)][-1] == "x" and len(read_rows(out)) == 3


def test_malformed_line_in_the_middle_is_an_error(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="r.jsonl:2"):
        read_rows(out)


def test_lock_keeps_a_second_runner_out(tmp_path):
    out = tmp_path / "r.jsonl"
    held = acquire(out)
    try:
        with pytest.raises(ResultsLocked, match="in use"):
            run_sweep(sweep_of({"seq_len": [32]}), str(out), runner=fake_runner())
    finally:
        held.release()
    assert len(run_sweep(sweep_of({"seq_len": [32]}), str(out), runner=fake_runner())) == 1


def test_kill_9_mid_cell_loses_only_that_cell(tmp_path):
    """A real sweep of tiny CPU cells, killed with SIGKILL while a cell runs, then resumed."""
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"name": "kill", "base": {**BASE, "steps": 1}, "axes": {"seq_len": [16, 32, 48]}})
    )
    out = tmp_path / "r.jsonl"
    cmd = [sys.executable, "-m", "ftmem.cli", "sweep", str(sweep_file), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while len(read_rows(out)) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # the second cell is now running
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_rows(out)
    assert 1 <= len(before) < 3
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 3 and len({r["cell_id"] for r in rows}) == 3
    assert all(r["status"] == "ok" for r in rows)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 3 - len(before)


def test_oom_rows_written_before_a_knob_existed_still_prune():
    from bench.sweep.run import implied_oom

    old = {"cell_id": "old", "status": "oom", "spec": {**BASE, "seq_len": 32, "batch_size": 1}}
    new_spec = {**BASE, "seq_len": 64, "batch_size": 1, "profile_memory": False, "gpus": 1}
    assert implied_oom(new_spec, [old]) == "old"
    assert implied_oom({**new_spec, "profile_memory": True}, [old]) is None


def test_stop_after_starts_no_cell_past_the_limit_and_resume_finishes(tmp_path):
    out = tmp_path / "r.jsonl"
    sweep = sweep_of({"seq_len": [16, 32, 48, 64]})
    slow = fake_runner()

    def runner(spec, timeout_s, repeat=0):
        time.sleep(0.3)
        return slow(spec, timeout_s, repeat)

    first = run_sweep(sweep, str(out), runner=runner, stop_after_s=0.45)
    assert len(first) == 2  # started at 0 s and at 0.3 s; none at 0.6 s
    rest = run_sweep(sweep, str(out), runner=fake_runner())
    assert len(rest) == 2 and len({r["cell_id"] for r in read_rows(out)}) == 4


def _is_cell(proc) -> bool:
    """A cell's process: a fresh bench.cell.worker (--no-preload), or a child of the fork server (the default)."""
    try:
        if "bench.cell.worker" in " ".join(proc.cmdline()):
            return True
        parent = proc.parent()
        return parent is not None and "forkserver" in " ".join(parent.cmdline())
    except Exception:
        return False


def _hanging_sweep(tmp_path, *args):
    """A real sweep whose first cell hangs in its first step; returns (sweep process, cell process)."""
    import psutil

    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(
        yaml.safe_dump({"name": "hang", "base": {**BASE, "steps": 1}, "axes": {"seq_len": [16]}})
    )
    cmd = [
        sys.executable,
        "-m",
        "ftmem.cli",
        "sweep",
        str(sweep_file),
        "--out",
        str(tmp_path / "r.jsonl"),
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FTMEM_TEST_FAULT": "hang:first_step"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cells = [p for p in psutil.Process(proc.pid).children(recursive=True) if _is_cell(p)]
        if cells:
            return proc, cells[0]
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the cell's process never started")


@pytest.mark.parametrize("args", [("--no-preload",), ()])
def test_sigterm_stops_the_sweep_and_kills_the_running_cell(tmp_path, args):
    import psutil

    proc, cell = _hanging_sweep(tmp_path, *args)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert json.loads(out.strip().splitlines()[-1])["interrupted"] is True
    assert not cell.is_running() or cell.status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("args", [("--no-preload",), ()])
def test_kill_9_of_the_runner_takes_the_running_cell_with_it(tmp_path, args):
    import psutil

    proc, cell = _hanging_sweep(tmp_path, *args)
    time.sleep(1.0)  # past the worker's start, where it asks to die with its parent
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs([cell], timeout=10)
    assert cell in gone and not alive


def test_cells_keep_a_bytecode_cache_where_python_would_write_none(tmp_path):
    from bench.cell.procs import bytecode_cache_env

    off = bytecode_cache_env({"PYTHONDONTWRITEBYTECODE": "1", "FTMEM_PYCACHE": str(tmp_path / "pyc")})
    assert "PYTHONDONTWRITEBYTECODE" not in off and off["PYTHONPYCACHEPREFIX"] == str(tmp_path / "pyc")
    chosen = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/elsewhere"}
    assert bytecode_cache_env(chosen) == chosen  # the user's own prefix stays
    assert "PYTHONPYCACHEPREFIX" not in bytecode_cache_env({})  # a writable install needs nothing


def test_an_empty_bytecode_cache_is_filled_once_before_the_cells(tmp_path, monkeypatch):
    from bench.cell import procs

    monkeypatch.setattr(procs, "WARM_IMPORTS", "import json")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    child = procs.bytecode_cache_env({"PYTHONDONTWRITEBYTECODE": "1", "FTMEM_PYCACHE": str(tmp_path / "pyc")})
    assert procs.warm_bytecode_cache(child) is not None
    assert any((tmp_path / "pyc").rglob("*.pyc"))
    assert procs.warm_bytecode_cache(child) is None  # filled: nothing more to do
    assert procs.warm_bytecode_cache({}) is None  # Python's own cache: nothing to do


# -- cells forked from the preloaded server (--preload) -------------------------------------------
def test_preloaded_cells_are_forked_and_measured(tmp_path):
    out = tmp_path / "r.jsonl"
    sweep = parse_sweep(
        {"name": "pre", "base": {**BASE, "steps": 1}, "axes": {"seq_len": [16, 32]}}, "t.yaml"
    )
    rows = run_sweep(sweep, str(out), preload=True)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    assert {r["cell_process"] for r in rows} == {"forked"}
    assert all(r["startup_breakdown_s"]["interpreter_and_imports"] < 2.0 for r in rows)


def test_a_forked_cell_that_cannot_use_cuda_runs_again_fresh(monkeypatch):
    from bench.cell import runner

    monkeypatch.setattr(runner, "_fork_usable", True)
    monkeypatch.setenv("FTMEM_TEST_FAULT", "cudainit:build")  # fails in forked cells only
    spec = parse_sweep({"name": "pre", "base": {**BASE, "steps": 1}}, "t.yaml")
    cell = next(iter(expand(spec))).spec
    row = runner.run_cell(cell, timeout_s=120, preload=True)
    assert row["status"] == "ok" and row["cell_process"] == "fresh"
    assert runner._fork_usable is False  # and the later cells of the sweep run fresh


def test_a_hanging_forked_cell_times_out_and_is_killed(monkeypatch):
    import psutil

    from bench.cell import runner

    monkeypatch.setattr(runner, "_fork_usable", True)
    monkeypatch.setenv("FTMEM_TEST_FAULT", "hang:first_step")
    spec = parse_sweep({"name": "pre", "base": {**BASE, "steps": 1}}, "t.yaml")
    cell = next(iter(expand(spec))).spec
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    row = runner.run_cell(cell, timeout_s=15, preload=True)
    assert row["status"] == "timeout" and row["cell_process"] == "forked"
    time.sleep(0.5)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert all("forkserver" in " ".join(p.cmdline()) for p in left)  # only the server stays


def test_dry_run_estimates_time_from_the_cells_already_done(tmp_path):
    from ftmem.commands.sweep import time_estimate

    out = tmp_path / "r.jsonl"
    sweep = sweep_of({"seq_len": [16, 32, 48, 64]})
    assert time_estimate(make_plan(sweep, [])) is None  # nothing measured yet
    for seconds, cell_id in zip(
        (10.0, 20.0), [c.cell_id for c, _ in make_plan(sweep, []).todo], strict=False
    ):
        cell = next(c for c, _ in make_plan(sweep, []).todo if c.cell_id == cell_id)
        append_row(out, {**new_row(cell.spec_dict, cell_id, "ok"), "cell_wall_time_s": seconds})
    plan = make_plan(sweep, read_rows(out))
    assert len(plan.todo) == 2 and time_estimate(plan) == 2 * 15.0


def _zero3_full_cell(offload: str):
    base = {"model": "qwen3-14b", "method": "full", "seq_len": 2048, "batch_size": 1}
    base.update(gpus=2, dist="deepspeed_zero3", zero_offload=offload)
    return next(iter(expand(parse_sweep({"name": "host", "base": base}, "t.yaml"))))


def test_dry_run_warns_when_zero_offload_may_not_fit_in_host_memory():
    from analysis.predict import predict
    from ftmem.commands.sweep import host_memory_warning

    offload, none = _zero3_full_cell("optimizer"), _zero3_full_cell("none")
    predicted = predict(offload.spec.to_dict())
    # fp32 master, AdamW moments and fp32 grads (16 bytes) of 14B+ parameters over 2 ranks
    assert predicted.outside_allocated["host_bytes"] >= 16 * 14e9 // 2
    warning = host_memory_warning(offload, predicted, host_total=256 << 30)
    assert warning and "x 2" in warning and "256.0 GiB" in warning
    assert host_memory_warning(offload, predicted, host_total=1 << 40) is None
    assert host_memory_warning(none, predict(none.spec.to_dict()), host_total=16 << 30) is None


def test_only_runs_the_cells_whose_spec_matches(tmp_path):
    from bench.sweep.run import Only

    sweep = sweep_of({"seq_len": [16, 32, 48], "batch_size": [1, 2]})
    only = Only.parse(["seq_len=16", "seq_len=48", "batch_size=2"])  # (16 or 48) and batch 2
    plan = make_plan(sweep, [], only=only)
    assert sorted((c.spec.seq_len, c.spec.batch_size) for c, _ in plan.todo) == [(16, 2), (48, 2)]
    calls = []
    run_sweep(
        sweep, str(tmp_path / "r.jsonl"), runner=fake_runner(calls=calls), only=Only.parse(["seq_len=32"])
    )
    assert len(calls) == 2  # the other cells are neither run nor recorded
    assert len(read_rows(tmp_path / "r.jsonl")) == 2


@pytest.mark.parametrize(
    "item, message",
    [("seq_len", "write KEY=VALUE"), ("=3", "write KEY=VALUE"), ("seqlen=3", "unknown key 'seqlen'")],
)
def test_only_rejects_bad_filters_naming_them(item, message):
    from bench.sweep.run import Only

    with pytest.raises(ValueError, match=message) as info:
        Only.parse([item])
    assert repr(item) in str(info.value) or item in str(info.value)


def test_the_cli_forks_cells_by_default_and_no_preload_starts_them_fresh():
    from ftmem.cli import build_parser

    assert build_parser().parse_args(["sweep", "s.yaml"]).preload is True
    assert build_parser().parse_args(["sweep", "s.yaml", "--no-preload"]).preload is False


def test_killing_a_cell_that_still_shares_our_process_group_spares_us():
    """A forked cell killed before it starts its own session shares the runner's process group: the
    tree is killed, the group (the runner, and whatever started it) is not."""
    from bench.cell.procs import kill_pid_tree

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert os.getpgid(child.pid) == os.getpgrp()
    kill_pid_tree(child.pid)
    assert child.wait(timeout=10) == -signal.SIGKILL  # the cell is gone, and this test still runs
