"""Evaluation: FinLoRA scoring rules, bad input, and a real batched run."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import SENTIMENT_PROMPT, TINY_ROWS
from finlora.data.tasks import TASKS
from finlora.models import ModelError
from finlora.evaluate import (EvalError, fold_nwgi, first_label, first_number, load_examples, main,
                              parse_datasets, parse_prediction, score)


def test_first_label_is_the_earliest_whole_word():
    labs = TASKS["fpb"].labels
    assert first_label("Positive, not negative", labs) == "positive"
    assert first_label("the answer is: NEGATIVE.", labs) == "negative"
    assert first_label("neutralise", labs) is None  # whole words only
    assert first_label("1\n\nThe company", labs) is None
    assert first_label("No. Yes", TASKS["headline"].labels) == "No"
    assert first_label("I do not know", TASKS["headline"].labels) is None


def test_nwgi_is_folded_to_three_levels():
    assert fold_nwgi("strong negative") == "negative"
    assert fold_nwgi("mildly positive") == "positive"
    assert fold_nwgi("neutral") == "neutral"
    t = TASKS["nwgi"]
    assert parse_prediction(t, "moderately positive") == "positive"
    m = score(t, ["positive", "negative", "neutral"], ["mildly positive", "strong positive", "neutral"])
    assert m["accuracy"] == pytest.approx(2 / 3)


def test_formula_compares_numbers_to_two_decimals():
    t = TASKS["formula"]
    assert first_number("The NPV is $15,092.44.") == pytest.approx(15092.44)
    assert parse_prediction(t, "-3.14159") == "-3.14"
    m = score(t, [parse_prediction(t, x) for x in ["15092.44", "15092.4", "n/a"]], ["15092.44", "15092.44", "1"])
    assert m["accuracy"] == pytest.approx(1 / 3) and m["unparsed"] == 1


def test_accuracy_and_weighted_f1_by_hand():
    t = TASKS["fpb"]
    y = ["positive", "positive", "negative", "neutral"]
    p = ["positive", "negative", "negative", None]
    m = score(t, p, y)
    assert m["accuracy"] == 0.5 and m["unparsed"] == 1
    # per class F1: positive P=1 R=.5 -> 2/3; negative P=.5 R=1 -> 2/3; neutral 0
    assert m["f1_weighted"] == pytest.approx((2 * 2 / 3 + 1 * 2 / 3 + 0) / 4)


def test_free_text_reports_its_metric():
    m = score(TASKS["xbrl_term"], ["amount of cash paid"], ["amount of cash paid for taxes"])
    assert m["metric"] in ("rougeL_f1", "bertscore_f1") and 0 < m[m["metric"]] < 1


def test_rouge_l_matches_the_lcs_definition():
    from finlora.evaluate import rouge_l_f1

    # LCS("the cat sat", "the cat was sat") = 3 tokens: P = 3/3, R = 3/4
    assert rouge_l_f1("The cat sat", "the cat was sat") == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert rouge_l_f1("", "x") == 0.0 and rouge_l_f1("a b", "c d") == 0.0


def test_rouge_l_leaves_the_root_logger_alone():
    """rouge-score logs through absl, whose first log call would add a root handler bound
    to the sys.stderr of that moment. In a fresh process (pytest gives the root logger its
    own handlers, which hides that), scoring leaves the root logger without handlers."""
    import subprocess
    import sys

    code = ("import logging\nfrom finlora.evaluate import rouge_l_f1\n"
            "rouge_l_f1('the cat sat', 'the cat was sat')\nprint(logging.root.handlers)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]" and proc.stderr == ""


def test_unknown_dataset_lists_known():
    with pytest.raises(EvalError, match="known: fpb, fiqa"):
        parse_datasets("fpb,nosuch")


def test_bad_test_rows_are_reported_by_line(tmp_path):
    f = tmp_path / "fpb_test.jsonl"
    f.write_text('{"context": "a", "target": "positive"}\n'
                 '{"context": "b"}\n'
                 '{"context": "c", "target": "bullish"}\n'
                 'not json\n')
    with pytest.raises(EvalError) as e:
        load_examples(f, TASKS["fpb"])
    msg = str(e.value)
    assert f"{f}:2: missing field 'target'" in msg
    assert f"{f}:3: label 'bullish' is not one of negative, neutral, positive" in msg
    assert f"{f}:4: invalid JSON" in msg
    assert f"{f}:1" not in msg
    f.write_text('{"context": "a", "target": "n/a"}\n')
    with pytest.raises(EvalError, match=r":1: target 'n/a' is not a number"):
        load_examples(f, TASKS["formula"])


@pytest.mark.slow
def test_adapter_for_another_base_is_refused(tiny_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run["out"], adapter, ignore=shutil.ignore_patterns("prepared", "checkpoint-*"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    data = tmp_path / "fpb_test.jsonl"
    data.write_text(json.dumps({"context": "x", "target": "positive"}) + "\n")
    with pytest.raises(ModelError, match="was trained on 'meta-llama/Llama-3.1-8B-Instruct'"):
        main(["--base", str(tiny_run["base"]), "--adapter", str(adapter), "--datasets", "fpb",
              "--data-dir", str(tmp_path), "--out", str(tmp_path / "eval")])


@pytest.mark.slow
def test_eval_writes_report_and_batched_equals_single(tiny_run, tmp_path):
    data = tmp_path / "fpb_test.jsonl"
    data.write_text("".join(json.dumps({"context": SENTIMENT_PROMPT.format(text=t), "target": y}) + "\n"
                            for t, y in TINY_ROWS))
    reports = {}
    for bs in (8, 1):
        out = tmp_path / f"eval_bs{bs}"
        assert main(["--base", str(tiny_run["base"]), "--adapter", str(tiny_run["out"]), "--datasets", "fpb",
                     "--data-dir", str(tmp_path), "--out", str(out), "--batch-size", str(bs)]) == 0
        reports[bs] = out
    out = reports[8]
    metrics = json.loads((out / "metrics.json").read_text())["results"]
    assert set(metrics) == {"base", "adapter"} and metrics["adapter"]["fpb"]["n"] == len(TINY_ROWS)
    assert "| fpb | accuracy |" in (out / "report.md").read_text()
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    for key in ("base_fpb", "adapter_fpb"):
        batched = (out / f"predictions_{key}.jsonl").read_text().splitlines()
        single = (reports[1] / f"predictions_{key}.jsonl").read_text().splitlines()
        assert len(batched) == len(TINY_ROWS)
        assert [json.loads(r)["parsed"] for r in batched] == [json.loads(r)["parsed"] for r in single]
        row = json.loads(batched[0])
        assert set(row) == {"id", "generated", "parsed", "target"}


def test_shared_prefix_len_leaves_every_prompt_a_token():
    from finlora.evaluate import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token to feed
    assert shared_prefix_len([[1, 2, 3]]) == 0
    assert shared_prefix_len([[7, 1], [8, 1]]) == 0


@pytest.mark.slow
def test_shared_prefix_batches_generate_what_one_prompt_at_a_time_does(base_model_dir):
    """make eval's batches (left padding inside, prefix KV copied in) against plain
    per-prompt `model.generate` on the whole prompt: the base model rambles for all 8
    tokens, so every position after the prefix is exercised."""
    import torch

    from finlora.evaluate import generate
    from finlora.models import load_model

    model, tok = load_model(str(base_model_dir))
    prompts = [SENTIMENT_PROMPT.format(text=t) for t, _ in TINY_ROWS[:6]]
    plain = []
    with torch.inference_mode():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            g = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            plain.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True,
                                    clean_up_tokenization_spaces=False))
    ids = [tok(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) > 1  # uneven lengths: the padding sits between prefix and prompt
    for bs in (4, 6):
        assert generate(model, tok, prompts, 8, bs, share_prefix=True) == plain
    assert generate(model, tok, prompts, 8, 4, share_prefix=False) == plain
    assert not model.get_output_embeddings()._forward_pre_hooks  # generate's head hook is removed


@pytest.mark.slow
def test_bench_eval_prints_ratios_and_identical_counts(tiny_run, tmp_path):
    """python -m benchmarks.eval end to end on 6 prompts: three rows, each with its ratio, and
    every batched text identical to the one-at-a-time baseline's."""
    import subprocess
    import sys

    from finlora import ROOT

    data = tmp_path / "fpb_test.jsonl"
    data.write_text("".join(json.dumps({"context": SENTIMENT_PROMPT.format(text=t), "target": y}) + "\n"
                            for t, y in TINY_ROWS[:6]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--base", str(tiny_run["base"]),
                           "--adapter", str(tiny_run["out"]), "--data", str(data), "--n", "6", "--batch-size", "3",
                           "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith("6/6 / 6/6")]
    assert [r.split()[0] for r in rows] == ["one", "batched", "+"]
    assert rows[0].split()[-4] == "1.00x"
