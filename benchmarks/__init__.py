"""The project's benchmarks: not part of the `finlora` package, run from the repository root.

    python -m benchmarks.train   # `make bench-train`: a recipe through Axolotl vs Trainer + PEFT (CPU)
    python -m benchmarks.gpu     # `make bench-gpu`: Axolotl's trainer on the GPU recipes; --cpu: tiny model
    python -m benchmarks.merge   # finlora.merge vs `axolotl merge-lora` vs PEFT's merge_and_unload
    python -m benchmarks.eval    # `make eval`'s generation vs one prompt at a time
    python -m benchmarks.gpu_wheels  # what scripts/gpu_check.sh carries to the GPU device (docs/GPU_CHECK.md)

`benchmarks.measure` holds what they share: the token counts, the step recorder, the
memory probe and the one Axolotl plugin that instruments Axolotl's own Trainer.

`python -m` puts the working directory (the repository root) on the path of the
benchmark itself; the training runs it starts (`scripts/train.py` -> `axolotl train`)
are console scripts, whose path does not hold the working directory, and Axolotl imports
the plugin there by its dotted name. `child_env` therefore puts the root on PYTHONPATH of
every child. The package is deliberately not in pyproject.toml's package list: a
top-level `benchmarks` has no business in an installed wheel's site-packages.
"""

from __future__ import annotations

import os

from finlora import ROOT

OFFLINE = {"HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1", "WANDB_MODE": "disabled"}


def child_env(**extra: str) -> dict:
    """This process's environment for a child: offline defaults unless set, the repository
    root first on PYTHONPATH (so the child imports this checkout's `benchmarks` and
    `finlora`), then `extra`."""
    env = {**OFFLINE, **os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env
