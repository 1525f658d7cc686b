#!/usr/bin/env python
"""Merge an adapter into its base: `python scripts/merge.py --recipe NAME [--out DIR] [--verify]`
or `python scripts/merge.py --base DIR --adapter DIR --out DIR`. See finlora/merge.py."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.merge"))
