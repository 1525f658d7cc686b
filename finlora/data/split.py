"""Duplicates, a seeded stratified train/test split, and the train/test leakage check.

Two examples are duplicates when their contexts match after folding case and white
space and their targets are equal. Rows with the same input text always land on the
same side of a split, so a split never leaks by itself.
"""

from __future__ import annotations

import random
from collections import defaultdict

from finlora.data.convert import Example, normalise


def dedupe(examples: list[Example]) -> tuple[list[Example], list[tuple[Example, Example]]]:
    """(kept, [(removed, the earlier copy it repeats)]), first occurrence kept, order kept."""
    seen: dict[tuple[str, str], Example] = {}
    kept, removed = [], []
    for e in examples:
        key = (normalise(e.context), e.target)
        if key in seen:
            removed.append((e, seen[key]))
        else:
            seen[key] = e
            kept.append(e)
    return kept, removed


def stratified_split(examples: list[Example], test_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Seeded split stratified by target, grouping identical input texts; source order kept."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        groups[normalise(e.text)].append(i)
    by_label: dict[str, list[str]] = defaultdict(list)
    for key, idx in groups.items():  # dicts keep first-seen order: deterministic
        by_label[examples[idx[0]].target].append(key)
    rng = random.Random(seed)
    test_keys: set[str] = set()
    for label in sorted(by_label):
        keys = by_label[label]
        n = round(len(keys) * test_fraction)
        test_keys.update(rng.sample(keys, n))
    test_idx = {i for k in test_keys for i in groups[k]}
    train = [e for i, e in enumerate(examples) if i not in test_idx]
    test = [e for i, e in enumerate(examples) if i in test_idx]
    return train, test


def overlaps(train: list[Example], test: list[Example]) -> list[tuple[Example, Example]]:
    """Pairs (train example, test example) with the same normalised input text."""
    index: dict[str, Example] = {}
    for e in test:
        index.setdefault(normalise(e.text), e)
    return [(e, index[normalise(e.text)]) for e in train if normalise(e.text) in index]


def oversample(examples: list[Example], seed: int, power: float = 0.0) -> list[Example]:
    """Training rows re-weighted by class: a class of n rows is repeated, in seeded random
    order, up to round(n_max * (n / n_max) ** power) rows (power 0: every class as large
    as the most frequent one; 0.5: square-root balancing; 1: unchanged), then all rows
    are shuffled. Each example appears floor(k) or ceil(k) times, so no row is favoured
    over another of its class."""
    by_label: dict[str, list[Example]] = defaultdict(list)
    for e in examples:
        by_label[e.target].append(e)
    if not by_label:
        return []
    rng = random.Random(seed)
    most = max(len(v) for v in by_label.values())
    out: list[Example] = []
    for label in sorted(by_label):
        rows = by_label[label]
        want = max(len(rows), round(most * (len(rows) / most) ** power))
        full, rest = divmod(want, len(rows))
        out += rows * full + rng.sample(rows, rest)
    rng.shuffle(out)
    return out
