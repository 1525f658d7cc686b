"""Plausible mistakes, each run as a user runs the script: one `error:` line (or
`interrupted`), the right exit code, no traceback, torch not loaded where no model is
involved, and, for every command that writes or replaces, the files that must survive
compared by hash before and after.

A case is (script and arguments, exit code, words of the last stderr line, torch allowed).
`{tmp}` in an argument is the test's folder, `{recipe:...}` a copy of the CPU default with
the given keys changed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEFAULT_RECIPE, ROOT, sha256

# Runs a script as `python scripts/x.py ...` does, and says at exit whether torch was imported.
HARNESS = ("import atexit, runpy, sys\n"
           "atexit.register(lambda: print('torch-loaded' if 'torch' in sys.modules else 'torch-not-loaded', "
           "file=sys.stderr))\n"
           "sys.argv = sys.argv[1:]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def recipe(tmp: Path, name: str = "r", **changes) -> str:
    cfg = yaml.safe_load(DEFAULT_RECIPE.read_text())
    cfg["output_dir"] = str(tmp / "out")
    cfg["dataset_prepared_path"] = str(tmp / "prepared")
    cfg.update(changes)
    p = tmp / f"{name}.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(p)


def run(tmp: Path, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    e.pop("FINLORA_MAKE", None)
    return subprocess.run([sys.executable, "-c", HARNESS, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=600)


def outcome(proc) -> tuple[int, str, bool]:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    torch = lines[-1] == "torch-loaded"
    said = [ln for ln in lines[:-1] if ln.startswith(("error:", "interrupted"))]
    return proc.returncode, (said[-1] if said else "\n".join(lines[-5:])), torch


# (id, script, arguments (a function of tmp), exit code, words, torch may be loaded)
CASES = [
    ("train GPUS=0", "train.py", lambda t: ["--gpus", "0"], 1, "GPUS must be a whole number of at least 1, got '0'", False),
    ("train GPUS=2.5", "train.py", lambda t: ["--gpus", "2.5"], 1, "got '2.5'", False),
    ("train NODES=2 without GPUS", "train.py", lambda t: ["--nodes", "2"], 1, "NODES=2 needs GPUS", False),
    ("train NODES=2 GPUS=1 without MACHINE_RANK", "train.py", lambda t: ["--nodes", "2", "--gpus", "1"], 1,
     "needs the machine rank and the main node's address (MACHINE_RANK and MASTER_ADDR", False),
    ("plan NODES=2 without GPUS", "plan.py", lambda t: ["sentiment_r8", "--nodes", "2"], 1, "NODES=2 needs GPUS", False),
    ("plan GPUS=abc", "plan.py", lambda t: ["sentiment_r8", "--gpus", "abc"], 1, "got 'abc'", False),
    ("params lora_r eight", "params.py", lambda t: [recipe(t, lora_r="eight")], 1, "lora_r: 'eight' is not a whole number",
     False),
    ("params lora_r 0", "params.py", lambda t: [recipe(t, lora_r=0)], 1, "lora_r: 0 must be at least 1", False),
    ("plan lora_r -4", "plan.py", lambda t: [recipe(t, lora_r=-4)], 1, "lora_r: -4 must be at least 1", False),
    ("recipe name with .yml", "params.py", lambda t: ["sentiment_r8.yml"], 0, "", True),
    ("train: lora_r eight, base not built", "train.py", lambda t: [recipe(t, lora_r="eight", base_model=f"{t}/no-base")],
     2, "lora_r: 'eight' is not a whole number", False),
    ("merge: missing base", "merge.py", lambda t: ["--base", f"{t}/nope", "--adapter", f"{t}/nope", "--out", f"{t}/o"], 1,
     "no such folder", False),
    ("merge: unknown recipe", "merge.py", lambda t: ["--recipe", "sentimnet_r8"], 1, "no recipe named 'sentimnet_r8'", False),
    ("data: out-dir is a file", "prepare_data.py", lambda t: ["--out-dir", str(Path(t, "f.txt"))], 1,
     "cannot write there", False),
    ("data: out-dir read-only", "prepare_data.py", lambda t: ["--out-dir", "/sys/finlora-data"], 1, "cannot write there",
     False),
    ("data: SRC does not exist", "prepare_data.py", lambda t: ["--src", f"{t}/nowhere", "--out-dir", f"{t}/d"], 1,
     "does not exist", False),
    ("infer --file missing", "infer.py", lambda t: ["--base", f"{t}/b", "--file", f"{t}/prompts.txt"], 1,
     "--file", False),
    ("eval: a recipe's set not prepared", "evaluate.py",
     lambda t: ["--recipe", "ner_r8", "--data-dir", f"{t}/empty", "--adapter", str(t)], 1,
     "`make data TASK=ner` writes it", False),
    ("eval: no adapter trained", "evaluate.py", lambda t: ["--recipe", recipe(t)], 1,
     "(no such folder): run `make train RECIPE=", False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_known_mistake_is_one_line_before_any_heavy_work(tmp_path, case):
    _, script, args, code, words, torch_ok = case
    (tmp_path / "f.txt").write_text("a user's file")
    (tmp_path / "empty").mkdir()
    before = sha256(tmp_path / "f.txt")
    proc = run(tmp_path, script, *args(tmp_path))
    rc, said, torch = outcome(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert rc == code, (rc, proc.stderr[-2000:])
    if code:
        assert said.startswith("error: ") and words in said, said
    if not torch_ok:
        assert not torch, f"torch was imported before the error: {said}"
    assert sha256(tmp_path / "f.txt") == before


def test_check_reads_as_ok_only_for_a_run_that_can_start(tmp_path, base_model_dir):
    """The cases where `make check` said OK for a run that would fail: each an error now."""
    (tmp_path / "a-file").write_text("x")
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"context": "Instruction: x\nInput: y\nAnswer: ", "target": "positive"}) + "\n")
    base = {"datasets": [{"path": str(data), "ds_type": "json", "type": {"field_instruction": "context",
                                                                         "field_output": "target"}}]}
    cases = [
        ({"output_dir": str(tmp_path / "a-file")}, [], "output_dir: ", "is a file, not a folder"),
        ({"output_dir": "/sys/finlora-run"}, [], "output_dir: ", "cannot be written"),
        ({"lora_r": 0}, [], "lora_r: 0 must be at least 1", ""),
        ({}, ["--lora-r", "0"], "ARGS --lora-r: lora_r: 0 must be at least 1", ""),
        ({}, ["--learning-rate", "abc"], "ARGS --learning-rate: learning_rate: 'abc' is not a number", ""),
    ]
    for changes, args, w1, w2 in cases:
        proc = run(tmp_path, "check.py", recipe(tmp_path, **base, **changes), *args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
        assert any(w1 in e and w2 in e for e in errors), (changes, args, errors)
        assert " OK" not in proc.stdout


def test_check_without_the_base_model_says_what_it_could_not_check(tmp_path):
    """A fresh clone has no base model yet: Axolotl's validation still runs (on the config.json
    shipped for it), `lora_r: "eight"` is caught, and what cannot run is named, never "OK"."""
    missing = tmp_path / "no-base"
    r = recipe(tmp_path, base_model=str(missing), lora_r="eight")
    proc = run(tmp_path, "check.py", r)
    assert proc.returncode == 1 and "lora_r: 'eight' is not a whole number" in proc.stderr
    proc = run(tmp_path, "check.py", recipe(tmp_path, "ok", base_model="./outputs/base/SmolLM2-135M-Instruct"))
    if not (ROOT / "outputs/base/SmolLM2-135M-Instruct").is_dir():
        assert "NOT checked" in proc.stdout and " OK" not in proc.stdout


def test_synthetic_training_data_is_a_warning(tmp_path):
    (tmp_path / "synthetic_sentiment_train.jsonl").write_text(
        json.dumps({"context": "Instruction: x\nInput: y\nAnswer: ", "target": "positive"}) + "\n")
    (tmp_path / "sentiment_cpu_train.jsonl").symlink_to("synthetic_sentiment_train.jsonl")
    r = recipe(tmp_path, datasets=[{"path": str(tmp_path / "sentiment_cpu_train.jsonl"), "ds_type": "json",
                                    "type": {"field_instruction": "context", "field_output": "target"}}])
    proc = run(tmp_path, "check.py", r)
    assert "is the SYNTHETIC smoke-test set" in proc.stdout + proc.stderr


INTERRUPTED_MERGE = """
import signal, sys, time
# Ctrl-C as in a terminal, whatever this test inherits (a job started in the background by a
# shell without job control, as CI runners may start one, ignores SIGINT, and Python keeps that)
signal.signal(signal.SIGINT, signal.default_int_handler)
from finlora.cli import run
from finlora.merge import merge
def pause(name):
    print("shard-done", flush=True)
    time.sleep(3600)
sys.exit(run(lambda argv: merge(sys.argv[1], sys.argv[2], sys.argv[3], max_shard_size="20KB", progress=False,
                                log=lambda m: None, on_shard=pause)))
"""


def test_ctrl_c_during_a_merge_is_interrupted_and_leaves_nothing(tmp_path):
    """Ctrl-C (SIGINT) between two output shards, a point the merge pauses at: exit 130,
    `interrupted`, no traceback, no output folder and no temporary one."""
    from test_merge import make_adapter, tiny_llama

    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_MERGE, str(base), str(adapter), str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "shard-done"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".merged.*"))


def test_infer_takes_a_prompt_file_from_make():
    out = subprocess.run(["make", "-n", "infer", "ARGS=--file prompts.txt"], cwd=ROOT, capture_output=True,
                         text=True).stdout
    line = next(ln for ln in out.splitlines() if "scripts/infer.py" in ln)
    assert "--file prompts.txt" in line and "--prompt" not in line
    out = subprocess.run(["make", "-n", "infer", "FILE=p.txt"], cwd=ROOT, capture_output=True, text=True).stdout
    assert '--file "p.txt"' in out and "--prompt" not in out


def test_base_model_out_refuses_a_folder_it_did_not_build(tmp_path):
    """`make base-model --out DIR` on a folder of the user's: refused before the 93 MB download."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "weights.bin").write_text("x")
    proc = run(tmp_path, "base_model.py", "--out", str(d), "--force")
    rc, said, _ = outcome(proc)
    assert rc == 1 and "holds no finlora_base_model.json" in said and "downloading" not in proc.stdout
    assert (d / "weights.bin").read_text() == "x"


def test_train_refuses_to_empty_a_prepared_path_holding_other_files(tmp_path):
    from finlora.errors import RefusedError
    from finlora.train import clear_prepared

    prepared = tmp_path / "prepared"
    (prepared / "abc123").mkdir(parents=True)
    (prepared / "abc123" / "state.json").write_text("{}")
    (prepared / "my_notes.txt").write_text("mine")
    with pytest.raises(RefusedError, match="holds my_notes.txt, which is not Axolotl's tokenised-data cache"):
        clear_prepared(prepared)
    assert (prepared / "my_notes.txt").is_file() and (prepared / "abc123" / "state.json").is_file()
    (prepared / "my_notes.txt").unlink()
    (prepared / "datasets_ready.flag").write_text("")
    clear_prepared(prepared)
    assert list(prepared.iterdir()) == []


def test_clean_outputs_lists_and_keeps_what_is_valuable_or_not_ours(tmp_path, monkeypatch, capsys):
    from finlora import clean

    out = tmp_path / "outputs"
    run_dir = out / "myrun"
    (run_dir / "checkpoint-20").mkdir(parents=True)
    (run_dir / "adapter_config.json").write_text("{}")
    (run_dir / "loss_log.jsonl").write_text("")  # what marks a `make train` folder (the plugin writes it)
    (run_dir / "prepared").mkdir()
    (run_dir / "merged").mkdir()
    (run_dir / "merged" / "merge_info.json").write_text("{}")
    (run_dir / "my-notes.txt").write_text("mine")
    (out / "base" / "SmolLM2").mkdir(parents=True)
    (out / "base" / "SmolLM2" / "finlora_base_model.json").write_text("{}")
    (out / "downloads").mkdir()
    monkeypatch.setattr(clean, "OUTPUTS", out)
    assert clean.main([]) == 0
    said = capsys.readouterr().out
    assert not (run_dir / "prepared").exists() and not (run_dir / "merged").exists()
    for kept in (run_dir / "checkpoint-20", run_dir / "adapter_config.json", run_dir / "my-notes.txt",
                 out / "base" / "SmolLM2", out / "downloads"):
        assert kept.exists(), kept
    assert "ALL=1 deletes it" in said and "not written by a project command" in said
    assert clean.main(["--all"]) == 0
    assert not (run_dir / "checkpoint-20").exists() and not (out / "base" / "SmolLM2").exists()
    assert (run_dir / "my-notes.txt").read_text() == "mine" and (out / "downloads").is_dir()


def test_clean_outputs_never_takes_a_folder_holding_a_users_file_nor_follows_a_link(tmp_path, monkeypatch, capsys):
    from finlora import clean

    out, elsewhere = tmp_path / "outputs", tmp_path / "elsewhere"
    run_dir = out / "myrun"
    (run_dir / "merged").mkdir(parents=True)
    (run_dir / "loss_log.jsonl").write_text("")
    for name in ("merge_info.json", "model.safetensors", "my_model.Q4.gguf"):  # a merge, and the user's own file
        (run_dir / "merged" / name).write_text("x")
    (run_dir / "prepared" / "abc").mkdir(parents=True)
    (run_dir / "prepared" / "mydata.arrow").write_text("x")  # not Axolotl's cache layout
    hub = out / "hub_adapter"  # a downloaded adapter: no mark of `make train`
    hub.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        (hub / name).write_text("x")
    (elsewhere / "run1").mkdir(parents=True)
    (elsewhere / "run1" / ".finlora-smoke").write_text("x")
    (out / "smoke").symlink_to(elsewhere)
    (out / "base").mkdir()
    (out / "base" / "SmolLM2").mkdir()
    (out / "base" / "SmolLM2" / "finlora_base_model.json").write_text('{"files": ["model.safetensors"]}')
    (out / "base" / "SmolLM2" / "my_lora").mkdir()
    monkeypatch.setattr(clean, "OUTPUTS", out)
    assert clean.main(["--all"]) == 0
    said = capsys.readouterr().out
    for kept in (run_dir / "merged" / "my_model.Q4.gguf", run_dir / "prepared" / "mydata.arrow",
                 hub / "adapter_model.safetensors", elsewhere / "run1" / ".finlora-smoke", out / "base" / "SmolLM2" / "my_lora"):
        assert kept.exists(), kept
    assert "a symbolic link: not followed" in said and "my_model.Q4.gguf" in said
