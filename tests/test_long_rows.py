"""A row longer than sequence_len never vanishes unseen (the FinLoRA plugin's report).

Real Axolotl data path (`axolotl preprocess`: tokenizer, prompt strategy, length filter)
on the local SmolLM2 base, a tiny dataset with one long row at line 4."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, TINY_ROWS, tiny_recipe

pytestmark = pytest.mark.slow

LONG = ("Revenue grew and margins widened. " * 120, "positive")


def preprocess(tmp_path, **overrides) -> subprocess.CompletedProcess:
    recipe, _ = tiny_recipe(tmp_path, TINY_ROWS[:3] + [LONG] + TINY_ROWS[3:], **overrides)
    return subprocess.run([sys.executable, "-m", "axolotl.cli.preprocess", str(recipe)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def test_dropped_row_is_named_by_file_and_line(base_model_dir, tmp_path):
    proc = preprocess(tmp_path)  # Axolotl's default: excess_length_strategy drop
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = tmp_path / "train.jsonl"
    assert f"1 of 9 rows of {data} are longer than sequence_len 256" in proc.stderr
    assert "left out of training (excess_length_strategy: drop)" in proc.stderr
    assert f"{data}:4: " in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "out" / "long_rows.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rows] == [(str(data), 4)] and rows[0]["tokens"] > 256


def test_raise_stops_the_run_naming_the_row(base_model_dir, tmp_path):
    proc = preprocess(tmp_path, excess_length_strategy="raise")
    assert proc.returncode != 0
    assert "excess_length_strategy: raise stops the run" in proc.stderr
    assert f"{tmp_path / 'train.jsonl'}:4: " in proc.stderr


def test_a_run_on_axolotls_prepared_data_keeps_the_list(base_model_dir, tmp_path):
    """`axolotl preprocess`, then `axolotl train` on its prepared cache: Axolotl does not
    tokenise again, so the plugin sees no rows; the list made with that cache must stay."""
    assert preprocess(tmp_path).returncode == 0
    listed = (tmp_path / "out" / "long_rows.jsonl").read_text()
    proc = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(tmp_path / "tiny.yml")], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "are longer than sequence_len" not in proc.stderr  # the cache was reused, not re-tokenised
    assert (tmp_path / "out" / "long_rows.jsonl").read_text() == listed
