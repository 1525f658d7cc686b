"""The benchmarks' code paths: the GPU benchmark's CPU dry run, and the shared
measuring helpers (token counts, Axolotl-equivalent tokenisation, answer-token loss)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
import torch

from benchmarks.measure import (IGNORE_INDEX, MemoryProbe, StepRecorder, answer_losses, batch_counts,
                                mean_loss, paired_difference, peak_rss_mb, throughput, tokenize_example)
from finlora import ROOT

ENV = dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled")


@pytest.mark.slow
def test_bench_gpu_cpu_mode_times_axolotl(tmp_path):
    """python -m benchmarks.gpu --cpu: the real path (random model of Llama 3.1 8B's architecture,
    shrunk; the recipes as generated through scripts/train.py and Axolotl's Trainer; the
    plugin's timing and RSS peaks) for the two quantised recipes, 2 steps each."""
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--cpu", "--variants", "r8,r4",
                           "--peak-tflops", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [r["recipe"] for r in res] == ["ner_r8", "ner_r4"]
    for r in res:
        assert r["architecture"] == "tiny" and r["device"] == "cpu"
        assert r["steps_run"] == 2 and r["timed_steps"] == 1
        # 2 layers x r x ((64+64) + 2 x (64+32)): Axolotl's PEFT model, counted by the plugin
        assert r["trainable"] == {8: 5120, 4: 2560}[r["r"]]
        # every row is 32 tokens; micro batch x accumulation as in the recipe
        recipe = yaml.safe_load((ROOT / "recipes" / f"{r['recipe']}.yml").read_text())
        batch = recipe["micro_batch_size"] * recipe["gradient_accumulation_steps"]
        assert (r["micro_batch"], r["grad_accum"]) == (recipe["micro_batch_size"], recipe["gradient_accumulation_steps"])
        assert r["tokens_per_step"] == batch * 32 and r["tokens_per_s"] > 0 and r["mfu"] > 0
        assert len(r["losses"]) == 2 and all(x > 0 for x in r["losses"])
        assert r["load_peak"]["rss_peak_gib"] > 0.1 and r["steady_peak"]["rss_peak_gib"] > 0.1
        assert "base_model" in r["recipe_keys_changed"] and "lora_r" not in r["recipe_keys_changed"]
    # Axolotl built the recipe's optimizers: 8-bit AdamW from bitsandbytes in both
    assert all(r["optimizer_class"].startswith("bitsandbytes.") for r in res), [r["optimizer_class"] for r in res]
    assert "MFU" in proc.stdout and "ner_r4" in proc.stdout


def test_bench_gpu_without_cuda_says_so():
    """The full run needs a CUDA device; without one (this machine) it says so and exits 2."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--cpu" in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs this)")
@pytest.mark.slow
def test_bench_gpu_full_size_on_gpu(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--variants", "r4", "--steps", "4",
                           "--workdir", str(tmp_path / "work"), "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())[0]
    assert r["architecture"] == "full" and r["row_tokens"] == r["seq_len"] == 512
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    # the plan sizes this case (rows of sequence_len): it should be near the measured training peak
    assert 0.6 < r["train_peak_alloc_gib"] / r["plan_allocator_gib"] < 1.3, r
    assert 1 < r["load_peak_alloc_gib"] < r["train_peak_alloc_gib"]


def test_batch_counts_padded_and_packed():
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
              "labels": torch.tensor([[-100, -100, 7, -100, -100], [-100, -100, -100, 8, 2]])}
    assert batch_counts(padded) == (8, 3, 2)
    # Axolotl's packed rows number their samples 1, 2, ...: mask.sum() would say 1+1+2+2+2+3 = 11
    packed = {"input_ids": torch.zeros(1, 8, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 2, 2, 2, 3, 0, 0]]),
              "labels": torch.tensor([[-100, 5, -100, 6, 2, 9, -100, -100]])}
    assert batch_counts(packed) == (6, 4, 3)
    # Axolotl 0.19 + sdpa packing: no mask; position_ids restart per sample and the
    # padding continues as 0, 1, 2, ... (labels all -100 there)
    flat = {"input_ids": torch.zeros(1, 11, dtype=torch.long),
            "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 2]]),
            "labels": torch.tensor([[-100, -100, 4, -100, 5, -100, 6, 2, -100, -100, -100]])}
    assert batch_counts(flat) == (8, 4, 3)


def test_memory_probe_keeps_the_runs_rss_peak_across_resets():
    """The probe resets the RSS high-water mark at the load and after step 1; the record's
    `peak_rss_mb` (benchmarks.train's figure) is still the whole run's peak."""
    probe = MemoryProbe()
    if probe.cuda:
        pytest.skip("a CUDA device is present: the probe reads PyTorch's allocator there")
    block = bytearray(400 * 2 ** 20)  # written through (zero-filled): 400 MiB resident
    with_block = peak_rss_mb()
    del block
    probe.reset()
    if not probe.rss_reset_ok:
        pytest.skip("this kernel cannot reset VmHWM (/proc/self/clear_refs)")
    assert probe.peaks()["rss_peak_gib"] * 1024 < with_block - 300  # the peak since the reset
    # the kernel updates VmHWM lazily (at unmap): within a few MiB of the figure read before
    assert probe.lifetime_rss_peak_mb() > with_block - 16
    rec = StepRecorder()
    rec.probe = probe
    assert rec.result()["peak_rss_mb"] > with_block - 16 and rec.result()["rss_reset_ok"] is True


def test_bench_callback_records_steps_losses_and_memory(tmp_path):
    """The one callback (both benchmarks' Trainers, and Axolotl's through BenchPlugin),
    driven through transformers' callback interface: a step record per optimizer step,
    the logged losses, the three memory peaks, the caller's extra fields, written atomically."""
    from transformers import TrainerControl, TrainerState

    from benchmarks.measure import make_callback

    rec = StepRecorder(tmp_path / "rec.json", label="axolotl")
    cb = make_callback(rec, lambda: {"precision": "fp32"})
    state, control = TrainerState(), TrainerControl()
    cb.on_train_begin(None, state, control)
    for step in (1, 2):
        rec.count({"input_ids": torch.zeros(1, 4, dtype=torch.long), "attention_mask": torch.ones(1, 4),
                   "labels": torch.tensor([[-100, -100, 5, 2]])})
        state.global_step = step
        cb.on_step_end(None, state, control)
        cb.on_log(None, state, control, logs={"loss": 3.0 - step})
    cb.on_train_end(None, state, control)
    out = json.loads((tmp_path / "rec.json").read_text())
    assert [(s["step"], s["tokens"], s["answer_tokens"], s["loss"]) for s in out["steps"]] == [(1, 4, 2, 2.0),
                                                                                                 (2, 8, 4, 1.0)]
    assert out["precision"] == "fp32" and out["label"] == "axolotl" and out["peak_rss_mb"] > 0
    assert set(out["memory"]) == {"load_peak", "step1_peak", "steady_peak"} and all(out["memory"].values())


def test_throughput_excludes_warmup():
    rec = StepRecorder()
    steps = [{"step": 1, "t": 10.0, "tokens": 100, "answer_tokens": 4, "examples": 2},
             {"step": 2, "t": 12.0, "tokens": 300, "answer_tokens": 8, "examples": 4},
             {"step": 3, "t": 16.0, "tokens": 500, "answer_tokens": 12, "examples": 6}]
    r = throughput(steps, warmup=1)
    assert r["timed_steps"] == 2 and r["seconds"] == 6.0
    assert r["tokens_per_s"] == pytest.approx(400 / 6) and r["examples_per_step"] == 2.0
    assert r["median_s_per_step"] == 3.0
    assert rec.result()["steps"] == []


class _Tok:
    """A whitespace tokenizer with SmolLM2-like specials (no BOS added)."""
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 2

    def __call__(self, text, truncation=True, max_length=None, padding=False):
        ids = [10 + len(w) for w in text.split()]
        return {"input_ids": ids[:max_length] if truncation and max_length else ids}


def test_tokenize_example_matches_axolotl_scheme():
    e = tokenize_example(_Tok(), "Input: good news Answer:", "positive", 256)
    assert e["input_ids"] == [16, 14, 14, 17, 18, 2]  # prompt, then target + EOS
    assert e["labels"] == [IGNORE_INDEX] * 4 + [18, 2]
    assert e["attention_mask"] == [1] * 6


class _Uniform(torch.nn.Module):
    """Logits all zero: cross-entropy ln(V) on every token."""

    def __init__(self, vocab=40):
        super().__init__()
        self.vocab = vocab
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        class Out:
            pass

        o = Out()
        o.logits = torch.zeros(*input_ids.shape, self.vocab) + 0 * self.w
        return o


def test_answer_losses_counts_only_answer_tokens():
    import math

    rows = [("a b c", "xx"), ("a much longer prompt here", "yyyy")]
    per_row = answer_losses(_Uniform(), _Tok(), rows, 256, batch_size=2)
    assert [n for _, n in per_row] == [2, 2]  # target + EOS, the prompt never counts
    assert mean_loss(per_row) == pytest.approx(math.log(40))
    d, se = paired_difference(per_row, per_row)
    assert d == 0 and se == 0


def test_bench_gpu_summary_of_a_cuda_record(tmp_path):
    """The GPU-only branch of the summary (allocator peaks, plan at the run's conditions, MFU
    against the H200's peak) on a record shaped as the plugin writes it on CUDA: the figures
    that reach the JSON and the table follow from the record, and `make plan` can read them."""
    import argparse

    from benchmarks import gpu as bench_gpu
    from finlora import plan as planner
    from finlora.recipes import Recipe

    steps = [{"step": k, "t": 2.0 * k, "tokens": 8192 * k, "answer_tokens": 32 * k, "examples": 16 * k,
              "micro_batches": 2 * k, "loss": 11.0} for k in range(1, 11)]
    peak = lambda a: {"allocated_gib": a, "reserved_gib": a + 1, "active_gib": a, "current_gib": a - 3}  # noqa: E731
    rec = {"steps": steps, "trainable_params": 4_718_592, "device": "NVIDIA H200", "bf16": True,
           "attn_implementation": "sdpa", "optimizer_class": "bitsandbytes.AdamW (8-bit)",
           "memory": {"load_peak": peak(11.0), "step1_peak": peak(16.0), "steady_peak": peak(15.5)}}
    a = argparse.Namespace(warmup=2, peak_tflops=None, cpu=False)
    recipe = Recipe.open("ner_r8")
    r = bench_gpu.summarise("ner_r8", recipe, rec, ROOT / "recipes" / "models" / "llama-3.1-8b", a, 512, 512,
                            100.0, ["base_model"], [])
    assert r["timed_steps"] == 8 and r["tokens_per_s"] == pytest.approx(8192 / 2.0)
    assert r["peak_tflops"] == 989.0 and 0 < r["mfu"] < r["mfu_6n"] < 1
    assert r["train_peak_alloc_gib"] == 16.0 and r["load_peak_alloc_gib"] == 11.0
    # planned at the run's row length (512), not the recipe's sequence_len
    assert r["plan_allocator_gib"] == pytest.approx(planner.estimate(recipe, 1, row_tokens=512).allocator_gib)
    assert "measured/planned" in bench_gpu.report(r)
    out = tmp_path / "bench_gpu.json"
    out.write_text(json.dumps([r]))
    (m,) = [m for m in planner.load_measurements([out]) if m["kind"] == "bench_gpu"]
    assert m["gib"] == 16.0 and m["load_gib"] == 11.0 and m["row_tokens"] == 512

