"""`make train`: prepare what a recipe needs, then run Axolotl's own trainer.

Training itself is Axolotl's (`axolotl train`, which execs `accelerate launch -m
axolotl.cli.train`); this module builds the offline base model and default data when
they are missing, runs `finlora.check` (a bad recipe fails in seconds, before any
model loads), and summarises the run.

- `--resume` (`make train RESUME=1`) continues from the newest *complete* checkpoint
  (`finlora.check.checkpoint_problems`), passed to Axolotl explicitly as
  `--resume-from-checkpoint`; newer incomplete ones (a crash mid-save) are moved aside
  to `incomplete-checkpoint-N` so that neither Axolotl nor the Trainer's rotation
  picks them up. The Trainer restores the optimizer, scheduler, RNG states and the
  data position from the checkpoint.
- Axolotl's stdout/stderr pass through `finlora.redact` (byte chunks, so progress bars
  stream): values of secret-named environment variables never reach the terminal or
  a captured log, and the output folder's text files are swept once the run ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from finlora import ROOT, recipes
from finlora.base_model import DEFAULT_OUT as DEFAULT_BASE
from finlora.base_model import build as build_base_model


def ensure_inputs(recipe: Path, cfg: dict) -> None:
    """Build the default base model and data when missing; refuse other missing paths."""
    base = cfg.get("base_model")
    if base is None:
        raise recipes.RecipeError(f"error: {recipe}: key 'base_model' is missing")
    base_path = recipes.resolve_path(base)
    if base.startswith(("./", "/", "outputs/")) and not base_path.exists():
        if base_path.resolve() == DEFAULT_BASE.resolve():
            build_base_model(DEFAULT_BASE)
        else:
            raise recipes.RecipeError(f"error: {recipe}: base_model: folder {base} does not exist")
    for i, ds in enumerate(cfg.get("datasets") or []):
        path = ds.get("path", "")
        local = recipes.resolve_path(path)
        if path.startswith(("./", "/", "data/")) and not local.exists():
            from finlora.data import prepare

            if local.resolve() in prepare.default_outputs():
                prepare.prepare_default()
            else:
                raise recipes.RecipeError(
                    f"error: {recipe}: datasets[{i}].path: {path} does not exist "
                    f"(run `make data RECIPE={recipe.stem}`)"
                )


def axolotl_env(cfg: dict, processes: int = 1) -> dict:
    env = dict(os.environ)
    env.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    env.setdefault("WANDB_MODE", "disabled")
    # A local base model needs nothing from the hub; say so, so that no library
    # tries (and waits on) the network on an offline machine.
    if Path(recipes.resolve_path(str(cfg.get("base_model", "")))).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # `axolotl train` execs `accelerate`
    import torch

    if not torch.cuda.is_available():
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 when it is unset, so a
        # one-process CPU run would train on one core: share the usable cores out.
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // processes)))
        if processes > 1:
            # Without it, Accelerate's shared state (made before the Trainer asks for the
            # CPU) finds no GPU and falls back to "not distributed": every process then
            # trains alone on the whole data set. With it: gloo, DDP, sharded batches.
            env.setdefault("ACCELERATE_USE_CPU", "1")
    return env


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def first_visible_gpu(env: dict) -> str:
    """The first GPU of CUDA_VISIBLE_DEVICES (all GPUs when it is unset: "0")."""
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[0] if visible else "0"


def plan_launch(cfg: dict, gpus: int | None, nodes: int | None, extra: list[str],
                devices: int) -> tuple[int | None, list[str], list[str]]:
    """What `make train` launches: (GPUs per node, Axolotl overrides, lines to print).

    - GPUS unset: one process. On a machine with CUDA GPUs that is the first GPU of
      CUDA_VISIBLE_DEVICES through single_gpu.yaml (a bare `axolotl train` would start
      one process per visible GPU); on a CPU, `axolotl train` (one process).
    - One process on one node sees only that GPU (`main` narrows CUDA_VISIBLE_DEVICES):
      with several visible, the Trainer would wrap the model in DataParallel, or a
      `device_map: auto` load would spread it over all of them.
    - The global batch: a recipe's micro_batch_size x gradient_accumulation_steps is its
      global batch on one process (for the generated recipes, FinLoRA's reference batch).
      With P processes the accumulation is divided by P; when P does not divide it, the
      nearest accumulation is used and the changed global batch is printed. An explicit
      --gradient-accumulation-steps in ARGS is kept as given.
    """
    lines: list[str] = []
    if gpus is None and nodes is None and devices >= 1:
        gpus = 1
        more = f"; {devices} GPUs visible: GPUS={devices} trains on all of them" if devices > 1 else ""
        lines.append(f"train: one process on GPU {first_visible_gpu(os.environ)} (GPUS unset{more})")
    from finlora.check import parse_overrides

    processes = (gpus or 1) * (nodes or 1)
    merged = {**cfg, **parse_overrides(extra)}
    micro = int(merged.get("micro_batch_size") or 1)
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    recipe_global = micro * accum
    given = override(extra, "gradient_accumulation_steps")
    if given is not None:
        if not given.isdigit() or int(given) < 1:
            raise recipes.RecipeError(f"error: --gradient-accumulation-steps {given}: not a positive integer")
        new = int(given)
    else:
        new = accumulation_for(accum, processes)
    if given is None and new != accum:
        extra = [*extra, "--gradient-accumulation-steps", str(new)]
    total = micro * new * processes
    how = f"micro batch {micro} x accumulation {new}" + (f" x {processes} processes" if processes > 1 else "")
    if total == recipe_global:
        lines.append(f"train: global batch {total} = {how}"
                     + (f" (the recipe's {micro} x {accum} on one process)" if processes > 1 else ""))
    else:
        why = ("--gradient-accumulation-steps is given" if given is not None
               else f"{processes} processes do not divide accumulation {accum}")
        lines.append(f"train: global batch CHANGES to {total} = {how}, from the recipe's {recipe_global} "
                     f"({micro} x {accum} on one process): {why}")
    return gpus, extra, lines


def accumulation_for(accum: int, processes: int) -> int:
    """The gradient accumulation that keeps a recipe's one-process global batch on
    `processes` processes (the nearest one when they do not divide it)."""
    if accum % processes == 0:
        return accum // processes
    return max(1, round(accum / processes))


def summarise(output_dir: Path) -> None:
    adapter = output_dir / "adapter_model.safetensors"
    if not adapter.is_file():
        raise SystemExit(f"error: training finished but {adapter} was not written")
    rows = []
    log = output_dir / "loss_log.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"train: adapter   {adapter.relative_to(ROOT) if adapter.is_relative_to(ROOT) else adapter}")
    if losses:
        print(f"train: loss      {losses[0]:.4f} (step 1) -> {losses[-1]:.4f} (step {len(losses)})")
        print(f"train: curve     {output_dir / 'loss.png'}")


def override(args: list[str], key: str) -> str | None:
    """The value of an `axolotl train` override such as `--output-dir X` / `--output_dir=X`."""
    names = {f"--{key}", f"--{key.replace('_', '-')}"}
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in names:
            return value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return None


def move_aside_incomplete(skipped) -> None:
    """Rename incomplete checkpoints newer than the resumed one, out of `checkpoint-*`."""
    for p, why in skipped:
        dest = p.with_name(f"incomplete-{p.name}")
        n = 1
        while dest.exists():
            n += 1
            dest = p.with_name(f"incomplete-{p.name}.{n}")
        os.replace(p, dest)
        print(f"train: {p.name} is incomplete ({'; '.join(why)}); moved aside to {dest.name}", flush=True)


def run_axolotl(cmd: list[str], env: dict) -> int:
    """Run Axolotl with its stdout/stderr redacted on the way through."""
    from finlora.redact import pump, secret_values

    secrets = secret_values(env)
    env = dict(env, PYTHONUNBUFFERED="1")  # stream as it happens, although piped
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    threads = [pump(proc.stdout, sys.stdout, secrets), pump(proc.stderr, sys.stderr, secrets)]
    try:
        rc = proc.wait()
    except KeyboardInterrupt:  # the child got the same SIGINT; let it stop cleanly
        try:
            rc = proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.send_signal(signal.SIGKILL)
            rc = proc.wait()
    for t in threads:
        t.join(timeout=10)
    return rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a recipe with Axolotl")
    p.add_argument("--gpus", type=int, help="GPUs per node: launch through accelerate with recipes/accelerate/")
    p.add_argument("--nodes", type=int, help="number of nodes (needs MACHINE_RANK and MASTER_ADDR)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir (make train RESUME=1)")
    p.add_argument("--no-check", action="store_true", help="skip `make check` (not recommended)")
    p.add_argument("recipe", nargs="?", default=recipes.DEFAULT_RECIPE, help="recipe name or YAML path")
    p.add_argument("axolotl_args", nargs=argparse.REMAINDER, help="extra `axolotl train` overrides, e.g. --max-steps 3")
    a = p.parse_args(argv)

    path = recipes.resolve(a.recipe)
    cfg = recipes.load(path)
    ensure_inputs(path, cfg)
    output_dir = recipes.resolve_path(
        override(a.axolotl_args, "output_dir") or cfg.get("output_dir", f"./outputs/{path.stem}"))
    gpus, extra, launch_lines = plan_launch(cfg, a.gpus, a.nodes, list(a.axolotl_args), cuda_device_count())
    prepared = override(extra, "dataset_prepared_path") or cfg.get("dataset_prepared_path")
    if prepared and (a.nodes or 1) > 1 and override(extra, "dataset_prepared_path") is None:
        # Every node deletes and rebuilds the cache below; on a shared filesystem one
        # folder per node keeps them from deleting each other's (same data, same seed:
        # the same tokenised rows on every node).
        prepared = f"{prepared.rstrip('/')}-node{os.environ.get('MACHINE_RANK', '0')}"
        extra += ["--dataset-prepared-path", prepared]
    for line in launch_lines:
        print(line, flush=True)
    if not a.no_check:
        from finlora import check

        result = check.run(path, resume=a.resume, extra_args=extra, pending=False)
        for line in result.warnings:
            print(line, flush=True)
        if result.errors:
            for line in result.errors:
                print(line, file=sys.stderr)
            print(f"error: {check.rel(path)} failed `make check`; nothing was started", file=sys.stderr)
            return 2
        if result.resume_from is not None and override(extra, "resume_from_checkpoint") is None \
                and not cfg.get("resume_from_checkpoint"):
            move_aside_incomplete(result.incomplete)
            extra += ["--resume-from-checkpoint", str(result.resume_from)]
            print(f"train: resuming from {check.rel(result.resume_from)}", flush=True)
    elif a.resume:
        from finlora import check

        best, skipped = check.newest_complete(output_dir)
        if best is None:
            raise recipes.RecipeError(f"error: RESUME=1 but {output_dir} holds no complete checkpoint")
        if os.environ.get("MACHINE_RANK", "0") == "0":  # one node renames, on a shared filesystem
            move_aside_incomplete(skipped)
        extra += ["--resume-from-checkpoint", str(best)]
    # Axolotl keys its tokenised-data cache on the data file's path, not its
    # content: a fresh `make data` would otherwise train on the stale cache.
    if prepared and recipes.resolve_path(prepared).is_dir():
        shutil.rmtree(recipes.resolve_path(prepared))

    from finlora.launch import launch_command
    from finlora.redact import redact_text, redact_tree

    try:
        cmd = launch_command(path, gpus, a.nodes, extra_args=extra)
    except ValueError as e:
        raise recipes.RecipeError(f"error: {e}") from None
    env = axolotl_env(cfg, gpus or 1)  # processes on this machine
    if gpus == 1 and (a.nodes or 1) == 1 and cuda_device_count() > 1:
        env["CUDA_VISIBLE_DEVICES"] = first_visible_gpu(env)
    print("train: " + redact_text(" ".join(cmd)), flush=True)
    try:
        rc = run_axolotl(cmd, env)
    finally:
        redact_tree(output_dir)  # a last sweep: whatever a library wrote into the run's logs
    if rc != 0:
        print(f"error: axolotl exited with status {rc}", file=sys.stderr)
        probe = output_dir if output_dir.exists() else output_dir.parent
        if probe.exists() and shutil.disk_usage(probe).free < (256 << 20):
            print(f"error: only {shutil.disk_usage(probe).free >> 20} MB free on the disk of {output_dir}: "
                  "free space, then continue with RESUME=1", file=sys.stderr)
        elif any(output_dir.glob("checkpoint-*")):
            print("train: checkpoints are kept; continue with `make train RESUME=1` (same RECIPE/ARGS)",
                  file=sys.stderr)
        return rc
    summarise(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
