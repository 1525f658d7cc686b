"""What the CPU default (recipes/smollm2_sentiment_r8.yml) trains on and is scored on: `make data`
without RECIPE/TASK (docs/DATA.md says what each file holds, and from which source).

The CPU default is never scored on FinLoRA's own NWGI test file: 600 of its rows are in the
train file. Its sets are the registry's `sentiment_cpu` (finlora.data.tasks).
"""

from __future__ import annotations

import os
from pathlib import Path

from finlora import recipes
from finlora.data import sources
from finlora.data.convert import Mapping
from finlora.data.pipeline import DATA_DIR, Options, Unit, build
from finlora.data.recipe_data import locate, source_folder, verified
from finlora.data.sources import RawRow, say
from finlora.data.synthetic import generate
from finlora.data.tasks import FIXES, TASKS, TEST_SETS, fold_nwgi
from finlora.errors import DataError
from finlora.recipes import rel

# The real files the default trains and is scored on, shipped as published (data/README.md),
# laid out as a SRC folder.
SHIPPED = DATA_DIR / "sources"
SHIPPED_FILES = ("raw/financial_phrasebank_train.csv", "finlora/test/nwgi_test.jsonl",
                 "finlora/test/fiqa_test.jsonl", "finlora/test/tfns_test.jsonl")
FPB_FILES = (("raw/financial_phrasebank_train.csv", "all-data-csv"), ("raw/all-data.csv", "all-data-csv"),
             ("raw/Sentences_50Agree.txt", "fpb-txt"))  # the first found in a SRC folder
PUBLISHED = ("fiqa", "tfns")  # FinLoRA's test files the default is scored on as published
DEFAULT_TRAIN = "sentiment_cpu_train.jsonl"
SYNTHETIC_TRAIN = "synthetic_sentiment_train.jsonl"
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


def _nwgi_split() -> dict:
    """NWGI: our own seeded 20% test split, kept in FinLoRA's seven-level form, and
    NWGI_TRAIN_ROWS of the rest in the CPU train file as 3-class news sentiment (why: docs/DATA.md,
    and the runs in docs/RESULTS.md)."""
    return dict(train_name=DEFAULT_TRAIN, test_name=TEST_SETS["nwgi_heldout"].file, test_fraction=TEST_FRACTION,
                train_as=TASKS["sentiment"], train_labels=fold_nwgi, train_rows=NWGI_TRAIN_ROWS)


def _build_dir(src: Path, opts: Options) -> None:
    """FPB and NWGI from a SRC folder, each split into train rows and our held-out set, and
    FinLoRA's FiQA and TFNS test files as published."""
    fpb = next(((src / name, fmt) for name, fmt in FPB_FILES if (src / name).is_file()), None)
    if fpb is None:
        raise DataError(f"{src}: no Financial PhraseBank file; expected {' or '.join(n for n, _ in FPB_FILES)}")
    units = [Unit(TASKS["fpb"], Mapping.of_format(fpb[1]), sources.read(fpb[1], fpb[0]), rel(fpb[0]),
                  DEFAULT_TRAIN, TEST_SETS["fpb_heldout"].file, TEST_FRACTION, balance=True)]
    nwgi = locate(TEST_SETS["nwgi"].source, src)
    if nwgi is not None:
        units.append(Unit.from_finlora(TASKS["nwgi"], verified(TEST_SETS["nwgi"].source, nwgi), **_nwgi_split()))
    else:
        say(f"note: {src}/finlora/test/nwgi_test.jsonl not found: the train file is FPB alone, "
            f"data/test/{TEST_SETS['nwgi_heldout'].file} not written")
    for s in (TEST_SETS[name] for name in PUBLISHED):
        if (p := locate(s.source, src)) is None:
            say(f"note: {src}/finlora/{s.source.path} not found: data/test/{s.file} not written")
        else:
            opts.published.append((s, verified(s.source, p)))
    build(units, opts)


def prepare_default(src: str | Path | None = None, *, hub: bool = False, synthetic: bool = False,
                    **options) -> None:
    """Prepare what the default recipe reads, from (first that applies): `synthetic` (the
    generated smoke-test set, only when asked); `src` or $FINLORA_DATA_SRC; the hub when
    `hub`; else the real files shipped in data/sources/ (offline, no network attempt).
    `options` are the pipeline's `Options`. Raises DataError when the input is bad or missing."""
    opts = Options(**options)
    if synthetic:
        bar = "=" * 78
        say(f"{bar}\nSYNTHETIC DATA (asked for): writing a small generated sentiment set ({SYNTHETIC_TRAIN}).\n"
            f"It is invented, templated text for smoke tests, not real financial data.\n{bar}")
        rows = [RawRow("synthetic", i, r) for i, r in enumerate(generate(300, opts.seed), start=1)]
        build([Unit(TASKS["sentiment"], Mapping(), rows, "synthetic (finlora.data.synthetic, templated headlines)",
                    SYNTHETIC_TRAIN, "synthetic_sentiment_test.jsonl", TEST_FRACTION, synthetic=True)],
              opts, link=(DEFAULT_TRAIN, SYNTHETIC_TRAIN))
        say(f"SYNTHETIC: train/{DEFAULT_TRAIN} is a symlink to {SYNTHETIC_TRAIN}")
        return
    src = source_folder(src)
    if src:
        say(f"data: source {src} (local directory)")
        _build_dir(src, opts)
    elif hub:
        say("data: source Hugging Face hub")
        tfns = Unit.from_hub(TASKS["tfns"], "validation", test_name=TEST_SETS["tfns"].file)
        # make eval reads tfns_test.jsonl as FinLoRA's file, whose swap its strict block repairs: label it so
        tfns.mapping.swap, tfns.source = FIXES[TEST_SETS["tfns"].fix], f"{tfns.source} ({TEST_SETS['tfns'].fix})"
        build([Unit.from_hub(TASKS["fpb"], "train", train_name=DEFAULT_TRAIN, test_name=TEST_SETS["fpb_heldout"].file,
                             test_fraction=TEST_FRACTION, balance=True),
               Unit.from_hub(TASKS["fiqa"], "test", test_name=TEST_SETS["fiqa"].file), tfns,
               Unit.from_hub(TASKS["nwgi"], "test", **_nwgi_split())], opts)
    else:
        missing = [p for p in SHIPPED_FILES if not (SHIPPED / p).is_file()]
        if missing:
            raise DataError(f"the data shipped with the repository is missing "
                            f"({', '.join(rel(SHIPPED / p) for p in missing)}); "
                            "restore it (git checkout -- data/sources), or give SRC=dir, HUB=1 or SYNTHETIC=1")
        say(f"data: source {rel(SHIPPED)} (shipped with the repository; see data/README.md)")
        _build_dir(SHIPPED, opts)
