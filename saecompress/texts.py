"""Text input: the files that ``--text`` arguments name, and their contents."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import SaeCompressError


def text_files(paths: Iterable[str]) -> list[Path]:
    """The files named; directories expand to their files and glob patterns to matches (recursive, sorted)."""
    paths = tuple(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists() and any(c in str(p) for c in "*?["):
            files.extend(sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()))
        elif p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif p.is_file():
            files.append(p)
        else:
            raise SaeCompressError(f"{p}: no such text file or directory")
    if not files:
        raise SaeCompressError(f"no text files found in {', '.join(map(str, paths))}")
    return files


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    """Each file's text, read lazily (undecodable bytes replaced)."""
    for f in files:
        yield Path(f).read_text(encoding="utf-8", errors="replace")
