"""How `make train` launches on GPU nodes: process count, GPU choice, global batch, SLURM.

No GPU here: the device count is faked (finlora.launch.cuda_device_count) and the
launch itself is recorded instead of run; what is checked is the command and the
environment finlora/train.py hands to Axolotl. The accelerate config is run through
accelerate's own launcher code; scripts/slurm_train.sh runs under bash with fake SLURM
variables and stub `srun`/`scontrol`/`make`/`accelerate` on PATH (no SLURM here).
"""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from finlora import ROOT
from finlora import launch as fl
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
    monkeypatch.setattr(fl, "cuda_device_count", lambda: devices)
    monkeypatch.setattr(fl, "run_axolotl", record)
    assert ft.main(["--no-check", *args, str(recipe)]) == 1
    return seen["cmd"], seen["env"], capsys.readouterr().out


def _value(cmd: list[str], flag: str) -> str | None:
    return cmd[cmd.index(flag) + 1] if flag in cmd else None


def given(cmd: list[str]) -> dict:
    """The config Axolotl reads: the file the command ends with."""
    return yaml.safe_load(Path(ROOT, cmd[-1]).read_text())


def test_no_gpus_given_on_an_8_gpu_node_is_one_process_on_the_first_visible_gpu(monkeypatch, capsys, gpu_recipe):
    cmd, env, out = launch(monkeypatch, capsys, gpu_recipe, [], devices=8,
                           env={"CUDA_VISIBLE_DEVICES": "5,6,7"})
    # before: `axolotl train`, which lets accelerate start one process per visible GPU
    assert cmd[:4] == ["accelerate", "launch", "--config_file", "recipes/accelerate/single_gpu.yaml"]
    assert _value(cmd, "--num_processes") == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # one GPU visible: no DataParallel, no spread
    assert "one process on GPU 5 (GPUS unset; 8 GPUs visible: GPUS=8 trains on all of them)" in out
    assert "global batch 64 = micro batch 8 x accumulation 8" in out
    assert cmd[-1] == str(gpu_recipe)  # nothing added: Axolotl reads the recipe itself


def test_nodes_1_without_gpus_is_one_process_on_one_gpu_too(monkeypatch, capsys, gpu_recipe):
    cmd, env, _ = launch(monkeypatch, capsys, gpu_recipe, ["--nodes", "1"], devices=4,
                         env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert _value(cmd, "--num_processes") == "1" and env["CUDA_VISIBLE_DEVICES"] == "0"


def test_cpu_machine_keeps_axolotl_train(monkeypatch, capsys, gpu_recipe):
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, [], devices=0)
    assert cmd == ["axolotl", "train", str(gpu_recipe)]
    assert "one process" not in out


def test_gpus_n_keeps_finloras_global_batch(monkeypatch, capsys, gpu_recipe):
    cmd, env, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "4"], devices=8,
                           env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert _value(cmd, "--num_processes") == "4" and "recipes/accelerate/multi_gpu.yaml" in cmd
    # FinLoRA's own setting: 8 per GPU x 2 accumulation x 4 GPUs = 64
    assert given(cmd)["gradient_accumulation_steps"] == 2
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    assert "global batch 64 = micro batch 8 x accumulation 2 x 4 processes (the recipe's 8 x 8 on one process)" in out


def test_gpus_that_do_not_divide_the_accumulation_print_the_change(monkeypatch, capsys, gpu_recipe):
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "3"], devices=3)
    assert given(cmd)["gradient_accumulation_steps"] == 3
    assert ("global batch CHANGES to 72 = micro batch 8 x accumulation 3 x 3 processes, from the recipe's 64 "
            "(8 x 8 on one process): 3 processes do not divide accumulation 8") in out


def test_nodes_count_in_the_global_batch(monkeypatch, capsys, gpu_recipe):
    env = {"MACHINE_RANK": "0", "MASTER_ADDR": "node001"}
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "2", "--nodes", "2"], devices=2, env=env)
    assert "recipes/accelerate/multi_node.yaml" in cmd
    assert _value(cmd, "--num_processes") == "4" and given(cmd)["gradient_accumulation_steps"] == 2
    assert "global batch 64 = micro batch 8 x accumulation 2 x 4 processes" in out


def test_a_batch_size_recipe_keeps_its_global_batch(monkeypatch, capsys, gpu_recipe):
    """Axolotl derives the accumulation from `batch_size` when the recipe gives no accumulation."""
    cfg = yaml.safe_load(gpu_recipe.read_text())
    del cfg["gradient_accumulation_steps"]
    cfg.update(micro_batch_size=2, batch_size=16)
    gpu_recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd, _, out = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "4"], devices=4)
    assert (given(cmd)["gradient_accumulation_steps"], given(cmd)["batch_size"]) == (2, 4)  # x 4: Axolotl's 16
    assert "global batch 16 = micro batch 2 x accumulation 2 x 4 processes (the recipe's 2 x 8 on one process)" in out


def test_explicit_accumulation_override_is_kept_and_reported(monkeypatch, capsys, gpu_recipe):
    seen = {}
    monkeypatch.setattr(fl, "cuda_device_count", lambda: 4)
    monkeypatch.setattr(fl, "run_axolotl", lambda cmd, env: seen.setdefault("cmd", cmd) and 1)
    assert ft.main(["--no-check", "--gpus", "4", str(gpu_recipe), "--gradient-accumulation-steps", "4"]) == 1
    out = capsys.readouterr().out
    assert given(seen["cmd"])["gradient_accumulation_steps"] == 4
    assert "global batch CHANGES to 128" in out and "--gradient-accumulation-steps is given" in out


def test_axolotl_reads_the_overrides_as_make_check_read_them(monkeypatch, capsys, gpu_recipe, tmp_path):
    """Axolotl's own command lines parse ARGS otherwise (click on a CPU: `--max_steps` is unknown,
    `--load-in-8bit false` a flag and a stray word; fire under accelerate): it gets a file instead."""
    seen = {}
    monkeypatch.setattr(fl, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(fl, "run_axolotl", lambda cmd, env: seen.setdefault("cmd", cmd) and 1)
    assert ft.main(["--no-check", str(gpu_recipe), "--max_steps", "3", "--learning-rate=1e-4",
                    "--load-in-8bit", "false", "--save-steps", "0.5"]) == 1
    cmd = seen["cmd"]
    assert cmd[:2] == ["axolotl", "train"] and len(cmd) == 3 and cmd[2] == str(tmp_path / "out" / "train_config.yml")
    cfg = given(cmd)
    assert (cfg["max_steps"], cfg["learning_rate"], cfg["load_in_8bit"], cfg["save_steps"]) == (3, 1e-4, False, 0.5)
    assert {k: v for k, v in cfg.items() if k not in ("max_steps", "learning_rate", "load_in_8bit", "save_steps")} == \
        {k: v for k, v in yaml.safe_load(gpu_recipe.read_text()).items()
         if k not in ("max_steps", "learning_rate", "load_in_8bit", "save_steps")}


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


def test_each_node_gets_its_own_prepared_data_folder(monkeypatch, capsys, gpu_recipe, tmp_path):
    env = {"MACHINE_RANK": "1", "MASTER_ADDR": "node001"}
    (tmp_path / "prepared").mkdir()  # another node's cache: this node must not delete it
    cmd, _, _ = launch(monkeypatch, capsys, gpu_recipe, ["--gpus", "8", "--nodes", "2"], devices=8, env=env)
    assert Path(cmd[-1]).name == "train_config.node1.yml"  # nodes may share the output folder
    assert given(cmd)["dataset_prepared_path"] == f"{tmp_path / 'prepared'}-node1"
    assert (tmp_path / "prepared").is_dir()


# --------------------------------------------------------------------------- SLURM

SLURM = ROOT / "scripts" / "slurm_train.sh"


def _stubs(tmp_path: Path) -> Path:
    """srun (runs its command once per node), scontrol, make and python that log their calls."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    stubs = {
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\n'
                'for n in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$n "$@" || exit $?; done',
        # a long node list: `scontrol ... | head -n 1` would die of SIGPIPE under pipefail
        "scontrol": '[ "$1 $2" = "show hostnames" ] && printf "gpu-a01\\ngpu-a02\\n" && seq 200000',
        "make": f'echo "make $*" >> {log}',
        "python": f'echo "python $* MACHINE_RANK=$MACHINE_RANK MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" >> {log}',
    }
    for name, body in stubs.items():
        p = bin_ / name
        p.write_text("#!/usr/bin/env bash\n" + body + "\n")
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return bin_


def _run_slurm(tmp_path, args=(), **env):
    bin_ = _stubs(tmp_path)
    base = {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path), "VENV_BIN": str(bin_)}
    proc = subprocess.run(["bash", str(SLURM), *args], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60)
    log = tmp_path / "calls.log"
    return proc, (log.read_text().splitlines() if log.is_file() else [])


def test_slurm_script_checks_once_then_trains_every_node_with_its_rank(tmp_path):
    proc, calls = _run_slurm(tmp_path, ["finer_70b_r4"], SLURM_NNODES="2",
                             SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_GPUS_PER_NODE="h100:8")
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "make -s check RECIPE=finer_70b_r4"  # once, before any node starts
    assert calls[1:] == [
        f"python scripts/train.py --no-check --gpus 8 --nodes 2 finer_70b_r4 "
        f"MACHINE_RANK={rank} MASTER_ADDR=gpu-a01 MASTER_PORT=29500" for rank in (0, 1)]


def test_slurm_script_without_a_gpu_count_stops_with_a_message(tmp_path):
    # before: `${SLURM_GPUS_PER_NODE##*:}` under `set -u` aborted with "unbound variable"
    proc, calls = _run_slurm(tmp_path, ["sentiment_r8"], SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a[01-02]")
    assert proc.returncode == 2 and calls == []
    assert "cannot tell the GPUs per node" in proc.stderr and "unbound" not in proc.stderr
    proc, calls = _run_slurm(tmp_path, ["sentiment_r8"], SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-a[01-02]",
                             SLURM_GPUS_ON_NODE="4", RESUME="1")
    assert proc.returncode == 0, proc.stderr
    assert calls[0] == "make -s check RECIPE=sentiment_r8 RESUME=1"
    assert calls[1].startswith("python scripts/train.py --no-check --gpus 4 --nodes 2 --resume sentiment_r8 ")


def test_slurm_script_usage_names_recipes_that_exist(tmp_path):
    import re

    text = SLURM.read_text()
    named = re.findall(r"slurm_train\.sh ([a-z0-9_]+)", text) + re.findall(r"RECIPE=([a-z0-9_]+) sbatch", text)
    assert named and all((ROOT / "recipes" / f"{n}.yml").is_file() for n in named), named
    proc, _ = _run_slurm(tmp_path, ["llama31_70b_finer_70b_r4"], SLURM_NNODES="2",
                         SLURM_JOB_NODELIST="x", GPUS_PER_NODE="8")
    assert proc.returncode == 2 and "recipes/llama31_70b_finer_70b_r4.yml does not exist" in proc.stderr
