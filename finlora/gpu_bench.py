"""What `scripts/bench_gpu.py` needs to time Axolotl's own trainer on a recipe.

- `random_model`: a model of a recipe's architecture (its `config.json`, optionally shrunk)
  with random weights, saved as safetensors with a tokenizer, so that the recipe runs
  unchanged except for `base_model`. No download: Llama 3.1's weights are gated.
- `word_tokenizer`: that tokenizer. One whitespace-separated word `t<id>` is token `<id>`,
  so a synthetic row of exactly n tokens is written as text and goes through the recipe's
  own dataset type and Axolotl's tokenisation. Llama 3's special tokens keep their ids and
  names (`<|eot_id|>` 128009, `<|finetune_right_pad_id|>` 128004), so the recipe's
  `special_tokens` add nothing and the embedding is never resized.
- `BenchGPUPlugin`: an Axolotl plugin that instruments the Trainer Axolotl builds
  (`add_callbacks_post_trainer`), never a training loop of its own:
  - tokens: every micro batch's non-padding tokens (`finlora.bench.batch_counts`);
  - time: at each optimizer step's end, after `torch.cuda.synchronize()` on a GPU (the
    Trainer queues kernels asynchronously, so an unsynchronised clock would run ahead);
  - memory, on CUDA from PyTorch's allocator: the load peak (`max_memory_allocated` when
    training begins: model loading, quantisation, PEFT), then the peak statistics are reset
    (`reset_peak_memory_stats`) so the training peak is read after the model and the
    optimizer exist; they are reset again after step 1 (when 8-bit optimizers allocate
    their state) for the steady-state peak. On a CPU the same three figures are the
    process's RSS high-water mark (VmHWM), reset by writing 5 to /proc/self/clear_refs.
  The record is written atomically to `$FINLORA_BENCH_GPU_OUT` when training ends.
- `model_flops_per_token`, `attention_flops`: the FLOPs convention of the MFU figure.

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

import json
import os
import time
from pathlib import Path

OUT_ENV = "FINLORA_BENCH_GPU_OUT"
GiB = 2 ** 30

# Llama 3 / 3.1 special tokens: ids as in Meta's tokenizer
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>",
                   128004: "<|finetune_right_pad_id|>", 128008: "<|eom_id|>", 128009: "<|eot_id|>"}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)

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

    out = Path(out_dir)
    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    if tiny:
        for k, v in TINY.items():
            setattr(config, k, v)
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


# ---------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryProbe:
    """Peak memory of this process: CUDA allocator figures on a GPU, RSS on a CPU."""

    def __init__(self):
        import torch

        self.cuda = torch.cuda.is_available()
        self.rss_reset_ok = None

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
        try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.rss_reset_ok = True
        except OSError:
            self.rss_reset_ok = False


# ---------------------------------------------------------------------------- plugin

def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_callback(rec, probe: MemoryProbe, out: Path, extra_fn):
    from transformers import TrainerCallback

    from finlora.atomic import write_json

    mem: dict = {}

    class _Cb(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            # The model (quantised, with its adapter) and the optimizer object exist now.
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
                result = rec.result(extra_fn())
                result["memory"] = mem
                result["rss_reset_ok"] = probe.rss_reset_ok
                write_json(out, result)

    return _Cb()


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

    from finlora.bench import StepRecorder

    class BenchGPUPlugin(BasePlugin):
        """Times Axolotl's Trainer and reads peak memory; writes $FINLORA_BENCH_GPU_OUT."""

        def add_callbacks_post_trainer(self, cfg, trainer):
            out = os.environ.get(OUT_ENV)
            if not out:
                return []
            import torch

            rec = StepRecorder(None, label="axolotl")
            original = trainer.training_step

            def training_step(model, inputs, *args, **kwargs):
                rec.count(inputs)
                return original(model, inputs, *args, **kwargs)

            trainer.training_step = training_step
            t_built = time.perf_counter()

            def extra():
                model = trainer.model
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                opt = trainer.optimizer
                return {
                    "bf16": bool(cfg.get("bf16") is True), "fp16": bool(cfg.get("fp16") is True),
                    "micro_batch_size": cfg.get("micro_batch_size"),
                    "gradient_accumulation_steps": cfg.get("gradient_accumulation_steps"),
                    "sequence_len": cfg.get("sequence_len"),
                    "attn_implementation": getattr(getattr(model, "config", None), "_attn_implementation", None),
                    "trainable_params": trainable,
                    "optimizer_class": _describe_optimizer(getattr(opt, "optimizer", opt)),
                    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                    "trainer_built_s": t_built,
                }

            return [make_callback(rec, MemoryProbe(), Path(out), extra)]

    return BenchGPUPlugin


def __getattr__(name):  # Axolotl's plugin loader does getattr(module, "BenchGPUPlugin")
    if name == "BenchGPUPlugin":
        cls = _make_plugin_class()
        globals()["BenchGPUPlugin"] = cls
        return cls
    raise AttributeError(name)


def read_record(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
