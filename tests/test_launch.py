"""How `make train` launches on GPU nodes: process count, GPU choice, global batch, SLURM.

No GPU here: the device count is faked (finlora.train.cuda_device_count) and the
launch itself is recorded instead of run; what is checked is the command and the
environment finlora/train.py hands to Axolotl. The accelerate config is run through
accelerate's own launcher code; scripts/slurm_train.sh runs under bash with fake SLURM
variables and stub `srun`/`scontrol`/`make`/`accelerate` on PATH (no SLURM here).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from finlora import ROOT
from finlora import train as ft


@pytest.fixture
def gpu_recipe(tmp_path) -> Path:
    """sentiment_r8 as generated, with its data and outputs under tmp_path."""
    cfg = yaml.safe_load((ROOT / "recipes" / "sentiment_r8.yml").read_text())
    data = tmp_path / "train.jsonl"
    data.write_text('{"context": "Is this good? Answer: ", "target": "yes"}\n')
    cfg["datasets"][0]["path"] = str(data)
    cfg["output_dir"] = str(tmp_path / "out")
    cfg["dataset_prepared_path"] = str(tmp_path / "prepared")
    p = tmp_path / "sentiment_r8.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def launch(monkeypatch, capsys, recipe: Path, args: list[str], devices: int, env: dict | None = None):
    """Run `make train`'s main up to the launch; return (command, environment, stdout)."""
    seen = {}

    def record(cmd, env):
        seen["cmd"], seen["env"] = cmd, env
        return 1  # "failed": main returns before looking for an adapter

    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(ft, "cuda_device_count", lambda: devices)
    monkeypatch.setattr(ft, "run_axolotl", record)
    assert ft.main(["--no-check", *args, str(recipe)]) == 1
    return seen["cmd"], seen["env"], capsys.readouterr().out


def _value(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def test_no_gpus_given_on_an_8_gpu_node_is_one_process_on_the_first_visible_gpu(monkeypatch, capsys, gpu_recipe):
    cmd, env, out = launch(monkeypatch, capsys, gpu_recipe, [], devices=8,
                           env={"CUDA_VISIBLE_DEVICES": "5,6,7"})
    # before: `axolotl train`, which lets accelerate start one process per visible GPU
    assert cmd[:4] == ["accelerate", "launch", "--config_file", "recipes/accelerate/single_gpu.yaml"]
    assert _value(cmd, "--num_processes") == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # one GPU visible: no DataParallel, no spread
    assert "one process on GPU 5 (GPUS unset; 8 GPUs visible: GPUS=8 trains on all of them)" in out
    assert "global batch 64 = micro batch 8 x accumulation 8" in out
    assert "--gradient-accumulation-steps" not in cmd


def test_cpu_machine_keeps_axolotl_train(monkeypatch, capsys, gpu_recipe):
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, [], devices=0)
    assert cmd[:2] == ["axolotl", "train"] and "--gradient-accumulation-steps" not in cmd
    assert "one process" not in out


def test_gpus_n_keeps_finloras_global_batch(monkeypatch, capsys, gpu_recipe):
    cmd, env, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "4"], devices=8,
                           env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert _value(cmd, "--num_processes") == "4" and "recipes/accelerate/multi_gpu.yaml" in cmd
    # FinLoRA's own setting: 8 per GPU x 2 accumulation x 4 GPUs = 64
    assert _value(cmd, "--gradient-accumulation-steps") == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "global batch 64 = micro batch 8 x accumulation 2 x 4 processes (the recipe's 8 x 8 on one process)" in out


def test_gpus_that_do_not_divide_the_accumulation_print_the_change(monkeypatch, capsys, gpu_recipe):
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "3"], devices=3)
    assert _value(cmd, "--gradient-accumulation-steps") == "3"
    assert ("global batch CHANGES to 72 = micro batch 8 x accumulation 3 x 3 processes, from the recipe's 64 "
            "(8 x 8 on one process): 3 processes do not divide accumulation 8") in out


def test_nodes_count_in_the_global_batch(monkeypatch, capsys, gpu_recipe):
    env = {"MACHINE_RANK": "0", "MASTER_ADDR": "node001"}
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "2", "--nodes", "2"], devices=2, env=env)
    assert "recipes/accelerate/multi_node.yaml" in cmd
    assert _value(cmd, "--num_processes") == "4" and _value(cmd, "--gradient-accumulation-steps") == "2"
    assert "global batch 64 = micro batch 8 x accumulation 2 x 4 processes" in out


def test_explicit_accumulation_override_is_kept_and_reported(monkeypatch, capsys, gpu_recipe):
    seen = {}
    monkeypatch.setattr(ft, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(ft, "run_axolotl", lambda cmd, env: seen.setdefault("cmd", cmd) and 1)
    assert ft.main(["--no-check", "--gpus", "4", str(gpu_recipe), "--gradient-accumulation-steps", "4"]) == 1
    out = capsys.readouterr().out
    assert seen["cmd"].count("--gradient-accumulation-steps") == 1 and _value(seen["cmd"], "--gradient-accumulation-steps") == "4"
    assert "global batch CHANGES to 128" in out and "--gradient-accumulation-steps is given" in out


# --------------------------------------------------------------------------- accelerate


def test_single_gpu_config_respects_cuda_visible_devices(monkeypatch):
    """accelerate's own launcher code with our config: GPUS=1 under CUDA_VISIBLE_DEVICES=5 stays on 5."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "recipes/accelerate/single_gpu.yaml"), "--num_processes", "1",
         "-m", "axolotl.cli.train", "recipes/sentiment_r8.yml"])
    args, _, _ = _validate_launch_command(args)  # reads the config file into args, as `accelerate launch` does
    assert args.gpu_ids == "all"
    _, env = prepare_simple_launcher_cmd_env(args)
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # with `gpu_ids: "0"` accelerate set it to 0
