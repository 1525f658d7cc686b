"""The one command-line layer: every script in scripts/ is `sys.exit(run("finlora.<module>"))`.

`run` imports the command's module inside its own error handling, so a Ctrl-C while
torch loads is `interrupted` (exit 130) like one during the work. It turns a
`FinLoRAError` into one `error: ...` line on stderr and the error's exit code, and an
OSError that names a file (permission denied, read-only file system, no such file)
into one line naming that file, never a traceback.

It keeps the console for what matters: the known-harmless lines `quiet_known_noise` names are
silenced on import of this module, before any command imports torch; every other warning is left alone.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Callable, Sequence

from finlora.errors import FinLoRAError


def _drop(fragment: str) -> Callable[[logging.LogRecord], bool]:
    """A logging filter (any callable will do) that drops the records whose message holds `fragment`."""
    return lambda record: fragment not in record.getMessage()


def quiet_known_noise() -> None:
    # torchao ships kernels for CUDA builds (mxfp8, cutlass sm90a); loading them fails on a
    # CPU wheel and torchao logs each failure at WARNING although nothing needs them.
    logging.getLogger("torchao").addFilter(_drop("Failed to load "))
    # torchao registers Enum classes as pytree constants, which torch 2.11+ deprecates.
    logging.getLogger("torch.utils._pytree").addFilter(_drop("is an Enum subclass"))
    # bitsandbytes on an AVX512-BF16 CPU tries an optional 4-bit kernel from the hub and
    # falls back to its own when the hub is offline or the kernel is unsigned.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop("kernels-community"))
    warnings.filterwarnings("ignore", message="Skipping publisher trust check", category=UserWarning)
    # bitsandbytes logs this at every 8-bit matmul of a CPU model in fp32 (`make eval BITS=8`):
    # LLM.int8 takes fp16 inputs by design; 76,640 identical lines in one benchmark hid its bars.
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop("MatMul8bitLt: inputs will be cast"))


quiet_known_noise()


def flag(option: str, make: str | None = None) -> str:
    """How the user passes `option` from where they are: `ARGS=--force` (or the make
    variable `make`, e.g. `SRC=dir`) under `make`, which exports FINLORA_MAKE, else the
    script's own `--force`."""
    if os.environ.get("FINLORA_MAKE"):
        return make or f'ARGS="{option}"'
    return option


def report(e: FinLoRAError) -> int:
    """Print `e` as the command line shows it; return its exit code."""
    sys.stdout.flush()
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code


def run(main: str | Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run one command: `main` is a module name (its `main` is called) or a callable."""
    try:
        if isinstance(main, str):
            main = importlib.import_module(main).main
        return main(argv) or 0
    except FinLoRAError as e:
        return report(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head`: the reader left
        return 141
    except OSError as e:
        if not e.filename:
            raise
        sys.stdout.flush()
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 1


@contextmanager
def exit_on_error():
    """The same layer for our code inside another program's process (the Axolotl plugin's
    hooks, run by `axolotl train`): a FinLoRAError ends that process with `error: ...` and
    its exit code, as `run` would, not with a traceback through the host's frames."""
    try:
        yield
    except FinLoRAError as e:
        raise SystemExit(report(e)) from None
