"""Issue 14 (item 11 and item 4's report half): `ftmem report` trusts no row. Rows are validated
against bench/schema.py on load; a newer schema, a line that is not JSON or not UTF-8 is refused
naming the file and line; a bad row is left out and named, in the report and on stderr.

Every row here is constructed (tests/test_report.make_row); none of it is a measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.load import MalformedResults, read_results
from analysis.report import build_report
from bench.schema import SCHEMA_VERSION, new_row, validate_row
from tests.test_report import _cli, make_row


def write(path: Path, *rows: dict | str, raw: bytes = b"") -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_bytes("".join(line + "\n" for line in lines).encode() + raw)
    return path


def test_every_shipped_row_is_valid():
    loaded = read_results(None)
    rows_left_out = [s for s in loaded.skipped if "not a results file" not in s.reason]
    assert rows_left_out == [] and len(loaded.frame) > 300


def test_validate_row_names_field_value_and_type():
    row = make_row(alloc=10)
    assert validate_row(row) == []
    bad = dict(
        row, peak_allocated_bytes="n/a", fits_budget=1, status="weird", spec={**row["spec"], "seq_len": "x"}
    )
    problems = validate_row(bad)
    assert "peak_allocated_bytes: 'n/a' is not a number" in problems
    assert "fits_budget: 1 is not true or false" in problems
    assert any(p.startswith("status: 'weird' is not one of ok") for p in problems)
    assert "spec.seq_len: 'x' is not a whole number" in problems
    assert validate_row(dict(row, peak_reserved_bytes=True)) == ["peak_reserved_bytes: True is not a number"]
    assert validate_row([1]) == ["a row must be a JSON object, not list"]
    assert "no 'cell_id'" in validate_row({k: v for k, v in row.items() if k != "cell_id"})


def test_rows_written_before_a_field_existed_are_valid():
    row = make_row(alloc=10)
    for field in ("oom_rank", "host_oom", "cell_process", "env"):
        row.pop(field)
    assert validate_row(row) == []


def test_a_newer_schema_is_refused_with_file_and_line(tmp_path, capsys):
    path = write(tmp_path / "new.jsonl", make_row(alloc=10), dict(make_row(alloc=11), schema_version=99))
    with pytest.raises(
        MalformedResults, match=r"new\.jsonl:2: schema_version 99 was written by a newer ftmem"
    ):
        read_results([path])
    assert _cli("report", str(path), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert f"reads schema {SCHEMA_VERSION} and older" in err and "Traceback" not in err


def test_a_string_peak_is_left_out_and_named_not_counted(tmp_path, capsys):
    good = make_row(alloc=30, nvml=31)
    bad = dict(make_row(alloc=40, seq_len=4096), peak_allocated_bytes="n/a")
    path = write(tmp_path / "rows.jsonl", good, bad)
    report = build_report([path], tmp_path / "r")
    assert len(report.frame) == 1 and [s.where.split("/")[-1] for s in report.skipped] == ["rows.jsonl:2"]
    assert "'n/a' is not a number" in (tmp_path / "r" / "left-out.md").read_text()
    assert "1 line(s) or file(s) left out" in report.index.read_text()
    assert _cli("report", str(path), "--out", str(tmp_path / "r2")) == 0
    captured = capsys.readouterr()
    assert "rows.jsonl:2: left out: peak_allocated_bytes: 'n/a' is not a number" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["left_out"] == 1


def test_rows_without_started_at_load_and_report(tmp_path):
    rows = [make_row(alloc=30, nvml=31, seq_len=s) for s in (512, 1024)]
    for row in rows:
        row["env"].pop("started_at", None)
        row.update(profile_categories_bytes={"parameters": 1}, profile_timeline_file=None)
    report = build_report([write(tmp_path / "rows.jsonl", *rows)], tmp_path / "r")
    assert report.frame["env_started_at"].isna().all() and report.index.exists()


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_file_is_a_warning(tmp_path, capsys, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert _cli("report", str(path), "--out", str(tmp_path / "r")) == 0
    err = capsys.readouterr().err
    assert "empty.jsonl: no rows" in err and "no row measured anything" in err


def test_only_error_rows_is_a_warning(tmp_path, capsys):
    error = new_row(make_row()["spec"], "e1", "error", error="boom", env={"gpu_name": "x"})
    path = write(tmp_path / "errors.jsonl", error)
    report = build_report([path], tmp_path / "r")
    assert "no row measured anything (ok or oom): 1 error" in report.index.read_text()
    _cli("report", str(path), "--out", str(tmp_path / "r2"))
    assert "warning: no row measured anything" in capsys.readouterr().err


def test_invalid_utf8_names_file_line_and_column(tmp_path, capsys):
    path = write(tmp_path / "bytes.jsonl", make_row(alloc=10), raw=b'{"status": "ok\xff"}\n')
    before = path.read_bytes()
    with pytest.raises(MalformedResults, match=r"bytes\.jsonl:2: .*UTF-8.*byte"):  # the byte's place
        read_results([path])
    assert _cli("report", str(path), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert err.count("fix or delete") == 1 and "Traceback" not in err
    assert path.read_bytes() == before  # never rewritten


def test_a_bad_json_line_in_the_middle_names_file_and_line_and_what_to_do(tmp_path, capsys):
    path = write(tmp_path / "mid.jsonl", make_row(alloc=10), "{oops", make_row(alloc=11, seq_len=1024))
    before = path.read_bytes()
    assert _cli("report", str(path), "--out", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "mid.jsonl:2" in err and err.count("fix or delete") == 1 and "Traceback" not in err
    assert path.read_bytes() == before


def test_a_folder_without_results_files_and_an_unwritable_out_are_said(tmp_path, capsys):
    (tmp_path / "nothing").mkdir()
    assert _cli("report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")) == 0
    assert "no *.jsonl file in it" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert _cli("report", str(tmp_path / "nothing"), "--out", str(tmp_path / "afile")) == 2
    err = capsys.readouterr().err
    assert "cannot write the report" in err and "afile" in err and "Traceback" not in err


def test_a_file_of_other_json_lines_is_left_out_in_one_line(tmp_path):
    facts = write(tmp_path / "facts.jsonl", {"fact": "a", "value": 1}, {"fact": "b", "value": 2})
    rows = write(tmp_path / "rows.jsonl", make_row(alloc=10))
    loaded = read_results([facts, rows])
    assert len(loaded.frame) == 1 and len(loaded.skipped) == 1
    assert (
        loaded.skipped[0].where.endswith("facts.jsonl") and "not a results file" in loaded.skipped[0].reason
    )
