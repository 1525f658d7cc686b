"""How `make train` launches Axolotl's trainer: the command line for RECIPE/GPUS/NODES,
the global batch kept across process counts, the child's environment, and its output
(redacted on the way through, `finlora.redact`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from finlora import ROOT
from finlora.errors import LaunchError
from finlora.recipes import Recipe


def count_arg(label: str, value) -> int | None:
    """GPUS / NODES as given on the command line: unset, or a whole number >= 1."""
    if value is None or value == "":
        return None
    text = str(value).strip()
    if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
        raise LaunchError(f"{label} must be a whole number of at least 1, got {value!r}")
    return int(text)


def process_count(gpus, nodes) -> int:
    """The training processes GPUS x NODES stands for, refusing what `make train` would refuse."""
    g, n = count_arg("GPUS", gpus), count_arg("NODES", nodes)
    if n is not None and n > 1 and g is None:
        raise LaunchError(f"NODES={n} needs GPUS (GPUs per node), e.g. NODES={n} GPUS=8")
    return (g or 1) * (n or 1)


def node_address(env) -> tuple[str, str, int]:
    """(machine rank, main node's address, port) of a multi-node launch, from the environment."""
    rank, ip = env.get("MACHINE_RANK"), env.get("MASTER_ADDR")
    if not rank or not ip:
        raise LaunchError("NODES>1 needs the machine rank and the main node's address "
                          "(MACHINE_RANK and MASTER_ADDR; scripts/slurm_train.sh sets them from SLURM)")
    port = env.get("MASTER_PORT", "29500")
    if not str(rank).isdigit() or not str(port).isdigit():
        raise LaunchError(f"MACHINE_RANK={rank!r} and MASTER_PORT={port!r} must be whole numbers")
    return str(rank), ip, int(port)


def check_launch(gpus, nodes) -> tuple[int | None, int | None]:
    """Every launch argument of `make train`, checked before any work: (GPUS, NODES)."""
    process_count(gpus, nodes)
    g, n = count_arg("GPUS", gpus), count_arg("NODES", nodes)
    if n is not None and n > 1:
        node_address(os.environ)
    return g, n


def launch_command(recipe_path: str | Path, gpus: int | None = None, nodes: int | None = None) -> list[str]:
    """The command `make train RECIPE=x [GPUS=n] [NODES=m]` runs, on arguments `check_launch`
    passed (docs/GPU.md, "GPU nodes and launch"); paths relative to the repository root."""
    recipe = Path(recipe_path)
    if recipe.is_absolute() and recipe.is_relative_to(ROOT):
        recipe = recipe.relative_to(ROOT)
    recipe_s = str(recipe)
    if gpus is None and nodes is None:
        return ["axolotl", "train", recipe_s]
    if nodes is not None and nodes > 1:
        rank, ip, port = node_address(os.environ)
        return [
            "accelerate", "launch", "--config_file", "recipes/accelerate/multi_node.yaml",
            "--num_machines", str(nodes), "--num_processes", str(nodes * gpus),
            "--machine_rank", str(rank), "--main_process_ip", ip, "--main_process_port", str(port),
            "-m", "axolotl.cli.train", recipe_s,
        ]
    gpus = gpus or 1
    config = "single_gpu.yaml" if gpus == 1 else "multi_gpu.yaml"
    return [
        "accelerate", "launch", "--config_file", f"recipes/accelerate/{config}",
        "--num_processes", str(gpus), "-m", "axolotl.cli.train", recipe_s,
    ]


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()  # 0 without CUDA


def first_visible_gpu(env: dict) -> str:
    """The first GPU of CUDA_VISIBLE_DEVICES (all GPUs when it is unset: "0")."""
    visible = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[0] if visible else "0"


def accumulation_for(accum: int, processes: int) -> int:
    """The gradient accumulation that keeps a recipe's one-process global batch on
    `processes` processes (the nearest one when they do not divide it)."""
    if accum % processes == 0:
        return accum // processes
    return max(1, round(accum / processes))


def plan_launch(recipe: Recipe, gpus: int | None, nodes: int | None) -> tuple[int | None, Recipe, list[str]]:
    """What `make train` launches: (GPUs per node, the recipe with the overrides that
    Axolotl gets, lines to print); the rules: docs/GPU.md, "GPU nodes and launch"."""
    lines: list[str] = []
    devices = cuda_device_count()
    if gpus is None and (nodes or 1) == 1 and devices >= 1:
        gpus = 1
        more = f"; {devices} GPUs visible: GPUS={devices} trains on all of them" if devices > 1 else ""
        lines.append(f"train: one process on GPU {first_visible_gpu(os.environ)} (GPUS unset{more})")
    processes = (gpus or 1) * (nodes or 1)
    micro = int(recipe.number("micro_batch_size", 1))
    own = Recipe(recipe.path, recipe.file)  # the recipe's own accumulation, as Axolotl derives it without one
    accum = int(own.number("gradient_accumulation_steps", 0) or max(1, int(own.get("batch_size") or micro) // micro))
    recipe_global = micro * accum
    given = recipe.overrides.get("gradient_accumulation_steps") is not None  # an explicit ARGS value is kept
    new = int(recipe.number("gradient_accumulation_steps", 1)) if given else accumulation_for(accum, processes)
    if new != accum and not given:
        # a recipe's batch_size is per process in Axolotl, which multiplies it by the world size
        per_process = ["--batch-size", str(micro * new)] if own.get("batch_size") else []
        recipe = recipe.with_args([*recipe.args, "--gradient-accumulation-steps", str(new), *per_process])
    total = micro * new * processes
    how = f"micro batch {micro} x accumulation {new}" + (f" x {processes} processes" if processes > 1 else "")
    if total == recipe_global:
        lines.append(f"train: global batch {total} = {how}"
                     + (f" (the recipe's {micro} x {accum} on one process)" if processes > 1 else ""))
    else:
        why = ("--gradient-accumulation-steps is given" if given
               else f"{processes} processes do not divide accumulation {accum}")
        lines.append(f"train: global batch CHANGES to {total} = {how}, from the recipe's {recipe_global} "
                     f"({micro} x {accum} on one process): {why}")
    return gpus, recipe, lines


def axolotl_env(recipe: Recipe, processes: int) -> dict:
    env = dict(os.environ)
    env.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    env.setdefault("WANDB_MODE", "disabled")
    # A local base model needs nothing from the hub; say so, so that no library
    # tries (and waits on) the network on an offline machine.
    base = recipe.local(recipe.base_model)
    if base is not None and base.is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # `axolotl train` execs `accelerate`
    import torch

    if not torch.cuda.is_available():
        # `accelerate launch` without --cpu sets OMP_NUM_THREADS=1 when it is unset, so a
        # one-process CPU run would train on one core: share the usable cores out.
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // processes)))
        for k, v in cpu_launch(processes, bool(recipe.get("deepspeed"))).items():
            env.setdefault(k, v)
    return env


def cpu_launch(processes: int, deepspeed: bool) -> dict[str, str]:
    """The environment several training processes on a machine without CUDA need (`axolotl_env`
    sets it, the plugin refuses a launch without it); why: docs/GPU.md, "Data parallel on a CPU"."""
    if processes <= 1:
        return {}
    return {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "0"} if deepspeed else {"ACCELERATE_USE_CPU": "1"}


def axolotl_dotenv(start: Path | None = None) -> dict[str, str]:
    """The `.env` that Axolotl's CLI loads into its own environment (python-dotenv's
    `load_dotenv()`, which searches from axolotl/cli/ upward): its secrets are the child's too."""
    import importlib.util

    from dotenv import dotenv_values

    start = start or Path(importlib.util.find_spec("axolotl").origin).parent / "cli"
    found = next((d / ".env" for d in [start, *start.parents] if (d / ".env").is_file()), None)
    return {k: v for k, v in dotenv_values(found).items() if v} if found else {}


def run_axolotl(cmd: list[str], env: dict) -> int:
    """Run Axolotl with its stdout/stderr redacted on the way through."""
    from finlora.redact import pump, secret_values

    secrets = secret_values({**axolotl_dotenv(), **env})
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
