"""`make plan RECIPE=x GPUS=n`: estimated peak GPU memory per GPU for a recipe. recipes/PLANNER.md
owns the formulas and their symbols (the names used below); `estimate` follows its numbered
components 1-8, the load peak after them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from finlora import ROOT
from finlora.params import architecture, count_recipe
from finlora.errors import LaunchError, RecipeError
from finlora.launch import process_count
from finlora.recipes import BITS_LABEL, DEFAULT_RECIPE, RECIPE_DIR, Recipe

GiB = 2 ** 30
CARDS_GB = (24, 40, 80, 141)
# PLANNER.md, components 7 (calibrated there on recipes/measured.json) and 8 (an allowance).
ALLOCATOR_OVERHEAD_GIB = 0.55
CONTEXT_GIB = 0.6
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)


@dataclass
class Plan:
    recipe: str
    gpus: int
    zero: int
    parts: dict[str, float]      # bytes per GPU, by component, at the training peak
    notes: list[str]
    load_parts: dict[str, float] = field(default_factory=dict)  # bytes per GPU while loading

    @property
    def total(self) -> float:
        """The training peak."""
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    @property
    def load_peak(self) -> float:
        return sum(self.load_parts.values())

    @property
    def load_peak_gib(self) -> float:
        return self.load_peak / GiB

    @property
    def peak_gib(self) -> float:
        """What the card must hold: the larger of the load and the training peak."""
        return max(self.total, self.load_peak) / GiB

    @property
    def allocator_gib(self) -> float:
        """The training peak as PyTorch's max_memory_allocated sees it (no CUDA context)."""
        return (self.total - self.parts.get("CUDA context", 0.0)) / GiB

    def fits(self, card_gb: float) -> bool:
        return self.peak_gib <= card_gb

    @property
    def smallest_card(self) -> int | None:
        return next((c for c in CARDS_GB if self.fits(c)), None)


def estimate(recipe: Recipe, gpus: int = 1, row_tokens: int | None = None) -> Plan:
    """The plan of `recipe` on `gpus` data-parallel GPUs. `row_tokens`: the padded length of
    each row (default `sequence_len`, the longest a batch can be; a measurement made on
    shorter rows is compared at its own length)."""
    if gpus < 1:
        raise LaunchError(f"GPUS must be >= 1, got {gpus}")
    pc = count_recipe(recipe)
    arch = architecture(str(recipe.config_dir))
    block_linears, L = arch.block_linears, arch.layers
    h, a, V, i = arch.hidden, arch.heads, arch.vocab, arch.intermediate
    h_kv = arch.kv_heads * arch.head_dim
    N, Z = gpus, recipe.zero_stage
    T = pc.trainable
    seq_len = recipe.number("sequence_len", 2048)
    s, b, t = min(row_tokens or seq_len, seq_len), recipe.number("micro_batch_size", 1), len(pc.targets)
    bits = recipe.bits
    notes: list[str] = []

    # 1. frozen weights
    P_lin, P_oth = arch.linear_params, arch.total_params - arch.linear_params
    sum_out = L * sum(out for _, out in block_linears.values())
    # c_oth = 4 (fp32) for 8/4-bit without ZeRO-3 is what the 0.55 GiB constant was fitted with;
    # Axolotl 0.19 casts these modules back to bf16 before training, and whether FinLoRA's
    # published figures hold them in fp32 is open (recipes/PLANNER.md, "Open question").
    c_oth = 4 if bits in (4, 8) and Z != 3 else 2
    if bits == 16:
        w_lin = 2.0 * P_lin
        w_stats = 0.0
    elif bits == 8:
        w_lin = 1.0 * P_lin + 4.0 * sum_out
        w_stats = 4.0 * sum_out
    else:
        w_lin = NF4_BYTES * P_lin
        w_stats = (NF4_BYTES - 0.5) * P_lin
    weights = w_lin + c_oth * P_oth
    if c_oth == 4:
        notes.append("embeddings/lm_head/norms counted in fp32, as calibrated (Axolotl 0.19 casts them back "
                     "to bf16 before training: recipes/PLANNER.md, open question)")
    layer_weights = w_lin / L
    whole_weights = weights
    if Z == 3:
        # ZeRO-3 partitions nn.Parameters only (deepspeed partition_parameters.free_param swaps
        # `param.data`). The quantisation statistics are plain tensors hung on the parameter:
        # bitsandbytes' Params4bit.quant_state (NF4 absmax, uint8 per 64 weights, and its fp32
        # state2 per 256; functional.quantize_4bit, compress_statistics) and Int8Params.SCB
        # (LLM.int8's fp32 row scales). Each rank keeps them whole.
        weights = (weights - w_stats) / N + w_stats
    largest_linear = max(fi * fo for fi, fo in block_linears.values())
    largest_param = 2.0 * max(V * h, largest_linear)  # 16-bit; ZeRO-3 gathers it whole

    # 2-4. LoRA weights, gradients, optimizer
    lora = 4.0 * T / (N if Z == 3 else 1)
    grads = 4.0 * T / (N if Z >= 2 else 1)
    if Z == 0 and N > 1:
        grads += 4.0 * T
        notes.append("DDP gradient buckets")
    opt_bytes = 2.0 if "8bit" in str(recipe.get("optimizer") or "adamw_torch") else 8.0
    optim = opt_bytes * T / (N if Z >= 1 else 1)
    if recipe.offload_optimizer:
        optim = 0.0
        notes.append("optimizer state offloaded to CPU")

    # 5. activations
    act_layer = 2.0 * (6 * h + 2 * h_kv + 4 * i) + 3.0 * t * h
    # no seq x seq score matrix: FlashAttention-2, or SDPA's flash/mem-efficient kernels on CUDA
    if not (recipe.get("flash_attention")
            or str(recipe.get("attn_implementation") or "").startswith(("sdpa", "flash_attention"))):
        act_layer += 4.0 * a * s
    tokens = s * b
    if recipe.get("gradient_checkpointing"):
        acts = tokens * L * 2.0 * h + tokens * act_layer
    else:
        acts = tokens * L * act_layer
    if pc.dora:
        acts += 4.0 * max(fi * fo for fi, fo in pc.shapes.values())
    loss_head = tokens * V * 10.0

    # 6. ZeRO-3 gather buffer; 7-8. allocator overhead, CUDA context
    gather = max(2.0 * layer_weights, largest_param + layer_weights) if Z == 3 else 0.0
    overhead = {"allocator overhead": ALLOCATOR_OVERHEAD_GIB * GiB, "CUDA context": CONTEXT_GIB * GiB}
    parts = {
        "frozen weights": weights,
        "LoRA weights": lora,
        "gradients": grads,
        "optimizer state": optim,
        "activations": acts,
        "loss head (logits)": loss_head,
        "ZeRO-3 gather buffer": gather,
        **overhead,
    }

    # Load time (PLANNER.md, "Load peak"): a quantised model is whole on every rank until
    # DeepSpeed partitions it (transformers' from_pretrained skips zero.Init when quantised);
    # an unquantised one under ZeRO-3 is partitioned as it loads.
    # Whole on the rank, two moments. While transformers loads: the 16-bit embeddings, lm_head and
    # norms, and one 16-bit Linear being quantised. Then Axolotl 0.19 (loaders/model.py L441-450,
    # _configure_embedding_dtypes: `if not self.is_fsdp_enabled:` ... `dist_dtype=torch.float32,
    # before_kbit_train_or_finetune=True`) casts embed_tokens, lm_head and every "norm" module to
    # fp32 on every rank, ZeRO-3 included (DeepSpeed is not FSDP), and only later casts them back
    # to bf16 (L484-490, `if should_convert:` ... `dist_dtype=self.cfg.torch_dtype`). The cast
    # goes module by module (torch's Module._apply makes the fp32 copy before it drops the 16-bit
    # one), so its peak is everything in fp32 while lm_head, cast last, still has its 16-bit copy.
    largest_oth = V * h  # embed_tokens or lm_head (untied in Llama 3.1; a tied pair gives about the same)
    if Z == 3 and bits == 16:
        load = {"frozen weights (partitioned as loaded)": whole_weights / N,
                "largest parameter, whole": largest_param}
    else:
        quantising = w_lin + 2.0 * P_oth + (2.0 * largest_linear if bits in (4, 8) else 0.0)
        upcast = w_lin + 4.0 * P_oth + 2.0 * largest_oth
        where = ", whole on each rank" if Z == 3 else ""
        if upcast >= quantising:
            load = {f"frozen weights{where}, fp32 embeddings/lm_head/norms": w_lin + 4.0 * P_oth,
                    "16-bit lm_head being upcast": 2.0 * largest_oth}
        else:
            load = {f"frozen weights{where}": w_lin + 2.0 * P_oth,
                    "16-bit tensor being quantised": 2.0 * largest_linear}
    load.update(overhead)
    if Z == 3 and bits != 16:
        notes.append(f"load peak {sum(load.values()) / GiB:.1f} GiB: "
                     "the quantised model is whole on every rank until ZeRO-3 partitions it")
    return Plan(recipe=recipe.name, gpus=N, zero=Z, parts=parts, notes=notes, load_parts=load)


# ---------------------------------------------------------------------------- measurements

MEASURED = RECIPE_DIR / "measured.json"
BENCH_JSON = ROOT / "outputs" / "bench_gpu.json"


def load_measurements(bench_files: list[str | Path] | None = None) -> list[dict]:
    """Published figures (recipes/measured.json) and benchmarks/gpu.py results (GPU
    runs of the full-size model only), as rows: source, conditions, measured GiB."""
    rows: list[dict] = []
    doc = json.loads(MEASURED.read_text(encoding="utf-8"))
    src = doc["source"]
    cond = doc["conditions"]
    for i, e in enumerate(doc["entries"]):
        for k in ("model", "bits", "r", "micro_batch", "gib"):
            if k not in e:
                raise ValueError(f"{MEASURED}: entries[{i}]: missing field {k!r}")
        rows.append({"kind": "published", "source": f"FinLoRA {src['file']} @ {src['commit']}",
                     "model": e["model"], "bits": int(e["bits"]), "r": int(e["r"]), "recipe": None,
                     "micro_batch": int(e["micro_batch"]), "row_tokens": int(cond["row_tokens_assumed"]),
                     "gib": float(e["gib"]), "what": "NER, as published (GB read as GiB)"})
    files = [Path(f) for f in (bench_files or [])] or ([BENCH_JSON] if BENCH_JSON.is_file() else [])
    for f in files:
        try:
            runs = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{f}: not a `python -m benchmarks.gpu` JSON file ({e})") from None
        for i, r in enumerate(runs if isinstance(runs, list) else []):
            if r.get("architecture") != "full" or r.get("device", "cpu") == "cpu" or "train_peak_alloc_gib" not in r:
                continue
            rows.append({"kind": "bench_gpu", "source": f"{f} [{i}] on {r['device']}", "recipe": r["recipe"],
                         "model": None, "bits": r.get("bits"), "r": r.get("r"),
                         "micro_batch": int(r["micro_batch"]), "row_tokens": int(r["row_tokens"]),
                         "gib": float(r["train_peak_alloc_gib"]), "load_gib": r.get("load_peak_alloc_gib"),
                         "what": "training peak, torch max_memory_allocated"})
    return rows


def _matches(m: dict, recipe: Recipe) -> bool:
    if m["recipe"] is not None:
        return m["recipe"] == recipe.name
    return (recipe.config_dir is not None and Path(recipe.config_dir).name == m["model"] and recipe.bits == m["bits"]
            and recipe.lora_shape[0] == m["r"] and recipe.variant in ("LoRA", "QLoRA"))


def beside_measured(recipe: Recipe, measurements: list[dict] | None = None) -> list[tuple[dict, Plan]]:
    """Each measurement of `recipe` with the plan at its micro batch and row length, on one GPU."""
    ms = load_measurements() if measurements is None else measurements
    return [(m, estimate(recipe.with_args([*recipe.args, "--micro-batch-size", str(m["micro_batch"])]), 1,
                         row_tokens=m["row_tokens"])) for m in ms if _matches(m, recipe)]


def report(plan: Plan, recipe: Recipe, measurements: list[dict] | None = None) -> str:
    lines = [
        f"recipe {plan.recipe}: {recipe.base_model}, {BITS_LABEL[recipe.bits]} base, r={recipe.lora_shape[0]}, "
        f"{recipe.variant}, "
        f"seq {recipe.get('sequence_len')} x micro batch {recipe.get('micro_batch_size')}, "
        f"gradient checkpointing {'on' if recipe.get('gradient_checkpointing') else 'off'}",
        f"GPUs {plan.gpus}, " + (f"DeepSpeed ZeRO-{plan.zero}" if plan.zero else
                                 ("DDP" if plan.gpus > 1 else "single GPU, no DeepSpeed")),
        "",
        f"{'component':<28}{'GiB per GPU':>12}",
        "-" * 40,
        *(f"{k:<28}{v / GiB:>12.2f}" for k, v in plan.parts.items()),
        "-" * 40,
        f"{'estimated training peak':<28}{plan.total_gib:>12.2f}",
        f"{'estimated load peak':<28}{plan.load_peak_gib:>12.2f}",
        "",
        f"card needs {plan.peak_gib:.2f} GiB; fits: "
        + "  ".join(f"{c} GB {'yes' if plan.fits(c) else 'no'}" for c in CARDS_GB),
        *(f"note: {n}" for n in plan.notes),
    ]
    pairs = beside_measured(recipe, measurements)
    if pairs:
        lines.append("")
        lines.append("measured beside planned (GiB per GPU; planned at the measurement's micro batch and row "
                     "length, without the CUDA context, which PyTorch's allocator figures leave out):")
        for m, p in pairs:
            lines.append(f"  {m['source']}: {m['what']}, micro batch {m['micro_batch']}, rows of "
                         f"{m['row_tokens']} tokens: measured {m['gib']:.2f}, planned {p.allocator_gib:.2f} "
                         f"({100 * (p.allocator_gib / m['gib'] - 1):+.0f}%)")
            if m.get("load_gib") is not None:
                lines.append(f"    load peak: measured {m['load_gib']:.2f}, planned "
                             f"{p.load_peak_gib - CONTEXT_GIB:.2f}")
        if any(m["kind"] == "published" and m["bits"] == 16 for m, _ in pairs):
            lines.append("  note: the published 16-bit figure does not change with the batch and is ~2x the bf16 "
                         "weights: it fits an fp32 base (4 bytes x 8.03e9 = 29.9 GiB) + 1 GiB; it is not what a "
                         "bf16 recipe needs (recipes/PLANNER.md)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Estimated peak GPU memory per GPU for a recipe")
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path")
    p.add_argument("--recipe", dest="recipe_opt")
    p.add_argument("--gpus", help="GPUs per node (make plan GPUS=n); ZeRO shards across all of them")
    p.add_argument("--nodes", help="nodes (make plan NODES=m), with --gpus")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="plan as if gradient_checkpointing were false")
    p.add_argument("--measured", action="append", metavar="JSON",
                   help="a benchmarks/gpu.py result to print beside the plan (default: outputs/bench_gpu.json "
                        "when present; recipes/measured.json always)")
    a = p.parse_args(argv)
    processes = process_count(a.gpus, a.nodes)
    recipe = Recipe.open(a.recipe_opt or a.recipe or DEFAULT_RECIPE,
                         ["--gradient-checkpointing", "false"] if a.no_gradient_checkpointing else [])
    plan = estimate(recipe, processes)
    try:
        measured = load_measurements(a.measured)
    except (OSError, ValueError, KeyError) as e:
        raise RecipeError(f"measurements: {e}") from None
    print(report(plan, recipe, measured))
    return 0
