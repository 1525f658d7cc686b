#!/usr/bin/env python
"""Generate with base + adapter(s) or a merged model: `python scripts/infer.py --recipe NAME --prompt TEXT`."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.infer"))
