"""The recipe matrix: generation, drift check, offline Axolotl validation, launch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finlora import ROOT
from finlora import recipe_matrix as rm

GENERATED = rm.recipe_names()
DEFAULT = ROOT / "recipes" / "smollm2_sentiment_r8.yml"
SMOLLM2_CONFIG = ROOT / "outputs" / "base" / "SmolLM2-135M-Instruct" / "config.json"


def test_matrix_covers_every_task_and_variant():
    m = rm.load_matrix()
    assert set(m["tasks"]) == {"sentiment", "headline", "ner", "finer", "xbrl_extract",
                               "xbrl_term", "formula", "financebench"}
    assert set(m["variants"]) == {"r8", "r4", "r8_bf16", "r8_rslora", "r8_dora", "70b_r4"}
    assert len(GENERATED) == 48 and "smollm2_sentiment_r8" not in GENERATED
    for t in m["tasks"].values():  # the global batch on one GPU stays 16
        assert t["micro_batch_size"] * t["gradient_accumulation_steps"] == 16


def test_check_mode_passes_on_the_committed_recipes():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_recipes.py"), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_check_mode_lists_drifted_missing_and_stale_files(tmp_path):
    for name in GENERATED:
        shutil.copy(ROOT / "recipes" / f"{name}.yml", tmp_path)
    assert rm.drift(recipe_dir=tmp_path) == []
    p = tmp_path / "ner_r8.yml"
    p.write_text(p.read_text().replace("lora_r: 8", "lora_r: 16"))
    (tmp_path / "finer_r4.yml").unlink()
    stale = tmp_path / "old_r2.yml"
    stale.write_text(rm.HEADER + "\nlora_r: 2\n")
    problems = "\n".join(rm.drift(recipe_dir=tmp_path))
    assert "ner_r8.yml: differs" in problems
    assert "finer_r4.yml: missing" in problems
    assert "old_r2.yml: generated but no longer in the matrix" in problems


def test_rendered_yaml_round_trips_and_has_header():
    m = rm.load_matrix()
    for variant in m["variants"]:
        for task in m["tasks"]:
            items = rm.build_items(task, variant, m)
            text = rm.render(items)
            assert text.startswith(rm.HEADER + "\n")
            assert yaml.safe_load(text) == rm.items_to_dict(items)


def test_recipe_values_follow_the_brief():
    r8 = yaml.safe_load((ROOT / "recipes" / "sentiment_r8.yml").read_text())
    assert (r8["lora_r"], r8["lora_alpha"], r8["learning_rate"], r8["num_epochs"]) == (8, 16, 1e-4, 4)
    assert (r8["micro_batch_size"], r8["gradient_accumulation_steps"], r8["load_in_8bit"]) == (8, 2, True)
    r4 = yaml.safe_load((ROOT / "recipes" / "finer_r4.yml").read_text())
    assert r4["load_in_4bit"] and r4["adapter"] == "qlora" and r4["lora_r"] == 4
    assert r4["optimizer"] == "paged_adamw_8bit" and r4["sequence_len"] >= 4096
    big = yaml.safe_load((ROOT / "recipes" / "financebench_70b_r4.yml").read_text())
    assert big["base_model"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert big["deepspeed"] == "recipes/deepspeed/zero3.json"
    assert yaml.safe_load((ROOT / "recipes" / "ner_r8_dora.yml").read_text())["peft_use_dora"] is True
    assert yaml.safe_load((ROOT / "recipes" / "ner_r8_rslora.yml").read_text())["peft_use_rslora"] is True
    bf16 = yaml.safe_load((ROOT / "recipes" / "ner_r8_bf16.yml").read_text())
    assert not bf16["load_in_8bit"] and not bf16["load_in_4bit"]
    for name in GENERATED:
        cfg = yaml.safe_load((ROOT / "recipes" / f"{name}.yml").read_text())
        assert cfg["lora_target_modules"] == ["q_proj", "k_proj", "v_proj"]
        assert cfg["output_dir"] == f"./outputs/{name}"
        assert cfg["plugins"] == ["finlora.axolotl_plugin.FinLoRAPlugin"]
        assert cfg["flash_attention"] and cfg["gradient_checkpointing"] and cfg["bf16"] == "auto"


@pytest.mark.parametrize("name", GENERATED)
def test_generated_recipe_passes_axolotl_validation(name):
    cfg = rm.validate_recipe(ROOT / "recipes" / f"{name}.yml")
    assert cfg.model_config_type == "llama"
    assert cfg.adapter in ("lora", "qlora")
    assert cfg.bf16 is True  # validated as on a bf16-capable GPU


def test_default_recipe_passes_axolotl_validation():
    if not SMOLLM2_CONFIG.is_file():
        pytest.skip(f"{SMOLLM2_CONFIG.relative_to(ROOT)} absent (run `make base-model`)")
    cfg = rm.validate_recipe(DEFAULT)
    assert cfg.model_config_type == "llama" and cfg.lora_r == 8


def _planted(tmp_path, **changes) -> Path:
    cfg = yaml.safe_load((ROOT / "recipes" / "sentiment_r8.yml").read_text())
    for k, v in changes.items():
        if k == "dataset_key":
            cfg["datasets"][0][v] = True
        else:
            cfg[k] = v
    p = tmp_path / "planted.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def test_unknown_key_is_refused_with_its_name(tmp_path):
    with pytest.raises(rm.RecipeInvalid, match="lora_rnak"):
        rm.validate_recipe(_planted(tmp_path, lora_rnak=8))


def test_deprecated_and_nested_unknown_keys_are_refused(tmp_path):
    with pytest.raises(rm.RecipeInvalid, match=r"rope_scaling \(deprecated"):
        rm.validate_recipe(_planted(tmp_path, rope_scaling={"type": "linear", "factor": 2.0}))
    with pytest.raises(rm.RecipeInvalid, match=r"datasets\[0\]\.fiel_output"):
        rm.validate_recipe(_planted(tmp_path, dataset_key="fiel_output"))


def test_axolotl_own_validation_still_runs(tmp_path):
    # a known key with an invalid value: Axolotl's pydantic schema rejects it
    with pytest.raises(rm.RecipeInvalid, match="micro_batch_size"):
        rm.validate_recipe(_planted(tmp_path, micro_batch_size="eight"))


def test_deepspeed_configs():
    for stage in (1, 2, 3):
        d = rm.check_deepspeed_json(f"recipes/deepspeed/zero{stage}.json")
        assert d["zero_optimization"]["stage"] == stage
    # the planner and the 70B recipes read the stage from the JSON
    assert rm.load_spec("finer_70b_r4").zero_stage == 3
    assert rm.load_spec("finer_r8").zero_stage == 0


def test_accelerate_configs_parse():
    for name in ("single_gpu", "multi_gpu", "multi_node"):
        d = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
        assert d["distributed_type"] == ("NO" if name == "single_gpu" else "MULTI_GPU")
    assert yaml.safe_load((ROOT / "recipes" / "accelerate" / "multi_node.yaml").read_text())["num_machines"] == 2


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_train.sh")], check=True)
    text = (ROOT / "scripts" / "slurm_train.sh").read_text()
    assert "scontrol show hostnames" in text and "--machine_rank" in text


def test_launch_command(monkeypatch):
    r = "recipes/sentiment_r8.yml"
    assert rm.launch_command(r, None, None) == ["axolotl", "train", r]
    assert rm.launch_command(ROOT / r, None, None, extra_args=["--max-steps", "3"]) == \
        ["axolotl", "train", r, "--max-steps", "3"]
    assert rm.launch_command(r, 1, None) == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/single_gpu.yaml",
        "--num_processes", "1", "-m", "axolotl.cli.train", r]
    assert rm.launch_command(r, 8, None) == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/multi_gpu.yaml",
        "--num_processes", "8", "-m", "axolotl.cli.train", r]
    assert rm.launch_command(r, 8, 1) == rm.launch_command(r, 8, None)
    monkeypatch.setenv("MASTER_ADDR", "node001")
    monkeypatch.setenv("MACHINE_RANK", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert rm.launch_command(r, 8, 2) == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/multi_node.yaml",
        "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
        "--main_process_ip", "node001", "--main_process_port", "29500", "-m", "axolotl.cli.train", r]
    with pytest.raises(ValueError, match="GPUS"):
        rm.launch_command(r, None, 2)
    with pytest.raises(ValueError):
        rm.launch_command(r, 0, None)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        rm.launch_command(r, 8, 2)


def test_recipe_table_lists_every_recipe():
    from finlora.plan import recipe_table

    table = recipe_table()
    for name in GENERATED:
        assert f"| `{name}` |" in table
    assert "| `sentiment_70b_r4` | sentiment | Llama-3.1-70B-Instruct | 4 | 4 (NF4) | QLoRA | 11,141,120 |" in table


def test_unknown_recipe_lists_recipes_but_not_the_matrix():
    from finlora import recipes

    with pytest.raises(recipes.RecipeError) as e:
        recipes.resolve("nonexistent")
    msg = str(e.value)
    assert "sentiment_r8" in msg and "smollm2_sentiment_r8" in msg
    assert "matrix" not in msg.split("Recipes there are", 1)[1]
    assert "(49)" in msg  # 48 generated + the CPU default
