"""`make clean-outputs [ALL=1]`: delete what outputs/ holds that the project wrote and can
rebuild, listing each thing first; never a file the project did not write.

By default: smoke runs, Axolotl's tokenised-data caches, merged models (rebuilt by
`make merge`) and checkpoints moved aside as incomplete. Adapters, checkpoints, evaluation
reports and the base model only with ALL=1 (`--all`). Anything not recognised as the
project's (no marker of a project command, a folder holding files such a command does not
write, a file of unknown name, a symbolic link) is listed and kept.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from finlora import ROOT
from finlora.base_model import replaceable as base_model_replaceable
from finlora.merge import replaceable_output as merged_replaceable
from finlora.recipes import rel
from finlora.smoke import MARKER, TINY_STAMP

OUTPUTS = ROOT / "outputs"
# What a training run leaves in its output folder besides the folders handled below; the
# first two only `make train` writes (the plugin's loss log, the overrides Axolotl read).
RUN_MARKERS = ("loss_log.jsonl", "train_config.yml")
RUN_FILES = {*RUN_MARKERS, "adapter_config.json", "adapter_model.safetensors", "loss.png", "debug.log",
             "long_rows.jsonl", "README.md", "config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "training_args.bin", "generation_config.json"}


def plan(outputs: Path = OUTPUTS, everything: bool = False) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """([(path, why it is deleted)], [(path, why it is kept)])."""
    delete, keep = [], []

    def take(p: Path, what: str) -> None:  # what is worth keeping: deleted only with --all
        (delete if everything else keep).append((p, what if everything else f"{what}: ALL=1 deletes it"))

    from finlora.check import not_axolotls_cache

    def folders(d: Path) -> list[Path]:  # a link is never followed: what it points to is not outputs/'
        out = []
        for p in sorted(d.iterdir()):
            (keep.append((p, "a symbolic link: not followed")) if p.is_symlink() else out.append(p))
        return out

    for top in folders(outputs):
        if top.name == ".gitkeep":
            continue
        if top.name == "smoke" and top.is_dir():
            for p in folders(top):
                ours = p.is_dir() and ((p / MARKER).is_file() or (p / TINY_STAMP).is_file() or (
                    p.name == "models" and all((m / TINY_STAMP).is_file() and not m.is_symlink() for m in p.iterdir())))
                (delete if ours else keep).append((p, "a smoke run" if ours else "not written by `make smoke`"))
        elif top.name == "base" and top.is_dir():
            for p in folders(top):
                why = base_model_replaceable(p)
                if why is None:
                    take(p, "the base model `make base-model` built")
                else:
                    keep.append((p, f"not only what `make base-model` built ({why})"))
        elif top.is_dir() and any((top / f).is_file() for f in RUN_MARKERS):
            for p in folders(top):
                if p.name.startswith("incomplete-checkpoint-") and p.is_dir():
                    delete.append((p, "an incomplete checkpoint"))
                elif p.name in ("prepared", "merged") and p.is_dir():
                    why = not_axolotls_cache(p) if p.name == "prepared" else merged_replaceable(p)
                    what = "Axolotl's tokenised-data cache" if p.name == "prepared" else "a merged model (`make merge` rebuilds it)"
                    (keep if why else delete).append((p, why or what))
                elif p.name.startswith("train_config.node") and p.suffix == ".yml" or p.name.startswith(
                        "checkpoint-") or p.name == "eval" or p.name in RUN_FILES:
                    take(p, "a checkpoint" if p.name.startswith("checkpoint-") else
                         "evaluation reports" if p.name == "eval" else "the trained adapter and its logs")
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
            if top.is_dir() and not top.is_symlink() and not any(top.iterdir()):
                top.rmdir()
    print(f"clean: {len(delete)} deleted, {len(keep)} kept" if not a.dry_run else f"clean: {len(delete)} to delete")
    return 0
