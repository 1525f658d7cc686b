"""`make eval`: the base against an adapter (or a merged model) on FinLoRA's test sets, both
scorers on the same predictions (finlora.scoring), report and chart; docs/EVAL.md says what and how."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from finlora.cli import flag
from finlora import ROOT, scoring
from finlora.data.tasks import TEST_SETS, TestSet, test_set
from finlora.errors import EvalError
from finlora.models import add_model_args, check_adapter, generate, load_model, open_recipe

DATA_DIR = ROOT / "data" / "test"


@dataclass
class Row:
    id: int          # 0-based row of the file
    context: str
    target: str      # as the file holds it: the strict block's
    # as FinLoRA reads it, str() of pandas' read_json(lines=True) column, which coerces a column of
    # numbers ("1000000" beside "2.5" becomes "1000000.0"): the finlora block's
    finlora_target: str


def read_rows(s: TestSet, data_dir: Path, sample: float | None = None,
              limit: int | None = None) -> tuple[list[Row], str]:
    """The set's rows as FinLoRA reads them (every row of the file; `sample`: the rows of
    pandas' `sample(frac, random_state=42)`, in its order), and the file's sha256. Each row
    must be JSON with `context` and `target`; every bad row is listed as file:line."""
    path = data_dir / s.file
    if not path.is_file():
        how = "make data" if s.recipe_task == "sentiment_cpu" else f"make data TASK={s.recipe_task}"
        raise EvalError(f"{path}: test set {s.name} not found; `{how}` writes it")
    raw = path.read_bytes()
    text = raw.decode("utf-8", errors="replace")
    items, problems = [], []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict) or not isinstance(d.get("context"), str) or d.get("target") is None:
                raise ValueError("needs a string `context` and a `target`")
            items.append((d["context"], str(d["target"])))
        except ValueError as e:
            problems.append(f"  {path}:{i + 1}: {e}")
    if problems:
        raise EvalError(f"{len(problems)} bad row(s) in {path}:\n" + "\n".join(problems[:50]))
    if not items:
        raise EvalError(f"{path}: no rows")
    import pandas as pd

    fin = pd.read_json(io.StringIO(text), lines=True)["target"].tolist()
    rows = [Row(i, c, t, str(f)) for i, ((c, t), f) in enumerate(zip(items, fin, strict=True))]
    if sample is not None:
        rows = [rows[i] for i in pd.DataFrame({"i": range(len(rows))}).sample(frac=sample, random_state=42)["i"]]
    return rows[:limit] if limit else rows, hashlib.sha256(raw).hexdigest()


# --- scoring -------------------------------------------------------------------

def score_set(s: TestSet, rows: list[Row], generated: list[str], bertscore_model: str) -> dict:
    """Both blocks for one model's answers to one set, with their intervals."""
    answers = [scoring.answer_text(g) for g in generated]
    fin_targets, targets = [r.finlora_target for r in rows], [r.target for r in rows]
    if s.scorer == "text":
        fin = scoring.finlora_text(answers, fin_targets, bertscore_model)
    else:
        fin = scoring.finlora_labels(s, answers, fin_targets) | {"metric": "accuracy"}
    valid = [i for i, t in enumerate(targets) if scoring.strict_valid(s, scoring.strict_target(s, t))]
    strict = scoring.strict_blocks(s, [generated[i] for i in valid], [targets[i] for i in valid]) if valid else {}
    return {"finlora": fin, "strict": strict, "strict_rejected": len(rows) - len(valid)}


def with_intervals(res: dict, base: dict | None) -> dict:
    """The set's scores as metrics.json keeps them: figures and 95% intervals (and, given the
    base's, the paired interval of the difference); per-row lists dropped."""
    bootstrap, public = scoring.bootstrap, scoring.public
    out = {"finlora": public(res["finlora"]) | {"ci": bootstrap(res["finlora"])}, "strict": {},
           "strict_rejected": res["strict_rejected"]}
    if base is not None:
        out["finlora"]["ci_minus_base"] = bootstrap(res["finlora"], base["finlora"])
    for name, b in res["strict"].items():
        out["strict"][name] = public(b) | {"ci": bootstrap(b)}
        if base is not None and name in base["strict"]:
            out["strict"][name]["ci_minus_base"] = bootstrap(b, base["strict"][name])
    return out


def model_key(*paths: str | None) -> str:
    """What identifies a model for the cache: each local folder's weights and config (names,
    sizes, and the small files' bytes), or a hub id as given."""
    h = hashlib.sha256()
    for p in filter(None, paths):
        d = Path(p)
        if not d.is_dir():
            h.update(str(p).encode())
            continue
        for f in sorted(d.iterdir()):
            if f.suffix == ".safetensors":
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if f.stat().st_size < 64 << 20:  # adapters: their bytes
                    h.update(f.read_bytes())
            elif f.name in ("config.json", "adapter_config.json", "merge_info.json", "finlora_base_model.json"):
                h.update(f.read_bytes())
    return h.hexdigest()


# --- report --------------------------------------------------------------------

def fmt(metric: str, v: float) -> str:
    return f"{100 * v:.2f}" if metric == "accuracy" else f"{v:.3f}"


def published(info: dict, column: str, metric: str) -> float | None:
    """FinLoRA's published `column` figure ("base" or a variant) as a fraction, beside the metric
    it is only: accuracy, or the other figure (weighted F1, BERTScore F1 of the free-text sets);
    None beside any other (ROUGE-L where BERTScore could not be had)."""
    p = (info.get("published") or {}).get(column)
    if p is None:
        return None
    if metric == "accuracy":
        return None if p[0] is None else p[0] / 100
    return p[1] if metric in ("f1_weighted", "bertscore_f1") else None


def cell(block: dict | None, metric: str, key: str = "ci", value: float | None = None) -> str:
    """`value [low, high]` of a block's metric (or of `value`, with the interval under `key`)."""
    if not block or metric not in block:
        return "-"
    v, ci = block[metric] if value is None else value, block.get(key, {}).get(metric)
    return fmt(metric, v) + (f" [{fmt(metric, ci[0])}, {fmt(metric, ci[1])}]" if ci else "")


def report_table(doc: dict) -> str:
    """The FinLoRA-shaped table: per set and metric, base, tuned, the gain with its paired
    interval, FinLoRA's published base and same-variant figures, then the strict block(s)."""
    models = list(doc["results"])
    tuned = models[-1] if len(models) > 1 else None
    variant = doc["meta"].get("variant") or "r8"
    head = ["set", "rows", "metric", "base", tuned or "-", "gain", "FinLoRA base", f"FinLoRA {variant}",
            "strict: base", f"strict: {tuned or '-'}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, info in doc["sets"].items():
        res = {m: doc["results"][m][name] for m in models}
        fin = {m: r["finlora"] for m, r in res.items()}
        first = next(iter(fin.values()))
        for k, metric in enumerate([first["metric"]] + (["f1_weighted"] if "f1_weighted" in first else [])):
            b, a = fin.get("base"), fin.get(tuned)
            gain = "-"
            if a and b and metric in b:
                gain = ("+" if a[metric] >= b[metric] else "") + cell(a, metric, "ci_minus_base", a[metric] - b[metric])
            pub = [published(info, c, metric) for c in ("base", variant)]
            pub = ["-" if p is None else fmt(metric, p) for p in pub]
            strict = ["; ".join(f"{sn}: {cell(sb, metric if metric in sb else sb['metric'])}"
                                for sn, sb in res[m]["strict"].items()) if m in res else "-" for m in ("base", tuned)]
            lines.append("| " + " | ".join([name if k == 0 else "", str(first["n"]) if k == 0 else "", metric,
                                             cell(b, metric), cell(a, metric), gain, *pub, *strict]) + " |")
    return "\n".join(lines) + "\n"


def report_notes(doc: dict, sets: list[TestSet]) -> str:
    """What a reader of the table must know per set: the TFNS labels, ties, the free-text metric."""
    notes = []
    for s in sets:
        fin = next(iter(doc["results"].values()))[s.name]["finlora"]
        if s.fix:
            notes.append(f"- {s.name}: `finlora` scores the file as published, with FinLoRA's swapped labels "
                         "(the number comparable with FinLoRA's table); `strict` with them repaired.")
        if fin.get("ties"):
            notes.append(f"- {s.name}: {fin['ties']} answer(s) decided by a tie between labels found at the same "
                         "place (the longer wins; FinLoRA's pick depends on Python's set order).")
        if fin.get("note"):
            notes.append(f"- {s.name}: FinLoRA's free-text metric: {fin['note']}.")
    return "\n".join(notes) + ("\n" if notes else "")


def bar_chart(doc: dict, out: Path) -> None:
    """Per set: base and tuned (FinLoRA's scoring, 95% interval as error bars) beside FinLoRA's
    published base and same-variant figures (hatched)."""
    from finlora.loss_curve import save_png, subplots

    variant, sets = doc["meta"].get("variant") or "r8", list(doc["sets"])
    series = []  # (label, bar heights, error bars; None for FinLoRA's published figures)
    for m in doc["results"]:
        blocks = [doc["results"][m].get(s, {}).get("finlora") or {} for s in sets]
        vals = [b.get(b.get("metric"), 0) for b in blocks]
        cis = [b.get("ci", {}).get(b.get("metric"), [v, v]) for v, b in zip(vals, blocks)]
        series.append((m, vals, [[v - lo for v, (lo, _) in zip(vals, cis)], [hi - v for v, (_, hi) in zip(vals, cis)]]))
    first = next(iter(doc["results"].values()))
    for col in ("base", variant):
        series.append((f"FinLoRA {col}", [published(doc["sets"][s], col, first[s]["finlora"]["metric"])
                                          for s in sets], None))
    width = 0.8 / len(series)
    fig, ax = subplots(figsize=(max(6, 1.9 * len(sets) + 2), 4.2))
    for k, (label, vals, err) in enumerate(series):
        at = [i for i, v in enumerate(vals) if v is not None]  # no published figure for the metric: no bar
        bars = ax.bar([i + k * width for i in at], [vals[i] for i in at], width, label=label, yerr=err, capsize=2,
                      hatch=None if err else "//", alpha=1.0 if err else 0.6)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(sets))])
    ax.set_xticklabels(sets, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("FinLoRA's score (accuracy, or BERTScore F1 / ROUGE-L F1)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    save_png(fig, out)


# --- CLI -----------------------------------------------------------------------

def default_sets(recipe) -> list[TestSet]:
    from finlora.data.recipe_data import task_of_recipe
    from finlora.data.tasks import RECIPE_TASKS

    return RECIPE_TASKS[task_of_recipe(recipe)].test_sets


def parse_args(argv):
    p = argparse.ArgumentParser(description="Score base / adapter / merged models on FinLoRA's test sets")
    add_model_args(p, "the adapter and the default sets")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapter", help="LoRA adapter folder (scored against the base)")
    src.add_argument("--merged", help="merged model folder (scored against the base)")
    p.add_argument("--datasets", help=f"comma list of: {', '.join(TEST_SETS)} (default: the recipe task's)")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="folder holding the test files")
    p.add_argument("--out", type=Path, help="report folder (default: <adapter or merged>/eval)")
    p.add_argument("--sample", type=float, help="score the rows of FinLoRA's sample(frac, random_state=42)")
    p.add_argument("--limit", type=int, help="score only the first N rows of each set (after --sample)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bits", type=int, choices=(16, 8, 4),
                   help="the base's precision: 16 unquantized, 8 or 4 (NF4) by bitsandbytes "
                        "(default: the recipe's, as FinLoRA evaluates an adapter; without --recipe, 16)")
    p.add_argument("--no-base", action="store_true", help="skip scoring the base model")
    p.add_argument("--rescore", action="store_true", help="score sets again even when already scored")
    p.add_argument("--bertscore-model", default=scoring.FINBERT, help="hub id or local folder (FinLoRA's FinBERT)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="run every prompt in full instead of computing the prompts' shared prefix once")
    a = p.parse_args(argv)
    if a.sample is not None and not 0 < a.sample <= 1:
        raise EvalError(f"--sample {a.sample}: a fraction in (0, 1]")
    if a.limit is not None and a.limit < 1:
        raise EvalError(f"--limit {a.limit}: at least 1")
    return a


def main(argv: list[str] | None = None) -> int:
    from finlora import recipes
    from finlora.atomic import write_json, write_jsonl, write_text

    a = parse_args(argv)
    recipe = open_recipe(a, EvalError)
    bits = a.bits or (recipe.bits if recipe is not None else 16)
    quant = None if bits == 16 else bits  # None: unquantized, as recorded before 16 was a choice (kept in the cache)
    if recipe is not None and not a.merged and not a.adapter:
        a.adapter = str(recipe.output_dir)
    tuned = a.adapter or a.merged
    if a.adapter and not Path(a.adapter).is_dir():
        check_adapter(a.adapter, a.base, a.allow_base_mismatch, a.recipe)  # says so, and how to train it
    if a.merged and not Path(a.merged).is_dir():
        raise EvalError(f"no merged model at {a.merged} (no such folder)")
    if a.datasets:
        sets = [test_set(n.strip()) for n in a.datasets.split(",") if n.strip()]
    elif recipe is not None:
        sets = default_sets(recipe)
    else:
        raise EvalError("give --datasets (or --recipe, whose task names its sets)")
    loaded = {s.name: read_rows(s, a.data_dir, a.sample, a.limit) for s in sets}
    if a.adapter:  # the rest of the adapter's refusals, before any model loads
        check_adapter(a.adapter, a.base, a.allow_base_mismatch, a.recipe)
    for s in sets:
        rows = loaded[s.name][0]
        print(f"eval: {s.name:18} {len(rows):6,} rows of {a.data_dir / s.file}"
              + (f" (sample {a.sample})" if a.sample else "") + f", {s.max_new_tokens} new tokens at most", flush=True)
    print(f"eval: base {f'in {quant}-bit' if quant else 'unquantized'}, {a.dtype}"
          + (" (the recipe's precision; --bits to change it)" if a.bits is None and recipe is not None else ""))

    out = a.out or (Path(tuned) / "eval" if tuned else ROOT / "outputs" / "eval")
    old = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() and not a.rescore else {}
    variant = recipes.variant_of(recipe.name) if recipe is not None else None
    settings = {"dtype": a.dtype, "bits": quant, "batch_size": a.batch_size, "sample": a.sample, "limit": a.limit,
                "prefix_cache": not a.no_prefix_cache, "bertscore_model": a.bertscore_model}
    models = ([] if a.no_base else [("base", (a.base,))]) + ([("merged" if a.merged else "adapter", (a.base, tuned))]
                                                           if tuned else [])
    keys = {label: hashlib.sha256(json.dumps([model_key(*paths), settings]).encode()).hexdigest()
            for label, paths in models}
    doc = {"meta": {"base": a.base, "adapter": a.adapter, "merged": a.merged, "data_dir": str(a.data_dir),
                    "variant": variant, **settings},
           "sets": {s.name: {"file": s.file, "sha256": loaded[s.name][1], "scored": len(loaded[s.name][0]),
                             "max_new_tokens": s.max_new_tokens, "finlora_name": s.finlora_name,
                             "published": dict(s.published)}
                    for s in sets},
           "results": {}, "warnings": []}
    seconds: dict[tuple[str, str], float] = {}
    generated: dict[tuple[str, str], list[str]] = {}
    todo = []
    for label, _ in models:
        for s in sets:
            prev = old.get("results", {}).get(label, {}).get(s.name)
            pred = out / f"predictions_{label}_{s.name}.jsonl"
            same = prev and prev.get("key") == keys[label] and prev.get("data_sha256") == loaded[s.name][1]
            if same and pred.is_file():
                generated[label, s.name] = [json.loads(x)["generated"] for x in pred.read_text().splitlines()]
                print(f"eval: {label}:{s.name} already scored with this model, data and settings: kept "
                      f"({flag('--rescore')} to score it again)", flush=True)
            else:
                todo.append((label, s))
    model = None
    for label, _ in models:
        mine = [s for lab, s in todo if lab == label]
        if mine and (model is None or label == "merged"):
            model = tok = None  # the base leaves memory before the merged model loads
            model, tok = load_model(a.base, a.adapter, a.merged if label == "merged" else None, a.dtype,
                                    f"{quant}bit" if quant else None, a.allow_base_mismatch)
        # the base is the adapter's own weights with the adapter switched off: one load
        with model.disable_adapter() if mine and label == "base" and a.adapter else nullcontext():
            for s in mine:
                rows = loaded[s.name][0]
                t0 = time.perf_counter()
                generated[label, s.name] = generate(model, tok, [r.context for r in rows], s.max_new_tokens,
                                                    a.batch_size, desc=f"{label}:{s.name}",
                                                    share_prefix=not a.no_prefix_cache)
                seconds[label, s.name] = round(time.perf_counter() - t0, 2)
    for s in sets:
        rows = loaded[s.name][0]
        scored = {}
        for label, _ in models:
            gen = generated[label, s.name]
            scored[label] = score_set(s, rows, gen, a.bertscore_model)
            write_jsonl(out / f"predictions_{label}_{s.name}.jsonl",
                        ({"id": r.id, "generated": g, "answer": scoring.answer_text(g), "target": r.target,
                          **({"target_finlora": r.finlora_target} if r.finlora_target != r.target else {}),
                          **({"target_repaired": scoring.strict_target(s, r.target)} if s.fix else {})}
                         for r, g in zip(rows, gen)))
        for label, _ in models:
            base = scored.get("base") if label != "base" else None
            prev = old.get("results", {}).get(label, {}).get(s.name, {})
            secs = seconds.get((label, s.name), prev.get("seconds"))
            doc["results"].setdefault(label, {})[s.name] = {"key": keys[label], "data_sha256": loaded[s.name][1],
                                                            "seconds": secs, **with_intervals(scored[label], base)}
        if len(models) == 2 and generated[models[0][0], s.name] == generated[models[1][0], s.name]:
            doc["warnings"].append(f"{s.name}: the {models[1][0]} answered exactly as the base on every row: "
                                   "was the adapter applied (or trained)?")
    for w in doc["warnings"]:
        print(f"eval: warning: {w}")
    write_json(out / "metrics.json", doc)
    table, notes = report_table(doc), report_notes(doc, sets)
    write_text(out / "report.md", f"# Evaluation\n\nbase: `{a.base}`  \n"
               + (f"{models[-1][0]}: `{tuned}`\n\n" if tuned else "\n")
               + "FinLoRA's scoring (`finlora`), with 95% bootstrap intervals; the gain's interval is a paired "
               "bootstrap. FinLoRA's published figures are Llama-3.1-8B-Instruct's (README at 635333b). "
               "`strict` is the project's own scoring.\n\n" + table + ("\n" + notes if notes else ""))
    bar_chart(doc, out / "scores.png")
    print(table)
    print(f"eval: wrote {out}/report.md, metrics.json, scores.png, predictions_*.jsonl")
    return 0
