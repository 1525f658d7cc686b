"""Shared logic behind the thin entry points in scripts/ and the Makefile."""

from pathlib import Path

# The repository root: recipes, data and outputs are resolved against it so that
# `make` targets and scripts behave the same from any working directory.
ROOT = Path(__file__).resolve().parent.parent
