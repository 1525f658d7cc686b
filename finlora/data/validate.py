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

from finlora import ROOT, recipes
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
    tokenizer: object | None
    tokenizer_path: Path | None
    note: str = ""

    @property
    def active(self) -> bool:
        return self.tokenizer is not None and self.sequence_len is not None


def load_length_check(recipe: str | Path | None, enabled: bool = True) -> LengthCheck:
    path = recipes.resolve(str(recipe or recipes.DEFAULT_RECIPE))
    cfg = recipes.load(path)
    seq = cfg.get("sequence_len")
    tok_name = cfg.get("tokenizer_config") or cfg.get("base_model")
    tok_path = recipes.resolve_path(str(tok_name)) if tok_name else None
    if not enabled:
        return LengthCheck(seq, None, tok_path, "token-length check disabled (--no-token-check)")
    if tok_path is None:
        return LengthCheck(seq, None, None, f"{path.name} names no base_model: token-length check skipped")
    if not tok_path.is_dir() and (str(tok_name).startswith((".", "/")) or (ROOT / str(tok_name)).exists()):
        return LengthCheck(seq, None, tok_path, f"tokenizer {tok_name} not found (run `make base-model`): "
                                                "token-length check and token stats skipped")
    try:
        if tok_path.is_dir():
            tok = _Lengths.load(tok_path)
        else:  # a hub id: only a cached copy, never a download from here
            from transformers import AutoTokenizer

            tok = _Lengths(AutoTokenizer.from_pretrained(str(tok_name), local_files_only=True))
            tok_path = Path(str(tok_name))
    except (OSError, ValueError) as e:
        hint = "not cached locally" if not tok_path.is_dir() else f"unreadable: {type(e).__name__}"
        return LengthCheck(seq, None, tok_path,
                           f"tokenizer {tok_name} {hint}: token-length check and token stats skipped")
    return LengthCheck(seq, tok, tok_path)


class _Lengths:
    """Token counts with the recipe's tokenizer. A saved fast tokenizer's tokenizer.json
    is read with the `tokenizers` library directly (same ids as AutoTokenizer, special
    tokens included, in a fraction of the start-up time); anything else via AutoTokenizer."""

    def __init__(self, hf_tokenizer=None, fast=None):
        self.hf, self.fast = hf_tokenizer, fast

    @classmethod
    def load(cls, path: Path) -> "_Lengths":
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return cls(fast=Tokenizer.from_file(str(path / "tokenizer.json")))
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def lengths(self, texts: list[str]) -> list[int]:
        if self.fast is not None:
            return [len(e.ids) for e in self.fast.encode_batch(texts)]
        return [len(ids) for ids in self.hf(texts)["input_ids"]]


def count_tokens(check: LengthCheck, examples: list[Example], batch: int = 512) -> None:
    """Set `n_tokens` on each example: context + target with the tokenizer's special
    tokens, plus one for the EOS token the trainer appends."""
    if check.tokenizer is None:
        return
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        for e, n in zip(chunk, check.tokenizer.lengths([e.context + e.target for e in chunk])):
            e.n_tokens = n + 1


def too_long(check: LengthCheck, examples: list[Example]) -> list[Problem]:
    if not check.active:
        return []
    return [Problem(e.file, e.line, f"too long: {e.n_tokens} tokens > sequence_len {check.sequence_len}")
            for e in examples if e.n_tokens is not None and e.n_tokens > check.sequence_len]


def sort_problems(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line, p.reason))
