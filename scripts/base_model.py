#!/usr/bin/env python
"""Build the offline CPU base model (SmolLM2-135M-Instruct) under outputs/base/."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.base_model"))
