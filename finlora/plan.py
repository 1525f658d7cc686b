"""`make plan RECIPE=x GPUS=n`: estimated peak GPU memory per GPU for a recipe.

Everything comes from the recipe and the model's config.json (built on the meta
device, see finlora.params); no weights, no GPU. Bytes, then GiB (2**30). The same
formulas, with worked numbers, are in recipes/PLANNER.md.

Symbols: N GPUs (data-parallel ranks), Z the ZeRO stage of the recipe's DeepSpeed
config (0: none, plain DDP), T trainable LoRA parameters, P_lin base parameters in the
decoder's nn.Linear layers (the ones bitsandbytes quantizes), P_oth the rest
(embeddings, lm_head, norms), sum_out the summed output rows of those Linear layers,
L layers, h hidden size, h_kv = kv_heads * head_dim, i MLP intermediate size, a heads,
V vocabulary, s sequence_len (the longest batch: no packing, no padding to length),
b micro_batch_size, t number of LoRA target modules.

1. Frozen base weights
     16-bit: 2 * (P_lin + P_oth)
     8-bit (LLM.int8): 1 * P_lin + 4 * sum_out (fp32 row scales) + c * P_oth
     4-bit (NF4, double quant; blocks of 64, absmax 8-bit, 2nd-level blocks of 256
            in fp32): (0.5 + 1/64 + 4/(64*256)) * P_lin = 0.51587 * P_lin, + c * P_oth
   c = 4 for 8/4-bit without ZeRO-3 (PEFT's prepare_model_for_kbit_training upcasts
   every non-quantized parameter to fp32), else 2. ZeRO-3: divided by N.
2. LoRA weights: 4 * T (fp32). ZeRO-3: / N.
3. Gradients:    4 * T (fp32). ZeRO-2/3: / N. DDP (Z=0, N>1) adds 4 * T of buckets.
4. Optimizer state: AdamW 8 * T (two fp32 moments); 8-bit optimizers (adamw_bnb_8bit,
   paged_adamw_8bit, ...) 2 * T. ZeRO-1/2/3: / N; 0 when the DeepSpeed config offloads
   the optimizer to CPU.
5. Activations, 16-bit, per token and layer, without checkpointing:
     act_layer = 2 * (6h + 2h_kv + 4i) + 3 * t * h
   (attention: norm input, q/k/v input, q, k, v, attention output -> 4h + 2h_kv;
   MLP: norm input, gate/up input, gate, up, silu(gate), product -> 2h + 4i; per LoRA
   target its dropout output (2 bytes) and mask (1 byte) of the input, 3h).
   Without flash attention add 4 * a * s per token and layer (scores and softmax).
     no checkpointing:   s * b * L * act_layer
     with checkpointing: s * b * L * 2h (each layer's input) + s * b * act_layer
                         (one layer recomputed at a time in backward)
   plus the loss head: s * b * V * 10 (bf16 logits 2 + fp32 upcast for the
   cross-entropy 4 + fp32 logits gradient 4). Data parallelism does not shard these.
   DoRA adds 4 * max(in * out) over the targets (the 16-bit weight it re-materialises
   to take the column norm, and W + BA).
6. ZeRO-3 gather buffer: 2 layers' frozen weights (the layer in use and the one
   prefetched), at the bits above.
7. Overhead: 1.5 GiB per GPU (CUDA context and cuBLAS workspace ~0.7 GiB, NCCL
   buffers, allocator fragmentation).

Peak = 1 + 2 + 3 + 4 + 5 + 6 + 7. It is an estimate for sizing cards: the loss head
and activations assume the longest batch; allocator behaviour can add 5-10%.
"""

from __future__ import annotations

from dataclasses import dataclass

from finlora.params import ParamCount, _layer_linears, count
from finlora.recipe_matrix import RecipeSpec, load_matrix, load_spec, recipe_name

GiB = 2 ** 30
CARDS_GB = (24, 40, 80, 141)
OVERHEAD_GIB = 1.5
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
EIGHT_BIT_OPTIMIZERS = ("8bit", "bnb_8bit", "adamw_8bit")


@dataclass
class Plan:
    recipe: str
    gpus: int
    zero: int
    parts: dict[str, float]      # bytes per GPU, by component
    notes: list[str]

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GiB

    def fits(self, card_gb: float) -> bool:
        return self.total_gib <= card_gb

    @property
    def smallest_card(self) -> int | None:
        return next((c for c in CARDS_GB if self.fits(c)), None)


def _is_8bit_optimizer(name: str) -> bool:
    return any(k in name for k in EIGHT_BIT_OPTIMIZERS)


def estimate(spec: RecipeSpec, gpus: int = 1, pc: ParamCount | None = None) -> Plan:
    if gpus < 1:
        raise ValueError("GPUS must be >= 1")
    if spec.config_dir is None:
        raise SystemExit(f"error: {spec.name}: no local config.json for base_model {spec.base_model!r}")
    pc = pc or count(spec.config_dir, spec.r, spec.targets, spec.dora)
    block_linears, L, _, _, config = _layer_linears(spec.config_dir)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, a, V, i = pc.hidden, pc.heads, pc.vocab, pc.intermediate
    head_dim = getattr(text, "head_dim", None) or h // a
    h_kv = pc.kv_heads * head_dim
    N, Z = gpus, spec.zero_stage
    T = pc.trainable
    s, b, t = spec.seq_len, spec.micro_batch, len(spec.targets)
    notes: list[str] = []

    # 1. frozen weights
    P_lin, P_oth = pc.linear_params, pc.other_params
    sum_out = L * sum(out for _, out in block_linears.values())
    c_oth = 4 if spec.bits in (4, 8) and Z != 3 else 2
    if spec.bits == 16:
        w_lin = 2.0 * P_lin
    elif spec.bits == 8:
        w_lin = 1.0 * P_lin + 4.0 * sum_out
    else:
        w_lin = NF4_BYTES * P_lin
    weights = w_lin + c_oth * P_oth
    if c_oth == 4:
        notes.append("embeddings/lm_head/norms upcast to fp32 by prepare_model_for_kbit_training")
    layer_weights = w_lin / L
    if Z == 3:
        weights /= N

    # 2-4. LoRA weights, gradients, optimizer
    lora = 4.0 * T / (N if Z == 3 else 1)
    grads = 4.0 * T / (N if Z >= 2 else 1)
    if Z == 0 and N > 1:
        grads += 4.0 * T
        notes.append("DDP gradient buckets")
    opt_bytes = 2.0 if _is_8bit_optimizer(spec.optimizer) else 8.0
    optim = opt_bytes * T / (N if Z >= 1 else 1)
    if spec.offload_optimizer:
        optim = 0.0
        notes.append("optimizer state offloaded to CPU")

    # 5. activations
    act_layer = 2.0 * (6 * h + 2 * h_kv + 4 * i) + 3.0 * t * h
    if not spec.flash_attention:
        act_layer += 4.0 * a * s
    tokens = s * b
    if spec.gradient_checkpointing:
        acts = tokens * L * 2.0 * h + tokens * act_layer
    else:
        acts = tokens * L * act_layer
    if spec.dora:
        acts += 4.0 * max(fi * fo for fi, fo in pc.shapes.values())
    loss_head = tokens * V * 10.0

    parts = {
        "frozen weights": weights,
        "LoRA weights": lora,
        "gradients": grads,
        "optimizer state": optim,
        "activations": acts,
        "loss head (logits)": loss_head,
        "ZeRO-3 gather buffer": 2.0 * layer_weights if Z == 3 else 0.0,
        "CUDA context/overhead": OVERHEAD_GIB * GiB,
    }
    return Plan(recipe=spec.name, gpus=N, zero=Z, parts=parts, notes=notes)


def plan_recipe(name_or_path: str, gpus: int = 1, gradient_checkpointing: bool | None = None) -> Plan:
    spec = load_spec(name_or_path)
    if gradient_checkpointing is not None:
        spec.gradient_checkpointing = gradient_checkpointing
    return estimate(spec, gpus)


def report(plan: Plan, spec: RecipeSpec) -> str:
    bits = {16: "bf16", 8: "int8", 4: "nf4"}[spec.bits]
    lines = [
        f"recipe {plan.recipe}: {spec.base_model}, {bits} base, r={spec.r}, {spec.variant}, "
        f"seq {spec.seq_len} x micro batch {spec.micro_batch}, "
        f"gradient checkpointing {'on' if spec.gradient_checkpointing else 'off'}",
        f"GPUs {plan.gpus}, " + (f"DeepSpeed ZeRO-{plan.zero}" if plan.zero else
                                 ("DDP" if plan.gpus > 1 else "single GPU, no DeepSpeed")),
        "",
        f"{'component':<28}{'GiB per GPU':>12}",
        "-" * 40,
    ]
    for k, v in plan.parts.items():
        lines.append(f"{k:<28}{v / GiB:>12.2f}")
    lines.append("-" * 40)
    lines.append(f"{'estimated peak':<28}{plan.total_gib:>12.2f}")
    lines.append("")
    lines.append("fits: " + "  ".join(f"{c} GB {'yes' if plan.fits(c) else 'no'}" for c in CARDS_GB))
    for n in plan.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def recipe_table(gpus: int = 1, include_default: bool = True) -> str:
    """The README table: every recipe with its trainable parameters and planned memory.

    The CPU default's row needs its base model built (outputs/base/); the copy kept
    in README.md leaves it out so that the drift check does not depend on that."""
    m = load_matrix()
    rows = [
        "| recipe | task | model | rank | bits | variant | trainable params | "
        f"planned GiB/GPU ({gpus} GPU{'s' if gpus > 1 else ''}) | smallest card |",
        "|---|---|---|---:|---|---|---:|---:|---|",
    ]

    def row(name: str, task: str, spec: RecipeSpec, label: str) -> str:
        pc = count(spec.config_dir, spec.r, spec.targets, spec.dora)
        p = estimate(spec, gpus, pc)
        card = f"{p.smallest_card} GB" if p.smallest_card else "> 141 GB"
        bits = {16: "16 (bf16)", 8: "8 (int8)", 4: "4 (NF4)"}[spec.bits]
        return (f"| `{name}` | {task} | {label} | {spec.r} | {bits} | {spec.variant} | "
                f"{pc.trainable:,} | {p.total_gib:.1f} | {card} |")

    from finlora.recipes import RECIPE_DIR

    default = RECIPE_DIR / "smollm2_sentiment_r8.yml"
    if include_default and default.is_file():
        spec = load_spec(str(default))
        if spec.config_dir is not None:
            rows.append(row(spec.name, "sentiment (CPU default)", spec, "SmolLM2-135M-Instruct"))
    for variant, v in m["variants"].items():
        label = m["models"][v["model"]]["label"]
        for task in m["tasks"]:
            name = recipe_name(task, variant)
            rows.append(row(name, task, load_spec(name), label))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Estimated peak GPU memory per GPU for a recipe")
    p.add_argument("recipe", nargs="?", help="recipe name or YAML path")
    p.add_argument("--recipe", dest="recipe_opt")
    p.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (ZeRO shards across them)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="plan as if gradient_checkpointing were false")
    a = p.parse_args(argv)
    from finlora import recipes

    name = a.recipe_opt or a.recipe or recipes.DEFAULT_RECIPE
    spec = load_spec(name)
    if a.no_gradient_checkpointing:
        spec.gradient_checkpointing = False
    plan = estimate(spec, a.gpus)
    print(report(plan, spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
