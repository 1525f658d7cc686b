#!/usr/bin/env python
"""Score models on FinLoRA test sets: `python scripts/evaluate.py --recipe NAME --datasets fpb,fiqa`."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.evaluate"))
