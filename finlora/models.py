"""Load a base model (full precision, bf16/fp16, 8-bit or 4-bit) with its tokenizer,
optionally with one or more LoRA adapters on top, as users do with PEFT.

Adapters are checked against the base before any generation: an adapter records the
base it was trained on (`base_model_name_or_path`), and a different one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from finlora.cli import flag
from finlora.errors import ModelError
from finlora import ROOT


def _normalise(name: str) -> str:
    p = Path(name) if Path(name).is_absolute() else ROOT / name
    return str(p.resolve()) if p.exists() else name.rstrip("/")


def check_adapter(adapter_dir: str | Path, base: str, allow_mismatch: bool = False) -> dict:
    """The adapter's config, after checking it is a PEFT adapter trained on `base`."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise ModelError(f"no trained adapter at {adapter_dir} (no such folder): train it first (`make train`)")
    if not cfg_path.is_file():
        raise ModelError(f"{adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    cfg = json.loads(cfg_path.read_text())
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelError(f"{adapter_dir}: no adapter_model.safetensors (only safetensors adapters are loaded)")
    recorded = cfg.get("base_model_name_or_path") or ""
    if recorded and not allow_mismatch and _normalise(recorded) != _normalise(base):
        raise ModelError(f"adapter {adapter_dir} was trained on {recorded!r}, not on base {base!r} "
                         f"(add {flag('--allow-base-mismatch')} if they are the same weights)")
    return cfg


def load_base(path: str, dtype: str = "float32", quant: str | None = None, for_generation: bool = True):
    """Tokenizer and model. `quant` is None, "8bit" or "4bit" (bitsandbytes; runs on CPU too)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if for_generation:
        tok.padding_side = "left"  # generation appends on the right, so pad on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if quant:
        from transformers import BitsAndBytesConfig

        if quant == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif quant == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=getattr(torch, dtype))
        else:
            raise ModelError(f"unknown quantisation {quant!r} (use 8bit or 4bit)")
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model, tok


def load_model(base: str, adapter: str | None = None, merged: str | None = None, dtype: str = "float32",
               quant: str | None = None, allow_base_mismatch: bool = False):
    """(model, tokenizer): the base, the base + one adapter (PeftModel), or a merged model."""
    config = check_adapter(adapter, base, allow_base_mismatch) if adapter else {}
    model, tok = load_base(merged or base, dtype=dtype, quant=quant)
    if adapter:
        from peft import PeftModel

        if quant == "8bit" and config.get("use_dora"):
            # 8-bit DoRA fails at its second forward without CUDA (peft 0.20 + bitsandbytes 0.50)
            from finlora.axolotl_plugin import keep_int8_scale_on_cpu

            keep_int8_scale_on_cpu()

        model = PeftModel.from_pretrained(model, adapter)
        model.eval()
    return model, tok
