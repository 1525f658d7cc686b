"""The two scorers of `make eval`, on the same predictions: `finlora`, FinLoRA's rules
(Open-Finance-Lab/FinLoRA test/test_dataset.py and inference.py at 7e1cf82) re-implemented,
and `strict`, the project's own view. Every rule and why: docs/EVAL.md, "Two scorers"."""

from __future__ import annotations

import re

from finlora.data.tasks import FIXES, NWGI7, SENTIMENT3, TASKS, TestSet, fold_nwgi

FINBERT = "ProsusAI/finbert"
FINBERT_LAYER = 10
BOOTSTRAP = 1000
SEED = 0


# --------------------------------------------------------------------------- FinLoRA's rules

def answer_text(generated: str) -> str:
    return generated.split("Answer:")[-1].strip()


def split_tags(text: str) -> list[str]:
    return [x.strip().replace("\n", "") for x in text.split(",")]


def first_label(answer: str, labels: list[str]) -> tuple[str | None, bool]:
    """(the lower-cased label found first in `answer` as a substring, whether a tie decided it)."""
    low = answer.lower()
    hits = [(i, lab) for lab in labels if (i := low.find(lab)) != -1]
    if not hits:
        return None, False
    first = min(i for i, _ in hits)
    at = [lab for i, lab in hits if i == first]
    return max(at, key=len), len(at) > 1


def finlora_items(s: TestSet, answers: list[str], targets: list[str]) -> tuple[list[str], list[str], list[int]]:
    """The (answer, target) items FinLoRA scores, one per row or one per tag for FiNER/FNXL, and
    the row of each (what the bootstrap draws)."""
    if s.scorer != "tags":
        return list(answers), list(targets), list(range(len(targets)))
    outs, tgts, rows = [], [], []
    for r, (a, t) in enumerate(zip(answers, targets)):
        pa, pt = split_tags(a), split_tags(t)
        outs += (pa + [""] * len(pt))[:len(pt)]
        tgts += pt
        rows += [r] * len(pt)
    return outs, tgts, rows


def finlora_labels(s: TestSet, answers: list[str], targets: list[str]) -> dict:
    """FinLoRA's accuracy and weighted F1 of label-like answers (see the module text)."""
    from sklearn.metrics import f1_score

    outs, tgts, rows = finlora_items(s, answers, targets)
    labels = sorted({t.lower() for t in tgts})
    correct, response, ties = [], [], 0
    for x, y in zip(outs, tgts):
        lab, tie = first_label(x, labels)
        ok = lab == y.lower()
        ties += tie
        correct.append(ok)
        response.append(y if ok else x)
    n = len(tgts)
    return {"n": n, "accuracy": sum(correct) / n, "f1_weighted": float(f1_score(tgts, response, average="weighted",
                                                                                 zero_division=0)),
            "ties": ties, "correct": correct, "response": response, "targets": tgts, "rows": rows}


def bertscore_f1(preds: list[str], refs: list[str], model: str = FINBERT) -> list[float]:
    """Per-row BERTScore F1 as FinLoRA's `evaluate.load("bertscore")` call computes it: the
    model's layer 10, no idf, no baseline rescaling, its slow tokenizer, batches of 64."""
    from bert_score import BERTScorer

    scorer = BERTScorer(model_type=model, num_layers=FINBERT_LAYER, idf=False, batch_size=64, lang=None,
                        rescale_with_baseline=False, use_fast_tokenizer=False)
    _, _, f1 = scorer.score(list(preds), [[r] for r in refs], batch_size=64)
    return [float(x) for x in f1]


def rouge_l(preds: list[str], refs: list[str]) -> list[float]:
    """ROUGE-L F1 by rouge-score. Its tokenizer is passed in although it is the default one:
    built without it, RougeScorer logs through absl, whose first log() adds a root logging
    handler bound to the sys.stderr of that moment (rouge-score 0.1.2, absl-py 2.5.1)."""
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import DefaultTokenizer

    scorer = RougeScorer(["rougeL"], tokenizer=DefaultTokenizer())
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]


def finlora_text(answers: list[str], targets: list[str], model: str = FINBERT) -> dict:
    try:
        values, metric = bertscore_f1(answers, targets, model), "bertscore_f1"
        note = f"BERTScore, {model} layer {FINBERT_LAYER}"
    except Exception as e:  # noqa: BLE001 - the model cannot be had here: say which metric stands in
        values, metric = rouge_l(answers, targets), "rougeL_f1"
        note = f"BERTScore unavailable ({type(e).__name__}: {str(e)[:120]}); ROUGE-L F1 instead"
    return {"n": len(values), metric: sum(values) / len(values), "metric": metric, "note": note, "values": values}


# --------------------------------------------------------------------------- our rules

def whole_word_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label whose first whole-word, case-insensitive occurrence comes first (the longer
    one at the same place: "strong negative" over "negative")."""
    low, best, best_pos = text.lower(), None, None
    for lab in sorted(labels, key=len, reverse=True):
        m = re.search(r"\b" + re.escape(lab.lower()) + r"\b", low)
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = lab, m.start()
    return best


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    try:
        return float(m.group().replace("$", "").replace(",", "").replace(" ", "")) if m else None
    except ValueError:
        return None


def strict_target(s: TestSet, target: str) -> str:
    """The target the strict block scores: TFNS's swapped labels repaired."""
    if s.fix:
        a, b = FIXES[s.fix]
        return b if target == a else a if target == b else target
    return target


def strict_blocks(s: TestSet, generated: list[str], targets: list[str]) -> dict[str, dict]:
    """{row name: scores}: one row per set, two for NWGI (exact 7 levels and folded to 3)."""
    from sklearn.metrics import f1_score

    task = TASKS[s.task]
    targets = [strict_target(s, t) for t in targets]
    if s.scorer == "text":
        values = rouge_l(generated, targets)
        return {s.name: {"n": len(values), "rougeL_f1": sum(values) / len(values), "metric": "rougeL_f1",
                         "values": values}}
    if task.answer_type == "number":
        preds = [first_number(g) for g in generated]
        ok = [p is not None and f"{p:.2f}" == f"{float(t.replace(',', '')):.2f}" for p, t in zip(preds, targets)]
        return {s.name: {"n": len(ok), "accuracy": sum(ok) / len(ok), "unparsed": sum(p is None for p in preds),
                         "metric": "accuracy", "correct": ok}}
    if not task.labels:  # tags and extraction: the whole answer (each tag) equal, case and spaces folded
        outs, tgts, rows = finlora_items(s, [answer_text(g) for g in generated], targets)
        ok = [" ".join(o.lower().split()) == " ".join(t.lower().split()) for o, t in zip(outs, tgts)]
        return {s.name: {"n": len(ok), "accuracy": sum(ok) / len(ok), "metric": "accuracy", "correct": ok,
                         "rows": rows}}
    views = [(s.name, task.labels, lambda x: x)]
    if task.labels == NWGI7:
        views = [(f"{s.name} (7 levels)", NWGI7, lambda x: x), (f"{s.name} (folded to 3)", SENTIMENT3, fold_nwgi)]
    out = {}
    for name, labels, fold in views:
        canon = {lab.lower(): lab for lab in labels}
        y_true = [canon[fold(t).lower()] for t in targets]
        preds = [whole_word_label(g, labels) for g in generated]
        y_pred = [p if p is not None else "<none>" for p in preds]
        ok = [a == b for a, b in zip(y_true, y_pred)]
        out[name] = {"n": len(ok), "accuracy": sum(ok) / len(ok), "metric": "accuracy", "correct": ok,
                     "f1_weighted": float(f1_score(y_true, y_pred, labels=list(labels), average="weighted",
                                                   zero_division=0)),
                     "unparsed": sum(p is None for p in preds), "y_true": y_true, "y_pred": y_pred}
    return out


def strict_valid(s: TestSet, target: str) -> bool:
    """Whether the data validator (finlora.data.convert) takes the target: one of the task's
    labels, a number, or text that is not blank."""
    from finlora.data.convert import Mapping, RowError, check_target

    try:
        return bool(check_target(TASKS[s.task], Mapping(), target).strip())
    except RowError:
        return False


# --------------------------------------------------------------------------- uncertainty

def weighted_f1(y_true, y_pred, rows, m):
    """scikit-learn's weighted F1 (labels: the union of both; no support, no weight; 0 where a
    label is neither true nor predicted) of every resample at once: `rows` is each item's row,
    `m` [rounds, rows] how often a resample draws each row. Per label F1 = 2 TP / (support +
    predicted), each count a sum of per-row counts weighted by m. tests/test_scoring.py pins it
    to scikit-learn. Not `f1_score` per resample: ~2.3 ms a call on 2,388 rows, 1,000 resamples
    and up to 6 of these per set and model (~15 s a set, and in every smoke), against 0.04 s here."""
    import numpy as np
    from scipy.sparse import csr_array

    codes = {v: i for i, v in enumerate(dict.fromkeys([*y_true, *y_pred]))}
    t, p, rows = np.array([codes[v] for v in y_true]), np.array([codes[v] for v in y_pred]), np.asarray(rows)

    def counts(r, x):  # [rounds, labels]: the items of each label in each resample
        return m @ csr_array((np.ones(len(x)), (r, x)), shape=(m.shape[1], len(codes)))

    hit = t == p
    support, predicted, tp = counts(rows, t), counts(rows, p), counts(rows[hit], t[hit])
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)
    return (support * f1).sum(axis=1) / support.sum(axis=1)


def bootstrap(block: dict, other: dict | None = None, rounds: int = BOOTSTRAP, seed: int = SEED) -> dict:
    """95% percentile intervals of the block's metrics over resampled rows (prompts: FiNER's and
    FNXL's tags of one prompt are drawn together, as they are not independent); with `other`
    (the same rows scored for another model), the interval of the paired difference block - other."""
    import numpy as np

    rows = np.asarray(block.get("rows", range(block["n"])))
    n = int(rows[-1]) + 1
    idx = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    # float: the products below are BLAS ones, and exact (sums of integers)
    m = np.bincount((idx + np.arange(rounds)[:, None] * n).ravel(), minlength=rounds * n).reshape(rounds, n) * 1.0
    items = m @ np.bincount(rows, minlength=n)

    def metrics(b: dict) -> dict:
        def mean(x):  # per resample: the mean over the items of the rows drawn
            return (m @ np.bincount(rows, weights=np.asarray(x, dtype=float), minlength=n)) / items

        out = {}
        if "correct" in b:
            out["accuracy"] = mean(b["correct"])
        if "values" in b:
            out[b["metric"]] = mean(b["values"])
        if "f1_weighted" in b:
            out["f1_weighted"] = weighted_f1(b.get("targets") or b["y_true"], b.get("response") or b["y_pred"], rows, m)
        return out

    mine, theirs = metrics(block), metrics(other) if other is not None else None
    return {k: [float(np.percentile(v if theirs is None else v - theirs[k], q)) for q in (2.5, 97.5)]
            for k, v in mine.items() if theirs is None or k in theirs}


def public(block: dict) -> dict:
    """A block as metrics.json keeps it: the figures, not the per-row lists."""
    return {k: v for k, v in block.items()
            if k not in ("correct", "response", "rows", "targets", "values", "y_true", "y_pred")}
