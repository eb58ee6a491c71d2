"""Where a cell's start-up goes: measure one cell in this process under cProfile.

    python scripts/startup_profile.py OUT_PREFIX --model qwen3-14b --method lora --seq-len 2048 --batch-size 1

Takes `ftmem run`'s spec arguments. Writes OUT_PREFIX.prof (pstats) and OUT_PREFIX.txt (the 60
functions with the most cumulative time, then the row's start-up and build breakdowns).
A developer's tool: the measured row is printed, not stored.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftmem.args import add_spec_arguments, spec_from_args  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_prefix")
    add_spec_arguments(parser, required=("model", "method", "seq_len", "batch_size"))
    args = parser.parse_args(argv)
    spec = spec_from_args(args)
    profiler = cProfile.Profile()
    profiler.enable()
    from bench.cell.measure import measure

    status, error, values = measure(spec)
    profiler.disable()
    profiler.dump_stats(f"{args.out_prefix}.prof")
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
    keys = ("startup_breakdown_s", "build_breakdown_s", "startup_to_first_step_s", "peak_allocated_bytes")
    text.write(json.dumps({"status": status, "error": error, **{k: values.get(k) for k in keys}}, indent=1))
    Path(f"{args.out_prefix}.txt").write_text(text.getvalue())
    print(text.getvalue()[-3000:])
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
