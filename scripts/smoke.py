#!/usr/bin/env python
"""Smoke a generated recipe on the CPU: `python scripts/smoke.py sentiment_r8 [more ...|all]`. See finlora/smoke.py."""
import sys

from finlora.cli import run

if __name__ == "__main__":
    sys.exit(run("finlora.smoke"))
