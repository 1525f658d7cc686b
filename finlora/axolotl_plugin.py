"""Axolotl plugin: what Axolotl 0.19 lacks for training on a CPU, plus the loss log.

Recipes list it under `plugins:`. On a GPU node it only writes the loss log and
curve; everything else applies only when no CUDA device is present:

- `bf16: auto` resolves to bf16 when the CPU has native bf16 instructions (AMX or
  AVX512-BF16), else fp32. Axolotl's own `auto` checks only for a GPU and would
  fall back to fp16, which CPUs do not train in. bf16 matmuls ran ~4.7x faster
  than fp32 on this project's AMX machine.
- Transformers' Trainer accepts bf16 on a CPU only with `use_cpu=True`, which
  Axolotl does not pass; we pass it through `get_training_args`.
- With several CPU processes (torchrun / accelerate, gloo), Axolotl sets
  `device_map={"": LOCAL_RANK}`, which transformers reads as a CUDA index; the
  model is kept on the CPU instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from axolotl.integrations.base import BasePlugin


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 matmuls natively (AMX-BF16 or AVX512-BF16)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def on_cpu() -> bool:
    return not torch.cuda.is_available()


class LossLogCallback(TrainerCallback):
    """Keeps `loss_log.jsonl` and `loss.png` in the output folder up to date.

    Both are rebuilt from the trainer state's full log history (which a resumed
    run restores from its checkpoint) and written atomically, so a crash never
    leaves a truncated log.
    """

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def _rows(self, state) -> list[dict]:
        return [
            {k: v for k, v in entry.items() if isinstance(v, (int, float, str))}
            for entry in state.log_history
            if "loss" in entry or "eval_loss" in entry
        ]

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            from finlora.atomic import write_jsonl

            write_jsonl(self.output_dir / "loss_log.jsonl", self._rows(state))

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from finlora.atomic import write_jsonl
            from finlora.loss_curve import plot_loss

            rows = self._rows(state)
            write_jsonl(self.output_dir / "loss_log.jsonl", rows)
            if rows:
                plot_loss(rows, self.output_dir / "loss.png", title=self.output_dir.name)


class FinLoRAPlugin(BasePlugin):
    def register(self, cfg):
        # Runs before Axolotl validates the config, so the resolved precision is
        # what validation, the model loader and the Trainer all see.
        if on_cpu():
            if cfg.get("bf16") == "auto":
                cfg["bf16"] = cpu_has_native_bf16()
            if cfg.get("bf16"):
                cfg["fp16"] = False
            elif cfg.get("fp16") is None:
                cfg["fp16"] = False

    def load_datasets(self, cfg, preprocess: bool = False):
        # The last hook that sees the final config before the model loader reads
        # cfg.device_map; returning None leaves dataset loading to Axolotl.
        if on_cpu() and cfg.get("world_size", 1) > 1:
            cfg["device_map"] = {"": "cpu"}
        return None

    def get_training_args(self, cfg):
        if on_cpu():
            return {"use_cpu": True}
        return None

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [LossLogCallback(cfg.output_dir)]
