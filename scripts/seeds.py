#!/usr/bin/env python
"""`make seeds RECIPE=x SEEDS=1,2,3`: train and score a recipe per seed; mean, spread, t-interval (finlora/seeds.py)."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.seeds"))
