#!/usr/bin/env python
"""Estimated peak GPU memory per GPU for a recipe (formulas: recipes/PLANNER.md).

    python scripts/plan.py sentiment_70b_r4 --gpus 4
"""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.plan"))
