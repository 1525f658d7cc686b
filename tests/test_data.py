"""Data preparation (finlora.data): sources, validation, splits, leakage, safe writes.

Small fixtures are written into tmp_path by the tests themselves; the real public
files in ../shared/data are used when present (those tests skip otherwise). Nothing
here trains or loads a model; the token-length checks load only the base model's
tokenizer and skip when it has not been built.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from finlora import ROOT, cli
from finlora.data import defaults, pipeline, recipe_data, sources
from finlora.data.convert import Example, Mapping, input_text
from finlora.data.prepare import main
from finlora.data.sources import RawRow, hub_rows
from conftest import SHARED, needs_shared
from finlora.data.tasks import FIXES, LABEL_MAPS, SENTIMENT3, SENTIMENT_NEWS, SENTIMENT_TWEET, TASKS, TEST_SETS
from finlora.data.tasks import HubSource, fiqa_label, fold_nwgi
from finlora.errors import DataError

TOKENIZER = ROOT / "outputs" / "base" / "SmolLM2-135M-Instruct"
# The token checks need the real tokenizer: build the base model (offline) rather than skip,
# which CI did whenever these tests ran before a test that built it.
needs_tokenizer = pytest.mark.usefixtures("base_model_dir")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(recipe_data.ENV_SRC, raising=False)


def news(text: str) -> str:
    return SENTIMENT_NEWS.replace("{text}", text)


def read_out(path: Path) -> list[dict]:
    raw = path.read_bytes()
    assert b"\r" not in raw
    return [json.loads(line) for line in raw.decode("utf-8").splitlines()]


def run(capsys, *argv) -> tuple[int, str, str]:
    """`make data ARGS=...`: main through the command-line layer, as scripts/prepare_data.py runs it."""
    rc = cli.run(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


ROWS = [("Operating profit rose to EUR 13.1 mn .", "positive"),
        ("The company's sales fell by 20 % .", "negative"),
        ("The annual meeting will be held in Helsinki .", "neutral")]


# --- sources: one round trip per format -------------------------------------------------

def _write(fmt: str, path: Path) -> None:
    if fmt in ("csv", "tsv"):
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["id", "content", "label"])
            for i, (t, lab) in enumerate(ROWS):
                w.writerow([i, t, lab])
    elif fmt == "json":
        path.write_text(json.dumps([{"content": t, "label": lab} for t, lab in ROWS], indent=2))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"content": t, "label": lab}) + "\n" for t, lab in ROWS))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"content": [t for t, _ in ROWS], "label": [lab for _, lab in ROWS]}), path)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_round_trip_formats(tmp_path, capsys, fmt):
    src = tmp_path / f"in.{fmt}"
    _write(fmt, src)
    rc, out, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", "--label-col", "label",
                       "--name", "x", "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert read_out(tmp_path / "d/train/x_train.jsonl") == [{"context": news(t), "target": lab} for t, lab in ROWS]
    assert json.loads((tmp_path / "d/stats/x_train.json").read_text())["labels"] == \
        {"negative": 1, "neutral": 1, "positive": 1}


def test_hub_code_path_on_local_files(tmp_path, capsys):
    """The hub reader is datasets.load_dataset; the same call reads a local JSON file."""
    src = tmp_path / "in.jsonl"
    _write("jsonl", src)
    rows = hub_rows(HubSource("json", data_files=str(src)), "train")
    assert [r.data["content"] for r in rows] == [t for t, _ in ROWS] and rows[0].line == 1


def test_fpb_sentence_at_label_latin1(tmp_path, capsys):
    src = tmp_path / "Sentences_50Agree.txt"
    src.write_bytes("Caf\u00e9 chain \u00c5kerman's sales rose 5 % .@positive\r\n"
                    "Profit fell to EUR 2 mn @ year end .@negative\n\nThe meeting is in May .@neutral\n".encode("latin-1"))
    rc, out, err = run(capsys, "--task", "fpb", "--input", src, "--name", "fpb", "--out-dir", tmp_path / "d",
                       "--no-token-check")
    assert rc == 0, err
    got = read_out(tmp_path / "d/train/fpb_train.jsonl")
    assert [input_text(r["context"]) for r in got] == [
        "Caf\u00e9 chain \u00c5kerman's sales rose 5 % .", "Profit fell to EUR 2 mn @ year end .", "The meeting is in May ."]
    assert [r["target"] for r in got] == ["positive", "negative", "neutral"]
    assert "read as Latin-1" in out


@pytest.mark.parametrize("header", [True, False])
def test_all_data_csv_with_a_non_utf8_byte(tmp_path, capsys, header):
    src = tmp_path / "all-data.csv"
    body = (b"label,content\r\n" if header else b"") + (
        b'neutral,"According to Gran , the company has no plans ."\r\n'
        b'positive,"Sales of Tel\xf1aco rose , says the CEO ."\r\n'
        b"negative,Net loss widened to EUR 1 mn .\r\n")
    src.write_bytes(body)
    rc, out, err = run(capsys, "--task", "fpb", "--input", src, "--format", "all-data-csv", "--name", "ad",
                       "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    got = read_out(tmp_path / "d/train/ad_train.jsonl")
    assert [r["target"] for r in got] == ["neutral", "positive", "negative"]
    assert input_text(got[1]["context"]) == "Sales of Tel\u00f1aco rose , says the CEO ."
    assert f"line(s) not UTF-8, read as Latin-1 (lines {3 if header else 2})" in out


def test_fiqa_post_json_thresholds(tmp_path, capsys):
    scores = {"1": -0.374, "2": "-0.1", "3": 0.0999, "4": "0.1", "5": -0.10001, "6": 0.8}
    doc = {k: {"sentence": f"$AAPL post number {k}",
               "info": [{"snippets": "['x']", "target": "AAPL", "sentiment_score": str(v) if not isinstance(v, str) else v,
                         "aspects": "['Stock/Price Action']"}]} for k, v in scores.items()}
    src = tmp_path / "task1_post_ABSA_train.json"
    src.write_text(json.dumps(doc, indent=1))
    rc, _, err = run(capsys, "--task", "fiqa", "--input", src, "--format", "fiqa-json", "--name", "fq",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    got = read_out(tmp_path / "d/train/fq_train.jsonl")
    assert [r["target"] for r in got] == ["negative", "neutral", "neutral", "positive", "negative", "positive"]
    assert got[0]["context"] == SENTIMENT_TWEET.replace("{text}", "$AAPL post number 1")  # posts read as tweets
    assert [fiqa_label(x) for x in (-0.1, 0.1, -0.11, 0.0)] == ["neutral", "positive", "negative", "neutral"]


# --- validation ------------------------------------------------------------------------------

BAD_JSONL = [
    '{"content": "Shares rose 5 % .", "label": "positive"}',          # 1 ok
    '{"content": "Shares fell", "label": "negative"',                 # 2 invalid JSON
    '{"label": "neutral"}',                                            # 3 missing field
    '{"content": "   ", "label": "neutral"}',                          # 4 empty field
    '{"content": ["a list"], "label": "neutral"}',                     # 5 wrong type
    '{"content": "Profit doubled .", "label": "bullish"}',             # 6 label outside the set
    '{"content": "The meeting is in May .", "label": "neutral"}',      # 7 ok
]
BAD_REASONS = {2: "invalid JSON", 3: "missing field 'content'", 4: "empty field 'content'",
               5: "wrong type for field 'content': list", 6: "label 'bullish' is not one of negative, neutral, positive"}


def test_every_bad_row_reported_and_nothing_written(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_JSONL) + "\n")
    out_file = tmp_path / "d/train/b_train.jsonl"
    out_file.parent.mkdir(parents=True)
    out_file.write_text("previous\n")
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", "--name", "b",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1
    for line, reason in BAD_REASONS.items():
        assert f"{src}:{line}: {reason}" in err
    assert f"{src}:1:" not in err and f"{src}:7:" not in err
    assert "5 bad row(s)" in err
    assert out_file.read_text() == "previous\n"
    assert not (tmp_path / "d/stats").exists()


def test_skip_bad_counts_and_lists(tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(BAD_JSONL) + "\n")
    rc, out, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", "--name", "b",
                       "--out-dir", tmp_path / "d", "--no-token-check", "--skip-bad")
    assert rc == 0, err
    assert "skipping 5 bad row(s) (--skip-bad)" in out
    for line in BAD_REASONS:
        assert f"{src}:{line}:" in out
    assert [r["target"] for r in read_out(tmp_path / "d/train/b_train.jsonl")] == ["positive", "neutral"]
    st = json.loads((tmp_path / "d/stats/b_train.json").read_text())
    assert len(st["bad_rows_skipped"]) == 5 and st["rows"] == 2


def test_csv_missing_column_and_short_row(tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text("content,label\nShares rose .,positive\nonly one field\n")
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", "--name", "c",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{src}:3: 1 fields, the header has 2" in err
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "sentence", "--name", "c",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and "missing field 'sentence'" in err


def test_delimited_quotes_unreadable_records_and_a_header_after_blank_lines(tmp_path, capsys):
    args = ["--name", "q", "--out-dir", tmp_path / "d", "--no-token-check"]
    tsv = tmp_path / "in.tsv"
    tsv.write_text('content\tlabel\n"Buy now" says analyst\tpositive\n')  # quotes are text in TSV
    rc, _, err = run(capsys, "--task", "sentiment", "--input", tsv, "--text-col", "content", *args)
    assert rc == 0, err
    assert [input_text(r["context"]) for r in read_out(tmp_path / "d/train/q_train.jsonl")] == ['"Buy now" says analyst']
    src = tmp_path / "in.csv"
    for body, line, why in [('content,label\nShares rose .,positive\n"Costs fell .,negative\nSales rose .,positive\n', 3,
                             "unexpected end of data"),
                            ("content,label\n\n" + "x" * 200_000 + ",positive\n", 3, "field larger than field limit")]:
        src.write_text(body)
        rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", *args)
        assert rc == 1 and err.startswith(f"error: {src}:{line}: cannot read the record starting here: {why}"), err
    src.write_text("\n\nlabel,content\npositive,Sales rose .\n")
    rc, _, err = run(capsys, "--task", "fpb", "--input", src, "--format", "all-data-csv", *args)
    assert rc == 0, err
    assert [r["target"] for r in read_out(tmp_path / "d/train/q_train.jsonl")] == ["positive"]


@needs_tokenizer
def test_too_long_in_tokens(tmp_path, capsys):
    src = tmp_path / "long.jsonl"
    rows = [{"text": "Sales rose .", "label": "positive"}, {"text": "profit " * 300, "label": "positive"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "text", "--name", "l",
                     "--out-dir", tmp_path / "d")
    assert rc == 1
    assert f"{src}:2: too long:" in err and "> sequence_len 256" in err and f"{src}:1:" not in err
    # the recipe decides: a tighter sequence_len flags the short row too
    recipe = tmp_path / "tight.yml"
    recipe.write_text(f"base_model: {TOKENIZER}\nsequence_len: 16\n")
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "text", "--name", "l",
                     "--out-dir", tmp_path / "d", "--recipe", recipe)
    assert rc == 1 and f"{src}:1: too long:" in err and "> sequence_len 16" in err
    # sequence_len bounds training only: the same rows are a fine test file (evaluation has no limit)
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "text", "--name", "l",
                     "--out-dir", tmp_path / "d", "--split", "test")
    assert rc == 0 and len(read_out(tmp_path / "d/test/l_test.jsonl")) == 2


@needs_tokenizer
def test_over_length_counts_as_axolotl_tokenises_a_row():
    """The one length rule of `make data` (too_long, n_tokens) and `make check`: a row's tokens as
    Axolotl's own prompt strategy for the default recipe makes them (the prompt, the answer apart,
    so "Answer: "'s space is a token of its own, and the EOS it appends), longer than sequence_len."""
    import yaml
    from axolotl.prompt_strategies.user_defined import load
    from axolotl.utils.dict import DictDefault
    from axolotl.utils.schemas.datasets import UserDefinedPrompterType
    from transformers import AutoTokenizer

    from finlora.data.validate import LengthCheck, count_tokens, too_long
    from finlora.lengths import Lengths
    from finlora.lengths import too_long as rule

    ds = yaml.safe_load((ROOT / "recipes" / "smollm2_sentiment_r8.yml").read_text())["datasets"][0]
    axolotl = load(AutoTokenizer.from_pretrained(TOKENIZER), DictDefault({"train_on_inputs": False, "sequence_len": 512}),
                   UserDefinedPrompterType(**ds["type"]))
    pairs = [(news("Sales rose ."), "positive"), (news("profit " * 40), "negative"), ("Q: x?\nAnswer:", " 12.50")]
    lengths = Lengths.load(TOKENIZER)
    trained = lengths.trained_lengths(pairs)
    assert trained == [len(axolotl.tokenize_prompt({"context": c, "target": t})["input_ids"]) for c, t in pairs]
    assert trained[0] == lengths.lengths([pairs[0][0] + pairs[0][1]])[0] + 2  # the space apart, and the EOS
    assert rule(trained, trained[1] - 1) == [(1, trained[1])] and rule(trained, trained[1]) == []
    rows = [Example(c, t, c + t, "mem", i + 1) for i, (c, t) in enumerate(pairs[:2])]
    count_tokens(LengthCheck(trained[1], lengths, str(TOKENIZER)), rows)
    assert [e.n_tokens for e in rows] == trained[:2]
    assert [str(p) for p in too_long(LengthCheck(trained[1] - 1, lengths, str(TOKENIZER)), rows)] == \
        [f"mem:2: too long: {trained[1]} tokens > sequence_len {trained[1] - 1}"]


def test_unknown_names_are_errors_not_exits(tmp_path, capsys):
    from finlora.data.tasks import get_task

    with pytest.raises(DataError, match="unknown task 'nope'; tasks are: sentiment, fpb"):
        get_task("nope")
    rc, _, err = run(capsys, "--task", "nope", "--input", tmp_path / "in.csv", "--out-dir", tmp_path / "d")
    assert rc == 1 and err.startswith("error: unknown task 'nope'; tasks are: sentiment, fpb")


# --- labels at the source -----------------------------------------------------------------

def test_tfns_ids_mapped_at_the_source(tmp_path, capsys):
    src = tmp_path / "sent_valid.csv"
    src.write_text("text,label\n$X - X cut to Sell,0\n$Y - Y upped to Buy,1\n$Z - Z to present at conference,2\n")
    rc, _, err = run(capsys, "--task", "tfns", "--input", src, "--name", "t", "--split", "test",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 0, err
    assert [r["target"] for r in read_out(tmp_path / "d/test/t_test.jsonl")] == ["negative", "positive", "neutral"]
    assert LABEL_MAPS["tfns"] == {"0": "negative", "1": "positive", "2": "neutral"}


@needs_shared
def test_tfns_swap_repair_on_the_real_file(tmp_path, capsys):
    src = SHARED / "finlora/test/tfns_test.jsonl"
    as_published = {input_text(json.loads(line)["context"]): json.loads(line)["target"] for line in src.open()}
    key = next(t for t in as_published if "upped to Buy at Deutsche Bank" in t)
    assert as_published[key] == "neutral"  # the publisher's error
    rc, _, err = run(capsys, "--task", "tfns", "--input", src, "--format", "finlora", "--split", "test",
                     "--fix", "tfns-swap", "--name", "tfns", "--out-dir", tmp_path / "d")
    assert rc == 0, err
    fixed = {input_text(r["context"]): r["target"] for r in read_out(tmp_path / "d/test/tfns_test.jsonl")}
    assert fixed[key] == "positive"
    swap = dict([FIXES["tfns-swap"], FIXES["tfns-swap"][::-1]])
    assert all(fixed[t] == swap.get(lab, lab) for t, lab in as_published.items())


@needs_shared
def test_registry_templates_match_the_finlora_files():
    for task, name in [("fiqa", "fiqa_test"), ("tfns", "tfns_test"), ("nwgi", "nwgi_test")]:
        t = TASKS[task]
        for line in (SHARED / f"finlora/test/{name}.jsonl").open():
            row = json.loads(line)
            ctx = row["context"]
            kinds = [None, *t.variants]
            assert any(t.render({"text": input_text(ctx)}, k) == ctx for k in kinds), ctx
            assert row["target"] in t.labels
    row = json.loads((SHARED / "finlora/test/xbrl_term_test.jsonl").open().readline())
    term = row["context"].removeprefix("Explain this XBRL term briefly in one sentence: ").removesuffix(". Answer:")
    assert TASKS["xbrl_term"].render({"text": term}) == row["context"]


# --- duplicates, leakage -------------------------------------------------------------------

def test_duplicates_removed_and_counted(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    rows = [("Sales rose .", "positive"), ("sales  ROSE .", "positive"), ("Sales fell .", "negative"),
            ("Sales rose .", "positive")]
    src.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    rc, out, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "text", "--name", "dd",
                       "--out-dir", tmp_path / "o", "--no-token-check")
    assert rc == 0, err
    assert "removed 2 duplicate row(s)" in out and f"{src}:2 repeats {src}:1" in out
    assert len(read_out(tmp_path / "o/train/dd_train.jsonl")) == 2
    assert json.loads((tmp_path / "o/stats/dd_train.json").read_text())["duplicates_removed"] == 2


def test_leakage_fails_unless_allowed(tmp_path, capsys):
    train = tmp_path / "train.csv"
    train.write_text("text,label\nProfit rose 10 % .,positive\nCosts fell .,positive\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"context": news("  profit ROSE 10 %  ."), "target": "positive"}) + "\n")
    args = ["--task", "sentiment", "--input", train, "--name", "lk", "--out-dir", tmp_path / "o",
            "--no-token-check", "--against", test]
    rc, _, err = run(capsys, *args)
    assert rc == 1 and "1 train example(s) also in a test split" in err and f"{train}:2 (train) = {test}:1 (test)" in err
    assert not (tmp_path / "o/train/lk_train.jsonl").exists()
    rc, out, err = run(capsys, *args, "--allow-overlap")
    assert rc == 0 and "--allow-overlap" in out
    assert json.loads((tmp_path / "o/stats/lk_train.json").read_text())["train_test_overlap"] == 1


def test_a_new_train_file_sharing_rows_with_an_existing_test_file_warns(tmp_path, capsys):
    """Another task's test file already in data/test/: a warning, not a failure (each task is
    scored on its own sets), as for a new test file beside an existing train file."""
    test = tmp_path / "test.csv"
    test.write_text("text,label\nProfit rose 10 % .,positive\n")
    out = tmp_path / "o"
    assert run(capsys, "--task", "sentiment", "--input", test, "--split", "test", "--name", "old", "--out-dir", out,
               "--no-token-check")[0] == 0
    train = tmp_path / "train.csv"
    train.write_text("text,label\nCosts fell .,positive\n  profit ROSE 10 %  .,positive\n")
    rc, printed, err = run(capsys, "--task", "sentiment", "--input", train, "--name", "new", "--out-dir", out,
                           "--no-token-check")
    assert rc == 0, err
    assert f"old_test.jsonl are in the train file(s) written now (e.g. {train}:3)" in printed
    assert len(read_out(out / "train/new_train.jsonl")) == 2


def test_a_row_two_units_write_to_one_file_is_written_once(tmp_path, capsys):
    def unit(name: str, rows: list[tuple[str, str]]) -> pipeline.Unit:
        raw = [RawRow(name, i, {"text": t, "label": lab}) for i, (t, lab) in enumerate(rows, start=1)]
        return pipeline.Unit(TASKS["sentiment"], Mapping(), raw, name, train_name="m_train.jsonl")

    pipeline.build([unit("a", ROWS), unit("b", [ROWS[1], ("Costs fell .", "negative")])],
                   pipeline.Options(out_dir=tmp_path, token_check=False))
    assert [input_text(r["context"]) for r in read_out(tmp_path / "train/m_train.jsonl")] == \
        [t for t, _ in ROWS] + ["Costs fell ."]
    st = json.loads((tmp_path / "stats/m_train.json").read_text())
    assert st["duplicates_removed"] == 1 and [s["duplicates_removed"] for s in st["sources"]] == [0, 1]
    assert "m_train.jsonl: removed 1 duplicate row(s) (e.g. b:1 repeats a:2)" in capsys.readouterr().out


def _many(tmp_path: Path, n: int = 60) -> Path:
    src = tmp_path / "many.csv"
    labs = ["negative", "neutral", "positive"]
    lines = [f"Headline number {i} about company {i % 7} .,{labs[i % 3]}" for i in range(n)]
    lines.append("Headline number 0 about company 0 .,negative")  # a repeat: must stay on one side
    src.write_text("text,label\n" + "\n".join(lines) + "\n")
    return src


def test_split_is_deterministic_stratified_and_leak_free(tmp_path, capsys):
    src = _many(tmp_path)
    outs = []
    for d, seed in [("a", 42), ("b", 42), ("c", 7)]:
        rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--name", "s", "--test-fraction", "0.2",
                         "--seed", seed, "--out-dir", tmp_path / d, "--no-token-check")
        assert rc == 0, err
        outs.append(((tmp_path / d / "train/s_train.jsonl").read_bytes(), (tmp_path / d / "test/s_test.jsonl").read_bytes()))
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    test = read_out(tmp_path / "a/test/s_test.jsonl")
    assert sorted(r["target"] for r in test) == ["negative"] * 4 + ["neutral"] * 4 + ["positive"] * 4


# --- safe writes -----------------------------------------------------------------------------

def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "train" / "x.jsonl"
    path.parent.mkdir()
    path.write_text('{"context": "old", "target": "neutral"}\n')

    def rows():
        for i in range(1000):
            if i == 500:
                raise KeyboardInterrupt
            yield Example(news(f"row {i}"), "neutral", f"row {i}", "mem", i + 1)

    with pytest.raises(KeyboardInterrupt):
        pipeline.write_examples(path, rows())
    assert path.read_text() == '{"context": "old", "target": "neutral"}\n'
    assert [p.name for p in path.parent.iterdir()] == ["x.jsonl"]


# --- the default preparation -----------------------------------------------------------------

def test_default_outputs():
    outs = defaults.default_outputs()
    assert (ROOT / "data/train/sentiment_cpu_train.jsonl").resolve() in outs
    assert all(p.is_absolute() for p in outs)


def test_synthetic_when_asked_makes_a_symlink(tmp_path, capsys):
    out = tmp_path / "data"
    defaults.prepare_default(None, out_dir=out, synthetic=True)
    printed = capsys.readouterr().out
    assert "SYNTHETIC" in printed and "symlink" in printed
    link = out / "train/sentiment_cpu_train.jsonl"
    assert link.is_symlink() and os.readlink(link) == "synthetic_sentiment_train.jsonl"
    rows = read_out(link)
    assert 150 <= len(rows) <= 500 and {r["target"] for r in rows} == {"negative", "neutral", "positive"}
    assert json.loads((out / "stats/synthetic_sentiment_train.json").read_text())["synthetic"] is True
    first = link.read_bytes()
    defaults.prepare_default(None, out_dir=out, synthetic=True)
    assert link.read_bytes() == first  # seeded
    assert not [p for p in (out / "train").iterdir() if p.name.startswith(".")]


@needs_shared
def test_default_from_shared_data(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data"
    defaults.prepare_default(None, out_dir=out, synthetic=True)  # synthetic first: the real run must replace the link
    monkeypatch.setenv(recipe_data.ENV_SRC, str(SHARED))  # src None -> $FINLORA_DATA_SRC
    defaults.prepare_default(None, out_dir=out)
    printed = capsys.readouterr().out
    train = out / "train/sentiment_cpu_train.jsonl"
    assert train.is_file() and not train.is_symlink()
    # the train file is FPB (balanced) followed by NWGI_TRAIN_ROWS of NWGI as 3-class news sentiment
    nwgi_src = {input_text(r["context"]): r["target"] for r in read_out(SHARED / "finlora/test/nwgi_test.jsonl")}
    rows, fpb = read_out(train), read_out(out / "test/fpb_heldout_test.jsonl")
    tr = [r for r in rows if input_text(r["context"]) not in nwgi_src]
    nw = [r for r in rows if input_text(r["context"]) in nwgi_src]
    assert len(nw) == defaults.NWGI_TRAIN_ROWS and rows[-len(nw):] == nw
    assert all(r["context"] == news(input_text(r["context"])) for r in nw)
    assert all(r["target"] == fold_nwgi(nwgi_src[input_text(r["context"])]) for r in nw)
    nwgi_test = read_out(out / "test/nwgi_heldout_test.jsonl")  # our held-out NWGI rows, FinLoRA's seven levels
    assert {r["target"] for r in nwgi_test} <= set(TASKS["nwgi"].labels) and 780 < len(nwgi_test) < 840
    assert not {input_text(r["context"]) for r in nw} & {input_text(r["context"]) for r in nwgi_test}
    n_raw = sum(1 for _ in (SHARED / "raw/financial_phrasebank_train.csv").open(encoding="latin-1")) - 1
    distinct = {(r["context"], r["target"]) for r in tr}
    assert len(distinct) + len(fpb) == n_raw - 1  # one duplicate sentence in the raw file, removed and reported
    assert "removed 1 duplicate" in printed and "read as Latin-1" in printed
    assert 0.18 < len(fpb) / (len(distinct) + len(fpb)) < 0.22
    # square-root class balance by oversampling: every distinct row kept, none favoured
    st = json.loads((out / "stats/sentiment_cpu_train.json").read_text())
    counts, before = Counter(r["target"] for r in tr), st["balanced_from"]
    most = max(before.values())
    assert counts == {k: max(n, round(most * (n / most) ** 0.5)) for k, n in before.items()}
    assert sum(before.values()) == len(distinct) and "square-root class balance" in printed
    for label, n in st["balanced_from"].items():
        reps = Counter(k for k in (tuple(r.values()) for r in tr) if k[1] == label).values()
        assert len(reps) == n and max(reps) - min(reps) <= 1
    assert not {input_text(r["context"]).casefold() for r in tr} & {input_text(r["context"]).casefold() for r in fpb}
    # FinLoRA's TFNS as published (its swap is the strict scorer's to repair), FiQA's 235 rows all kept
    tfns = {input_text(r["context"]): r["target"] for r in read_out(out / "test/tfns_test.jsonl")}
    assert next(v for k, v in tfns.items() if "upped to Buy at Deutsche Bank" in k) == "neutral"
    assert len(read_out(out / "test/fiqa_test.jsonl")) == 235
    assert st["rows"] == len(rows) and set(st["labels"]) == {"negative", "neutral", "positive"}
    assert [s["rows"] for s in st["sources"]] == [len(tr), len(nw)] and st["task"] == "fpb + nwgi as sentiment"
    if (TOKENIZER / "tokenizer.json").is_file():
        assert st["tokens"]["max"] <= 256 and st["tokens"]["p50"] <= st["tokens"]["p90"] <= st["tokens"]["p99"]
    again = tmp_path / "again"
    defaults.prepare_default(SHARED, out_dir=again)
    for rel in ["train/sentiment_cpu_train.jsonl", "test/fpb_heldout_test.jsonl", "test/tfns_test.jsonl",
                "test/nwgi_heldout_test.jsonl"]:
        assert (again / rel).read_bytes() == (out / rel).read_bytes()


NWGI7_ROWS = [("Chip maker doubles its dividend", "strong positive"), ("Retailer beats estimates", "moderately positive"),
              ("Bank opens a branch in Ohio", "mildly positive"), ("Shares close flat", "neutral"),
              ("Miner trims its outlook", "mildly negative"), ("Airline cuts 500 jobs", "moderately negative"),
              ("Lender files for bankruptcy", "strong negative")]


def test_nwgi_rows_train_as_three_class_news_sentiment(tmp_path, monkeypatch, capsys):
    """A local source folder with FPB and NWGI: NWGI's held-out rows keep FinLoRA's seven-level
    prompt, its train rows are re-rendered with FPB's wording and folded labels, sampled to
    NWGI_TRAIN_ROWS, and written after FPB's rows into the one train file."""
    src = tmp_path / "src"
    (src / "raw").mkdir(parents=True)
    (src / "finlora/test").mkdir(parents=True)
    fpb = [(f"Company {i} {text}", label) for i in range(10) for text, label in ROWS]
    (src / "raw/financial_phrasebank_train.csv").write_text(
        "label,content\n" + "".join(f'{label},"{text}"\n' for text, label in fpb))
    nwgi = [(f"{text}, report {i}", label) for i in range(10) for text, label in NWGI7_ROWS]
    (src / "finlora/test/nwgi_test.jsonl").write_text("".join(
        json.dumps({"context": TASKS["nwgi"].render({"text": text}), "target": label}) + "\n" for text, label in nwgi))
    monkeypatch.setattr(defaults, "NWGI_TRAIN_ROWS", 20)
    out = tmp_path / "data"
    with pytest.raises(DataError, match="nwgi_test.jsonl: sha256 .* another version of the file"):
        defaults.prepare_default(src, out_dir=out, hub=False)  # checked by its hash, as FiQA and TFNS are
    assert not out.exists()
    nwgi_set = TEST_SETS["nwgi"]
    monkeypatch.setitem(TEST_SETS, "nwgi", replace(nwgi_set, source=replace(
        nwgi_set.source, sha256=hashlib.sha256((src / "finlora/test/nwgi_test.jsonl").read_bytes()).hexdigest())))
    defaults.prepare_default(src, out_dir=out, hub=False)
    rows = read_out(out / "train/sentiment_cpu_train.jsonl")
    test = read_out(out / "test/nwgi_heldout_test.jsonl")
    by_text = dict(nwgi)
    nw = [r for r in rows if input_text(r["context"]) in by_text]
    assert len(nw) == 20 and rows[-20:] == nw and len(rows) > 20
    assert all(r["context"] == news(input_text(r["context"])) and r["target"] == fold_nwgi(by_text[input_text(r["context"])])
               for r in nw)
    assert len(test) == 14 and all(r["context"] == TASKS["nwgi"].render({"text": input_text(r["context"])})
                                   and r["target"] == by_text[input_text(r["context"])] for r in test)
    st = json.loads((out / "stats/sentiment_cpu_train.json").read_text())
    assert st["task"] == "fpb + nwgi as sentiment" and [s["rows"] for s in st["sources"]] == [len(rows) - 20, 20]
    # no NWGI file: the train file is FPB alone, and the run says so
    (src / "finlora/test/nwgi_test.jsonl").unlink()
    defaults.prepare_default(src, out_dir=out, hub=False)
    assert "the train file is FPB alone" in capsys.readouterr().out
    assert not {input_text(r["context"]) for r in read_out(out / "train/sentiment_cpu_train.jsonl")} & set(by_text)


def test_hub_default_writes_finloras_tfns_labelling(tmp_path, monkeypatch):
    """HUB=1 converts TFNS's ids correctly, then writes tfns_test.jsonl with FinLoRA's swap, as in
    its published file (`make eval` reads it as that file); the train side keeps the hub's labels."""
    fpb = {f"Company {i} {t}": lab for i in range(10) for t, lab in ROWS}
    hub = {"parquet": [{"sentence": t, "label": SENTIMENT3.index(lab)} for t, lab in fpb.items()],
           "TheFinAI/fiqa-sentiment-classification": [{"sentence": "Shares jump 5 %", "score": 0.5, "type": "headline"}],
           "zeroshot/twitter-financial-news-sentiment": [{"text": "$DB - upped to Buy at Deutsche Bank", "label": 1},
                                                         {"text": "$X - cut to Sell", "label": 0},
                                                         {"text": "$Z - to present at a conference", "label": 2}],
           "TheFinAI/NWGI_test": [{"news": f"{t}, report {i}", "label": lab} for i in range(10) for t, lab in NWGI7_ROWS]}
    # the download, not the code under test: rows shaped as the hub sets' rows
    monkeypatch.setattr(sources, "hub_rows", lambda h, split: [RawRow(f"hf:{h.name}[{split}]", i, r)
                                                               for i, r in enumerate(hub[h.name], start=1)])
    out = tmp_path / "data"
    defaults.prepare_default(None, hub=True, out_dir=out, token_check=False)
    assert {input_text(r["context"]): r["target"] for r in read_out(out / "test/tfns_test.jsonl")} == {
        "$DB - upped to Buy at Deutsche Bank": "neutral", "$X - cut to Sell": "negative",
        "$Z - to present at a conference": "positive"}
    trained = read_out(out / "train/sentiment_cpu_train.jsonl") + read_out(out / "test/fpb_heldout_test.jsonl")
    assert {input_text(r["context"]): r["target"] for r in trained if input_text(r["context"]) in fpb} == fpb


@needs_tokenizer
def test_sampled_rows_longer_than_sequence_len_are_left_out(capsys):
    from finlora.data.validate import load_length_check

    nwgi = TASKS["nwgi"]
    rows = [Example(nwgi.render({"text": text}), "mildly positive", text, "nwgi.jsonl", line)
            for line, text in [(1, "Shares rose"), (2, "profit " * 300)]]
    unit = pipeline.Unit(nwgi, Mapping(finlora=True), [], "nwgi.jsonl", **defaults._nwgi_split() | {"train_rows": 5})
    out = pipeline._train_rows(unit, rows, load_length_check(None, True), 42)
    assert [(e.line, e.target, e.context) for e in out] == [(1, "positive", news("Shares rose"))]
    assert "nwgi.jsonl: 1 sampled row(s) left out, longer than sequence_len 256: line 2" in capsys.readouterr().out


def test_script_entry_point_help():
    r = subprocess.run([sys.executable, str(ROOT / "scripts/prepare_data.py"), "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0
    for flag in ("--src", "--task", "--skip-bad", "--allow-overlap", "--fix", "--test-fraction", "--seed", "--against"):
        assert flag in r.stdout


def test_mapping_defaults_are_sane():
    assert Mapping().text_col == "text"
    for t in TASKS.values():
        assert "{text}" in t.template and (t.labels is None) == (t.answer_type != "label")


def test_json_array_and_parquet_problems_name_the_line_or_row(tmp_path, capsys):
    src = tmp_path / "in.json"
    src.write_text(json.dumps([{"content": "Sales rose .", "label": "positive"},
                               {"content": "Sales fell .", "label": 3}], indent=2))
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", "--name", "j",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{src}:6: wrong type for field 'label': int" in err  # element 2 starts on line 6
    src.write_text('[{"content": "x",\n "label": }]')
    rc, _, err = run(capsys, "--task", "sentiment", "--input", src, "--text-col", "content", "--name", "j",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{src}:2: invalid JSON" in err
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"content": ["Sales rose .", None], "label": ["positive", "neutral"]}), pq_src)
    rc, _, err = run(capsys, "--task", "sentiment", "--input", pq_src, "--text-col", "content", "--name", "p",
                     "--out-dir", tmp_path / "d", "--no-token-check")
    assert rc == 1 and f"{pq_src}:2: empty field 'content' (null)" in err


def test_oversample_balances_without_favouring_rows():
    from finlora.data.split import oversample

    ex = [Example(f"c{i}", "a" if i < 7 else "b", f"t{i}", "mem", i + 1) for i in range(10)]  # 7 a, 3 b
    out = oversample(ex, seed=1)
    assert Counter(e.target for e in out) == {"a": 7, "b": 7}
    b_counts = Counter(e.text for e in out if e.target == "b")
    assert set(b_counts) == {"t7", "t8", "t9"} and sorted(b_counts.values()) == [2, 2, 3]
    assert oversample(ex, seed=1) == out and oversample([], seed=1) == []
    sq = Counter(e.target for e in oversample(ex, seed=1, power=0.5))
    assert sq == {"a": 7, "b": round(7 * (3 / 7) ** 0.5)}  # 5: between 3 (as is) and 7 (equal)
    assert Counter(e.target for e in oversample(ex, seed=1, power=1.0)) == {"a": 7, "b": 3}
