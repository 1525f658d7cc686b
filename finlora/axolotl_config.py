"""Axolotl's view of a recipe, offline: the checks every recipe (generated or
hand-written) must pass before anything loads.

- `unknown_keys`: Axolotl itself drops unknown keys silently (`lora_rnak: 8` trains at the
  default rank), so this check is ours.
- `validate`: the steps `axolotl train` runs first (`axolotl.cli.config.load_cfg`), with the
  base model's architecture from a config.json shipped in the repo: no weights, no hub.
- `check_deepspeed_json`: a recipe's DeepSpeed config, without importing DeepSpeed.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
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


def deprecated_fields(model_cls) -> dict[str, str]:
    """{key or alias: Axolotl's hint} for the deprecated fields of one schema class.

    Axolotl 0.19 marks deprecations three ways in its schema: pydantic's
    `Field(deprecated=...)` (the legacy attention flags, gc_steps, fsdp, ...), a
    description that starts with "Deprecated"/"[DEPRECATED]" (flash_attn_d512,
    sequence_parallel_degree), and the DeprecatedParameters class (`deprecated_keys`).
    Validators that log a deprecation are caught when `validate` runs them.
    """
    out = {}
    for fname, f in model_cls.model_fields.items():
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        desc = str(extra.get("description") or f.description or "").strip()
        hint = f.deprecation_message or (desc if re.match(r"\[?deprecated\b", desc, re.IGNORECASE) else None)
        if hint:
            out.update(dict.fromkeys(_names(fname, f), hint))
    return out


def deprecated_keys() -> dict[str, str]:
    """{top-level key: hint} for every key Axolotl 0.19's config schema marks deprecated."""
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.deprecated import DeprecatedParameters

    out = {k: "no longer supported (axolotl.utils.schemas.deprecated)" for k in DeprecatedParameters.model_fields}
    out.update(deprecated_fields(AxolotlInputConfig))
    return out


def schema_keys() -> set[str]:
    """The top-level keys Axolotl's config schema accepts, deprecated ones left out."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    return _field_names(AxolotlInputConfig) - set(deprecated_keys())


def _plugin_keys(plugins: Sequence[str]) -> set[str]:
    import importlib

    from axolotl.integrations.base import load_plugin

    keys: set[str] = set()
    for dotted in plugins or []:
        try:
            args = load_plugin(dotted).get_input_args()
        except Exception:  # the validation proper reports unloadable plugins
            continue
        if args:
            amod, _, acls = args.rpartition(".")
            keys |= _field_names(getattr(importlib.import_module(amod), acls))
    return keys


def _unknown(prefix: str, mapping: dict, allowed: set[str], deprecated: dict[str, str]) -> list[str]:
    return [f"{prefix}{k} (deprecated in Axolotl: {deprecated[k]})" if k in deprecated else f"{prefix}{k}"
            for k in mapping if k in deprecated or k not in allowed]


def unknown_keys(cfg: dict) -> list[str]:
    """Dotted names of keys Axolotl would ignore or rejects as deprecated."""
    from axolotl.utils.schemas.datasets import SFTDataset, UserDefinedPrompterType

    allowed = schema_keys() | _plugin_keys(cfg.get("plugins") or [])  # plugins' own input schemas
    bad = _unknown("", cfg, allowed, deprecated_keys())
    ds_allowed, ds_deprecated = _field_names(SFTDataset), deprecated_fields(SFTDataset)
    type_allowed = _field_names(UserDefinedPrompterType)
    for group in ("datasets", "test_datasets"):
        for i, ds in enumerate(cfg.get(group) or []):
            if isinstance(ds, dict):
                bad += _unknown(f"{group}[{i}].", ds, ds_allowed, ds_deprecated)
                if isinstance(ds.get("type"), dict):
                    bad += _unknown(f"{group}[{i}].type.", ds["type"], type_allowed, {})
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
    from logging.handlers import BufferingHandler

    collect = BufferingHandler(capacity=1 << 30)  # keeps every record: it empties itself only when full
    collect.setLevel(logging.WARNING)
    ax, root = logging.getLogger("axolotl"), logging.getLogger()
    saved = (ax.handlers[:], ax.propagate, ax.level, root.level)
    ax.handlers, ax.propagate = [collect], False
    ax.setLevel(logging.WARNING)
    root.setLevel(logging.ERROR)
    try:
        yield collect.buffer
    finally:
        ax.handlers, ax.propagate = saved[0], saved[1]
        ax.setLevel(saved[2])
        root.setLevel(saved[3])


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


GPU_CAPABILITIES = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_90"}


def validate(recipe: Recipe) -> dict:
    """Validate a recipe's config (the file with its overrides) offline; return
    Axolotl's normalized config. `make check` runs it only on a recipe without unknown keys
    whose base_model has a config.json here (the shipped one, or the local folder's).

    Raises RecipeError (Axolotl's own exception as its __cause__). A recipe naming a hub model, flash attention or
    bitsandbytes is validated with a GPU's capabilities (bf16, sm_90), as `axolotl train`
    on a GPU node would see them. A deprecation that one of Axolotl's validators logs
    (rather than marks in the schema) is refused too, with Axolotl's message. The
    recipe's DeepSpeed JSON is `check_deepspeed_json`'s (`make check` runs it first).
    """

    import torch
    from axolotl.cli.config import gpu_capabilities, prepare_plugins
    from axolotl.utils.config import normalize_cfg_datasets, normalize_config, validate_config
    from axolotl.utils.dict import DictDefault

    where = rel(recipe.path)
    raw = copy.deepcopy(recipe.config)  # Axolotl normalises datasets in place
    gpu = bool(raw.get("load_in_8bit") or raw.get("load_in_4bit") or not is_local(recipe.base_model)
               or str(raw.get("attn_implementation") or "").startswith("flash"))

    cfg = DictDefault(raw)
    cfg.axolotl_config_path = str(recipe.path)
    # Injected here, not written in the recipe: Axolotl also takes the tokenizer from
    # base_model_config, which holds no tokenizer; real runs read both from base_model.
    cfg.base_model_config = str(recipe.config_dir)
    capabilities = dict(GPU_CAPABILITIES) if gpu else gpu_capabilities()[0]
    env_capabilities = {"torch_version": str(torch.__version__).split("+", maxsplit=1)[0]}
    if gpu and cfg.get("bf16") == "auto":
        cfg.bf16 = True  # what `auto` is on the GPUs the recipes are for (Ampere or newer)
    # Axolotl's validation sets WORLD_SIZE / LOCAL_RANK; the environment is put back afterwards.
    with _environ_kept(), _axolotl_log() as records:
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
        normalize_config(cfg)
        normalize_cfg_datasets(cfg)
    return cfg
