"""Benchmark: the CPU default recipe through Axolotl vs a hand-written Trainer + PEFT baseline.

    python -m benchmarks.train                       # 10 steps each (~15 min on 2 busy cores)
    python -m benchmarks.train --steps 3 --rows 32   # a quick smoke run
    python -m benchmarks.train --set sample_packing=true --set micro_batch_size=4 ...
                                                        # what-if: recipe keys changed for this run only

Not a test: the figures depend on the machine. One run, one process tree:

1. recipe: `recipes/smollm2_sentiment_r8.yml` exactly as committed (read from the YAML),
   but for `max_steps`, `output_dir`, `dataset_prepared_path` and one extra plugin
   (`benchmarks.measure.BenchPlugin`, which only measures), written to a temporary copy and
   trained through the project's own entry point (`scripts/train.py`, i.e. `make train`:
   check, then `axolotl train`). `--set KEY=VALUE` changes recipe keys for a what-if run
   and is printed in the header.
2. baseline: what a user writes by hand: transformers `Trainer` + PEFT `LoraConfig` with
   the recipe's model, data, rank, alpha, dropout, targets, sequence length, optimizer,
   lr, schedule, warm-up, weight decay, clipping, seed and precision; one row per
   example padded to the longest in the batch (`DataCollatorForSeq2Seq`), no packing;
   global batch `--baseline-batch` (default 8x2 = 16 rows, the reference FinLoRA
   recipe's); the same tokenisation as Axolotl's (checked row for row against Axolotl's
   prepared dataset and printed).
3. held-out loss: both final adapters (and the base model) scored on the same
   `--eval-rows` rows of data/test/fpb_heldout_test.jsonl with one function
   (`benchmarks.measure.answer_losses`): mean cross-entropy over the answer tokens
   (target + EOS), teacher-forced.

Each training run is its own child process; their RSS high-water marks are their own.
Throughput counts **non-padding input tokens** (prompt + answer; every position the model
reads, excluding padding), over optimizer steps `warmup+1 .. steps` (warm-up excluded).

"Equal or lower final loss": held-out loss(recipe) - loss(baseline) <= 2 x the standard
error of the per-row paired difference (evaluation-sample noise; noise from the training
data order, which differs between the runs, is not in that figure).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml  # light: the parent imports no torch before its children have run

from benchmarks import ROOT, child_env
from finlora.cli import run
from finlora.errors import FinLoRAError, RecipeError
from finlora.recipes import rel

for _k, _v in (("HF_HUB_OFFLINE", "1"), ("AXOLOTL_DO_NOT_TRACK", "1"), ("WANDB_MODE", "disabled"),
               ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)

DEFAULT_RECIPE = ROOT / "recipes" / "smollm2_sentiment_r8.yml"
TEST_DATA = ROOT / "data" / "test" / "fpb_heldout_test.jsonl"


def read_rows(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                rows.append((d["context"], d["target"]))
                if limit and len(rows) >= limit:
                    break
    return rows


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def precision_of(cfg: dict) -> str:
    """The precision the recipe resolves to here (the FinLoRA plugin's rule for `auto`)."""
    bf16 = cfg.get("bf16")
    if bf16 == "auto":
        import torch

        if torch.cuda.is_available():
            return "bf16"
        from finlora.axolotl_plugin import cpu_has_native_bf16

        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16" if bf16 else "fp32"


# ---------------------------------------------------------------------------- children

def baseline_child(spec_path: str) -> int:
    """The hand-written baseline: transformers Trainer + PEFT, no Axolotl."""
    spec = json.loads(Path(spec_path).read_text())
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    from benchmarks.measure import StepRecorder, instrument, tokenize_example

    cfg = spec["cfg"]
    seq_len = int(cfg["sequence_len"])
    tok = AutoTokenizer.from_pretrained(spec["base_model"])
    for k, v in (cfg.get("special_tokens") or {}).items():
        if getattr(tok, k, None) != v:
            tok.add_special_tokens({k: v})
    rows = read_rows(Path(spec["data"]))
    examples = [tokenize_example(tok, p, t, seq_len) for p, t in rows]
    examples = [e for e in examples if 2 <= len(e["input_ids"]) <= seq_len]
    ds = Dataset.from_list(examples)
    bf16 = spec["precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(
        spec["base_model"], dtype=torch.bfloat16 if bf16 else torch.float32,
        attn_implementation=cfg.get("attn_implementation") or ("sdpa" if cfg.get("sdp_attention") else "eager"))
    set_seed(int(cfg["seed"]))  # as the FinLoRA plugin does right before the LoRA matrices exist
    model = get_peft_model(model, LoraConfig(
        r=int(cfg["lora_r"]), lora_alpha=int(cfg["lora_alpha"]), lora_dropout=float(cfg["lora_dropout"]),
        target_modules=list(cfg["lora_target_modules"]), bias="none", task_type="CAUSAL_LM"))
    if cfg.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    mb, ga = spec["baseline_batch"]
    args = TrainingArguments(
        output_dir=spec["out_dir"], per_device_train_batch_size=mb, gradient_accumulation_steps=ga,
        max_steps=spec["steps"], learning_rate=float(cfg["learning_rate"]),
        lr_scheduler_type=cfg.get("lr_scheduler", "cosine"), warmup_steps=int(cfg.get("warmup_steps") or 0),
        weight_decay=float(cfg.get("weight_decay") or 0.0), max_grad_norm=float(cfg.get("max_grad_norm", 1.0)),
        optim=cfg.get("optimizer", "adamw_torch"), seed=int(cfg["seed"]), bf16=bf16, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=int(cfg.get("dataloader_num_workers") or 0),
        train_sampling_strategy="group_by_length" if cfg.get("group_by_length") else "random",
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    rec = StepRecorder(spec["record"], label="baseline")
    trainer.add_callback(instrument(trainer, rec, lambda: {"precision": spec["precision"]}))
    trainer.train()
    model.save_pretrained(spec["out_dir"])
    return 0


# ---------------------------------------------------------------------------- parent

def run_logged(cmd: list[str], log: Path, env: dict, what: str) -> float:
    t = time.perf_counter()
    with open(log, "wb") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise FinLoRAError(f"{what} exited with status {rc}; log {rel(log)}:\n{tail}")
    return time.perf_counter() - t


def check_tokenization(prepared: Path, data: Path, base_model: str, cfg: dict) -> str:
    """Compare the baseline's tokenisation with Axolotl's prepared dataset, row for row."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from benchmarks.measure import tokenize_example

    dirs = sorted({p.parent for p in prepared.rglob("dataset_info.json")})
    if not dirs:
        return "not checked (no prepared dataset found)"
    axo = load_from_disk(str(dirs[0]))
    tok = AutoTokenizer.from_pretrained(base_model)
    seq_len = int(cfg["sequence_len"])
    ours = [tokenize_example(tok, p, t, seq_len) for p, t in read_rows(data)]
    key = lambda e: (tuple(e["input_ids"]), tuple(e["labels"]))  # noqa: E731
    a = sorted(key(e) for e in axo)
    b = sorted(key(e) for e in ours if 2 <= len(e["input_ids"]) <= seq_len)
    same = sum(1 for x, y in zip(a, b) if x == y)
    if a == b:
        return f"identical to Axolotl's prepared dataset ({len(a)}/{len(a)} rows)"
    return f"DIFFERS from Axolotl's: {same} of {len(a)} Axolotl rows match ({len(b)} baseline rows)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML (default: the CPU default)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per run (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2)")
    ap.add_argument("--rows", type=int, default=0, help="train on the first N rows only (0: all)")
    ap.add_argument("--eval-rows", type=int, default=128, help="held-out rows of data/test/fpb_heldout_test.jsonl")
    ap.add_argument("--eval-base", action="store_true", help="also score the base model without an adapter")
    ap.add_argument("--baseline-batch", default="8x2", help="baseline micro batch x accumulation (default 8x2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change a recipe key for this run only (what-if), e.g. sample_packing=true")
    ap.add_argument("--only", choices=("recipe", "baseline"), help="run one side only (no ratios)")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench_train"), help="scratch folder (emptied)")
    ap.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both runs (default: torch's own)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--child-baseline", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_baseline:
        return baseline_child(a.child_baseline)
    if a.steps <= a.warmup:
        ap.error("--steps must be larger than --warmup")

    recipe = Path(a.recipe).resolve()
    cfg = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    changes = parse_set(a.set)
    cfg.update(changes)
    work = Path(a.work).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    base_model = str((ROOT / cfg["base_model"]).resolve()) if not Path(cfg["base_model"]).is_absolute() \
        else cfg["base_model"]
    data = (ROOT / cfg["datasets"][0]["path"]).resolve()
    if a.rows:
        subset = work / "train_subset.jsonl"
        with open(data, encoding="utf-8") as f, open(subset, "w", encoding="utf-8") as g:
            for i, line in enumerate(f):
                if i >= a.rows:
                    break
                g.write(line)
        data = subset
    mb, ga = (int(x) for x in a.baseline_batch.lower().split("x"))

    env = child_env()
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")

    print(f"bench_train: recipe {rel(recipe)}" + (f" with {changes}" if changes else " (as committed)"))
    print(f"bench_train: {a.steps} optimizer steps per run, steps 1..{a.warmup} excluded from timing; "
          f"data {rel(data)}; held-out {a.eval_rows} rows of {rel(TEST_DATA)}")
    print(f"bench_train: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start"
          + (f", OMP_NUM_THREADS={a.threads}" if a.threads else ""), flush=True)

    records: dict[str, dict] = {}
    wall: dict[str, float] = {}
    # --- recipe through the project's entry point
    if a.only != "baseline":
        rcfg = dict(cfg)
        rcfg["datasets"] = [dict(cfg["datasets"][0], path=str(data))]
        rcfg.update(max_steps=a.steps, output_dir=str(work / "recipe"),
                    dataset_prepared_path=str(work / "prepared"))
        rcfg["plugins"] = list(cfg.get("plugins") or []) + ["benchmarks.measure.BenchPlugin"]
        tmp_recipe = work / "recipe.yml"
        tmp_recipe.write_text(yaml.safe_dump(rcfg, sort_keys=False))
        renv = dict(env, FINLORA_BENCH_OUT=str(work / "recipe.json"))
        print("bench_train: [1/3] recipe via scripts/train.py (Axolotl) ...", flush=True)
        wall["recipe"] = run_logged([sys.executable, str(ROOT / "scripts" / "train.py"), str(tmp_recipe)],
                                    work / "recipe.log", renv, "the recipe run")
        records["recipe"] = json.loads((work / "recipe.json").read_text())
    # --- hand-written baseline
    if a.only != "recipe":
        precision = records["recipe"]["precision"] if "recipe" in records else precision_of(cfg)
        spec = {"cfg": cfg, "base_model": base_model, "data": str(data), "steps": a.steps,
                "baseline_batch": [mb, ga], "precision": precision, "out_dir": str(work / "baseline"),
                "record": str(work / "baseline.json")}
        (work / "baseline_spec.json").write_text(json.dumps(spec))
        print(f"bench_train: [2/3] baseline: Trainer + PEFT, micro batch {mb} x {ga}, padded, no packing ...",
              flush=True)
        wall["baseline"] = run_logged([sys.executable, "-m", "benchmarks.train", "--child-baseline",
                                       str(work / "baseline_spec.json")],
                                      work / "baseline.log", env, "the baseline run")
        records["baseline"] = json.loads((work / "baseline.json").read_text())

    # --- held-out loss, one function for every model (the children are done: torch here is fine)
    print("bench_train: [3/3] held-out answer-token loss ...", flush=True)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.measure import answer_losses, last_losses, mean_loss, paired_difference, throughput

    tok = AutoTokenizer.from_pretrained(base_model)
    seq_len = int(cfg["sequence_len"])
    eval_rows = read_rows(TEST_DATA, a.eval_rows)
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, attn_implementation="sdpa")
    held: dict[str, list] = {"base model": answer_losses(base, tok, eval_rows, seq_len)} if a.eval_base else {}
    for side, folder in (("recipe", work / "recipe"), ("baseline", work / "baseline")):
        if side in records:
            m = PeftModel.from_pretrained(base, str(folder))
            held[side] = answer_losses(m, tok, eval_rows, seq_len)
            base = m.unload()  # the base weights, untouched (no merge), for the next adapter

    tokcheck = None
    if "recipe" in records and "baseline" in records:
        tokcheck = check_tokenization(work / "prepared", data, base_model, cfg)

    # --- report
    rates = {side: throughput(rec["steps"], a.warmup) for side, rec in records.items()}
    K = min(5, a.steps)
    print()
    print(f"precision: {next(iter(records.values()))['precision']}; torch threads "
          + ", ".join(f"{s} {r['torch_threads']}" for s, r in records.items()))
    if tokcheck:
        print(f"baseline tokenisation: {tokcheck}")
    for side, rec in records.items():
        print(f"{side} batch keys: {', '.join(rec['batch_keys'])}")
    print()
    cols = [s for s in ("recipe", "baseline") if s in records]
    print(f"{'':34}" + "".join(f"{c:>14}" for c in cols) + ("       ratio" if len(cols) == 2 else ""))
    print("-" * (34 + 14 * len(cols) + (12 if len(cols) == 2 else 0)))

    def row(label, vals, fmt, ratio=True):
        line = f"{label:34}" + "".join(f"{v:>14{fmt}}" if v is not None else f"{'n/a':>14}" for v in vals)
        if len(vals) == 2 and ratio and all(v for v in vals):
            line += f"{vals[0] / vals[1]:>11.2f}x"
        print(line)

    row("non-padding tokens/s", [rates[c]["tokens_per_s"] for c in cols], ".1f")
    row("answer tokens/s", [rates[c]["answer_tokens_per_s"] for c in cols], ".2f")
    row("examples/s", [rates[c]["examples_per_s"] for c in cols], ".3f")
    row("examples per optimizer step", [rates[c]["examples_per_step"] for c in cols], ".2f")
    row("non-padding tokens per step", [rates[c]["tokens_per_step"] for c in cols], ".0f")
    row("s per step (mean, timed steps)", [rates[c]["s_per_step"] for c in cols], ".2f")
    row("s per step (median)", [rates[c]["median_s_per_step"] for c in cols], ".2f")
    row("peak RSS of the training process MB", [records[c]["peak_rss_mb"] for c in cols], ".0f")
    row("wall time of the run incl. load s", [wall[c] for c in cols], ".0f")
    row(f"train loss, mean of last {K} steps", [last_losses(records[c]["steps"], K) for c in cols], ".4f")
    row(f"held-out answer loss ({len(eval_rows)} rows)", [mean_loss(held[c]) for c in cols], ".4f")
    if "base model" in held:
        print(f"{'held-out answer loss, base model':34}{mean_loss(held['base model']):>14.4f}")
    result = {"recipe_file": rel(recipe), "changes": changes, "steps": a.steps, "warmup": a.warmup,
              "rates": rates, "peak_rss_mb": {c: records[c]["peak_rss_mb"] for c in cols},
              "held_out_loss": {k: mean_loss(v) for k, v in held.items()}, "tokenization": tokcheck}
    if len(cols) == 2:
        d, se = paired_difference(held["recipe"], held["baseline"])
        equal_or_lower = d <= 2 * se
        speed = rates["recipe"]["tokens_per_s"] / rates["baseline"]["tokens_per_s"]
        print()
        print(f"held-out loss recipe - baseline: {d:+.4f} nats (paired SE {se:.4f}, {len(eval_rows)} rows): "
              + ("equal or lower (difference <= 2 SE)" if equal_or_lower else "HIGHER (difference > 2 SE)"))
        met = speed >= 1.3 and equal_or_lower
        print(f"target (>= 1.3x non-padding tokens/s at equal or lower held-out loss): "
              f"{'met' if met else 'NOT met'} ({speed:.2f}x)")
        result.update(loss_difference=d, loss_difference_se=se, speedup=speed, target_met=met)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
