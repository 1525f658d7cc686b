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
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from finlora.errors import FinLoRAError, RefusedError


_UMASK = os.umask(0)  # reading the umask sets it: put it back at once
os.umask(_UMASK)


class DiskFullError(FinLoRAError, OSError):
    """No space left while writing `path`; the previous `path` (if any) is untouched."""

    def __init__(self, path: Path):
        kept = f"previous {path.name} kept" if path.exists() else "nothing was written"
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}; {kept}")

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
            raise DiskFullError(path) from e
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
            raise DiskFullError(path) from e
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


def written_by(marker: str, allowed: Callable[[str], bool], what: str) -> Callable[[Path], str | None]:
    """The rule for replacing a folder: it must be one this project wrote (it holds
    `marker`) and hold nothing else than what such a folder holds (`allowed(name)` for
    each entry), so that no adapter, base model, checkpoint or file of the user's is in
    it. Returns a check: None when `dest` may be replaced, else why not."""

    def check(dest: Path) -> str | None:
        if not dest.is_dir() or dest.is_symlink():
            return f"{dest} is not a folder"
        names = sorted(p.name for p in dest.iterdir())
        if marker not in names:
            return f"{dest} holds no {marker}, so it is not a {what} this project wrote"
        extra = [n for n in names if n != marker and not allowed(n)]
        if extra:
            return (f"{dest} holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, "
                    f"which a {what} does not")
        return None

    return check


def _stale_temps(dest: Path) -> list[Path]:
    """The temp folders beside `dest` that an interrupted `atomic_dir` to it left: their name
    carries the pid of the process that made them, and that process is gone."""
    stale = []
    for p in dest.parent.glob(f".{dest.name}.*.tmp"):
        m = re.fullmatch(rf"\.{re.escape(dest.name)}\.(\d+)\.[^.]+\.tmp", p.name)
        if not m or not p.is_dir() or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            stale.append(p)
        except OSError:  # alive, owned by another user
            pass
    return stale


@contextlib.contextmanager
def atomic_dir(dest: str | Path, replace: Callable[[Path], str | None] | None = None,
               on_stale: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `dest`; move it to `dest` on success.

    An existing `dest` is replaced only when `replace(dest)` returns None (see
    `written_by`), and only after the new folder is complete; otherwise, and always
    when `dest` is not a folder, nothing is written and the reason is raised. On
    failure the temporary folder is deleted and `dest` is untouched. One that a SIGKILL
    left (its name carries the dead pid) is removed by the next `atomic_dir` to the same
    `dest`, and `on_stale(path)` told of it.
    """
    dest = Path(dest)
    if dest.exists() or dest.is_symlink():
        why = replace(dest) if replace is not None else f"{dest} already exists"
        if why:
            raise RefusedError(why)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_temps(dest):
        shutil.rmtree(stale, ignore_errors=True)
        if on_stale is not None:
            on_stale(stale)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(e):
            raise DiskFullError(dest) from e
        raise


def writable(path: str | Path) -> str | None:
    """None when a file can be created at `path` (a folder, or where one would be made);
    else why not (read-only file system, permission denied, a file in the way). Probed by
    creating and removing a temporary folder in the nearest existing ancestor, which sees
    what permission bits alone do not (a read-only mount, for root too)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".finlora-probe-", dir=probe))
    except OSError as e:
        return f"{probe}: {e.strerror}"
    return None
