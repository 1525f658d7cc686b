"""`make data RECIPE=x` / `make data TASK=t`: the files a recipe trains on and `make eval`
scores it on, built as FinLoRA builds them.

Every generated recipe reads `./data/train/<task>_train.jsonl`; `make eval RECIPE=x` reads
`data/test/<set>_test.jsonl` for the sets in `tasks.RECIPE_TASKS`. Each file comes from,
in this order:

1. the local folder (`--src DIR`, `SRC=DIR`, `$FINLORA_DATA_SRC`), laid out as
   `../shared/data`: `finlora/train/<task>_train.jsonl`, `finlora/test/<set>_test.jsonl`
   (FinLoRA's `{"context", "target"}` JSONL);
2. the registry's public source (`tasks.TASKS[...].hub`), when asked (`--hub`) or when no
   folder is given and the hub is reachable;
3. otherwise nothing is written, and the error names every missing file, the place to put
   it and the public set it comes from.

All rows then go through `pipeline.build`: the same row-by-row validation (file:line),
duplicate removal, train/test leakage check, stats and atomic writes as the default.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

from finlora import recipes
from finlora.data import sources
from finlora.data.convert import Mapping
from finlora.data.defaults import ENV_SRC, default_outputs
from finlora.data.pipeline import DATA_DIR, SEED, Options, Part, Unit, build, say
from finlora.data.sources import RawRow
from finlora.data.tasks import RECIPE_TASKS, TASKS, Task
from finlora.errors import DataError, RecipeError

# FinLoRA's FPB test split (data/process_sentiment_train.py): datasets' train_test_split of
# sentences_50agree with test_size 0.25 and seed 42.
FPB_TEST_SIZE = 0.25
FINLORA_SEED = 42
# FinLoRA's FiNER batching (data/process_finer.py).
FINER_PER_SENTENCE = 3
FINER_PER_PROMPT = 4
FINER_LIMIT = 10_000


@dataclass
class Need:
    """One file a recipe task needs: where it goes, where it may come from."""

    split: str                      # "train" | "test"
    out_name: str                   # file name under data/<split>/
    task: Task                      # registry task that validates its rows
    local: tuple[str, ...]          # candidate paths inside the source folder (FinLoRA JSONL)
    hub: Callable[..., Unit] | None  # the Unit (given its file names) from the public copy
    fix: str | None = None          # a known labelling error of the local file to repair
    keep_repeats: bool = False      # repeats are the source's own oversampling (FinLoRA's mix)


def _fpb_finlora_test(**kw) -> Unit:
    fpb = TASKS["fpb"]
    ds = sources.hub_dataset(fpb.hub, "train")
    test = ds.train_test_split(test_size=FPB_TEST_SIZE, seed=FINLORA_SEED)["test"]
    where = f"hf:{fpb.hub.where}[FinLoRA test split]"
    return Unit(fpb, Mapping.of_hub(fpb), list(sources.hf_rows(test, where)), where, **kw)


def finer_batched(rows: Iterable[dict], tag_names: list[str], seed: int = FINLORA_SEED) -> list[dict]:
    """FinLoRA's FiNER-139 prompts: the first FINER_PER_SENTENCE tagged words of each
    sentence become questions "What is best tag for entity ...", FINER_PER_PROMPT to a
    prompt that lists every US GAAP tag, answers comma-separated; at most FINER_LIMIT
    prompts (plus one partial prompt of the leftover questions, as FinLoRA), shuffled.

    `rows` are FiNER rows (`tokens`, `ner_tags` ids) in the order to use (FinLoRA shuffles
    the split with seed 42 first). The tag list is in the order of the set's label names,
    where FinLoRA's Python set order changes from run to run."""
    bare = [n.split("-", 1)[1] if "-" in n else n for n in tag_names]
    tag_list = ",".join(dict.fromkeys(b for b in bare[1:] if b))  # id 0 is "O", no tag

    def prompt(batch: list[tuple[str, str, str]]) -> dict:
        n = FINER_PER_PROMPT
        questions = "\n".join(f'{i}. What is best tag for entity "{w}" in sentence: "{s}?"'
                              for i, (s, w, _) in enumerate(batch, start=1))
        return {"context": ("You are XBRL expert.  Here is a list of US GAAP tags options: " + tag_list + ". "
                            f"Answer the following {n} independent questions by providing only  {n} US GAAP tags "
                            "answers in the order of the questions. Each answer must be saperated by a comma (,).  "
                            "Provide nothing else. \n" + questions + "\nOutput US GAAP tags:"),
                "target": ",".join(t for _, _, t in batch)}

    out: list[dict] = []
    pending: list[tuple[str, str, str]] = []
    for row in rows:
        tokens, tags = row["tokens"], row["ner_tags"]
        sentence = " ".join(tokens)
        tagged = [i for i, t in enumerate(tags) if t != 0][:FINER_PER_SENTENCE]
        pending += [(sentence, tokens[i], bare[tags[i]]) for i in tagged]
        while len(pending) >= FINER_PER_PROMPT:
            out.append(prompt(pending[:FINER_PER_PROMPT]))
            pending = pending[FINER_PER_PROMPT:]
        if len(out) > FINER_LIMIT:
            break
    if pending:
        out.append(prompt(pending))
    random.Random(seed).shuffle(out)
    return out


def _finer_hub(split: str) -> Callable[..., Unit]:
    def load(**kw) -> Unit:
        finer = TASKS["finer"]
        ds = sources.hub_dataset(finer.hub, split)
        feature = ds.features.get("ner_tags")
        names = getattr(getattr(feature, "feature", None), "names", None)
        if not names:
            raise DataError(f"hf:{finer.hub.where}[{split}]: ner_tags carries no tag names "
                            "(expected a sequence of ClassLabel, as the set publishes it)")
        where = f"hf:{finer.hub.where}[{split}] (FinLoRA batching)"
        batched = finer_batched(ds.shuffle(seed=FINLORA_SEED), names)
        return Unit(finer, Mapping(finlora=True), [RawRow(where, i, r) for i, r in enumerate(batched, start=1)], where,
                    **kw)
    return load


def needs(task_name: str) -> list[Need]:
    """The files of one recipe task: its train file, then its `make eval` test sets."""
    if task_name not in RECIPE_TASKS:
        raise DataError(f"unknown recipe task {task_name!r}; tasks are: {', '.join(RECIPE_TASKS)}")
    reg_name, test_sets = RECIPE_TASKS[task_name]
    reg = TASKS[reg_name]
    out: list[Need] = []
    train_local = (f"finlora/train/{task_name}_train.jsonl",)
    if task_name == "sentiment":
        train_local += ("finlora/train/finlora_sentiment_train.jsonl",)
    if task_name == "finer":
        train_local += ("finlora/train/finer_train_batched.jsonl",)
        hub = _finer_hub("train")
    else:
        hub = partial(Unit.from_hub, reg, reg.hub.train_split) if reg.hub and reg.hub.train_split else None
    out.append(Need("train", f"{task_name}_train.jsonl", reg, train_local, hub, keep_repeats=task_name == "sentiment"))
    for name in test_sets:
        t = TASKS[name]
        if name == "fpb":
            hub = _fpb_finlora_test
        elif t.hub and t.hub.test_split:
            hub = partial(Unit.from_hub, t, t.hub.test_split)
        else:
            hub = None
        out.append(Need("test", f"{name}_test.jsonl", t, (f"finlora/test/{name}_test.jsonl",), hub,
                        fix="tfns-swap" if name == "tfns" else None))
    return out


def task_of_recipe(recipe: str) -> str | None:
    """The recipe task whose files `recipe` reads; None when it reads the CPU default's file."""
    r = recipes.Recipe.open(recipe)
    found, default = set(), default_outputs()
    for d in r.get("datasets") or []:
        p = recipes.resolve_path(str(d.get("path", "")))
        if Path(os.path.abspath(p)) in default:
            return None
        stem = Path(p).name.removesuffix("_train.jsonl")
        if p.parent.name != "train" or stem not in RECIPE_TASKS:
            raise RecipeError(f"{r.path}: datasets path {d.get('path')} is not a file `make data` builds "
                              f"(data/train/<task>_train.jsonl, tasks: {', '.join(RECIPE_TASKS)})")
        found.add(stem)
    if len(found) != 1:
        raise RecipeError(f"{r.path}: expected one data/train/<task>_train.jsonl dataset, found "
                          f"{sorted(found) or 'none'}")
    return found.pop()


def units(task_name: str, src: Path | None, use_hub: bool) -> list[Unit]:
    """The Unit of every file of `task_name`, from `src` first, then the hub when `use_hub`.
    Raises DataError naming every file that has neither."""
    plan = needs(task_name)
    chosen, missing = [], []
    for n in plan:
        local = next((src / rel for rel in n.local if (src / rel).is_file()), None) if src else None
        if local is not None:
            chosen.append((n, local))
        elif use_hub and n.hub is not None:
            chosen.append((n, None))
        else:
            missing.append(n)
    if missing:
        where = src if src else "SRC"
        lines = [f"make data TASK={task_name}: no source for {len(missing)} file(s); nothing was written:"]
        for n in missing:
            remote = (f"public copy: {n.task.hub.where}" if n.hub is not None
                      else "no public copy known to the registry")
            lines.append(f"  data/{n.split}/{n.out_name}: put FinLoRA's JSONL at {where}/{n.local[0]} ({remote})")
        if use_hub:
            hint = "the hub was tried only for the files with a public copy"
        elif src:
            hint = "or add HUB=1 (--hub) to fetch the files with a public copy"
        else:
            hint = "or run where the hub is reachable (files with a public copy)"
        lines.append(f"a folder laid out as ../shared/data (finlora/train, finlora/test): make data TASK={task_name} "
                     f"SRC=dir; {hint}")
        raise DataError("\n".join(lines))
    out = []
    for n, local in chosen:
        kw = {"keep_repeats": n.keep_repeats, f"{n.split}_name": n.out_name}
        out.append(Unit.from_finlora(n.task, local, n.fix, **kw) if local is not None else n.hub(**kw))
    return out


def prepare_task(task: str, src: str | Path | None, *, hub: bool = False, out_dir: Path = DATA_DIR,
                 recipe: str | None = None, seed: int = SEED, skip_bad: bool = False, allow_overlap: bool = False,
                 token_check: bool = True, against: list[Path] | None = None) -> list[Part]:
    """The files recipe task `task` trains on and `make eval` scores it on."""
    src = src or os.environ.get(ENV_SRC) or None
    use_hub = hub or (src is None and sources.hub_reachable())
    said = [f"source {src} (local directory)" if src else "", "the hub" if use_hub else ""]
    say(f"data: task {task}: " + (", then ".join(filter(None, said))
                                   or "no local folder (SRC), and the hub is not reachable (or HF_HUB_OFFLINE is set)"))
    opts = Options(out_dir=out_dir, recipe=recipe or f"{task}_r8", seed=seed, skip_bad=skip_bad,
                   allow_overlap=allow_overlap, token_check=token_check, against=against or [], drop_overlap=True)
    return build(units(task, Path(src) if src else None, use_hub), opts)
