"""`make setup GPU=1` installs from wheels and compiles no CUDA code: proven with pip's
own resolver (a dry run of the exact Makefile lines; nothing is installed)."""

from __future__ import annotations

import importlib.metadata
import urllib.request

import pytest
from packaging.requirements import Requirement

from finlora import gpu_install as gi


def source_dists_allowed() -> set[str]:
    """The packages requirements-gpu.txt lets pip build from source (its --no-binary line)."""
    import re

    from packaging.utils import canonicalize_name

    names: set[str] = set()
    for line in gi.REQUIREMENTS_GPU.read_text(encoding="utf-8").splitlines():
        m = re.match(r"--no-binary[ =](\S+)", line.split("#", 1)[0].strip())
        if m:
            names |= {canonicalize_name(n) for n in m.group(1).split(",") if n}
    return names


def test_make_setup_gpu_runs_the_two_steps_with_no_flash_attn_and_deepspeed_against_torch():
    import subprocess

    from finlora import ROOT

    dry = subprocess.run(["make", "-n", "-B", "setup", "GPU=1"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "-m finlora.gpu_install --install" in dry  # the Makefile runs the module's steps
    text = "\n".join(" ".join(c) for c in gi.STEPS)
    assert "flash-attn" not in text and "flash_attn" not in text
    assert not [ln for ln in gi.REQUIREMENTS_GPU.read_text().splitlines()
                if "flash" in ln.split("#")[0]]
    # step 1: binary-only requirements with the GPU lock; step 2: deepspeed, no build isolation
    assert gi.STEPS[0] == ["-r", "requirements-gpu.txt", "-c", "constraints-gpu.txt"]
    assert "--no-build-isolation" in gi.STEPS[-1] and gi.STEPS[-1][-1] == "deepspeed"
    assert all(a in gi.STEPS[-1] for a in gi.STEPS[0])
    lines = [ln.split("#")[0].strip() for ln in gi.REQUIREMENTS_GPU.read_text().splitlines()]
    assert "--only-binary :all:" in lines
    assert "deepspeed" in source_dists_allowed()


def test_gpu_lock_matches_the_cpu_lock_and_axolotls_deepspeed_range():
    gpu, cpu = gi.pins(gi.CONSTRAINTS_GPU), gi.pins(gi.CONSTRAINTS_CPU)
    differ = {n: (cpu[n], gpu[n]) for n in cpu.keys() & gpu.keys() if cpu[n] != gpu[n]}
    # the CUDA torch wheel pins its own triton; every other library is the tested CPU version
    assert set(differ) <= {"triton"}, differ
    assert not set(cpu) - set(gpu), "packages of the CPU lock missing from the GPU lock"
    extra = [Requirement(r) for r in importlib.metadata.requires("axolotl") or []
             if "deepspeed" in r and 'extra == "deepspeed"' in r]
    ds = next(r for r in extra if r.name == "deepspeed")
    assert ds.specifier.contains(gpu["deepspeed"]), (gpu["deepspeed"], str(ds.specifier))
    assert "flash-attn" not in gpu


def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen("https://pypi.org/simple/deepspeed/", timeout=15) as r:
            return r.status == 200
    except OSError:
        return False


def test_pip_resolver_installs_the_gpu_stack_from_wheels_except_pure_python_sdists():
    if not _pypi_reachable():
        pytest.skip("pip cannot reach https://pypi.org (the dry run needs the index)")
    items = gi.dry_run()  # ~2 min: metadata of ~270 packages; deepspeed's setup.py runs once
    names = {i.name: i for i in items}
    sources = {i.name for i in items if not i.is_wheel}
    # only what requirements-gpu.txt names may be built, and each of those is pure Python
    assert sources <= source_dists_allowed(), sources - source_dists_allowed()
    assert "deepspeed" in sources and "flash-attn" not in names
    # the CUDA build of torch (PyPI's Linux wheel brings the CUDA runtime as wheels)
    assert names["torch"].version == "2.13.0" and names["torch"].is_wheel
    assert any(n.startswith("nvidia-cuda-runtime") for n in names)
    assert names["bitsandbytes"].is_wheel and names["triton"].is_wheel
    # the lock is what the resolver picks: `make setup GPU=1` reproduces it
    lock = {n: v for n, v in gi.pins(gi.CONSTRAINTS_GPU).items() if n not in gi.NO_DEPS}
    resolved = {i.name: i.version for i in items}
    assert resolved == lock, {n: (resolved.get(n), lock.get(n))
                              for n in resolved.keys() | lock.keys() if resolved.get(n) != lock.get(n)}
