"""`make plan RECIPE=x GPUS=n`: estimated peak GPU memory per GPU for a recipe.

Everything comes from the recipe and the model's config.json (built on the meta device, see
finlora.params); no weights, no GPU. Bytes, then GiB (2**30). recipes/PLANNER.md owns the
formulas, their symbols (the names used below) and a worked example; `estimate` follows its
numbered components 1-8, the load peak after them. It is an estimate for sizing cards: the
loss head and activations assume the longest batch unless `row_tokens` says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from finlora.params import ParamCount, architecture, count_recipe
from finlora.errors import LaunchError, RecipeError
from finlora.recipes import DEFAULT_RECIPE, Recipe

GiB = 2 ** 30
CARDS_GB = (24, 40, 80, 141)
# Inside PyTorch's allocator, beyond the modelled tensors (cuBLAS workspace, bitsandbytes
# buffers, rounding): calibrated on FinLoRA's published NER figures (recipes/measured.json):
# their batch-4/batch-8 pairs extrapolate to 0.54-0.60 GiB above weights + LoRA state.
ALLOCATOR_OVERHEAD_GIB = 0.55
# Outside PyTorch's allocator (CUDA context, kernels and library handles): never in
# max_memory_allocated, always on the card. An allowance, not measured here.
CONTEXT_GIB = 0.6
OVERHEAD_GIB = ALLOCATOR_OVERHEAD_GIB + CONTEXT_GIB
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
EIGHT_BIT_OPTIMIZERS = ("8bit", "bnb_8bit", "adamw_8bit")


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


def _is_8bit_optimizer(name: str) -> bool:
    return any(k in name for k in EIGHT_BIT_OPTIMIZERS)


def flash_attention(recipe: Recipe) -> bool:
    """No seq x seq score matrix: FlashAttention-2, or SDPA's flash/mem-efficient kernels on CUDA."""
    return bool(recipe.get("flash_attention")) or \
        str(recipe.get("attn_implementation") or "").startswith(("sdpa", "flash_attention"))


def estimate(recipe: Recipe, gpus: int = 1, pc: ParamCount | None = None,
             row_tokens: int | None = None) -> Plan:
    """The plan of `recipe` on `gpus` data-parallel GPUs. `row_tokens`: the padded length of
    each row (default `sequence_len`, the longest a batch can be; a measurement made on
    shorter rows is compared at its own length)."""
    if gpus < 1:
        raise LaunchError(f"GPUS must be >= 1, got {gpus}")
    pc = pc or count_recipe(recipe)
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
    P_lin, P_oth = arch.linear_params, arch.other_params
    sum_out = L * sum(out for _, out in block_linears.values())
    c_oth = 4 if bits in (4, 8) and Z != 3 else 2
    if bits == 16:
        w_lin = 2.0 * P_lin
    elif bits == 8:
        w_lin = 1.0 * P_lin + 4.0 * sum_out
    else:
        w_lin = NF4_BYTES * P_lin
    weights = w_lin + c_oth * P_oth
    if c_oth == 4:
        notes.append("embeddings/lm_head/norms upcast to fp32 by prepare_model_for_kbit_training")
    layer_weights = w_lin / L
    whole_weights = weights
    if Z == 3:
        weights /= N
    # The largest single parameter (Llama: the untied embedding or lm_head, vocab x hidden),
    # 16-bit: ZeRO-3 gathers it whole for its module's forward and backward.
    largest_param = 2.0 * max(V * h, max(fi * fo for fi, fo in block_linears.values()))

    # 2-4. LoRA weights, gradients, optimizer
    lora = 4.0 * T / (N if Z == 3 else 1)
    grads = 4.0 * T / (N if Z >= 2 else 1)
    if Z == 0 and N > 1:
        grads += 4.0 * T
        notes.append("DDP gradient buckets")
    opt_bytes = 2.0 if _is_8bit_optimizer(str(recipe.get("optimizer") or "adamw_torch")) else 8.0
    optim = opt_bytes * T / (N if Z >= 1 else 1)
    if recipe.offload_optimizer:
        optim = 0.0
        notes.append("optimizer state offloaded to CPU")

    # 5. activations
    act_layer = 2.0 * (6 * h + 2 * h_kv + 4 * i) + 3.0 * t * h
    if not flash_attention(recipe):
        act_layer += 4.0 * a * s
    tokens = s * b
    if recipe.get("gradient_checkpointing"):
        acts = tokens * L * 2.0 * h + tokens * act_layer
    else:
        acts = tokens * L * act_layer
    if pc.dora:
        acts += 4.0 * max(fi * fo for fi, fo in pc.shapes.values())
    loss_head = tokens * V * 10.0

    # ZeRO-3 holds gathered weights: the layer in use and the one prefetched, or, at the
    # embedding / lm_head, that whole parameter and one layer.
    gather = max(2.0 * layer_weights, largest_param + layer_weights) if Z == 3 else 0.0
    parts = {
        "frozen weights": weights,
        "LoRA weights": lora,
        "gradients": grads,
        "optimizer state": optim,
        "activations": acts,
        "loss head (logits)": loss_head,
        "ZeRO-3 gather buffer": gather,
        "allocator overhead": ALLOCATOR_OVERHEAD_GIB * GiB,
        "CUDA context": CONTEXT_GIB * GiB,
    }

    # Load time. A bitsandbytes model is quantised as it is loaded, one tensor at a time
    # (each arrives 16-bit, then is replaced by its 8/4-bit form), and transformers does
    # not load a quantised model under DeepSpeed's zero.Init: every rank holds the whole
    # quantised model until the DeepSpeed engine partitions it. An unquantised model under
    # ZeRO-3 is partitioned as it loads (zero.Init), one whole parameter at a time.
    largest_linear = 2.0 * max(fi * fo for fi, fo in block_linears.values())
    if Z == 3 and bits == 16:
        load = {"frozen weights (partitioned as loaded)": whole_weights / N,
                "largest parameter, whole": largest_param}
    else:
        load = {"frozen weights, whole on each rank" if Z == 3 else "frozen weights": whole_weights}
        if bits in (4, 8):
            load["16-bit tensor being quantised"] = largest_linear
        if Z == 3:
            notes.append(f"load peak {sum(load.values()) / GiB + CONTEXT_GIB + ALLOCATOR_OVERHEAD_GIB:.1f} GiB: "
                         "the quantised model is whole on every rank until ZeRO-3 partitions it")
    load["allocator overhead"] = ALLOCATOR_OVERHEAD_GIB * GiB
    load["CUDA context"] = CONTEXT_GIB * GiB
    return Plan(recipe=recipe.name, gpus=N, zero=Z, parts=parts, notes=notes, load_parts=load)


# ---------------------------------------------------------------------------- measurements

MEASURED = Path(__file__).resolve().parent.parent / "recipes" / "measured.json"
BENCH_JSON = Path(__file__).resolve().parent.parent / "outputs" / "bench_gpu.json"


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


def planned_at(recipe: Recipe, micro_batch: int, row_tokens: int) -> Plan:
    """The plan of `recipe` at another micro batch and row length (what a measurement ran)."""
    return estimate(recipe.with_args([*recipe.args, "--micro-batch-size", str(micro_batch)]), 1, row_tokens=row_tokens)


def beside_measured(recipe: Recipe, measurements: list[dict] | None = None) -> list[tuple[dict, Plan]]:
    ms = load_measurements() if measurements is None else measurements
    return [(m, planned_at(recipe, m["micro_batch"], m["row_tokens"])) for m in ms if _matches(m, recipe)]


def calibration(recipe: Recipe, measurements: list[dict] | None = None) -> dict | None:
    """For a recipe with published batch-4 and batch-8 figures: the measured line through
    them (intercept = the batch-independent part, slope per row) against the plan's."""
    pub = {m["micro_batch"]: (m, p) for m, p in beside_measured(recipe, measurements) if m["kind"] == "published"}
    if 4 not in pub or 8 not in pub:
        return None
    (m4, _), (m8, p8) = pub[4], pub[8]
    slope = (m8["gib"] - m4["gib"]) / 4
    variable = lambda p: (p.parts["activations"] + p.parts["loss head (logits)"]) / GiB  # noqa: E731
    return {"measured_intercept": m4["gib"] - 4 * slope, "measured_per_row": slope,
            "planned_intercept": p8.allocator_gib - variable(p8), "planned_per_row": variable(p8) / 8,
            "measured_b8": m8["gib"], "planned_b8": p8.allocator_gib, "row_tokens": m8["row_tokens"]}


def report(plan: Plan, recipe: Recipe, measurements: list[dict] | None = None) -> str:
    bits = {16: "bf16", 8: "int8", 4: "nf4"}[recipe.bits]
    lines = [
        f"recipe {plan.recipe}: {recipe.base_model}, {bits} base, r={recipe.lora_shape[0]}, {recipe.variant}, "
        f"seq {recipe.get('sequence_len')} x micro batch {recipe.get('micro_batch_size')}, "
        f"gradient checkpointing {'on' if recipe.get('gradient_checkpointing') else 'off'}",
        f"GPUs {plan.gpus}, " + (f"DeepSpeed ZeRO-{plan.zero}" if plan.zero else
                                 ("DDP" if plan.gpus > 1 else "single GPU, no DeepSpeed")),
        "",
        f"{'component':<28}{'GiB per GPU':>12}",
        "-" * 40,
    ]
    for k, v in plan.parts.items():
        lines.append(f"{k:<28}{v / GiB:>12.2f}")
    lines.append("-" * 40)
    lines.append(f"{'estimated training peak':<28}{plan.total_gib:>12.2f}")
    lines.append(f"{'estimated load peak':<28}{plan.load_peak_gib:>12.2f}")
    lines.append("")
    lines.append(f"card needs {plan.peak_gib:.2f} GiB; fits: "
                 + "  ".join(f"{c} GB {'yes' if plan.fits(c) else 'no'}" for c in CARDS_GB))
    for n in plan.notes:
        lines.append(f"note: {n}")
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
    import argparse

    from finlora.launch import process_count

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
