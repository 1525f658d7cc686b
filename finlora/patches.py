"""Every private internal of a library this project patches at run time, and the one patch
that needs no Axolotl (so that `finlora.models` can install it without importing Axolotl).

Each patch is made where no public hook exists (Axolotl's plugin API has no per-dataset hook,
no debug-log hook; the others are inside the libraries' own control flow). tests/test_patches.py
fails, naming the patch, when an installed version differs from the one it was written for or
the patched name is gone: read the library's new code before changing the pin."""

from __future__ import annotations

PATCHES = {
    "axolotl.cli.config.prepare_debug_log, axolotl.utils.tee._file_handle": ("axolotl", "0.19.0", "redact_debug_log"),
    "axolotl.utils.data.sft._load_and_process_single_dataset": ("axolotl", "0.19.0", "report_long_rows"),
    "accelerate.state.PartialState._prepare_backend": ("accelerate", "1.13.0", "deepspeed_on_cpu_backend"),
    "peft.tuners.lora.dora.dequantize_module_weight": ("peft", "0.20.0", "keep_int8_scale_on_cpu (CPU only: the "
                                                       "smoke's and bench-variants' plugin, eval of 8-bit DoRA)"),
    # not patched, but what that patch repairs: Int8Params.to setting CB and not SCB
    "bitsandbytes.nn.modules.Int8Params.to": ("bitsandbytes", "0.50.2", "keep_int8_scale_on_cpu"),
}


def keep_int8_scale(dequantize):
    """Wrap peft's `dequantize_module_weight` so that an 8-bit layer keeps its scales on the CPU
    (the bug: docs/GPU.md, "8-bit DoRA on the CPU"). peft 0.20 re-wraps the weight there
    (`if is_cpu: module.weight = module.weight.to(device)`) and bitsandbytes 0.50's
    `Int8Params.to` sets CB but not SCB, so the next forward copies SCB=None into the state.
    The wrapper clears the stale CB (the state already holds the same int8 data), which is
    what the GPU path leaves."""

    def wrapped(module):
        out = dequantize(module)
        w, state = getattr(module, "weight", None), getattr(module, "state", None)
        if (type(w).__name__ == "Int8Params" and w.CB is not None and w.SCB is None
                and state is not None and state.SCB is not None):
            w.CB = None
        return out

    wrapped._finlora_keeps_int8_scale = True
    return wrapped


def keep_int8_scale_on_cpu() -> None:
    """Install `keep_int8_scale` (PATCHES) where the bug is: without CUDA. Training (the plugin
    CpuInt8DoraPlugin) and `make eval --bits 8` of a DoRA adapter (finlora.models) both go through here."""
    import torch

    if torch.cuda.is_available():
        return
    import peft.tuners.lora.dora as dora

    if not getattr(dora.dequantize_module_weight, "_finlora_keeps_int8_scale", False):
        dora.dequantize_module_weight = keep_int8_scale(dora.dequantize_module_weight)
