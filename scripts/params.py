#!/usr/bin/env python
"""Trainable LoRA parameters of a recipe, from its model config alone (no weights).

    python scripts/params.py sentiment_70b_r4
    python scripts/params.py --recipe smollm2_sentiment_r8
    python scripts/params.py --config recipes/models/llama-3.1-70b/config.json --r 4 --targets q_proj,k_proj,v_proj
"""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.params"))
