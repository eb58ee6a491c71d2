"""Results files (JSONL, bench/schema.py) read into one tidy, typed pandas DataFrame.

Columns, one row per result row:
- every top-level schema field under its own name (`status`, `peak_allocated_bytes`, ...);
- every spec field under its plain name (`model`, `method`, `seq_len`, ...), and the spec itself
  as a dict in `spec` (what a predictor is called with); `lora_targets` is a tuple;
- every env field as `env_<name>` (`env_gpu_name`, `env_torch`, ...), and `env_stack`, one string
  naming the GPU and the library versions, so rows from different machines or software never merge;
- a sweep row's `sweep` object as `sweep_name`, `sweep_file`, ... and `sweep_claims` (a tuple of
  claim ids, empty for rows without a sweep);
- `source_file` and `source_line`, where the row came from;
- derived: every `*_bytes` field again in GiB (2^30 B) as `*_gib`; `tokens` (seq_len x batch_size,
  what activations scale with); `footprint_bytes`/`footprint_gib`/`footprint_basis`: what a card
  must hold (NVML process peak as nvidia-smi shows it, else reserved, else allocated; a CPU cell's
  peak RSS, basis `rss`);
  `cap_bytes`: the GPU memory the cell ran under (its budget, else the whole GPU); null for a row
  whose host ran out of memory (`host_oom`): the GPU cap is not what stopped it;
  `budget_emulated`: the budget was a cap on a larger GPU, standing in for a card we lack;
  `multi_gpu`: a multi-GPU cell (gpus > 1 or a dist strategy), whose peaks are per rank (the max over
  its `ranks`) and whose budget is per GPU; `config_key`: the spec without its budget (rows of one
  configuration share it).
- `gpus`, `dist`, `zero_offload` are in every row and in its `spec`: rows written before multi-GPU cells
  existed lack them and get their defaults (1, none, none), the values such rows were measured with.
Never imports torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from bench.cards import GIB
from bench.schema import FIELDS, REQUIRED, SCHEMA_VERSION, newer_schema, validate_row
from bench.spec import CellSpec, at_later_default
from bench.store import MalformedRow, iter_numbered_rows, latest_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "results"

#: Env fields that change memory: rows differing in any of them are kept apart (`env_stack`).
STACK_FIELDS = (
    "gpu_name",
    "driver",
    "cuda",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "liger_kernel",
    "flash_attn",
)

#: Row fields that hold objects; they are flattened into columns of their own.
_NESTED = ("spec", "env", "sweep")
#: `*_bytes` fields that hold a dict (category -> bytes), kept as objects rather than numbers.
OBJECT_BYTES = ("profile_categories_bytes",)
#: Spec columns every frame has, so an empty frame still answers the analysis' filters.
SPEC_COLUMNS = tuple(f.name for f in dataclasses.fields(CellSpec))
#: The columns verdicts, fits, savings, peaks and most plots read. The whole frame has a column per
#: schema, spec and env field (some 160); filtering and grouping these alone copies a fraction of it.
ANALYSIS_COLUMNS = (
    *SPEC_COLUMNS,
    "spec",
    "config_key",
    "cell_id",
    "repeat",
    "status",
    "env_stack",
    "env_gpu_name",
    "env_gpu_total_bytes",
    "env_git_commit",
    "source_file",
    "source_line",
    "footprint_bytes",
    "footprint_gib",
    "footprint_basis",
    "cap_bytes",
    "budget_bytes",
    "budget_emulated",
    "multi_gpu",
    "host_oom",
    "host_total_bytes",
    "peak_allocated_bytes",
    "peak_reserved_bytes",
    "nvml_peak_process_bytes",
    "peak_allocated_gib",
    "peak_reserved_gib",
    "nvml_peak_process_gib",
    "tokens",
    "sweep_claims",
)
#: Multi-GPU spec fields and the values of rows written before they existed (one process, one GPU).
MULTI_GPU_DEFAULTS: dict[str, Any] = {"gpus": 1, "dist": "none", "zero_offload": "none"}


class MalformedResults(ValueError):
    """A results file that cannot be read as rows: the message names the file and the line."""


#: What to do about a line that is not a row; a report never changes a results file.
FIX_LINE = (
    "open the file, fix or delete that line (ftmem report never changes a results file), "
    "or leave the file out of the report"
)


@dataclass(frozen=True)
class Skipped:
    """A line of a results file the report left out, and why."""

    where: str  # file:line
    reason: str


@dataclass
class Loaded:
    """The rows of some results files, what was left out of them and which files held no row."""

    frame: pd.DataFrame
    skipped: list[Skipped] = dataclasses.field(default_factory=list)
    empty_files: list[str] = dataclasses.field(default_factory=list)


def result_files(paths: Sequence[str | Path] | None = None) -> list[Path]:
    """The JSONL files behind `paths` (files, or folders searched recursively); default: results/."""
    found: list[Path] = []
    for path in [Path(p) for p in (paths or [DEFAULT_RESULTS])]:
        if path.is_dir():
            found += sorted(path.rglob("*.jsonl"))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no results file or folder at {path}")
    return found


def read_jsonl(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[Skipped]]:
    """(line number, row) of a results file's valid rows, the last of each (cell_id, repeat), and
    the lines left out: a last line cut short by a crash, rows bench.schema.validate_row rejects.
    A line that is not JSON, text that is not UTF-8, or a row of a newer schema is an error
    (MalformedResults) naming the file and the line: nothing of such a file can be trusted."""
    shown = _display_path(path)
    numbered, skipped = _numbered_rows(path, shown)
    if numbered and not any(isinstance(row, dict) and set(row) & set(REQUIRED) for _, row in numbered):
        # JSON lines of something else (facts, notes) kept beside the results: one word, not one per line
        why = f"not a results file: none of its {len(numbered)} lines has {', '.join(REQUIRED)}"
        return [], [*skipped, Skipped(shown, why)]
    rows = []
    for number, row in numbered:
        if newer_schema(row):
            raise MalformedResults(
                f"{shown}:{number}: schema_version {row['schema_version']} was written by a newer ftmem; "
                f"this one reads schema {SCHEMA_VERSION} and older: update ftmem, or leave the file out"
            )
        problems = validate_row(row)
        if problems:
            skipped.append(Skipped(f"{shown}:{number}", "; ".join(problems)))
        else:
            rows.append((number, row))
    latest = {id(row) for row in latest_rows([row for _, row in rows])}
    return [(number, row) for number, row in rows if id(row) in latest], skipped


def _numbered_rows(path: Path, shown: str) -> tuple[list[tuple[int, Any]], list[Skipped]]:
    """bench.store's reading, with its errors and warnings turned into what the report says."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows = list(iter_numbered_rows(path))
    except MalformedRow as exc:  # bench.store may say what to do itself; else the report says it
        message = str(exc)
        raise MalformedResults(message if "fix or delete" in message else f"{message}: {FIX_LINE}") from None
    except UnicodeDecodeError as exc:
        raise MalformedResults(_not_utf8(path, shown, exc)) from None
    except OSError as exc:
        raise MalformedResults(f"{shown}: cannot be read ({exc.strerror or exc})") from None
    skipped = [Skipped(*_warning_where(str(w.message), shown)) for w in caught]
    return rows, skipped


def _warning_where(message: str, shown: str) -> tuple[str, str]:
    """bench.store's "PATH:LINE: what" warning as (file:line, what)."""
    head, _, reason = message.partition(": ")
    line = head.rsplit(":", 1)[-1]
    reason = reason.removeprefix("skipped ")
    return (f"{shown}:{line}", reason) if line.isdigit() else (shown, message)


def _not_utf8(path: Path, shown: str, exc: UnicodeDecodeError) -> str:
    """The line and column of the first byte that is not UTF-8."""
    data = path.read_bytes()
    line = data.count(b"\n", 0, exc.start) + 1
    column = exc.start - data.rfind(b"\n", 0, exc.start)
    return (
        f"{shown}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at column {column}); results files "
        f"are JSON lines in UTF-8: {FIX_LINE}"
    )


def read_results(paths: Sequence[str | Path] | None = None) -> Loaded:
    """Every valid row of the results files under `paths` (default: the repo's results/) as one
    DataFrame, with the lines left out and the files that held no row."""
    records, skipped, empty = [], [], []
    files = result_files(paths)
    if not files:
        empty += [f"{p} (no *.jsonl file in it)" for p in paths or [DEFAULT_RESULTS]]
    for path in files:
        rows, left_out = read_jsonl(path)
        shown = _display_path(path)
        records += [flatten_row(row, shown, number) for number, row in rows]
        skipped += left_out
        if not rows and not left_out:
            empty.append(shown)
    return Loaded(frame_from_records(records), skipped, empty)


def load_results(paths: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """read_results' frame; each line left out is a warning (notebooks and scripts see them)."""
    loaded = read_results(paths)
    for skip in loaded.skipped:
        warnings.warn(f"{skip.where}: skipped: {skip.reason}", stacklevel=2)
    return loaded.frame


def analysis_view(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame's ANALYSIS_COLUMNS (those it has), for the analyses that read nothing else."""
    return frame[[c for c in dict.fromkeys(ANALYSIS_COLUMNS) if c in frame.columns]]


def rows_to_frame(rows: Iterable[dict[str, Any]], source: str = "<memory>") -> pd.DataFrame:
    """Rows already in memory (tests, notebooks) as the same DataFrame load_results gives."""
    return frame_from_records([flatten_row(row, source, i) for i, row in enumerate(rows, start=1)])


def _display_path(path: Path) -> str:
    """Paths inside the repo shown relative to it, so tables do not carry one machine's layout."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)


def flatten_row(row: dict[str, Any], source: str, line: int) -> dict[str, Any]:
    """One row as flat columns: schema fields, spec fields by name, env_*, sweep_*, provenance."""
    spec = dict(row["spec"])
    if isinstance(spec.get("lora_targets"), list):
        spec["lora_targets"] = tuple(spec["lora_targets"])
    for key, default in MULTI_GPU_DEFAULTS.items():
        if spec.get(key) is None:
            spec[key] = default
    flat: dict[str, Any] = {k: v for k, v in row.items() if k not in _NESTED}
    for key, value in spec.items():
        flat["spec_" + key if key in flat else key] = value
    flat["spec"] = spec
    flat.update({f"env_{k}": v for k, v in (row.get("env") or {}).items()})
    sweep = row.get("sweep") or {}
    flat.update({f"sweep_{k}": v for k, v in sweep.items() if k != "claims"})
    flat["sweep_claims"] = tuple(sweep.get("claims") or ())
    flat.setdefault("sweep_name", None)
    flat.update(source_file=source, source_line=line)
    return flat


def frame_from_records(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Typed frame with the derived columns; every schema column exists even with no rows."""
    frame = pd.DataFrame.from_records(records)
    flat_fields = [f for f in FIELDS if f not in _NESTED]
    wanted = [
        *flat_fields,
        *SPEC_COLUMNS,
        "spec",
        "env_gpu_name",
        "env_gpu_total_bytes",
        "env_started_at",
        "sweep_name",
        "sweep_claims",
        "source_file",
        "source_line",
    ]
    missing = [name for name in dict.fromkeys(wanted) if name not in frame.columns]
    if missing:  # added at once: one by one, pandas warns of a fragmented frame
        empty = pd.DataFrame({name: [None] * len(frame) for name in missing}, index=frame.index, dtype=object)
        frame = pd.concat([frame, empty], axis=1)
    for name, default in MULTI_GPU_DEFAULTS.items():
        frame[name] = frame[name].astype(object).where(frame[name].notna(), default)
    frame = _typed(frame)
    return _derived(frame)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable ints for counts and bytes, nullable booleans for flags, datetimes for dates."""
    for column in frame.columns:
        if (column.endswith("_bytes") and column not in OBJECT_BYTES) or column in (
            "seq_len",
            "batch_size",
            "grad_accum",
            "lora_r",
            "repeat",
            "schema_version",
            "source_line",
            "n_params",
            "n_trainable_params",
            "gpus",
        ):
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    for column in (
        "gradient_checkpointing",
        "compile",
        "fused_ce",
        "kbit_fp32_upcast",
        "fits_budget",
        "double_quant",
        "gc_reentrant",
        "host_oom",
    ):
        if column in frame.columns:
            frame[column] = frame[column].astype("boolean")
    if "env_started_at" in frame.columns:
        frame["env_started_at"] = pd.to_datetime(frame["env_started_at"], utc=True, errors="coerce")
    return frame


def _derived(frame: pd.DataFrame) -> pd.DataFrame:
    """GiB twins of byte columns, tokens, the footprint a card must hold, the cap it ran under."""
    for column in [c for c in frame.columns if c.endswith("_bytes") and c not in OBJECT_BYTES]:
        frame[column[: -len("_bytes")] + "_gib"] = frame[column].astype("float64") / GIB
    frame["tokens"] = (frame["seq_len"] * frame["batch_size"]).astype("Int64")
    basis = pd.Series([None] * len(frame), index=frame.index, dtype=object)
    footprint = pd.Series(pd.NA, index=frame.index, dtype="Int64")
    # A CPU cell has no GPU peaks: its process's peak RSS is what it held (interpreter and imports too).
    on_cpu = (frame["device"] == "cpu").fillna(False).astype(bool)
    footprint = footprint.mask(on_cpu & frame["peak_rss_bytes"].notna(), frame["peak_rss_bytes"])
    basis = basis.mask(on_cpu & frame["peak_rss_bytes"].notna(), "rss")
    for name, column in (
        ("allocated", "peak_allocated_bytes"),
        ("reserved", "peak_reserved_bytes"),
        ("nvml", "nvml_peak_process_bytes"),
    ):
        present = frame[column].notna()
        footprint = footprint.mask(present, frame[column])
        basis = basis.mask(present, name)
    frame["footprint_bytes"], frame["footprint_basis"] = footprint, basis
    frame["footprint_gib"] = footprint.astype("float64") / GIB
    gpu_total = pd.to_numeric(frame["env_gpu_total_bytes"], errors="coerce").astype("Int64")
    frame["cap_bytes"] = frame["budget_bytes"].fillna(gpu_total).mask(frame["host_oom"].fillna(False))
    frame["budget_emulated"] = (frame["budget_bytes"] < gpu_total).fillna(False).astype(bool)
    frame["multi_gpu"] = ((frame["gpus"] > 1).fillna(False) | (frame["dist"] != "none")).astype(bool)
    frame["env_stack"] = [_stack(row) for row in frame.to_dict("records")]
    # Rows equal but for their budget are one configuration: computed once, grouped on everywhere.
    frame["config_key"] = frame["spec"].map(lambda s: spec_key(s, drop=("budget_gb",))).astype(object)
    return frame


def _stack(row: dict[str, Any]) -> str:
    """GPU and library versions of a row in one string, so rows of different stacks stay apart."""
    parts = [
        f"{field} {row.get('env_' + field)}"
        for field in STACK_FIELDS[1:]
        if is_present(row.get("env_" + field))
    ]
    gpu = row.get("env_gpu_name")
    return " | ".join([str(gpu) if is_present(gpu) else "no GPU", *parts])


def measured_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows that say something about memory: ok with a peak, or OOM under a known cap."""
    ok = (frame["status"] == "ok") & frame["footprint_bytes"].notna()
    oom = (frame["status"] == "oom") & frame["cap_bytes"].notna()
    return frame[(ok | oom) & frame["seq_len"].notna()]


def is_present(value: Any) -> bool:
    """False for None, NaN and pd.NA, which all mean 'not recorded' in a loaded frame."""
    return value is not None and not (isinstance(value, float) and value != value) and value is not pd.NA


def spec_key(spec: dict[str, Any], drop: Iterable[str] = ()) -> str:
    """Canonical JSON of a spec without some fields: rows with equal keys differ only in those.
    A knob added later (bench.spec.LATER_FIELDS) counts only away from its default, so rows
    written before it existed match the rows written since."""
    dropped = set(drop)
    kept = {
        k: list(v) if isinstance(v, tuple) else v
        for k, v in spec.items()
        if k not in dropped and not at_later_default(k, v)
    }
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def row_ref(row: pd.Series | dict[str, Any]) -> str:
    """Where a row came from, as file:line, for the figures behind a verdict."""
    return f"{row['source_file']}:{row['source_line']}"


def describe_spec(spec: dict[str, Any], shape: bool = True) -> str:
    """A configuration in a few words (method, precision, shape, flags that differ from defaults);
    shape=False leaves out seq_len and batch_size, naming a family of configurations."""
    words = [str(spec.get("method"))]
    if spec.get("lora_r") is not None:
        words[0] += f" r{spec['lora_r']}"
    words.append(str(spec.get("precision")))
    if shape:
        words.append(f"seq {spec.get('seq_len')} x b{spec.get('batch_size')}")
    flags = {
        "GC": spec.get("gradient_checkpointing"),
        str(spec.get("attn_impl")): spec.get("attn_impl") not in (None, "sdpa"),
        str(spec.get("optimizer")): spec.get("optimizer") not in (None, "adamw"),
        "compile": spec.get("compile"),
        "fused CE": spec.get("fused_ce"),
        "no fp32 upcast": spec.get("kbit_fp32_upcast") is False,
        f"GA {spec.get('grad_accum')}": (spec.get("grad_accum") or 1) > 1,
        "profiled": spec.get("profile_memory"),
        "snapshot": spec.get("snapshot"),
        f"{spec.get('gpus') or 1}x {spec.get('dist')}": (spec.get("dist") or "none") != "none"
        or (spec.get("gpus") or 1) > 1,
        f"offload {spec.get('zero_offload')}": (spec.get("zero_offload") or "none") != "none",
        "expandable segments": spec.get("expandable_segments"),
    }
    return " ".join(words + [name for name, on in flags.items() if on])


def predictor() -> Any | None:
    """ftmem's predictor (analysis.predict.predict) if it is installed, else None.

    It is written apart from this module and may be missing; every caller then leaves its
    prediction columns and plots out instead of failing.
    """
    try:
        from analysis.predict import predict
    except ImportError:
        return None
    # reports read the allocator simulations already made (analysis/predict/simulated.jsonl), never run new ones
    return functools.partial(predict, simulate="cached")


def predict_spec(predict: Any, spec: dict[str, Any]) -> Any | None:
    """The predictor's answer for one spec, or None (with a warning) where it cannot answer."""
    try:
        return predict(spec)
    except Exception as exc:  # a predictor written elsewhere: one bad spec must not sink a report
        warnings.warn(f"analysis.predict could not predict {describe_spec(spec)}: {exc}", stacklevel=2)
        return None
