#!/usr/bin/env python
"""Check a recipe before training: `python scripts/check.py [RECIPE] [--resume] [axolotl overrides...]`."""
import sys

from finlora.cli import run
from finlora.check import main

if __name__ == "__main__":
    sys.exit(run(main))
