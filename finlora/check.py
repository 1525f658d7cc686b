"""`make check RECIPE=x [RESUME=1]`: everything that can be known about a run before it starts,
in seconds and without loading a model (`make train` runs it too). What is checked, the one-line
format of each problem, and what makes a checkpoint complete (`checkpoint_problems`): README,
"Crashes, typos and secrets" (Check before training; Resume).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from finlora import recipes
from finlora.errors import RecipeError
from finlora.recipes import Recipe, rel

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")
MARGIN_BYTES = 64 << 20  # logs, loss curve, tokenizer copy, Axolotl's prepared-data cache


# --------------------------------------------------------------------------- checkpoints


def safetensors_ok(path: Path) -> str | None:
    """None when safetensors opens the file (header and length agree); else why not."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np"):
            return None
    except (OSError, SafetensorError) as e:
        return f"{path.name} is truncated or unreadable ({str(e).split(': ')[-1]})"


def torch_file_ok(path: Path) -> str | None:
    """Load a Trainer .pt/.pth file the way the Trainer does (weights_only=True)."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    try:
        with safe_globals():
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, disallowed global
        return f"{path.name} does not load ({type(e).__name__})"
    return None


def checkpoint_problems(ckpt: Path) -> list[str]:
    """Why `ckpt` cannot be resumed from; [] when it is complete."""
    m = CHECKPOINT_RE.match(ckpt.name)
    problems = []
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        problems.append("trainer_state.json missing")
    else:
        try:
            step = json.loads(state.read_text()).get("global_step")
            if m and step != int(m.group(1)):
                problems.append(f"trainer_state.json says step {step}")
        except (OSError, ValueError):
            problems.append("trainer_state.json is not valid JSON")
    weights = [ckpt / w for w in WEIGHT_FILES if (ckpt / w).is_file()]
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
            weights += [ckpt / s for s in sorted(shards)]
        except (OSError, ValueError, KeyError):
            problems.append("model.safetensors.index.json is not valid")
    if not weights and not index.is_file():
        pickled = [p.name for p in ckpt.glob("*.bin") if p.name != "training_args.bin"]
        problems.append(f"only pickled weights ({', '.join(pickled)}); safetensors expected" if pickled
                        else "no adapter_model.safetensors")
    for w in weights:
        why = safetensors_ok(w) if w.is_file() else f"{w.name} missing"
        if why:
            problems.append(why)
    deepspeed = any(ckpt.glob("global_step*"))  # DeepSpeed keeps optimizer state in its own folder
    needed = ([] if deepspeed else ["optimizer.pt"]) + ["scheduler.pt"]
    rng = sorted(ckpt.glob("rng_state*.pth"))
    problems += [f"{name} missing" for name in needed if not (ckpt / name).is_file()]
    if not rng:
        problems.append("rng_state.pth missing")
    if not problems:
        for p in [ckpt / n for n in needed] + rng:
            why = torch_file_ok(p)
            if why:
                problems.append(why)
    return problems


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """[(step, folder)] of the `checkpoint-N` folders, oldest first, as the Trainer sorts them."""
    from transformers.trainer_utils import sort_checkpoints

    found = [(CHECKPOINT_RE.match(p.name), p) for p in map(Path, sort_checkpoints(str(output_dir)))]
    return [(int(m.group(1)), p) for m, p in found if m]  # not `checkpoint-4.old`, which the Trainer sorts in


def newest_complete(output_dir: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """(newest complete checkpoint, [(newer incomplete checkpoint, reasons)])."""
    skipped = []
    for _, p in reversed(list_checkpoints(output_dir)):
        why = checkpoint_problems(p)
        if not why:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


def auto_resumes(recipe: Recipe) -> bool:
    """`auto_resume_from_checkpoints: true` resumes where there is a checkpoint and starts
    afresh where there is none, as Axolotl does."""
    return bool(recipe.get("auto_resume_from_checkpoints")) and bool(list_checkpoints(recipe.output_dir))


def not_axolotls_cache(path: Path) -> str | None:
    """Why `make train` may not empty this dataset_prepared_path (entries that are not Axolotl's
    dataset folders and lock files), or None."""
    from axolotl.utils.data.lock import LOCK_FILE_NAME, PROCESS_COUNTER_FILE_NAME, READY_FILE_NAME

    ours = {LOCK_FILE_NAME, READY_FILE_NAME, PROCESS_COUNTER_FILE_NAME}
    foreign = [e.name for e in sorted(path.iterdir())
               if e.name not in ours and not (e.is_dir() and (e / "state.json").is_file())]
    return (f"{rel(path)} holds {', '.join(foreign[:5])}, which is not Axolotl's tokenised-data cache "
            "(`make train` empties it): give the recipe a dataset_prepared_path of its own") if foreign else None


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path` (or its nearest existing parent)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# --------------------------------------------------------------------------- the checks


@dataclass
class Missing:
    """A local input a recipe names that does not exist yet."""

    key: str                                # base_model, datasets[i].path
    value: str
    build: Callable[[], object] | None      # builds it when it is the project's default
    how: str = ""                           # what `make train` does about it
    refusal: str = ""                       # the error when it cannot be built


def missing_inputs(recipe: Recipe) -> list[Missing]:
    """The local base model and data files `recipe` names that do not exist. The default
    base model and the default data come with the function that builds them: `make train`
    runs it, `make check` says it will; any other missing path is an error for both."""
    from finlora.base_model import DEFAULT_OUT, build
    from finlora.data import defaults

    out, default_data = [], None
    base = recipe.local(recipe.base_model)
    if base is not None and not base.exists():
        default = base.resolve() == DEFAULT_OUT.resolve()
        out.append(Missing("base_model", recipe.base_model, (lambda: build(DEFAULT_OUT)) if default else None,
                           "builds it (or `make base-model`)", f"folder {recipe.base_model} does not exist"))
    for i, ds in enumerate(recipe.get("datasets") or []):
        path = str((ds or {}).get("path", ""))
        local = recipe.local(path)
        if local is not None and not local.exists():
            default_data = defaults.default_outputs() if default_data is None else default_data
            default = local.absolute() in default_data
            name = recipe.name if recipe.path.parent == recipes.RECIPE_DIR else rel(recipe.path)
            out.append(Missing(f"datasets[{i}].path", path, defaults.prepare_default if default else None,
                               "prepares it (or `make data`)",
                               f"{path} does not exist (run `make data RECIPE={name}`)"))
    return out


@dataclass
class Result:
    recipe: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # checks that could not run, and why


class Checker:
    def __init__(self, recipe: Recipe, resume: bool, pending: bool):
        self.recipe, self.cfg = recipe, recipe.config
        self.explicit_resume, self.resume, self.pending = resume, resume or auto_resumes(recipe), pending
        self.r = Result(recipe.path)

    def error(self, key: str, msg: str) -> None:
        self.r.errors.append(f"error: {self.recipe.where(key)}: {key}: {msg}")

    def warn(self, key: str, msg: str) -> None:
        self.r.warnings.append(f"warning: {self.recipe.where(key)}: {key}: {msg}")

    def note(self, msg: str) -> None:
        self.r.notes.append(f"note: {msg}")

    def skip(self, what: str, why: str) -> None:
        self.r.skipped.append(f"{what} ({why})")

    # -- keys: Axolotl ignores an unknown key silently, so each is one line here with file:line
    def keys(self) -> None:
        from finlora import axolotl_config

        bad = axolotl_config.unknown_keys(self.cfg)
        allowed = sorted(axolotl_config.schema_keys()) if bad else []
        for k in bad:
            top, _, hint = k.partition(" (deprecated in Axolotl: ")
            if hint:
                self.error(top, f"deprecated in Axolotl: {hint[:-1]}")  # Axolotl's own hint: the replacement
                continue
            guess = difflib.get_close_matches(top, allowed, n=1, cutoff=0.75)
            hint = f" (did you mean {guess[0]}?)" if guess and "." not in top else ""
            self.error(top, f"unknown key{hint}; Axolotl would ignore it")

    # -- Axolotl's own validation: its messages mapped to file:line
    def axolotl_validation(self) -> None:
        from finlora import axolotl_config

        if self.recipe.config_dir is None:
            self.skip("Axolotl's own validation",
                      f"base_model {self.recipe.base_model}: no config.json on this machine")
            return
        try:
            axolotl_config.validate(self.recipe)
        except RecipeError as e:
            cause = e.__cause__
            errs = getattr(cause, "errors", None)
            if callable(errs):
                for d in errs()[:10]:
                    loc = ".".join(str(x) for x in d.get("loc", ()) if x is not None) or "config"
                    self.error(loc, f"Axolotl rejects it: {d.get('msg')}")
            else:
                msg = str(cause or e).splitlines()
                self.error("config", "Axolotl rejects it: " + " ".join(x.strip() for x in msg)[:300])
        except Exception as e:  # noqa: BLE001 - a plugin or schema failure is one line too
            self.error("config", f"Axolotl's validation failed: {type(e).__name__}: {str(e)[:200]}")

    def safety(self) -> None:
        if self.cfg.get("trust_remote_code"):
            self.warn("trust_remote_code", "true runs Python code shipped with the model repository; "
                                           "use it only for a model whose code you have read")
        if self.cfg.get("save_safetensors") is False:
            self.error("save_safetensors", "false saves pickled .bin files, which run code when loaded; set it to true")

    def paths(self) -> None:
        if not self.recipe.base_model:
            self.error("base_model", "missing")
        for i, ds in enumerate(self.cfg.get("datasets") or []):
            if not str((ds or {}).get("path", "")):
                self.error(f"datasets[{i}].path", "missing")
        for m in missing_inputs(self.recipe):
            if self.pending and m.build is not None:
                self.note(f"{m.key} {m.value} is missing; `make train` {m.how}")
            else:
                self.error(m.key, m.refusal)
        for key in ("tokenizer_config", "base_model_config"):
            v = self.recipe.local(self.cfg.get(key))
            if v is not None and not v.exists():
                self.error(key, f"{self.cfg[key]} does not exist")
        ds = self.cfg.get("deepspeed")
        if ds and isinstance(ds, str):
            from finlora.axolotl_config import check_deepspeed_json

            try:
                check_deepspeed_json(ds)
            except RecipeError as e:
                self.error("deepspeed", str(e).removeprefix("deepspeed: "))

    # -- tokenizer: EOS and pad; the token counter for `data`
    def tokenizer(self):
        from finlora.lengths import Lengths, tokenizer_for

        name = str(self.cfg.get("tokenizer_config") or self.recipe.base_model)
        found = tokenizer_for(name, self.recipe.local(name))
        if found.path is None:
            if not (self.pending and self.recipe.local(name) is not None):
                self.skip("EOS/pad and token-length checks", found.note)
            return None
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(found.path), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            self.error("base_model",
                       f"tokenizer in {rel(found.path)} does not load: {type(e).__name__}: {str(e)[:160]}")
            return None
        if found.path != self.recipe.local(name):
            self.note(f"tokenizer: {found.where}")
        special = self.cfg.get("special_tokens") or {}
        vocab = tok.get_vocab()
        for k in ("eos_token", "pad_token", "bos_token", "unk_token"):
            v = special.get(k)
            if v is not None and v not in vocab:
                self.warn(f"special_tokens.{k}", f"{v!r} is not in the tokenizer's vocabulary: it will be "
                                                 "added as a new token with an untrained embedding")
        if not (special.get("eos_token") or tok.eos_token):
            self.error("special_tokens.eos_token", f"the tokenizer ({found.where}) has no EOS token; set one "
                                                   "(the model would never learn to stop)")
        if not (special.get("pad_token") or tok.pad_token):
            self.error("special_tokens.pad_token", f"the tokenizer ({found.where}) has no pad token; set one "
                                                   "(batches of unequal length cannot be padded)")
        return Lengths(tok)  # the tokenizer just loaded: the same ids as `make data`'s (finlora.lengths)

    def data(self, lengths) -> None:
        from finlora.data.convert import RowError, field_value
        from finlora.data.sources import read_jsonl
        from finlora.lengths import row_fields, too_long

        seq = self.cfg.get("sequence_len")
        for i, ds in enumerate(self.cfg.get("datasets") or []):
            ds = ds or {}
            p = self.recipe.local(str(ds.get("path", "")))
            if p is None or not p.is_file():
                continue
            if ds.get("ds_type", "json") != "json" and p.suffix not in (".json", ".jsonl"):
                continue
            key = f"datasets[{i}].path"
            if p.is_symlink() and "synthetic" in p.resolve().name:
                self.warn(key, f"{rel(p)} is the SYNTHETIC smoke-test set (invented headlines, "
                               "`make data SYNTHETIC=1`); run `make data` to train on the real data")
            fields = row_fields(ds)
            problems, texts = [], []
            for raw in read_jsonl(p):
                if raw.error:
                    problems.append(f"line {raw.line}: {raw.error}")
                    continue
                try:
                    vals = [field_value(raw.data, f) for f in fields]
                except RowError as e:
                    problems.append(f"line {raw.line}: {e}")
                    continue
                texts.append((raw.line, (vals[0] if vals else "", "".join(vals[1:]))))  # (prompt, answer), as Axolotl tokenises them
            for msg in problems[:10]:
                self.error(key, f"{rel(p)} {msg}")
            if len(problems) > 10:
                self.error(key, f"{rel(p)}: ... and {len(problems) - 10} more bad rows")
            if not texts and not problems:
                self.error(key, f"{rel(p)} has no rows")
            if lengths is None or not texts or not isinstance(seq, int):
                continue
            counts = lengths.trained_lengths([s for _, s in texts])
            long = too_long(counts, seq)
            for j, n in long[:5]:
                self.error("sequence_len", f"{seq} is shorter than {rel(p)} line {texts[j][0]} ({n} tokens)")
            if len(long) > 5:
                self.error("sequence_len", f"... and {len(long) - 5} more rows of {rel(p)} are longer than {seq}")
            if not long:
                self.note(f"{rel(p)}: {len(texts)} rows, longest {max(counts)} tokens <= sequence_len {seq}")

    def output(self) -> None:
        from finlora.atomic import writable

        out = self.recipe.output_dir
        why = writable(out)  # a file in the way too
        if why:
            self.error("output_dir", f"{rel(out)} cannot be written ({why})")
            return
        prepared = self.recipe.local(self.cfg.get("dataset_prepared_path"))
        why = not_axolotls_cache(prepared) if prepared is not None and prepared.is_dir() else None
        if why:
            self.error("dataset_prepared_path", why)
        explicit = self.cfg.get("resume_from_checkpoint")
        if explicit:
            p = recipes.resolve_path(str(explicit))
            why = checkpoint_problems(p) if p.is_dir() else ["does not exist"]
            if why:
                self.error("resume_from_checkpoint", f"{rel(p)} is not a complete checkpoint: {'; '.join(why)}")
            return
        if self.resume:
            best, skipped = newest_complete(out)
            for p, why in skipped:
                self.warn("output_dir", f"{rel(p)} is incomplete ({'; '.join(why)}): not resumed from")
            if best is None:
                self.error("output_dir", f"{'RESUME=1' if self.explicit_resume else 'auto_resume_from_checkpoints'}"
                           f" but {rel(out)} holds no complete checkpoint" + (" (only incomplete ones)" if skipped else ""))
            else:
                self.note(f"resuming from {rel(best)}")
            return
        ckpts = list_checkpoints(out)
        if ckpts:
            names = ", ".join(p.name for _, p in ckpts[-3:])
            self.error("output_dir", f"{rel(out)} already holds checkpoints ({names}): continue it with "
                                     "RESUME=1, or set a new output_dir (or delete the folder)")
        elif (out / "adapter_model.safetensors").is_file():
            self.warn("output_dir", f"{rel(out)} holds a trained adapter; this run will overwrite it")

    # -- disk: the checkpoints the recipe keeps, sized from its trainable parameters
    def disk(self) -> None:
        n_params = self._trainable_params()
        if n_params is None:
            return
        out = self.recipe.output_dir
        adapter = n_params * 4  # fp32 LoRA weights (adapter_model.safetensors)
        ckpt = adapter * 3 + (1 << 20)  # + AdamW's two fp32 moments (optimizer.pt), + state/RNG files
        limit, steps, every = (self.cfg.get(k) for k in ("save_total_limit", "max_steps", "save_steps"))
        if str(self.cfg.get("save_strategy") or "steps").lower() == "no":
            kept = 0
        elif limit:
            kept = int(limit) + 1  # the Trainer writes the new checkpoint before deleting the oldest
        elif isinstance(every, float) and 0 < every < 1:  # the Trainer's fraction of the run
            kept = math.ceil(1 / every) + 1
        elif isinstance(steps, int) and isinstance(every, int) and every > 0:
            kept = math.ceil(steps / every) + 1
        else:
            kept = 10
            self.warn("save_total_limit", "unset: every checkpoint is kept (disk estimate assumes 10)")
        need = kept * ckpt + adapter + MARGIN_BYTES
        free = free_bytes(out)
        mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
        if free < need:
            self.error("output_dir", f"{rel(out)}: only {mb(free)} free on its disk; this run needs about "
                                     f"{mb(need)} ({kept} checkpoint(s) x {mb(ckpt)} + adapter + margin). "
                                     "Free space or lower save_total_limit")
        else:
            self.note(f"disk: about {mb(need)} needed ({kept} checkpoint(s) x {mb(ckpt)}), {mb(free)} free")

    def _trainable_params(self) -> int | None:
        if self.recipe.config_dir is None or not self.cfg.get("adapter") or not self.recipe.lora_shape[1]:
            self.skip("disk estimate", "no model config.json, or no LoRA target modules listed")
            return None
        from finlora.params import count_recipe

        try:
            return count_recipe(self.recipe).trainable
        except RecipeError as e:
            self.error("lora_target_modules", str(e).split(": ", 1)[-1])
            return None


def run(recipe: Recipe | str | Path, *, resume: bool = False, extra_args: Sequence[str] = (),
        pending: bool = True) -> Result:
    """All checks for one recipe (a Recipe as `make train` holds it, or a name or path,
    read here with `extra_args` as its overrides). `pending`: the default base model and
    data may still be built by `make train` (missing ones are notes, not errors)."""
    if not isinstance(recipe, Recipe):
        try:
            recipe = Recipe.open(recipe, extra_args)
        except RecipeError as e:
            return Result(Path(str(recipe)), errors=[f"error: {e}"])
    c = Checker(recipe, resume, pending)
    for k, ln in recipe.duplicates:
        c.r.errors.append(f"error: {rel(recipe.path)}:{ln}: {k}: key appears twice (the last one wins silently)")
    c.keys()
    for key, why in recipe.value_problems():  # values no run can use: Axolotl's own validation misses some
        c.error(key, why)
    c.safety()
    c.paths()
    if c.r.errors:
        c.skip("Axolotl's own validation", "fix the errors above first")
    else:
        c.axolotl_validation()
    c.data(c.tokenizer())
    c.output()
    if not c.r.errors:
        c.disk()
    return c.r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a recipe before training (make check RECIPE=x)")
    p.add_argument("recipe", nargs="?", default=recipes.DEFAULT_RECIPE)
    p.add_argument("--resume", action="store_true", help="the run will resume (RESUME=1)")
    p.add_argument("axolotl_args", nargs=argparse.REMAINDER, help="the overrides `make train ARGS=...` would pass")
    a = p.parse_args(argv)
    r = run(a.recipe, resume=a.resume, extra_args=a.axolotl_args)
    for line in r.notes + r.warnings:
        print(line)
    for line in r.errors:
        print(line, file=sys.stderr)
    if r.errors:
        print(f"check: {rel(r.recipe)}: {len(r.errors)} error(s)", file=sys.stderr)
        return 1
    warned = f" ({len(r.warnings)} warning(s))" if r.warnings else ""
    if r.skipped:  # a check that could not run does not read as passed
        print(f"check: {rel(r.recipe)}: no errors in what could be checked{warned}; NOT checked: "
              + "; ".join(r.skipped))
        return 0
    print(f"check: {rel(r.recipe)} OK{warned}")
    return 0
