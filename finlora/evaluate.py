"""`make eval`: score base, adapter and merged models on the FinLoRA tasks.

Generation is batched greedy decoding (left padding, KV cache) over a task's test
JSONL; scoring follows FinLoRA: for classification the prediction is the task label
that appears first in the generated text (case-insensitive, whole words), scored by
accuracy and weighted F1; NWGI's seven levels are folded to three; formula answers
are compared as numbers rounded to two decimals; free-text tasks get ROUGE-L F1
(BERTScore when the `bert_score` package and its model are available offline).
"""

from __future__ import annotations

import argparse
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from finlora.errors import EvalError
from finlora import ROOT
from finlora.data.tasks import SENTIMENT3, TASKS, Task, fold_nwgi
from finlora.models import load_model

# Tasks a model can be scored on, and the test file each reads from --data-dir.
EVAL_SETS = ("fpb", "fiqa", "tfns", "nwgi", "headline", "ner", "formula", "xbrl_term", "financebench")
MAX_NEW_TOKENS = {"label": 8, "number": 16, "text": 64}


@dataclass
class Example:
    id: int
    context: str
    target: str


def test_file(data_dir: Path, name: str) -> Path:
    return data_dir / f"{name}_test.jsonl"


def parse_datasets(spec: str | None) -> list[str]:
    names = [s.strip() for s in (spec or "fpb,fiqa").split(",") if s.strip()]
    unknown = [n for n in names if n not in EVAL_SETS]
    if unknown:
        raise EvalError(f"unknown data set(s) {', '.join(unknown)}; known: {', '.join(EVAL_SETS)}")
    return names


def load_examples(path: Path, task: Task, limit: int | None = None) -> list[Example]:
    """Read a test JSONL with the data validator `make data` uses (JSON, fields, types,
    the task's labels or answer type); every bad row is reported as file:line before
    anything runs."""
    from finlora.data import sources
    from finlora.data.convert import Mapping
    from finlora.data.validate import convert_all, sort_problems

    if not path.is_file():
        raise EvalError(f"{path}: test file not found (run `make data` or pass --data-dir)")
    examples, problems = convert_all(task, Mapping(finlora=True), sources.read("finlora", path))
    if problems:
        problems = sort_problems(problems)
        shown = "\n".join(str(x) for x in problems[:50])
        more = f"\n... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise EvalError(f"{len(problems)} bad row(s) in {path}:\n{shown}{more}")
    rows = [Example(i, e.context, e.target) for i, e in enumerate(examples)]
    return rows[:limit] if limit else rows


# --- scoring -------------------------------------------------------------------

def first_label(text: str, labels: tuple[str, ...]) -> str | None:
    """The label whose first whole-word, case-insensitive occurrence comes first."""
    best, best_pos = None, None
    low = text.lower()
    # longer labels first so "strong negative" wins over "negative" at the same spot
    for lab in sorted(labels, key=len, reverse=True):
        m = re.search(r"\b" + re.escape(lab.lower()) + r"\b", low)
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = lab, m.start()
    return best


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?")


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    if not m:
        return None
    try:
        return float(m.group().replace("$", "").replace(",", "").replace(" ", ""))
    except ValueError:
        return None


def parse_prediction(task: Task, text: str) -> str | None:
    if task.answer_type == "label":
        labels = SENTIMENT3 if task.name == "nwgi" else task.labels
        return first_label(text, labels)
    if task.answer_type == "number":
        x = first_number(text)
        return None if x is None else f"{x:.2f}"
    return text.strip()


def score(task: Task, preds: list[str | None], targets: list[str]) -> dict:
    n = len(targets)
    if task.answer_type == "label":
        from sklearn.metrics import f1_score

        fold = fold_nwgi if task.name == "nwgi" else (lambda s: s)
        labels = SENTIMENT3 if task.name == "nwgi" else task.labels
        canon = {lab.lower(): lab for lab in labels}
        y_true = [canon[fold(t).lower()] for t in targets]
        y_pred = [p if p is not None else "<none>" for p in preds]
        acc = sum(a == b for a, b in zip(y_true, y_pred)) / n
        f1 = f1_score(y_true, y_pred, labels=list(labels), average="weighted", zero_division=0)
        return {"n": n, "accuracy": acc, "f1_weighted": float(f1),
                "unparsed": sum(p is None for p in preds), "metric": "accuracy"}
    if task.answer_type == "number":
        ok = [p is not None and abs(float(p) - round(float(t), 2)) < 0.005 for p, t in zip(preds, targets)]
        return {"n": n, "accuracy": sum(ok) / n, "unparsed": sum(p is None for p in preds), "metric": "accuracy"}
    metric, values = text_similarity([p or "" for p in preds], targets)
    return {"n": n, metric: sum(values) / n, "metric": metric}


def rouge_l_f1(pred: str, ref: str) -> float:
    """ROUGE-L F1 by rouge-score (tokens: lower-cased alphanumeric runs, no stemming).

    Its tokenizer is passed in although it is the default one: built without it,
    RougeScorer logs one INFO line through absl, and absl's log() calls
    logging.basicConfig() when the root logger has no handler. That adds a root handler
    bound to the sys.stderr of that moment, through which every library's warnings print
    from then on (measured with rouge-score 0.1.2, absl-py 2.5.1: root handlers [] ->
    [StreamHandler <stderr>]). Given a tokenizer, nothing in the ROUGE-L path logs."""
    from rouge_score.rouge_scorer import RougeScorer
    from rouge_score.tokenizers import DefaultTokenizer

    return RougeScorer(["rougeL"], tokenizer=DefaultTokenizer()).score(ref, pred)["rougeL"].fmeasure


def text_similarity(preds: list[str], refs: list[str]) -> tuple[str, list[float]]:
    try:
        from bert_score import score as bert_score  # optional extra

        _, _, f1 = bert_score(preds, refs, lang="en", verbose=False)
        return "bertscore_f1", [float(x) for x in f1]
    except Exception:  # not installed, or its model cannot be loaded offline
        return "rougeL_f1", [rouge_l_f1(p, r) for p, r in zip(preds, refs)]


# --- models and generation -----------------------------------------------------

def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each to feed
    (0 for fewer than two sequences)."""
    if len(seqs) < 2:
        return 0
    first, limit = seqs[0], min(len(s) for s in seqs) - 1
    k = 0
    while k < limit and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


@contextmanager
def contiguous_head_input(model):
    """While open, the output head gets a contiguous input. After prefill, transformers
    slices the last position out of the [batch, len, hidden] states, and that strided view
    makes torch.matmul broadcast the [vocab, hidden] head into a per-row bmm (155 ms a
    batch of 32 here, against ~10 ms as one matrix product)."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:])) if head else None
    try:
        yield
    finally:
        if hook:
            hook.remove()


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 32,
             desc: str = "generate", share_prefix: bool = True) -> list[str]:
    """Greedy decoding in length-sorted, left-padded batches; results in input order.

    FinLoRA prompts of one task share a long instruction (25 of ~69 tokens for FPB). With
    `share_prefix`, the tokens all prompts start with are run through the model once and
    their KV cache is copied into every batch, so each prompt only computes its own
    tokens. The token sequences are exactly those of the whole prompts (the prefix is cut
    from the tokenised prompts, not from the text), and positions continue after the
    prefix: the attention mask is [prefix ones | left padding | prompt]."""
    import copy

    import torch
    from tqdm.auto import tqdm

    ids = tok(prompts)["input_ids"] if prompts else []  # one call: the fast tokenizer batches it
    plen = shared_prefix_len(ids) if share_prefix else 0
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(prompts)
    with torch.inference_mode(), contiguous_head_input(model), tqdm(total=len(prompts), desc=desc, unit="ex") as bar:
        prefix_cache = None
        if plen:
            prefix_cache = model(input_ids=torch.tensor([ids[0][:plen]], device=device), use_cache=True).past_key_values
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = plen + max(len(ids[i]) - plen for i in idx)
            inp = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                inp[r, :plen], mask[r, :plen] = torch.tensor(ids[i][:plen]), 1
                rest = ids[i][plen:]
                inp[r, width - len(rest):], mask[r, width - len(rest):] = torch.tensor(rest), 1
            extra = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(idx))
                extra["past_key_values"] = cache
            gen = model.generate(input_ids=inp.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, use_cache=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **extra)
            for i, row in zip(idx, gen[:, width:]):
                out[i] = tok.decode(row, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            bar.update(len(idx))
    return out


def evaluate_set(model, tok, name: str, examples: list[Example], batch_size: int, label: str,
                 share_prefix: bool = True) -> tuple[dict, list[dict]]:
    task = TASKS[name]
    t0 = time.perf_counter()
    texts = generate(model, tok, [e.context for e in examples], MAX_NEW_TOKENS[task.answer_type],
                     batch_size, desc=f"{label}:{name}", share_prefix=share_prefix)
    secs = time.perf_counter() - t0
    preds = [parse_prediction(task, t) for t in texts]
    metrics = score(task, preds, [e.target for e in examples])
    metrics["seconds"] = round(secs, 2)
    rows = [{"id": e.id, "generated": t, "parsed": p, "target": e.target}
            for e, t, p in zip(examples, texts, preds)]
    return metrics, rows


# --- report --------------------------------------------------------------------

def headline(m: dict) -> float:
    return m[m["metric"]]


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    models = list(results)
    sets = list(dict.fromkeys(s for r in results.values() for s in r))
    cols = ["data set", "metric"] + models
    if len(models) == 2:
        cols.append(f"{models[1]} - {models[0]}")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for s in sets:
        first = next(r[s] for r in results.values() if s in r)
        metric_names = [first["metric"]] + (["f1_weighted"] if "f1_weighted" in first else [])
        for metric in metric_names:
            vals = [results[m].get(s, {}).get(metric) for m in models]
            cells = [s, metric] + [f"{v:.4f}" if v is not None else "-" for v in vals]
            if len(models) == 2:
                cells.append(f"{vals[1] - vals[0]:+.4f}" if None not in vals else "-")
            lines.append("| " + " | ".join(cells) + " |")
    n = {s: next(r[s]["n"] for r in results.values() if s in r) for s in sets}
    lines.append("")
    lines.append("Rows scored: " + ", ".join(f"{s} {k}" for s, k in n.items()) + ".")
    return "\n".join(lines) + "\n"


def bar_chart(results: dict[str, dict[str, dict]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from finlora.atomic import atomic_open

    models = list(results)
    sets = list(dict.fromkeys(s for r in results.values() for s in r))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(sets) + 2), 4), dpi=110)
    for k, m in enumerate(models):
        vals = [headline(results[m][s]) if s in results[m] else 0 for s in sets]
        bars = ax.bar([i + k * width for i in range(len(sets))], vals, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(sets))])
    ax.set_xticklabels([f"{s}\n({results[models[0]].get(s, {}).get('metric', '')})" for s in sets])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_open(out, "wb", encoding=None) as f:
        fig.savefig(f, format="png")
    plt.close(fig)


# --- CLI -----------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from finlora import recipes
    from finlora.atomic import write_json, write_jsonl, write_text

    p = argparse.ArgumentParser(description="Score base / adapter / merged models on FinLoRA test sets")
    p.add_argument("--recipe", help="take --base and --adapter from this recipe (name or YAML)")
    p.add_argument("--base", help="base model folder or hub name")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="LoRA adapter folder (scored against the base)")
    src.add_argument("--merged", help="merged model folder (scored against the base)")
    p.add_argument("--datasets", default="fpb,fiqa", help=f"comma list of: {', '.join(EVAL_SETS)}")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "test",
                   help="folder with <dataset>_test.jsonl files")
    p.add_argument("--out", type=Path, help="report folder (default: <adapter or merged>/eval)")
    p.add_argument("--limit", type=int, help="score only the first N rows of each set")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-base", action="store_true", help="skip scoring the base model")
    p.add_argument("--allow-base-mismatch", action="store_true")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="run every prompt in full instead of computing the prompts' shared prefix once")
    a = p.parse_args(argv)
    share = not a.no_prefix_cache

    if a.recipe:
        cfg = recipes.load(recipes.resolve(a.recipe))
        a.base = a.base or cfg["base_model"]
        if not a.merged and not a.adapter:
            a.adapter = str(recipes.resolve_path(cfg.get("output_dir", "")))
    if not a.base:
        raise EvalError("give --recipe or --base")
    names = parse_datasets(a.datasets)
    sets = {n: load_examples(test_file(a.data_dir, n), TASKS[n], a.limit) for n in names}
    tuned = a.adapter or a.merged
    out = a.out or (Path(tuned) / "eval" if tuned else ROOT / "outputs" / "eval")

    results: dict[str, dict[str, dict]] = {}
    preds: dict[str, list[dict]] = {}
    if a.merged:
        if not a.no_base:
            base_model, tok = load_model(a.base, dtype=a.dtype)
            for n, ex in sets.items():
                results.setdefault("base", {})[n], preds[f"base_{n}"] = evaluate_set(base_model, tok, n, ex, a.batch_size, "base", share)
            del base_model
        model, tok = load_model(a.base, merged=a.merged, dtype=a.dtype)
        for n, ex in sets.items():
            results.setdefault("merged", {})[n], preds[f"merged_{n}"] = evaluate_set(model, tok, n, ex, a.batch_size, "merged", share)
    else:
        model, tok = load_model(a.base, adapter=a.adapter, dtype=a.dtype, allow_base_mismatch=a.allow_base_mismatch)
        if a.adapter and not a.no_base:
            # The base is the same weights with the adapter switched off: no second load.
            with model.disable_adapter():
                for n, ex in sets.items():
                    results.setdefault("base", {})[n], preds[f"base_{n}"] = evaluate_set(model, tok, n, ex, a.batch_size, "base", share)
        label = "adapter" if a.adapter else "base"
        for n, ex in sets.items():
            results.setdefault(label, {})[n], preds[f"{label}_{n}"] = evaluate_set(model, tok, n, ex, a.batch_size, label,
                                                                                   share)

    for key, rows in preds.items():
        write_jsonl(out / f"predictions_{key}.jsonl", rows)
    meta = {"base": a.base, "adapter": a.adapter, "merged": a.merged, "data_dir": str(a.data_dir),
            "limit": a.limit, "dtype": a.dtype, "batch_size": a.batch_size,
            "prefix_cache": share}
    write_json(out / "metrics.json", {"meta": meta, "results": results})
    table = markdown_table(results)
    write_text(out / "report.md", f"# Evaluation\n\nbase: `{a.base}`  \n"
               f"{'adapter' if a.adapter else 'merged'}: `{tuned}`\n\n{table}")
    bar_chart(results, out / "scores.png")
    print(table)
    print(f"eval: wrote {out}/report.md, metrics.json, scores.png, predictions_*.jsonl")
    return 0

