"""Fold a LoRA/DoRA adapter into its base model's weights, streamed, checked and atomic.

`make merge RECIPE=x [OUT=dir] [VERIFY=1]` -> `scripts/merge.py` -> `main(argv)`;
`merge(base, adapter, out)` from Python. What is PEFT's, what is ours and why (measured
against `axolotl merge-lora`): docs/MERGE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING, Callable

from finlora import ROOT
from finlora.atomic import atomic_dir, writable, write_json, written_by
from finlora.cli import flag
from finlora.errors import MergeError

if TYPE_CHECKING:  # torch, PEFT and the tensor I/O load only once the arguments are checked
    import torch
    from peft import LoraConfig

    from finlora.merge_io import TensorInfo

DEFAULT_SHARD = "2GB"
COPY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "spiece.model",
)
# Config keys that fix the shapes of a decoder; an adapter saved with a different value
# was trained on another model. (vocab_size is left out: resized vocabularies are
# caught by the shape check of the embedding instead.)
ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "intermediate_size", "head_dim")
# the input embedding and the output head, which tie_word_embeddings makes one matrix
TIED_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings", "lm_head", "embed_out", "output")

# --verify tolerances on logits. Both models are evaluated in float32 on the same
# prompts, so the only differences left are (a) float reassociation, W0x + s*B(Ax)
# versus (W0 + sBA)x, compounded through the layers, and (b) rounding each merged
# matrix back to its stored dtype. A merge passes if
#     max|diff| <= atol + rtol * max|reference logit|.
#  float32: (a) only. Measured on SmolLM2-135M (30 layers, logits up to ~36) with the
#           trained r=8 q/k/v adapter: 2.4e-4 absolute = 6.7e-6 of the logit range, and
#           PEFT's own merge_and_unload gives the identical figure (our weights are
#           bit-identical to it). 1e-4 + 3e-5 * range leaves ~4x margin; a wrong
#           scale, a missing module or a transposed delta moves logits by ~1e-1 to 1
#           (the adapter's whole effect there is ~1.0).
#  bfloat16: (b) dominates: 8 significand bits, unit roundoff 2^-9 ~ 2e-3 on every merged
#           weight, and a small delta can vanish entirely in the rounding. 5e-2 of the
#           logit range leaves margin over the measured figure and still fails a scale
#           off by 2x or a skipped module for an adapter that does anything.
#  float16: 11 significand bits, 8x finer than bf16: 1e-2 of the logit range.
TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 3e-5},
    "float64": {"atol": 1e-8, "rtol": 1e-12},
    "bfloat16": {"atol": 0.0, "rtol": 5e-2},
    "float16": {"atol": 0.0, "rtol": 1e-2},
}
VERIFY_PROMPTS = (
    "Instruction: What is the sentiment of this news? Please choose an answer from "
    "{negative/neutral/positive}.\nInput: Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.\nAnswer: ",
    "Instruction: What is the sentiment of this news? Please choose an answer from "
    "{negative/neutral/positive}.\nInput: Shares fell 9% after the bank cut its guidance.\nAnswer: ",
    "The company has 120 employees in Finland and its headquarters are in Helsinki.",
)


# --------------------------------------------------------------------------- inputs

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: cannot read JSON: {e}") from None


def base_tensors(base_dir: Path) -> dict[str, TensorInfo]:
    """All tensors of a safetensors checkpoint (one file or sharded with an index),
    in file order: the order they are read and written."""
    from finlora.merge_io import tensor_infos

    index = base_dir / "model.safetensors.index.json"
    single = base_dir / "model.safetensors"
    if index.is_file():
        wmap = _read_json(index).get("weight_map") or {}
        out: dict[str, TensorInfo] = {}
        for name in dict.fromkeys(wmap.values()):  # each shard once, in the index's order
            path = base_dir / name
            if not path.is_file():
                raise MergeError(f"{index} names shard {name}, which is missing")
            for k, info in tensor_infos(path).items():
                if wmap.get(k) == name:
                    out[k] = info
        missing = sorted(set(wmap) - set(out))
        if missing:
            raise MergeError(f"{index} maps {missing[0]} (and {len(missing) - 1} more) to a shard that lacks it")
        return out
    if single.is_file():
        return tensor_infos(single)
    if list(base_dir.glob("*.bin")) or list(base_dir.glob("*.pt")):
        raise MergeError(f"{base_dir}: the base model is stored as pickled .bin files; only safetensors "
                         f"bases are merged (convert it once with save_pretrained(safe_serialization=True))")
    raise MergeError(f"{base_dir}: no model.safetensors or model.safetensors.index.json (is this a model folder?)")


def load_adapter(adapter_dir: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's file and its tensors by saved name, read by PEFT (they are small)."""
    from peft.utils import load_peft_weights
    from safetensors import SafetensorError

    path = adapter_dir / "adapter_model.safetensors"
    if not path.is_file():
        path = adapter_dir / "adapter_model.bin"
        if not path.is_file():
            raise MergeError(f"{adapter_dir}: no adapter_model.safetensors (train the adapter first?)")
        if not allow_pickle:  # PEFT would load it with weights_only=True, which narrows but does not close the hole
            raise MergeError(
                f"{path} is a pickled adapter: unpickling can run arbitrary code, so it is refused. "
                f"Re-save it as safetensors, or add {flag('--allow-pickle')} if you trust its source.")
    try:
        return path, load_peft_weights(str(adapter_dir), device="cpu")
    except SafetensorError as e:
        raise MergeError(f"{path}: not a readable safetensors file (truncated download?): {e}") from None


_KEY = re.compile(
    r"^base_model\.model\.(?P<mod>.+?)\.(?:"
    r"(?P<lin>lora_[AB])(?:\.[^.]+)?\.weight"
    r"|(?P<emb>lora_embedding_[AB])(?:\.[^.]+)?"
    r"|(?P<mag>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?"
    r"|(?P<copy>base_layer\.weight)"
    r")$"
)


@dataclass
class ModuleDelta:
    module: str                     # as in the base model's named_modules, e.g. model.layers.0.self_attn.q_proj
    kind: str                       # "linear" or "embedding"
    keys: dict = field(default_factory=dict)   # role (A, B, m, copy) -> adapter key
    r: int = 0
    alpha: float = 0.0

    @property
    def base_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def short(self) -> str:
        return self.module.rsplit(".", 1)[-1]


def _pattern_value(patterns: dict | None, module: str, default):
    # the per-module rank/alpha rule PEFT applies when it builds the layers
    from peft.utils.other import get_pattern_key

    return (patterns or {}).get(get_pattern_key(list(patterns or {}), module), default)


# Adapter-config features whose effect cannot be folded into the weights (or that
# this merger does not implement): refuse rather than produce a model that differs.
_UNMERGEABLE = {
    "alora_invocation_tokens": "aLoRA applies only after its invocation tokens, so it has no weight-space merge",
    "lora_bias": "lora_bias (a trained bias on lora_B) is not supported by this merger",
    "modules_to_save": "modules_to_save (fully trained extra modules) are not supported by this merger",
    "trainable_token_indices": "trainable token indices are not supported by this merger",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported by this merger",
    "layer_replication": "layer_replication changes the layer structure; not supported by this merger",
    "use_qalora": "QA-LoRA is not supported by this merger",
    "arrow_config": "Arrow routing has no single weight-space merge",
    "use_bdlora": "BD-LoRA is not supported by this merger",
    "velora_config": "VeLoRA is not supported by this merger",
    "monteclora_config": "MonteCLoRA is not supported by this merger",
    "mica": "MiCA is not supported by this merger",
}
# Initialisations whose residual base (PEFT's lora/layer.py *_init) PEFT's layer cannot rebuild
# from the base alone, unlike PiSSA's full SVD and OLoRA's QR: refused (docs/MERGE.md).
_NOT_REBUILT_INIT = ("pissa_niter", "corda", "lora_ga", "loftq")


def adapter_modules(cfg: dict, weights: dict[str, torch.Tensor], path: Path, where: Path,
                    base_dir: Path) -> dict[str, ModuleDelta]:
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise MergeError(f"{where}: peft_type {cfg.get('peft_type')!r}; only LoRA/DoRA adapters can be merged here")
    for key, why in _UNMERGEABLE.items():
        if cfg.get(key):
            raise MergeError(f"{where}: {key}={cfg[key]!r}: {why}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_NOT_REBUILT_INIT):
        how = ("merge into the LoftQ-initialised base it was trained with" if init.lower() == "loftq" else
               "save it converted to plain LoRA (PEFT: save_pretrained(..., path_initial_model_for_weight_"
               "conversion=...), which writes init_lora_weights: true)")
        raise MergeError(f"{where}: init_lora_weights={init!r}: training started from a base with the adapter's "
                         f"initial product subtracted, which cannot be rebuilt from {base_dir}; {how}")
    r0, a0 = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r0, int) or r0 <= 0 or not isinstance(a0, (int, float)):
        raise MergeError(f"{where}: adapter_config.json needs a positive integer r and a number lora_alpha")
    mods: dict[str, ModuleDelta] = {}
    unknown = []
    for key in weights.keys():
        m = _KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        d = mods.setdefault(m["mod"], ModuleDelta(module=m["mod"], kind="linear"))
        role = m.lastgroup  # the alternative that matched: lin, emb, mag or copy
        if role == "emb":
            d.kind = "embedding"
        d.keys[{"mag": "m", "copy": "copy"}.get(role) or m[role][-1]] = key
    if unknown:
        raise MergeError(f"{path}: {len(unknown)} tensor(s) that are not LoRA weights, e.g. {unknown[0]!r} "
                         f"(modules_to_save or another PEFT method?); refusing to merge what it cannot interpret")
    for d in mods.values():
        if not ("A" in d.keys and "B" in d.keys):
            if set(d.keys) == {"copy"}:
                continue  # a saved copy of a base layer without LoRA: plan() and merged_weight() check it
            raise MergeError(f"{path}: module {d.module} has "
                             f"{'lora_A' if 'A' in d.keys else 'lora_B'} but not "
                             f"{'lora_B' if 'A' in d.keys else 'lora_A'}")
        d.r = int(_pattern_value(cfg.get("rank_pattern"), d.module, r0))
        d.alpha = float(_pattern_value(cfg.get("alpha_pattern"), d.module, a0))
        if bool(cfg.get("use_dora")) != ("m" in d.keys):
            raise MergeError(f"{path}: module {d.module}: use_dora={bool(cfg.get('use_dora'))} in "
                             f"adapter_config.json but the magnitude vector is "
                             f"{'present' if 'm' in d.keys else 'missing'}")
        if d.kind == "embedding" and "m" in d.keys:
            raise MergeError(f"module {d.module}: DoRA on an embedding is not supported by this merger")
    return mods


# --------------------------------------------------------------------------- plan

@dataclass
class Plan:
    base: Path
    adapter_cfg: dict
    lora: LoraConfig                        # what every module's PEFT layer is built with
    tensors: dict[str, TensorInfo]
    deltas: dict[str, ModuleDelta]          # by base key
    copies: dict[str, ModuleDelta]          # base layers the adapter saved a copy of, without LoRA
    weights: dict[str, torch.Tensor]
    adapter_file: Path
    quantized_training: list[str]
    warnings: list[str]


def _arch_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in ARCH_KEYS if k in a and k in b and a[k] != b[k]]


def _quantization_notes(adapter_dir: Path, recipe_cfg: dict | None) -> list[str]:
    recipe_cfg = recipe_cfg or {}
    notes = [f"recipe {k}: true" for k in ("load_in_8bit", "load_in_4bit") if recipe_cfg.get(k)]
    if str(recipe_cfg.get("adapter", "")).lower() == "qlora" and not notes:
        notes.append("recipe adapter: qlora")
    saved = adapter_dir / "config.json"  # the model config Axolotl saves beside the adapter
    q = _read_json(saved).get("quantization_config") if saved.is_file() else None
    if q:
        bits = "4-bit" if q.get("load_in_4bit") else "8-bit" if q.get("load_in_8bit") else q.get("quant_method", "?")
        notes.append(f"{saved.name} in the adapter folder records a {bits} quantized base")
    return notes


def plan(base: Path, adapter: Path, allow_pickle: bool = False, recipe_cfg: dict | None = None) -> Plan:
    """Check that `adapter` fits `base` (folders as `check_paths` accepts them); read
    headers and adapter config only."""
    from peft import LoraConfig

    base_cfg = _read_json(base / "config.json")
    acfg = _read_json(adapter / "adapter_config.json")
    if base_cfg.get("quantization_config"):
        raise MergeError(f"{base}/config.json has a quantization_config: the base itself is quantized. Merge into "
                         f"the unquantized (fp32/bf16/fp16) base weights the adapter was trained from.")
    warnings: list[str] = []

    # other architecture, where detectable: the model config Axolotl saves beside the
    # adapter, and the base the adapter names if that is a local folder
    claimed = acfg.get("base_model_name_or_path") or ""
    candidates = [adapter / "config.json"]
    if claimed:
        for root in (Path.cwd(), ROOT, adapter):
            if (root / claimed / "config.json").is_file():  # an absolute `claimed` is itself
                candidates.append(root / claimed / "config.json")
                break
    for c in candidates:
        if c.is_file():
            diff = _arch_diff(_read_json(c), base_cfg)
            if diff:
                raise MergeError(f"the adapter in {adapter} was trained on another model than {base}: "
                                 f"{c} differs in " + "; ".join(diff))
    if claimed and Path(claimed.rstrip("/")).name != base.resolve().name:
        warnings.append(f"adapter_config.json names base {claimed!r}, merging into {base} (shapes match)")

    tensors = base_tensors(base)
    adapter_file, weights = load_adapter(adapter, allow_pickle)
    mods = adapter_modules(acfg, weights, adapter_file, adapter / "adapter_config.json", base)
    if not any("A" in d.keys for d in mods.values()):
        raise MergeError(f"{adapter_file}: no LoRA weights in the adapter, nothing to merge")

    tied = bool(base_cfg.get("tie_word_embeddings", (base_cfg.get("text_config") or {}).get("tie_word_embeddings", False)))
    fifo = bool(acfg.get("fan_in_fan_out"))
    deltas: dict[str, ModuleDelta] = {}
    copies: dict[str, ModuleDelta] = {}
    for d in mods.values():
        if tied and (d.kind == "embedding" or d.short in TIED_NAMES):
            raise MergeError(
                f"module {d.module}: the base ties its input embeddings and output head (tie_word_embeddings=true), "
                f"and the adapter targets {d.module}. PEFT applied the adapter to that module alone; merging it into "
                f"the shared matrix would change the other one too, so the merge is refused. Retrain without "
                f"{d.short} in lora_target_modules.")
        if d.base_key not in tensors:
            raise MergeError(f"module {d.module} (targeted by the adapter) is not in the base model: no tensor "
                             f"{d.base_key} in {base}. Was the adapter trained on another model?")
        w = tensors[d.base_key]
        if "copy" in d.keys and tuple(weights[d.keys["copy"]].shape) != tuple(w.shape):
            raise MergeError(f"module {d.module}: the adapter carries its own copy of {d.base_key} with shape "
                             f"{list(weights[d.keys['copy']].shape)} != {list(w.shape)} (resized vocabulary?); "
                             f"this merger does not handle resized embeddings")
        if "A" not in d.keys:  # the copy alone: merged_weight checks it equals the base's
            copies[d.base_key] = d
            continue
        if not w.dtype.is_floating_point or w.dtype.itemsize == 1:  # integers, float8: quantized
            raise MergeError(f"module {d.module}: base weight is stored as {w.dtype}, not a float; a quantized "
                             f"checkpoint cannot be merged into (use the unquantized base)")
        a_shape, b_shape = tuple(weights[d.keys["A"]].shape), tuple(weights[d.keys["B"]].shape)
        if len(a_shape) != 2 or len(b_shape) != 2 or len(w.shape) != 2:
            raise MergeError(f"module {d.module}: only 2-D weights are merged (got base {list(w.shape)}, "
                             f"lora_A {list(a_shape)}, lora_B {list(b_shape)})")
        if a_shape[0] != d.r:
            raise MergeError(f"module {d.module}: lora_A has {a_shape[0]} rows but adapter_config.json says r={d.r}"
                             f"{' (from rank_pattern)' if d.r != acfg.get('r') else ''}; the config does not "
                             f"belong to these weights")
        if b_shape[1] != a_shape[0]:
            raise MergeError(f"module {d.module}: lora_B {list(b_shape)} and lora_A {list(a_shape)} disagree on the rank")
        if d.kind == "embedding":
            expect = (a_shape[1], b_shape[0])          # [num_embeddings, dim]
        else:
            expect = (b_shape[0], a_shape[1])          # [out, in]
            if fifo:
                expect = expect[::-1]
        if tuple(w.shape) != expect:
            hint = ""
            if d.kind == "linear" and tuple(w.shape) == expect[::-1]:
                hint = f" (transposed: fan_in_fan_out={fifo} in adapter_config.json does not fit this layer)"
            raise MergeError(f"module {d.module}: shape mismatch: the adapter implies a weight of "
                             f"{list(expect)} but {d.base_key} in the base is {list(w.shape)}{hint}")
        if "m" in d.keys:
            out_dim = expect[1] if fifo else expect[0]
            if tuple(weights[d.keys["m"]].shape) != (out_dim,):
                raise MergeError(f"module {d.module}: DoRA magnitude has shape {list(weights[d.keys['m']].shape)}, "
                                 f"expected [{out_dim}]")
        deltas[d.base_key] = d
    lora = LoraConfig(use_rslora=bool(acfg.get("use_rslora")), use_dora=bool(acfg.get("use_dora")), fan_in_fan_out=fifo,
                      init_lora_weights=acfg.get("init_lora_weights", True))  # PiSSA, OLoRA: the layer rebuilds them
    return Plan(base, acfg, lora, tensors, deltas, copies, weights, adapter_file,
                _quantization_notes(adapter, recipe_cfg), warnings)


# --------------------------------------------------------------------------- merge

def merged_weight(w0: torch.Tensor, d: ModuleDelta, weights: dict[str, torch.Tensor], cfg: LoraConfig) -> torch.Tensor:
    """W0 with the adapter folded in by PEFT's own layer (`merge(safe_merge=True)`: the same
    code merge_and_unload runs), on a float32 copy, cast back to w0's dtype once."""
    import torch
    from peft.tuners.lora import layer as lora
    from transformers.pytorch_utils import Conv1D

    if "copy" in d.keys and not torch.equal(weights[d.keys["copy"]], w0):
        raise MergeError(f"module {d.module}: the adapter's saved copy of {d.base_key} differs from the base's; "
                         f"the adapter was trained on another version of the base model")
    if "A" not in d.keys:
        return w0
    w = w0.float()
    a, b = weights[d.keys["A"]].float(), weights[d.keys["B"]].float()
    if d.kind == "embedding":
        layer = lora.Embedding(torch.nn.Embedding(*w.shape, _weight=w), "default", cfg, d.r, d.alpha)
        layer.lora_embedding_A["default"].data, layer.lora_embedding_B["default"].data = a, b
    else:
        if cfg.fan_in_fan_out:  # GPT-2's Conv1D stores [in, out]
            base = Conv1D(w.shape[1], w.shape[0])
        else:  # on the meta device: no matrix is allocated and filled only to be replaced
            base = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        base.weight = torch.nn.Parameter(w, requires_grad=False)
        layer = lora.Linear(base, "default", cfg, d.r, d.alpha)
        layer.lora_A["default"].weight.data, layer.lora_B["default"].weight.data = a, b
        if "m" in d.keys:
            layer.lora_magnitude_vector["default"].weight.data = weights[d.keys["m"]].float()
    try:
        layer.merge(safe_merge=True)
    except ValueError as e:  # safe_merge found NaN/inf
        raise MergeError(f"module {d.module}: the merged weight has NaN or inf; the adapter is broken ({e})") from None
    return layer.get_base_layer().weight.data.to(w0.dtype)


def _summary_scales(deltas: dict[str, ModuleDelta], rslora: bool) -> dict:
    """Each module name's scale, for the log and merge_info (PEFT's layer applies its own)."""
    by_kind: dict[str, set] = {}
    for d in deltas.values():
        by_kind.setdefault(d.short, set()).add(d.alpha / math.sqrt(d.r) if rslora else d.alpha / d.r)
    return {k: (next(iter(v)) if len(v) == 1 else sorted(v)) for k, v in sorted(by_kind.items())}


def write_merged(p: Plan, tmp: Path, max_shard: int, progress: bool = True,
                 on_shard: Callable[[str], None] | None = None) -> dict:
    from huggingface_hub import split_state_dict_into_shards_factory
    from tqdm import tqdm

    from finlora.merge_io import ShardWriter, read_tensor

    # the shard plan save_pretrained uses: names, index and total size
    split = split_state_dict_into_shards_factory(p.tensors, filename_pattern="model{suffix}.safetensors",
                                                 get_storage_size=lambda t: math.prod(t.shape) * t.dtype.itemsize,
                                                 max_shard_size=max_shard)
    bar = tqdm(total=len(p.tensors), unit="tensor", desc="merge", disable=not progress, mininterval=0.5,
               file=sys.stderr)
    try:
        for name, keys in split.filename_to_tensors.items():
            bar.set_postfix_str(name)
            infos = [p.tensors[k] for k in keys]
            w = ShardWriter(tmp / name, [(t.name, t.dtype, t.shape) for t in infos])
            for info in infos:
                t = read_tensor(info)
                d = p.deltas.get(info.name) or p.copies.get(info.name)
                w.write_tensor(info.name, t if d is None else merged_weight(t, d, p.weights, p.lora))
                del t
                bar.update(1)
            w.close()
            if on_shard is not None:
                on_shard(name)
    finally:
        bar.close()
    if split.is_sharded:
        write_json(tmp / "model.safetensors.index.json", {"metadata": split.metadata,
                                                           "weight_map": split.tensor_to_filename})
    for fname in COPY_FILES:
        if (p.base / fname).is_file():
            shutil.copyfile(p.base / fname, tmp / fname)
    dtypes = sorted({str(p.tensors[k].dtype).removeprefix("torch.") for k in p.deltas})
    return {"shards": len(split.filename_to_tensors), "total_size": split.metadata["total_size"], "dtype": dtypes[0] if len(dtypes) == 1 else dtypes}


# --------------------------------------------------------------------------- verify

def _prompt_ids(model_dir: Path, vocab: int) -> list[torch.Tensor]:
    import torch

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return [tok(t, return_tensors="pt").input_ids for t in VERIFY_PROMPTS]
    except Exception:  # no tokenizer (random test models): fixed token ids
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, vocab, (1, n), generator=g) for n in (24, 17, 9)]


def verify(base: Path, adapter: Path, merged: Path, dtype: str) -> dict:
    """Logits of base+adapter through PEFT against the merged model, both in float32.
    The two models are loaded one after the other, never together."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    ids = _prompt_ids(base, model.config.get_text_config().vocab_size)
    ref_model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        ref = [ref_model(input_ids=x).logits for x in ids]
        with ref_model.disable_adapter():
            plain = [ref_model(input_ids=x).logits for x in ids]
    del ref_model, model
    effect = max(float((a - b).abs().max()) for a, b in zip(ref, plain))
    merged_model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = [merged_model(input_ids=x).logits for x in ids]
    del merged_model
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, got))
    scale = max(float(a.abs().max()) for a in ref)
    tol = TOLERANCES.get(dtype, TOLERANCES["bfloat16"])
    limit = tol["atol"] + tol["rtol"] * scale
    return {"prompts": len(ids), "max_abs_logit_diff": max_abs, "max_rel_logit_diff": max_abs / max(scale, 1e-12),
            "max_abs_reference_logit": scale, "adapter_effect": effect,
            "tolerance": {**tol, "limit": limit, "dtype": dtype},
            "passed": bool(max_abs <= limit)}


# --------------------------------------------------------------------------- CLI

# What a merged model folder holds (write_merged): a folder holding anything else is not a
# merge's output, and `--force` does not replace it.
MERGE_MARKER = "merge_info.json"
replaceable_output = written_by(
    MERGE_MARKER, lambda n: n in COPY_FILES or n == "model.safetensors.index.json"
    or (n.startswith("model") and n.endswith(".safetensors")), "merged model folder")


def shard_bytes(max_shard_size: str | int) -> int:
    """transformers' reading of a size, except that a lower-case "b" means bytes here, not
    bits ("2gb"), and a bare number is bytes ("1000"), as the command line has always taken them."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = str(max_shard_size).strip().upper()
        max_bytes = int(size) if size.isdigit() else convert_file_size_to_int(size)
        if max_bytes <= 0:
            raise ValueError
    except ValueError:
        raise MergeError(f"--max-shard-size {max_shard_size!r} is not a size (e.g. 2GB, 500MB, 1GiB)") from None
    return max_bytes


def check_paths(base: Path, adapter: Path, out: Path, force: bool) -> None:
    """Every refusal that needs no model loaded: missing folders, an output that is the
    input, an output that --force may not replace, an output that cannot be written."""
    for label, p, want in (("base", base, "config.json"), ("adapter", adapter, "adapter_config.json")):
        if not p.is_dir():
            raise MergeError(f"--{label} {p}: no such folder" + (" (train the adapter first)" if label == "adapter" else ""))
        if not (p / want).is_file():
            raise MergeError(f"--{label} {p}: no {want} (is this a "
                             + ("Hugging Face model folder?)" if label == "base" else "PEFT adapter folder?)"))
    with contextlib.suppress(OSError):
        if out.resolve() in (base.resolve(), adapter.resolve()):
            raise MergeError(f"--out {out} is the base or adapter folder itself; choose another folder")
    if out.exists() or out.is_symlink():
        if not force:
            raise MergeError(f"{out} already exists: add {flag('--force')} to replace an earlier merge's output "
                             "(nothing else is ever replaced), or choose another output folder")
        why = replaceable_output(out)
        if why:
            raise MergeError(f"--force replaces only an earlier merge's output, and {why}; choose another output folder")
    why = writable(out.parent)
    if why:
        raise MergeError(f"cannot write the merged model beside {out}: {why}")


def merge(base: Path, adapter: Path, out: Path, *, force: bool = False, max_shard_size: str | int = DEFAULT_SHARD,
          do_verify: bool = False, allow_pickle: bool = False, recipe_cfg: dict | None = None,
          progress: bool = True, log=print, on_shard: Callable[[str], None] | None = None) -> dict:
    """Merge `adapter` into `base`, writing `out` atomically; `force` replaces an earlier
    merge's output (only that). `on_shard(name)` is called as each output shard is complete.
    Returns merge_info."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    max_bytes = shard_bytes(max_shard_size)
    check_paths(base, adapter, out, force)
    p = plan(base, adapter, allow_pickle=allow_pickle, recipe_cfg=recipe_cfg)
    for w in p.warnings:
        log(f"merge: warning: {w}")
    t0 = time.time()
    kinds = _summary_scales(p.deltas, p.lora.use_rslora)
    log(f"merge: {len(p.deltas)} modules ({', '.join(kinds)}) of {base} + {adapter}; scale "
        + ", ".join(f"{k}={v}" for k, v in kinds.items())
        + (" (rsLoRA)" if p.adapter_cfg.get("use_rslora") else "") + (" (DoRA)" if p.adapter_cfg.get("use_dora") else ""))
    if p.quantized_training:
        log("merge: note: the adapter was trained on a quantized base (" + "; ".join(p.quantized_training)
            + f"); merging into the unquantized base weights in {base}, as FinLoRA advises")
    with atomic_dir(out, replace=replaceable_output if force else None,
                    on_stale=lambda d: log(f"merge: removed {d.name}, left by an interrupted merge")) as tmp:
        written = write_merged(p, tmp, max_bytes, progress=progress, on_shard=on_shard)
        info = {
            "base": str(base), "adapter": str(adapter), "adapter_file": p.adapter_file.name,
            "peft_type": "DORA" if p.adapter_cfg.get("use_dora") else "LORA",
            "r": p.adapter_cfg.get("r"), "lora_alpha": p.adapter_cfg.get("lora_alpha"),
            "use_rslora": bool(p.adapter_cfg.get("use_rslora")), "use_dora": bool(p.adapter_cfg.get("use_dora")),
            "fan_in_fan_out": p.lora.fan_in_fan_out,
            "rank_pattern": p.adapter_cfg.get("rank_pattern") or {}, "alpha_pattern": p.adapter_cfg.get("alpha_pattern") or {},
            "modules_merged": len(p.deltas), "scale": kinds, "merge_precision": "float32",
            "quantized_training": bool(p.quantized_training), "quantized_training_evidence": p.quantized_training,
            "warnings": p.warnings, **written, "verify": None,
        }
        if do_verify:
            log("merge: verifying against base + adapter through PEFT ...")
            dtype = written["dtype"] if isinstance(written["dtype"], str) else "bfloat16"
            v = verify(base, adapter, tmp, dtype)
            info["verify"] = v
            log(f"merge: verify: max |logit diff| {v['max_abs_logit_diff']:.3g} (relative {v['max_rel_logit_diff']:.3g}) "
                f"over {v['prompts']} prompts; tolerance for {dtype}: {v['tolerance']['limit']:.3g} -> "
                + ("PASS" if v["passed"] else "FAIL"))
            if v["max_abs_logit_diff"] > 0.5 * v["adapter_effect"]:
                msg = (f"rounding to {dtype} erases a large part of this adapter's effect (the adapter moves logits "
                       f"by up to {v['adapter_effect']:.3g}; the merged model is off by {v['max_abs_logit_diff']:.3g}); "
                       f"consider merging into a float32 copy of the base")
                info["warnings"].append(msg)
                log(f"merge: warning: {msg}")
            if not v["passed"]:
                raise MergeError(f"verification failed: merged logits differ by {v['max_abs_logit_diff']:.3g} > "
                                 f"{v['tolerance']['limit']:.3g}; nothing was written to {out}")
        info["seconds"] = round(time.time() - t0, 2)
        write_json(tmp / MERGE_MARKER, info)
    log(f"merge: wrote {written['shards']} shard(s), {written['total_size'] / 1e9:.2f} GB, to {out} "
        f"in {time.time() - t0:.1f} s")
    return info


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="scripts/merge.py",
        description="Fold a LoRA/DoRA adapter into its base model (streamed, verified, atomic).")
    ap.add_argument("--recipe", help="recipe name or YAML: base = base_model, adapter = output_dir, "
                                     "out = <output_dir>/merged")
    ap.add_argument("--base", type=Path, help="base model folder (safetensors)")
    ap.add_argument("--adapter", type=Path, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    ap.add_argument("--out", type=Path, help="output folder (required with --base/--adapter)")
    ap.add_argument("--max-shard-size", default=DEFAULT_SHARD, help="largest output shard, e.g. 2GB, 500MB (default 2GB)")
    ap.add_argument("--force", action="store_true", help="replace the output of an earlier merge (never anything else)")
    ap.add_argument("--verify", action="store_true", help="compare logits with base + adapter through PEFT; "
                                                           "fail above the tolerance for the dtype")
    ap.add_argument("--allow-pickle", action="store_true", help="accept a pickled adapter_model.bin")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if argv is None:  # as a program: let `kill` (SIGTERM) unwind like Ctrl-C, so the temp folder is removed
        import signal

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    recipe_cfg = None
    if args.recipe:
        if args.base or args.adapter:
            raise MergeError("give either --recipe or --base and --adapter, not both")
        from finlora import recipes

        recipe = recipes.Recipe.open(args.recipe)
        recipe_cfg = recipe.config
        if not recipe_cfg.get("adapter"):
            raise MergeError(f"{recipe.where('adapter')}: no `adapter:` key; a full fine-tune has nothing to merge")
        if not recipe.base_model:
            raise MergeError(f"{recipe.where('base_model')}: no base_model")
        base = recipe.local(recipe.base_model) or Path(recipe.base_model)
        adapter = recipe.output_dir
        if not (adapter / "adapter_config.json").is_file():
            raise MergeError(f"no trained adapter in {recipes.rel(adapter)} (the recipe's output_dir): "
                             f"run `make train RECIPE={args.recipe}` first")
        out = args.out or adapter / "merged"
    else:
        if not (args.base and args.adapter and args.out):
            raise MergeError("give --recipe NAME, or all of --base DIR --adapter DIR --out DIR")
        base, adapter, out = args.base, args.adapter, args.out
    merge(base, adapter, out, force=args.force, max_shard_size=args.max_shard_size, do_verify=args.verify,
          allow_pickle=args.allow_pickle, recipe_cfg=recipe_cfg, progress=not args.no_progress)
    return 0
