"""Results files (issue 14, items 1-5): no complete row is ever lost, a file that cannot take rows is
refused before a cell runs, a bad line is named and never rewritten, every writer takes the lock."""

import errno
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from bench import store
from bench.schema import new_row
from bench.store import (
    MalformedRow,
    ResultsLocked,
    ResultsUnwritable,
    acquire,
    append_row,
    check_writable,
    read_rows,
)
from bench.sweep.grid import parse_sweep
from bench.sweep.run import make_plan, run_sweep
from ftmem.cli import main
from tests.test_sweep_run import BASE, fake_runner

ROOT = Path(__file__).resolve().parent.parent
RUN = ["run", "--model", "qwen3-tiny", "--method", "lora", "--seq-len", "16", "--batch-size", "1"]


def _sweep(seq_lens=(16, 32, 48)):
    return parse_sweep({"name": "t", "base": BASE, "axes": {"seq_len": list(seq_lens)}}, "t.yaml")


@pytest.fixture
def no_cells(monkeypatch):
    """A cell must not run: the command is to be refused before."""

    def boom(*args, **kwargs):
        raise AssertionError("a cell ran although the results file was refused")

    monkeypatch.setattr("bench.cell.runner.run_cell", boom)


# -- 1. a complete last row without its newline is kept -------------------------------------------
def test_a_complete_last_row_without_newline_is_kept_and_the_next_row_follows_it(tmp_path):
    out = tmp_path / "r.jsonl"
    sweep = _sweep((16, 32))
    first, second = (cell for cell, _ in make_plan(sweep, []).todo)
    row = {**new_row(first.spec_dict, first.cell_id, "ok"), "repeat": 0}
    out.write_text(json.dumps(row))  # complete, but the newline never made it to disk
    assert [c.cell_id for c, _ in make_plan(sweep, read_rows(out)).todo] == [second.cell_id]
    written = run_sweep(sweep, str(out), runner=fake_runner())
    assert [r["cell_id"] for r in written] == [second.cell_id]
    assert [r["cell_id"] for r in read_rows(out)] == [first.cell_id, second.cell_id]
    assert out.read_bytes().count(b"\n") == 2


def test_only_a_last_line_that_does_not_parse_is_cut(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"cell_id": "a", "status": "ok"}\n{"cell_id": "b", "sta')
    append_row(out, {"cell_id": "c", "status": "ok"})
    assert [r["cell_id"] for r in read_rows(out)] == ["a", "c"]


# -- 2. a results file that cannot take rows: found before the first cell; a failed write keeps the row
@pytest.mark.parametrize("kind", ["directory", "under a file"])
def test_an_unwritable_out_is_refused_before_the_cell_runs(tmp_path, capsys, no_cells, kind):
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    out = tmp_path / ("d" if kind == "directory" else "f/r.jsonl")
    assert main([*RUN, "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ftmem run: error:" in err and str(out) in err and "Traceback" not in err


def test_an_unwritable_out_stops_a_sweep_before_any_cell(tmp_path):
    calls = []
    with pytest.raises(ResultsUnwritable, match="is a directory"):
        run_sweep(_sweep(), str(tmp_path), runner=fake_runner(calls=calls))
    assert calls == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through file permissions")
def test_a_read_only_results_file_is_refused_before_the_first_cell(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text("")
    out.chmod(0o444)
    with pytest.raises(ResultsUnwritable, match="cannot be written"):
        check_writable(out)


def test_a_full_disk_mid_sweep_stops_it_and_keeps_the_row_for_recovery(tmp_path, monkeypatch):
    out, calls = tmp_path / "r.jsonl", []
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    real_write = store._write_synced

    def full_after_one_row(path, data):
        if path == out and out.exists() and out.stat().st_size:
            with open(path, "ab") as f:
                f.write(data[:10])  # a part of the row reaches the disk, then it is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(path, data)

    monkeypatch.setattr(store, "_write_synced", full_after_one_row)
    with pytest.raises(ResultsUnwritable, match="No space left on device") as info:
        run_sweep(_sweep(), str(out), runner=fake_runner(calls=calls))
    assert len(calls) == 2  # the third cell never ran
    kept = read_rows(out)
    assert len(kept) == 1 and out.read_bytes().endswith(b"\n")  # no piece of the failed row left
    rescue = store.rescue_path(out)
    assert str(rescue) in str(info.value) and rescue.is_relative_to(tmp_path / "tmp")
    rescued = read_rows(rescue)
    assert [r["cell_id"] for r in rescued] == [calls[1]]


# -- 3. never read a device ---------------------------------------------------------------------
def test_a_device_or_fifo_is_refused_as_a_results_file(tmp_path):
    with pytest.raises(ResultsUnwritable, match="not a regular file"):
        check_writable("/dev/full")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "t", "base": BASE}))
    # Reading a FIFO without a writer would block for ever; the timeout catches a regression.
    done = subprocess.run(
        [sys.executable, "-m", "ftmem.cli", "sweep", str(sweep_file), "--dry-run", "--out", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 2 and "not a regular file" in done.stderr and "Traceback" not in done.stderr


# -- 4. a bad line in the middle: named, with what to do, and the file left alone ----------------------
@pytest.mark.parametrize(
    "bad, why",
    [
        (b"not json", "not a JSON row"),
        (b"{}", "the row has no 'cell_id' string"),
        (b'{"cell_id": "\xff"}', "not a JSON row (not UTF-8"),
    ],
)
def test_a_bad_middle_line_stops_a_sweep_naming_file_and_line(tmp_path, capsys, bad, why):
    out = tmp_path / "r.jsonl"
    good = json.dumps({"cell_id": "a", "status": "ok"}).encode()
    out.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    before = out.read_bytes()
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(yaml.safe_dump({"name": "t", "base": BASE}))
    for dry in (["--dry-run"], []):
        assert main(["sweep", str(sweep_file), "--out", str(out), *dry]) == 2
        err = capsys.readouterr().err
        assert f"r.jsonl:2: {why}" in err and "delete line 2" in err and "Traceback" not in err
    assert out.read_bytes() == before


def test_report_names_the_line_of_invalid_utf8(tmp_path, capsys):
    rows = [json.loads(line) for line in (ROOT / "tests/fixtures/report_rows.jsonl").read_text().splitlines()]
    path = tmp_path / "rows.jsonl"
    path.write_bytes(json.dumps(rows[0]).encode() + b"\n\xff\xfe\n" + json.dumps(rows[1]).encode() + b"\n")
    assert main(["report", str(path), "--out", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert "rows.jsonl:2: not a JSON row (not UTF-8" in err and "Traceback" not in err


def test_a_torn_utf8_character_on_the_last_line_is_a_torn_write(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"cell_id": "a", "status": "ok"}\n{"cell_id": "\xc3')
    with pytest.warns(UserWarning, match="truncated last line"):
        assert len(read_rows(out)) == 1
    with pytest.raises(MalformedRow, match="r.jsonl:1"):
        read_rows(out, required=("repeat",))


# -- 5. every writer takes the lock ---------------------------------------------------------------
def test_run_out_refuses_a_file_a_sweep_holds(tmp_path, capsys, no_cells):
    out = tmp_path / "r.jsonl"
    held = acquire(out)
    try:
        assert main([*RUN, "--device", "cpu", "--out", str(out)]) == 2
    finally:
        held.release()
    assert "in use by another ftmem runner" in capsys.readouterr().err and not out.exists()


def test_capacity_verify_refuses_a_locked_file(tmp_path, capsys, monkeypatch, no_cells):
    monkeypatch.setattr("bench.devices.cuda_missing", lambda: None)  # as on a GPU machine
    out = tmp_path / "v.jsonl"
    held = acquire(out)
    try:
        code = main(
            ["capacity", "--model", "qwen3-tiny", "--method", "lora", "--budget-gb", "24"]
            + ["--seq-lens", "64,128", "--batch-sizes", "1", "--verify", "--out", str(out)]
        )
    finally:
        held.release()
    err = capsys.readouterr().err
    assert code == 2 and "in use by another ftmem runner" in err and "Traceback" not in err


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc, where no file can be made")
def test_a_lock_file_that_cannot_be_made_is_not_called_in_use(tmp_path):
    # filelock reports a lock file it cannot create as a timeout, as if another runner held it.
    with pytest.raises(ResultsUnwritable, match="cannot create its lock file"):
        acquire("/proc/r.jsonl")
    with pytest.raises(ResultsUnwritable, match="cannot be written"):
        check_writable("/proc/r.jsonl")
    held = acquire(tmp_path / "r.jsonl")
    try:
        with pytest.raises(ResultsLocked, match="in use"):
            acquire(tmp_path / "r.jsonl")
    finally:
        held.release()
