"""The report's output folder: what a run writes there, and nothing it did not write.

A manifest (`.ftmem-report.json`) lists every file the report made, each with a fingerprint: of its
text for pages and tables, of what it was drawn from for figures. A run

- writes a page or table only when its text changed, and draws a figure only when what it is drawn
  from (or the drawing code) changed since the figure on disk was drawn: a re-run on the same rows
  draws nothing;
- removes the files the previous run made that this run no longer makes (a plot whose rows are gone);
- never touches a file the manifest does not list: a user's own files in the folder stay, and so
  does everything in a folder the report has not written to before.

Never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from analysis.plots import PlotJob, save

MANIFEST = ".ftmem-report.json"
#: Figures drawn in worker processes when there are at least this many to draw (forking has a cost).
PARALLEL_FROM = 3


def fingerprint(*parts: Any) -> str:
    """A stable digest of frames, series, arrays, containers and scalars (for figure inputs)."""
    digest = hashlib.sha256()
    _feed(digest, parts)
    return digest.hexdigest()[:20]


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, (pd.DataFrame, pd.Series)):
        digest.update(value.to_csv().encode())  # floats at full precision; nested dicts as repr
    elif isinstance(value, np.ndarray):
        digest.update(f"{value.dtype}{value.shape}".encode() + value.tobytes())
    elif isinstance(value, dict):
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"[{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def drawing_code() -> str:
    """A digest of the code that draws figures: a change to it redraws every figure."""
    here = Path(__file__).parent
    sources = [(here / name).read_bytes() for name in ("plots.py", "timeline.py")]
    return fingerprint(sources, matplotlib.__version__)


@dataclass
class OutputDir:
    """The report's folder: what the last run made (its manifest) and what this run makes."""

    root: Path
    previous: dict[str, str] = field(default_factory=dict)
    made: dict[str, str] = field(default_factory=dict)
    drawn: list[str] = field(default_factory=list)  # figures drawn by this run (the rest were current)

    @classmethod
    def open(cls, root: str | Path) -> OutputDir:
        """The folder and its manifest; an unreadable manifest counts as none (nothing is removed)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        try:
            files = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"]
            previous = {str(k): str(v) for k, v in files.items() if _inside(k)}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            previous = {}
        return cls(root, previous)

    def write_text(self, relative: str, text: str) -> Path:
        """relative (e.g. tables/x.md) with `text`, written only when it differs from the file's."""
        path, digest = self.root / relative, fingerprint(text)
        if not (self.previous.get(relative) == digest and path.is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        self.made[relative] = digest
        return path

    def draw(self, jobs: Iterable[PlotJob], folder: str = "plots") -> dict[str, list[Path]]:
        """Each job's PNG and SVG under `folder`, drawn only where its inputs changed; by job name."""
        code, stale, paths = drawing_code(), [], {}
        for job in jobs:
            names = [f"{folder}/{job.name}.png", f"{folder}/{job.name}.svg"]
            digest = fingerprint(code, job.args)
            if not all(self.previous.get(n) == digest and (self.root / n).is_file() for n in names):
                stale.append(job)
            self.made.update(dict.fromkeys(names, digest))
            paths[job.name] = [self.root / n for n in names]
        _draw_all(stale, self.root / folder)
        self.drawn += [job.name for job in stale]
        return paths

    def unlisted(self, folders: tuple[str, ...] = ("plots", "tables")) -> list[Path]:
        """Files in the report's own folders that this run did not make and no manifest names: an
        older report's (written before the manifest) or a user's. Never removed; worth a word."""
        found = [
            p for folder in folders if (self.root / folder).is_dir() for p in (self.root / folder).iterdir()
        ]
        made = set(self.made) | set(self.previous)
        return sorted(p for p in found if p.is_file() and p.relative_to(self.root).as_posix() not in made)

    def finish(self) -> list[Path]:
        """Remove what the last run made and this one did not, write the manifest; the removed files."""
        removed = []
        for relative in sorted(set(self.previous) - set(self.made)):
            path = self.root / relative
            if path.is_file():
                path.unlink()
                removed.append(path)
        body = {
            "note": "files made by `ftmem report`; a re-run removes those it no longer makes",
            "files": self.made,
        }
        (self.root / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        return removed


def _inside(relative: str) -> bool:
    """A manifest entry names a file inside the folder (never an absolute path or one going up)."""
    path = Path(relative)
    return not path.is_absolute() and ".." not in path.parts and bool(path.parts)


def _draw(job: PlotJob, out_dir: Path) -> None:
    save(job.draw(*job.args), out_dir, job.name)


def _draw_all(jobs: list[PlotJob], out_dir: Path) -> None:
    """Draw the jobs, in forked worker processes (one per core) where there are several and fork
    exists: drawing is CPU-bound matplotlib work, figure by figure independent."""
    workers = min(os.cpu_count() or 1, len(jobs))
    if workers < 2 or len(jobs) < PARALLEL_FROM or "fork" not in multiprocessing.get_all_start_methods():
        for job in jobs:
            _draw(job, out_dir)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for future in [pool.submit(_draw, job, out_dir) for job in jobs]:
            future.result()  # a drawing error surfaces here, as it would drawn in this process
