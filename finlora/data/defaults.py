"""What the CPU default (recipes/smollm2_sentiment_r8.yml) trains on and is scored on.

`make data` without RECIPE/TASK: FPB split 80/20 (seeded, stratified, square-root class
balanced) into the train file and the held-out set `fpb_heldout`; NWGI split likewise into
`nwgi_heldout` (FinLoRA's seven levels) and a sample of its other rows added to the train file
as 3-class news sentiment; FinLoRA's FiQA and TFNS test files as published. From the real
files shipped in data/sources/ (offline), a local copy (SRC), or the hub (HUB=1). SYNTHETIC=1:
the generated smoke-test set. The rows then go through finlora.data.pipeline.build.

The CPU default is never scored on FinLoRA's own NWGI test file: 600 of its rows are in the
train file. Its sets are the registry's `sentiment_cpu` (finlora.data.tasks).
"""

from __future__ import annotations

import os
from pathlib import Path

from finlora import recipes
from finlora.data import sources, synthetic
from finlora.data.convert import Mapping
from finlora.data.pipeline import DATA_DIR, SEED, Options, Unit, build, say
from finlora.data.sources import RawRow
from finlora.data.tasks import TASKS, TEST_SETS, fold_nwgi
from finlora.errors import DataError
from finlora.recipes import rel

# The real files the default trains and is scored on, shipped as published (data/README.md),
# laid out as a SRC folder.
SHIPPED = DATA_DIR / "sources"
SHIPPED_FILES = ("raw/financial_phrasebank_train.csv", "finlora/test/nwgi_test.jsonl",
                 "finlora/test/fiqa_test.jsonl", "finlora/test/tfns_test.jsonl")
PUBLISHED = ("fiqa", "tfns")  # FinLoRA's test files the default is scored on as published
DEFAULT_TRAIN = "sentiment_cpu_train.jsonl"
SYNTHETIC_TRAIN = "synthetic_sentiment_train.jsonl"
SYNTHETIC_TEST = "synthetic_sentiment_test.jsonl"
ENV_SRC = "FINLORA_DATA_SRC"
TEST_FRACTION = 0.2
NWGI_TRAIN_ROWS = 600  # NWGI rows added to the FPB training file (of ~3,240 in our 80% split)


def default_outputs() -> set[Path]:
    """The files the default recipe reads, as absolute paths, and each resolved (a
    symlink such as the synthetic fallback's also gives its target)."""
    out: set[Path] = set()
    for d in recipes.Recipe.open(recipes.DEFAULT_RECIPE).get("datasets") or []:
        p = recipes.resolve_path(d["path"])
        out.add(Path(os.path.abspath(p)))
        out.add(p.resolve())
    return out


def _fpb_raw(src: Path) -> tuple[Path, str] | None:
    for name, fmt in [("raw/financial_phrasebank_train.csv", "all-data-csv"), ("raw/all-data.csv", "all-data-csv"),
                      ("raw/Sentences_50Agree.txt", "fpb-txt")]:
        if (src / name).is_file():
            return src / name, fmt
    return None


def _nwgi_split() -> dict:
    """NWGI: our own seeded 20% test split, kept in FinLoRA's seven-level form, and
    NWGI_TRAIN_ROWS of the rest in the CPU train file as 3-class news sentiment. FPB alone
    teaches FPB's convention, where a sentence needs a clear reason to be anything but
    neutral (59% neutral); NWGI's news and FiQA's posts call mild news positive or
    negative (12% and 8% neutral), and the adapter trained on FPB alone answered
    "neutral" to 145 of 215 positive and negative FiQA rows."""
    return dict(train_name=DEFAULT_TRAIN, test_name=TEST_SETS["nwgi_heldout"].file, test_fraction=TEST_FRACTION,
                train_as=TASKS["sentiment"], train_labels=fold_nwgi, train_rows=NWGI_TRAIN_ROWS)


def units_from_dir(src: Path) -> tuple[list[Unit], list[tuple[str, Path]]]:
    """(FPB and NWGI, each split into train rows and our held-out set; FinLoRA's FiQA and TFNS
    test files to write as published, as (set name, verified path))."""
    from finlora.data.recipe_data import locate, verified

    src = Path(src)
    if not src.is_dir():
        raise DataError(f"SRC={src}: no such folder")
    fpb = _fpb_raw(src)
    if fpb is None:
        raise DataError(f"{src}: no Financial PhraseBank file; expected raw/financial_phrasebank_train.csv, "
                        "raw/all-data.csv or raw/Sentences_50Agree.txt")
    info = sources.SourceInfo()
    units = [Unit(TASKS["fpb"], Mapping.of_format(fpb[1]), sources.read(fpb[1], fpb[0], info), rel(fpb[0]),
                  DEFAULT_TRAIN, TEST_SETS["fpb_heldout"].file, TEST_FRACTION, latin1=info, balance=True)]
    published = []
    for name in PUBLISHED:
        s = TEST_SETS[name]
        p = locate(s.source, src)
        if p is None:
            say(f"note: {src}/finlora/{s.source.path} not found: data/test/{s.file} not written")
            continue
        published.append((name, verified(s.source, p)))
    nwgi = locate(TEST_SETS["nwgi"].source, src)
    if nwgi is not None:
        units.append(Unit.from_finlora(TASKS["nwgi"], nwgi, **_nwgi_split()))
    else:
        say(f"note: {src}/finlora/test/nwgi_test.jsonl not found: the train file is FPB alone, "
            f"data/test/{TEST_SETS['nwgi_heldout'].file} not written")
    return units, published


def units_from_hub() -> list[Unit]:
    """The same sets read from the hub (FiQA and TFNS converted from their original hub sets)."""
    return [Unit.from_hub(TASKS["fpb"], "train", train_name=DEFAULT_TRAIN, test_name=TEST_SETS["fpb_heldout"].file,
                          test_fraction=TEST_FRACTION, balance=True),
            Unit.from_hub(TASKS["fiqa"], "test", test_name=TEST_SETS["fiqa"].file),
            Unit.from_hub(TASKS["tfns"], "validation", test_name=TEST_SETS["tfns"].file),
            Unit.from_hub(TASKS["nwgi"], "test", **_nwgi_split())]


def _build_dir(src: Path, opts: Options) -> None:
    from finlora.data.recipe_data import write_published

    units, published = units_from_dir(src)
    for name, path in published:
        write_published(TEST_SETS[name], path, opts.out_dir, rel(path))
        say(f"data: test/{TEST_SETS[name].file}: FinLoRA's file as published ({rel(path)}, sha256 checked)")
    opts.against = [opts.out_dir / "test" / TEST_SETS[name].file for name, _ in published]
    build(units, opts)


def units_synthetic(seed: int = SEED) -> list[Unit]:
    rows = [RawRow("synthetic", i, r) for i, r in enumerate(synthetic.generate(300, seed), start=1)]
    return [Unit(TASKS["sentiment"], Mapping(), rows, "synthetic (finlora.data.synthetic, templated headlines)",
                 SYNTHETIC_TRAIN, SYNTHETIC_TEST, TEST_FRACTION, synthetic=True)]


def prepare_default(src: str | Path | None = None, *, out_dir: str | Path | None = None, seed: int = SEED,
                    recipe=None, skip_bad: bool = False, allow_overlap: bool = False,
                    hub: bool = False, synthetic: bool = False) -> None:
    """Prepare what the default recipe reads, from (first that applies): `synthetic` (the
    generated smoke-test set, only when asked); `src` or $FINLORA_DATA_SRC; the hub when
    `hub`; else the real files shipped in data/sources/ (offline, no network attempt).
    Raises DataError when the input is bad or missing."""
    opts = Options(out_dir=Path(out_dir) if out_dir else DATA_DIR, recipe=recipe, seed=seed,
                   skip_bad=skip_bad, allow_overlap=allow_overlap)
    if synthetic:
        bar = "=" * 78
        say(f"{bar}\nSYNTHETIC DATA (asked for): writing a small generated sentiment set ({SYNTHETIC_TRAIN}).\n"
            f"It is invented, templated text for smoke tests, not real financial data.\n{bar}")
        build(units_synthetic(seed), opts, link=(DEFAULT_TRAIN, SYNTHETIC_TRAIN))
        say(f"SYNTHETIC: train/{DEFAULT_TRAIN} is a symlink to {SYNTHETIC_TRAIN}")
        return
    src = src or os.environ.get(ENV_SRC) or None
    if src:
        say(f"data: source {src} (local directory)")
        _build_dir(Path(src), opts)
        return
    if hub:
        say("data: source Hugging Face hub")
        build(units_from_hub(), opts)
        return
    missing = [p for p in SHIPPED_FILES if not (SHIPPED / p).is_file()]
    if missing:
        raise DataError(f"the data shipped with the repository is missing ({', '.join(rel(SHIPPED / p) for p in missing)}); "
                        "restore it (git checkout -- data/sources), or give SRC=dir, HUB=1 or SYNTHETIC=1")
    say(f"data: source {rel(SHIPPED)} (shipped with the repository; see data/README.md)")
    _build_dir(SHIPPED, opts)
