"""Axolotl's view of a recipe, offline: the checks every recipe (generated or
hand-written) must pass before anything loads.

- `unknown_keys`: keys Axolotl's schema does not know, or knows only as deprecated.
  Axolotl itself drops unknown keys silently (`lora_rnak: 8` trains at the default
  rank), so this check is ours.
- `validate`: Axolotl's own validation, the steps `axolotl train` runs first
  (`axolotl.cli.config.load_cfg`: plugins -> `validate_config` -> `normalize_config`
  -> `normalize_cfg_datasets`), with the base model's architecture read from a
  config.json shipped in the repo, so that no weights and no hub access are needed.
- `check_deepspeed_json`: a recipe's DeepSpeed config, without importing DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

from finlora.errors import RecipeError
from finlora.recipes import Recipe, is_local, rel, resolve_path


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
    p = resolve_path(ds)
    if not p.is_file():
        raise RecipeError(f"deepspeed: {ds} does not exist")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecipeError(f"deepspeed: {ds}: not valid JSON: {e}") from None
    unknown = sorted(set(d) - KNOWN_DS_KEYS)
    zo = d.get("zero_optimization") or {}
    unknown += sorted(f"zero_optimization.{k}" for k in set(zo) - KNOWN_ZERO_KEYS)
    if unknown:
        raise RecipeError(f"deepspeed: {ds}: unknown keys: {', '.join(unknown)}")
    if zo.get("stage") not in (1, 2, 3):
        raise RecipeError(f"deepspeed: {ds}: zero_optimization.stage must be 1, 2 or 3")
    for k in ("gradient_accumulation_steps", "train_batch_size", "train_micro_batch_size_per_gpu"):
        if d.get(k) != "auto":
            raise RecipeError(f"deepspeed: {ds}: {k} must be \"auto\" (the recipe sets it)")
    if (d.get("bf16") or {}).get("enabled") not in ("auto", True):
        raise RecipeError(f"deepspeed: {ds}: bf16.enabled must be \"auto\"")
    return d


@contextlib.contextmanager
def _axolotl_log() -> Iterator[list]:
    """Collect what Axolotl's loggers say at WARNING or above (its validators log some
    deprecations rather than raising them), and keep the console quiet meanwhile: Axolotl's
    records go to the collector only, other loggers' below ERROR nowhere (standard logging
    levels and handlers, set back afterwards)."""
    import logging

    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    ax, root = logging.getLogger("axolotl"), logging.getLogger()
    saved = (ax.handlers[:], ax.propagate, ax.level, root.level)
    ax.handlers, ax.propagate = [_Collect(logging.WARNING)], False
    ax.setLevel(logging.WARNING)
    root.setLevel(logging.ERROR)
    try:
        yield records
    finally:
        ax.handlers, ax.propagate = saved[0], saved[1]
        ax.setLevel(saved[2])
        root.setLevel(saved[3])


GPU_CAPABILITIES = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}


def validate(
    recipe: Recipe,
    model_config_dir: str | Path | None = None,
    gpu: bool | None = None,
    n_gpu: int = 1,
) -> dict:
    """Validate a recipe's config (the file with its overrides) offline; return
    Axolotl's normalized config.

    Raises RecipeError naming the bad keys (Axolotl's own exception as its __cause__).
    `model_config_dir` defaults to the shipped config for the recipe's base_model (or
    the local base_model folder). `gpu` (default: the recipe names a hub model, flash
    attention or bitsandbytes) validates with a GPU's capabilities (bf16, sm_90), as
    `axolotl train` on a GPU node would see them. A deprecation that one of Axolotl's
    validators logs (rather than marks in the schema) is refused too, with Axolotl's
    message.
    """
    from axolotl.cli.config import prepare_plugins
    from axolotl.utils.config import normalize_cfg_datasets, normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    where = rel(recipe.path)
    raw = copy.deepcopy(recipe.config)  # Axolotl normalises datasets in place
    bad = unknown_keys(raw)
    if bad:
        raise RecipeError(f"{where}: keys Axolotl does not accept: {', '.join(bad)}")
    if raw.get("deepspeed"):
        check_deepspeed_json(raw["deepspeed"])
    if model_config_dir is None:
        model_config_dir = recipe.config_dir
        if model_config_dir is None:
            raise RecipeError(f"{where}: no local config.json for base_model {raw.get('base_model')!r}")
    model_config_dir = Path(model_config_dir)
    if gpu is None:
        gpu = bool(raw.get("flash_attention") or raw.get("load_in_8bit") or raw.get("load_in_4bit")
                   or str(raw.get("attn_implementation") or "").startswith("flash")
                   or not is_local(recipe.base_model))

    cfg = DictDefault(raw)
    cfg.axolotl_config_path = str(recipe.path)
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
        if gpu and cfg.get("bf16") == "auto":
            # what `auto` is on the GPUs the recipes are for (Ampere or newer): bf16
            cfg.bf16 = True
        with _axolotl_log() as records:
            prepare_plugins(cfg)
            try:
                cfg = validate_config(cfg, capabilities=capabilities, env_capabilities=env_capabilities)
            except Exception as e:  # pydantic ValidationError, ValueError, DeprecationWarning
                raise RecipeError(f"{where}: Axolotl rejects the config: {e}") from e
            deprecations = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
            if deprecations:
                raise RecipeError(f"{where}: deprecated in Axolotl: {' | '.join(deprecations)}")
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
