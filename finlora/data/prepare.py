"""`make data`: convert financial data sets to FinLoRA JSONL, check them, write them safely.

    python scripts/prepare_data.py                          # the CPU default (shipped data/sources/)
    python scripts/prepare_data.py --recipe ner_r8          # what a GPU recipe needs (FinLoRA's files)
    python scripts/prepare_data.py --task tfns --input tfns.jsonl --split test --fix tfns-swap --name mine

What every run checks before it writes anything: docs/DATA.md (Validation). This module is
the command line; the steps are finlora.data.pipeline, the default's sources
finlora.data.defaults, a recipe task's finlora.data.recipe_data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from finlora import recipes
from finlora.atomic import writable
from finlora.cli import flag
from finlora.data import sources
from finlora.data.defaults import prepare_default
from finlora.data.pipeline import DATA_DIR, SEED, Options, Unit, build
from finlora.data.recipe_data import prepare_task, task_of_recipe
from finlora.data.sources import say
from finlora.data.tasks import FIXES, LABEL_MAPS, RECIPE_TASKS, TASKS, Mapping, get_task
from finlora.errors import DataError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Convert financial data sets to FinLoRA {context, target} JSONL under data/train and data/test, "
                    "with validation, de-duplication, a leakage check and stats (data/stats/<name>.json).",
        epilog="Exit status: 0 written; 1 bad rows, a missing source or train/test overlap (nothing written); 2 usage.")
    p.add_argument("--recipe", help=f"prepare what this recipe trains on and is scored on (default: "
                                    f"{recipes.DEFAULT_RECIPE}); with --input, the recipe whose tokenizer and "
                                    "sequence_len bound the rows")
    p.add_argument("--task", help=f"a recipe task ({', '.join(t for t in RECIPE_TASKS if t != 'sentiment_cpu')}), "
                                  f"or with --input a registry task ({', '.join(TASKS)})")
    p.add_argument("--src", type=Path, help="local folder: FinLoRA's data/ (train/, test/), or one with raw/ and "
                                            "finlora/ (default: $FINLORA_DATA_SRC; the CPU default: data/sources/)")
    p.add_argument("--hub", action="store_true", help="the CPU default, or --task T, from its Hugging Face hub sources")
    p.add_argument("--synthetic", action="store_true", help="the generated smoke-test set (invented headlines)")
    g = p.add_argument_group("one source (--task T --input FILE)")
    g.add_argument("--input", action="append", default=[], type=Path, help="input file (repeatable)")
    g.add_argument("--format", choices=sources.FORMATS,
                   help="default: from the suffix (.jsonl without --text-col: finlora). all-data-csv: FPB's "
                        "label,content CSV; fpb-txt: FPB's sentence@label files; fiqa-json: FiQA task 1 JSON")
    g.add_argument("--text-col", help="column with the input text (default: text)")
    g.add_argument("--label-col", help="column with the label/answer (default: label)")
    g.add_argument("--score-col", help="a continuous sentiment score, labelled by FinGPT's FiQA thresholds")
    g.add_argument("--field", action="append", default=[], metavar="NAME=COL",
                   help="fill the template's {NAME} from column COL (repeatable)")
    g.add_argument("--label-map", help=f"ids to labels: {', '.join(LABEL_MAPS)} or JSON '{{\"0\": \"negative\"}}'")
    g.add_argument("--fix", choices=sorted(FIXES), help="repair a known labelling error (tfns-swap)")
    g.add_argument("--name", help="output name: data/train/NAME_train.jsonl, data/test/NAME_test.jsonl")
    g.add_argument("--split", choices=("train", "test"), default="train", help="where the input goes (default train)")
    g.add_argument("--test-fraction", type=float, default=0.0, help="hold out a seeded, stratified test split")
    g.add_argument("--against", action="append", default=[], type=Path, metavar="FILE",
                   help="also fail if a train row's text is in this test JSONL file (repeatable)")
    g = p.add_argument_group("common")
    g.add_argument("--seed", type=int, default=SEED, help=f"split seed (default {SEED}); same seed, same bytes")
    g.add_argument("--skip-bad", action="store_true", help="leave bad rows out (listed) instead of failing")
    g.add_argument("--allow-overlap", action="store_true", help="write even if train and test share input texts")
    g.add_argument("--no-token-check", action="store_true", help="skip the token-length check and token stats")
    g.add_argument("--out-dir", type=Path, default=DATA_DIR, help="output root (default: data/)")
    g.add_argument("--list-tasks", action="store_true", help="print the task registry and exit")
    return p


def _list_tasks() -> None:
    for t in TASKS.values():
        say(f"{t.name:16} {t.family:10} {('/'.join(t.labels) if t.labels else t.answer_type)[:48]:48} "
            f"{t.hub.where if t.hub else '-'}")
    for rt in RECIPE_TASKS.values():
        say(f"recipe task {rt.name:13} train {rt.train.path if rt.train else '(the CPU default build)'}; "
            f"scored on {', '.join(s.name for s in rt.test_sets)}")


def _one_source(a: argparse.Namespace, p: argparse.ArgumentParser) -> list[Unit]:
    task = get_task(a.task)
    name = a.name or task.name
    label_map = task.hub.columns.label_map if task.hub else None
    if a.label_map:
        try:
            label_map = LABEL_MAPS.get(a.label_map) or {str(k): str(v) for k, v in json.loads(a.label_map).items()}
        except (json.JSONDecodeError, AttributeError):
            p.error(f"--label-map: not a registry name ({', '.join(LABEL_MAPS)}) nor a JSON object")
    fields = {}
    for f in a.field:
        k, sep, v = f.partition("=")
        if not sep:
            p.error(f"--field {f!r}: expected NAME=COLUMN")
        fields[k.strip()] = v.strip()
    if not 0.0 <= a.test_fraction < 1.0:
        p.error("--test-fraction must be in [0, 1)")
    names = ({"train_name": f"{name}_train.jsonl", "test_name": f"{name}_test.jsonl", "test_fraction": a.test_fraction}
             if a.test_fraction else {f"{a.split}_name": f"{name}_{a.split}.jsonl"})
    swap = FIXES[a.fix] if a.fix else None
    if a.hub:
        if task.hub is None:
            p.error(f"task {task.name} has no hub source in the registry; use --input")
        h, units = task.hub, []
        if h.train_split:
            units.append(Unit.from_hub(task, h.train_split, **(names if h.test_split is None and a.test_fraction
                                                                else {"train_name": f"{name}_train.jsonl"})))
        if h.test_split:
            units.append(Unit.from_hub(task, h.test_split, test_name=f"{name}_test.jsonl"))
        for u in units:
            u.mapping.swap = swap
        return units
    fmt = a.format or sources.guess_format(a.input[0])
    if fmt == "jsonl" and not (a.text_col or a.label_col or a.score_col):
        fmt = "finlora"
    m = Mapping.of_format(fmt)
    m.text_col = a.text_col or m.text_col
    m.label_col = a.label_col or m.label_col
    if a.score_col:
        m.score_col, m.label_col = a.score_col, None
    m.fields, m.label_map, m.swap = fields, label_map, swap
    rows = [r for inp in a.input for r in sources.read(fmt, inp)]
    source = ", ".join(map(str, a.input)) + f" ({fmt}" + (f", {a.fix}" if a.fix else "") + ")"
    return [Unit(task, m, rows, source, **names)]


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if a.list_tasks:
        _list_tasks()
        return 0
    why = writable(a.out_dir)
    if why:
        raise DataError(f"--out-dir {a.out_dir}: cannot write there ({why})")
    recipe = recipes.Recipe.open(a.recipe) if a.recipe else None
    options = dict(out_dir=a.out_dir, recipe=recipe, seed=a.seed, skip_bad=a.skip_bad, allow_overlap=a.allow_overlap,
                   token_check=not a.no_token_check)
    if a.input or (a.task and a.task not in RECIPE_TASKS):
        if not a.task:
            p.error("--input needs --task")
        if not a.input and not a.hub:
            hint = flag("--input FILE", 'ARGS="--input FILE"')
            p.error(f"--task {a.task} is a registry task: give {hint} (or --hub)")
        build(_one_source(a, p), Options(against=a.against, **options))
        return 0
    task = a.task or task_of_recipe(recipe or recipes.Recipe.open(recipes.DEFAULT_RECIPE))
    if task == "sentiment_cpu":
        prepare_default(a.src, hub=a.hub, synthetic=a.synthetic, **options)
    elif a.synthetic:
        p.error(f"--synthetic is the CPU default's smoke-test set; {a.recipe or a.task} trains on {task} data")
    else:
        prepare_task(task, a.src, **options)
    return 0
