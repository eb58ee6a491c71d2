"""Copy the GPU wheels of .whl/ into .whl/slim/, with bitsandbytes cut to the native libraries of one
CUDA version (and its CPU library), so that the wheels and the tree travel to a GPU machine within the
device tool's 64 MiB (the full bitsandbytes wheel holds a library for every CUDA and ROCm version: 42 MiB).

    python3 scripts/slim_wheels.py [--cuda 130]     # the GPU image's torch is cu130

Then carry .whl/slim and install from .whl/slim/*.whl. RECORD loses the removed files' lines; the rest
of the wheel is copied byte for byte.
"""

from __future__ import annotations

import argparse
import re
import shutil
import zipfile
from pathlib import Path

NATIVE = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")


def keep(name: str, cuda: str) -> bool:
    match = NATIVE.search(name)
    return match is None or match.group(1) in (f"cuda{cuda}", "cpu")


def slim(wheel: Path, out: Path, cuda: str) -> Path:
    """A copy of `wheel` in `out` without the native libraries other than cuda<cuda> and cpu."""
    target = out / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if not keep(info.filename, cuda):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(line for line in lines if keep(line.split(",")[0], cuda)) + "\n").encode()
            dst.writestr(info, data)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default=".whl")
    parser.add_argument("--cuda", default="130", help="CUDA version tag of the GPU's torch (130 for cu130)")
    args = parser.parse_args()
    src, out = Path(args.src), Path(args.src) / "slim"
    out.mkdir(parents=True, exist_ok=True)
    for wheel in sorted(src.glob("*.whl")):
        if wheel.name.startswith("bitsandbytes-"):
            made = slim(wheel, out, args.cuda)
        else:
            made = Path(shutil.copy2(wheel, out / wheel.name))
        print(f"{made}: {made.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
