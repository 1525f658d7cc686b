"""The pipeline of `make data`: sources in, validated FinLoRA JSONL out, in one order.

`build` converts and validates every row of every `Unit` (a source bound for a train file, a
test file, or both), splits, removes duplicates, checks train/test leakage, balances classes
where asked, prints the stats, and only then writes, tests first, each file renamed into place.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

from finlora.cli import flag
from finlora import ROOT
from finlora.atomic import atomic_open, write_json, write_jsonl
from finlora.data import sources, stats
from finlora.data.convert import Example, Mapping, Problem, input_text
from finlora.data.sources import RawRow, say
from finlora.data.split import dedupe, overlaps, oversample, stratified_split
from finlora.data.tasks import FinLoRAFile, Task, TestSet
from finlora.data.validate import LengthCheck, convert_all, count_tokens, load_length_check, too_long
from finlora.errors import DataError, RefusedError
from finlora.recipes import Recipe, rel

DATA_DIR = ROOT / "data"
SEED = 42
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
    balance: bool = False  # oversample the train split by class (after dedupe and leakage checks)
    # The train split's rows re-rendered as this task, their labels through `train_labels`
    # (NWGI trains as 3-class news sentiment: FPB's wording, levels folded as FinLoRA scores them).
    train_as: Task | None = None
    train_labels: Callable[[str], str] | None = None
    train_rows: int | None = None  # a seeded sample of this many train rows (the rest is not used)
    keep_repeats: bool = False  # repeated rows are the source's own oversampling: counted, not removed

    @classmethod
    def from_hub(cls, task: Task, split: str, **kw) -> "Unit":
        """One split of the task's registry source (`task.hub`), read through `datasets`."""
        return cls(task, replace(task.hub.columns), sources.hub_rows(task.hub, split), f"hf:{task.hub.where}[{split}]",
                   **kw)

    @classmethod
    def from_finlora(cls, task: Task, path: Path, **kw) -> "Unit":
        """A FinLoRA `{"context", "target"}` JSONL file."""
        return cls(task, Mapping(finlora=True), sources.read("finlora", path), rel(path), **kw)


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
    recipe: "Recipe | None" = None  # whose tokenizer and sequence_len bound the rows (None: the CPU default)
    seed: int = SEED
    skip_bad: bool = False
    allow_overlap: bool = False
    token_check: bool = True
    against: list[Path] = field(default_factory=list)  # extra test files to check leakage against
    # Leave train rows whose input is in a test file out (listed) instead of failing: for
    # published train/test pairs (FinLoRA's xbrl_term shares 2 of 5,856 terms with its test).
    drop_overlap: bool = False
    # FinLoRA's test files to copy as published (verified by the caller): written in step 6 with
    # the rest, so a run that fails a check leaves none of them behind
    published: list[tuple[TestSet, Path]] = field(default_factory=list)


def write_examples(path: Path, examples: Iterable[Example]) -> int:
    """UTF-8, LF, one `{"context", "target"}` per line; temp file then rename."""
    return write_jsonl(path, ({"context": e.context, "target": e.target} for e in examples))


def not_ours(out_dir: Path, split: str, name: str) -> str | None:
    """Why `out_dir/split/name` may not be replaced, or None: a file is replaced only when it is
    absent or `make data` wrote it (its stats file, or its `.source.json`, is beside it)."""
    dest = out_dir / split / name
    stem = Path(name).stem
    if not (dest.exists() or dest.is_symlink()) or (out_dir / "stats" / f"{stem}.json").is_file() \
            or dest.with_name(f"{stem}.source.json").is_file():
        return None
    return (f"{dest} exists and `make data` did not write it (no {out_dir.name}/stats/{stem}.json beside it); "
            "nothing was written: move it away, or choose another --out-dir")


def content_hash(f: FinLoRAFile, path: Path) -> tuple[str, str, str]:
    """(kind, hash of the file at `path`, the registry's) for the strongest hash recorded."""
    h = hashlib.sha256() if f.sha256 else hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        hashlib.file_digest(fh, lambda: h)
    return ("sha256", h.hexdigest(), f.sha256) if f.sha256 else ("git blob id", h.hexdigest(), f.blob)


def write_published(s: TestSet, path: Path, out_dir: Path) -> None:
    """A test set's file as published, byte for byte, `<name>.source.json` beside it."""
    dest = out_dir / "test" / s.file
    with open(path, "rb") as src, atomic_open(dest, "wb", encoding=None) as out:
        shutil.copyfileobj(src, out)
    kind, digest, _ = content_hash(s.source, dest)
    write_json(dest.with_name(dest.name.removesuffix(".jsonl") + ".source.json"), {
        "set": s.name, "file": s.file, "rows": sum(1 for line in dest.open("rb") if line.strip()),
        "source": f"{s.source.url}", "read_from": rel(path), "commit": s.source.commit, kind.replace(" ", "_"): digest,
        "licence": s.licence, "as_published": True})
    say(f"data: test/{s.file}: FinLoRA's file as published ({rel(path)}, {s.source.commit[:7]}), licence {s.licence}")


def atomic_symlink(link: Path, target: str) -> None:
    """Point `link` at `target` (relative): a temporary link renamed over it."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link.tmp")
    tmp.unlink(missing_ok=True)
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
            say(f"{u.source}: {len(long)} sampled row(s) left out, longer than sequence_len {check.sequence_len}: "
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
                raise DataError(f"{p.split}/{p.name}: {first.unit.source} and {p.unit.source} have different "
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
        say(f"warning: {check.note}")

    # 1. convert and validate every row of every source, in one pass
    converted = [convert_all(u.task, u.mapping, u.rows) for u in units]
    problems = [p for _, probs in converted for p in probs]

    # 2. split, dedupe; the rows that go to training are checked against sequence_len (the
    # trainer's limit: evaluation has none), after any re-rendering, which changes their length
    parts: list[Part] = []
    for u, (examples, skipped) in zip(units, converted):
        count_tokens(check, examples)
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
                skipped = sorted(skipped + long)
                ex = _without(ex, long)
            # a file several units write (FPB and NWGI -> the CPU train file) holds a row once too
            base = dedupe([e for q in parts if (q.split, q.name) == (split, name) for e in q.examples])[0]
            kept, dups = dedupe(base + ex)
            kept = kept[len(base):]
            if u.keep_repeats:
                if dups:
                    say(f"{name}: {len(dups)} repeated row(s) kept: the source repeats them on purpose")
                kept, dups = ex, []
            parts.append(Part(name, split, u, kept, dups, skipped if i == 0 else []))
            if dups:
                first = dups[0]
                say(f"{name}: removed {len(dups)} duplicate row(s) (e.g. {first[0].where} repeats {first[1].where})")
    problems = sorted(problems)
    if problems and not opts.skip_bad:
        raise DataError("\n".join(
            [f"{len(problems)} bad row(s); nothing was written:"]
            + [f"  {p}" for p in problems]
            + [f"fix them, or add {flag('--skip-bad')} to leave these rows out (they will be listed)"]))
    if problems:
        say("\n".join([f"skipping {len(problems)} bad row(s) (--skip-bad):"] + [f"  {p}" for p in problems]))

    # 3. leakage: no input text of a train file may appear in a test file
    tests = [e for p in parts if p.split == "test" for e in p.examples] \
        + _load_against(opts.against + [path for _, path in opts.published])
    leaks = [pair for p in parts if p.split == "train" for pair in overlaps(p.examples, tests)]
    if leaks:
        lines = [f"  {a.where} (train) = {b.where} (test): {a.text[:70]!r}" for a, b in leaks[:MAX_LISTED]]
        if len(leaks) > MAX_LISTED:
            lines.append(f"  ... and {len(leaks) - MAX_LISTED} more")
        if opts.allow_overlap:
            say("\n".join([f"warning: {len(leaks)} train example(s) also in a test split (--allow-overlap):"] + lines))
        elif opts.drop_overlap:
            say("\n".join([f"{len(leaks)} train row(s) left out, their input is in a test file:"] + lines))
            leaked = {id(a) for a, _ in leaks}
            for p in parts:
                if p.split == "train":
                    p.left_out = [e.where for e in p.examples if id(e) in leaked]
                    p.examples = [e for e in p.examples if id(e) not in leaked]
        else:
            raise DataError("\n".join(
                [f"{len(leaks)} train example(s) also in a test split (same text after folding case and "
                 "white space); nothing was written:"] + lines + [f"add {flag('--allow-overlap')} to write them anyway"]))
    # Test files are shared by recipes (make eval reads data/test/<set>_test.jsonl) and a task is
    # scored on its own sets only: rows shared with files already there, not rewritten now, warn.
    new = {"train": [e for p in parts if p.split == "train" for e in p.examples], "test": tests}
    written = {(p.split, p.name) for p in parts} | {("test", s.file) for s, _ in opts.published}
    for split, other in (("train", "test"), ("test", "train")):
        for old in sorted((opts.out_dir / split).glob("*.jsonl")) if new[other] else ():
            if (split, old.name) in written or not old.is_file():
                continue
            shared = overlaps(_load_against([old]), new[other])
            if shared:
                say(f"warning: {len(shared)} row(s) of the existing {rel(old)} are in the {other} file(s) written now "
                    f"(e.g. {shared[0][1].where}); scores on them are not held out")

    # 4. class balance: on FPB's natural mix (59% neutral) a small model learns to answer "neutral",
    # on equal counts it over-answers the small classes; square-root sits between (docs/RESULTS.md)
    for p in parts:
        if p.split == "train" and p.unit.balance and p.task.labels:
            p.before_balance = {lab: sum(e.target == lab for e in p.examples) for lab in p.task.labels}
            p.examples = oversample(p.examples, opts.seed, power=BALANCE_POWER)
            after = {lab: sum(e.target == lab for e in p.examples) for lab in p.task.labels}
            say(f"{p.name}: square-root class balance by oversampling: "
                + ", ".join(f"{k} {p.before_balance[k]} -> {after[k]}" for k in after))

    parts = _merge_same_file(parts)

    # 5. stats, printed before anything is written
    for p in parts:
        p.stats = stats.compute(p.examples, p.task.labels) | {
            "file": rel(opts.out_dir / p.split / p.name),
            "split": p.split,
            "task": " + ".join(m["task"] for m in p.merged) if p.merged else p.unit.task.name,
            "source": " + ".join(m["source"] for m in p.merged) if p.merged else p.unit.source,
            "synthetic": p.unit.synthetic,
            "seed": opts.seed,
            "duplicates_removed": len(p.duplicates),
            "bad_rows_skipped": [str(x) for x in p.skipped],
            "train_test_overlap": len([1 for a, _ in leaks if any(a is e for e in p.examples)]) if p.split == "train" else None,
            "train_test_overlap_left_out": p.left_out or None,
            "tokenizer": check.where if check.active else None,
            "sequence_len": check.sequence_len,
            "balanced_from": p.before_balance,
            "sources": p.merged or None,
        }
    say(stats.table([(f"{p.split}/{p.name}" + ("  [SYNTHETIC]" if p.unit.synthetic else ""), p.stats) for p in parts]))

    # 6. write: tests first, then train, then the link, then the stats; nothing a user put there is replaced
    refused = [why for split, name in sorted(written) if (why := not_ours(opts.out_dir, split, name))]
    if link is not None and (why := not_ours(opts.out_dir, "train", link[0])):
        refused.append(why)
    if refused:
        raise RefusedError("\n".join(refused))
    for s, path in opts.published:
        write_published(s, path, opts.out_dir)
    for p in sorted(parts, key=lambda p: p.split != "test"):
        write_examples(opts.out_dir / p.split / p.name, p.examples)
    if link is not None:
        atomic_symlink(opts.out_dir / "train" / link[0], link[1])
        say(f"train/{link[0]} -> {link[1]}")
    for p in parts:
        write_json(opts.out_dir / "stats" / f"{Path(p.name).stem}.json", p.stats)
        if link is not None and p.name == link[1]:
            write_json(opts.out_dir / "stats" / f"{Path(link[0]).stem}.json", p.stats | {"symlink_to": link[1]})
    say(f"wrote {len(parts) + len(opts.published)} file(s) under {rel(opts.out_dir)}/ (stats in {rel(opts.out_dir / 'stats')}/)")
    return parts
