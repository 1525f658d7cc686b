#!/usr/bin/env python
"""`make clean-outputs [ALL=1]`: delete what outputs/ holds that the project can rebuild (see finlora/clean.py)."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.clean"))
