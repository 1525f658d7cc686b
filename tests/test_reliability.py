"""A crash costs minutes, not the run: kill -9 mid-training, resume, same adapter;
and every writer of the project leaves the previous file when it is interrupted or
the disk is full."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import DEFAULT_RECIPE, ROOT, SENTIMENT_PROMPT, TINY_ROWS

# 16 rows, micro batch 2, no accumulation: 8 steps an epoch; 6 steps, a checkpoint every 2.
RESUME_ROWS = TINY_ROWS + [(t.replace(".", "!"), y) for t, y in TINY_ROWS]
RESUME_CFG = dict(micro_batch_size=2, gradient_accumulation_steps=1, max_steps=6, warmup_steps=0,
                  save_strategy="steps", save_steps=2, save_total_limit=3)
# Relative tolerance on the final lora_B tensors of a resumed vs an uninterrupted run.
# Same seed, same data order, same steps; the optimizer, scheduler and RNG states come
# back from the checkpoint, so only floating-point summation order (oneDNN/OpenMP thread
# scheduling) may differ. Measured on 2 CPU cores: bitwise equal (max abs diff 0) once
# the FinLoRA plugin seeds before the LoRA init; the bound allows other BLAS/thread setups.
RESUME_RTOL = 1e-5

# Secrets planted in the environment of a training run; built at run time so that
# this file itself holds no token-shaped string.
FAKE_SECRETS = {
    "HF_TOKEN": "hf_" + "FAKE" + "0123456789abcdefABCDEF" * 2,
    "WANDB_API_KEY": "fake-wandb-" + "k3y" * 6,
    "FINLORA_DB_PASSWORD": "correct-horse-" + "battery-staple",
}


def write_recipe(work: Path, rows, name: str = "tiny.yml", **overrides) -> Path:
    """The default recipe, unchanged but for data, size and output folder (as conftest.train_tiny)."""
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"context": SENTIMENT_PROMPT.format(text=t), "target": y}) + "\n"
                            for t, y in rows))
    cfg = yaml.safe_load(DEFAULT_RECIPE.read_text())
    cfg["datasets"][0]["path"] = str(data)
    cfg["output_dir"] = str(work / "out")
    cfg["dataset_prepared_path"] = str(work / "prepared")
    cfg.update(overrides)
    recipe = work / name
    recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return recipe


def train_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


_REFERENCE: dict = {}


def reference_run_once(tmp_path_factory) -> dict:
    """One uninterrupted 6-step run with fake secrets in its environment, shared by
    the resume test (reference adapter) and test_security (redaction)."""
    if not _REFERENCE:
        work = tmp_path_factory.mktemp("reference_run")
        # Put a secret where Axolotl prints it: its config dump (stdout and debug.log)
        # shows every key, wandb_name included (wandb itself stays disabled).
        recipe = write_recipe(work, RESUME_ROWS, **RESUME_CFG, wandb_name=FAKE_SECRETS["HF_TOKEN"])
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe)], cwd=ROOT,
                              env=train_env(**FAKE_SECRETS), capture_output=True, timeout=900)
        (work / "train.log").write_bytes(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"reference run failed:\n{proc.stderr[-3000:].decode(errors='replace')}"
        _REFERENCE.update(work=work, out=work / "out", recipe=recipe, stdout=proc.stdout, stderr=proc.stderr,
                          secrets=dict(FAKE_SECRETS), seconds=time.time() - t0)
    return _REFERENCE


@pytest.fixture(scope="session")
def reference_run(base_model_dir, tmp_path_factory) -> dict:
    return reference_run_once(tmp_path_factory)


# --------------------------------------------------------------------------- kill -9 and resume


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(reference_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    from finlora.check import checkpoint_problems, list_checkpoints

    work = tmp_path / "killed"
    recipe = write_recipe(work, RESUME_ROWS, **RESUME_CFG)
    out = work / "out"
    log = open(work / "train.log", "wb")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe)], cwd=ROOT,
                            env=train_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_at = None
    deadline = time.time() + 900
    try:
        while proc.poll() is None and time.time() < deadline:
            done = [(n, p) for n, p in list_checkpoints(out) if n < 6 and not checkpoint_problems(p)]
            if done:
                os.killpg(proc.pid, signal.SIGKILL)  # the whole group: train.py, axolotl, accelerate
                killed_at = done[-1][0]
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed_at is not None, "training ended before a checkpoint could be killed:\n" + \
        (work / "train.log").read_text()[-2000:]
    assert not (out / "adapter_model.safetensors").exists(), "killed run should not have a final adapter"

    # A crash in the middle of the next save: weights written, optimizer.pt cut short,
    # no trainer_state.json. It must never be resumed from.
    good = out / f"checkpoint-{killed_at}"
    partial = out / "checkpoint-5"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(good, partial)
    (partial / "trainer_state.json").unlink()
    opt = (good / "optimizer.pt").read_bytes()
    (partial / "optimizer.pt").write_bytes(opt[: len(opt) // 2])
    assert checkpoint_problems(partial) and not checkpoint_problems(good)

    proc = subprocess.run(["make", "-s", "train", f"RECIPE={recipe}", "RESUME=1"], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=900)
    (work / "resume.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {good}" in proc.stdout or f"checkpoint-{killed_at}" in proc.stdout
    assert "checkpoint-5 is incomplete" in proc.stdout
    assert (out / "incomplete-checkpoint-5").is_dir() and not (out / "checkpoint-5").exists()

    ref = load_file(reference_run["out"] / "adapter_model.safetensors")
    res = load_file(out / "adapter_model.safetensors")
    assert ref.keys() == res.keys()
    worst_abs, worst_rel = 0.0, 0.0
    for k in ref:
        if ".lora_B." not in k:
            assert torch.equal(ref[k], res[k]) or torch.allclose(ref[k], res[k], rtol=RESUME_RTOL, atol=0), k
            continue
        diff = (ref[k].float() - res[k].float()).abs().max().item()
        scale = ref[k].float().abs().max().item()
        assert scale > 0, f"{k} did not train"
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
    print(f"\nresume after kill at step {killed_at}: lora_B max abs diff {worst_abs:.3g}, "
          f"max relative diff {worst_rel:.3g} (tolerance {RESUME_RTOL:g})")
    assert worst_rel <= RESUME_RTOL

    # the loss log is rebuilt from the restored trainer state: all six steps, same losses
    rows = [json.loads(x) for x in (out / "loss_log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(x) for x in (reference_run["out"] / "loss_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(rows, ref_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a, b)


# --------------------------------------------------------------------------- interrupted writers


def no_temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".tmp" in p.name]


def test_write_jsonl_interrupted_mid_generator_keeps_previous(tmp_path):
    from finlora.atomic import write_jsonl

    f = tmp_path / "data.jsonl"
    write_jsonl(f, [{"a": 1}, {"a": 2}])
    before = f.read_bytes()

    def rows():
        yield {"a": 3}
        raise KeyboardInterrupt  # Ctrl-C in the middle of the file

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(f, rows())
    assert f.read_bytes() == before
    assert no_temp_files(tmp_path) == []


def test_write_json_failing_mid_dump_keeps_previous(tmp_path):
    from finlora.atomic import write_json

    f = tmp_path / "report.json"
    write_json(f, {"ok": True})
    before = f.read_bytes()
    with pytest.raises(TypeError):
        write_json(f, {"fine": 1, "bad": object()})  # json.dump fails half way through
    assert f.read_bytes() == before
    assert no_temp_files(tmp_path) == []


def test_loss_plot_failing_savefig_keeps_previous(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from finlora.loss_curve import plot_loss

    png = tmp_path / "loss.png"
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    plot_loss(rows, png, title="t")
    before = png.read_bytes()

    def broken(self, f, *a, **k):
        f.write(b"\x89PNG half a picture")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError):
        plot_loss(rows + [{"step": 3, "loss": 1.0}], png, title="t")
    assert png.read_bytes() == before
    assert no_temp_files(tmp_path) == []


def test_loss_log_callback_interrupted_keeps_previous(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import finlora.atomic as atomic
    from finlora.axolotl_plugin import LossLogCallback

    cb = LossLogCallback(tmp_path)
    state = SimpleNamespace(is_world_process_zero=True, log_history=[{"step": 1, "loss": 2.0}])
    cb.on_log(None, state, None)
    before = (tmp_path / "loss_log.jsonl").read_bytes()
    real_dumps = json.dumps

    def dumps(obj, **kw):
        if obj.get("step") == 2:
            raise MemoryError
        return real_dumps(obj, **kw)

    monkeypatch.setattr(atomic.json, "dumps", dumps)
    state.log_history.append({"step": 2, "loss": 1.0})
    with pytest.raises(MemoryError):
        cb.on_log(None, state, None)
    assert (tmp_path / "loss_log.jsonl").read_bytes() == before
    assert no_temp_files(tmp_path) == []


def test_data_preparation_killed_keeps_previous_files(tmp_path, monkeypatch):
    """`make data` writes tests, train, then stats: an exception while writing the
    train file leaves every earlier file of the previous run as it was."""
    from finlora.data import defaults

    out = tmp_path / "data"
    defaults.prepare_default(out_dir=out, hub=False)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink()}
    assert any(p.parent.name == "train" for p in files)

    from finlora.data import pipeline

    real = pipeline.write_examples
    calls = {"n": 0}

    def dying(path, examples):
        calls["n"] += 1
        if path.parent.name == "train":
            def gen():
                for i, e in enumerate(examples):
                    if i == 10:
                        raise KeyboardInterrupt  # killed mid-file
                    yield e
            return real(path, gen())
        return real(path, examples)

    monkeypatch.setattr(pipeline, "write_examples", dying)
    with pytest.raises(KeyboardInterrupt):
        defaults.prepare_default(out_dir=out, hub=False, seed=7)  # a different split: different bytes
    assert calls["n"] >= 1
    for p, data in files.items():
        if p.parent.name == "train" or p.parent.name == "stats":
            assert p.read_bytes() == data, f"{p} changed"
    assert no_temp_files(out) == []


def test_atomic_dir_interrupted_keeps_previous(tmp_path):
    from finlora.atomic import atomic_dir

    dest = tmp_path / "merged"
    with atomic_dir(dest) as d:
        (d / "model.safetensors").write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest, replace=lambda p: None) as d:
            (d / "model.safetensors").write_bytes(b"new, half")
            raise RuntimeError("killed")
    assert (dest / "model.safetensors").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_dir_removes_only_what_a_killed_run_left(tmp_path):
    """A SIGKILL leaves the hidden temp folder (its name carries its pid); the next atomic_dir to
    the same destination removes it, and no temp folder of a live process or of another name."""
    from finlora.atomic import atomic_dir

    gone = subprocess.Popen([sys.executable, "-c", ""])
    gone.wait()
    left, live, other = (tmp_path / f".merged.{gone.pid}.abcd1234.tmp", tmp_path / f".merged.{os.getppid()}.x.tmp",
                         tmp_path / ".merged.abcd1234.tmp")
    for d in (left, live, other):
        d.mkdir()
    told = []
    with atomic_dir(tmp_path / "merged", on_stale=told.append) as d:
        (d / "model.safetensors").write_bytes(b"new")
    assert told == [left] and not left.exists() and live.is_dir() and other.is_dir()


# --------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs when this machine lets us mount one (root), else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill_with(monkeypatch, folder):
    """Without a tmpfs: files opened for writing fail with ENOSPC once 64 KiB went in."""

    class FullFile:
        def __init__(self, f):
            self._f, self._n = f, 0

        def write(self, data):
            self._n += len(data)
            if self._n > 64 << 10:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    real = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullFile(real(*a, **k)))


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
@pytest.mark.parametrize("writer", ["jsonl", "json"])
def test_full_disk_clear_error_and_previous_kept(writer, how, small_disk, tmp_path, monkeypatch):
    from finlora.atomic import DiskFullError, write_json, write_jsonl

    if how == "tmpfs" and small_disk is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the injected variant covers it")
    if how == "injected":
        small_disk = None
    folder = small_disk or (tmp_path / "small")
    target = folder / ("data.jsonl" if writer == "jsonl" else "report.json")
    small = [{"i": i} for i in range(10)]
    big = [{"i": i, "text": "x" * 1000} for i in range(2000)]  # ~2 MB: more than the disk holds
    (write_jsonl if writer == "jsonl" else write_json)(target, small)
    before = target.read_bytes()
    if small_disk is None:
        _fill_with(monkeypatch, folder)
    with pytest.raises(DiskFullError) as e:
        (write_jsonl if writer == "jsonl" else write_json)(target, big)
    msg = str(e.value)
    assert msg == f"no space left on device writing {target}; previous {target.name} kept"
    assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
    assert target.read_bytes() == before
    assert no_temp_files(folder) == []
    print(f"\nfull disk simulated with {'a 1 MiB tmpfs' if small_disk else 'an ENOSPC-raising writer'}")
