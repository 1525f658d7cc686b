"""`make data RECIPE=x` / `make data TASK=t`: the files a recipe trains on and `make eval`
scores it on, as FinLoRA publishes them (docs/DATA.md, "Data for any recipe").

Each of FinLoRA's files comes from SRC=dir, else data/cache/, else FinLoRA's repository at the
commit the registry pins, and is checked against the registry's hash before it is used. A
test file is written as published, byte for byte, and a training file validated, both by `pipeline.build`.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from finlora import recipes
from finlora.cli import flag
from finlora.data import tasks
from finlora.data.pipeline import DATA_DIR, Options, Part, Unit, build, content_hash
from finlora.data.sources import say
from finlora.data.tasks import RECIPE_TASKS, TASKS, FinLoRAFile
from finlora.errors import DataError, RecipeError

ENV_SRC = "FINLORA_DATA_SRC"
CACHE = DATA_DIR / "cache" / "finlora"


def source_folder(src: str | Path | None) -> Path | None:
    """SRC=dir, else $FINLORA_DATA_SRC, else None; DataError when it is not a folder."""
    given = flag("--src", "SRC=dir") if src else ENV_SRC
    src = src or os.environ.get(ENV_SRC)
    if src and not Path(src).is_dir():
        raise DataError(f"{given}: {src} does not exist (or is not a folder)")
    return Path(src) if src else None


def verified(f: FinLoRAFile, path: Path) -> Path:
    kind, got, want = content_hash(f, path)
    if got != want:
        raise DataError(f"{path}: {kind} {got}, but FinLoRA's {f.path} at {f.commit[:7]} has {want}: another "
                        "version of the file (or a Git LFS pointer instead of its content); use FinLoRA's file at "
                        "that commit")
    return path


def locate(f: FinLoRAFile, src: Path | None) -> Path | None:
    """`f` in a SRC folder laid out as FinLoRA's data/ (or with finlora/ or data/ above it), or in the cache."""
    for base in ([src, src / "finlora", src / "data"] if src else []) + [CACHE / f.commit]:
        if (base / f.path).is_file():
            return base / f.path
    return None


def online(timeout: float = 3.0) -> bool:
    """Whether FinLoRA's file host answers (a TCP connection, within `timeout`)."""
    url = urlparse(tasks.FINLORA_RAW)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def download(f: FinLoRAFile) -> Path:
    """FinLoRA's file at its pinned commit into data/cache/ (checked, then renamed into place)."""
    dest = CACHE / f.commit / f.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    say(f"data: downloading {f.url}")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(f.url, timeout=60) as r:  # noqa: S310 - a pinned https URL
            shutil.copyfileobj(r, out)
        verified(f, Path(tmp))
        os.replace(tmp, dest)
    except OSError as e:
        raise DataError(f"cannot download {f.url}: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def fetch_all(files: list[FinLoRAFile], src: Path | None) -> dict[str, Path]:
    """A verified local copy of every file; DataError naming each one that cannot be had."""
    found = {f.path: locate(f, src) for f in files}
    missing = [f for f in files if found[f.path] is None]
    if missing and not online():
        lines = [f"{len(missing)} of FinLoRA's file(s) are not on this machine and {urlparse(missing[0].url).hostname} "
                 "does not answer; nothing was written:"]
        lines += [f"  {f.path}: {f.url}" for f in missing]
        lfs = ", ".join(f.path for f in tasks.FILES.values() if f.lfs)
        lines.append("put them in a folder laid out as FinLoRA's data/ (train/, test/; a clone of "
                     f"https://github.com/{tasks.FINLORA_REPO} has them, Git LFS for {lfs}) and give it as SRC=dir")
        raise DataError("\n".join(lines))
    for f in missing:
        found[f.path] = download(f)
    return {f.path: verified(f, found[f.path]) for f in files}


def task_of_recipe(r: recipes.Recipe) -> str:
    """The recipe task whose files recipe `r` reads (its data/train/<task>_train.jsonl)."""
    found = set()
    for d in r.get("datasets") or []:
        p = recipes.resolve_path(str((d or {}).get("path", "")))
        stem = p.name.removesuffix("_train.jsonl")
        if p.parent.name != "train" or stem not in RECIPE_TASKS:
            raise RecipeError(f"{r.where('datasets')}: datasets path {d.get('path')} is not a file `make data` builds "
                              f"(data/train/<task>_train.jsonl, tasks: {', '.join(RECIPE_TASKS)})")
        found.add(stem)
    if len(found) != 1:
        raise RecipeError(f"{r.where('datasets')}: expected one data/train/<task>_train.jsonl dataset, found "
                          f"{sorted(found) or 'none'}")
    return found.pop()


def prepare_task(task: str, src: str | Path | None, **options) -> list[Part]:
    """The files recipe task `task` trains on and `make eval` scores it on; `options` are the pipeline's `Options`."""
    rt = RECIPE_TASKS[task]
    src = source_folder(src)
    opts = Options(**options)
    sets = [s for s in rt.test_sets if s.source is not None]
    say(f"data: task {task}: train {rt.train.path}, test sets {', '.join(s.name for s in sets)} "
        f"(from {'SRC=' + str(src) + ', then ' if src else ''}data/cache, then FinLoRA's repository)")
    paths = fetch_all([rt.train, *(s.source for s in sets)], src)
    opts.published = [(s, paths[s.source.path]) for s in sets]
    opts.recipe = opts.recipe or recipes.Recipe.open(recipes.recipe_name(task, "r8"))
    opts.drop_overlap = True
    train = TASKS[rt.train_task]
    unit = Unit.from_finlora(train, paths[rt.train.path], train_name=f"{task}_train.jsonl",
                             keep_repeats=task == "sentiment")
    return build([unit], opts)

