"""Benchmark `finlora.merge` side by side with `axolotl merge-lora` and PEFT's merge_and_unload.

    python -m benchmarks.merge            # 953M-parameter Llama, bf16, 4 shards (~4 min on 2 cores, ~8 GB disk)
    python -m benchmarks.merge --small    # tiny model: a quick dry run

1. Speed and memory: a Llama-architecture model with random weights, built tensor by tensor
   as 4 safetensors shards, and a random r=8 q/k/v adapter with non-zero B, merged three
   ways, each in its own subprocess so that peak RSS (ru_maxrss of that child) is its own:
   ours (`scripts/merge.py`), `axolotl merge-lora` (its default memory-efficient path, run
   as the command a user types) and PEFT's merge_and_unload + save_pretrained. The three
   merged weight sets are then compared tensor by tensor.
2. Variants: small random float32 Llamas with adapters built by PEFT (rsLoRA, DoRA,
   rank_pattern/alpha_pattern, LoRA on embed_tokens/lm_head) plus a GPT-2 (Conv1D,
   fan_in_fan_out), merged by ours and by Axolotl's `merge_lora_sharded_efficient` (the
   function `axolotl merge-lora` calls), each compared with PEFT's merge_and_unload.
3. A kill mid-merge: each command is SIGKILLed after its first output shard is complete and
   before its second is written (a fixed point, whatever the machine's speed: see
   `kill_between_shards`); what is left at the destination is listed.
Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import ROOT, child_env
from finlora.cli import run
from finlora.errors import MergeError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
AXOLOTL = str(Path(sys.executable).parent / "axolotl")

# The measuring parent imports neither torch nor the model: building and comparing run
# in their own child processes. ru_maxrss is carried across fork+exec, so a child forked
# from a parent that holds torch (or a built model) would report the parent's RSS as its own.

BIG = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
           num_attention_heads=16, num_key_value_heads=16)
SMALL = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=256,
             num_attention_heads=4, num_key_value_heads=4)
TARGETS = ("q_proj", "k_proj", "v_proj")
VARIANTS = {
    "LoRA q/k/v": dict(),
    "rsLoRA": dict(use_rslora=True, r=8, lora_alpha=4),
    "DoRA": dict(use_dora=True),
    "rank_pattern + alpha_pattern": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                                         rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                                         alpha_pattern={"v_proj": 3}),
    "LoRA on embed_tokens + lm_head": dict(target_modules=["embed_tokens", "lm_head", "o_proj"]),
    "GPT-2 Conv1D, fan_in_fan_out": dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
}


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

    from finlora.merge_io import ShardWriter

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
        w = ShardWriter(base / fname, [(n, dtype, s) for n, s in group])
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


def axolotl_cmd(work: Path, base: Path, adapter: Path, out_parent: Path) -> list[str]:
    """`axolotl merge-lora` reads a recipe; this one names only what merging needs (the
    dataset entry is there because Axolotl's config validation requires one)."""
    cfg = work / f"{out_parent.name}.yml"
    cfg.write_text(json.dumps({  # JSON is YAML
        "base_model": str(base), "adapter": "lora", "lora_model_dir": str(adapter), "output_dir": str(out_parent),
        "datasets": [{"path": str(work / "unused.jsonl"), "type": "alpaca"}], "micro_batch_size": 1,
        "num_epochs": 1, "learning_rate": 1e-4, "sequence_len": 64}))
    return [AXOLOTL, "merge-lora", str(cfg)]


def run_child(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process, from its own rusage (wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise MergeError(f"bench: child failed: {' '.join(cmd[:3])}...\n{err[-3000:]}")
    return wall, usage.ru_maxrss * 1024  # Linux reports KiB


def read_folder(d: Path) -> dict:
    """Tensor name -> tensor of a saved model folder (one file or sharded)."""
    from safetensors import safe_open

    idx = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(idx.read_text())["weight_map"].values())) if idx.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(d / name, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def diff(got: dict, ref: dict) -> dict:
    """Largest |got - ref|, tensors compared, tensors not bit-identical, names missing or extra."""
    import torch

    worst, differ = 0.0, 0
    for k in set(got) & set(ref):
        a, b = got[k], ref[k]
        if a.dtype != b.dtype or a.shape != b.shape:
            differ += 1
            worst = float("inf")
        elif not torch.equal(a, b):
            differ += 1
            worst = max(worst, (a.float() - b.float()).abs().max().item())
    return {"max_abs": worst, "tensors": len(ref), "not_identical": differ,
            "missing": len(set(ref) - set(got)), "extra": len(set(got) - set(ref))}


def compare3(ours: Path, axo: Path, peft: Path) -> dict:
    """One tensor set held at a time against PEFT's, shard by shard of PEFT's output."""
    ref = read_folder(peft)
    return {"ours_vs_peft": diff(read_folder(ours), ref), "axolotl_vs_peft": diff(read_folder(axo), ref)}


def variants(work: Path) -> dict:
    """Each variant: ours and Axolotl's merge against PEFT's merge_and_unload, float32."""
    import logging

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from axolotl.cli.utils.lora_merge import merge_lora_sharded_efficient
    from finlora.merge import merge

    logging.disable(logging.WARNING)
    results = {}
    for i, (name, lora) in enumerate(VARIANTS.items()):
        d = work / f"v{i}"
        torch.manual_seed(0)
        if "GPT-2" in name:
            model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64))
        else:
            model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                 max_position_embeddings=64, tie_word_embeddings=False))
        model.save_pretrained(d / "base", max_shard_size="40KB")
        lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj"], **lora}
        pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        torch.manual_seed(1)
        with torch.no_grad():  # non-zero B and a non-trivial DoRA magnitude, so every part counts
            for n, p in pm.named_parameters():
                if "lora_B" in n or "lora_embedding" in n:  # PEFT starts embedding A at zero too
                    p.normal_(0, 0.2)
                elif "lora_magnitude_vector" in n:
                    p.mul_(1 + 0.1 * torch.rand_like(p))
        pm.save_pretrained(d / "adapter")
        base_model = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32)
        ref = {k: v.clone() for k, v in
               PeftModel.from_pretrained(base_model, d / "adapter").merge_and_unload().state_dict().items()}
        ref.pop("lm_head.weight", None) if "GPT-2" in name else None  # tied to wte; not saved
        row = {}
        for path, fn in (("ours", lambda o: merge(d / "base", d / "adapter", o, progress=False, log=lambda *_: None)),
                         ("axolotl", lambda o: merge_lora_sharded_efficient(d / "base", d / "adapter", o))):
            try:
                fn(d / path)
                row[path] = diff(read_folder(d / path), ref)
            except Exception as e:  # noqa: BLE001 - a refusal is a result here
                row[path] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"}
        results[name] = row
    return results


# Ours, stopped at a point between two output shards: `merge(on_shard=...)` is called as each
# shard is complete; after the first, this child says so and waits to be killed.
OURS_PAUSED = """
import sys, time
from finlora.merge import merge
def paused(name):
    print("shard-done", name, flush=True)
    time.sleep(3600)
merge(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size=sys.argv[4], progress=False, log=lambda m: None,
      on_shard=paused)
"""


def _waiting_on_fifo(pgid: int) -> bool:
    """Whether a process of group `pgid` is blocked opening a named pipe no one writes (Linux)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            if any(w.read_text().strip() == "wait_for_partner" for w in stat.parent.glob("task/*/wchan")):
                return True
        except (OSError, ValueError, IndexError):
            pass
    return False


def kill_between_shards(cmd: list[str], dest: Path, fifo: Path | None = None, timeout: float = 600) -> dict:
    """SIGKILL `cmd` once its first output shard is complete and before the second is
    written, at that point whatever the machine's speed. Ours pauses itself there
    (OURS_PAUSED). `axolotl merge-lora` merges input shard by input shard, and is given a copy
    of the base whose second shard is a named pipe (`fifo`): opening it blocks until a writer
    comes, which none does, so it waits there with its first output shard written."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        if fifo is None:
            line = proc.stdout.readline()  # blocks until the first shard is done
            if not line.startswith("shard-done"):
                return {"error": f"did not pause after its first shard (exit {proc.wait()})"}
        else:
            while not _waiting_on_fifo(proc.pid):
                if proc.poll() is not None or time.time() > deadline:
                    return {"error": f"never opened the second input shard (exit {proc.poll()})"}
                time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    left = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
    hidden = sorted(p.name for p in dest.parent.glob(f".{dest.name}.*.tmp"))
    return {"destination_exists": dest.exists(), "files": left, "hidden_temp": hidden}


def fmt_diff(d: dict) -> str:
    if "error" in d:
        return f"refused/failed: {d['error']}"
    if d["missing"] or d["extra"]:
        return f"{d['missing']} tensors missing, {d['extra']} extra"
    if not d["not_identical"]:
        return f"bit-identical ({d['tensors']} tensors)"
    return f"{d['not_identical']}/{d['tensors']} tensors differ, max |diff| {d['max_abs']:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="tiny model: a quick dry run")
    ap.add_argument("--workdir", type=Path, help="where to build (default: a temp dir, removed afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the built model and outputs")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    c = SMALL if args.small else BIG
    if args.child:  # work that imports torch runs here, in its own process
        job, *paths = args.child
        if job == "build":
            build(Path(paths[0]), c)
        elif job == "compare":
            print(json.dumps(compare3(*map(Path, paths))))
        elif job == "variants":
            print(json.dumps(variants(Path(paths[0]))))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench_merge.", dir=args.workdir))
    me = [sys.executable, "-m", "benchmarks.merge"] + (["--small"] if args.small else [])

    def child(*a) -> dict:
        out = subprocess.run(me + ["--child", *map(str, a)], env=child_env(), check=True, capture_output=True,
                             text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    try:
        t0 = time.perf_counter()
        subprocess.run(me + ["--child", "build", str(work)], env=child_env(), check=True)
        base, adapter = work / "base", work / "adapter"
        n_params = sum(numel(s) for _, s in llama_shapes(c))
        print(f"bench: built {n_params / 1e6:,.1f}M-parameter Llama (bf16, 4 shards) and r=8 q/k/v adapter "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)
        merge_py = [sys.executable, str(ROOT / "scripts" / "merge.py"), "--base", str(base), "--adapter", str(adapter),
                    "--no-progress"]
        runs = {
            "ours (scripts/merge.py)": run_child(merge_py + ["--out", str(work / "ours")]),
            "axolotl merge-lora": run_child(axolotl_cmd(work, base, adapter, work / "axo")),
            "peft merge_and_unload + save": run_child([sys.executable, "-c", PEFT_CHILD, str(base), str(adapter),
                                                       str(work / "peft")]),
        }
        # what each path costs before it reads a byte: its imports (a fixed cost, whatever the model)
        imports = {
            "ours (scripts/merge.py)": "import finlora.merge",
            "axolotl merge-lora": "import axolotl.cli.main, axolotl.cli.merge_lora, axolotl.cli.config",
            "peft merge_and_unload + save": "import transformers, peft; from transformers import AutoModelForCausalLM",
        }
        for name, (wall, rss) in runs.items():
            base_rss = run_child([sys.executable, "-c", imports[name]])[1]
            print(f"bench: {name:30s} wall {wall:7.1f} s   peak RSS {rss / 2**20:6.0f} MiB "
                  f"(imports alone {base_rss / 2**20:4.0f} MiB)", flush=True)
        cmp = child("compare", work / "ours", work / "axo" / "merged", work / "peft")
        print(f"bench: ours    vs peft: {fmt_diff(cmp['ours_vs_peft'])}")
        print(f"bench: axolotl vs peft: {fmt_diff(cmp['axolotl_vs_peft'])}", flush=True)
        for name, row in child("variants", work).items():
            print(f"bench: variant {name:31s} ours: {fmt_diff(row['ours'])}; axolotl: {fmt_diff(row['axolotl'])}")
        # axolotl's copy of the base: the same files (hard links), its second shard a named pipe
        kill_base = work / "kill_base"
        kill_base.mkdir()
        shards = sorted(base.glob("model-*.safetensors"))
        for f in base.iterdir():
            if f != shards[1]:
                os.link(f, kill_base / f.name)
        os.mkfifo(kill_base / shards[1].name)
        kills = {
            "ours": kill_between_shards([sys.executable, "-c", OURS_PAUSED, str(base), str(adapter),
                                         str(work / "kill_ours"), "40KB" if args.small else "500MB"],
                                        work / "kill_ours"),
            "axolotl": kill_between_shards(axolotl_cmd(work, kill_base, adapter, work / "kill_axo"),
                                           work / "kill_axo" / "merged", fifo=kill_base / shards[1].name),
        }
        for name, k in kills.items():
            print(f"bench: SIGKILL mid-merge, {name:7s}: destination "
                  + (k["error"] if "error" in k else
                     (f"holds {k['files']}" if k["destination_exists"] else "absent")
                     + (f"; hidden temp folder {k['hidden_temp']} (removed by the next run)" if k["hidden_temp"] else "")))
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(run(main))
