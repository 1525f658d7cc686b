"""Axolotl plugin: what Axolotl 0.19 lacks for training on a CPU, plus the loss log.

Recipes list it under `plugins:`; what each behaviour does, with its measurements: docs/GPU.md.
Each hook below says why; the private internals it patches are listed in finlora.patches.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from axolotl.integrations.base import BasePlugin
from pydantic import BaseModel

from finlora.cli import exit_on_error
from finlora.errors import LaunchError


class FinLoRAArgs(BaseModel):
    """Recipe keys this plugin adds to Axolotl's config schema."""

    answer_logits_only: bool = False


def cpu_has_native_bf16() -> bool:
    """True when this CPU executes bf16 matmuls natively (AMX-BF16 or AVX512-BF16), as torch's cpuinfo says."""
    caps = torch.cpu.get_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


class LossLogCallback(TrainerCallback):
    """Keeps `loss_log.jsonl` (at every log) and `loss.png` (at the end) in the output folder.

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
        # loss_log.jsonl holds these rows already: the Trainer logs its last metrics before this.
        rows = self._rows(state)
        if state.is_world_process_zero and rows:
            from finlora.loss_curve import plot_loss

            plot_loss(rows, self.output_dir / "loss.png", title=self.output_dir.name)


def redact_debug_log() -> None:
    """Wrap the file Axolotl's debug-log tee writes to, as soon as it is opened.

    `register` runs inside `axolotl.cli.config.load_cfg` before its
    `prepare_debug_log(cfg)` call, so the module-level name is replaced there."""
    import axolotl.cli.config as cli_config
    import axolotl.utils.tee as tee

    from finlora.redact import RedactingFile, secret_values

    original = cli_config.prepare_debug_log
    if getattr(original, "_finlora_redacting", False):
        return

    def prepare_debug_log(*args, **kwargs):
        out = original(*args, **kwargs)
        secrets = secret_values()
        if secrets and tee._file_handle is not None and not isinstance(tee._file_handle, RedactingFile):
            tee._file_handle = RedactingFile(tee._file_handle, secrets)
        return out

    prepare_debug_log._finlora_redacting = True
    cli_config.prepare_debug_log = prepare_debug_log


def _row_lines(path: Path) -> list[int]:
    """1-based line numbers of the non-blank lines of a JSONL file (one row each)."""
    with open(path, "rb") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def long_rows(ds, dataset_config, limit: int) -> list[dict]:
    """One {"file", "line", "row", "tokens"} per row of `ds` over `limit` tokens, by the one
    length rule, finlora.lengths.too_long, on Axolotl's own token counts.

    `ds` is one dataset as Axolotl tokenised it (file order: Axolotl shuffles only when
    it merges, or when `shards` is set; then the row index is given instead of a line).
    """
    import pyarrow.compute as pc

    from finlora import recipes
    from finlora.lengths import too_long

    name = str(dataset_config.get("path") or "dataset")
    # Arrow's list lengths, in the dataset's row order (shuffles and selections included).
    counts = pc.list_value_length(ds.with_format("arrow")["input_ids"]).to_pylist()
    over = too_long(counts, limit)
    local = recipes.resolve_path(name)
    lines = _row_lines(local) if over and local.is_file() and not dataset_config.get("shards") else None
    if lines is not None and len(lines) != len(counts):  # rows Axolotl skipped: line numbers would lie
        lines = None
    return [{"file": name, "line": lines[i] if lines else None, "row": i, "tokens": n} for i, n in over]


def report_long_rows_of(cfg, dataset, dataset_config, split: str, listed: dict[Path, list[dict]]) -> None:
    """Print the rows of one dataset over sequence_len (or refuse them: `excess_length_strategy: raise`),
    and list them with those of this process's other datasets in `<output_dir>/long_rows.jsonl`."""
    out = Path(cfg["output_dir"])  # Axolotl's schema defaults it
    if out not in listed:
        listed[out] = []
        if os.environ.get("RANK", "0") == "0":
            # This run tokenises the data afresh: a previous run's list must not pass for its
            # own. (When Axolotl reuses its prepared cache, this is never called and the list
            # made with that cache stays, as it should.)
            (out / "long_rows.jsonl").unlink(missing_ok=True)
    limit = int(cfg.get("eval_sequence_len") if split == "test" and cfg.get("eval_sequence_len")
                else cfg.get("sequence_len"))
    rows = long_rows(dataset, dataset_config, limit)
    if not rows:
        return
    strategy = cfg.get("excess_length_strategy") or "drop"  # validated by Axolotl: drop, truncate or raise
    where = [f"  {r['file']}:{r['line']}: {r['tokens']} tokens" if r["line"] else
             f"  {r['file']} row {r['row']}: {r['tokens']} tokens" for r in rows]
    shown = where[:20] + ([f"  ... and {len(where) - 20} more"] if len(where) > 20 else [])
    head = (f"{len(rows)} of {len(dataset)} rows of {rows[0]['file']} are longer than sequence_len {limit} "
            "(Axolotl's token counts, EOS included; it cuts a long prompt at sequence_len first)")
    if strategy == "raise":
        raise ValueError(f"{head}; excess_length_strategy: raise stops the run:\n" + "\n".join(shown))
    action = "cut to sequence_len" if strategy == "truncate" else "left out of training"
    listed[out].extend(rows)
    try:
        from finlora.atomic import write_jsonl

        write_jsonl(out / "long_rows.jsonl", listed[out])
        where_listed = f"; all listed in {out / 'long_rows.jsonl'}"
    except OSError:
        where_listed = ""
    print(f"finlora: warning: {head}: {action} (excess_length_strategy: {strategy}){where_listed}:\n"
          + "\n".join(shown), file=sys.stderr, flush=True)


def report_long_rows() -> None:
    """Wrap Axolotl's per-dataset loader (PATCHES) so that rows over sequence_len are listed (or refused)."""
    import axolotl.utils.data.sft as sft

    original = sft._load_and_process_single_dataset
    if getattr(original, "_finlora_long_rows", False):
        return
    listed: dict[Path, list[dict]] = {}  # output folder -> the long rows this process found for it

    def load_and_process_single_dataset(**kwargs):  # Axolotl's one call passes only keywords
        dataset, prompter = original(**kwargs)
        if not kwargs["streaming"] and "input_ids" in dataset.column_names:
            report_long_rows_of(kwargs["cfg"], dataset, kwargs["dataset_config"], kwargs["split"], listed)
        return dataset, prompter

    load_and_process_single_dataset._finlora_long_rows = True
    sft._load_and_process_single_dataset = load_and_process_single_dataset


def check_cpu_launch(env, deepspeed: bool = False) -> None:
    """Refuse a multi-process CPU launch that lacks the environment `launch.cpu_launch` names
    (a user's own `torchrun` / `accelerate launch`); why: docs/GPU.md, "Data parallel on a CPU"."""
    from accelerate.utils import str_to_bool

    from finlora.launch import cpu_launch

    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or torch.cuda.is_available():
        return
    # ACCELERATE_USE_CPU is a flag, read as Accelerate reads it (parse_flag_from_env: y/yes/t/true/on/1)
    wrong = [f"{k}={v}" for k, v in cpu_launch(world, deepspeed).items()
             if (str_to_bool(env.get(k) or "0", to_bool=True) != (v == "1") if k == "ACCELERATE_USE_CPU"
                 else env.get(k) != v)]
    if not wrong:
        return
    what = ("DeepSpeed on a machine without CUDA needs DeepSpeed's CPU accelerator, and Accelerate drops "
            "DeepSpeed silently when told to use the CPU" if deepspeed else
            f"{world} training processes on a machine without CUDA would each train alone on the whole data set")
    raise LaunchError(f"{what}: set {' '.join(wrong)} (`make train GPUS=n` sets it)")


def deepspeed_on_cpu_backend() -> None:
    """Let Accelerate start DeepSpeed on a CPU-only host: name gloo and the multi-CPU layout, where
    Accelerate 1.13 finds no backend and would count one process in each (docs/GPU.md, Smoke tests)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    original = PartialState._prepare_backend
    if getattr(original, "_finlora_cpu_deepspeed", False):
        return

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        name, kind = original(self, cpu, sagemaker_dp, backend)
        if name is None and not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1 \
                and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":  # as Accelerate reads it
            return "gloo", DistributedType.MULTI_CPU
        return name, kind

    _prepare_backend._finlora_cpu_deepspeed = True
    PartialState._prepare_backend = _prepare_backend


def _cpu_deepspeed(cfg) -> bool:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return not torch.cuda.is_available() and bool(cfg.get("deepspeed")) and world > 1


class FinLoRAPlugin(BasePlugin):
    def get_input_args(self):
        return "finlora.axolotl_plugin.FinLoRAArgs"

    def register(self, cfg):
        with exit_on_error():
            check_cpu_launch(os.environ, deepspeed=bool(cfg.get("deepspeed")))
        report_long_rows()
        redact_debug_log()
        # Runs before Axolotl validates the config, so the resolved precision is
        # what validation, the model loader and the Trainer all see.
        if not torch.cuda.is_available():
            if cfg.get("bf16") == "auto":
                # Transformers accepts bf16 on a CPU only with use_cpu, which drops DeepSpeed.
                cfg["bf16"] = cpu_has_native_bf16() and not _cpu_deepspeed(cfg)
            if _cpu_deepspeed(cfg):
                deepspeed_on_cpu_backend()

    def pre_model_load(self, cfg):
        # Axolotl's fp16 for an 8-bit model's other modules (resolve_dtype) is slow on a CPU (docs/GPU.md).
        # The loader has taken the fp16 load dtype by now (loaders/model.py _set_device_map_config):
        # what this sets is the dtype those modules are converted to after loading.
        if not torch.cuda.is_available() and cfg.get("torch_dtype") == torch.float16 and not cfg.get("fp16"):
            cfg["torch_dtype"] = torch.float32

    def load_datasets(self, cfg, preprocess: bool = False):
        # The last hook that sees the final config before the model loader reads
        # cfg.device_map; returning None leaves dataset loading to Axolotl.
        if not torch.cuda.is_available() and cfg.get("world_size", 1) > 1:
            cfg["device_map"] = {"": "cpu"}
        return None

    def pre_lora_load(self, cfg, model):
        # Axolotl 0.19 seeds only when the Trainer is built: LoRA's A was initialised differently
        # in every run, and a resumed run did not reproduce an uninterrupted one.
        if cfg.get("seed") is not None:
            from transformers import set_seed

            set_seed(int(cfg["seed"]))

    def post_model_load(self, cfg, model):
        if cfg.get("answer_logits_only"):
            from finlora.answer_logits import install

            if not install(model):
                raise ValueError("answer_logits_only: the model's loss is not the plain causal-LM loss "
                                 f"(loss_type {getattr(model, 'loss_type', None)!r}); remove the key")

    def get_training_args(self, cfg):
        if not torch.cuda.is_available() and not _cpu_deepspeed(cfg):
            return {"use_cpu": True}
        return None

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [LossLogCallback(cfg.output_dir)]


class CpuInt8DoraPlugin(BasePlugin):
    """Listed in a smoke recipe (never in a generated one) for 8-bit DoRA on a CPU."""

    def register(self, cfg):
        from finlora.patches import keep_int8_scale_on_cpu

        keep_int8_scale_on_cpu()
