"""`make data`: prepare FinLoRA JSONL data (see finlora/data/prepare.py or --help)."""

import sys

from finlora.cli import run
from finlora.data.prepare import main

if __name__ == "__main__":
    sys.exit(run(main))
