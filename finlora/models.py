"""The one owner of loading and generation for `make eval` and `make infer`: a base (full
precision, bf16/fp16, 8-bit or 4-bit), with LoRA adapters on top or merged, and greedy
batched decoding. Adapters are checked against the base before any model loads."""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from finlora.cli import flag
from finlora.errors import FinLoRAError, ModelError
from finlora import ROOT


def add_model_args(p: argparse.ArgumentParser, takes: str) -> None:
    """The flags `make eval` and `make infer` share; `takes`: what --recipe gives besides the base."""
    p.add_argument("--recipe", help=f"take --base, {takes} from this recipe")
    p.add_argument("--base", help="base model folder or hub name")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--allow-base-mismatch", action="store_true")


def open_recipe(a: argparse.Namespace, error: type[FinLoRAError]):
    """The recipe --recipe names (None without one), with --base taken from it unless given."""
    from finlora import recipes

    recipe = recipes.Recipe.open(a.recipe) if a.recipe else None
    if recipe is not None:
        a.base = a.base or str(recipe.local(recipe.base_model) or recipe.base_model)
    if not a.base:
        raise error("give --recipe or --base")
    return recipe


def _normalise(name: str) -> str:
    p = Path(name) if Path(name).is_absolute() else ROOT / name
    return str(p.resolve()) if p.exists() else name.rstrip("/")


def check_adapter(adapter_dir: str | Path, base: str, allow_mismatch: bool = False, recipe: str | None = None) -> dict:
    """The adapter's config, after checking it is a PEFT adapter trained on `base` (`recipe`: its trainer)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise ModelError(f"no adapter at {adapter_dir} (no such folder): run `make train"
                         + (f" RECIPE={recipe}` first" if recipe else "` first"))
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


def load_base(path: str, dtype: str = "float32", quant: str | None = None):
    """Tokenizer and model. `quant` is None, "8bit" or "4bit" (bitsandbytes; runs on CPU too):
    4-bit is NF4 with double quantization, as FinLoRA evaluates and the r4 recipes train."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation appends on the right, so pad on the left
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    kwargs: dict = {"dtype": getattr(torch, dtype)}
    if quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    elif quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval(), tok


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_model(base: str, adapter: str | dict[str, str] | None = None, merged: str | None = None,
               dtype: str = "float32", quant: str | None = None, allow_base_mismatch: bool = False,
               report: list | None = None):
    """(model, tokenizer): the base, a merged model, or the base with adapters on it (a folder, or
    {name: folder}: one PeftModel, one base in memory). `report` gets (part, +RSS MiB, parameters)."""
    adapters = {"default": str(adapter)} if isinstance(adapter, (str, Path)) else dict(adapter or {})
    configs = [check_adapter(path, base, allow_base_mismatch) for path in adapters.values()]  # refusals first
    if quant == "8bit" and any(c.get("use_dora") for c in configs):
        # 8-bit DoRA fails at its second forward without CUDA (peft 0.20 + bitsandbytes 0.50)
        from finlora.patches import keep_int8_scale_on_cpu

        keep_int8_scale_on_cpu()
    before = rss_mib()
    model, tok = load_base(merged or base, dtype=dtype, quant=quant)
    parts = [("merged" if merged else "base", rss_mib() - before, sum(p.numel() for p in model.parameters()))]
    for name, path in adapters.items():
        from peft import PeftModel

        before = rss_mib()
        if isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, path, adapter_name=name).eval()
        params = sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n)
        parts.append((f"adapter {name}", rss_mib() - before, params))
    if report is not None:
        report += parts
    return model, tok


def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each to feed
    (0 for fewer than two sequences)."""
    if len(seqs) < 2:
        return 0
    first, limit = seqs[0], min(len(s) for s in seqs) - 1
    k = 0
    while k < limit and all(s[k] == first[k] for s in seqs):
        k += 1
    return k


@contextmanager
def contiguous_head_input(model):
    """While open, the output head gets a contiguous input. After prefill, transformers
    slices the last position out of the [batch, len, hidden] states, and that strided view
    makes torch.matmul broadcast the [vocab, hidden] head into a per-row bmm (155 ms a
    batch of 32 here, against ~10 ms as one matrix product)."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:])) if head else None
    try:
        yield
    finally:
        if hook:
            hook.remove()


def generate(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 32, desc: str = "generate",
             share_prefix: bool = True, progress: bool = True, **sampling) -> list[str]:
    """Greedy decoding in length-sorted, left-padded batches; results in input order.
    `sampling`: more `model.generate` arguments (`make infer`'s streamer and temperature).

    FinLoRA prompts of one task share a long instruction (25 of ~69 tokens for FPB). With
    `share_prefix`, the tokens all prompts start with are run through the model once and
    their KV cache is copied into every batch, so each prompt only computes its own
    tokens. The token sequences are exactly those of the whole prompts (the prefix is cut
    from the tokenised prompts, not from the text), and positions continue after the
    prefix: the attention mask is [prefix ones | left padding | prompt]."""
    import copy

    import torch
    from tqdm.auto import tqdm

    ids = tok(prompts)["input_ids"] if prompts else []  # one call: the fast tokenizer batches it
    plen = shared_prefix_len(ids) if share_prefix else 0
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(prompts)
    sampling = {"do_sample": False, "num_beams": 1} | sampling
    with torch.inference_mode(), contiguous_head_input(model), \
            tqdm(total=len(prompts), desc=desc, unit="ex", disable=not progress) as bar:
        prefix_cache = None
        if plen:
            prefix_cache = model(input_ids=torch.tensor([ids[0][:plen]], device=device), use_cache=True).past_key_values
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = plen + max(len(ids[i]) - plen for i in idx)
            inp = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                inp[r, :plen], mask[r, :plen] = torch.tensor(ids[i][:plen]), 1
                rest = ids[i][plen:]
                inp[r, width - len(rest):], mask[r, width - len(rest):] = torch.tensor(rest), 1
            extra = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(idx))
                extra["past_key_values"] = cache
            gen = model.generate(input_ids=inp.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, use_cache=True, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **sampling, **extra)
            for i, row in zip(idx, gen[:, width:]):  # the tokenizer's own clean-up, as FinLoRA decodes
                out[i] = tok.decode(row, skip_special_tokens=True)
            bar.update(len(idx))
    return out
