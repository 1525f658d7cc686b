"""Per-file statistics: rows, label counts, token-length percentiles."""

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
