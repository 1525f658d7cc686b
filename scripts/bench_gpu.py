#!/usr/bin/env python
"""GPU benchmark of the Llama-3.1-8B LoRA recipes: throughput, MFU, peak memory vs the planner.

    python scripts/bench_gpu.py                  # one H200: sentiment_r8, sentiment_r8_bf16, sentiment_r4
    python scripts/bench_gpu.py --recipes sentiment_r4 --steps 300
    python scripts/bench_gpu.py --dry-run        # tiny Llama, 2 steps, CPU/fp32: the CI check of this code

A measurement harness, not the project's training path (that is Axolotl's): a plain
PyTorch loop over transformers' LlamaForCausalLM + PEFT, so that each optimizer step is
timed exactly (CUDA-synchronised) and nothing else runs in it. No download: the model is
built from `recipes/models/llama-3.1-8b/config.json` with random weights, directly on the
GPU, in bf16; for 8-bit / 4-bit recipes each decoder nn.Linear is then replaced by a
bitsandbytes Linear8bitLt (LLM.int8, threshold 6.0) / Linear4bit (NF4, double
quantisation, bf16 compute), as `load_in_8bit` / `load_in_4bit` do, and
`prepare_model_for_kbit_training` upcasts the rest to fp32 (as Axolotl does).

Per recipe, read from its YAML (`finlora.recipe_matrix.load_spec`): bits, LoRA r / alpha
/ dropout / q,k,v targets, micro batch, gradient accumulation, sequence_len, optimizer
(adamw_bnb_8bit -> bnb AdamW8bit, paged_adamw_8bit -> bnb PagedAdamW8bit), lr, cosine
schedule with the recipe's warm-up ratio, gradient clipping, gradient checkpointing
(use_reentrant true), flash attention (FlashAttention-2 when `flash_attn` is installed,
else SDPA, printed). bf16 autocast throughout.

Data: random token ids with realistic lengths: the recipe's own data file's rows
(context+target characters / 4, + 2 answer tokens; the Llama 3 tokenizer is not
available offline) when it is present, else data/train/sentiment_cpu_train.jsonl, else
a normal(75, 20) length, clipped to [16, sequence_len]; right padding to the longest
row of each micro batch (no packing, like the recipes); loss on the last 2 tokens.

Figures, over steps warmup+1..N:
- tokens/s: non-padding tokens per second.
- MFU = achieved model FLOP/s / peak (--peak-tflops, default 989 = H100/H200 SXM dense
  bf16). Model FLOPs per step, summed over the rows of every micro batch (length s_i):
      sum_i [ s_i * (4 * P_mm + 6 * T) + 6 * L * d * s_i^2 ]
  P_mm: frozen parameters that take part in matmuls (every nn.Linear incl. lm_head; the
  embedding is a lookup): 2 FLOPs per parameter and token forward, 2 more backward for
  the activation gradient (frozen weights get no weight gradient). T: trainable LoRA
  parameters, 2 forward + 4 backward. Attention scores and the weighted sum: causal,
  per layer and row forward 2 * s^2 * d (d = heads x head_dim), backward twice that:
  6 * L * d * s^2. Gradient checkpointing's recomputed forward is not counted (this is
  MFU, not hardware FLOPs utilisation); the int8/NF4 bases dequantise or use int8
  kernels, the peak used is bf16's for all.
- peak memory: torch.cuda.max_memory_allocated (and max_memory_reserved), over the
  realistic-length steps; then a short probe (--probe-steps, default 2) with every row
  at the full sequence_len, the case `finlora.plan` sizes for, compared with
  `plan.estimate` (total, and total minus its 1.5 GiB CUDA context/overhead allowance,
  which max_memory_allocated does not see).

Fits one 10-minute call on one H200 (--budget-s 540, shared by the recipes: a recipe
stops early, after at least warmup+5 steps, when its share is used). Missing packages
(torch with CUDA, transformers, peft, bitsandbytes) are listed and the exit status is 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPES = ("sentiment_r8", "sentiment_r8_bf16", "sentiment_r4")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, bos_token_id=1,
            eos_token_id=2)
GiB = 2 ** 30
ANSWER_TOKENS = 2


def missing_packages(dry_run: bool) -> list[str]:
    need = ["torch", "transformers", "peft"] + ([] if dry_run else ["bitsandbytes"])
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    if not dry_run and "torch" not in missing:
        import torch

        if not torch.cuda.is_available():
            missing.append("a CUDA device (torch.cuda.is_available() is False; torch " + torch.__version__ + ")")
    return missing


# ---------------------------------------------------------------------------- model

def model_config(spec, dry_run: bool):
    from transformers import LlamaConfig

    d = json.loads((Path(spec.config_dir) / "config.json").read_text())
    if dry_run:
        d.update(TINY)
        d.pop("rope_scaling", None)
    d.pop("torch_dtype", None)
    return LlamaConfig(**d)


def quantize_linears(model, bits: int, device) -> None:
    """Replace every decoder nn.Linear by its bitsandbytes 8-bit / NF4 counterpart.

    bitsandbytes quantises a parameter when it moves from the CPU to the GPU, so each
    bf16 weight makes a round trip through host memory, one matrix at a time."""
    import bitsandbytes as bnb
    import torch

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if type(lin) is not torch.nn.Linear:
                    continue
                w = lin.weight.data.to("cpu")
                if bits == 8:
                    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                            has_fp16_weights=False, threshold=6.0, device="meta")
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False).to(device)
                else:
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, device="meta",
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    try:
                        p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                              module=q)
                    except TypeError:  # older bitsandbytes: no module argument
                        p = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
                    q.weight = p.to(device)
                    if hasattr(q, "quant_state"):
                        q.quant_state = q.weight.quant_state
                setattr(parent, name, q)
                del lin, w
    if bits == 8:
        model.is_loaded_in_8bit = True
    else:
        model.is_loaded_in_4bit = True
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(config, bits: int, device, dtype, quantize: bool):
    import torch
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # random init, on the device, in `dtype`
    finally:
        torch.set_default_dtype(old)
    if quantize and bits in (4, 8):
        quantize_linears(model, bits, device)
    return model


def matmul_params(config) -> int:
    """Frozen parameters used in matmuls: every decoder nn.Linear + lm_head."""
    h, i, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    return L * per_layer + h * v


def step_flops(lengths: list[int], P_mm: int, T: int, L: int, d: int) -> float:
    return float(sum(s * (4 * P_mm + 6 * T) + 6 * L * d * s * s for s in lengths))


# ---------------------------------------------------------------------------- data

def realistic_lengths(spec, seq_len: int, n: int, rng: random.Random) -> tuple[list[int], str]:
    cands = [ROOT / ds.get("path", "") for ds in (spec.cfg.get("datasets") or [])]
    cands.append(ROOT / "data" / "train" / "sentiment_cpu_train.jsonl")
    for path in cands:
        if path.is_file():
            lens = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        row = json.loads(line)
                        lens.append(round(len(row["context"] + row["target"]) / 4) + ANSWER_TOKENS)
            if lens:
                return [min(seq_len, max(16, rng.choice(lens))) for _ in range(n)], \
                    f"lengths of {path.relative_to(ROOT)} (chars/4 + {ANSWER_TOKENS})"
    return [min(seq_len, max(16, int(rng.gauss(75, 20)))) for _ in range(n)], "normal(75, 20) lengths"


def make_batch(lengths: list[int], vocab: int, device, gen):
    import torch

    width = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, s in enumerate(lengths):
        mask[j, :s] = 1
        labels[j, s - ANSWER_TOKENS:s] = ids[j, s - ANSWER_TOKENS:s]
    ids[mask == 0] = 0
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ---------------------------------------------------------------------------- optimizer

def make_optimizer(name: str, params, lr: float, use_bnb: bool):
    import torch

    if use_bnb and name in ("adamw_bnb_8bit", "paged_adamw_8bit"):
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if name == "adamw_bnb_8bit" else bnb.optim.PagedAdamW8bit
        return cls(params, lr=lr, weight_decay=0.0), name
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), "adamw_torch" + (
        f" (in place of {name}: no bitsandbytes/GPU)" if name != "adamw_torch" else "")


# ---------------------------------------------------------------------------- one recipe

def run_recipe(name: str, a, deadline: float) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import get_cosine_schedule_with_warmup

    from finlora.plan import estimate
    from finlora.recipe_matrix import load_spec

    t_start = time.perf_counter()
    spec = load_spec(name)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    quantize = spec.bits in (4, 8) and cuda and has_bnb
    dtype = torch.bfloat16 if cuda else torch.float32
    config = model_config(spec, a.dry_run)
    tmpdir = None
    if a.dry_run:  # the planner reads config.json from a folder: give it the tiny one
        tmpdir = tempfile.TemporaryDirectory()
        (Path(tmpdir.name) / "config.json").write_text(config.to_json_string())
        spec.config_dir = Path(tmpdir.name)
    flash = spec.flash_attention and cuda and importlib.util.find_spec("flash_attn") is not None
    config._attn_implementation = "flash_attention_2" if flash else "sdpa"
    seq_len = a.seq_len or spec.seq_len
    mb, ga = spec.micro_batch, spec.grad_accum
    if a.dry_run:  # the same code path, smaller: 2 rows, 1 micro batch per step
        mb, ga = min(mb, 2), 1
    spec.seq_len, spec.micro_batch, spec.grad_accum = seq_len, mb, ga  # what the planner sizes = what runs
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(a.seed)

    model = build_model(config, spec.bits, device, dtype, quantize)
    gc_kwargs = {"use_reentrant": True}
    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=float(spec.cfg.get("lora_dropout", 0.05)),
        target_modules=spec.targets, bias="none", task_type="CAUSAL_LM", use_rslora=spec.rslora,
        use_dora=spec.dora))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    T = sum(p.numel() for p in params)
    opt, opt_name = make_optimizer(spec.optimizer, params, float(spec.cfg.get("learning_rate", 1e-4)),
                                   has_bnb and cuda)
    steps = a.steps
    warm_ratio = float(spec.cfg.get("warmup_ratio") or 0.0)
    sched = get_cosine_schedule_with_warmup(opt, int(spec.cfg.get("warmup_steps") or math.ceil(warm_ratio * steps)),
                                            steps)
    P_mm = matmul_params(config)
    L = config.num_hidden_layers
    d = config.num_attention_heads * (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    rng = random.Random(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    lengths, length_src = realistic_lengths(spec, seq_len, (steps + a.probe_steps) * mb * ga, rng)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)
    clip = float(spec.cfg.get("max_grad_norm") or 1.0)
    build_s = time.perf_counter() - t_start

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def one_step(step_lengths: list[list[int]]) -> float:
        loss_sum = 0.0
        for ls in step_lengths:
            batch = make_batch(ls, config.vocab_size, device, gen)
            with autocast:
                loss = model(**batch).loss / len(step_lengths)
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum

    times, tokens, flops, losses = [], [], [], []
    stopped_early = False
    sync()
    t_prev = time.perf_counter()
    for step in range(steps):
        chunk = lengths[step * mb * ga:(step + 1) * mb * ga]
        losses.append(one_step([chunk[k * mb:(k + 1) * mb] for k in range(ga)]))
        sync()
        now = time.perf_counter()
        times.append(now - t_prev)
        t_prev = now
        tokens.append(sum(chunk))
        flops.append(step_flops(chunk, P_mm, T, L, d))
        if now > deadline and step + 1 >= a.warmup + 5:
            stopped_early = True
            break
    n = len(times)
    w = min(a.warmup, n - 1)
    dt = sum(times[w:])
    peak_alloc = torch.cuda.max_memory_allocated() / GiB if cuda else None
    peak_res = torch.cuda.max_memory_reserved() / GiB if cuda else None

    # the planner's case: every row at the full sequence_len
    probe_alloc = probe_res = None
    if a.probe_steps:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(a.probe_steps):
            one_step([[seq_len] * mb for _ in range(ga)])
        sync()
        if cuda:
            probe_alloc = torch.cuda.max_memory_allocated() / GiB
            probe_res = torch.cuda.max_memory_reserved() / GiB
    plan = estimate(spec, 1)
    overhead = plan.parts.get("CUDA context/overhead", 0.0) / GiB
    peak_flops = a.peak_tflops * 1e12
    res = {
        "recipe": name, "bits": spec.bits, "r": spec.r, "targets": spec.targets, "trainable": T,
        "micro_batch": mb, "grad_accum": ga, "seq_len": seq_len, "optimizer": opt_name,
        "attention": config._attn_implementation, "quantized": quantize,
        "gradient_checkpointing": spec.gradient_checkpointing, "lengths": length_src,
        "steps_run": n, "timed_steps": n - w, "stopped_early": stopped_early, "build_s": build_s,
        "s_per_step": dt / max(1, n - w), "tokens_per_s": sum(tokens[w:]) / dt if dt else 0.0,
        "mean_row_tokens": sum(tokens) / max(1, n * mb * ga),
        "mfu": (sum(flops[w:]) / dt / peak_flops) if dt else 0.0,
        "first_loss": losses[0], "last_loss": losses[n - 1],
        "peak_alloc_gib": peak_alloc, "peak_reserved_gib": peak_res,
        "probe_alloc_gib": probe_alloc, "probe_reserved_gib": probe_res,
        "plan_gib": plan.total_gib, "plan_without_overhead_gib": plan.total_gib - overhead,
        "wall_s": time.perf_counter() - t_start,
    }
    del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    if tmpdir is not None:
        tmpdir.cleanup()
    return res


def fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def report(r: dict) -> str:
    lines = [
        f"== {r['recipe']}: {r['bits']}-bit base ({'quantized' if r['quantized'] else 'not quantized'}), "
        f"LoRA r={r['r']} on {','.join(r['targets'])} ({r['trainable']:,} trainable), micro batch "
        f"{r['micro_batch']} x {r['grad_accum']}, seq {r['seq_len']}, {r['optimizer']}, {r['attention']}, "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}",
        f"   data: random ids, {r['lengths']}; mean row {r['mean_row_tokens']:.1f} tokens",
        f"   steps {r['steps_run']} ({r['timed_steps']} timed{', stopped early: time budget' if r['stopped_early'] else ''}); "
        f"build {r['build_s']:.1f} s; loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}",
        f"   {r['s_per_step']:.3f} s/step   {r['tokens_per_s']:,.0f} tokens/s   MFU {100 * r['mfu']:.1f}%",
        f"   peak memory (realistic lengths): allocated {fmt(r['peak_alloc_gib'])} GiB, reserved "
        f"{fmt(r['peak_reserved_gib'])} GiB",
        f"   peak memory (every row at seq {r['seq_len']}): allocated {fmt(r['probe_alloc_gib'])} GiB, reserved "
        f"{fmt(r['probe_reserved_gib'])} GiB; planner {r['plan_gib']:.2f} GiB "
        f"({r['plan_without_overhead_gib']:.2f} without its overhead allowance)"
        + (f"; measured/planned(w/o overhead) {r['probe_alloc_gib'] / r['plan_without_overhead_gib']:.2f}"
           if r["probe_alloc_gib"] else ""),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipe names")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per recipe (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the rates (default 10)")
    ap.add_argument("--probe-steps", type=int, default=2, help="full-length steps for the planner check")
    ap.add_argument("--seq-len", type=int, help="override the recipes' sequence_len")
    ap.add_argument("--budget-s", type=float, default=540, help="total seconds for all recipes (default 540)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense bf16 TFLOP/s (H200: 989)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny Llama (2 layers, hidden 64), 2 steps of 2 rows of <= 32 tokens, fp32 on CPU "
                         "(no quantization without a GPU)")
    a = ap.parse_args(argv)
    missing = missing_packages(a.dry_run)
    if missing:
        print("bench_gpu: missing: " + "; ".join(missing), file=sys.stderr)
        print("bench_gpu: needs torch with CUDA, transformers, peft and bitsandbytes "
              "(`make setup GPU=1`, or pip install bitsandbytes); --dry-run needs only the first three",
              file=sys.stderr)
        return 2
    if a.dry_run:
        a.steps, a.warmup, a.probe_steps = 2, 1, min(a.probe_steps, 1)
        a.seq_len = a.seq_len or 32
    import torch

    names = [n.strip() for n in a.recipes.split(",") if n.strip()]
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"bench_gpu: {dev}; torch {torch.__version__}; recipes {', '.join(names)}; "
          f"{a.steps} steps, first {a.warmup} untimed; budget {a.budget_s:.0f} s"
          + (" [dry run: tiny model]" if a.dry_run else ""), flush=True)
    t0 = time.perf_counter()
    results = []
    for k, name in enumerate(names):
        share = (a.budget_s - (time.perf_counter() - t0)) / (len(names) - k)
        r = run_recipe(name, a, deadline=time.perf_counter() + share)
        results.append(r)
        print(report(r), flush=True)
    print(f"bench_gpu: done in {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
