"""`make clean-outputs [ALL=1]`: delete what outputs/ holds that the project wrote and can
rebuild, listing each thing first; never a file the project did not write.

By default: smoke runs, Axolotl's tokenised-data caches, merged models (rebuilt by
`make merge`) and checkpoints moved aside as incomplete. Adapters, checkpoints, evaluation
reports and the base model only with ALL=1 (`--all`). Anything not recognised as the
project's (no marker of a project command, or a file of unknown name) is listed and kept.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from finlora import ROOT
from finlora.base_model import MANIFEST
from finlora.merge import MERGE_MARKER
from finlora.recipes import rel
from finlora.smoke import MARKER, TINY_STAMP

OUTPUTS = ROOT / "outputs"
# What a training run leaves in its output folder besides the folders handled below.
RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "loss_log.jsonl", "loss.png", "debug.log",
             "long_rows.jsonl", "README.md", "config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "training_args.bin", "generation_config.json"}


def plan(outputs: Path = OUTPUTS, everything: bool = False) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """([(path, why it is deleted)], [(path, why it is kept)])."""
    delete, keep = [], []

    def take(p: Path, what: str, valuable: bool = False) -> None:
        (delete if everything or not valuable else keep).append((p, what if everything or not valuable
                                                                 else f"{what}: ALL=1 deletes it"))

    for top in sorted(p for p in outputs.iterdir() if p.name != ".gitkeep"):
        if top.name == "smoke" and top.is_dir():
            for p in sorted(top.iterdir()):
                ours = (p / MARKER).is_file() or (p / TINY_STAMP).is_file() or (
                    p.name == "models" and all((m / TINY_STAMP).is_file() for m in p.iterdir()))
                (delete if ours else keep).append((p, "a smoke run" if ours else "not written by `make smoke`"))
        elif top.name == "base" and top.is_dir():
            for p in sorted(top.iterdir()):
                if (p / MANIFEST).is_file():
                    take(p, "the base model `make base-model` built", valuable=True)
                else:
                    keep.append((p, "not built by `make base-model`"))
        elif top.is_dir() and any((top / f).exists() for f in ("adapter_config.json", "loss_log.jsonl", "prepared")):
            for p in sorted(top.iterdir()):
                if p.name == "prepared" or p.name.startswith("incomplete-checkpoint-"):
                    delete.append((p, "Axolotl's tokenised-data cache" if p.name == "prepared" else "an incomplete checkpoint"))
                elif p.name == "merged" and (p / MERGE_MARKER).is_file():
                    delete.append((p, "a merged model (`make merge` rebuilds it)"))
                elif p.name.startswith("checkpoint-") or p.name == "eval" or p.name in RUN_FILES:
                    take(p, "a checkpoint" if p.name.startswith("checkpoint-") else
                         "evaluation reports" if p.name == "eval" else "the trained adapter and its logs", valuable=True)
                else:
                    keep.append((p, "not written by a project command"))
        else:
            keep.append((top, "not written by a project command"))
    return delete, keep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Delete what outputs/ holds that the project can rebuild")
    p.add_argument("--all", action="store_true", help="also adapters, checkpoints, evaluation reports, the base model")
    p.add_argument("--dry-run", action="store_true", help="list only")
    a = p.parse_args(argv)
    delete, keep = plan(OUTPUTS, a.all)
    for path, why in delete:
        print(f"clean: {'would delete' if a.dry_run else 'delete'} {rel(path)} ({why})")
    for path, why in keep:
        print(f"clean: keep {rel(path)} ({why})")
    if not a.dry_run:
        for path, _ in delete:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        # a run folder or outputs/base this emptied goes too (an empty folder of the user's stays)
        for top in {path.parent for path, _ in delete} - {OUTPUTS}:
            if top.is_dir() and not any(top.iterdir()):
                top.rmdir()
    print(f"clean: {len(delete)} deleted, {len(keep)} kept" if not a.dry_run else f"clean: {len(delete)} to delete")
    return 0
