#!/usr/bin/env python
"""Benchmark `finlora.merge` against PEFT's merge_and_unload + save_pretrained.

    python scripts/bench_merge.py            # ~1.1B-parameter Llama, bf16, 4 shards (needs ~10 GB disk)
    python scripts/bench_merge.py --small    # tiny model: a quick dry run

Builds a Llama-architecture model with random weights tensor by tensor (never the
whole model in memory) as 4 safetensors shards, plus a random r=8 q/k/v adapter with
non-zero B, then merges it twice, each in its own subprocess so that peak RSS
(ru_maxrss of that child) is measured separately: ours, and the naive PEFT path.
Prints wall time and peak RSS of each, their ratios, and the largest absolute
difference between the two merged weight sets, compared tensor by tensor.
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The measuring parent imports neither torch nor the model: building and comparing run
# in their own child processes. ru_maxrss is carried across fork+exec, so a child forked
# from a parent that holds torch (or a built model) would report the parent's RSS as its own.

BIG = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
           num_attention_heads=16, num_key_value_heads=16)
SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256,
             num_attention_heads=4, num_key_value_heads=4)
TARGETS = ("q_proj", "k_proj", "v_proj")


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def llama_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def build(work: Path, c: dict, dtype=None, shards: int = 4) -> tuple[Path, Path]:
    """Random base (sharded safetensors + config) and random adapter, tensor by tensor."""
    import torch

    from finlora.merge_io import DTYPE_NAMES, ShardWriter

    dtype = dtype or torch.bfloat16
    base, adapter = work / "base", work / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    shapes = llama_shapes(c)
    item = torch.tensor([], dtype=dtype).element_size()
    total = sum(item * numel(s) for _, s in shapes)
    groups, size, limit = [[]], 0, total / shards
    for name, s in shapes:
        if groups[-1] and size >= limit * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, s))
        size += item * numel(s)
    g = torch.Generator().manual_seed(0)
    wmap = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        w = ShardWriter(base / fname, [(n, DTYPE_NAMES[dtype], s, item * numel(s)) for n, s in group])
        for n, s in group:
            t = torch.ones(s, dtype=dtype) if n.endswith("norm.weight") else \
                (torch.randn(s, generator=g) * 0.02).to(dtype)
            w.write_tensor(n, t)
            wmap[n] = fname
            del t
        w.close()
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wmap}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "torch_dtype": str(dtype).split(".")[-1], "dtype": str(dtype).split(".")[-1], "bos_token_id": 1,
           "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True, **c}
    (base / "config.json").write_text(json.dumps(cfg, indent=2))
    # adapter: PEFT's key names and config; A ~ Kaiming-like, B non-zero
    r, h = 8, c["hidden_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    tensors = {}
    for n in range(c["num_hidden_layers"]):
        for t in TARGETS:
            out_dim = h if t == "q_proj" else kv
            p = f"base_model.model.model.layers.{n}.self_attn.{t}."
            tensors[p + "lora_A.weight"] = torch.randn(r, h, generator=g) / h ** 0.5
            tensors[p + "lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.01
    from safetensors.torch import save_file

    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
        "use_dora": False, "base_model_name_or_path": str(base), "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True}))
    return base, adapter


PEFT_CHILD = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="2GB")
"""


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, from its own rusage (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"bench: child failed: {' '.join(cmd[:3])}...\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def compare(a: Path, b: Path) -> tuple[float, int, int]:
    """Largest |a - b| over all tensors, tensors compared, tensors not bit-identical."""
    import torch
    from safetensors import safe_open

    def files(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        with safe_open(d / "model.safetensors", framework="pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}

    fa, fb = files(a), files(b)
    if set(fa) != set(fb):
        sys.exit(f"bench: different tensor names: {sorted(set(fa) ^ set(fb))[:5]}")
    worst, differ = 0.0, 0
    for k in fa:
        with safe_open(fa[k], framework="pt") as x, safe_open(fb[k], framework="pt") as y:
            ta, tb = x.get_tensor(k), y.get_tensor(k)
        if ta.dtype != tb.dtype or ta.shape != tb.shape:
            sys.exit(f"bench: {k}: {ta.dtype}{list(ta.shape)} vs {tb.dtype}{list(tb.shape)}")
        if not torch.equal(ta, tb):
            differ += 1
            worst = max(worst, (ta.float() - tb.float()).abs().max().item())
    return worst, len(fa), differ


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model: a quick dry run")
    ap.add_argument("--workdir", type=Path, help="where to build (default: a temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the built model and outputs")
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--compare-only", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    c = SMALL if args.small else BIG
    if args.build_only:
        build(args.build_only, c)
        return 0
    if args.compare_only:
        worst, n, differ = compare(*args.compare_only)
        print(json.dumps([worst, n, differ]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_merge.", dir=args.workdir))
    me = [sys.executable, str(Path(__file__).resolve())] + (["--small"] if args.small else [])
    try:
        t0 = time.perf_counter()
        subprocess.run(me + ["--build-only", str(work)], check=True)
        base, adapter = work / "base", work / "adapter"
        n_params = sum(numel(s) for _, s in llama_shapes(c))
        print(f"bench: built {n_params / 1e6:,.1f}M-parameter Llama (bf16, 4 shards) and r=8 q/k/v adapter "
              f"in {time.perf_counter() - t0:.1f} s under {work}", flush=True)
        ours_out, peft_out = work / "merged_ours", work / "merged_peft"
        ours = run_child([sys.executable, str(ROOT / "scripts" / "merge.py"), "--base", str(base),
                          "--adapter", str(adapter), "--out", str(ours_out), "--no-progress"])
        peft = run_child([sys.executable, "-c", PEFT_CHILD, str(base), str(adapter), str(peft_out)])
        cmp = subprocess.run(me + ["--compare-only", str(ours_out), str(peft_out)], check=True,
                             capture_output=True, text=True)
        worst, n, differ = json.loads(cmp.stdout.strip().splitlines()[-1])
        print(f"bench: ours  (finlora.merge, streamed):      wall {ours[0]:7.1f} s   peak RSS {ours[1] / 2**20:8.0f} MiB")
        print(f"bench: peft  (merge_and_unload + save):      wall {peft[0]:7.1f} s   peak RSS {peft[1] / 2**20:8.0f} MiB")
        print(f"bench: ratio ours/peft:                      wall {ours[0] / peft[0]:7.2f}     peak RSS {ours[1] / peft[1]:8.2f}")
        print(f"bench: max |ours - peft| over {n} tensors: {worst:.3g} ({differ} tensors not bit-identical)")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
