"""benchmarks.gpu_wheels without the network: every wheel it carries is pinned by the lock, the
bitsandbytes slimming keeps a valid wheel, and scripts/gpu_check.sh parses. (The Python 3.12
proof that the set suffices, scripts/gpu_proof_py312.sh, is run by hand: docs/GPU_CHECK.md.)"""

from __future__ import annotations

import subprocess
import zipfile

from benchmarks import gpu_wheels
from finlora import ROOT


def test_every_carried_wheel_is_pinned_by_the_lock():
    pins = gpu_wheels.pins()
    assert set(pins) == set(gpu_wheels.WHEELS)
    assert pins["axolotl"] == "axolotl==0.19.0"
    assert pins["bitsandbytes"] == "bitsandbytes==0.50.2"
    assert gpu_wheels.SDIST_ONLY <= set(gpu_wheels.WHEELS)


def test_slim_drops_other_cuda_versions_and_their_record_lines(tmp_path):
    keep = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
            "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_cuda132.so"]
    drop = ["bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda128.so",
            "bitsandbytes/libbitsandbytes_rocm72.so", "bitsandbytes/libbitsandbytes_xpu2026.so"]
    record = "bitsandbytes-0.50.2.dist-info/RECORD"
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in keep + drop:
            z.writestr(name, b"x" * 1000)
        z.writestr(record, "".join(f"{n},sha256=abc,1000\n" for n in keep + drop) + f"{record},,\n")
    saved = gpu_wheels.slim(wheel, gpu_wheels.SLIM["bitsandbytes"])
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == sorted(keep + [record])
        lines = z.read(record).decode().splitlines()
    assert [line.split(",")[0] for line in lines] == keep + [record]


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_proof_py312.sh")]).returncode == 0
