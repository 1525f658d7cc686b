"""`make params`: trainable LoRA parameters of a recipe, from the model config alone.

The model is built on the meta device (`AutoModelForCausalLM.from_config` under
`torch.device("meta")`): every shape is the real one, no memory is allocated and no
weights are read. For each targeted nn.Linear of shape (out, in), LoRA adds
A (r x in) and B (out x r), i.e. r * (in + out) parameters; DoRA adds a magnitude
vector of `out` more. rsLoRA changes only the scaling, not the count.

Llama 3.1 70B, r=4, q/k/v: q 4*(8192+8192) = 65,536; k and v 4*(8192+1024) = 36,864;
139,264 per block x 80 blocks = 11,141,120 of 70,553,706,496 parameters.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from finlora.errors import RecipeError
from finlora.recipes import DEFAULT_RECIPE, Recipe, model_config_dir, resolve_path


@dataclass
class ParamCount:
    config_dir: str
    r: int
    targets: list[str]
    dora: bool
    total_params: int                 # the base model, embeddings and lm_head included
    blocks: int                       # decoder layers
    per_module: "OrderedDict[str, int]"  # trainable per target module, one block
    shapes: dict[str, tuple[int, int]]   # (in, out) per target module
    per_block: int
    trainable: int
    linear_params: int = 0            # base params inside nn.Linear of the decoder (quantized)
    other_params: int = 0             # embeddings, lm_head, norms (kept 16/32-bit)
    hidden: int = 0
    heads: int = 0
    kv_heads: int = 0
    intermediate: int = 0
    vocab: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def factor(self) -> float:
        return self.total_params / self.trainable

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total_params


def build_meta_model(config_dir: str | Path):
    """The model with real shapes and no storage (meta device); never reads weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model, config


_cache: dict[str, tuple] = {}


def layer_linears(config_dir: str | Path):
    """(per-block {leaf name: (in, out)}, blocks, total params, linear params, config)."""
    key = str(Path(config_dir).resolve())
    if key in _cache:
        return _cache[key]
    import torch

    model, config = build_meta_model(config_dir)
    total = sum(p.numel() for p in model.parameters())
    block_linears: dict[str, tuple[int, int]] = {}
    linear_params = 0
    blocks = set()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            parts = name.split(".")
            idx = parts.index("layers")
            blocks.add(int(parts[idx + 1]))
            linear_params += mod.weight.numel() + (mod.bias.numel() if mod.bias is not None else 0)
            leaf = parts[-1]
            shape = (mod.in_features, mod.out_features)
            if block_linears.setdefault(leaf, shape) != shape:
                raise ValueError(f"{leaf}: blocks differ in shape; per-block counts need one shape")
    _cache[key] = (block_linears, len(blocks), total, linear_params, config)
    return _cache[key]


def count(config_dir: str | Path, r: int, targets: list[str], dora: bool = False) -> ParamCount:
    block_linears, blocks, total, linear_params, config = layer_linears(config_dir)
    missing = [t for t in targets if t not in block_linears]
    if missing:
        raise ValueError(f"target modules {missing} not in the model; it has {sorted(block_linears)}")
    per_module: OrderedDict[str, int] = OrderedDict()
    for t in targets:
        fan_in, fan_out = block_linears[t]
        per_module[t] = r * (fan_in + fan_out) + (fan_out if dora else 0)
    per_block = sum(per_module.values())
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    return ParamCount(
        config_dir=str(config_dir), r=r, targets=list(targets), dora=dora,
        total_params=total, blocks=blocks, per_module=per_module,
        shapes={t: block_linears[t] for t in targets}, per_block=per_block,
        trainable=per_block * blocks, linear_params=linear_params,
        other_params=total - linear_params, hidden=text.hidden_size, heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        intermediate=getattr(text, "intermediate_size", 0), vocab=text.vocab_size,
    )


# --------------------------------------------------------------------------- recipe facts


@dataclass
class RecipeSpec:
    """What params/plan need to know about a recipe, read from its YAML."""

    name: str
    config_dir: Path | None
    base_model: str
    bits: int
    r: int
    alpha: int
    targets: list[str]
    dora: bool
    rslora: bool
    optimizer: str
    seq_len: int
    micro_batch: int
    grad_accum: int
    gradient_checkpointing: bool
    flash_attention: bool
    deepspeed: str | None
    zero_stage: int
    offload_optimizer: bool
    cfg: dict = field(repr=False, default_factory=dict)

    @property
    def variant(self) -> str:
        if self.dora:
            return "DoRA"
        if self.rslora:
            return "rsLoRA"
        return "QLoRA" if self.bits == 4 else "LoRA"


def spec_from_cfg(name: str, cfg: dict) -> RecipeSpec:
    bits = 4 if cfg.get("load_in_4bit") else 8 if cfg.get("load_in_8bit") else 16
    ds = cfg.get("deepspeed")
    stage, offload = 0, False
    if ds:
        dsc = load_deepspeed(ds)
        zo = dsc.get("zero_optimization", {})
        stage = int(zo.get("stage", 0))
        offload = (zo.get("offload_optimizer") or {}).get("device") == "cpu"
    base = str(cfg.get("base_model", ""))
    return RecipeSpec(
        name=name,
        config_dir=model_config_dir(base) if base else None,
        base_model=base,
        bits=bits,
        r=int(cfg.get("lora_r") or 8),
        alpha=int(cfg.get("lora_alpha") or 16),
        targets=list(cfg.get("lora_target_modules") or []),
        dora=bool(cfg.get("peft_use_dora")),
        rslora=bool(cfg.get("peft_use_rslora")),
        optimizer=str(cfg.get("optimizer") or "adamw_torch"),
        seq_len=int(cfg.get("sequence_len") or 2048),
        micro_batch=int(cfg.get("micro_batch_size") or 1),
        grad_accum=int(cfg.get("gradient_accumulation_steps") or 1),
        gradient_checkpointing=bool(cfg.get("gradient_checkpointing")),
        # "no seq x seq score matrix": FlashAttention-2, or SDPA's flash/mem-efficient kernels on CUDA
        flash_attention=bool(cfg.get("flash_attention"))
        or str(cfg.get("attn_implementation") or "").startswith(("sdpa", "flash_attention")),
        deepspeed=ds,
        zero_stage=stage,
        offload_optimizer=offload,
        cfg=cfg,
    )


def load_spec(name_or_path: str) -> RecipeSpec:
    recipe = Recipe.open(name_or_path)
    return spec_from_cfg(recipe.name, recipe.config)


def load_deepspeed(ds: str | dict) -> dict:
    if isinstance(ds, dict):
        return ds
    p = resolve_path(ds)
    return json.loads(p.read_text(encoding="utf-8"))


def count_recipe(name_or_path: str) -> ParamCount:
    spec = load_spec(name_or_path)
    if spec.config_dir is None:
        raise RecipeError(f"{spec.name}: no local config.json for base_model {spec.base_model!r}"
                         " (build it with `make base-model`, or pass --config)")
    return count(spec.config_dir, spec.r, spec.targets, spec.dora)


def table(pc: ParamCount, title: str = "") -> str:
    lines = []
    if title:
        lines.append(title)
    lines.append(f"model config: {pc.config_dir}")
    lines.append(f"LoRA rank r={pc.r}, targets {','.join(pc.targets)}" + (" (DoRA: + magnitude)" if pc.dora else ""))
    lines.append("")
    lines.append(f"{'module':<12}{'in':>8}{'out':>8}  {'formula':<28}{'trainable':>14}")
    lines.append("-" * 70)
    for t, n in pc.per_module.items():
        fi, fo = pc.shapes[t]
        formula = f"{pc.r}*({fi}+{fo})" + (f"+{fo}" if pc.dora else "")
        lines.append(f"{t:<12}{fi:>8}{fo:>8}  {formula:<28}{n:>14,}")
    lines.append("-" * 70)
    lines.append(f"{'per block':<56}{pc.per_block:>14,}")
    lines.append(f"{'blocks':<56}{pc.blocks:>14,}")
    lines.append(f"{'trainable (LoRA) total':<56}{pc.trainable:>14,}")
    lines.append(f"{'full model parameters':<56}{pc.total_params:>14,}")
    lines.append(f"{'trainable share':<56}{pc.percent:>13.4f}%")
    lines.append(f"{'reduction factor (full / trainable)':<56}{pc.factor:>14,.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Trainable LoRA parameters from a model config (no weights)")
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path (same as --recipe)")
    p.add_argument("--recipe", dest="recipe_opt", help="recipe name or YAML path")
    p.add_argument("--config", help="path to a config.json (or its folder) instead of a recipe")
    p.add_argument("--r", type=int, help="LoRA rank (with --config; overrides the recipe's)")
    p.add_argument("--targets", help="comma-separated target modules (default q_proj,k_proj,v_proj)")
    p.add_argument("--dora", action="store_true", help="count DoRA's magnitude vectors too")
    a = p.parse_args(argv)
    recipe = a.recipe_opt or a.recipe
    if a.config:
        cdir = Path(a.config)
        cdir = cdir.parent if cdir.name == "config.json" else cdir
        targets = (a.targets or "q_proj,k_proj,v_proj").split(",")
        pc = count(cdir, a.r or 8, [t.strip() for t in targets if t.strip()], a.dora)
        print(table(pc))
        return 0
    spec = load_spec(recipe or DEFAULT_RECIPE)
    if spec.config_dir is None:
        raise RecipeError(f"{spec.name}: no local config.json for base_model {spec.base_model!r}"
                         " (run `make base-model`, or pass --config)")
    targets = [t.strip() for t in a.targets.split(",")] if a.targets else spec.targets
    pc = count(spec.config_dir, a.r or spec.r, targets, spec.dora or a.dora)
    print(table(pc, title=f"recipe {spec.name}: {spec.base_model}"))
    return 0
