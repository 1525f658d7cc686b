"""`make params`: the trainable LoRA parameters of a recipe, counted by PEFT on the meta device
(how, and the 70B example: docs/GPU.md, "Trainable parameters and memory"). The per-module
table groups the trainable tensors by the adapted module: r * (in + out), + out for DoRA.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from finlora.errors import RecipeError
from finlora.recipes import DEFAULT_RECIPE, Recipe


@dataclass(frozen=True)
class ParamCount:
    config_dir: str
    r: int
    targets: tuple[str, ...]
    dora: bool
    total_params: int                   # the base model, embeddings and lm_head included
    trainable: int                      # PEFT's count of what trains
    blocks: int                         # decoder layers holding an adapted module
    per_module: dict[str, int]          # trainable per target module, one block, in the targets' order
    shapes: dict[str, tuple[int, int]]  # (in, out) per target module

    @property
    def per_block(self) -> int:
        return sum(self.per_module.values())

    @property
    def factor(self) -> float:
        return self.total_params / self.trainable


def meta_model(config_dir: str | Path):
    """The model of `config_dir/config.json` with real shapes and no storage."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


@dataclass(frozen=True)
class Architecture:
    """What the memory planner reads off a model: sizes, and the nn.Linear layers of one block."""

    total_params: int
    linear_params: int                       # inside the decoder's nn.Linear layers (quantised)
    block_linears: dict[str, tuple[int, int]]  # leaf name -> (in, out)
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@lru_cache(maxsize=None)
def architecture(config_dir: str) -> Architecture:
    import torch

    model = meta_model(config_dir)
    linears: dict[str, tuple[int, int]] = {}
    linear_params = 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            linear_params += sum(p.numel() for p in mod.parameters())
            if linears.setdefault(name.rsplit(".", 1)[-1], (mod.in_features, mod.out_features)) != \
                    (mod.in_features, mod.out_features):
                raise RecipeError(f"{config_dir}: blocks differ in the shape of {name}; the planner needs one shape")
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    return Architecture(sum(p.numel() for p in model.parameters()), linear_params, linears,
                        text.num_hidden_layers, text.hidden_size, heads,
                        getattr(text, "num_key_value_heads", None) or heads,
                        getattr(text, "head_dim", None) or text.hidden_size // heads,
                        getattr(text, "intermediate_size", 0), text.vocab_size)


def count(config_dir: str | Path, r: int, targets, dora: bool = False) -> ParamCount:
    """PEFT's count for LoRA rank `r` on `targets` (cached per shape: a 70B model takes ~6 s)."""
    return _count(str(config_dir), int(r), tuple(targets), bool(dora))


@lru_cache(maxsize=None)
def _count(config_dir: str, r: int, targets: tuple[str, ...], dora: bool) -> ParamCount:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = get_peft_model(meta_model(config_dir), LoraConfig(r=r, lora_alpha=2 * r,
                                                                       target_modules=list(targets), use_dora=dora))
    except ValueError as e:  # a target module the model does not have
        raise RecipeError(f"lora_target_modules {list(targets)}: {e}") from None
    trainable, with_lora = peft_model.get_nb_trainable_parameters()
    per_module = dict.fromkeys((t for t in targets if "." not in t), 0)
    shapes: dict[str, tuple[int, int]] = {}
    blocks = set()
    for name, mod in peft_model.named_modules():
        if not isinstance(mod, LoraLayer):
            continue
        leaf, parts = name.rsplit(".", 1)[-1], name.split(".")
        if "layers" in parts:
            blocks.add(parts[parts.index("layers") + 1])
        if leaf not in shapes:  # the first of its name: one block's worth
            shapes[leaf] = (mod.in_features, mod.out_features)
            per_module[leaf] = sum(p.numel() for p in mod.parameters() if p.requires_grad)
    return ParamCount(str(config_dir), r, tuple(targets), dora, with_lora - trainable, trainable, len(blocks),
                      {k: v for k, v in per_module.items() if k in shapes}, shapes)


def count_recipe(recipe: Recipe) -> ParamCount:
    if recipe.config_dir is None:
        raise RecipeError(f"{recipe.where('base_model')}: base_model {recipe.base_model!r}: no local config.json "
                          "(build it with `make base-model`)")
    return count(recipe.config_dir, *recipe.lora_shape)


def table(pc: ParamCount, title: str = "") -> str:
    lines = [title] if title else []
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
    lines.append(f"{'trainable (LoRA) total, counted by PEFT':<56}{pc.trainable:>14,}")
    lines.append(f"{'full model parameters':<56}{pc.total_params:>14,}")
    lines.append(f"{'trainable share':<56}{100.0 * pc.trainable / pc.total_params:>13.4f}%")
    lines.append(f"{'reduction factor (full / trainable)':<56}{pc.factor:>14,.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Trainable LoRA parameters from a model config (no weights)")
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path (same as --recipe)")
    p.add_argument("--recipe", dest="recipe_opt", help="recipe name or YAML path")
    p.add_argument("--config", help="path to a config.json (or its folder) instead of a recipe")
    p.add_argument("--r", type=int, help="LoRA rank (with --config; overrides the recipe's)")
    p.add_argument("--targets", help="comma-separated target modules (default q_proj,k_proj,v_proj)")
    p.add_argument("--dora", action="store_true", help="count DoRA's magnitude vectors too")
    a = p.parse_args(argv)
    if a.r is not None and a.r < 1:
        raise RecipeError(f"--r {a.r}: the rank must be at least 1")
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip()) if a.targets else None
    if a.config:
        cdir = Path(a.config)
        cdir = cdir.parent if cdir.name == "config.json" else cdir
        if not (cdir / "config.json").is_file():
            raise RecipeError(f"--config {a.config}: no config.json there")
        print(table(count(cdir, a.r or 8, targets or ("q_proj", "k_proj", "v_proj"), a.dora)))
        return 0
    recipe = Recipe.open(a.recipe_opt or a.recipe or DEFAULT_RECIPE)
    pc = count_recipe(recipe)
    if a.r or targets or a.dora:
        pc = count(pc.config_dir, a.r or pc.r, targets or pc.targets, pc.dora or a.dora)
    print(table(pc, title=f"recipe {recipe.name}: {recipe.base_model}"))
    return 0
