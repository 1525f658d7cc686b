#!/usr/bin/env python
"""Check a recipe before training: `python scripts/check.py [RECIPE] [--resume] [axolotl overrides...]`."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.check"))
