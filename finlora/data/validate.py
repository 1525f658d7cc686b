"""Validation in one pass: every problem of every row, before anything is written.

Problems are `file:line: reason`: unreadable rows (invalid JSON, wrong field count),
missing, empty or wrongly typed fields, labels outside the task's set, and examples
longer than the recipe's `sequence_len` in tokens (context + target + the EOS token
the trainer appends, with the recipe's tokenizer).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from finlora import recipes
from finlora.data.convert import Example, Mapping, Problem, convert_row
from finlora.data.sources import RawRow
from finlora.data.tasks import Task


def convert_all(task: Task, mapping: Mapping, rows: Iterable[RawRow]) -> tuple[list[Example], list[Problem]]:
    examples, problems, n = [], [], 0
    for raw in rows:
        n += 1
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
    tokenizer_path: Path | None
    note: str = ""

    @property
    def active(self) -> bool:
        return self.tokenizer is not None and self.sequence_len is not None


def load_length_check(recipe: str | Path | None, enabled: bool = True) -> LengthCheck:
    r = recipes.Recipe.open(recipe or recipes.DEFAULT_RECIPE)
    seq = r.get("sequence_len")
    tok_name = r.get("tokenizer_config") or r.get("base_model")
    if not enabled:
        return LengthCheck(seq, None, None, "token-length check disabled (--no-token-check)")
    if not tok_name:
        return LengthCheck(seq, None, None, f"{r.path.name} names no base_model: token-length check skipped")
    local = r.local(str(tok_name))
    if local is not None and not local.is_dir():
        return LengthCheck(seq, None, local, f"tokenizer {tok_name} not found (run `make base-model`): "
                                             "token-length check and token stats skipped")
    try:
        if local is not None:
            tok, tok_path = Lengths.load(local), local
        else:  # a hub id: only a cached copy, never a download from here
            from transformers import AutoTokenizer

            tok = Lengths(AutoTokenizer.from_pretrained(str(tok_name), local_files_only=True))
            tok_path = Path(str(tok_name))
    except (OSError, ValueError) as e:
        hint = "not cached locally" if local is None else f"unreadable: {type(e).__name__}"
        return LengthCheck(seq, None, local, f"tokenizer {tok_name} {hint}: token-length check and token stats skipped")
    return LengthCheck(seq, tok, tok_path)


class Lengths:
    """Token counts with the recipe's tokenizer. A saved fast tokenizer's tokenizer.json
    is read with the `tokenizers` library directly (same ids as AutoTokenizer, special
    tokens included, in a fraction of the start-up time); anything else via AutoTokenizer."""

    def __init__(self, hf_tokenizer=None, fast=None):
        self.hf, self.fast = hf_tokenizer, fast

    @classmethod
    def load(cls, path: Path) -> "Lengths":
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return cls(fast=Tokenizer.from_file(str(path / "tokenizer.json")))
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def lengths(self, texts: list[str]) -> list[int]:
        if self.fast is not None:
            return [len(e.ids) for e in self.fast.encode_batch(texts)]
        return [len(ids) for ids in self.hf(texts)["input_ids"]]


def trained_lengths(lengths: Lengths, texts: list[str], batch: int = 512) -> list[int]:
    # Axolotl appends the EOS token to every training row: it counts against sequence_len.
    return [n + 1 for i in range(0, len(texts), batch) for n in lengths.lengths(texts[i:i + batch])]


def longer_than(counts: list[int], seq_len: int) -> list[tuple[int, int]]:
    """(index, count) of every count (from trained_lengths) over `seq_len`: the one rule
    `make data` and `make check` apply to training rows."""
    return [(i, n) for i, n in enumerate(counts) if n > seq_len]


def over_length(lengths: Lengths, texts: list[str], seq_len: int) -> list[tuple[int, int]]:
    """(index into `texts`, tokens with the appended EOS) of every text longer than `seq_len`."""
    return longer_than(trained_lengths(lengths, texts), seq_len)


def _text(e: Example) -> str:
    return e.context + e.target


def count_tokens(check: LengthCheck, examples: list[Example]) -> None:
    """Set `n_tokens` on each example: context + target as trained (see over_length)."""
    if check.tokenizer is None:
        return
    for e, n in zip(examples, trained_lengths(check.tokenizer, [_text(e) for e in examples])):
        e.n_tokens = n


def too_long(check: LengthCheck, examples: list[Example]) -> list[Problem]:
    """The examples over sequence_len, by the count `count_tokens` stored (made here when missing)."""
    if not check.active:
        return []
    if any(e.n_tokens is None for e in examples):
        count_tokens(check, examples)
    long = longer_than([e.n_tokens for e in examples], check.sequence_len)
    return [Problem(examples[i].file, examples[i].line, f"too long: {n} tokens > sequence_len {check.sequence_len}")
            for i, n in long]


def sort_problems(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.reason))
