"""`make check RECIPE=x [RESUME=1]`: everything that can be known about a run before it starts.

A typo in a recipe should cost seconds, not a GPU-hour. `make train` runs the same
checks (after building the default base model and data when they are missing). Each
problem is one line naming the file and the key:

    error: recipes/x.yml:23: lora_rnak: unknown key (did you mean lora_r?); Axolotl would ignore it

Checked, in order: the YAML parses (file:line) without duplicate keys; every key is
known to Axolotl (`recipe_matrix.unknown_keys`) and Axolotl's own validation accepts
the config (`recipe_matrix.validate_recipe`, offline); safetensors and no remote
code; local paths exist (base_model, datasets[i].path, deepspeed); the tokenizer has
an EOS and a pad token once the recipe's special_tokens are applied; every data row
is valid JSON with the prompt/answer fields as non-empty strings and fits in
sequence_len; the output folder is free, or resumable with RESUME=1; the disk holds
the checkpoints the recipe will keep.

Checkpoints: Hugging Face's Trainer writes `checkpoint-N/` in place, file by file,
`trainer_state.json` last, so a crash (SIGKILL, OOM kill, node loss) can leave a
partial folder. `checkpoint_problems` defines "complete": trainer_state.json parses
and names step N; the weights are safetensors whose header and length agree; and
optimizer.pt, scheduler.pt and rng_state*.pth exist and load. Those three are torch
pickles: they are loaded here as the Trainer itself loads them (weights_only=True,
no arbitrary code), and trusted only because this project's own runs wrote them.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import re
import shutil
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from finlora import ROOT, recipes

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")
MARGIN_BYTES = 64 << 20  # logs, loss curve, tokenizer copy, Axolotl's prepared-data cache


def rel(path: str | Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def is_local(value: str) -> bool:
    """A recipe path that names a local file or folder rather than a hub id."""
    return value.startswith(("./", "../", "/", "~", "outputs/", "data/")) or recipes.resolve_path(value).exists()


# --------------------------------------------------------------------------- checkpoints


def safetensors_ok(path: Path) -> str | None:
    """None when the file's header parses and its length matches; else why not."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path.name} is truncated (header)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None


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
    ckpt = Path(ckpt)
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
    for name in needed:
        if not (ckpt / name).is_file():
            problems.append(f"{name} missing")
    if not rng:
        problems.append("rng_state.pth missing")
    if not problems:
        for p in [ckpt / n for n in needed] + rng:
            why = torch_file_ok(p)
            if why:
                problems.append(why)
    return problems


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if Path(output_dir).is_dir():
        for p in Path(output_dir).iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def newest_complete(output_dir: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """(newest complete checkpoint, [(newer incomplete checkpoint, reasons)])."""
    skipped = []
    for _, p in reversed(list_checkpoints(output_dir)):
        why = checkpoint_problems(p)
        if not why:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


# --------------------------------------------------------------------------- recipe reading


class _Loader(yaml.SafeLoader):
    pass


def key_lines(text: str) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """({top-level key: line}, [(duplicated key, line)]) of a YAML mapping."""
    node = yaml.compose(text, Loader=_Loader)
    lines: dict[str, int] = {}
    dups = []
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            name = str(k.value)
            if name in lines:
                dups.append((name, k.start_mark.line + 1))
            lines.setdefault(name, k.start_mark.line + 1)
    return lines, dups


def parse_overrides(args: Sequence[str]) -> dict:
    """`axolotl train` overrides (`--max-steps 3`, `--output_dir=x`) as recipe keys."""
    out: dict = {}
    i = 0
    args = list(args)
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            key = name.replace("-", "_")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                    i += 1
                else:
                    value = "true"
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                out[key] = value
        i += 1
    return out


# --------------------------------------------------------------------------- the checks


@dataclass
class Result:
    recipe: Path
    cfg: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_dir: Path | None = None
    resume_from: Path | None = None
    incomplete: list[tuple[Path, list[str]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def lines(self) -> list[str]:
        return self.notes + self.warnings + self.errors


class Checker:
    def __init__(self, recipe: Path, cfg: dict, key_line: dict[str, int], resume: bool, pending: bool):
        self.recipe, self.cfg, self.key_line = recipe, cfg, key_line
        self.resume, self.pending = resume, pending
        self.r = Result(recipe, cfg)
        self.where = rel(recipe)

    def _at(self, key: str) -> str:
        line = self.key_line.get(key.split(".")[0].split("[")[0])
        return f"{self.where}:{line}" if line else self.where

    def error(self, key: str, msg: str) -> None:
        self.r.errors.append(f"error: {self._at(key)}: {key}: {msg}")

    def warn(self, key: str, msg: str) -> None:
        self.r.warnings.append(f"warning: {self._at(key)}: {key}: {msg}")

    def note(self, msg: str) -> None:
        self.r.notes.append(f"note: {msg}")

    # -- keys and Axolotl's validation
    def keys(self) -> bool:
        from finlora import axolotl_config as rm

        allowed, _ = rm.schema_keys()
        bad = rm.unknown_keys(self.cfg)
        for k in bad:
            top = k.split(" ")[0]
            if "(deprecated in Axolotl" in k:
                self.error(top, k[len(top):].strip()[1:-1])  # Axolotl's own hint: the replacement
                continue
            guess = difflib.get_close_matches(top.split(".")[-1], sorted(allowed), n=1, cutoff=0.75)
            hint = f" (did you mean {guess[0]}?)" if guess and "." not in top else ""
            self.error(top, f"unknown key{hint}; Axolotl would ignore it")
        return not bad

    def axolotl_validation(self) -> None:
        from finlora import axolotl_config as rm

        base = str(self.cfg.get("base_model", ""))
        if not rm.model_config_dir_for(base):
            self.note(f"base_model {base}: no local config.json, Axolotl's own validation skipped")
            return
        # Overrides (ARGS) are part of what Axolotl will see: validate the merged config.
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".yml", prefix="finlora-check-") as tmp:
            yaml.safe_dump(self.cfg, tmp, sort_keys=False)
            tmp.flush()
            logging.disable(logging.WARNING)
            try:
                rm.validate_recipe(tmp.name)
            except rm.RecipeInvalid as e:
                cause = e.__cause__
                errs = getattr(cause, "errors", None)
                if callable(errs):
                    for d in errs()[:10]:
                        loc = ".".join(str(x) for x in d.get("loc", ()) if x is not None) or "config"
                        self.error(loc, f"Axolotl rejects it: {d.get('msg')}")
                else:
                    msg = str(cause or e).replace(tmp.name, self.where).splitlines()
                    self.error("config", "Axolotl rejects it: " + " ".join(s.strip() for s in msg)[:300])
            except Exception as e:  # noqa: BLE001 - a plugin or schema failure is one line too
                self.error("config", f"Axolotl's validation failed: {type(e).__name__}: {str(e)[:200]}")
            finally:
                logging.disable(logging.NOTSET)

    # -- safety
    def safety(self) -> None:
        if self.cfg.get("trust_remote_code"):
            self.warn("trust_remote_code", "true runs Python code shipped with the model repository; "
                                           "use it only for a model whose code you have read")
        if self.cfg.get("save_safetensors") is False:
            self.error("save_safetensors", "false saves pickled .bin files, which run code when loaded; set it to true")

    # -- paths
    def paths(self) -> None:
        from finlora.base_model import DEFAULT_OUT

        base = str(self.cfg.get("base_model") or "")
        if not base:
            self.error("base_model", "missing")
        elif is_local(base) and not recipes.resolve_path(base).exists():
            if self.pending and recipes.resolve_path(base).resolve() == DEFAULT_OUT.resolve():
                self.note(f"base_model {base} is missing; `make train` builds it (or `make base-model`)")
            else:
                self.error("base_model", f"folder {base} does not exist")
        for key in ("tokenizer_config", "base_model_config"):
            v = self.cfg.get(key)
            if v and is_local(str(v)) and not recipes.resolve_path(str(v)).exists():
                self.error(key, f"{v} does not exist")
        for i, ds in enumerate(self.cfg.get("datasets") or []):
            path = str((ds or {}).get("path", ""))
            if not path:
                self.error(f"datasets[{i}].path", "missing")
            elif is_local(path) and not recipes.resolve_path(path).exists():
                if self.pending and self._default_data(path):
                    self.note(f"datasets[{i}].path {path} is missing; `make train` prepares it (or `make data`)")
                else:
                    self.error(f"datasets[{i}].path", f"{path} does not exist (run `make data`)")
        ds = self.cfg.get("deepspeed")
        if ds and isinstance(ds, str):
            from finlora.axolotl_config import RecipeInvalid, check_deepspeed_json

            try:
                check_deepspeed_json(ds)
            except RecipeInvalid as e:
                self.error("deepspeed", str(e).removeprefix("deepspeed: "))

    @staticmethod
    def _default_data(path: str) -> bool:
        from finlora.data import prepare

        try:
            return Path(recipes.resolve_path(path)).absolute() in prepare.default_outputs()
        except Exception:  # noqa: BLE001
            return False

    # -- tokenizer
    def _tokenizer_dir(self) -> Path | None:
        name = str(self.cfg.get("tokenizer_config") or self.cfg.get("base_model") or "")
        p = recipes.resolve_path(name) if name else None
        return p if p is not None and p.is_dir() else None

    def tokenizer(self):
        d = self._tokenizer_dir()
        if d is None:
            self.note("tokenizer not available locally: EOS/pad and token-length checks skipped")
            return None
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            self.error("base_model", f"tokenizer in {rel(d)} does not load: {type(e).__name__}: {str(e)[:160]}")
            return None
        special = self.cfg.get("special_tokens") or {}
        vocab = tok.get_vocab()
        for k in ("eos_token", "pad_token", "bos_token", "unk_token"):
            v = special.get(k)
            if v is not None and v not in vocab:
                self.warn(f"special_tokens.{k}", f"{v!r} is not in the tokenizer's vocabulary: it will be "
                                                 "added as a new token with an untrained embedding")
        eos = special.get("eos_token") or tok.eos_token
        pad = special.get("pad_token") or tok.pad_token
        if not eos:
            self.error("special_tokens.eos_token", f"the tokenizer in {rel(d)} has no EOS token; set one "
                                                   "(the model would never learn to stop)")
        if not pad:
            self.error("special_tokens.pad_token", f"the tokenizer in {rel(d)} has no pad token; set one "
                                                   "(batches of unequal length cannot be padded)")
        return d

    # -- data
    def data(self, tok_dir: Path | None) -> None:
        from finlora.data.convert import RowError, _field
        from finlora.data.sources import read_jsonl

        lengths = None
        if tok_dir is not None:
            from finlora.data.validate import _Lengths

            lengths = _Lengths.load(tok_dir)
        seq = self.cfg.get("sequence_len")
        for i, ds in enumerate(self.cfg.get("datasets") or []):
            ds = ds or {}
            path = str(ds.get("path", ""))
            p = recipes.resolve_path(path)
            if not (path and is_local(path) and p.is_file()):
                continue
            if ds.get("ds_type", "json") != "json" and p.suffix not in (".json", ".jsonl"):
                continue
            t = ds.get("type")
            if isinstance(t, dict):
                fields = [t.get("field_instruction", "instruction"), t.get("field_output", "output")]
            elif t in ("alpaca", None):
                fields = ["instruction", "output"]
            elif t == "completion":
                fields = [ds.get("field") or "text"]
            else:
                fields = []
            problems, texts = [], []
            for raw in read_jsonl(p):
                if raw.error:
                    problems.append(f"line {raw.line}: {raw.error}")
                    continue
                try:
                    vals = [_field(raw.data, f) for f in fields]
                except RowError as e:
                    problems.append(f"line {raw.line}: {e}")
                    continue
                texts.append((raw.line, "".join(vals)))
            key = f"datasets[{i}].path"
            for msg in problems[:10]:
                self.error(key, f"{rel(p)} {msg}")
            if len(problems) > 10:
                self.error(key, f"{rel(p)}: ... and {len(problems) - 10} more bad rows")
            if not texts and not problems:
                self.error(key, f"{rel(p)} has no rows")
            if lengths is None or not texts or not isinstance(seq, int):
                continue
            ns = lengths.lengths([s for _, s in texts])
            long = [(ln, n + 1) for (ln, _), n in zip(texts, ns) if n + 1 > seq]  # + the EOS appended
            for ln, n in long[:5]:
                self.error("sequence_len", f"{seq} is shorter than {rel(p)} line {ln} ({n} tokens)")
            if len(long) > 5:
                self.error("sequence_len", f"... and {len(long) - 5} more rows of {rel(p)} are longer than {seq}")
            if not long:
                self.note(f"{rel(p)}: {len(texts)} rows, longest {max(ns) + 1} tokens <= sequence_len {seq}")

    # -- output folder
    def output(self) -> None:
        out = recipes.resolve_path(str(self.cfg.get("output_dir") or f"./outputs/{self.recipe.stem}"))
        self.r.output_dir = out
        explicit = self.cfg.get("resume_from_checkpoint")
        ckpts = list_checkpoints(out)
        if explicit:
            p = recipes.resolve_path(str(explicit))
            why = checkpoint_problems(p) if p.is_dir() else ["does not exist"]
            if why:
                self.error("resume_from_checkpoint", f"{rel(p)} is not a complete checkpoint: {'; '.join(why)}")
            else:
                self.r.resume_from = p
            return
        if self.resume:
            best, skipped = newest_complete(out)
            self.r.incomplete = skipped
            for p, why in skipped:
                self.warn("output_dir", f"{rel(p)} is incomplete ({'; '.join(why)}): not resumed from")
            if best is None:
                self.error("output_dir", f"RESUME=1 but {rel(out)} holds no complete checkpoint"
                           + (" (only incomplete ones)" if skipped else ""))
            else:
                self.r.resume_from = best
                self.note(f"resuming from {rel(best)}")
            return
        if ckpts:
            names = ", ".join(p.name for _, p in ckpts[-3:])
            self.error("output_dir", f"{rel(out)} already holds checkpoints ({names}): continue it with "
                                     "RESUME=1, or set a new output_dir (or delete the folder)")
        elif (out / "adapter_model.safetensors").is_file():
            self.warn("output_dir", f"{rel(out)} holds a trained adapter; this run will overwrite it")

    # -- disk
    def disk(self) -> None:
        out = self.r.output_dir
        if out is None:
            return
        n_params = self._trainable_params()
        if n_params is None:
            return
        strategy = str(self.cfg.get("save_strategy") or "steps").lower()
        adapter = n_params * 4  # fp32 LoRA weights (adapter_model.safetensors)
        ckpt = adapter * 3 + (1 << 20)  # + AdamW's two fp32 moments (optimizer.pt), + state/RNG files
        limit = self.cfg.get("save_total_limit")
        if strategy == "no":
            kept = 0
        elif limit:
            kept = int(limit) + 1  # the Trainer writes the new checkpoint before deleting the oldest
        else:
            steps, every = self.cfg.get("max_steps"), self.cfg.get("save_steps")
            if isinstance(steps, int) and isinstance(every, int) and every > 0:
                kept = math.ceil(steps / every) + 1
            else:
                kept = 10
                self.warn("save_total_limit", "unset: every checkpoint is kept (disk estimate assumes 10)")
        need = kept * ckpt + adapter + MARGIN_BYTES
        probe = out
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
        if free < need:
            self.error("output_dir", f"{rel(out)}: only {mb(free)} free on its disk; this run needs about "
                                     f"{mb(need)} ({kept} checkpoint(s) x {mb(ckpt)} + adapter + margin). "
                                     "Free space or lower save_total_limit")
        else:
            self.note(f"disk: about {mb(need)} needed ({kept} checkpoint(s) x {mb(ckpt)}), {mb(free)} free")

    def _trainable_params(self) -> int | None:
        from finlora import axolotl_config as rm

        base = str(self.cfg.get("base_model", ""))
        cdir = rm.model_config_dir_for(base) if base else None
        if cdir is None:
            return None
        try:
            from finlora.params import count

            if not self.cfg.get("adapter"):
                return count(cdir, 1, []).total_params
            targets = list(self.cfg.get("lora_target_modules") or [])
            if self.cfg.get("lora_target_linear") or not targets:
                return None
            return count(cdir, int(self.cfg.get("lora_r") or 8), targets, bool(self.cfg.get("peft_use_dora"))).trainable
        except Exception as e:  # noqa: BLE001
            self.note(f"disk estimate skipped: {type(e).__name__}: {str(e)[:120]}")
            return None


def run(recipe: str | Path, *, resume: bool = False, extra_args: Sequence[str] = (),
        pending: bool = True) -> Result:
    """All checks for one recipe. `pending`: the default base model and data may still
    be built by `make train` (missing ones are notes, not errors)."""
    try:
        path = recipes.resolve(str(recipe))
    except recipes.RecipeError as e:
        return Result(Path(str(recipe)), errors=[str(e)])
    try:
        cfg = recipes.load(path)
    except recipes.RecipeError as e:
        return Result(path, errors=[str(e).replace(str(path), rel(path))])
    lines, dups = key_lines(path.read_text(encoding="utf-8"))
    overrides = parse_overrides(extra_args)
    cfg = {**cfg, **overrides}
    c = Checker(path, cfg, lines, resume or bool(cfg.get("auto_resume_from_checkpoints")), pending)
    for k, ln in dups:
        c.r.errors.append(f"error: {c.where}:{ln}: {k}: key appears twice (the last one wins silently)")
    keys_ok = c.keys()
    c.safety()
    c.paths()
    if keys_ok and not c.r.errors:
        c.axolotl_validation()
    tok_dir = c.tokenizer()
    c.data(tok_dir)
    c.output()
    c.disk()
    return c.r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Check a recipe before training (make check RECIPE=x)")
    p.add_argument("recipe", nargs="?", default=recipes.DEFAULT_RECIPE)
    p.add_argument("--resume", action="store_true", help="the run will resume (RESUME=1)")
    p.add_argument("-q", "--quiet", action="store_true", help="errors and warnings only")
    p.add_argument("axolotl_args", nargs=argparse.REMAINDER, help="the overrides `make train ARGS=...` would pass")
    a = p.parse_args(argv)
    r = run(a.recipe, resume=a.resume, extra_args=a.axolotl_args)
    for line in (r.warnings if a.quiet else r.notes + r.warnings):
        print(line)
    for line in r.errors:
        print(line, file=sys.stderr)
    if r.errors:
        print(f"check: {rel(r.recipe)}: {len(r.errors)} error(s)", file=sys.stderr)
        return 1
    print(f"check: {rel(r.recipe)} OK" + (f" ({len(r.warnings)} warning(s))" if r.warnings else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
