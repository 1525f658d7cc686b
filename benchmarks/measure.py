"""What every benchmark measures, and how: one definition of each quantity, used by every
side of a comparison (benchmarks.train, benchmarks.gpu).

- `tokenize_example`: Axolotl 0.19's tokenisation of a `{context, target}` row under the
  recipes' user-defined `format: "{instruction}"` type (prompt tokens, then the target's
  tokens + EOS; labels -100 on the prompt), so that a hand-written baseline trains on
  exactly the sequences Axolotl trains on (benchmarks.train checks this against Axolotl's
  prepared dataset, row for row).
- `batch_counts`: per micro batch, the **non-padding input tokens** (positions whose
  attention mask is non-zero: Axolotl's packed batches number the samples of a row
  1, 2, 3..., so `attention_mask.sum()`, which transformers' `non_padding` token count
  uses, would over-count them), the answer tokens (labels != -100) and the examples
  (distinct non-zero mask values per row: 1 per unpacked row, k per row packing k).
  Packed batches without a mask (Axolotl 0.19 with sdpa: input_ids, labels,
  position_ids) are counted from position_ids: every sample, and the padding after
  them, restarts at 0; a run with no answer label is the padding.
- `StepRecorder` + `instrument(trainer)`: wraps the Trainer's `training_step` to add up
  those counts per micro batch and records, at every optimizer step's end, a
  `time.perf_counter()` stamp, the running totals and the logged loss. Throughput is
  then (totals at step N - totals at step w) / (time at step N - time at step w): the
  first w steps (warm-up: allocator, first-call overheads) are left out.
- `MemoryProbe`: peak memory, on CUDA from PyTorch's allocator (`max_memory_allocated`,
  reset with `reset_peak_memory_stats`), on a CPU the process's RSS high-water mark
  (VmHWM: per address space, reset by exec, so a launcher that held torch does not
  inflate its child's figure; reset by writing 5 to /proc/self/clear_refs). The
  recorder reads it at the load, after step 1 and at the end (see `make_callback`);
  `peak_rss_mb` stays the whole run's peak.
- `BenchPlugin` (`benchmarks.measure.BenchPlugin`): the one Axolotl plugin, appended to a
  copy of a recipe's `plugins:`; it instruments the Trainer Axolotl builds
  (`add_callbacks_post_trainer`), never a training loop of its own, and writes the record
  atomically to `$FINLORA_BENCH_OUT` when training ends.
- `answer_losses`: mean cross-entropy over the answer tokens, per row, of a model on
  held-out rows; the one loss both trained adapters are compared on.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

IGNORE_INDEX = -100
OUT_ENV = "FINLORA_BENCH_OUT"
GiB = 2 ** 30


# ---------------------------------------------------------------------------- tokens

def _tok(tokenizer, text: str, max_length: int) -> list[int]:
    return list(tokenizer(text, truncation=True, max_length=max_length, padding=False)["input_ids"])


def tokenize_example(tokenizer, prompt: str, target: str, seq_len: int) -> dict:
    """Axolotl 0.19 `InstructionPromptTokenizingStrategy.tokenize_prompt` with
    train_on_inputs false: prompt tokenised without EOS; the response tokenised on its
    own, EOS appended (if not already last and shorter than seq_len), a leading BOS
    stripped; concatenated; loss only on the response."""
    p = _tok(tokenizer, prompt, seq_len)
    r = _tok(tokenizer, target, seq_len)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    if r and r[-1] != eos and len(r) < seq_len:
        r.append(eos)
    if r and bos is not None and r[0] == bos:
        r = r[1:]
    return {"input_ids": p + r, "attention_mask": [1] * (len(p) + len(r)),
            "labels": [IGNORE_INDEX] * len(p) + r}


def batch_counts(batch) -> tuple[int, int, int]:
    """(non-padding input tokens, answer tokens, examples) of one collated batch."""
    import torch

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = batch.get("labels")
    if mask is not None:
        mask = torch.as_tensor(mask)
        nonpad = int((mask != 0).sum())
        examples = sum(int(torch.unique(row[row != 0]).numel()) for row in mask.reshape(-1, mask.shape[-1]))
    elif batch.get("position_ids") is not None:
        # Axolotl's packed batches (sdpa/flash): no mask; position_ids restart at 0 for
        # every sample, and the right padding continues as one more 0, 1, 2, ... run of
        # pad tokens. With train_on_inputs false every real sample has answer labels;
        # a run without any label != -100 is padding.
        pos = torch.as_tensor(batch["position_ids"]).reshape(-1, torch.as_tensor(ids).shape[-1])
        lab = torch.as_tensor(labels).reshape(pos.shape) if labels is not None else torch.zeros_like(pos)
        nonpad = examples = 0
        for p_row, l_row in zip(pos, lab):
            seg = torch.cumsum((p_row == 0).long(), 0)
            for k in torch.unique(seg):
                sel = seg == k
                if labels is None or bool((l_row[sel] != IGNORE_INDEX).any()):
                    nonpad += int(sel.sum())
                    examples += 1
    else:
        nonpad = int(torch.as_tensor(ids).numel())
        examples = int(torch.as_tensor(ids).reshape(-1, torch.as_tensor(ids).shape[-1]).shape[0])
    answer = int((torch.as_tensor(labels) != IGNORE_INDEX).sum()) if labels is not None else 0
    return nonpad, answer, examples


# ---------------------------------------------------------------------------- steps

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """This process's RSS high-water mark in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class MemoryProbe:
    """Peak memory of this process: CUDA allocator figures on a GPU, RSS on a CPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.rss_reset_ok = None
        self.rss_peak_before_reset_mb = 0.0

    def peaks(self) -> dict:
        import torch

        if self.cuda:
            stats = torch.cuda.memory_stats()
            return {"allocated_gib": torch.cuda.max_memory_allocated() / GiB,
                    "reserved_gib": torch.cuda.max_memory_reserved() / GiB,
                    "active_gib": stats.get("active_bytes.all.peak", 0) / GiB,
                    "current_gib": torch.cuda.memory_allocated() / GiB}
        hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
        return {"rss_peak_gib": hwm / 2 ** 20 if hwm is not None else None,
                "rss_gib": rss / 2 ** 20 if rss is not None else None}

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        # the whole run's peak survives the reset: the largest of the peaks between resets
        self.rss_peak_before_reset_mb = max(self.rss_peak_before_reset_mb, peak_rss_mb())
        try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_reset_ok = True
        except OSError:
            self.rss_reset_ok = False

    def lifetime_rss_peak_mb(self) -> float:
        return max(self.rss_peak_before_reset_mb, peak_rss_mb())


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepRecorder:
    """Per optimizer step: end time, running token/answer/example totals, logged loss; the
    memory peaks (load, step 1, after step 1) when a `MemoryProbe` is attached."""

    def __init__(self, out: str | Path | None = None, label: str = ""):
        self.out = Path(out) if out else None
        self.label = label
        self.tokens = self.answer = self.examples = 0
        self.micro_batches = 0
        self.steps: list[dict] = []
        self.losses: dict[int, float] = {}
        self.t0: float | None = None
        self.keys: list[str] = []
        self.probe: MemoryProbe | None = None
        self.memory: dict = {}

    def count(self, inputs) -> None:
        if not self.keys:
            self.keys = sorted(k for k in inputs.keys())
        n, a, e = batch_counts(inputs)
        self.tokens += n
        self.answer += a
        self.examples += e
        self.micro_batches += 1

    def begin(self) -> None:
        self.t0 = time.perf_counter()

    def step_end(self, step: int) -> None:
        self.steps.append({"step": step, "t": time.perf_counter() - (self.t0 or 0.0),
                           "tokens": self.tokens, "answer_tokens": self.answer,
                           "examples": self.examples, "micro_batches": self.micro_batches})

    def log(self, step: int, logs: dict | None) -> None:
        if logs and "loss" in logs:
            self.losses[step] = float(logs["loss"])

    def result(self, extra: dict | None = None) -> dict:
        import torch

        for s in self.steps:
            if s["step"] in self.losses:
                s["loss"] = self.losses[s["step"]]
        res = {"label": self.label, "steps": self.steps, "batch_keys": self.keys,
               "peak_rss_mb": self.probe.lifetime_rss_peak_mb() if self.probe else peak_rss_mb(),
               "torch_threads": torch.get_num_threads(), **(extra or {})}
        if self.probe is not None:
            res.update(memory=self.memory, rss_reset_ok=self.probe.rss_reset_ok)
        return res

    def write(self, extra: dict | None = None) -> None:
        if self.out is not None:
            from finlora.atomic import write_json

            write_json(self.out, self.result(extra), indent=1)


def make_callback(rec: StepRecorder, extra_fn=None):
    """The Trainer callback that drives `rec`. Time is read at each optimizer step's end
    after `torch.cuda.synchronize()` on a GPU (the Trainer queues kernels asynchronously,
    so an unsynchronised clock would run ahead). Memory (`rec.probe`): the load peak when
    training begins (model loading, quantisation, PEFT), then the peaks are reset so the
    training peak is read with the model and the optimizer in place; reset again after
    step 1 (when 8-bit optimizers allocate their state) for the steady-state peak."""
    from transformers import TrainerCallback

    probe = rec.probe = MemoryProbe()
    mem = rec.memory

    class _BenchCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            mem["load_peak"] = probe.peaks()
            probe.reset()
            _sync()
            rec.begin()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            rec.step_end(state.global_step)
            if state.global_step == 1:
                mem["step1_peak"] = probe.peaks()  # includes the 8-bit optimizers' lazy state
                probe.reset()

        def on_log(self, args, state, control, logs=None, **kw):
            rec.log(state.global_step, logs)

        def on_train_end(self, args, state, control, **kw):
            _sync()
            mem["steady_peak"] = probe.peaks() if state.global_step > 1 else None
            if state.is_world_process_zero:
                rec.write(extra_fn() if extra_fn else None)

    return _BenchCallback()


def instrument(trainer, rec: StepRecorder, extra_fn=None):
    """Count every micro batch the Trainer trains on; return the recording callback
    (the caller adds it: `trainer.add_callback(cb)` or a plugin's callback list)."""
    original = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        rec.count(inputs)
        return original(model, inputs, *args, **kwargs)

    trainer.training_step = training_step
    return make_callback(rec, extra_fn)


def throughput(steps: Sequence[dict], warmup: int) -> dict:
    """Rates over the steps after the first `warmup` ones (needs at least warmup+1 steps)."""
    if len(steps) <= warmup:
        raise ValueError(f"{len(steps)} steps recorded; need more than the {warmup} warm-up steps")
    a = steps[warmup - 1] if warmup > 0 else {"t": 0.0, "tokens": 0, "answer_tokens": 0, "examples": 0}
    b = steps[-1]
    dt = b["t"] - a["t"]
    per_step = sorted(steps[i]["t"] - steps[i - 1]["t"] if i else steps[0]["t"] for i in range(warmup, len(steps)))
    n = len(steps) - warmup
    return {
        "timed_steps": n,
        "seconds": dt,
        "s_per_step": dt / n,
        "median_s_per_step": per_step[len(per_step) // 2] if len(per_step) % 2 else
        0.5 * (per_step[len(per_step) // 2 - 1] + per_step[len(per_step) // 2]),
        "tokens_per_s": (b["tokens"] - a["tokens"]) / dt,
        "answer_tokens_per_s": (b["answer_tokens"] - a["answer_tokens"]) / dt,
        "examples_per_s": (b["examples"] - a["examples"]) / dt,
        "examples_per_step": (b["examples"] - a["examples"]) / n,
        "tokens_per_step": (b["tokens"] - a["tokens"]) / n,
    }


def last_losses(steps: Sequence[dict], k: int) -> float | None:
    vals = [s["loss"] for s in steps if "loss" in s][-k:]
    return sum(vals) / len(vals) if vals else None


# ---------------------------------------------------------------------------- loss

def answer_losses(model, tokenizer, rows: Iterable[tuple[str, str]], seq_len: int,
                  batch_size: int = 16) -> list[tuple[float, int]]:
    """(summed cross-entropy in nats, answer tokens) per row, teacher-forced, eval mode,
    right padding. The mean answer-token loss is sum(nll) / sum(tokens)."""
    import torch
    import torch.nn.functional as F

    examples = [tokenize_example(tokenizer, p, t, seq_len) for p, t in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[tuple[float, int]] = []
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                width = max(len(e["input_ids"]) for e in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
                for j, e in enumerate(chunk):
                    n = len(e["input_ids"])
                    ids[j, :n] = torch.tensor(e["input_ids"])
                    mask[j, :n] = 1
                    labels[j, :n] = torch.tensor(e["labels"])
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
                shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
                shift_labels = labels[:, 1:].to(device)
                nll = F.cross_entropy(shift_logits, shift_labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                      reduction="none").view(len(chunk), -1)
                valid = shift_labels != IGNORE_INDEX
                for j in range(len(chunk)):
                    out.append((float(nll[j][valid[j]].sum()), int(valid[j].sum())))
    finally:
        model.train(was_training)
    return out


def mean_loss(per_row: Sequence[tuple[float, int]]) -> float:
    return sum(s for s, _ in per_row) / max(1, sum(n for _, n in per_row))


def paired_difference(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]]) -> tuple[float, float]:
    """Mean and standard error of the per-row difference of mean answer-token loss, a - b
    (the same rows scored by two models)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired rows differ in number")
    d = [sa / max(na, 1) - sb / max(nb, 1) for (sa, na), (sb, nb) in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(1, len(d) - 1)
    return m, math.sqrt(var / len(d))


# ---------------------------------------------------------------------------- Axolotl plugin

def _describe_optimizer(opt) -> str | None:
    """bitsandbytes' 8-bit and paged AdamW share the class name AdamW: say which it is."""
    if opt is None:
        return None
    name = f"{type(opt).__module__.split('.')[0]}.{type(opt).__name__}"
    bits = getattr(opt, "args", None)
    extra = []
    if bits is not None and getattr(bits, "optim_bits", None):
        extra.append(f"{bits.optim_bits}-bit")
    if getattr(opt, "is_paged", False):
        extra.append("paged")
    return name + (f" ({', '.join(extra)})" if extra else "")


def _make_plugin_class():
    from axolotl.integrations.base import BasePlugin

    class BenchPlugin(BasePlugin):
        """Instruments Axolotl's Trainer; writes the step record to $FINLORA_BENCH_OUT."""

        def add_callbacks_post_trainer(self, cfg, trainer):
            out = os.environ.get(OUT_ENV)
            if not out:
                return []
            import torch

            t_built = time.perf_counter()

            def extra():
                model = trainer.model
                opt = trainer.optimizer
                return {
                    "precision": "bf16" if cfg.get("bf16") is True else "fp32",
                    "bf16": bool(cfg.get("bf16") is True), "fp16": bool(cfg.get("fp16") is True),
                    "sample_packing": bool(cfg.get("sample_packing")),
                    "micro_batch_size": cfg.get("micro_batch_size"),
                    "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps"),
                    "sequence_len": cfg.get("sequence_len"),
                    "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
                    "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                    "optimizer_class": _describe_optimizer(getattr(opt, "optimizer", opt)),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "trainer_built_s": t_built,
                }

            return [instrument(trainer, StepRecorder(out, label="axolotl"), extra)]

    return BenchPlugin


def __getattr__(name):  # Axolotl's plugin loader does getattr(module, "BenchPlugin")
    if name == "BenchPlugin":
        cls = _make_plugin_class()
        globals()["BenchPlugin"] = cls
        return cls
    raise AttributeError(name)
