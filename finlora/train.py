"""`make train`: prepare what a recipe needs, then run Axolotl's own trainer.

The recipe is read once, as a `Recipe`, and passed down to `finlora.check` (a bad recipe
fails in seconds, before any model loads) and `finlora.launch`. Resume (`RESUME=1`):
README, "Crashes, typos and secrets" (Resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from finlora import launch, recipes
from finlora.errors import CheckFailed, RecipeError, RefusedError
from finlora.recipes import Recipe, rel


def ensure_inputs(recipe: Recipe) -> bool:
    """Build the default base model and data when missing (True when something was built);
    refuse other missing paths."""
    from finlora.check import missing_inputs

    built = set()
    for m in missing_inputs(recipe):
        if m.build is None:
            raise RecipeError(f"{recipe.where(m.key)}: {m.key}: {m.refusal}")
        if m.build not in built:  # one build makes every default data file
            built.add(m.build)
            m.build()
    return bool(built)


def clear_prepared(path: Path) -> None:
    """Empty Axolotl's tokenised-data cache, which it keys on the data file's path, not its
    content (a fresh `make data` would otherwise train on the stale cache). Only what
    Axolotl writes there is removed (`check.not_axolotls_cache`)."""
    from finlora.check import not_axolotls_cache

    why = not_axolotls_cache(path)
    if why:
        raise RefusedError(f"dataset_prepared_path {why}; nothing was deleted")
    for e in sorted(path.iterdir()):
        shutil.rmtree(e) if e.is_dir() else e.unlink()


def report_check(result) -> None:
    for line in result.warnings:
        print(line, flush=True)
    if result.errors:
        lines = [*result.errors, f"error: {rel(result.recipe)} failed `make check`; nothing was started"]
        raise CheckFailed("\n".join(lines).removeprefix("error: "))


def summarise(output_dir: Path) -> None:
    adapter = output_dir / "adapter_model.safetensors"
    if not adapter.is_file():
        raise RecipeError(f"training finished but {rel(adapter)} was not written")
    rows = []
    log = output_dir / "loss_log.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    logged = [r for r in rows if "loss" in r]
    print(f"train: adapter   {rel(adapter)}")
    if logged:
        first, last = logged[0], logged[-1]
        print(f"train: loss      {first['loss']:.4f} (step {first.get('step', '?')}) -> {last['loss']:.4f} "
              f"(step {last.get('step', '?')})")
        print(f"train: curve     {rel(output_dir / 'loss.png')}")


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a recipe with Axolotl")
    p.add_argument("--gpus", help="GPUs per node: launch through accelerate with recipes/accelerate/")
    p.add_argument("--nodes", help="number of nodes (needs MACHINE_RANK and MASTER_ADDR)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in output_dir (make train RESUME=1)")
    p.add_argument("--no-check", action="store_true", help="skip `make check` (not recommended)")
    p.add_argument("recipe", nargs="?", default=recipes.DEFAULT_RECIPE, help="recipe name or YAML path")
    p.add_argument("axolotl_args", nargs=argparse.REMAINDER, help="extra `axolotl train` overrides, e.g. --max-steps 3")
    a = p.parse_args(argv)

    # Arguments, then the recipe, before anything is built or loaded.
    gpus, nodes = launch.check_launch(a.gpus, a.nodes)
    recipe = Recipe.open(a.recipe, a.axolotl_args)
    values = [f"error: {recipe.where(k)}: {k}: {why}" for k, why in recipe.value_problems()]
    if values:  # before Axolotl's imports, and before a base model is downloaded for a run that cannot start
        raise CheckFailed("\n".join(values).removeprefix("error: ") + "; nothing was started")
    from finlora import check

    if not a.no_check:
        report_check(check.run(recipe, resume=a.resume, pending=True))
    if ensure_inputs(recipe) and not a.no_check:
        report_check(check.run(recipe, resume=a.resume, pending=False))  # the tokenizer and data now exist
    gpus, recipe, launch_lines = launch.plan_launch(recipe, gpus, nodes)
    prepared = recipe.get("dataset_prepared_path")
    if prepared and (nodes or 1) > 1 and "dataset_prepared_path" not in recipe.overrides:
        # Every node empties and rebuilds the cache below; on a shared filesystem one
        # folder per node keeps them from deleting each other's (same data, same seed:
        # the same tokenised rows on every node).
        prepared = f"{str(prepared).rstrip('/')}-node{os.environ.get('MACHINE_RANK', '0')}"
        recipe = recipe.with_args([*recipe.args, "--dataset-prepared-path", prepared])
    for line in launch_lines:
        print(line, flush=True)
    output_dir = recipe.output_dir
    if (a.resume or check.auto_resumes(recipe)) and not recipe.get("resume_from_checkpoint"):
        # Passed to Axolotl explicitly, and newer incomplete checkpoints (a crash mid-save) moved
        # out of `checkpoint-*`, so that neither Axolotl nor the Trainer's rotation picks one up.
        best, skipped = check.newest_complete(output_dir)
        if best is None:
            raise RecipeError(f"RESUME=1 but {rel(output_dir)} holds no complete checkpoint")
        if os.environ.get("MACHINE_RANK", "0") == "0":  # one node renames, on a shared filesystem
            move_aside_incomplete(skipped)
        recipe = recipe.with_args([*recipe.args, "--resume-from-checkpoint", str(best)])
        print(f"train: resuming from {rel(best)}", flush=True)
    if prepared and recipes.resolve_path(prepared).is_dir():
        clear_prepared(recipes.resolve_path(prepared))

    import yaml

    from finlora.atomic import write_text
    from finlora.redact import redact_text, redact_tree

    config = recipe.path
    if recipe.args:
        # Axolotl reads the overrides from a file, as `make check` read them: its own command line
        # (click on one process, fire under accelerate) parses some spellings and types otherwise.
        config = output_dir / (f"train_config.node{os.environ.get('MACHINE_RANK', '0')}.yml" if (nodes or 1) > 1
                               else "train_config.yml")
        write_text(config, f"# {rel(recipe.path)} with {' '.join(recipe.args)}: what `make train` gave Axolotl\n"
                   + yaml.safe_dump(recipe.config, sort_keys=False, allow_unicode=True))
    cmd = launch.launch_command(config, gpus, nodes)
    env = launch.axolotl_env(recipe, gpus or 1)  # processes on this machine
    if gpus == 1 and (nodes or 1) == 1 and launch.cuda_device_count() > 1:
        # with several GPUs visible, the Trainer would wrap the model in DataParallel, or a
        # `device_map: auto` load would spread it over all of them
        env["CUDA_VISIBLE_DEVICES"] = launch.first_visible_gpu(env)
    print("train: " + redact_text(" ".join(cmd)), flush=True)
    try:
        rc = launch.run_axolotl(cmd, env)
    finally:
        redact_tree(output_dir)  # a last sweep: whatever a library wrote into the run's logs
    if rc != 0:
        print(f"error: axolotl exited with status {rc}", file=sys.stderr)
        free = check.free_bytes(output_dir)
        if free < (256 << 20):
            print(f"error: only {free >> 20} MB free on the disk of {rel(output_dir)}: "
                  "free space, then continue with RESUME=1", file=sys.stderr)
        elif any(output_dir.glob("checkpoint-*")):
            print("train: checkpoints are kept; continue with `make train RESUME=1` (same RECIPE/ARGS)",
                  file=sys.stderr)
        return rc
    summarise(output_dir)
    return 0
