"""`make data` for every recipe task, the shipped offline default, and the hub code path.

The hub path is exercised offline: the registry's sources are pointed at small parquet and
JSON files the tests write, and read through the same `datasets.load_dataset` call
(`sources.hub_dataset`) that reads the hub. ../shared/data is used where present.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from finlora import ROOT, cli
from finlora.data import defaults, recipe_data
from finlora.data.convert import input_text
from finlora.data.prepare import main
from finlora.data.tasks import RECIPE_TASKS, SENTIMENT_NEWS, SENTIMENT_TWEET, TASKS
from finlora.errors import DataError

SHARED = (ROOT.parent / "shared" / "data").resolve()
needs_shared = pytest.mark.skipif(not (SHARED / "finlora").is_dir(), reason=f"real data not found at {SHARED}")
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yml") if p.stem != "matrix")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(defaults.ENV_SRC, raising=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    """`make data ARGS=...`: main through the command-line layer, as scripts/prepare_data.py runs it."""
    rc = cli.run(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def jsonl(path: Path, items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return path


# --- the shipped default ----------------------------------------------------------------------

DEFAULT_FILES = ["train/sentiment_cpu_train.jsonl", "test/fpb_test.jsonl", "test/fiqa_test.jsonl",
                 "test/tfns_test.jsonl", "test/nwgi_test.jsonl"]


def test_shipped_files_are_documented_small_and_tracked():
    readme = (ROOT / "data/README.md").read_text()
    for rel in defaults.SHIPPED_FILES:
        p = defaults.SHIPPED / rel
        assert p.is_file() and p.stat().st_size < 2 << 20, rel
        assert Path(rel).name in readme, f"{rel} not in data/README.md"
    assert "CC BY-NC-SA 3.0" in readme


def test_offline_default_trains_on_the_shipped_real_data(tmp_path, capsys):
    rc, out, _ = run(capsys, "--out-dir", tmp_path / "d")
    assert rc == 0 and "data/sources" in out and "SYNTHETIC" not in out
    train = tmp_path / "d/train/sentiment_cpu_train.jsonl"
    assert train.is_file() and not train.is_symlink()
    st = json.loads((tmp_path / "d/stats/sentiment_cpu_train.json").read_text())
    assert st["synthetic"] is False and st["task"] == "fpb + nwgi as sentiment"
    assert "data/sources/raw/financial_phrasebank_train.csv" in st["source"]
    for rel in DEFAULT_FILES:
        assert (tmp_path / "d" / rel).is_file()
    # the same seed writes the same bytes
    rc, _, _ = run(capsys, "--out-dir", tmp_path / "e")
    assert all((tmp_path / "d" / r).read_bytes() == (tmp_path / "e" / r).read_bytes() for r in DEFAULT_FILES)


@needs_shared
def test_offline_default_is_byte_identical_to_src_shared(tmp_path, capsys):
    """The README's figures were made with `make data SRC=../shared/data`: the shipped files are
    the same bytes, so the offline default writes the same train and test files."""
    for rel in defaults.SHIPPED_FILES:
        assert sha(defaults.SHIPPED / rel) == sha(SHARED / rel), rel
    defaults.prepare_default(None, out_dir=tmp_path / "shipped")
    defaults.prepare_default(SHARED, out_dir=tmp_path / "src")
    capsys.readouterr()
    for rel in DEFAULT_FILES:
        assert sha(tmp_path / "shipped" / rel) == sha(tmp_path / "src" / rel), rel


def test_synthetic_only_when_asked(tmp_path, capsys):
    rc, out, _ = run(capsys, "--synthetic", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0 and "SYNTHETIC DATA (asked for)" in out
    assert (tmp_path / "d/train/sentiment_cpu_train.jsonl").is_symlink()
    with pytest.raises(SystemExit) as e:  # argparse's usage error: exit status 2
        main(["--synthetic", "--task", "formula", "--out-dir", str(tmp_path / "x")])
    assert e.value.code == 2 and "--synthetic is for the default preparation" in capsys.readouterr().err


def test_missing_shipped_files_are_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "SHIPPED", tmp_path / "nowhere")
    with pytest.raises(DataError, match="data shipped with the repository is missing"):
        defaults.prepare_default(None, out_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --- recipes and tasks ----------------------------------------------------------------------

def test_every_recipe_maps_to_its_task():
    assert len([r for r in RECIPES if r != "smollm2_sentiment_r8"]) == 48
    for r in RECIPES:
        task = recipe_data.task_of_recipe(r)
        if r == "smollm2_sentiment_r8":
            assert task is None
        else:
            assert r.startswith(task + "_") and task in RECIPE_TASKS, r


def test_recipe_tasks_cover_the_eval_sets():
    from finlora.evaluate import EVAL_SETS

    named = [s for _, sets in RECIPE_TASKS.values() for s in sets]
    assert set(named) == set(EVAL_SETS) and len(named) == len(set(named))
    for reg, _ in RECIPE_TASKS.values():
        assert reg in TASKS and TASKS[reg].hub is not None


def _finlora_rows(task: str, split: str, n: int = 6) -> list[dict]:
    """Small FinLoRA-format rows with the task's kind of answer."""
    t = TASKS[task]
    out = []
    for i in range(n):
        text = f"{task} {split} example number {i} about company {i * 7}"
        if t.answer_type == "label":
            target = t.labels[i % len(t.labels)]
            ctx = (t.render({"text": text, "instruction": "Pick one."}) if "instruction" in t.fields
                   else t.render({"text": text}))
        else:
            target = f"{i}.50" if t.answer_type == "number" else f"answer {i}"
            ctx = f"Question about {text}. Answer:"
        out.append({"context": ctx, "target": target})
    return out


def _src_for(tmp: Path, task: str) -> Path:
    src = tmp / "src"
    for n in recipe_data.needs(task):
        jsonl(src / n.local[0], _finlora_rows(n.task.name, n.split))
    return src


@pytest.mark.parametrize("task", sorted(RECIPE_TASKS))
def test_task_from_src_writes_exactly_the_recipe_and_eval_files(tmp_path, capsys, task):
    src = _src_for(tmp_path, task)
    rc, out, err = run(capsys, "--task", task, "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    written = sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*.jsonl"))
    want = sorted([f"train/{task}_train.jsonl"] + [f"test/{s}_test.jsonl" for s in RECIPE_TASKS[task][1]])
    assert written == want
    assert all((tmp_path / "d/stats" / (Path(w).stem + ".json")).is_file() for w in want)
    # the recipe reads the train file by that name
    cfg = (ROOT / f"recipes/{task}_r8.yml").read_text()
    assert f"./data/train/{task}_train.jsonl" in cfg
    first = {w: (tmp_path / "d" / w).read_bytes() for w in want}
    rc, _, _ = run(capsys, "--recipe", f"{task}_r8", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0 and {w: (tmp_path / "d" / w).read_bytes() for w in want} == first


def test_missing_source_names_each_file_and_where_to_put_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "--task", "headline", "--src", tmp_path / "empty", "--out-dir", tmp_path / "d")
    assert rc == 1 and "nothing was written" in err
    assert f"data/train/headline_train.jsonl: put FinLoRA's JSONL at {tmp_path / 'empty'}/finlora/train/headline_train.jsonl" in err
    assert "data/test/headline_test.jsonl" in err and "FinGPT/fingpt-headline-cls" in err
    assert not (tmp_path / "d").exists()
    # no folder, no hub (HF_HUB_OFFLINE): the same message, with SRC as the place
    rc, _, err = run(capsys, "--task", "xbrl_term", "--out-dir", tmp_path / "d")
    assert rc == 1 and "SRC/finlora/test/xbrl_term_test.jsonl (no public copy known to the registry)" in err


def test_bad_row_in_a_src_file_is_reported_by_line(tmp_path, capsys):
    src = _src_for(tmp_path, "formula")
    p = src / "finlora/train/formula_train.jsonl"
    p.write_text(p.read_text() + '{"context": "Q. Answer:", "target": "about five"}\n')
    rc, _, err = run(capsys, "--task", "formula", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{p}:7: target 'about five' is not a number" in err


def test_published_overlap_is_left_out_and_listed(tmp_path, capsys):
    src = _src_for(tmp_path, "xbrl_term")
    test_row = rows(src / "finlora/test/xbrl_term_test.jsonl")[0]
    p = src / "finlora/train/xbrl_term_train.jsonl"
    p.write_text(p.read_text() + json.dumps(test_row) + "\n")
    rc, out, err = run(capsys, "--task", "xbrl_term", "--src", src, "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert "1 train row(s) left out" in out and f"{p}:7 (train)" in out
    assert test_row not in rows(tmp_path / "d/train/xbrl_term_train.jsonl")
    st = json.loads((tmp_path / "d/stats/xbrl_term_train.json").read_text())
    assert st["train_test_overlap_left_out"] == [f"{p}:7"]


@needs_shared
@pytest.mark.parametrize("recipe,rows_train,rows_test", [("formula_r8", 800, 200), ("xbrl_term_r4", 5845, 651),
                                                        ("financebench_r8_dora", 86, 43)])
def test_recipes_from_shared_data(tmp_path, capsys, recipe, rows_train, rows_test):
    task = recipe_data.task_of_recipe(recipe)
    rc, _, err = run(capsys, "--recipe", recipe, "--src", SHARED, "--out-dir", tmp_path / "d")
    assert rc == 0, err
    assert len(rows(tmp_path / f"d/train/{task}_train.jsonl")) == rows_train
    assert len(rows(tmp_path / f"d/test/{task}_test.jsonl")) == rows_test


@needs_shared
@pytest.mark.parametrize("recipe", ["ner_r8", "sentiment_r8", "headline_r8", "finer_r8", "xbrl_extract_r8"])
def test_recipes_shared_data_lacks_say_what_is_missing(tmp_path, capsys, recipe):
    task = recipe_data.task_of_recipe(recipe)
    rc, _, err = run(capsys, "--recipe", recipe, "--src", SHARED, "--out-dir", tmp_path / "d")
    assert rc == 1 and f"data/train/{task}_train.jsonl: put FinLoRA's JSONL at {SHARED}/finlora/train/{task}_train.jsonl" in err
    if task == "ner":  # the test file is there: only the train file is missing
        assert "data/test/ner_test.jsonl" not in err
    assert not (tmp_path / "d").exists()


# --- the hub code path, offline on local parquet/JSON ----------------------------------------

def _parquet(path: Path, data: dict, features=None) -> str:
    from datasets import Dataset

    Dataset.from_dict(data, features=features).to_parquet(str(path))
    return str(path)


def _point(monkeypatch, task: str, builder: str, files: dict[str, str]):
    """The registry entry `task` read from local files through the same loader."""
    t = TASKS[task]
    monkeypatch.setitem(TASKS, task, replace(t, hub=replace(t.hub, name=builder, config=None,
                                                             data_files=tuple(files.items()), revision=None)))


FPB = [("Profit rose to EUR 5 mn .", 2), ("Sales fell 10 % .", 0), ("The meeting is in May .", 1)] * 1


def test_default_from_the_hub_code_path_on_local_files(tmp_path, monkeypatch, capsys):
    from datasets import ClassLabel, Features, Value

    fpb = [(f"Company {i} : {t}", lab) for i in range(20) for t, lab in FPB]
    feats = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "neutral", "positive"])})
    _point(monkeypatch, "fpb", "parquet", {"train": _parquet(tmp_path / "fpb.parquet",
                                                             {"sentence": [t for t, _ in fpb], "label": [l for _, l in fpb]}, feats)})
    fiqa = [{"sentence": "$AAPL to the moon", "score": 0.6, "type": "post"},
            {"sentence": "Barclays profit slumps", "score": -0.5, "type": "headline"},
            {"sentence": "$TSLA flat today", "score": 0.0, "type": "post"}]
    _point(monkeypatch, "fiqa", "json", {"test": str(jsonl(tmp_path / "fiqa.jsonl", fiqa))})
    _point(monkeypatch, "tfns", "parquet", {"validation": _parquet(tmp_path / "tfns.parquet",
                                                                   {"text": ["$X cut to Sell", "$Y upped to Buy", "$Z at a conference"],
                                                                    "label": [0, 1, 2]})})
    nwgi = [{"news": f"Chip maker report {i}", "label": lab} for i, lab in
            enumerate(["mildly positive", "strong negative", "neutral", "moderately positive", "mildly negative"] * 4)]
    _point(monkeypatch, "nwgi", "json", {"test": str(jsonl(tmp_path / "nwgi.jsonl", nwgi))})
    monkeypatch.setattr(defaults, "NWGI_TRAIN_ROWS", 5)
    rc, out, err = run(capsys, "--hub", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert "source Hugging Face hub" in out
    fq = {input_text(r["context"]): r for r in rows(tmp_path / "d/test/fiqa_test.jsonl")}
    # FinGPT/FinLoRA: posts ask about a tweet, headlines about news
    assert fq["$AAPL to the moon"]["context"] == SENTIMENT_TWEET.replace("{text}", "$AAPL to the moon")
    assert fq["Barclays profit slumps"]["context"] == SENTIMENT_NEWS.replace("{text}", "Barclays profit slumps")
    assert [fq[k]["target"] for k in fq] == ["positive", "negative", "neutral"]
    tf = {input_text(r["context"]): r["target"] for r in rows(tmp_path / "d/test/tfns_test.jsonl")}
    assert tf == {"$X cut to Sell": "negative", "$Y upped to Buy": "positive", "$Z at a conference": "neutral"}
    fpb_test = rows(tmp_path / "d/test/fpb_test.jsonl")
    assert len(fpb_test) == 12 and Counter(r["target"] for r in fpb_test) == {"negative": 4, "neutral": 4, "positive": 4}
    st = json.loads((tmp_path / "d/stats/fpb_test.json").read_text())
    assert st["source"].startswith("hf:takala/financial_phrasebank")


def test_hub_error_is_one_clear_line(tmp_path, monkeypatch, capsys):
    _point(monkeypatch, "fpb", "parquet", {"train": str(tmp_path / "absent.parquet")})
    rc, _, err = run(capsys, "--hub", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and err.startswith("error: cannot load hf:takala/financial_phrasebank") and "[train]" in err


def test_fiqa_raw_headline_json_reads_as_news(tmp_path, capsys):
    src = tmp_path / "task1_headline_ABSA_train.json"
    src.write_text(json.dumps({"7": {"sentence": "Barclays profit slumps", "info": [
        {"snippets": "['x']", "target": "Barclays", "sentiment_score": "-0.5", "aspects": "['Corporate']"}]}}))
    rc, _, err = run(capsys, "--task", "fiqa", "--input", src, "--format", "fiqa-json", "--name", "fh",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert rows(tmp_path / "d/train/fh_train.jsonl") == [
        {"context": SENTIMENT_NEWS.replace("{text}", "Barclays profit slumps"), "target": "negative"}]


def test_headline_and_sentiment_mix_from_the_hub_path(tmp_path, monkeypatch, capsys):
    inst = "Does the news headline talk about price going up? Please choose an answer from {Yes/No}."
    data = {"instruction": [inst] * 4, "input": [f"Gold climbs {i} %" for i in range(4)], "output": ["Yes", "No"] * 2}
    _point(monkeypatch, "headline", "parquet", {"train": _parquet(tmp_path / "h_train.parquet", data),
                                                "test": _parquet(tmp_path / "h_test.parquet",
                                                                 {k: v[:1] for k, v in data.items()} | {"input": ["Silver dips"]})})
    rc, _, err = run(capsys, "--task", "headline", "--hub", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    got = rows(tmp_path / "d/train/headline_train.jsonl")
    assert got[0] == {"context": f"Instruction: {inst}\nInput: Gold climbs 0 %\nAnswer: ", "target": "Yes"}
    assert len(rows(tmp_path / "d/test/headline_test.jsonl")) == 1

    # FinLoRA's sentiment mix: its repeated rows are its oversampling, kept; 7-level answers are labels
    mix = [{"instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
            "input": "Profit up", "output": "positive"}] * 3 + [
        {"instruction": "What is the sentiment of this news? Please choose ...", "input": "Shares slide", "output": "moderately negative"}]
    _point(monkeypatch, "fingpt_sentiment", "json", {"train": str(jsonl(tmp_path / "mix.jsonl", mix))})
    for name in ("fiqa", "tfns", "nwgi"):
        _point(monkeypatch, name, "json", {TASKS[name].hub.test_split: str(jsonl(
            tmp_path / f"{name}.jsonl", [{"sentence": "A post", "score": 0.5, "type": "post"}] if name == "fiqa" else
            [{"text": "A tweet", "label": 1}] if name == "tfns" else [{"news": "A story", "label": "neutral"}]))})
    fpb = [(f"Sentence {i} .", i % 3) for i in range(8)]
    _point(monkeypatch, "fpb", "json", {"train": str(jsonl(tmp_path / "fpb.jsonl", [{"sentence": t, "label": l} for t, l in fpb]))})
    rc, out, err = run(capsys, "--task", "sentiment", "--hub", "--out-dir", tmp_path / "s", "--no-token-check")
    assert rc == 0, err
    assert [r["target"] for r in rows(tmp_path / "s/train/sentiment_train.jsonl")] == ["positive"] * 3 + ["moderately negative"]
    assert "2 repeated row(s) kept" in out
    assert len(rows(tmp_path / "s/test/fpb_test.jsonl")) == 2  # FinLoRA's split: 25% of 8


def test_finer_batching_through_the_hub_path(tmp_path, monkeypatch, capsys):
    from datasets import ClassLabel, Features, Sequence, Value

    names = ["O", "B-Revenues", "I-Revenues", "B-Goodwill"]
    feats = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))})
    data = {"tokens": [["Revenues", "were", "$", "5", "million"], ["Goodwill", "of", "3"], ["No", "tags"]] * 3,
            "ner_tags": [[0, 0, 0, 1, 2], [0, 0, 3], [0, 0]] * 3}
    _point(monkeypatch, "finer", "parquet", {"train": _parquet(tmp_path / "finer.parquet", data, feats)})
    rc, _, err = run(capsys, "--task", "finer", "--hub", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    got = rows(tmp_path / "d/train/finer_train.jsonl")
    # 9 tagged words (2 + 1 per group of sentences, 3 times): two prompts of 4, one of the leftover 1
    assert sorted(len(r["target"].split(",")) for r in got) == [1, 4, 4]
    ctx = got[0]["context"]
    assert ctx.startswith("You are XBRL expert.  Here is a list of US GAAP tags options: Revenues,Goodwill. ")
    assert 'What is best tag for entity "5" in sentence: "Revenues were $ 5 million?"' in " ".join(r["context"] for r in got)
    assert ctx.endswith("\nOutput US GAAP tags:")
    assert set(",".join(r["target"] for r in got).split(",")) == {"Revenues", "Goodwill"}


def test_finlora_json_sources_read_through_the_json_builder(tmp_path, monkeypatch, capsys):
    train = jsonl(tmp_path / "formula_train.jsonl", _finlora_rows("formula", "train"))
    test = jsonl(tmp_path / "formula_test.jsonl", _finlora_rows("formula", "test"))
    _point(monkeypatch, "formula", "json", {"train": str(train), "test": str(test)})
    rc, _, err = run(capsys, "--task", "formula", "--hub", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert rows(tmp_path / "d/train/formula_train.jsonl") == rows(train)
    assert rows(tmp_path / "d/test/formula_test.jsonl") == rows(test)


def test_recipe_test_files_warn_about_an_existing_train_file(tmp_path, capsys):
    """make eval reads data/test/<set>_test.jsonl for every recipe: FinLoRA's NWGI test set holds
    the NWGI rows the CPU default trains on, and writing it says so."""
    out = tmp_path / "d"
    defaults.prepare_default(None, out_dir=out)
    src = _src_for(tmp_path, "sentiment")
    (src / "finlora/test/nwgi_test.jsonl").write_bytes((defaults.SHIPPED / "finlora/test/nwgi_test.jsonl").read_bytes())
    capsys.readouterr()
    rc, out_text, err = run(capsys, "--task", "sentiment", "--src", src, "--out-dir", out, "--no-token-check")
    assert rc == 0, err
    assert f"warning: {defaults.NWGI_TRAIN_ROWS} row(s) of the existing" in out_text
    assert "sentiment_cpu_train.jsonl are in the test file(s) written now" in out_text


def test_train_names_the_make_data_command_for_a_recipe_without_data(tmp_path):
    from finlora.errors import RecipeError
    from finlora.recipes import Recipe
    from finlora.train import ensure_inputs

    recipe = Recipe.open("ner_r8", ["--datasets", '[{"path": "%s"}]' % (tmp_path / "data/train/ner_train.jsonl")])
    with pytest.raises(RecipeError, match=r"run `make data RECIPE=ner_r8`"):
        ensure_inputs(recipe)
