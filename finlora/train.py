"""`make train`: prepare what a recipe needs, then run Axolotl's own trainer.

Training itself is Axolotl's (`axolotl train`, which execs `accelerate launch -m
axolotl.cli.train`); this module only checks the recipe, builds the offline base
model and default data when they are missing, and summarises the run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
                    f"error: {recipe}: datasets[{i}].path: {path} does not exist (run `make data`)"
                )


def axolotl_env(cfg: dict) -> dict:
    env = dict(os.environ)
    env.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
    env.setdefault("WANDB_MODE", "disabled")
    # A local base model needs nothing from the hub; say so, so that no library
    # tries (and waits on) the network on an offline machine.
    if Path(recipes.resolve_path(str(cfg.get("base_model", "")))).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")  # `axolotl train` execs `accelerate`
    return env


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a recipe with Axolotl")
    p.add_argument("--gpus", type=int, help="GPUs per node: launch through accelerate with recipes/accelerate/")
    p.add_argument("--nodes", type=int, help="number of nodes (needs MACHINE_RANK and MASTER_ADDR)")
    p.add_argument("recipe", nargs="?", default=recipes.DEFAULT_RECIPE, help="recipe name or YAML path")
    p.add_argument("axolotl_args", nargs=argparse.REMAINDER, help="extra `axolotl train` overrides, e.g. --max-steps 3")
    a = p.parse_args(argv)

    path = recipes.resolve(a.recipe)
    cfg = recipes.load(path)
    ensure_inputs(path, cfg)
    output_dir = recipes.resolve_path(
        override(a.axolotl_args, "output_dir") or cfg.get("output_dir", f"./outputs/{path.stem}"))
    # Axolotl keys its tokenised-data cache on the data file's path, not its
    # content: a fresh `make data` would otherwise train on the stale cache.
    prepared = cfg.get("dataset_prepared_path")
    if prepared and recipes.resolve_path(prepared).is_dir():
        shutil.rmtree(recipes.resolve_path(prepared))

    from finlora.recipe_matrix import launch_command

    try:
        cmd = launch_command(path, a.gpus, a.nodes, extra_args=a.axolotl_args)
    except ValueError as e:
        raise recipes.RecipeError(f"error: {e}") from None
    print("train: " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT, env=axolotl_env(cfg))
    if rc != 0:
        print(f"error: axolotl exited with status {rc}", file=sys.stderr)
        return rc
    summarise(output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
