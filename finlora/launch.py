"""How `make train` launches Axolotl: the command line for RECIPE/GPUS/NODES, the
global batch kept across process counts, and the environment of the child."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from finlora import ROOT
from finlora.errors import LaunchError


# --------------------------------------------------------------------------- launch


def launch_command(
    recipe_path: str | Path,
    gpus: int | None = None,
    nodes: int | None = None,
    *,
    machine_rank: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The command `make train RECIPE=x [GPUS=n] [NODES=m]` runs.

    - GPUS and NODES unset: `axolotl train recipes/x.yml`, for a CPU (one process;
      `make train` passes GPUS=1 where CUDA GPUs exist, since Axolotl's launcher would
      start one process per visible GPU).
    - GPUS=1: accelerate with recipes/accelerate/single_gpu.yaml.
    - GPUS=n>1: accelerate with multi_gpu.yaml and --num_processes n.
    - NODES=m>1 (GPUS = per node): multi_node.yaml, --num_machines m, --num_processes
      m*n, --machine_rank / --main_process_ip / --main_process_port from the arguments
      or else MACHINE_RANK / MASTER_ADDR / MASTER_PORT in the environment.
    Paths are written relative to the repository root, where `make` runs.
    """
    recipe = Path(recipe_path)
    if recipe.is_absolute() and recipe.is_relative_to(ROOT):
        recipe = recipe.relative_to(ROOT)
    recipe_s = str(recipe)
    extra = [str(a) for a in extra_args]
    for label, value in (("GPUS", gpus), ("NODES", nodes)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise LaunchError(f"{label} must be a positive integer, got {value!r}")
    if gpus is None and nodes is None:
        return ["axolotl", "train", recipe_s, *extra]
    if nodes is not None and nodes > 1:
        if gpus is None:
            raise LaunchError("NODES>1 needs GPUS (GPUs per node)")
        rank = machine_rank if machine_rank is not None else os.environ.get("MACHINE_RANK")
        ip = main_process_ip or os.environ.get("MASTER_ADDR")
        port = main_process_port or int(os.environ.get("MASTER_PORT", 29500))
        if rank is None or not ip:
            raise LaunchError("NODES>1 needs the machine rank and the main node's address "
                             "(MACHINE_RANK and MASTER_ADDR; scripts/slurm_train.sh sets them from SLURM)")
        return [
            "accelerate", "launch", "--config_file", "recipes/accelerate/multi_node.yaml",
            "--num_machines", str(nodes), "--num_processes", str(nodes * gpus),
            "--machine_rank", str(rank), "--main_process_ip", ip, "--main_process_port", str(port),
            "-m", "axolotl.cli.train", recipe_s, *extra,
        ]
    gpus = gpus or 1
    config = "single_gpu.yaml" if gpus == 1 else "multi_gpu.yaml"
    return [
        "accelerate", "launch", "--config_file", f"recipes/accelerate/{config}",
        "--num_processes", str(gpus), "-m", "axolotl.cli.train", recipe_s, *extra,
    ]
