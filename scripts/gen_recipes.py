#!/usr/bin/env python
"""Generate recipes/<task>_<variant>.yml from recipes/matrix.yml.

    python scripts/gen_recipes.py            write the recipes that differ
    python scripts/gen_recipes.py --check    exit 1 listing recipes that drift from the matrix
    python scripts/gen_recipes.py --table    print the README recipe table (Markdown)
"""
import argparse
import sys

from finlora import generate
from finlora.cli import run
from finlora.errors import RecipeError
from finlora.recipes import recipe_names, rel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="fail when a committed recipe differs from the matrix")
    g.add_argument("--table", action="store_true", help="print the Markdown recipe table")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the table's memory column (default 1)")
    a = p.parse_args(argv)
    if a.check:
        problems = generate.drift()
        if problems:
            raise RecipeError("recipes drift from recipes/matrix.yml (run `make recipes`):\n"
                              + "\n".join(f"  {line}" for line in problems))
        print(f"recipes: {len(recipe_names())} generated recipes match recipes/matrix.yml")
        return 0
    if a.table:
        from finlora.plan import recipe_table

        print(recipe_table(gpus=a.gpus))
        return 0
    written = generate.write_all()
    for path in written:
        print(f"recipes: wrote {rel(path)}")
    print(f"recipes: {len(recipe_names())} recipes, {len(written)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
