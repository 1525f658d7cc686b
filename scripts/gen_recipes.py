#!/usr/bin/env python
"""Generate recipes/<task>_<variant>.yml from recipes/matrix.yml.

    python scripts/gen_recipes.py            write the recipes that differ
    python scripts/gen_recipes.py --check    exit 1 listing recipes that drift from the matrix
    python scripts/gen_recipes.py --table    print the README recipe table (Markdown)
"""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.generate"))
