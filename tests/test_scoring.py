"""The two scorers of `make eval` on crafted answers whose scores are worked out by hand here.

`finlora`: FinLoRA's rules (finlora/scoring.py names them); `strict`: the project's own.
Every expected figure below is computed in the comment beside it, not by the code under test.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from finlora import scoring
from finlora.data.tasks import TEST_SETS


def fin(name, answers, targets):
    return scoring.finlora_labels(TEST_SETS[name], answers, targets)


def test_answer_is_the_text_after_the_last_answer_marker():
    assert scoring.answer_text(" positive\n") == "positive"
    # the model repeats the prompt's marker: FinLoRA keeps what follows the last one
    assert scoring.answer_text("positive\nAnswer: negative") == "negative"
    assert scoring.answer_text("Answer: Answer:  neutral ") == "neutral"


def test_first_label_is_a_substring_found_first_case_insensitive():
    labels = ["negative", "neutral", "positive"]
    assert scoring.first_label("It is NEUTRAL, not positive", labels) == ("neutral", False)
    assert scoring.first_label("neutralise", labels) == ("neutral", False)  # inside a word: still found
    assert scoring.first_label("no idea", labels) == (None, False)


def test_a_label_inside_another_word_decides_headline():
    # labels {yes, no}; "I do not know": "no" is found inside "not" at index 5, "yes" nowhere -> "no"
    m = fin("headline", ["I do not know", "Not mentioned", "yes, it does"], ["No", "No", "No"])
    # row 1 "no" == "no" correct; row 2 "not mentioned" has "no" at 0: correct; row 3 "yes" wrong -> 2/3
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert m["response"] == ["No", "No", "yes, it does"]


def test_not_mentioned_is_no_for_finlora_and_unparsed_for_strict():
    s = TEST_SETS["headline"]
    assert fin("headline", ["Not mentioned"], ["No"])["accuracy"] == 1.0
    strict = scoring.strict_blocks(s, ["Not mentioned"], ["No"])["headline"]
    assert strict["accuracy"] == 0.0 and strict["unparsed"] == 1  # "No" is no whole word of it


def test_weighted_f1_counts_a_wrong_answer_as_a_false_positive_only_where_it_equals_a_label():
    targets = ["positive", "positive", "negative", "neutral"]
    answers = ["positive", "negative", "I think negative", "nothing"]
    m = fin("fpb", answers, targets)
    # correct: rows 1 and 3 -> 0.5; predictions: positive, "negative" (raw, equals a label),
    # negative, "nothing" (raw, no label)
    assert m["accuracy"] == 0.5 and m["response"] == ["positive", "negative", "negative", "nothing"]
    # positive: TP 1, FN 1 -> P 1, R 1/2, F1 2/3, support 2; negative: TP 1, FP 1 (row 2) -> F1 2/3,
    # support 1; neutral: F1 0, support 1; "nothing": support 0, weight 0
    assert m["f1_weighted"] == pytest.approx((2 * 2 / 3 + 1 * 2 / 3 + 0) / 4)
    # had row 2 answered "bad" (no label), it would be no false positive for negative:
    # negative P 1 R 1 F1 1 -> (2 * 2/3 + 1 * 1 + 0) / 4
    assert fin("fpb", ["positive", "bad", "I think negative", "nothing"], targets)["f1_weighted"] == \
        pytest.approx((2 * 2 / 3 + 1) / 4)


def test_the_label_set_is_the_scored_rows_targets():
    # only "negative" and "positive" are targets: "neutral" in an answer is no label at all
    m = fin("fpb", ["neutral, maybe positive"], ["positive"])
    assert m["accuracy"] == 1.0  # "positive" is the only label found
    m = fin("fpb", ["neutral, maybe positive", "x"], ["positive", "neutral"])
    assert m["accuracy"] == 0.0  # now "neutral" is a label, found first in row 1


def test_ties_between_prefix_labels_go_to_the_longer_and_are_counted():
    # formula: "0.0" and "0.05" both start at 0 in "0.05"; FinLoRA's pick depends on set order
    m = fin("formula", ["0.05", "0.0", "13.05"], ["0.05", "0.0", "3.0"])
    # row 1: tie "0.0"/"0.05" at 0 -> "0.05": correct; row 2: "0.0" (and "0.05"? not in "0.0") -> correct;
    # row 3: "13.05" holds "3.0" at 1 and "0.05"? no ("13.05" has ".05" but "0.05" needs "0.") -> "3.0" correct
    assert m["accuracy"] == 1.0 and m["ties"] == 1


def test_finer_tags_are_split_padded_and_cut_to_the_target():
    s = TEST_SETS["finer"]
    tgt = "Revenues,Goodwill,LongTermDebtFairValue,Goodwill"
    answers = ["Revenues, Goodwill", "Revenues,Goodwill,LongTermDebtFairValue,Goodwill,Extra"]
    outs, tgts, rows = scoring.finlora_items(s, [scoring.answer_text(a) for a in answers], [tgt, tgt])
    assert outs[:4] == ["Revenues", "Goodwill", "", ""] and len(outs) == len(tgts) == 8
    assert rows == [0, 0, 0, 0, 1, 1, 1, 1]  # the prompt of each tag: what the bootstrap draws
    m = scoring.finlora_labels(s, answers, [tgt, tgt])
    # row 1: 2 of 4 tags right (the padded "" find no label); row 2: all 4 (Extra cut off) -> 6/8;
    # "longtermdebtfairvalue" is the only label starting there: no tie
    assert m["accuracy"] == pytest.approx(6 / 8) and m["n"] == 8


def test_nwgi_is_exact_for_finlora_and_both_ways_for_strict():
    s = TEST_SETS["nwgi"]
    answers, targets = ["moderately positive", "mildly negative"], ["mildly positive", "mildly negative"]
    assert fin("nwgi", answers, targets)["accuracy"] == 0.5  # 7 levels, exact
    strict = scoring.strict_blocks(s, answers, targets)
    assert strict["nwgi (7 levels)"]["accuracy"] == 0.5
    assert strict["nwgi (folded to 3)"]["accuracy"] == 1.0  # both positive, both negative


def test_tfns_strict_repairs_the_swapped_labels():
    s = TEST_SETS["tfns"]
    # published "neutral" is really "positive" (FinLoRA mapped TFNS ids 0/1/2 as negative/neutral/positive)
    assert scoring.strict_target(s, "neutral") == "positive" and scoring.strict_target(s, "negative") == "negative"
    assert fin("tfns", ["neutral"], ["neutral"])["accuracy"] == 1.0  # FinLoRA: as published
    assert scoring.strict_blocks(s, ["neutral"], ["neutral"])["tfns"]["accuracy"] == 0.0


def test_strict_formula_compares_numbers_to_two_decimals():
    s = TEST_SETS["formula"]
    b = scoring.strict_blocks(s, ["The NPV is $15,092.44.", "15092.4", "n/a"], ["15092.44", "15092.44", "1"])["formula"]
    assert b["accuracy"] == pytest.approx(1 / 3) and b["unparsed"] == 1


def test_fast_bootstrap_f1_is_scikit_learns():
    """Per resample of rows, holding 1 to 4 items each: scikit-learn's F1 of the drawn rows' items."""
    import numpy as np
    from sklearn.metrics import f1_score

    rng = random.Random(3)
    rows = [r for r in range(120) for _ in range(rng.randint(1, 4))]
    y_true = [rng.choice(["a", "b", "c"]) for _ in rows]
    y_pred = [rng.choice(["a", "b", "c", "raw text", "other"]) for _ in rows]
    idx = np.random.default_rng(0).integers(0, 120, size=(50, 120))
    m = np.array([np.bincount(i, minlength=120) for i in idx], dtype=float)
    fast = scoring.weighted_f1(y_true, y_pred, rows, m)
    items = {r: [k for k, row in enumerate(rows) if row == r] for r in range(120)}
    t, p = np.array(y_true, dtype=object), np.array(y_pred, dtype=object)
    slow = [f1_score(t[k], p[k], average="weighted", zero_division=0) for k in
            ([k for r in i for k in items[r]] for i in idx)]
    assert np.allclose(fast, slow, atol=1e-12)


def _percentiles(values):
    import numpy as np

    return [float(np.percentile(values, q)) for q in (2.5, 97.5)]


def test_bootstrap_intervals_hold_the_estimate_and_pair_the_rows():
    import numpy as np

    block = fin("fpb", ["positive"] * 60 + ["negative"] * 40, ["positive"] * 100)
    ci = scoring.bootstrap(block)
    assert ci["accuracy"][0] < block["accuracy"] == 0.6 < ci["accuracy"][1]
    # one item a row: the mean of 1,000 resamples of the rows, drawn as numpy draws them with seed 0
    idx = np.random.default_rng(0).integers(0, 100, size=(1000, 100))
    assert ci["accuracy"] == _percentiles(np.array(block["correct"], dtype=float)[idx].mean(axis=1))
    # the same rows against themselves: every resample's difference is 0
    assert scoring.bootstrap(block, block)["accuracy"] == [0.0, 0.0]


def test_a_tags_interval_resamples_prompts_not_tags():
    """FiNER: 40 prompts of 1 to 6 tags, every tag of a prompt right or every one wrong. Tags of
    one prompt rise and fall together, so drawing tags one by one narrows the interval; drawn by
    prompt, each resample's accuracy is its prompts' right tags over their tags."""
    import numpy as np

    rng = random.Random(5)
    n_tags = [rng.randint(1, 6) for _ in range(40)]
    targets = [",".join(["Revenues"] * k) for k in n_tags]
    answers = [t if p % 2 else "Goodwill" for p, t in enumerate(targets)]  # odd prompts all right
    block = scoring.finlora_labels(TEST_SETS["finer"], answers, targets)
    right = [k if p % 2 else 0 for p, k in enumerate(n_tags)]
    assert block["n"] == sum(n_tags) and block["accuracy"] == sum(right) / sum(n_tags)
    idx = np.random.default_rng(0).integers(0, 40, size=(1000, 40))
    by_prompt = _percentiles([sum(right[p] for p in i) / sum(n_tags[p] for p in i) for i in idx])
    ci = scoring.bootstrap(block)
    assert ci["accuracy"] == by_prompt
    n = block["n"]
    by_tag = _percentiles(np.array(block["correct"], dtype=float)[np.random.default_rng(0).integers(0, n, (1000, n))]
                          .mean(axis=1))
    assert by_tag[1] - by_tag[0] < by_prompt[1] - by_prompt[0]
    # the paired gain over a base that gets every tag wrong: the same prompts drawn for both
    base = scoring.finlora_labels(TEST_SETS["finer"], ["Goodwill"] * 40, targets)
    assert scoring.bootstrap(block, base)["accuracy"] == by_prompt


def test_rouge_l_matches_the_lcs_definition():
    # LCS("the cat sat", "the cat was sat") = 3 tokens: P = 3/3, R = 3/4
    assert scoring.rouge_l(["The cat sat"], ["the cat was sat"])[0] == pytest.approx(2 * 1 * 0.75 / 1.75)
    assert scoring.rouge_l(["", "a b"], ["x", "c d"]) == [0.0, 0.0]


def test_rouge_l_leaves_the_root_logger_alone():
    """rouge-score logs through absl, whose first log call would add a root handler bound to the
    sys.stderr of that moment; in a fresh process scoring leaves the root logger without handlers."""
    import subprocess
    import sys

    code = ("import logging\nfrom finlora.scoring import rouge_l\n"
            "rouge_l(['the cat sat'], ['the cat was sat'])\nprint(logging.root.handlers)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]" and proc.stderr == ""


def tiny_bert(path):
    """A 12-layer BERT of width 32 with a word-piece vocabulary of the words used below."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = "the cash paid for taxes amount of interest revenue deferred goodwill".split()
    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=512).save_pretrained(path)  # as FinBERT's
    cfg = BertConfig(vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                     intermediate_size=64)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def test_bertscore_runs_on_a_local_bert_at_finbert_layer(tmp_path):
    model = tiny_bert(tmp_path / "bert")
    f1 = scoring.bertscore_f1(["amount of cash paid", "the goodwill"], ["amount of cash paid", "interest revenue"],
                              model=str(model))
    assert f1[0] == pytest.approx(1.0, abs=1e-6)  # identical text: every token matches itself
    assert 0 < f1[1] < 1
    block = scoring.finlora_text(["amount of cash paid"], ["amount of cash paid"], str(model))
    assert block["metric"] == "bertscore_f1" and "layer 10" in block["note"]


def test_bertscore_says_which_metric_stands_in_when_the_model_cannot_be_had(tmp_path):
    block = scoring.finlora_text(["amount of cash paid"], ["amount of cash paid for taxes"], str(tmp_path / "nothing"))
    assert block["metric"] == "rougeL_f1" and block["note"].startswith("BERTScore unavailable")
    assert block["rougeL_f1"] == pytest.approx(2 * 1 * (4 / 6) / (1 + 4 / 6))


def test_a_sample_is_pandas_sample_with_finloras_seed(tmp_path):
    import pandas as pd

    from finlora.evaluate import read_rows

    s = TEST_SETS["fpb"]
    rows = [{"context": f"Instruction: x\nInput: row {i}\nAnswer: ", "target": "neutral"} for i in range(40)]
    (tmp_path / s.file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    got, sha = read_rows(s, tmp_path, sample=0.25)
    want = pd.read_json(tmp_path / s.file, lines=True).sample(frac=0.25, random_state=42)["context"].tolist()
    assert [r.context for r in got] == want and len(got) == 10 and len(sha) == 64


def test_strict_validator_leaves_out_rows_with_unknown_labels():
    s = TEST_SETS["ner"]
    assert scoring.strict_valid(s, "person") and not scoring.strict_valid(s, "Not mentioned")
    assert not scoring.strict_valid(TEST_SETS["formula"], "n/a")
    assert math.isclose(scoring.strict_blocks(s, ["person"], ["person"])["ner"]["accuracy"], 1.0)


# Label pools without a prefix pair (so no tie, where FinLoRA's result would follow Python's set
# order): sentiment words, FinLoRA's NER, XBRL-like tags, formula-like numbers.
POOLS = {"label": ["positive", "negative", "neutral", "Yes", "No", "PER", "ORG", "LOC", "12.5", "0.57", "2"],
         "tags": ["Revenues", "NetIncomeLoss", "Assets", "DebtInstrumentFaceAmount", "EffectiveIncomeTaxRate"]}


def _crafted(rng: random.Random, pool: list[str], target: str) -> str:
    """An answer of one of the shapes a model gives: the label, its case changed, inside text,
    inside another word, two labels, nothing of the pool, empty, a repeated Answer: marker."""
    other = rng.choice(pool)
    return rng.choice([target, target.upper(), f"The answer is {target.lower()}.", f"un{target}ly",
                       f"{other} or {target}", f"{target}, {other}", "I cannot tell", "",
                       f"{other}\nAnswer: {target}", f"  {other}  "])


@pytest.mark.parametrize("name", [n for n, s in TEST_SETS.items() if s.scorer != "text"])
def test_finlora_block_equals_finloras_own_functions(finlora_scorer, name):
    """Per registry set (its scorer kind), 400 rows of crafted answers: accuracy and weighted F1
    from FinLoRA's `evaluate_accuracy` (+ `process_batched` for FiNER/FNXL) and sklearn, as its
    `test_fin_tasks` calls them, equal ours to the last digit. No answer holds a tie."""
    from sklearn.metrics import f1_score

    s = TEST_SETS[name]
    rng = random.Random(name)
    pool = POOLS["tags" if s.scorer == "tags" else "label"]
    if s.scorer == "tags":
        targets = [", ".join(rng.choices(pool, k=rng.randint(1, 4))) for _ in range(400)]
        gens = [", ".join(_crafted(rng, pool, t) for t in tgt.split(", ")[:rng.randint(1, 5)]) for tgt in targets]
    else:
        labels = rng.sample(pool, 4)
        targets = [rng.choice(labels) for _ in range(400)]
        gens = [_crafted(rng, labels, t) for t in targets]
    answers = [scoring.answer_text(g) for g in gens]  # FinLoRA's inference(): after the last Answer:, stripped
    outs, tgts = answers, targets
    if s.scorer == "tags":
        outs, tgts = finlora_scorer["process_batched"](answers, targets)
    acc, response = finlora_scorer["evaluate_accuracy"](outs, tgts, list(set(tgts)))
    ours = scoring.finlora_labels(s, answers, targets)
    assert ours["ties"] == 0
    assert ours["n"] == len(tgts)
    assert ours["accuracy"] == acc
    assert ours["f1_weighted"] == f1_score(tgts, response, average="weighted")
    assert ours["response"] == response
