import argparse
from pathlib import Path

import pytest
import yaml

from bench.sweep.grid import SweepError, expand, load_sweep, parse_sweep

BASE = {"model": "qwen3-tiny", "method": "lora", "seq_len": 32, "batch_size": 1, "device": "cpu"}
ROOT = Path(__file__).resolve().parent.parent


def cells(data):
    return expand(parse_sweep({"name": "t", **data}, "t.yaml"))


def test_axes_are_crossed():
    out = cells({"base": BASE, "axes": {"seq_len": [32, 64], "batch_size": [1, 2, 4]}})
    assert sorted((c.spec.seq_len, c.spec.batch_size) for c in out) == [
        (32, 1),
        (32, 2),
        (32, 4),
        (64, 1),
        (64, 2),
        (64, 4),
    ]


def test_zip_varies_together_and_crosses_with_axes():
    out = cells(
        {
            "base": BASE,
            "zip": [{"seq_len": [32, 64], "batch_size": [4, 2]}],
            "axes": {"gradient_checkpointing": [False, True]},
        }
    )
    assert sorted((c.spec.seq_len, c.spec.batch_size, c.spec.gradient_checkpointing) for c in out) == [
        (32, 4, False),
        (32, 4, True),
        (64, 2, False),
        (64, 2, True),
    ]


def test_include_and_exclude():
    out = cells(
        {
            "base": BASE,
            "axes": {"batch_size": [1, 2]},
            "exclude": [{"batch_size": 2}],
            "include": [{"method": "qlora", "lora_r": 64}],
        }
    )
    assert sorted((c.spec.method, c.spec.batch_size, c.spec.lora_r) for c in out) == [
        ("lora", 1, 8),
        ("qlora", 1, 64),
    ]


def test_budgets_become_an_axis_of_named_cards():
    base = {**BASE, "device": "cuda"}
    out = cells({"base": base, "budgets": ["rtx4090-24gb", 40]})
    assert sorted(str(c.spec.budget_gb) for c in out) == ["40.0", "rtx4090-24gb"]
    assert {c.spec.budget_bytes for c in out} == {24564 * 2**20, 40 * 10**9}


def test_grids_merge_base_and_claims_and_dedupe():
    out = cells(
        {
            "base": BASE,
            "claims": ["C0"],
            "grids": [
                {"claims": ["C1"], "axes": {"batch_size": [1, 2]}},
                {"claims": ["C2"], "base": {"batch_size": 2}},
            ],
        }
    )
    by_batch = {c.spec.batch_size: c for c in out}
    assert set(by_batch) == {1, 2}
    assert by_batch[2].claims == ("C0", "C1", "C2") and by_batch[1].claims == ("C0", "C1")


def test_impossible_combination_is_an_invalid_cell_not_an_error():
    out = cells({"base": BASE, "axes": {"attn_impl": ["sdpa", "flash_attention_2"]}})
    invalid = [c for c in out if c.spec is None]
    assert len(invalid) == 1 and "flash_attention_2 needs device cuda" in invalid[0].invalid_reason
    assert len(invalid[0].cell_id) == 16


@pytest.mark.parametrize(
    "data, where, allowed",
    [
        ({"name": "t", "base": BASE, "axis": {}}, "t.yaml: axis", "allowed: name"),
        ({"name": "t", "base": {**BASE, "metod": "lora"}}, "t.yaml: base.metod", "unknown key"),
        (
            {"name": "t", "base": BASE, "axes": {"method": ["lora", "lorra"]}},
            "t.yaml: axes.method[1]",
            "allowed: full",
        ),
        (
            {"name": "t", "base": BASE, "axes": {"seq_len": ["long"]}},
            "t.yaml: axes.seq_len[0]",
            "expected int",
        ),
        ({"name": "t", "base": BASE, "axes": {"seq_len": 32}}, "t.yaml: axes.seq_len", "non-empty list"),
        ({"name": "t", "base": BASE, "budgets": ["rtx9090"]}, "t.yaml: budgets[0]", "rtx4090-24gb"),
        (
            {"name": "t", "base": BASE, "zip": [{"seq_len": [1, 2], "batch_size": [1]}]},
            "t.yaml: zip[0]",
            "equal lengths",
        ),
        ({"name": "t", "base": BASE, "repeats": 0}, "t.yaml: repeats", "integer >= 1"),
        ({"name": "t", "base": BASE, "timeout_s": 0}, "t.yaml: timeout_s", "a number > 0"),
        ({"name": "t", "base": BASE, "timeout_s": "5m"}, "t.yaml: timeout_s", "a number > 0"),
        ({"base": BASE}, "t.yaml: name", "non-empty string"),
        ({"name": "t", "grids": [{"axes": {"steps": [0]}}]}, "t.yaml: grids[0].axes.steps[0]", ">= 1"),
        ({"name": "t", "grids": [{"bogus": 1}]}, "t.yaml: grids[0].bogus", "unknown key"),
        ({"name": "t", "include": [{"method": "x"}]}, "t.yaml: include[0].method", "allowed"),
    ],
)
def test_validation_errors_name_file_key_path_and_allowed(data, where, allowed):
    with pytest.raises(SweepError) as err:
        parse_sweep(data, "t.yaml")
    assert str(err.value).startswith(where) and allowed in str(err.value)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(SweepError, match="cannot read"):
        load_sweep(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SweepError, match="bad.yaml: not valid YAML"):
        load_sweep(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_parses_and_expands(path):
    sweep = load_sweep(path)
    out = expand(sweep)
    assert out and sweep.name == yaml.safe_load(path.read_text())["name"]
    assert len({c.cell_id for c in out}) == len(out)


def test_guide_sweep_cites_claims_on_every_cell():
    out = expand(load_sweep(ROOT / "sweeps" / "qwen3-14b-guide.yaml"))
    assert all(c.claims for c in out)
    cited = {claim for c in out for claim in c.claims}
    assert {"C1", "C3", "C5", "C6", "C7", "C8", "C9", "C10", "C12", "C15", "C16", "C17"} <= cited


def test_a_sweep_sets_its_cells_timeout_and_the_command_line_overrides_it(tmp_path, monkeypatch):
    from ftmem.commands import sweep as sweep_cli

    assert parse_sweep({"name": "t", "base": BASE, "timeout_s": 300}, "t.yaml").timeout_s == 300
    assert parse_sweep({"name": "t", "base": BASE}, "t.yaml").timeout_s is None
    seen = []
    monkeypatch.setattr(
        sweep_cli, "run_sweep", lambda sweep, out, shard, retry, prune, timeout, **kw: seen.append(timeout)
    )
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": BASE, "timeout_s": 300}))
    parser = argparse.ArgumentParser()
    sweep_cli.register(parser.add_subparsers())
    for argv, expected in (([], 300), (["--timeout", "42"], 42)):
        args = parser.parse_args(["sweep", str(path), "--out", str(tmp_path / "r.jsonl"), *argv])
        assert args.func(args) == 0
        assert seen.pop() == expected


# -- issue 14 item 8: a key given twice is refused with both lines ---------------------------------
@pytest.mark.parametrize(
    "text, key, lines",
    [
        (
            "name: t\nbase: {model: qwen3-tiny}\naxes: {seq_len: [32]}\nbase: {device: cpu}\n",
            "base",
            "lines 2 and 4",
        ),
        ("name: t\nbase:\n  model: qwen3-tiny\n  seq_len: 32\n  seq_len: 64\n", "seq_len", "lines 4 and 5"),
        ("name: t\ninclude: [{lora_r: 8, lora_r: 16}]\n", "lora_r", "line 2"),
    ],
)
def test_duplicate_keys_are_refused_naming_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value) == f"{path}: {key}: given twice, on {lines}; keep one"


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "name: t\nbase: &b {model: qwen3-tiny, method: lora, seq_len: 32, batch_size: 1, device: cpu}\n"
        "include:\n  - <<: *b\n    seq_len: 64\n"
    )
    assert [c.spec.seq_len for c in expand(load_sweep(path))] == [64]


# -- issue 14 item 9: a huge grid is counted, not expanded, and refused naming what multiplies ---------
def test_a_huge_grid_is_refused_before_expanding_naming_its_axes(monkeypatch):
    import time

    from bench.sweep.grid import MAX_CELLS, check_size
    from bench.sweep import grid as sweep_module

    values = list(range(1, 11))
    data = {"name": "t", "base": BASE, "axes": {k: values for k in ("seq_len", "batch_size", "lora_r")}}
    data["axes"].update(steps=values, seed=values, grad_accum=values)  # 10^6 cells
    big = parse_sweep(data, "big.yaml")
    monkeypatch.setattr(sweep_module, "_make_cell", None)  # expanding would call it: it must not
    start = time.monotonic()
    with pytest.raises(SweepError) as err:
        check_size(big)
    assert time.monotonic() - start < 1.0
    message = str(err.value)
    assert message.startswith("big.yaml: up to 1,000,000 cells") and f"limit of {MAX_CELLS:,}" in message
    assert "seq_len 10 x batch_size 10 x lora_r 10 x steps 10 x seed 10 x grad_accum 10" in message
    assert "--max-cells" in message
    assert check_size(big, max_cells=10**6) == 10**6


def test_the_count_is_what_expansion_gives_without_exclusions():
    from bench.sweep.grid import check_size

    data = {
        "base": BASE,
        "axes": {"seq_len": [16, 32], "gradient_checkpointing": [False, True]},
        "zip": [{"batch_size": [1, 2, 4], "lora_r": [8, 16, 32]}],
        "budgets": [24, 40],
        "include": [{"seq_len": 128}],
        "repeats": 2,
    }
    sweep = parse_sweep({"name": "t", **data}, "t.yaml")
    assert check_size(sweep) == 2 * (2 * 2 * 3 * 2 + 1) and len(expand(sweep)) == 2 * 2 * 3 * 2 + 1


def test_the_cli_refuses_a_huge_sweep_and_max_cells_lets_it_through(tmp_path, capsys):
    from ftmem.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": BASE, "axes": {"seq_len": list(range(1, 21))}}))
    out = str(tmp_path / "r.jsonl")
    assert main(["sweep", str(path), "--dry-run", "--max-cells", "10", "--out", out]) == 2
    assert "up to 20 cells (seq_len 20 = 20), more than the limit of 10" in capsys.readouterr().err
    assert main(["sweep", str(path), "--dry-run", "--max-cells", "20", "--out", out]) == 0


# -- issue 14 items 7 and 10: YAML .inf, and a file that is not UTF-8 -------------------------------
@pytest.mark.parametrize(
    "text, where",
    [
        ("name: t\nbase: {budget_gb: .inf}\n", "base.budget_gb: inf is not allowed; a number of GB"),
        ("name: t\nbudgets: [24, 1.0e+400]\n", "budgets[1]: inf is not allowed"),
        ("name: t\ntimeout_s: .inf\n", "timeout_s: inf is not allowed"),
    ],
)
def test_infinite_values_in_a_sweep_file_are_refused(tmp_path, text, where):
    path = tmp_path / "inf.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: {where}")


def test_a_sweep_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: t\ndescription: café\n".encode("latin-1"))
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert str(err.value).startswith(f"{path}: not UTF-8 text (byte 24")
