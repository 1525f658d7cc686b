"""Write files and folders so that a crash never leaves a half-written result.

Everything the project writes itself goes through here: the content is written
next to its destination under a temporary name, flushed to disk, and renamed into
place. A rename within one file system is atomic, so a reader (or a later run)
sees either the old complete file or the new complete file, never a mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from finlora.errors import FinLoRAError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class DiskFullError(FinLoRAError, OSError):
    """No space left while writing `path`; the previous `path` (if any) is untouched."""

    def __init__(self, path: Path, cause: OSError | None = None):
        path = Path(path)
        kept = f"previous {path.name} kept" if path.exists() else "nothing was written"
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}; {kept}")
        self.path = path
        self.__cause__ = cause

    def __str__(self) -> str:
        return self.strerror


def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, DiskFullError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success.

    On any exception the temporary file is removed and `path` is left as it was.
    Text mode writes LF line endings whatever the platform.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        if _disk_full(e):
            raise DiskFullError(path, e) from e
        raise
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        if "b" in mode:
            f = os.fdopen(fd, mode)
        else:
            f = os.fdopen(fd, mode, encoding=encoding, newline="\n")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _disk_full(e):  # `with f` may already have failed closing: the message says what survived
            raise DiskFullError(path, e) from e
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | Path, obj, indent: int = 2) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")


def write_jsonl(path: str | Path, rows) -> int:
    n = 0
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


@contextlib.contextmanager
def atomic_dir(dest: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dest`; move it to `dest` on success.

    `dest` must not exist unless `force` is set, in which case the old folder is
    replaced only after the new one is complete. On failure the temporary folder
    is deleted and `dest` is untouched.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists (use --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise DiskFullError(dest, e) from e
        raise
