"""The one command-line layer: every script in scripts/ runs its `main` through `run`.

It turns a `FinLoRAError` into one `error: ...` line on stderr and the error's exit
code, and it keeps the console for what matters: a few known-harmless lines that
libraries print on import (torchao's optional CUDA extensions that a CPU wheel cannot
load, torch's deprecation of a registration torchao still makes, bitsandbytes' optional
hub kernel for AVX512-BF16 CPUs) are silenced here. Scripts import this module first,
so the filters are in place before their command's module imports torch. Every other
warning is left alone."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Sequence

from finlora.errors import FinLoRAError


class _Drop(logging.Filter):
    def __init__(self, *fragments: str):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(f in msg for f in self.fragments)


def quiet_known_noise() -> None:
    # torchao ships kernels for CUDA builds (mxfp8, cutlass sm90a); loading them fails on a
    # CPU wheel and torchao logs each failure at WARNING although nothing needs them.
    logging.getLogger("torchao").addFilter(_Drop("Failed to load "))
    # torchao registers Enum classes as pytree constants, which torch 2.11+ deprecates.
    logging.getLogger("torch.utils._pytree").addFilter(_Drop("is an Enum subclass"))
    # bitsandbytes on an AVX512-BF16 CPU tries an optional 4-bit kernel from the hub and
    # falls back to its own when the hub is offline or the kernel is unsigned.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_Drop("kernels-community"))
    warnings.filterwarnings("ignore", message="Skipping publisher trust check", category=UserWarning)


quiet_known_noise()  # on import: a script's next import (its command's module) loads torch


def report(e: FinLoRAError) -> int:
    """Print `e` as the command line shows it; return its exit code."""
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run one command's `main`; map FinLoRAError to `error: ...` and its exit code."""
    try:
        return main(argv) or 0
    except FinLoRAError as e:
        return report(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


@contextmanager
def exit_on_error():
    """The same layer for our code inside another program's process (the Axolotl plugin's
    hooks, run by `axolotl train`): a FinLoRAError ends that process with `error: ...` and
    its exit code, as `run` would, not with a traceback through the host's frames."""
    try:
        yield
    except FinLoRAError as e:
        raise SystemExit(report(e)) from None
