#!/usr/bin/env python
"""Train a recipe: `python scripts/train.py [RECIPE] [axolotl overrides...]`."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.train"))
