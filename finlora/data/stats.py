"""Per-file statistics: rows, label counts, token-length percentiles; `make lengths`."""

from __future__ import annotations

import math
from collections import Counter

from finlora.data.convert import Example


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list."""
    k = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[k - 1]


def compute(examples: list[Example], labels: tuple[str, ...] | None) -> dict:
    stats: dict = {"rows": len(examples)}
    if labels is not None:
        c = Counter(e.target for e in examples)
        stats["labels"] = {lab: c.get(lab, 0) for lab in labels}
    else:
        stats["distinct_targets"] = len({e.target for e in examples})
    lengths = sorted(e.n_tokens for e in examples if e.n_tokens is not None)
    if lengths and len(lengths) == len(examples):
        stats["tokens"] = {f"p{q}": percentile(lengths, q) for q in (50, 90, 99)} | {"max": lengths[-1]}
    else:
        stats["tokens"] = None
    return stats


def table(entries: list[tuple[str, dict]]) -> str:
    """A plain-text table: one line per output file."""
    head = ["file", "rows", "p50", "p90", "p99", "max", "labels"]
    rows = []
    for name, s in entries:
        t = s.get("tokens") or {}
        labs = ", ".join(f"{k} {v}" for k, v in s["labels"].items()) if "labels" in s else f"{s.get('distinct_targets', 0)} distinct"
        rows.append([name, str(s["rows"]), *(str(t.get(k, "-")) for k in ("p50", "p90", "p99", "max")), labs])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in (0, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def main(argv: list[str] | None = None) -> int:
    """`make lengths [SRC=dir]`: per recipe task, the token lengths (Llama 3's tokenizer, prompt +
    answer + EOS) of FinLoRA's train and test files that this machine has (SRC, data/cache, or
    a download where FinLoRA's host answers), against the task's sequence_len."""
    import argparse
    import json
    from pathlib import Path

    from finlora.data import recipe_data
    from finlora.data.tasks import RECIPE_TASKS
    from finlora.lengths import Lengths, too_long, tokenizer_for
    from finlora.recipes import Recipe

    p = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    p.add_argument("--src", type=Path, help="a folder laid out as FinLoRA's data/ (as make data's SRC)")
    p.add_argument("--download", action="store_true", help="fetch the files not found from FinLoRA's repository")
    a = p.parse_args(argv)
    print("| task | file | rows | p50 | p95 | p99 | max | sequence_len | rows over it |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rt in RECIPE_TASKS.items():
        if rt.train is None:
            continue
        recipe = Recipe.open(f"{name}_r8")
        seq = recipe.number("sequence_len", None)
        found = tokenizer_for(recipe.base_model, None)
        lengths = Lengths.load(found.path)
        for f in [rt.train, *(s.source for s in rt.test_sets if s.source)]:
            path = recipe_data.locate(f, a.src)
            if path is None and a.download and recipe_data.online():
                path = recipe_data.download(f)
            if path is None:
                print(f"| {name} | {f.path} | not measured here (not on this machine) | | | | | {seq} | |")
                continue
            rows = [json.loads(line) for line in recipe_data.verified(f, path).read_text().splitlines() if line.strip()]
            n = sorted(lengths.trained_lengths([(r["context"], str(r["target"])) for r in rows]))
            print(f"| {name} | {f.path} | {len(n):,} | {percentile(n, 50):,} | {percentile(n, 95):,} | "
                  f"{percentile(n, 99):,} | {n[-1]:,} | {seq:,} | {len(too_long(n, seq)):,} |", flush=True)
    return 0
