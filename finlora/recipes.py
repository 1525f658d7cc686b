"""Find and read recipes: `recipes/<name>.yml`, complete Axolotl configs."""

from __future__ import annotations

from pathlib import Path

import yaml

from finlora import ROOT

RECIPE_DIR = ROOT / "recipes"
DEFAULT_RECIPE = "smollm2_sentiment_r8"


class RecipeError(SystemExit):
    """A recipe problem the user must fix; the message says which file and key."""


def available() -> list[str]:
    # matrix.yml sits beside the recipes but is the generator's input, not a recipe
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yml") if p.name != "matrix.yml")


def resolve(name_or_path: str) -> Path:
    """A recipe name (`sentiment_r8`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yml", ".yaml") and p.is_file():
        return p.resolve()
    candidate = RECIPE_DIR / f"{name_or_path}.yml"
    if candidate.is_file():
        return candidate
    names = available()
    raise RecipeError(
        f"error: no recipe named {name_or_path!r} (looked for {candidate.relative_to(ROOT)}).\n"
        f"Recipes there are ({len(names)}): " + ", ".join(names)
    )


def load(path: Path) -> dict:
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"error: {where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(cfg, dict):
        raise RecipeError(f"error: {path}: a recipe must be a YAML mapping of Axolotl keys")
    return cfg


def resolve_path(value: str) -> Path:
    """Paths in recipes are relative to the repository root (where `make` runs)."""
    p = Path(value)
    return p if p.is_absolute() else (ROOT / p)
