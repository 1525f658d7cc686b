"""Every 8B variant's settings on real weights: the CPU default (SmolLM2-135M-Instruct, the
shipped data, its steps and learning rate) with only the variant's own keys changed, trained
and scored with `make eval`'s two scorers.

    python -m benchmarks.variants                      # make bench-variants: r8 r4 r8_bf16 r8_rslora r8_dora, seed 42
    python -m benchmarks.variants --seeds 42,7 --variants r4,r8_dora

The variant's keys are taken from its generated recipe (recipes/sentiment_<variant>.yml):
the base's precision (load_in_8bit / load_in_4bit, adapter lora|qlora), rank, alpha, rsLoRA,
DoRA, the optimizer and Axolotl's fused-kernel switches. Everything else is the CPU default's.
Each run is `make train`'s code (scripts/train.py) with those keys as overrides, then
`make eval`'s code on the held-out FPB split and FinLoRA's FiQA-SA file; per run it records
the loss curve's first and last values, train seconds, the training process tree's peak RSS,
the adapter's size, and both scorers' accuracy and weighted F1 with 95% intervals. The JSON
goes to outputs/variants/variants.json (a run replaces its own variant and seed there and keeps
the others); a Markdown table of every run in it is printed (`--table` prints it alone;
docs/RESULTS.md holds the last one, with the CPU that made it), beside FinLoRA's published
Llama-3.1-8B figures for the same variant. Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import ROOT, child_env
from finlora.cli import run

VARIANTS = ("r8", "r4", "r8_bf16", "r8_rslora", "r8_dora")
KEYS = ("adapter", "load_in_8bit", "load_in_4bit", "lora_r", "lora_alpha", "peft_use_rslora", "peft_use_dora",
        "optimizer", "lora_qkv_kernel", "lora_o_kernel", "lora_mlp_kernel", "lora_embedding_kernel")
SETS = "fpb_heldout,fiqa"
OUT = ROOT / "outputs" / "variants"
# Measures a child's process tree: its wall time and the peak RSS of the largest process in it.
TIMED = ("import resource, subprocess, sys, time\n"
         "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:])\n"
         "print('timed:', rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
         "sys.exit(rc)\n")


def variant_recipe(variant: str, seed: int) -> Path:
    """The CPU default with the variant's own keys (and, for 8-bit DoRA on a CPU, the smoke's
    CPU-only workaround plugin, finlora.axolotl_plugin.CpuInt8DoraPlugin), written to outputs/variants/."""
    import torch
    import yaml

    from finlora.recipes import Recipe

    cfg = dict(Recipe.open("smollm2_sentiment_r8").file)
    v = Recipe.open(f"sentiment_{variant}").file
    cfg.update({k: v[k] for k in KEYS if k in v})
    if v.get("load_in_8bit") and v.get("peft_use_dora") and not torch.cuda.is_available():
        cfg["plugins"] = [*cfg["plugins"], "finlora.axolotl_plugin.CpuInt8DoraPlugin"]
    name = f"{variant}-seed{seed}"
    cfg.update(seed=seed, output_dir=str(OUT / name), dataset_prepared_path=str(OUT / f"{name}-prepared"))
    path = OUT / f"{name}.yml"
    path.write_text(f"# benchmarks.variants: recipes/smollm2_sentiment_r8.yml with sentiment_{variant}'s "
                    f"{', '.join(k for k in KEYS if k in v)}\n" + yaml.safe_dump(cfg, sort_keys=False))
    return path


def one(variant: str, seed: int, eval_args: list[str]) -> dict:
    from finlora.recipes import Recipe

    recipe = variant_recipe(variant, seed)
    out = OUT / f"{variant}-seed{seed}"
    log = OUT / f"{variant}-seed{seed}.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", TIMED, sys.executable, str(ROOT / "scripts/train.py"),
                               str(recipe)], cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=f, text=True)
    timed = [ln for ln in proc.stdout.splitlines() if ln.startswith("timed:")][-1].split()
    if proc.returncode != 0:
        return {"variant": variant, "seed": seed, "error": f"training exited {proc.returncode}; log {log}"}
    losses = [r["loss"] for r in map(json.loads, (out / "loss_log.jsonl").read_text().splitlines()) if "loss" in r]
    # scored as FinLoRA scores its adapters: on the base quantized as it was trained
    bits = Recipe.open(f"sentiment_{variant}").bits
    subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), "--recipe", str(recipe),
                    "--datasets", SETS, *(["--bits", str(bits)] if bits < 16 else []),
                    *eval_args], cwd=ROOT, env=child_env(), check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((out / "eval" / "metrics.json").read_text())
    return {"variant": variant, "seed": seed, "recipe": str(recipe.relative_to(ROOT)), "eval_bits": bits,
            "loss_first": losses[0], "loss_last": losses[-1],
            "steps": len(losses), "train_seconds": round(float(timed[2]), 1), "peak_rss_mib": int(timed[3]) // 1024,
            "adapter_bytes": (out / "adapter_model.safetensors").stat().st_size,
            "scores": {s: {m: {k: doc["results"][m][s]["finlora"][k] for k in ("accuracy", "f1_weighted", "ci")}
                           for m in doc["results"]} for s in SETS.split(",")},
            "strict": {s: {m: next(iter(doc["results"][m][s]["strict"].values()))["accuracy"] for m in doc["results"]}
                       for s in SETS.split(",")}}


def finlora_published(variant: str) -> str:
    """FinLoRA's Llama-3.1-8B FPB and FiQA-SA accuracy for the same variant (the registry's)."""
    from finlora.data.tasks import TEST_SETS

    cells = [TEST_SETS[s].published.get(variant) for s in ("fpb", "fiqa")]
    return " / ".join(f"{c[0]:.2f}" for c in cells) if all(cells) else "-"


def table(rows: list[dict]) -> str:
    head = ("| variant | seed | loss first -> last | train s | peak RSS MiB | adapter KB | FPB held-out acc [95% CI] "
            "| FPB F1 | FiQA-SA acc [95% CI] | FiQA F1 | strict FPB / FiQA | base FPB / FiQA "
            "| FinLoRA 8B FPB / FiQA |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["seed"])):
        if "error" in r:
            lines.append(f"| {r['variant']} | {r['seed']} | {r['error']} |")
            continue
        a = lambda s, m="adapter": r["scores"][s][m]  # noqa: E731
        ci = lambda s: "[{:.1f}, {:.1f}]".format(*(100 * x for x in a(s)["ci"]["accuracy"]))  # noqa: E731
        lines.append(f"| {r['variant']} | {r['seed']} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} | "
                     f"{r['train_seconds']:.0f} | {r['peak_rss_mib']:,} | {r['adapter_bytes'] / 1024:,.0f} | "
                     f"{100 * a('fpb_heldout')['accuracy']:.1f} {ci('fpb_heldout')} | {a('fpb_heldout')['f1_weighted']:.3f} | "
                     f"{100 * a('fiqa')['accuracy']:.1f} {ci('fiqa')} | {a('fiqa')['f1_weighted']:.3f} | "
                     f"{100 * r['strict']['fpb_heldout']['adapter']:.1f} / {100 * r['strict']['fiqa']['adapter']:.1f} | "
                     f"{100 * a('fpb_heldout', 'base')['accuracy']:.1f} / {100 * a('fiqa', 'base')['accuracy']:.1f} | "
                     f"{finlora_published(r['variant'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from finlora.atomic import write_json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="42")
    p.add_argument("--eval-args", default="", help="extra `make eval` arguments, e.g. '--sample 0.5'")
    p.add_argument("--table", action="store_true", help="print the table of the runs in variants.json; run nothing")
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads((OUT / "variants.json").read_text())))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    done = OUT / "variants.json"
    # earlier runs of other variants or seeds stay: the table is every (variant, seed) run here
    rows = json.loads(done.read_text()) if done.is_file() else []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for v in a.variants.split(","):
            t0 = time.perf_counter()
            row = one(v.strip(), seed, a.eval_args.split())
            rows = [r for r in rows if (r["variant"], r["seed"]) != (row["variant"], seed)] + [row]
            print(f"variants: {v} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
            write_json(done, rows)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
