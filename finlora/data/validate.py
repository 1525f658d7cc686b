"""Validation in one pass: every problem of every row (`file:line: reason`), before anything
is written; training rows' length by the one length rule (finlora.lengths)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

from finlora import recipes
from finlora.data.convert import Example, Mapping, Problem, convert_row
from finlora.data.sources import RawRow
from finlora.data.tasks import Task
from finlora.lengths import Lengths, tokenizer_for
from finlora.lengths import too_long as rule


def convert_all(task: Task, mapping: Mapping, rows: Iterable[RawRow]) -> tuple[list[Example], list[Problem]]:
    examples, problems = [], []
    for raw in rows:
        out = convert_row(task, mapping, raw)
        (problems if isinstance(out, Problem) else examples).append(out)
    # A column missing from every row of a file is one problem, not thousands.
    missing = Counter((p.file, p.reason) for p in problems if p.reason.startswith("missing field"))
    per_file = Counter(p.file for p in problems) + Counter(e.file for e in examples)
    collapse = {k for k, c in missing.items() if c == per_file[k[0]] and c > 1}
    if collapse:
        kept = [p for p in problems if (p.file, p.reason) not in collapse]
        for file, reason in sorted(collapse):
            first = min(p.line for p in problems if (p.file, p.reason) == (file, reason))
            kept.append(Problem(file, first, f"{reason} in every row ({missing[(file, reason)]} rows): check the column names"))
        problems = kept
    return examples, problems


@dataclass
class LengthCheck:
    """The recipe's tokenizer and sequence_len; `tokenizer` is None when unavailable."""

    sequence_len: int | None
    tokenizer: Lengths | None
    where: str = ""
    note: str = ""

    @property
    def active(self) -> bool:
        return self.tokenizer is not None and self.sequence_len is not None


def load_length_check(recipe: recipes.Recipe | None, enabled: bool = True) -> LengthCheck:
    """The length rule's inputs for `recipe` (the CPU default when None), as `make check` finds them."""
    r = recipe or recipes.Recipe.open(recipes.DEFAULT_RECIPE)
    seq = r.number("sequence_len", None)
    if not enabled:
        return LengthCheck(seq, None, "", "token-length check disabled (--no-token-check)")
    name = str(r.get("tokenizer_config") or r.base_model)
    found = tokenizer_for(name, r.local(name))
    if found.path is None:
        return LengthCheck(seq, None, "", f"{found.note}: token-length check and token stats skipped")
    return LengthCheck(seq, Lengths.load(found.path), found.where)


def count_tokens(check: LengthCheck, examples: list[Example]) -> None:
    """Set `n_tokens` on each example: context + target as trained (finlora.lengths)."""
    if check.tokenizer is None:
        return
    for e, n in zip(examples, check.tokenizer.trained_lengths([(e.context, e.target) for e in examples])):
        e.n_tokens = n


def too_long(check: LengthCheck, examples: list[Example]) -> list[Problem]:
    """The examples over sequence_len by the one rule (finlora.lengths.too_long)."""
    if not check.active:  # else `count_tokens` has run on `examples`
        return []
    return [Problem(examples[i].file, examples[i].line, f"too long: {n} tokens > sequence_len {check.sequence_len}")
            for i, n in rule([e.n_tokens for e in examples], check.sequence_len)]

