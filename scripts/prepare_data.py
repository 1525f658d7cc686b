#!/usr/bin/env python
"""`make data`: prepare FinLoRA JSONL data (see finlora/data/prepare.py or --help)."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.data.prepare"))
