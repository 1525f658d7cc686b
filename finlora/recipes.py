"""The one reader of recipes (`recipes/<name>.yml`) and of `recipes/matrix.yml` (README, Layout).
Every module asks `is_local` here whether a value is a local path rather than deciding for itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Sequence

import yaml

from finlora import ROOT
from finlora.errors import RecipeError

RECIPE_DIR = ROOT / "recipes"
MATRIX = RECIPE_DIR / "matrix.yml"
DEFAULT_RECIPE = "smollm2_sentiment_r8"
BITS_LABEL = {16: "bf16", 8: "int8", 4: "NF4"}

# Numeric settings a run cannot do without, and the values that make sense: (type, lowest,
# exclusive upper bound or None). `max_steps: -1` is the Trainer's "no limit"; save and logging
# steps below 1 are the Trainer's fractions of the run.
NUMBERS: dict[str, tuple[type, float, float | None]] = {
    "lora_r": (int, 1, None), "lora_alpha": (float, 1e-12, None), "lora_dropout": (float, 0, 1),
    "micro_batch_size": (int, 1, None), "gradient_accumulation_steps": (int, 1, None),
    "sequence_len": (int, 1, None), "num_epochs": (float, 1e-12, None), "max_steps": (int, -1, None),
    "learning_rate": (float, 1e-12, None), "warmup_steps": (int, 0, None), "weight_decay": (float, 0, None),
    "save_steps": (float, 1e-12, None), "save_total_limit": (int, 1, None), "logging_steps": (float, 1e-12, None),
    "seed": (int, 0, None),
}

# A recipe value naming a local file or folder rather than a hub id starts like this
# (or exists relative to the repository root).
LOCAL_PREFIXES = ("./", "../", "/", "~", "outputs/", "data/", "recipes/")


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, plus YAML 1.2's floats without a dot (`1e-4`): Axolotl's schema
    takes that string as the number, so every check must see the number too."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def rel(path: str | Path) -> str:
    """A path as the user would type it from the repository root."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def resolve_path(value: str | Path) -> Path:
    """Paths in recipes are relative to the repository root (where `make` runs)."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else (ROOT / p)


def is_local(value: str) -> bool:
    """A recipe value that names a local file or folder rather than a hub id."""
    value = str(value)
    return bool(value) and (value.startswith(LOCAL_PREFIXES) or resolve_path(value).exists())


def resolve(name_or_path: str | Path) -> Path:
    """A recipe name (`sentiment_r8`, `sentiment_r8.yml`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yml", ".yaml") and p.is_file():
        return p.resolve()
    stem = p.name.removesuffix(".yml").removesuffix(".yaml") if p.parent == Path(".") else str(name_or_path)
    candidate = RECIPE_DIR / f"{stem}.yml"
    if candidate.is_file() and candidate != MATRIX:
        return candidate
    # matrix.yml sits beside the recipes but is the generator's input, not a recipe
    names = sorted(p.stem for p in RECIPE_DIR.glob("*.yml") if p != MATRIX)
    raise RecipeError(
        f"no recipe named {str(name_or_path)!r} (looked for {rel(candidate)}).\n"
        f"Recipes there are ({len(names)}): " + ", ".join(names)
    )


def _parse(path: Path, text: str) -> tuple[dict, dict[str, int], list[tuple[str, int]]]:
    """(mapping, {top-level key: line}, [(duplicated key, line)]) from one YAML parse."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{rel(path)}:{mark.line + 1}" if mark else rel(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise RecipeError(f"{rel(path)}: a recipe must be a YAML mapping of Axolotl keys")
    lines: dict[str, int] = {}
    dups = []
    for k, _ in node.value:
        name = str(k.value)
        if name in lines:
            dups.append((name, k.start_mark.line + 1))
        lines.setdefault(name, k.start_mark.line + 1)
    return data, lines, dups


@dataclass(frozen=True)
class Recipe:
    """One recipe as a command sees it: the file, and the overrides given on top. Frozen,
    so what is derived from it (overrides, config, config_dir) is worked out once."""

    path: Path
    file: dict                                   # the mapping as written in the file
    args: tuple[str, ...] = ()                   # `axolotl train` overrides, passed on as given
    key_lines: dict[str, int] = field(default_factory=dict)
    duplicates: list[tuple[str, int]] = field(default_factory=list)

    @classmethod
    def open(cls, name_or_path: str | Path, args: Sequence[str] = ()) -> "Recipe":
        path = resolve(name_or_path)
        return cls.from_text(path, path.read_text(encoding="utf-8"), args)

    @classmethod
    def from_text(cls, path: Path, text: str, args: Sequence[str] = ()) -> "Recipe":
        """A recipe from its YAML text (a file's, or one `make recipes` is about to write)."""
        file, lines, dups = _parse(path, text)
        return cls(path, file, tuple(str(a) for a in args), lines, dups)

    def with_args(self, args: Sequence[str]) -> "Recipe":
        """The same file with other overrides (not read again)."""
        return Recipe(self.path, self.file, tuple(str(a) for a in args), self.key_lines, self.duplicates)

    @property
    def name(self) -> str:
        return self.path.stem

    @cached_property
    def overrides(self) -> dict:
        """The `axolotl train` overrides (`--max-steps 3`, `--output_dir=x`) as recipe keys."""
        out: dict = {}
        args, i = self.args, 0
        while i < len(args):
            a = args[i]
            if a.startswith("--"):
                name, eq, value = a[2:].partition("=")
                if not eq:
                    if i + 1 < len(args) and not args[i + 1].startswith("--"):
                        value = args[i + 1]
                        i += 1
                    else:
                        value = "true"
                try:
                    out[name.replace("-", "_")] = yaml.load(value, Loader=_Loader)  # noqa: S506 - a SafeLoader
                except yaml.YAMLError:
                    out[name.replace("-", "_")] = value
            i += 1
        return out

    @cached_property
    def config(self) -> dict:
        """What Axolotl will see: the file with the overrides on top."""
        return {**self.file, **self.overrides}

    def get(self, key: str, default=None):
        return self.config.get(key, default)

    def where(self, key: str | None = None) -> str:
        """`recipes/x.yml:23` for a key (dotted or indexed keys: their top-level line), or
        `ARGS --learning-rate` when the command's overrides set it."""
        top = key.split(".")[0].split("[")[0] if key else None
        if top and top in self.overrides:
            given = next((a.partition("=")[0] for a in self.args
                          if a.startswith("--") and a[2:].partition("=")[0].replace("-", "_") == top), f"--{top}")
            return f"ARGS {given}"
        line = self.key_lines.get(top) if top else None
        return f"{rel(self.path)}:{line}" if line else rel(self.path)

    def value_problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for each numeric setting that no run can use (`lora_r: 0`,
        `lora_r: "eight"`, a negative learning rate), from the file or the overrides. Axolotl
        accepts some of these, or checks them only after the model has loaded."""
        out = []
        for key, (kind, low, high) in NUMBERS.items():
            v = self.config.get(key)
            if v is None:
                continue
            is_int = isinstance(v, int) and not isinstance(v, bool)
            if kind is int and not is_int or kind is float and not (is_int or isinstance(v, float)):
                out.append((key, f"{v!r} is not {'a whole number' if kind is int else 'a number'}"))
            elif v < low or (high is not None and v >= high):
                bound = f"at least {low}" if high is None else f"in [{low}, {high})"
                out.append((key, f"{v!r} must be {bound}"))
        return out

    def number(self, key: str, default):
        """A numeric setting (NUMBERS) as a command uses it; RecipeError naming file:line or
        ARGS when no run could use it."""
        for k, why in self.value_problems():
            if k == key:
                raise RecipeError(f"{self.where(key)}: {key}: {why}")
        v = self.config.get(key)
        return default if v is None else v

    def local(self, value: str | None) -> Path | None:
        """The resolved path when `value` names a local file or folder, else None (hub id)."""
        return resolve_path(value) if value and is_local(str(value)) else None

    @property
    def output_dir(self) -> Path:
        return resolve_path(str(self.get("output_dir") or f"./outputs/{self.name}"))

    @property
    def base_model(self) -> str:
        return str(self.get("base_model") or "")

    @property
    def bits(self) -> int:
        """The frozen base's precision: 4 (NF4), 8 (LLM.int8) or 16."""
        return 4 if self.get("load_in_4bit") else 8 if self.get("load_in_8bit") else 16

    @property
    def lora_shape(self) -> tuple[int, tuple[str, ...], bool]:
        """(r, target modules, DoRA): what decides the trainable parameters."""
        targets = self.get("lora_target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        return int(self.number("lora_r", 8)), tuple(str(t) for t in targets), bool(self.get("peft_use_dora"))

    @property
    def variant(self) -> str:
        if self.get("peft_use_dora"):
            return "DoRA"
        if self.get("peft_use_rslora"):
            return "rsLoRA"
        return "QLoRA" if self.bits == 4 else "LoRA"

    @cached_property
    def deepspeed(self) -> dict | None:
        """The DeepSpeed config the recipe names (a path or an inline mapping), read once."""
        ds = self.get("deepspeed")
        if not ds or isinstance(ds, dict):
            return ds or None
        p = resolve_path(str(ds))
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except OSError:
            raise RecipeError(f"{self.where('deepspeed')}: deepspeed: {ds} does not exist") from None
        except json.JSONDecodeError as e:
            raise RecipeError(f"{self.where('deepspeed')}: deepspeed: {ds}: not valid JSON: {e}") from None

    @property
    def zero_stage(self) -> int:
        return int(((self.deepspeed or {}).get("zero_optimization") or {}).get("stage", 0))

    @property
    def offload_optimizer(self) -> bool:
        zo = (self.deepspeed or {}).get("zero_optimization") or {}
        return (zo.get("offload_optimizer") or {}).get("device") == "cpu"

    @cached_property
    def config_dir(self) -> Path | None:
        """The folder holding the base model's config.json, without the hub: a local folder
        itself, else the copy shipped under recipes/models/ for a model the matrix names (the
        Llama hub ids, and the CPU default's base before `make base-model` has built it)."""
        if not self.base_model:
            return None
        local = self.local(self.base_model)
        if local is not None and (local / "config.json").is_file():
            return local
        for spec in load_matrix()["models"].values():
            shipped = spec["base_model"]
            if shipped == self.base_model or (local is not None and resolve_path(shipped) == local):
                return ROOT / spec["config_dir"]
        return None


# --------------------------------------------------------------------------- the matrix


def load_matrix(path: Path = MATRIX) -> dict:
    try:
        m = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{rel(path)}: not valid YAML: {e}") from None
    for key in ("models", "tasks", "common", "variants", "reference_gpus"):
        if key not in m:
            raise RecipeError(f"{rel(path)}: top-level key {key!r} is missing")
    for name, v in m["variants"].items():
        if v["model"] not in m["models"]:
            raise RecipeError(f"{rel(path)}: variants.{name}.model: no model {v['model']!r}")
        if v["bits"] not in BITS_LABEL:
            raise RecipeError(f"{rel(path)}: variants.{name}.bits must be one of 16, 8, 4")
    return m


def recipe_name(task: str, variant: str) -> str:
    return f"{task}_{variant}"


def split_name(name: str, matrix: dict | None = None) -> tuple[str, str] | None:
    """(task, variant) of a generated recipe's name (`xbrl_term_r8_bf16` -> xbrl_term, r8_bf16), or None."""
    m = matrix or load_matrix()
    for task in sorted(m["tasks"], key=len, reverse=True):
        if name.startswith(task + "_") and name[len(task) + 1:] in m["variants"]:
            return task, name[len(task) + 1:]
    return None


def variant_of(name: str) -> str | None:
    """The matrix variant a recipe is (the CPU default: LoRA r8, as the reference recipe)."""
    split = split_name(name)
    return split[1] if split else "r8" if name == DEFAULT_RECIPE else None


def recipe_names(matrix: dict | None = None) -> list[str]:
    m = matrix or load_matrix()
    return [recipe_name(t, v) for v in m["variants"] for t in m["tasks"]]
