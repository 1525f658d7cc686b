#!/usr/bin/env python
"""Build the offline CPU base model (SmolLM2-135M-Instruct) under outputs/base/."""
import sys

from finlora.cli import run
from finlora.base_model import main

if __name__ == "__main__":
    sys.exit(run(main))
