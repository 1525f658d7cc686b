"""Time Axolotl's own trainer on the GPU recipes: tokens/s, MFU, peak memory beside `make plan`.

    python -m benchmarks.gpu                       # one GPU: ner_r8, ner_r4, ner_r8_bf16
    python -m benchmarks.gpu --task sentiment --steps 20
    python -m benchmarks.gpu --cpu                 # tiny model, 2 steps, this CPU: the test of this code

Each recipe runs as users run it (`scripts/train.py`, i.e. `make train`: `make check`, then
`axolotl train`), from a copy of the generated YAML in which only these keys change:
- `base_model`: a local folder with random weights of the recipe's architecture
  (`recipes/models/<model>/config.json`; built once, on the device it runs on, saved as
  safetensors; `random_model`) and a word-level tokenizer with Llama 3's
  special-token ids. With `--cpu` the architecture is shrunk (2 layers, hidden 64; the
  vocabulary, and so the loss head's shape, is kept).
- `datasets[0].path`: synthetic rows of exactly `--row-tokens` tokens (default: the recipe's
  `sequence_len`, the case `make plan` sizes for), enough for `--steps` optimizer steps at the
  recipe's micro batch and gradient accumulation; the recipe's own dataset type tokenises them.
- `max_steps`, `output_dir`, `dataset_prepared_path` (a work folder), `save_strategy: "no"`,
  `logging_steps: 1`, and the plugin `benchmarks.measure.BenchPlugin` appended.
- `flash_attention` -> `sdp_attention` when the `flash_attn` package is absent (printed).
- `--cpu` only: `sequence_len` (`--seq-len`, default 32) and the steps (2, the first untimed).
Everything else (quantisation, LoRA, optimizer, precision, checkpointing, micro batch) is the
recipe's and is applied by Axolotl. `benchmarks/measure.py` says what the plugin measures.

Output: a table, and JSON (atomic write; default outputs/bench_gpu.json on a GPU, which
`make plan` reads as measurements; outputs/bench_gpu_cpu.json with --cpu, which it ignores).
Exit status 2 when a GPU run finds no CUDA device.

The model: `word_tokenizer` makes one whitespace-separated word `t<id>` token `<id>`, so a
synthetic row of exactly n tokens is written as text and goes through the recipe's own dataset
type and Axolotl's tokenisation. Llama 3's special tokens keep their ids and names
(`<|eot_id|>` 128009, `<|finetune_right_pad_id|>` 128004), so the recipe's `special_tokens`
add nothing and the embedding is never resized. No download: Llama 3.1's weights are gated.

MFU convention (stated in the report and the JSON): model FLOPs of one training step
    = sum over rows of [ n_i * (6 T + 4 P_mm) + 6 L d n_i^2 ]
with T the trainable LoRA parameters (2 FLOPs per parameter and token forward, 4 backward:
activation and weight gradient), P_mm the frozen parameters that take part in matmuls (every
decoder nn.Linear and lm_head; the embedding is a lookup): 2 forward + 2 backward for the
activation gradient, no weight gradient; attention scores and weighted sum, causal, per layer
and row 2 d n^2 forward (half of the n x n square, two matmuls) and twice that backward:
6 L d n^2 in all, d = heads x head_dim. Gradient checkpointing's recomputed forward is not
counted (model FLOPs, not hardware FLOPs). The JSON also gives `mfu_6n`, the common
"6 x all parameters per token" figure, for comparison with other reports.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import ROOT, child_env
from benchmarks.measure import GiB, OUT_ENV, throughput
from finlora.cli import run
from finlora.errors import RecipeError

# Llama 3 / 3.1 special tokens: ids as in Meta's tokenizer
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                   128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
# --cpu: 2 layers, hidden 64, 4 heads of 16 (2 key/value heads), MLP 128; the vocabulary is kept
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128)

# Dense bf16 peak TFLOP/s (no sparsity) by device name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
               "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "RTX A5000": 111.0}


def peak_tflops_for(device_name: str) -> float | None:
    for key, v in PEAK_TFLOPS.items():
        if key in device_name:
            return v
    return None


# ---------------------------------------------------------------------------- model

def word_tokenizer(vocab_size: int, specials: dict[int, str] = LLAMA3_SPECIALS):
    """A fast tokenizer whose word `t<i>` is id i, with the given special tokens at their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    for i, name in specials.items():
        if i < vocab_size:
            del vocab[f"t{i}"]
            vocab[name] = i
    unk = specials.get(128001, "t0") if 128001 < vocab_size else "t0"
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = {}
    if 128000 < vocab_size:
        kw = dict(bos_token=specials[128000], eos_token=specials[128009], pad_token=specials[128004],
                  unk_token=unk)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    specials_present = [n for i, n in specials.items() if i < vocab_size]
    if specials_present:
        fast.add_special_tokens({"additional_special_tokens": specials_present})
    return fast


def random_model(config_dir: str | Path, out_dir: str | Path, *, tiny: bool = False, device: str = "cpu",
                 dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Save a randomly initialised model of `config_dir`'s architecture (safetensors) and
    `word_tokenizer` to `out_dir`. `tiny` keeps the vocabulary and the layer types but
    shrinks widths and depth (`TINY`) for a CPU run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from finlora.smoke import shrunk_config

    out = Path(out_dir)
    config = (shrunk_config(config_dir, **TINY) if tiny else
              AutoConfig.from_pretrained(str(config_dir), local_files_only=True))
    config.use_cache = False
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(device):  # random init where it will run: seconds on a GPU for 8B
            model = AutoModelForCausalLM.from_config(config, dtype=dt)
    finally:
        torch.set_default_dtype(old)
    model.config.dtype = dtype
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    word_tokenizer(config.vocab_size).save_pretrained(str(out))
    return out


def synthetic_rows(n_rows: int, row_tokens: int, answer_tokens: int, vocab_limit: int, seed: int) -> list[dict]:
    """FinLoRA {context, target} rows of random words; with `word_tokenizer` the prompt is
    row_tokens - answer_tokens - 1 tokens and the target answer_tokens + EOS."""
    import random

    if row_tokens < answer_tokens + 2:
        raise ValueError(f"row_tokens {row_tokens} must be at least answer_tokens + 2 = {answer_tokens + 2}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n_rows):
        prompt = " ".join(f"t{rng.randrange(vocab_limit)}" for _ in range(row_tokens - answer_tokens - 1))
        target = " ".join(f"t{rng.randrange(vocab_limit)}" for _ in range(answer_tokens))
        rows.append({"context": prompt, "target": target})
    return rows


# ---------------------------------------------------------------------------- FLOPs

def matmul_params(config) -> int:
    """Frozen parameters used in matmuls: every decoder nn.Linear and lm_head."""
    h, i, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    return L * (h * q + 2 * h * kv + q * h + 3 * h * i) + h * v


def model_flops_per_token(P_mm: int, T: int) -> float:
    return 6.0 * T + 4.0 * P_mm


def attention_flops(n: int, L: int, d: int) -> float:
    return 6.0 * L * d * n * n


# ---------------------------------------------------------------------------- run

VARIANTS = ("r8", "r4", "r8_bf16")
PLUGIN = "benchmarks.measure.BenchPlugin"
ANSWER_TOKENS = 2


def bench_recipe(name: str, recipe, cfg: dict, model_dir: Path, work: Path, a, flash_ok: bool) -> dict:
    from finlora.atomic import write_jsonl

    seq_len = a.seq_len or recipe.number("sequence_len", 2048)
    row_tokens = min(a.row_tokens or seq_len, seq_len)
    mb, ga = recipe.number("micro_batch_size", 1), recipe.number("gradient_accumulation_steps", 1)
    rdir = work / name
    if rdir.exists():
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True)
    data = rdir / "rows.jsonl"
    vocab_limit = 128000  # ordinary ids only: below Llama 3's special tokens
    write_jsonl(data, synthetic_rows(a.steps * mb * ga, row_tokens, ANSWER_TOKENS, vocab_limit, a.seed))

    r = copy.deepcopy(cfg)
    changed = ["base_model", "datasets[0].path", "max_steps", "output_dir", "dataset_prepared_path",
               "save_strategy", "logging_steps", "plugins"]
    r["base_model"] = str(model_dir)
    r["datasets"] = [dict(r["datasets"][0], path=str(data))]
    r.update(max_steps=a.steps, output_dir=str(rdir / "out"), dataset_prepared_path=str(rdir / "prepared"),
             save_strategy="no", logging_steps=1)
    r["plugins"] = list(r.get("plugins") or []) + [PLUGIN]
    notes = []
    wants_flash = r.get("flash_attention") or r.get("attn_implementation") == "flash_attention_2"
    if wants_flash and not flash_ok:
        # Axolotl 0.19's spelling (sdp_attention is deprecated there)
        r.pop("flash_attention", None)
        r.pop("sdp_attention", None)
        r["attn_implementation"] = "sdpa"
        changed.append("flash attention->attn_implementation: sdpa")
        notes.append("flash_attn not installed: SDPA attention instead of FlashAttention-2")
    if a.cpu:
        r["sequence_len"] = seq_len
        changed.append("sequence_len")
    recipe_file = rdir / f"{name}.yml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(r, sort_keys=False), encoding="utf-8")
    record_path = rdir / "record.json"
    env = child_env(**{OUT_ENV: str(record_path)})
    log = rdir / "train.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe_file)], cwd=ROOT,
                              env=env, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not record_path.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"{name}: training exited with status {proc.returncode}; log {log}:\n{tail}")
    rec = json.loads(record_path.read_text(encoding="utf-8"))
    return summarise(name, recipe, rec, model_dir, a, row_tokens, seq_len, wall, changed, notes)


def summarise(name, recipe, rec, model_dir, a, row_tokens, seq_len, wall, changed, notes) -> dict:
    from transformers import AutoConfig

    from finlora.params import architecture
    from finlora.plan import estimate

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    T = int(rec["trainable_params"])
    P_mm = matmul_params(config)
    L = config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d = config.num_attention_heads * hd
    total_params = architecture(str(model_dir)).total_params
    warm = min(a.warmup, len(rec["steps"]) - 1)
    rate = throughput(rec["steps"], warm)
    per_token = model_flops_per_token(P_mm, T)
    # every row is row_tokens long (synthetic): attention FLOPs per row are the same
    rows_per_s = rate["examples_per_s"]
    flops_per_s = rate["tokens_per_s"] * per_token + rows_per_s * attention_flops(row_tokens, L, d)
    device = rec.get("device", "cpu")
    peak = a.peak_tflops or (peak_tflops_for(device) if device != "cpu" else None)
    mfu = flops_per_s / (peak * 1e12) if peak else None
    mfu_6n = rate["tokens_per_s"] * 6.0 * total_params / (peak * 1e12) if peak else None

    # the plan at the conditions that ran: this micro batch, rows of row_tokens tokens, this model
    recipe = recipe.with_args([*recipe.args, "--base-model", str(model_dir), "--sequence-len", str(seq_len)])
    plan = estimate(recipe, 1, row_tokens=row_tokens)
    mem = rec["memory"]
    cuda = device != "cpu"
    res = {
        "recipe": name, "device": device, "architecture": "tiny" if a.cpu else "full",
        "config_dir": str(recipe.config_dir), "bits": recipe.bits, "r": recipe.lora_shape[0], "trainable": T,
        "total_params": total_params, "optimizer": recipe.get("optimizer"), "optimizer_class": rec.get("optimizer_class"),
        "precision": "bf16" if rec.get("bf16") else "fp16" if rec.get("fp16") else "fp32",
        "attention": rec.get("attn_implementation"), "gradient_checkpointing": bool(recipe.get("gradient_checkpointing")),
        "micro_batch": recipe.get("micro_batch_size"), "grad_accum": recipe.get("gradient_accumulation_steps"),
        "seq_len": seq_len,
        "row_tokens": row_tokens, "recipe_keys_changed": changed, "notes": notes,
        "steps_run": len(rec["steps"]), "warmup_steps": warm, "timed_steps": rate["timed_steps"],
        "s_per_step": rate["s_per_step"], "tokens_per_s": rate["tokens_per_s"],
        "tokens_per_step": rate["tokens_per_step"],
        "flops_convention": "per token 6*T + 4*P_mm (LoRA fwd+bwd; frozen matmuls fwd + activation grad), "
                            "per row 6*L*d*n^2 (causal attention), recompute not counted",
        "model_flops_per_token": per_token, "peak_tflops": peak, "mfu": mfu, "mfu_6n": mfu_6n,
        "losses": [s.get("loss") for s in rec["steps"]],
        "memory_source": "torch.cuda max_memory_allocated/reserved" if cuda else "process RSS (VmHWM)",
        "load_peak": mem.get("load_peak"), "step1_peak": mem.get("step1_peak"),
        "steady_peak": mem.get("steady_peak"), "rss_reset_ok": rec.get("rss_reset_ok"),
        "plan_gib": plan.total_gib, "plan_parts_gib": {k: v / GiB for k, v in plan.parts.items()},
        "plan_allocator_gib": plan.allocator_gib,
        "wall_s": wall,
    }
    if cuda:
        train_peak = max(x["allocated_gib"] for x in (mem.get("step1_peak"), mem.get("steady_peak")) if x)
        res["train_peak_alloc_gib"] = train_peak
        res["train_peak_reserved_gib"] = max(x["reserved_gib"] for x in (mem.get("step1_peak"),
                                                                        mem.get("steady_peak")) if x)
        res["load_peak_alloc_gib"] = mem["load_peak"]["allocated_gib"]
    return res


def fmt(v, f=".2f", unit=""):
    return "n/a" if v is None else format(v, f) + unit


def report(r: dict) -> str:
    lines = [f"== {r['recipe']} on {r['device']} ({r['architecture']} model, {r['total_params']:,} params, "
             f"{r['trainable']:,} trainable): {r['precision']}, {r['attention']}, {r['optimizer_class']}, "
             f"micro batch {r['micro_batch']} x {r['grad_accum']}, rows of {r['row_tokens']} tokens "
             f"(sequence_len {r['seq_len']})"]
    for n in r["notes"]:
        lines.append(f"   note: {n}")
    lines.append(f"   {r['steps_run']} steps ({r['timed_steps']} timed after {r['warmup_steps']} warm-up): "
                 f"{r['s_per_step']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
                 f"MFU {fmt(r['mfu'] and 100 * r['mfu'], '.1f', '%')} (6N convention "
                 f"{fmt(r['mfu_6n'] and 100 * r['mfu_6n'], '.1f', '%')}), wall {r['wall_s']:.0f} s")
    if "train_peak_alloc_gib" in r:
        lines.append(f"   memory (GiB, PyTorch allocator): load peak {r['load_peak_alloc_gib']:.2f}; training peak "
                     f"{r['train_peak_alloc_gib']:.2f} allocated, {r['train_peak_reserved_gib']:.2f} reserved")
        lines.append(f"   plan at these conditions: {r['plan_gib']:.2f} GiB per GPU, of which "
                     f"{r['plan_allocator_gib']:.2f} inside PyTorch's allocator -> measured/planned "
                     f"{r['train_peak_alloc_gib'] / r['plan_allocator_gib']:.2f}")
    else:
        lp, s1, st = r["load_peak"], r["step1_peak"], r["steady_peak"]
        lines.append(f"   memory (GiB, process RSS high-water mark; includes Python, torch and Axolotl): "
                     f"load {fmt(lp and lp['rss_peak_gib'])}, step 1 {fmt(s1 and s1['rss_peak_gib'])}, "
                     f"after step 1 {fmt(st and st['rss_peak_gib'])}"
                     + ("" if r["rss_reset_ok"] else " (peak reset unavailable: each figure is since start)"))
        lines.append(f"   plan for this tiny model on a GPU: {r['plan_gib']:.3f} GiB (not comparable with RSS)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="ner", help="task whose recipes run (default ner: FinLoRA's memory table is NER)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (default r8,r4,r8_bf16)")
    ap.add_argument("--recipes", help="comma-separated recipe names (instead of --task/--variants)")
    ap.add_argument("--steps", type=int, help="optimizer steps per recipe (default 10; --cpu 2)")
    ap.add_argument("--warmup", type=int, help="first steps left out of the rates (default 2; --cpu 1)")
    ap.add_argument("--row-tokens", type=int, help="tokens per synthetic row (default: sequence_len)")
    ap.add_argument("--seq-len", type=int, help="--cpu only: sequence_len of the run (default 32)")
    ap.add_argument("--peak-tflops", type=float, help="device peak dense bf16 TFLOP/s (default: known GPUs; "
                                                      "none on a CPU, so no MFU unless given)")
    ap.add_argument("--cpu", action="store_true", help="tiny model of the same architecture on this CPU")
    ap.add_argument("--workdir", help="model and run folders (default: a temporary folder, removed after)")
    ap.add_argument("--json", help="write the figures here (default outputs/bench_gpu.json; --cpu "
                                   "outputs/bench_gpu_cpu.json)")
    ap.add_argument("--timeout-s", type=float, default=900, help="per recipe run")
    ap.add_argument("--seed", type=int, default=42)
    a = ap.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not a.cpu and not cuda:
        print(f"error: no CUDA device (torch {torch.__version__}); use --cpu for the tiny-model check",
              file=sys.stderr)
        return 2
    if a.cpu and a.seq_len is None:
        a.seq_len = 32
    if not a.cpu:
        a.seq_len = None
    a.steps = a.steps or (2 if a.cpu else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.cpu else 2)
    if a.steps <= a.warmup:
        print(f"error: --steps {a.steps} must exceed --warmup {a.warmup}", file=sys.stderr)
        return 2
    out_json = Path(a.json or (ROOT / "outputs" / ("bench_gpu_cpu.json" if a.cpu else "bench_gpu.json")))

    from finlora import recipes
    from finlora.atomic import write_json

    names = ([n.strip() for n in a.recipes.split(",") if n.strip()] if a.recipes else
             [f"{a.task}_{v.strip()}" for v in a.variants.split(",") if v.strip()])
    flash_ok = cuda and importlib.util.find_spec("flash_attn") is not None
    dev = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"bench_gpu: {dev}; torch {torch.__version__}; recipes {', '.join(names)}; {a.steps} steps each, "
          f"first {a.warmup} untimed" + (f"; tiny model, sequence_len {a.seq_len}" if a.cpu else ""), flush=True)
    tmp = None
    work = Path(a.workdir) if a.workdir else Path(tmp := tempfile.mkdtemp(prefix="bench_gpu."))
    work.mkdir(parents=True, exist_ok=True)
    results, failures = [], []
    models: dict[str, Path] = {}
    try:
        for name in names:
            recipe = recipes.Recipe.open(name)
            cfg = recipe.file
            if recipe.config_dir is None:
                raise RecipeError(f"{name}: no config.json for {recipe.base_model!r} under recipes/models/")
            key = str(recipe.config_dir)
            if key not in models:
                t0 = time.perf_counter()
                models[key] = random_model(recipe.config_dir, work / f"model_{len(models)}", tiny=a.cpu,
                                           device="cuda" if cuda and not a.cpu else "cpu",
                                           dtype="bfloat16" if cuda and not a.cpu else "float32", seed=a.seed)
                print(f"bench_gpu: random {'tiny ' if a.cpu else ''}model of {recipe.config_dir.name} saved in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            try:
                r = bench_recipe(name, recipe, cfg, models[key], work, a, flash_ok)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                print(f"bench_gpu: {e}", file=sys.stderr, flush=True)
                failures.append(name)
                continue
            results.append(r)
            print(report(r), flush=True)
            write_json(out_json, results)  # after each recipe: a later failure keeps what ran
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if results:
        print(f"bench_gpu: figures in {out_json}")
    if failures:
        print(f"error: failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
