"""`make data`: convert financial data sets to FinLoRA JSONL, check them, write them safely.

    python scripts/prepare_data.py                      # what the default recipe needs (shipped data/sources/)
    python scripts/prepare_data.py --src ../shared/data # ... from a local copy
    python scripts/prepare_data.py --recipe formula_r8 --src ../shared/data  # what a GPU recipe needs
    python scripts/prepare_data.py --task tfns --input tfns_test.jsonl --format finlora \\
        --split test --fix tfns-swap --name tfns        # one task, one source

Every run reads and converts all its input, validates every row (JSON, fields,
types, labels; training rows' token length against the recipe's sequence_len), removes duplicates,
checks train/test leakage, and only then writes: each file to a temporary name and
renamed into place, so a failed or interrupted run leaves the previous files as they
were. Nothing is dropped silently: bad rows fail the run unless --skip-bad, which
lists them.

This module is the command line; the steps are finlora.data.pipeline, the default's
sources finlora.data.defaults, a recipe task's finlora.data.recipe_data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finlora import recipes
from finlora.data import sources
from finlora.data.convert import Mapping
from finlora.data.defaults import DEFAULT_TRAIN, ENV_SRC, prepare_default
from finlora.data.pipeline import DATA_DIR, SEED, Options, Unit, build, say
from finlora.data.recipe_data import prepare_task, task_of_recipe
from finlora.data.tasks import FIXES, LABEL_MAPS, RECIPE_TASKS, TASKS, get_task


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Convert financial data sets to FinLoRA {context, target} JSONL under data/train and data/test, "
                    "with validation, de-duplication, a leakage check and stats (data/stats/<name>.json).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --task: prepare what the default recipe reads (data/train/" + DEFAULT_TRAIN + ") from --src, "
               f"${ENV_SRC}, the hub with --hub, else the real files shipped in data/sources/ (offline); the "
               "synthetic smoke-test set only with --synthetic.\n"
               "--recipe X (a GPU recipe) or --task T without --input: the files recipe X / task T trains on and "
               "`make eval` scores it on, from --src (FinLoRA JSONL laid out as ../shared/data), else the hub.\n"
               "Exit status: 0 written; 1 bad rows or train/test overlap (nothing written); 2 usage.\n\n"
               "examples:\n"
               "  prepare_data.py --src ../shared/data\n"
               "  prepare_data.py --recipe formula_r8 --src ../shared/data\n"
               "  prepare_data.py --task headline --hub\n"
               "  prepare_data.py --task fpb --input all-data.csv --format all-data-csv --name fpb --test-fraction 0.2\n"
               "  prepare_data.py --task sentiment --input news.csv --text-col content --label-col label --name mine\n"
               "  prepare_data.py --task tfns --input tfns_test.jsonl --format finlora --split test --fix tfns-swap\n"
               "  prepare_data.py --task tfns --hub --name tfns\n"
               "  prepare_data.py --list-tasks")
    g = p.add_argument_group("default preparation")
    g.add_argument("--src", help=f"local folder holding raw/ and finlora/ (default: ${ENV_SRC}, else the shipped "
                                 "data/sources/)")
    g.add_argument("--no-hub", action="store_true", help="kept for old scripts: the default never tries the hub "
                                                         "unless --hub")
    g.add_argument("--synthetic", action="store_true",
                   help="the generated smoke-test set instead of real data (invented headlines; tests, trying the pipeline)")
    g = p.add_argument_group("one task from one source")
    g.add_argument("--task", choices=sorted(TASKS), help="task from the registry (see --list-tasks)")
    g.add_argument("--input", action="append", default=[],
                   help="input file (repeatable); with --format hf, a dataset name or builder (json, csv, parquet)")
    g.add_argument("--format", choices=sources.FORMATS,
                   help="input format (default: from the file suffix; .jsonl without --text-col is read as finlora). "
                        "all-data-csv: FPB's label,content CSV; fpb-txt: FPB's sentence@label Latin-1 files; "
                        "fiqa-json: FiQA task 1 JSON with sentiment_score; finlora: {context, target} JSONL")
    g.add_argument("--hub", action="store_true",
                   help="read the registry's public sources: for the default, FPB/FiQA/TFNS/NWGI from the hub; with "
                        "--task/--recipe, the files --src does not hold")
    g.add_argument("--hf-config", help="with --format hf: the dataset config")
    g.add_argument("--hf-split", default="train", help="with --format hf: the split (default: train)")
    g.add_argument("--data-files", help="with --format hf and a builder (json, csv, parquet): the local file")
    g.add_argument("--text-col", help="column with the input text (default: text)")
    g.add_argument("--label-col", help="column with the label/answer (default: label)")
    g.add_argument("--score-col", help="column with a continuous sentiment score; labels by FinGPT's FiQA thresholds "
                                       "(< -0.1 negative, < 0.1 neutral, else positive)")
    g.add_argument("--kind-col", help="column choosing a template variant (FiQA: type = post|headline)")
    g.add_argument("--field", action="append", default=[], metavar="NAME=COL",
                   help="fill the template's {NAME} from column COL (repeatable), e.g. instruction=instruction")
    g.add_argument("--label-map", help="ids to labels: a registry name (" + ", ".join(LABEL_MAPS) + ") or JSON "
                                       "'{\"0\": \"negative\", ...}'; default: the task's hub map, if any")
    g.add_argument("--fix", choices=sorted(FIXES), action="append", default=[],
                   help="repair a known labelling error; tfns-swap swaps positive and neutral (FinLoRA's tfns_test.jsonl)")
    g.add_argument("--swap-labels", metavar="A,B", help="swap two labels (the general form of --fix)")
    g.add_argument("--name", help="output name: data/train/NAME_train.jsonl, data/test/NAME_test.jsonl (default: the task)")
    g.add_argument("--split", choices=("train", "test"), default="train",
                   help="where the whole input goes when --test-fraction is 0 (default: train)")
    g.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this fraction as a seeded, stratified test split (e.g. 0.2)")
    g.add_argument("--against", action="append", default=[], type=Path, metavar="FILE",
                   help="also fail if a train example's text is in this test JSONL file (repeatable)")
    g = p.add_argument_group("common")
    g.add_argument("--seed", type=int, default=SEED, help=f"split seed (default: {SEED}); same seed, same bytes")
    g.add_argument("--skip-bad", action="store_true", help="skip bad rows instead of failing; they are counted and listed")
    g.add_argument("--allow-overlap", action="store_true", help="write even if train and test share input texts")
    g.add_argument("--recipe", help="recipe whose tokenizer and sequence_len bound the examples (default: "
                                    f"{recipes.DEFAULT_RECIPE}, or <task>_r8 for --task); without --task, also the "
                                    "recipe whose files to prepare")
    g.add_argument("--no-token-check", action="store_true", help="skip the token-length check and token stats")
    g.add_argument("--out-dir", type=Path, default=DATA_DIR, help="output root (default: data/)")
    g.add_argument("--list-tasks", action="store_true", help="print the task registry and exit")
    return p


def _list_tasks() -> None:
    for t in TASKS.values():
        labels = "/".join(t.labels) if t.labels else t.answer_type
        hub = t.hub.where if t.hub else "-"
        say(f"{t.name:13} {t.family:10} {labels[:48]:48} {hub}")
        if t.notes:
            say(f"{'':13} {t.notes}")


def _task_units(a: argparse.Namespace, p: argparse.ArgumentParser) -> list[Unit]:
    task = get_task(a.task)
    name = a.name or task.name
    if a.label_map:
        label_map = LABEL_MAPS.get(a.label_map)
        if label_map is None:
            try:
                label_map = {str(k): str(v) for k, v in json.loads(a.label_map).items()}
            except (json.JSONDecodeError, AttributeError):
                p.error(f"--label-map: not a registry name ({', '.join(LABEL_MAPS)}) nor a JSON object")
    else:
        label_map = LABEL_MAPS.get(task.hub.label_map) if task.hub and task.hub.label_map else None
    swaps = [FIXES[f] for f in a.fix]
    if a.swap_labels:
        pair = tuple(x.strip() for x in a.swap_labels.split(","))
        if len(pair) != 2:
            p.error("--swap-labels takes two labels: A,B")
        swaps.append(pair)
    if len(swaps) > 1:
        p.error("give one label repair (--fix or --swap-labels)")
    swap = swaps[0] if swaps else None
    if swap and (not task.labels or not set(swap) <= set(task.labels)):
        p.error(f"--swap-labels/--fix: {swap} are not labels of task {task.name} ({task.labels})")
    fields = {}
    for f in a.field:
        k, sep, v = f.partition("=")
        if not sep:
            p.error(f"--field {f!r}: expected NAME=COLUMN")
        fields[k.strip()] = v.strip()
    if not 0.0 <= a.test_fraction < 1.0:
        p.error("--test-fraction must be in [0, 1)")
    split_names = dict(train_name=f"{name}_train.jsonl", test_name=f"{name}_test.jsonl", test_fraction=a.test_fraction)
    if a.test_fraction == 0.0:
        split_names = {f"{a.split}_name": f"{name}_{a.split}.jsonl"}

    if a.hub:
        if task.hub is None:
            p.error(f"task {task.name} has no hub source in the registry; use --input")
        h = task.hub
        units = []
        if h.train_split:
            names = split_names if (h.test_split is None and a.test_fraction) else {"train_name": f"{name}_train.jsonl"}
            units.append(Unit.from_hub(task, h.train_split, **names))
        if h.test_split:
            units.append(Unit.from_hub(task, h.test_split, test_name=f"{name}_test.jsonl"))
        for u in units:
            u.mapping.swap = swap
        return units

    if not a.input:
        p.error("--task needs --input FILE (or --hub)")
    fmt = a.format or sources.guess_format(a.input[0])
    if fmt == "jsonl" and not (a.text_col or a.label_col or a.score_col):
        fmt = "finlora"
    m = Mapping.of_format(fmt)
    m.text_col = a.text_col or m.text_col
    m.label_col = a.label_col or m.label_col
    if a.score_col:
        m.score_col, m.label_col = a.score_col, None
    m.kind_col = a.kind_col or m.kind_col
    m.fields, m.label_map, m.swap = fields, label_map, swap
    info = sources.SourceInfo()
    rows: list = []
    for inp in a.input:
        if fmt == "hf":
            rows.append(sources.read_hf(inp, a.hf_config, a.hf_split, data_files=a.data_files))
        else:
            rows.append(sources.read(fmt, inp, info))
    chained = (r for it in rows for r in it)
    source = ", ".join(a.input) + (f" ({fmt}" + (f", swap {swap[0]}/{swap[1]}" if swap else "") + ")")
    return [Unit(task, m, chained, source, latin1=info, **split_names)]


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.list_tasks:
        _list_tasks()
        return 0
    common = dict(seed=a.seed, skip_bad=a.skip_bad, allow_overlap=a.allow_overlap)
    if a.task is None:
        if a.input:
            p.error("--input needs --task")
        task = task_of_recipe(a.recipe) if a.recipe else None
        if task is None:
            prepare_default(a.src, out_dir=a.out_dir, recipe=a.recipe, hub=a.hub, synthetic=a.synthetic, **common)
        else:
            if a.synthetic:
                p.error(f"--synthetic is the default recipe's smoke-test set; {a.recipe} trains on {task} data")
            prepare_task(task, a.src, hub=a.hub, out_dir=a.out_dir, recipe=a.recipe,
                         token_check=not a.no_token_check, against=a.against, **common)
        return 0
    if a.synthetic:
        p.error("--synthetic is for the default preparation (no --task)")
    if not a.input and a.task in RECIPE_TASKS:
        prepare_task(a.task, a.src, hub=a.hub, out_dir=a.out_dir, recipe=a.recipe,
                     token_check=not a.no_token_check, against=a.against, **common)
        return 0
    if a.src:
        p.error("--src is for the default preparation and the recipe tasks; with --task use --input")
    opts = Options(out_dir=a.out_dir, recipe=a.recipe, seed=a.seed, skip_bad=a.skip_bad,
                   allow_overlap=a.allow_overlap, token_check=not a.no_token_check, against=a.against)
    build(_task_units(a, p), opts)
    return 0
