#!/usr/bin/env python
"""`make lengths [SRC=dir]`: token lengths of FinLoRA's files per task against the recipes' sequence_len (finlora/data/stats.py)."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.data.stats"))
