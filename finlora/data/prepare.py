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
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from finlora.errors import DataError
from finlora import ROOT, recipes
from finlora.atomic import write_json, write_jsonl
from finlora.data import sources, stats, synthetic
from finlora.data.convert import Example, Mapping, Problem, input_text
from finlora.data.sources import RawRow
from finlora.data.split import dedupe, overlaps, oversample, stratified_split
from finlora.data.tasks import FIXES, LABEL_MAPS, TASKS, Task, fold_nwgi, get_task
from finlora.data.validate import LengthCheck, convert_all, count_tokens, load_length_check, sort_problems, too_long

DATA_DIR = ROOT / "data"
# The real files the default trains and is scored on, shipped as published (data/README.md),
# laid out as a SRC folder.
SHIPPED = DATA_DIR / "sources"
SHIPPED_FILES = ("raw/financial_phrasebank_train.csv", "finlora/test/nwgi_test.jsonl",
                 "finlora/test/fiqa_test.jsonl", "finlora/test/tfns_test.jsonl")
DEFAULT_TRAIN = "sentiment_cpu_train.jsonl"
SYNTHETIC_TRAIN = "synthetic_sentiment_train.jsonl"
SYNTHETIC_TEST = "synthetic_sentiment_test.jsonl"
ENV_SRC = "FINLORA_DATA_SRC"
SEED = 42
TEST_FRACTION = 0.2
NWGI_TRAIN_ROWS = 600  # NWGI rows added to the FPB training file (of ~3,240 in our 80% split)
BALANCE_POWER = 0.5  # class c of n_c rows -> n_max * (n_c / n_max) ** 0.5 rows (split.oversample)
MAX_LISTED = 50  # overlap pairs listed in full; every bad row is always listed


@dataclass
class Unit:
    """One source converted for one task, going to a train file, a test file, or both."""

    task: Task
    mapping: Mapping
    rows: Iterable[RawRow]
    source: str
    train_name: str | None = None
    test_name: str | None = None
    test_fraction: float = 0.0
    synthetic: bool = False
    latin1: sources.SourceInfo | None = None
    balance: bool = False  # oversample the train split by class (after dedupe and leakage checks)
    # The train split's rows re-rendered as this task, their labels through `train_labels`
    # (NWGI trains as 3-class news sentiment: FPB's wording, levels folded as FinLoRA scores them).
    train_as: Task | None = None
    train_labels: Callable[[str], str] | None = None
    train_rows: int | None = None  # a seeded sample of this many train rows (the rest is not used)
    keep_repeats: bool = False  # repeated rows are the source's own oversampling: counted, not removed


@dataclass
class Part:
    name: str
    split: str
    unit: Unit
    examples: list[Example]
    duplicates: list = field(default_factory=list)
    skipped: list[Problem] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    before_balance: dict[str, int] | None = None  # class counts of the distinct rows, when balanced
    merged: list[dict] = field(default_factory=list)  # when several units' parts share this file: each one's summary
    left_out: list[str] = field(default_factory=list)  # train rows left out for sharing a test input (drop_overlap)

    @property
    def task(self) -> Task:
        return self.unit.train_as if self.split == "train" and self.unit.train_as else self.unit.task


@dataclass
class Options:
    out_dir: Path = DATA_DIR
    recipe: str | None = None
    seed: int = SEED
    skip_bad: bool = False
    allow_overlap: bool = False
    token_check: bool = True
    against: list[Path] = field(default_factory=list)  # extra test files to check leakage against
    # Leave train rows whose input is in a test file out (listed) instead of failing: for
    # published train/test pairs (FinLoRA's xbrl_term shares 2 of 5,856 terms with its test).
    drop_overlap: bool = False


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_examples(path: Path, examples: Iterable[Example]) -> int:
    """UTF-8, LF, one `{"context", "target"}` per line; temp file then rename."""
    return write_jsonl(path, (e.row() for e in examples))


def atomic_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` (relative): a temporary link renamed over it."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_against(paths: list[Path]) -> list[Example]:
    out = []
    for p in paths:
        for raw in sources.read_jsonl(Path(p)):
            if raw.data and isinstance(raw.data.get("context"), str):
                out.append(Example(raw.data["context"], str(raw.data.get("target")), input_text(raw.data["context"]),
                                   raw.file, raw.line))
    return out


def _without(examples: list[Example], problems: list[Problem]) -> list[Example]:
    at = {(p.file, p.line) for p in problems}
    return [e for e in examples if (e.file, e.line) not in at]


def _train_rows(u: Unit, examples: list[Example], check: LengthCheck, seed: int) -> list[Example]:
    """The unit's train split as it will be trained on: sampled, then re-rendered. A sampled
    row longer than sequence_len is left out (and listed) rather than failing the run: a
    sample is not data the user asked for row by row."""
    if u.train_rows is not None and u.train_rows < len(examples):
        keep = set(random.Random(seed).sample(range(len(examples)), u.train_rows))
        examples = [e for i, e in enumerate(examples) if i in keep]  # source order kept
    if u.train_as is not None:
        fold = u.train_labels or (lambda s: s)
        examples = [replace(e, context=u.train_as.render({"text": e.text}), target=fold(e.target), n_tokens=None)
                    for e in examples]
        count_tokens(check, examples)
    if u.train_rows is not None:
        long = too_long(check, examples)
        if long:
            _say(f"{u.source}: {len(long)} sampled row(s) left out, longer than sequence_len {check.sequence_len}: "
                 + ", ".join(f"line {p.line}" for p in long))
            examples = _without(examples, long)
    return examples


def _merge_same_file(parts: list[Part]) -> list[Part]:
    """Parts of several units bound for one file (FPB and NWGI -> the CPU train file) become
    one part: the first unit's, with the others listed in `merged`."""
    def summary(p: Part) -> dict:
        task = p.unit.task.name + (f" as {p.task.name}" if p.task is not p.unit.task else "")
        return {"source": p.unit.source, "task": task, "rows": len(p.examples), "duplicates_removed": len(p.duplicates),
                "labels": {lab: sum(e.target == lab for e in p.examples) for lab in p.task.labels or ()}}

    out: dict[tuple[str, str], Part] = {}
    for p in parts:
        first = out.setdefault((p.split, p.name), p)
        if first is not p:
            if first.task.labels != p.task.labels:
                raise DataError(f"error: {p.split}/{p.name}: {first.unit.source} and {p.unit.source} have different "
                                f"label sets ({first.task.labels} vs {p.task.labels}); they cannot share a file")
            first.merged = (first.merged or [summary(first)]) + [summary(p)]
            first.examples = first.examples + p.examples
            first.duplicates = first.duplicates + p.duplicates
            first.skipped = first.skipped + p.skipped
    return list(out.values())


def build(units: list[Unit], opts: Options, link: tuple[str, str] | None = None) -> list[Part]:
    """Convert, validate, split, dedupe, check leakage, report, then write.

    `link` = (link name, target name) in train/: a symlink made after the files."""
    check: LengthCheck = load_length_check(opts.recipe, opts.token_check)
    if check.note:
        _say(f"warning: {check.note}")

    # 1. convert and validate every row of every source, in one pass
    converted, per_unit, problems = [], [], []
    for u in units:
        examples, probs = convert_all(u.task, u.mapping, u.rows)
        count_tokens(check, examples)
        converted.append(examples)
        per_unit.append(probs)
        problems += probs
        if u.latin1 is not None and u.latin1.latin1_lines:
            lines = u.latin1.latin1_lines
            _say(f"note: {u.source}: {len(lines)} line(s) not UTF-8, read as Latin-1 (lines {', '.join(map(str, lines[:10]))}"
                 f"{' ...' if len(lines) > 10 else ''})")
    bad_at = {(p.file, p.line) for p in problems}

    # 2. split, dedupe; the rows that go to training are checked against sequence_len (the
    # trainer's limit: evaluation has none), after any re-rendering, which changes their length
    parts: list[Part] = []
    for u, examples, skipped in zip(units, converted, per_unit):
        examples = [e for e in examples if (e.file, e.line) not in bad_at]
        if u.train_name and u.test_name:
            train, test = stratified_split(examples, u.test_fraction, opts.seed)
            splits = [(u.train_name, "train", train), (u.test_name, "test", test)]
        elif u.test_name:
            splits = [(u.test_name, "test", examples)]
        else:
            splits = [(u.train_name, "train", examples)]
        for i, (name, split, ex) in enumerate(splits):
            if split == "train":
                ex = _train_rows(u, ex, check, opts.seed)
                long = too_long(check, ex)
                problems += long
                skipped = sort_problems(skipped + long)
                ex = _without(ex, long)
            kept, dups = dedupe(ex)
            if u.keep_repeats:
                if dups:
                    _say(f"{name}: {len(dups)} repeated row(s) kept: the source repeats them on purpose")
                kept, dups = ex, []
            parts.append(Part(name, split, u, kept, dups, skipped if i == 0 else []))
            if dups:
                first = dups[0]
                _say(f"{name}: removed {len(dups)} duplicate row(s) (e.g. {first[0].where} repeats {first[1].where})")
    problems = sort_problems(problems)
    if problems and not opts.skip_bad:
        raise DataError("\n".join(
            [f"error: {len(problems)} bad row(s); nothing was written:"]
            + [f"  {p}" for p in problems]
            + ["fix them, or pass --skip-bad to leave these rows out (they will be listed)"]))
    if problems:
        _say(f"skipping {len(problems)} bad row(s) (--skip-bad):")
        for p in problems:
            _say(f"  {p}")

    # 3. leakage: no input text of a train file may appear in a test file
    tests = [e for p in parts if p.split == "test" for e in p.examples] + _load_against(opts.against)
    leaks = [pair for p in parts if p.split == "train" for pair in overlaps(p.examples, tests)]
    if leaks:
        lines = [f"  {a.where} (train) = {b.where} (test): {a.text[:70]!r}" for a, b in leaks[:MAX_LISTED]]
        if len(leaks) > MAX_LISTED:
            lines.append(f"  ... and {len(leaks) - MAX_LISTED} more")
        if opts.drop_overlap and not opts.allow_overlap:
            _say(f"{len(leaks)} train row(s) left out, their input is in a test file:")
            for line in lines:
                _say(line)
            leaked = {id(a) for a, _ in leaks}
            for p in parts:
                if p.split == "train":
                    p.left_out = [e.where for e in p.examples if id(e) in leaked]
                    p.examples = [e for e in p.examples if id(e) not in leaked]
        elif not opts.allow_overlap:
            raise DataError("\n".join(
                [f"error: {len(leaks)} train example(s) also in a test split (same text after folding case and "
                 "white space); nothing was written:"] + lines + ["pass --allow-overlap to write them anyway"]))
        else:
            _say(f"warning: {len(leaks)} train example(s) also in a test split (--allow-overlap):")
            for line in lines:
                _say(line)
    # Test files are shared by recipes (make eval reads data/test/<set>_test.jsonl): say when a
    # new one holds rows that a train file already there, and not rewritten now, trains on.
    written = {p.name for p in parts if p.split == "train"}
    if tests:
        for old in sorted((opts.out_dir / "train").glob("*.jsonl")):
            if old.name in written or not old.is_file():
                continue
            shared = overlaps(_load_against([old]), [e for p in parts if p.split == "test" for e in p.examples])
            if shared:
                _say(f"warning: {len(shared)} row(s) of the existing {_rel(old)} are in the test file(s) written now "
                     f"(e.g. {shared[0][1].where}); scores of an adapter trained on {old.name} on them are not held out")

    # 4. class balance: a small model trained for a few dozen steps on FPB's natural mix
    # (59% neutral) learns to answer "neutral" (measured: 112 of 205 held-out positives
    # and 59 of 92 negatives, 73.1%), and on equal counts it over-answers the small classes
    # (126 of 429 neutrals called positive, 71.9%). Square-root balancing sits between.
    for p in parts:
        if p.split == "train" and p.unit.balance and p.task.labels:
            p.before_balance = {lab: sum(e.target == lab for e in p.examples) for lab in p.task.labels}
            p.examples = oversample(p.examples, opts.seed, power=BALANCE_POWER)
            after = {lab: sum(e.target == lab for e in p.examples) for lab in p.task.labels}
            _say(f"{p.name}: square-root class balance by oversampling: "
                 + ", ".join(f"{k} {p.before_balance[k]} -> {after[k]}" for k in after))

    parts = _merge_same_file(parts)

    # 5. stats, printed before anything is written
    for p in parts:
        p.stats = stats.compute(p.examples, p.task.labels) | {
            "file": _rel(opts.out_dir / p.split / p.name),
            "split": p.split,
            "task": " + ".join(m["task"] for m in p.merged) if p.merged else p.unit.task.name,
            "source": " + ".join(m["source"] for m in p.merged) if p.merged else p.unit.source,
            "synthetic": p.unit.synthetic,
            "seed": opts.seed,
            "duplicates_removed": len(p.duplicates),
            "bad_rows_skipped": [str(x) for x in p.skipped],
            "train_test_overlap": len([1 for a, _ in leaks if any(a is e for e in p.examples)]) if p.split == "train" else None,
            "train_test_overlap_left_out": p.left_out or None,
            "tokenizer": str(check.tokenizer_path) if check.active else None,
            "sequence_len": check.sequence_len,
            "balanced_from": p.before_balance,
            "sources": p.merged or None,
        }
    _say(stats.table([(f"{p.split}/{p.name}" + ("  [SYNTHETIC]" if p.unit.synthetic else ""), p.stats) for p in parts]))

    # 6. write: tests first, then train, then the link, then the stats
    for p in sorted(parts, key=lambda p: p.split != "test"):
        write_examples(opts.out_dir / p.split / p.name, p.examples)
    if link is not None:
        atomic_symlink(opts.out_dir / "train" / link[0], link[1])
        _say(f"train/{link[0]} -> {link[1]}")
    for p in parts:
        write_json(opts.out_dir / "stats" / f"{Path(p.name).stem}.json", p.stats)
        if link is not None and p.name == link[1]:
            write_json(opts.out_dir / "stats" / f"{Path(link[0]).stem}.json", p.stats | {"symlink_to": link[1]})
    _say(f"wrote {len(parts)} file(s) under {_rel(opts.out_dir)}/ (stats in {_rel(opts.out_dir / 'stats')}/)")
    return parts


# --- the default: what recipes/smollm2_sentiment_r8.yml reads ------------------------------

def default_outputs() -> set[Path]:
    """The files the default recipe reads, as absolute paths, and each resolved (a
    symlink such as the synthetic fallback's also gives its target)."""
    cfg = recipes.load(recipes.resolve(recipes.DEFAULT_RECIPE))
    out: set[Path] = set()
    for d in cfg.get("datasets") or []:
        p = recipes.resolve_path(d["path"])
        out.add(Path(os.path.abspath(p)))
        out.add(p.resolve())
    return out


def _fpb_raw(src: Path) -> tuple[Path, str] | None:
    for rel, fmt in [("raw/financial_phrasebank_train.csv", "all-data-csv"), ("raw/all-data.csv", "all-data-csv"),
                     ("raw/Sentences_50Agree.txt", "fpb-txt")]:
        if (src / rel).is_file():
            return src / rel, fmt
    return None


def _fmt_mapping(fmt: str) -> Mapping:
    if fmt == "all-data-csv":
        return Mapping(text_col="content", label_col="label")
    if fmt == "fpb-txt":
        return Mapping(text_col="sentence", label_col="label")
    if fmt == "fiqa-json":
        return Mapping(text_col="sentence", label_col=None, score_col="sentiment_score", kind_col="type")
    if fmt == "finlora":
        return Mapping(finlora=True)
    return Mapping()


def _nwgi_unit(task: Task, mapping: Mapping, rows: Iterable[RawRow], source: str) -> Unit:
    """NWGI: our own seeded 20% test split, kept in FinLoRA's seven-level form, and
    NWGI_TRAIN_ROWS of the rest in the CPU train file as 3-class news sentiment. FPB alone
    teaches FPB's convention, where a sentence needs a clear reason to be anything but
    neutral (59% neutral); NWGI's news and FiQA's posts call mild news positive or
    negative (12% and 8% neutral), and the adapter trained on FPB alone answered
    "neutral" to 145 of 215 positive and negative FiQA rows."""
    return Unit(task, mapping, rows, source, DEFAULT_TRAIN, "nwgi_test.jsonl", TEST_FRACTION,
                train_as=TASKS["sentiment"], train_labels=fold_nwgi, train_rows=NWGI_TRAIN_ROWS)


def units_from_dir(src: Path) -> list[Unit]:
    """FPB train/test (our own seeded, stratified 20% split), NWGI likewise (see
    _nwgi_unit), and FinLoRA's FiQA and TFNS test files (TFNS with its positive/neutral
    swap repaired)."""
    src = Path(src)
    fpb = _fpb_raw(src)
    if fpb is None:
        raise DataError(f"error: {src}: no Financial PhraseBank file; expected raw/financial_phrasebank_train.csv, "
                        "raw/all-data.csv or raw/Sentences_50Agree.txt")
    info = sources.SourceInfo()
    units = [Unit(TASKS["fpb"], _fmt_mapping(fpb[1]), sources.read(fpb[1], fpb[0], info), _rel(fpb[0]),
                  DEFAULT_TRAIN, "fpb_test.jsonl", TEST_FRACTION, latin1=info, balance=True)]
    for name, fix in [("fiqa", None), ("tfns", "tfns-swap")]:
        p = src / "finlora" / "test" / f"{name}_test.jsonl"
        if not p.is_file():
            _say(f"note: {_rel(p)} not found: data/test/{name}_test.jsonl not written")
            continue
        m = Mapping(finlora=True, swap=FIXES[fix] if fix else None)
        units.append(Unit(TASKS[name], m, sources.read("finlora", p), _rel(p) + (f" (--fix {fix})" if fix else ""),
                          test_name=f"{name}_test.jsonl"))
    nwgi = src / "finlora" / "test" / "nwgi_test.jsonl"
    if nwgi.is_file():
        units.append(_nwgi_unit(TASKS["nwgi"], Mapping(finlora=True), sources.read("finlora", nwgi), _rel(nwgi)))
    else:
        _say(f"note: {_rel(nwgi)} not found: the train file is FPB alone, data/test/nwgi_test.jsonl not written")
    return units


def hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_dataset(hub, split: str):
    """One split of a registry hub source as a `datasets.Dataset` (DataError when it cannot
    be loaded: offline, missing, renamed)."""
    files = dict(hub.data_files)
    if hub.data_files and split not in files:
        raise DataError(f"error: hf:{hub.where}: the registry names no file for split {split!r}")
    try:
        return sources.load_hf(hub.name, hub.config, split, data_files={split: files[split]} if files else None,
                               revision=hub.revision)
    except Exception as e:  # noqa: BLE001 - one clear message, whatever datasets raised
        raise DataError(f"error: cannot load hf:{hub.where}[{split}]: {type(e).__name__}: {str(e)[:300]}") from None


def _hub_rows(hub, split: str) -> list[RawRow]:
    """All rows of one split of a registry hub source."""
    return list(sources.hf_rows(_hub_dataset(hub, split), f"hf:{hub.where}[{split}]"))


def _hub_mapping(task: Task) -> Mapping:
    h = task.hub
    if h.finlora_rows:
        return Mapping(finlora=True)
    return Mapping(text_col=h.text_col, label_col=h.label_col, score_col=h.score_col, kind_col=h.kind_col,
                   fields=dict(h.fields), label_map=LABEL_MAPS.get(h.label_map) if h.label_map else None)


def units_from_hub() -> list[Unit]:
    fpb, fiqa, tfns, nwgi = TASKS["fpb"], TASKS["fiqa"], TASKS["tfns"], TASKS["nwgi"]
    return [
        Unit(fpb, _hub_mapping(fpb), _hub_rows(fpb.hub, "train"), f"hf:{fpb.hub.where}[train]",
             DEFAULT_TRAIN, "fpb_test.jsonl", TEST_FRACTION, balance=True),
        Unit(fiqa, _hub_mapping(fiqa), _hub_rows(fiqa.hub, "test"), f"hf:{fiqa.hub.where}[test]",
             test_name="fiqa_test.jsonl"),
        Unit(tfns, _hub_mapping(tfns), _hub_rows(tfns.hub, "validation"), f"hf:{tfns.hub.where}[validation]",
             test_name="tfns_test.jsonl"),
        _nwgi_unit(nwgi, _hub_mapping(nwgi), _hub_rows(nwgi.hub, "test"), f"hf:{nwgi.hub.where}[test]"),
    ]


def units_synthetic(seed: int = SEED) -> list[Unit]:
    rows = [RawRow("synthetic", i, r) for i, r in enumerate(synthetic.generate(300, seed), start=1)]
    return [Unit(TASKS["sentiment"], Mapping(), rows, "synthetic (finlora.data.synthetic, templated headlines)",
                 SYNTHETIC_TRAIN, SYNTHETIC_TEST, TEST_FRACTION, synthetic=True)]


def prepare_default(src: str | Path | None = None, *, out_dir: str | Path | None = None, seed: int = SEED,
                    recipe: str | None = None, skip_bad: bool = False, allow_overlap: bool = False,
                    hub: bool = False, synthetic: bool = False) -> None:
    """Prepare what the default recipe reads, from (first that applies): `synthetic` (the
    generated smoke-test set, only when asked); `src` or $FINLORA_DATA_SRC; the hub when
    `hub`; else the real files shipped in data/sources/ (offline, no network attempt).
    Raises DataError when the input is bad or missing."""
    opts = Options(out_dir=Path(out_dir) if out_dir else DATA_DIR, recipe=recipe, seed=seed,
                   skip_bad=skip_bad, allow_overlap=allow_overlap)
    if synthetic:
        bar = "=" * 78
        _say(f"{bar}\nSYNTHETIC DATA (asked for): writing a small generated sentiment set ({SYNTHETIC_TRAIN}).\n"
             f"It is invented, templated text for smoke tests, not real financial data.\n{bar}")
        build(units_synthetic(seed), opts, link=(DEFAULT_TRAIN, SYNTHETIC_TRAIN))
        _say(f"SYNTHETIC: train/{DEFAULT_TRAIN} is a symlink to {SYNTHETIC_TRAIN}")
        return
    src = src or os.environ.get(ENV_SRC) or None
    if src:
        _say(f"data: source {src} (local directory)")
        build(units_from_dir(Path(src)), opts)
        return
    if hub:
        _say("data: source Hugging Face hub")
        build(units_from_hub(), opts)
        return
    missing = [p for p in SHIPPED_FILES if not (SHIPPED / p).is_file()]
    if missing:
        raise DataError(f"error: the data shipped with the repository is missing ({', '.join(_rel(SHIPPED / p) for p in missing)}); "
                        "restore it (git checkout -- data/sources), or give SRC=dir, HUB=1 or SYNTHETIC=1")
    _say(f"data: source {_rel(SHIPPED)} (shipped with the repository; see data/README.md)")
    build(units_from_dir(SHIPPED), opts)


# --- the CLI ---------------------------------------------------------------------------------

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
        _say(f"{t.name:13} {t.family:10} {labels[:48]:48} {hub}")
        if t.notes:
            _say(f"{'':13} {t.notes}")


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
        m = _hub_mapping(task)
        m.swap = swap
        h = task.hub
        units = []
        if h.train_split:
            names = split_names if (h.test_split is None and a.test_fraction) else {"train_name": f"{name}_train.jsonl"}
            units.append(Unit(task, m, _hub_rows(h, h.train_split), f"hf:{h.where}[{h.train_split}]", **names))
        if h.test_split:
            units.append(Unit(task, m, _hub_rows(h, h.test_split), f"hf:{h.where}[{h.test_split}]",
                              test_name=f"{name}_test.jsonl"))
        return units

    if not a.input:
        p.error("--task needs --input FILE (or --hub)")
    fmt = a.format or sources.guess_format(a.input[0])
    if fmt == "jsonl" and not (a.text_col or a.label_col or a.score_col):
        fmt = "finlora"
    m = _fmt_mapping(fmt)
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


def prepare_task(task: str, src: str | Path | None, *, hub: bool = False, out_dir: Path = DATA_DIR,
                 recipe: str | None = None, seed: int = SEED, skip_bad: bool = False, allow_overlap: bool = False,
                 token_check: bool = True, against: list[Path] | None = None) -> list[Part]:
    """The files recipe task `task` trains on and `make eval` scores it on (finlora.data.recipe_data)."""
    from finlora.data import recipe_data

    src = src or os.environ.get(ENV_SRC) or None
    use_hub = hub or (src is None and hub_reachable())
    said = [f"source {src} (local directory)" if src else "", "the hub" if use_hub else ""]
    _say(f"data: task {task}: " + (", then ".join(filter(None, said))
                                    or "no local folder (SRC), and the hub is not reachable (or HF_HUB_OFFLINE is set)"))
    opts = Options(out_dir=out_dir, recipe=recipe or f"{task}_r8", seed=seed, skip_bad=skip_bad,
                   allow_overlap=allow_overlap, token_check=token_check, against=against or [], drop_overlap=True)
    return build(recipe_data.units(task, Path(src) if src else None, use_hub), opts)


def main(argv: list[str] | None = None) -> int:
    from finlora.data import recipe_data
    from finlora.data.tasks import RECIPE_TASKS

    p = _parser()
    a = p.parse_args(argv)
    if a.list_tasks:
        _list_tasks()
        return 0
    try:
        common = dict(seed=a.seed, skip_bad=a.skip_bad, allow_overlap=a.allow_overlap)
        if a.task is None:
            if a.input:
                p.error("--input needs --task")
            task = recipe_data.task_of_recipe(a.recipe) if a.recipe else None
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
    except DataError as e:
        print(e.message, file=sys.stderr, flush=True)
        return 1
    except (sources.SourceError, recipes.RecipeError) as e:
        print(e.code if isinstance(e.code, str) else e, file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
