"""The recipe matrix: `recipes/matrix.yml` -> generated `recipes/<task>_<variant>.yml`.

Also the offline checks every recipe (generated or hand-written) must pass:

- `unknown_keys`: keys Axolotl's schema does not know, or knows only as deprecated.
  Axolotl itself drops unknown keys silently (`lora_rnak: 8` trains at the default
  rank), so this check is ours.
- `validate_recipe`: Axolotl's own validation, the steps `axolotl train` runs first
  (`axolotl.cli.config.load_cfg`: plugins -> `validate_config` -> `normalize_config`
  -> `normalize_cfg_datasets`), with the base model's architecture read from a
  config.json shipped in the repo, so that no weights and no hub access are needed.

`launch_command` maps `make train RECIPE=x GPUS=n NODES=m` to the command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

from finlora import ROOT

RECIPE_DIR = ROOT / "recipes"
MATRIX = RECIPE_DIR / "matrix.yml"
HEADER = "# generated from recipes/matrix.yml by `make recipes`; edit the matrix, not this file"
HAND_WRITTEN = {"smollm2_sentiment_r8"}
DS_DIR = RECIPE_DIR / "deepspeed"
ACCEL_DIR = RECIPE_DIR / "accelerate"

BITS_LABEL = {16: "bf16", 8: "int8", 4: "nf4"}


# --------------------------------------------------------------------------- matrix


def load_matrix(path: Path = MATRIX) -> dict:
    m = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key in ("models", "tasks", "common", "variants", "reference_gpus"):
        if key not in m:
            raise SystemExit(f"error: {path}: top-level key {key!r} is missing")
    for name, v in m["variants"].items():
        if v["model"] not in m["models"]:
            raise SystemExit(f"error: {path}: variants.{name}.model: no model {v['model']!r}")
        if v["bits"] not in BITS_LABEL:
            raise SystemExit(f"error: {path}: variants.{name}.bits must be one of 16, 8, 4")
    return m


def recipe_name(task: str, variant: str) -> str:
    return f"{task}_{variant}"


def recipe_names(matrix: dict | None = None) -> list[str]:
    m = matrix or load_matrix()
    return [recipe_name(t, v) for v in m["variants"] for t in m["tasks"]]


def model_config_dir_for(base_model: str, matrix: dict | None = None) -> Path | None:
    """The shipped config folder for a hub model id, or the local folder itself."""
    local = Path(base_model) if Path(base_model).is_absolute() else ROOT / base_model
    if base_model.startswith(("./", "/", "outputs/")):
        return local if (local / "config.json").is_file() else None
    m = matrix or load_matrix()
    for spec in m["models"].values():
        if spec["base_model"] == base_model:
            return ROOT / spec["config_dir"]
    return None


# --------------------------------------------------------------------------- rendering

# A recipe is built as a list of items: ("#", text) is a comment line ("" = blank
# line), (key, value, why) a key with its value and an inline comment.
Item = tuple


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        s = f"{v:.10f}".rstrip("0")
        return s + "0" if s.endswith(".") else s
    s = str(v)
    plain = re.fullmatch(r"[A-Za-z_./][A-Za-z0-9_./\-]*", s)
    if plain and s.lower() not in {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}:
        return s
    return json.dumps(s)


def _with_comment(line: str, why: str | None) -> str:
    if not why:
        return line
    return f"{line:<34}# {why}" if len(line) < 34 else f"{line}  # {why}"


def _render_value(key: str, value: Any, why: str | None, indent: str = "") -> list[str]:
    if isinstance(value, dict):
        out = [_with_comment(f"{indent}{key}:", why)]
        for k, v in value.items():
            out += _render_value(k, v, None, indent + "  ")
        return out
    if isinstance(value, list):
        out = [_with_comment(f"{indent}{key}:", why)]
        for v in value:
            if isinstance(v, dict):
                first = True
                for k, vv in v.items():
                    lines = _render_value(k, vv, None, indent + "    ")
                    if first:
                        lines[0] = f"{indent}  - " + lines[0][len(indent) + 4:]
                        first = False
                    out += lines
            else:
                out.append(f"{indent}  - {_scalar(v)}")
        return out
    return [_with_comment(f"{indent}{key}: {_scalar(value)}", why)]


def render(items: list[Item]) -> str:
    lines: list[str] = []
    for it in items:
        if it[0] == "#":
            lines.append(f"# {it[1]}".rstrip() if it[1] else "")
        else:
            key, value, why = it
            lines += _render_value(key, value, why)
    return "\n".join(lines) + "\n"


def items_to_dict(items: list[Item]) -> dict:
    return {it[0]: it[1] for it in items if it[0] != "#"}


def _section(title: str) -> list[Item]:
    return [("#", ""), ("#", f"--- {title} " + "-" * max(3, 73 - len(title)))]


def build_items(task: str, variant: str, m: dict) -> list[Item]:
    t = m["tasks"][task]
    v = m["variants"][variant]
    c = m["common"]
    model = m["models"][v["model"]]
    name = recipe_name(task, variant)
    bits = v["bits"]
    is_70b = "70b" in v["model"]
    rslora = bool(v.get("rslora", False))
    dora = bool(v.get("dora", False))
    ds = v.get("deepspeed")
    ref_gpus = int(m["reference_gpus"])
    # FinLoRA's accumulation is per GPU on `ref_gpus` GPUs; one process reaches the same
    # global batch by accumulating ref_gpus times as many micro batches.
    accum = t["gradient_accumulation_steps"] * ref_gpus
    global_batch = t["micro_batch_size"] * accum
    scale = v["lora_alpha"] / v["lora_r"]

    it: list[Item] = [
        ("#", HEADER[2:]),
        ("#", ""),
        ("#", f"{name}: {v['summary']}."),
        ("#", f"Model {model['label']}, task {task}. GPU recipe (SDPA attention, bitsandbytes);"),
        ("#", "the CPU default is recipes/smollm2_sentiment_r8.yml."),
        ("#", f"Run:    make train RECIPE={name} [GPUS=n] [NODES=m]   (after `make setup GPU=1`)"),
        ("#", f"Memory: make plan RECIPE={name} GPUS=n     Trainable parameters: make params RECIPE={name}"),
        ("#", f"Global batch {global_batch} = micro_batch_size {t['micro_batch_size']} x gradient_accumulation_steps "
              f"{accum} on one GPU, FinLoRA's {t['micro_batch_size']} x {t['gradient_accumulation_steps']} x {ref_gpus} GPUs;"),
        ("#", "`make train GPUS=n` divides the accumulation by n to keep it (and says so when it cannot)."),
    ]
    it += _section("model")
    it += [
        ("base_model", model["base_model"], "gated on the hub: accept the license, then `hf auth login`"),
        ("model_type", "LlamaForCausalLM", None),
        ("tokenizer_type", "AutoTokenizer", None),
        ("trust_remote_code", False, "plain Llama architecture: no remote code needed"),
        ("load_in_8bit", bits == 8, "LLM.int8 frozen base: half the memory of bf16" if bits == 8 else None),
        ("load_in_4bit", bits == 4,
         "NF4 + double quantization (Axolotl's qlora defaults), bf16 compute" if bits == 4 else None),
        ("special_tokens", {"eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
         "Instruct turns end in <|eot_id|>; 128004 is Llama 3.1's reserved pad"),
    ]
    it += _section("LoRA")
    adapter_why = ("Axolotl builds the 4-bit bitsandbytes config only for adapter: qlora"
                   if bits == 4 else "LoRA on a frozen base")
    it += [
        ("adapter", "qlora" if bits == 4 else "lora", adapter_why),
        ("lora_r", v["lora_r"], None),
        ("lora_alpha", v["lora_alpha"],
         f"alpha/sqrt(r) = {v['lora_alpha'] / v['lora_r'] ** 0.5:.2f} (rsLoRA scaling)" if rslora
         else f"scale alpha/r = {scale:g}, as in the reference recipe" if scale == 2
         else f"scale alpha/r = {scale:g}: FinLoRA's {v['lora_r']}-rank configs keep alpha {v['lora_alpha']}"),
        ("lora_dropout", c["lora_dropout"], None),
        ("lora_target_modules", list(c["lora_target_modules"]), c["why_targets"]),
        ("lora_fan_in_fan_out", False, "Llama stores Linear weights as (out, in)"),
        ("peft_use_rslora", rslora, "rank-stabilised scaling alpha/sqrt(r)" if rslora else None),
        ("peft_use_dora", dora,
         "adds a magnitude vector per output channel; slower: recomputes the weight norm each step"
         if dora else None),
        # Axolotl 0.19 turns its fused Triton LoRA kernels on for non-8-bit LoRA unless told
        # not to; they are CUDA-only and none has run under these recipes (or with ZeRO-3).
        ("lora_qkv_kernel", False, "Axolotl's fused LoRA kernels: off until proven with these recipes"),
        ("lora_o_kernel", False, None),
        ("lora_mlp_kernel", False, None),
        ("lora_embedding_kernel", False, None),
    ]
    it += _section("data")
    it += [
        ("#", f"FinLoRA {{\"context\", \"target\"}} JSONL at ./data/train/{task}_train.jsonl. The"),
        ("#", "context ends in \"Answer: \", so the prompt is the context as is and the loss"),
        ("#", "covers only the answer tokens (train_on_inputs: false)."),
        ("datasets", [{
            "path": f"./data/train/{task}_train.jsonl",
            "ds_type": "json",
            "type": {
                "field_instruction": "context",
                "field_output": "target",
                "format": "{instruction}",
                "no_input_format": "{instruction}",
            },
        }], None),
        ("dataset_prepared_path", f"./outputs/{name}/prepared", None),
        ("val_set_size", 0.0, "held-out scoring is `make eval`'s job"),
        ("train_on_inputs", False, None),
        ("sequence_len", t["sequence_len"], t["why_len"]),
        ("excess_length_strategy", "drop",
         "a longer row is left out, and the finlora plugin lists it (file:line, tokens); `raise` stops the run"),
        ("sample_packing", False, f"one example per row keeps the global batch = {global_batch} examples"),
        ("pad_to_sequence_len", False, None),
        ("shuffle_merged_datasets", True, None),
    ]
    it += _section("optimisation")
    opt_why = {
        "adamw_bnb_8bit": "8-bit AdamW states (bitsandbytes), as in the reference recipe",
        "paged_adamw_8bit": "QLoRA's optimizer: 8-bit states, paged to CPU on memory spikes",
    }.get(v["optimizer"])
    it += [
        ("seed", 42, None),
        ("num_epochs", t["num_epochs"], f"FinLoRA {t['finlora']}"),
        ("micro_batch_size", t["micro_batch_size"], "per GPU, FinLoRA's batch_size"),
        ("gradient_accumulation_steps", accum,
         f"FinLoRA's {t['gradient_accumulation_steps']} x its {ref_gpus} GPUs: global batch {global_batch} on one GPU"),
        ("optimizer", v["optimizer"], opt_why),
        ("learning_rate", c["learning_rate"], "every FinLoRA config"),
        ("lr_scheduler", "cosine", "FinLoRA's template"),
        ("warmup_steps", c["warmup_steps"], "FinLoRA's template"),
        ("weight_decay", 0.0, None),
        ("max_grad_norm", 1.0, None),
    ]
    it += _section("precision and speed")
    it += [
        ("bf16", "auto", "bf16 on Ampere or newer GPUs; fp16 on older ones"),
        ("fp16", False, None),
        ("tf32", False, "matmuls run in bf16; tf32 would only touch the fp32 LoRA math"),
        ("gradient_checkpointing", True,
         f"recompute activations in backward: {'80' if is_70b else '32'} layers x {t['sequence_len']} tokens"),
        ("gradient_checkpointing_kwargs", {"use_reentrant": True},
         "QLoRA + ZeRO-3 fails with non-reentrant checkpointing" if ds and "zero3" in ds
         else "Axolotl's default, written out"),
        ("attn_implementation", "sdpa",
         "torch SDPA (its flash/mem-efficient kernels on CUDA): no flash-attn build to install"),
        ("dataloader_num_workers", 0, "data is tokenised up front; collation is cheap"),
    ]
    it += _section("multi-GPU")
    if ds and "zero3" in ds:
        it += [
            ("#", "ZeRO-3 shards the frozen 4-bit base over the GPUs (70B NF4 is ~37 GB + bf16"),
            ("#", "embeddings). QLoRA + ZeRO-3 needs the 4-bit weights stored in a float dtype so"),
            ("#", "DeepSpeed can partition them: Axolotl sets bnb_4bit_quant_storage=bfloat16, and"),
            ("#", "skips prepare_model_for_kbit_training (no fp32 upcast of embeddings/norms)."),
            ("#", "On one 80 GB+ GPU ZeRO-3 adds nothing but works; needs `make setup GPU=1` (deepspeed)."),
            ("deepspeed", ds, None),
        ]
    else:
        it += [
            ("#", "Plain DDP when GPUS>1: every GPU holds the whole frozen base. FinLoRA's template"),
            ("#", "names ZeRO-1, which would shard only the LoRA optimizer state (tens of MB"),
            ("#", "here); use recipes/deepspeed/zero3.json to shard the base itself."),
            ("deepspeed", ds, None),
        ]
    it += _section("outputs")
    it += [
        ("output_dir", f"./outputs/{name}", None),
        ("save_safetensors", True, None),
        ("save_strategy", "epoch", "an adapter per epoch (a few MB each)"),
        ("save_total_limit", 2, None),
        ("logging_steps", 10, None),
        ("use_tensorboard", False, None),
        ("plugins", ["finlora.axolotl_plugin.FinLoRAPlugin"],
         "on a GPU only the loss log and curve (loss_log.jsonl, loss.png)"),
    ]
    return it


def generate(matrix: dict | None = None) -> dict[str, str]:
    """{recipe name: file text} for the whole matrix."""
    m = matrix or load_matrix()
    out = {}
    for variant in m["variants"]:
        for task in m["tasks"]:
            name = recipe_name(task, variant)
            if name in HAND_WRITTEN:
                raise SystemExit(f"error: matrix would overwrite hand-written recipe {name}")
            out[name] = render(build_items(task, variant, m))
    return out


README = ROOT / "README.md"
TABLE_START = "<!-- recipe-table:start (generated by `make recipes` from recipes/matrix.yml) -->"
TABLE_END = "<!-- recipe-table:end -->"


def readme_with_table(text: str) -> str:
    """README.md's text with the recipe table between the markers regenerated."""
    from finlora.plan import recipe_table

    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise SystemExit(f"error: {README}: recipe table markers not found ({TABLE_START!r} ... {TABLE_END!r})")
    return text[:start + len(TABLE_START)] + "\n" + recipe_table(include_default=False) + "\n" + text[end:]


def write_all(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR) -> list[Path]:
    from finlora.atomic import write_text

    written = []
    for name, text in generate(matrix).items():
        p = recipe_dir / f"{name}.yml"
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            write_text(p, text)
            written.append(p)
    if recipe_dir == RECIPE_DIR and README.is_file():
        old = README.read_text(encoding="utf-8")
        new = readme_with_table(old)
        if new != old:
            write_text(README, new)
            written.append(README)
    return written


def drift(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR) -> list[str]:
    """Messages for every generated recipe that differs from the matrix, is missing,
    or carries the generated header without a matrix entry (stale)."""
    expected = generate(matrix)
    problems = []
    for name, text in expected.items():
        p = recipe_dir / f"{name}.yml"
        if not p.is_file():
            problems.append(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: missing")
        elif p.read_text(encoding="utf-8") != text:
            problems.append(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: differs from the matrix")
    for p in sorted(recipe_dir.glob("*.yml")):
        if p.stem not in expected and p.read_text(encoding="utf-8").startswith(HEADER):
            problems.append(f"{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: "
                            "generated but no longer in the matrix (delete it)")
    if recipe_dir == RECIPE_DIR and README.is_file():
        text = README.read_text(encoding="utf-8")
        if readme_with_table(text) != text:
            problems.append("README.md: recipe table differs from the matrix")
    return problems


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
        config_dir=model_config_dir_for(base) if base else None,
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
    from finlora import recipes

    path = recipes.resolve(name_or_path)
    return spec_from_cfg(path.stem, recipes.load(path))


def load_deepspeed(ds: str | dict) -> dict:
    if isinstance(ds, dict):
        return ds
    p = Path(ds)
    p = p if p.is_absolute() else ROOT / p
    return json.loads(p.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- validation


class RecipeInvalid(ValueError):
    pass


def _names(fname: str, f) -> set[str]:
    """A schema field's name and the aliases a config may use for it."""
    names = {fname}
    for a in (f.alias, f.validation_alias):
        if isinstance(a, str):
            names.add(a)
        for choice in getattr(a, "choices", ()) or ():
            if isinstance(choice, str):
                names.add(choice)
    return names


def _field_names(model_cls) -> set[str]:
    names: set[str] = set()
    for fname, f in model_cls.model_fields.items():
        names |= _names(fname, f)
    return names


def _deprecation(f) -> str | None:
    """Axolotl's word that a schema field is deprecated, or None.

    Axolotl 0.19 marks deprecations three ways in its schema: pydantic's
    `Field(deprecated=...)` (the legacy attention flags, gc_steps, fsdp, ...), a
    description that starts with "Deprecated"/"[DEPRECATED]" (flash_attn_d512,
    sequence_parallel_degree), and the DeprecatedParameters class. Validators that log
    a deprecation are caught when `validate_recipe` runs them.
    """
    if f.deprecated:
        return str(getattr(f.deprecated, "message", f.deprecated))
    extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
    desc = str(extra.get("description") or f.description or "")
    if re.match(r"\s*\[?deprecated\b", desc, re.IGNORECASE):
        return desc.strip()
    return None


def deprecated_fields(model_cls) -> dict[str, str]:
    """{key or alias: Axolotl's hint} for the deprecated fields of one schema class."""
    out = {}
    for fname, f in model_cls.model_fields.items():
        hint = _deprecation(f)
        if hint:
            for name in _names(fname, f):
                out[name] = hint
    return out


def deprecated_keys() -> dict[str, str]:
    """{top-level key: hint} for every key Axolotl 0.19's config schema marks deprecated."""
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.deprecated import DeprecatedParameters

    out = {k: "no longer supported (axolotl.utils.schemas.deprecated)" for k in DeprecatedParameters.model_fields}
    out.update(deprecated_fields(AxolotlInputConfig))
    return out


def schema_keys() -> tuple[set[str], set[str]]:
    """(keys Axolotl's config schema accepts, keys it accepts only as deprecated).

    Plugin input schemas (`get_input_args`) are added for plugins that declare one.
    """
    from axolotl.utils.schemas.config import AxolotlInputConfig

    allowed = _field_names(AxolotlInputConfig)
    deprecated = set(deprecated_keys())
    return allowed - deprecated, deprecated


def _plugin_keys(plugins: Sequence[str]) -> set[str]:
    import importlib

    keys: set[str] = set()
    for dotted in plugins or []:
        mod, _, cls = dotted.rpartition(".")
        try:
            plugin = getattr(importlib.import_module(mod), cls)()
        except Exception:  # the validation proper reports unloadable plugins
            continue
        args = plugin.get_input_args() if hasattr(plugin, "get_input_args") else None
        if args:
            amod, _, acls = args.rpartition(".")
            keys |= _field_names(getattr(importlib.import_module(amod), acls))
    return keys


def unknown_keys(cfg: dict) -> list[str]:
    """Dotted names of keys Axolotl would ignore or rejects as deprecated."""
    from axolotl.utils.schemas.datasets import SFTDataset, UserDefinedPrompterType

    allowed, _ = schema_keys()
    deprecated = deprecated_keys()
    allowed |= _plugin_keys(cfg.get("plugins") or [])
    bad = []
    for k in cfg:
        if k in deprecated:
            bad.append(f"{k} (deprecated in Axolotl: {deprecated[k]})")
        elif k not in allowed:
            bad.append(k)
    ds_allowed = _field_names(SFTDataset)
    ds_deprecated = deprecated_fields(SFTDataset)
    type_allowed = _field_names(UserDefinedPrompterType)
    for group in ("datasets", "test_datasets"):
        for i, ds in enumerate(cfg.get(group) or []):
            if not isinstance(ds, dict):
                continue
            for k in ds:
                if k in ds_deprecated:
                    bad.append(f"{group}[{i}].{k} (deprecated in Axolotl: {ds_deprecated[k]})")
                elif k not in ds_allowed:
                    bad.append(f"{group}[{i}].{k}")
            if isinstance(ds.get("type"), dict):
                for k in ds["type"]:
                    if k not in type_allowed:
                        bad.append(f"{group}[{i}].type.{k}")
    return bad


KNOWN_DS_KEYS = {
    "zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "gradient_accumulation_steps",
    "gradient_clipping", "train_batch_size", "train_micro_batch_size_per_gpu", "wall_clock_breakdown",
    "steps_per_print", "zero_allow_untested_optimizer", "activation_checkpointing", "compile",
    "tensor_parallel",
}
KNOWN_ZERO_KEYS = {
    "stage", "overlap_comm", "contiguous_gradients", "sub_group_size", "reduce_bucket_size",
    "reduce_scatter", "allgather_partitions", "allgather_bucket_size", "round_robin_gradients",
    "offload_optimizer", "offload_param", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_gather_16bit_weights_on_model_save", "prefetch_bucket_size", "param_persistence_threshold",
    "max_live_parameters", "max_reuse_distance", "gather_16bit_weights_on_model_save", "zero_hpz_partition_size",
}


def check_deepspeed_json(ds: str) -> dict:
    """DeepSpeed is not importable on CPU machines (`make setup` without GPU=1), and
    Axolotl imports it only after validation (prepare_optim_env). We check the JSON
    ourselves: it parses, names a ZeRO stage 1-3, uses only known keys, and leaves
    batch sizes and precision to the recipe ("auto"), so that it cannot disagree."""
    p = ROOT / ds if not Path(ds).is_absolute() else Path(ds)
    if not p.is_file():
        raise RecipeInvalid(f"deepspeed: {ds} does not exist")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeInvalid(f"deepspeed: {ds}: not valid JSON: {e}") from None
    unknown = sorted(set(d) - KNOWN_DS_KEYS)
    zo = d.get("zero_optimization") or {}
    unknown += sorted(f"zero_optimization.{k}" for k in set(zo) - KNOWN_ZERO_KEYS)
    if unknown:
        raise RecipeInvalid(f"deepspeed: {ds}: unknown keys: {', '.join(unknown)}")
    if zo.get("stage") not in (1, 2, 3):
        raise RecipeInvalid(f"deepspeed: {ds}: zero_optimization.stage must be 1, 2 or 3")
    for k in ("gradient_accumulation_steps", "train_batch_size", "train_micro_batch_size_per_gpu"):
        if d.get(k) != "auto":
            raise RecipeInvalid(f"deepspeed: {ds}: {k} must be \"auto\" (the recipe sets it)")
    if (d.get("bf16") or {}).get("enabled") not in ("auto", True):
        raise RecipeInvalid(f"deepspeed: {ds}: bf16.enabled must be \"auto\"")
    return d


@contextlib.contextmanager
def _axolotl_log() -> Iterator[list]:
    """Collect (and keep off the console) what Axolotl's loggers say at WARNING or above.

    `make check` silences library logging with logging.disable(WARNING); Axolotl's
    loggers alone are let through here (the schema modules, imported by now, hold them),
    so other libraries' import-time warnings stay silent."""
    import logging

    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    import axolotl.utils.schemas.config  # noqa: F401 - creates the validators' loggers

    ax = logging.getLogger("axolotl")
    saved = (ax.handlers[:], ax.propagate)
    ax.handlers = [_Collect(logging.WARNING)]
    ax.propagate = False
    opened = [lg for name, lg in logging.Logger.manager.loggerDict.items()
              if (name == "axolotl" or name.startswith("axolotl.")) and isinstance(lg, logging.Logger)]
    for lg in opened:
        lg.isEnabledFor = lambda level: level >= logging.WARNING  # past logging.disable
    try:
        yield records
    finally:
        for lg in opened:
            del lg.isEnabledFor
        ax.handlers, ax.propagate = saved


GPU_CAPABILITIES = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}


@contextlib.contextmanager
def _as_gpu_host(enabled: bool) -> Iterator[None]:
    """Validate a GPU recipe as a GPU node would: the FinLoRA plugin's CPU shims off and
    bf16 reported available. Nothing else is faked; no CUDA call is made."""
    if not enabled:
        yield
        return
    from unittest import mock

    import axolotl.utils.config as axcfg

    import finlora.axolotl_plugin as plugin

    with mock.patch.object(plugin, "on_cpu", lambda: False), \
            mock.patch.object(axcfg, "is_torch_bf16_gpu_available", lambda: True):
        yield


def validate_recipe(
    path: str | Path,
    model_config_dir: str | Path | None = None,
    gpu: bool | None = None,
    n_gpu: int = 1,
) -> dict:
    """Validate one recipe offline; return Axolotl's normalized config.

    Raises RecipeInvalid naming the bad keys. `model_config_dir` defaults to the
    shipped config for the recipe's base_model (or the local base_model folder).
    `gpu` (default: the recipe names a hub model, flash attention or bitsandbytes)
    validates with a GPU's capabilities (bf16, sm_90), as `axolotl train` on a GPU node
    would see them. A deprecation that one of Axolotl's validators logs (rather than
    marks in the schema) is refused too, with Axolotl's message.
    """
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import normalize_cfg_datasets, normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise RecipeInvalid(f"{path}: not a YAML mapping")
    bad = unknown_keys(raw)
    if bad:
        raise RecipeInvalid(f"{path}: keys Axolotl does not accept: {', '.join(bad)}")
    if raw.get("deepspeed"):
        check_deepspeed_json(raw["deepspeed"])
    if model_config_dir is None:
        model_config_dir = model_config_dir_for(str(raw.get("base_model", "")))
        if model_config_dir is None:
            raise RecipeInvalid(f"{path}: no local config.json for base_model {raw.get('base_model')!r}")
    model_config_dir = Path(model_config_dir)
    if gpu is None:
        base = str(raw.get("base_model", ""))
        gpu = bool(raw.get("flash_attention") or raw.get("load_in_8bit") or raw.get("load_in_4bit")
                   or str(raw.get("attn_implementation") or "").startswith("flash")
                   or not base.startswith(("./", "/", "outputs/")))

    cfg = DictDefault(raw)
    cfg.axolotl_config_path = str(path)
    # Injected here, not written in the recipe: Axolotl also takes the tokenizer from
    # base_model_config, which holds no tokenizer; real runs read both from base_model.
    cfg.base_model_config = str(model_config_dir)
    if gpu:
        capabilities = dict(GPU_CAPABILITIES, n_gpu=n_gpu)
    else:
        from axolotl.cli.config import gpu_capabilities

        capabilities, _ = gpu_capabilities()
    import torch

    env_capabilities = {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}
    old_env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_RANK")}
    try:
        with _as_gpu_host(gpu), _axolotl_log() as records:
            prepare_plugins(cfg)
            try:
                cfg = validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
            except Exception as e:  # pydantic ValidationError, ValueError, DeprecationWarning
                raise RecipeInvalid(f"{path}: Axolotl rejects the config: {e}") from e
            deprecations = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
            if deprecations:
                raise RecipeInvalid(f"{path}: deprecated in Axolotl: {' | '.join(deprecations)}")
            # load_cfg's next steps, minus prepare_debug_log (writes into output_dir) and
            # prepare_optim_env (sets process env vars and imports deepspeed).
            cfg.base_model_config = str(model_config_dir)
            normalize_config(cfg)
            normalize_cfg_datasets(cfg)
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return cfg


# --------------------------------------------------------------------------- launch


def launch_command(
    recipe_path: str | Path,
    gpus: int | None = None,
    nodes: int | None = None,
    *,
    machine_rank: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command `make train RECIPE=x [GPUS=n] [NODES=m]` runs.

    - GPUS and NODES unset: `axolotl train recipes/x.yml`, for a CPU (one process;
      `make train` passes GPUS=1 where CUDA GPUs exist, since Axolotl's launcher would
      start one process per visible GPU).
    - GPUS=1: accelerate with recipes/accelerate/single_gpu.yaml.
    - GPUS=n>1: accelerate with multi_gpu.yaml and --num_processes n.
    - NODES=m>1 (GPUS = per node): multi_node.yaml, --num_machines m, --num_processes
      m*n, --machine_rank / --main_process_ip / --main_process_port from the arguments
      or else MACHINE_RANK / MASTER_ADDR / MASTER_PORT in the environment.
    Paths are written relative to the repository root, where `make` runs.
    """
    recipe = Path(recipe_path)
    if recipe.is_absolute() and recipe.is_relative_to(ROOT):
        recipe = recipe.relative_to(ROOT)
    recipe_s = str(recipe)
    extra = [str(a) for a in extra_args]
    for label, value in (("GPUS", gpus), ("NODES", nodes)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if gpus is None and nodes is None:
        return ["axolotl", "train", recipe_s, *extra]
    if nodes is not None and nodes > 1:
        if gpus is None:
            raise ValueError("NODES>1 needs GPUS (GPUs per node)")
        rank = machine_rank if machine_rank is not None else os.environ.get("MACHINE_RANK")
        ip = main_process_ip or os.environ.get("MASTER_ADDR")
        port = main_process_port or int(os.environ.get("MASTER_PORT", 29500))
        if rank is None or not ip:
            raise ValueError("NODES>1 needs the machine rank and the main node's address "
                             "(MACHINE_RANK and MASTER_ADDR; scripts/slurm_train.sh sets them from SLURM)")
        return [
            "accelerate", "launch", "--config_file", "recipes/accelerate/multi_node.yaml",
            "--num_machines", str(nodes), "--num_processes", str(nodes * gpus),
            "--machine_rank", str(rank), "--main_process_ip", ip, "--main_process_port", str(port),
            "-m", "axolotl.cli.train", recipe_s, *extra,
        ]
    gpus = gpus or 1
    config = "single_gpu.yaml" if gpus == 1 else "multi_gpu.yaml"
    return [
        "accelerate", "launch", "--config_file", f"recipes/accelerate/{config}",
        "--num_processes", str(gpus), "-m", "axolotl.cli.train", recipe_s, *extra,
    ]
