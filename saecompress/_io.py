"""Output files: checked before any work starts, written atomically (complete or not at all)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import SaeCompressError


def _reason(err: OSError) -> str:
    """``[Errno 13] Permission denied: '/x/.tmp'`` → ``permission denied`` (no file names)."""
    text = err.strerror or str(err) or type(err).__name__
    return text[:1].lower() + text[1:]


class CannotWrite(SaeCompressError):
    """An output could not be written; ``reason`` is the operating system's, without file names."""

    def __init__(self, target: str | os.PathLike, reason: str):
        super().__init__(f"cannot write {target}: {reason}")
        self.reason = reason


@contextlib.contextmanager
def output_errors(target: str | os.PathLike) -> Iterator[None]:
    """Report an ``OSError`` raised while writing ``target`` as ``CannotWrite`` naming ``target``.

    Temporary files and folders beside ``target`` (``.NAME.*``) are never named: a write error
    inside them, or inside a nested ``output_errors`` block for one of their files, names
    ``target``. Errors that name another file (e.g. an input read inside the block) pass through.
    """
    out = Path(target).absolute()

    def about_output(name: str | bytes | int) -> bool:  # the output, a folder on its way, or a temp beside it
        path = Path(os.fsdecode(name)).absolute() if isinstance(name, (str, bytes)) else out
        if out.is_relative_to(path) or path.is_relative_to(out):
            return True
        return path.is_relative_to(out.parent) and path.relative_to(out.parent).parts[0].startswith(f".{out.name}.")

    try:
        yield
    except CannotWrite as err:
        raise CannotWrite(target, err.reason) from err.__cause__
    except OSError as err:
        if not all(about_output(f) for f in (err.filename, err.filename2) if f is not None):
            raise
        raise CannotWrite(target, _reason(err)) from err


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    ``OSError``s about the output (no space, permission, a folder in the way) become
    ``SaeCompressError("cannot write PATH: reason")``.
    """
    target = Path(path)
    tmp_path: Path | None = None
    try:
        with output_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
            yield tmp_path
            os.replace(tmp_path, target)
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


class AtomicDirectory:
    """A hidden temporary folder beside ``target`` (``path``) that becomes ``target`` on ``commit()``.

    ``commit`` replaces ``target`` whole, or with ``merge`` moves each entry into an existing
    ``target`` (replacing entries of the same name, keeping the others); ``discard`` removes the
    temporary folder. As a context manager: commit when the block succeeds, else discard. Write
    errors name ``target``, never the temporary folder.
    """

    def __init__(self, target: str | os.PathLike, *, merge: bool = False, name: str | None = None):
        """``name``: the temporary folder's own name beside ``target`` (known to other processes that write into
        it; made if missing), instead of a fresh random one."""
        self.target = Path(target)
        self.merge = merge
        with output_errors(self.target):
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if name is not None:
                self.path = self.target.parent / name
                self.path.mkdir(exist_ok=True)
            else:
                self.path = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp",
                                                  dir=self.target.parent))
            os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp makes it private; outputs get the usual mode

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> Path:
        """Move the temporary folder's content into place; returns ``target``."""
        old = None
        try:
            with output_errors(self.target):
                if self.merge and self.target.is_dir():
                    for entry in sorted(self.path.iterdir()):
                        os.replace(entry, self.target / entry.name)
                    return self.target
                if self.target.exists():
                    old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
                    os.replace(self.target, old)
                os.replace(self.path, self.target)
        finally:
            self.discard()
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return self.target

    def discard(self) -> None:
        """Remove the temporary folder and what it holds (nothing once committed)."""
        shutil.rmtree(self.path, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser().resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(outputs: Iterable[str | os.PathLike], inputs: Iterable[str | os.PathLike | None] = (), *,
                  kind: str | None = None) -> None:
    """Refuse, before any work starts, outputs that would destroy an input or cannot be written.

    Paths are compared resolved (``~``, ``..``, symlinks, hard links). An output may not be an
    input, lie inside an input folder, or hold an input (a folder output); nor lie inside the
    Hugging Face cache, where ``hf://`` sources and hub models live. Inputs that are not local
    paths (``hf://…``, hub model ids) are covered by that rule. The output's nearest existing
    folder must accept a new file, and with ``kind`` ("file" or "folder") an existing output must
    be of that kind. Raises ``SaeCompressError`` naming the output.
    """
    local = []
    for item in inputs:
        if item is None or str(item).startswith("hf://"):
            continue
        path = Path(item).expanduser()
        if path.exists():
            local.append((str(item), path.resolve()))
    cache = _hub_cache()
    for out in outputs:
        target = Path(out).expanduser().resolve()
        for name, source in local:
            if target == source or _same_file(target, source):
                raise SaeCompressError(f"{out} is the input {name}: writing it would destroy the input; "
                                       "choose another output")
            if source.is_dir() and target.is_relative_to(source):
                raise SaeCompressError(f"{out} lies inside the input folder {name}; choose an output outside it")
            if source.is_relative_to(target):
                raise SaeCompressError(f"{out} holds the input {name}, which writing the output could destroy; "
                                       "choose an output that does not contain the inputs")
        if target.is_relative_to(cache):
            raise SaeCompressError(f"{out}: lies inside the Hugging Face cache ({cache}), which holds downloaded "
                                   "sources and models; choose an output elsewhere")
        if kind == "file" and target.is_dir():
            raise SaeCompressError(f"{out}: is a folder; give a file name for the output")
        if kind == "folder" and target.exists() and not target.is_dir():
            raise SaeCompressError(f"{out}: is a file; give a folder for the output")
        _check_writable(out, target)


def _check_writable(out: str | os.PathLike, target: Path) -> None:
    """The folder that will receive ``target`` (or its nearest existing ancestor) accepts a new file."""
    folder = target if target.is_dir() else target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CannotWrite(out, f"{folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".saecompress-probe-", dir=folder)
    except OSError as err:
        raise CannotWrite(out, f"{_reason(err)} ({folder})") from None
    os.close(fd)
    os.unlink(probe)
