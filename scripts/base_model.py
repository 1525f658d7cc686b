#!/usr/bin/env python
"""Build the offline CPU base model (SmolLM2-135M-Instruct) under outputs/base/."""
from finlora.base_model import main

if __name__ == "__main__":
    main()
