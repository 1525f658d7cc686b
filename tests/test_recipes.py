"""The recipe matrix: generation, drift check, offline Axolotl validation, launch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finlora import ROOT
from finlora.errors import RecipeError
from finlora.recipes import recipe_names
from finlora import axolotl_config as rm

GENERATED = recipe_names()
DEFAULT = ROOT / "recipes" / "smollm2_sentiment_r8.yml"
SMOLLM2_CONFIG = ROOT / "outputs" / "base" / "SmolLM2-135M-Instruct" / "config.json"


def test_matrix_covers_every_task_and_variant():
    m = rm.load_matrix()
    assert set(m["tasks"]) == {"sentiment", "headline", "ner", "finer", "xbrl_extract",
                               "xbrl_term", "formula", "financebench"}
    assert set(m["variants"]) == {"r8", "r4", "r8_bf16", "r8_rslora", "r8_dora", "70b_r4"}
    assert len(GENERATED) == 48 and "smollm2_sentiment_r8" not in GENERATED
    assert m["reference_gpus"] == 4  # FinLoRA's runs: 4x A5000


# FinLoRA's lora/finetune_configs.json (Open-Finance-Lab/FinLoRA @ 7e1cf82), per task:
# (batch_size per GPU, gradient_accumulation_steps per GPU, num_epochs, learning_rate)
FINLORA = {
    "sentiment": (8, 2, 4, 1e-4), "headline": (8, 2, 4, 1e-4), "ner": (8, 2, 4, 1e-4),
    "finer": (1, 8, 4, 1e-4), "financebench": (1, 2, 4, 1e-4), "xbrl_extract": (1, 8, 1, 1e-4),
    "formula": (4, 2, 1, 1e-4), "xbrl_term": (4, 2, 1, 1e-4),
}


@pytest.mark.parametrize("variant", ["r8", "r4", "r8_bf16", "r8_rslora", "r8_dora", "70b_r4"])
def test_every_recipe_takes_finlora_task_values_and_its_global_batch(variant):
    for task, (batch, accum, epochs, lr) in FINLORA.items():
        text = (ROOT / "recipes" / f"{task}_{variant}.yml").read_text()
        cfg = yaml.safe_load(text)
        assert (cfg["micro_batch_size"], cfg["num_epochs"], cfg["learning_rate"]) == (batch, epochs, lr), task
        # one process reaches FinLoRA's global batch (per-GPU batch x accumulation x 4 GPUs)
        assert cfg["gradient_accumulation_steps"] == accum * 4, task
        assert f"Global batch {batch * accum * 4} = " in text
        assert cfg["warmup_steps"] == 10 and cfg["lr_scheduler"] == "cosine"  # FinLoRA's template
        assert cfg["lora_alpha"] == 16  # FinLoRA sets 16 for r8 and leaves its template's 16 at r4


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
    assert (r8["micro_batch_size"], r8["gradient_accumulation_steps"], r8["load_in_8bit"]) == (8, 8, True)
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
        assert cfg["attn_implementation"] == "sdpa" and cfg["gradient_checkpointing"] and cfg["bf16"] == "auto"
        assert "flash_attention" not in cfg and "sdp_attention" not in cfg  # deprecated in Axolotl 0.19
        assert cfg["excess_length_strategy"] == "drop"  # explicit; the plugin lists what it drops


def validate(path):
    from finlora.axolotl_config import validate
    from finlora.recipes import Recipe

    return validate(Recipe.open(path))


@pytest.mark.parametrize("name", GENERATED)
def test_generated_recipe_passes_axolotl_validation(name):
    cfg = validate(ROOT / "recipes" / f"{name}.yml")
    assert cfg.model_config_type == "llama"
    assert cfg.adapter in ("lora", "qlora")
    assert cfg.bf16 is True  # validated as on a bf16-capable GPU


def test_default_recipe_passes_axolotl_validation():
    if not SMOLLM2_CONFIG.is_file():
        pytest.skip(f"{SMOLLM2_CONFIG.relative_to(ROOT)} absent (run `make base-model`)")
    cfg = validate(DEFAULT)
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
    with pytest.raises(RecipeError, match="lora_rnak"):
        validate(_planted(tmp_path, lora_rnak=8))


def test_deprecated_and_nested_unknown_keys_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"rope_scaling \(deprecated"):
        validate(_planted(tmp_path, rope_scaling={"type": "linear", "factor": 2.0}))
    # deprecated through pydantic's Field(deprecated=...) in AxolotlInputConfig, with the hint
    for key, value, hint in (("flash_attention", True, "attn_implementation: flash_attention_2"),
                             ("sdp_attention", False, "attn_implementation: sdpa"),
                             ("gc_steps", 10, "torch_empty_cache_steps"),
                             ("flash_attn_d512", True, "large_head_attention"),  # by its description
                             ("sequence_parallel_degree", 1, "context_parallel_size")):
        with pytest.raises(RecipeError, match=rf"{key} \(deprecated in Axolotl: .*{hint}"):
            validate(_planted(tmp_path, **{key: value}))
    with pytest.raises(RecipeError, match=r"datasets\[0\]\.fiel_output"):
        validate(_planted(tmp_path, dataset_key="fiel_output"))


def test_every_deprecation_axolotls_schema_marks_is_flagged():
    from axolotl.utils.schemas.config import AxolotlInputConfig
    from axolotl.utils.schemas.deprecated import DeprecatedParameters

    marked = {n for n, f in AxolotlInputConfig.model_fields.items() if f.deprecated}
    assert {"flash_attention", "sdp_attention", "xformers_attention", "eager_attention"} <= marked
    flagged = rm.deprecated_keys()
    assert marked | set(DeprecatedParameters.model_fields) <= set(flagged)
    for key in flagged:
        assert rm.unknown_keys({key: True}) == [f"{key} (deprecated in Axolotl: {flagged[key]})"]


def test_deprecation_a_validator_logs_is_refused(tmp_path):
    # message_field_role is a plain SFTDataset field; only a validator logs its deprecation
    p = _planted(tmp_path)
    cfg = yaml.safe_load(p.read_text())
    cfg["datasets"] = [{"path": "./data/train/sentiment_train.jsonl", "type": "chat_template",
                        "message_field_role": "from"}]
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    with pytest.raises(RecipeError, match="deprecated in Axolotl: message_field_role is deprecated"):
        validate(p)


def test_sdpa_recipes_never_probe_the_hub_for_a_flash_attention_kernel(monkeypatch, tmp_path):
    # Without the flash-attn package, Axolotl's validation on a CUDA host asks the kernels
    # hub for a flash-attn build (an offline compute node fails there). No GPU here, so
    # CUDA is reported present to reach that validator; the probe records its calls.
    from unittest import mock

    import axolotl.monkeypatch.attention.fa2_hub_kernel as hub
    import axolotl.utils.config as axcfg
    import torch

    calls = []
    real_validate = axcfg.validate_config

    def validate_as_on_cuda(*args, **kwargs):  # CUDA "present" for Axolotl's validators only
        with mock.patch.object(torch.cuda, "is_available", lambda: True):
            return real_validate(*args, **kwargs)

    monkeypatch.setattr(axcfg, "validate_config", validate_as_on_cuda)
    monkeypatch.setattr(hub, "is_fa2_hub_kernel_available", lambda: calls.append(1) or False)
    validate(ROOT / "recipes" / "sentiment_r8.yml")
    assert calls == []
    with pytest.raises(RecipeError, match="no flash-attn build is available"):
        validate(_planted(tmp_path, attn_implementation="flash_attention_2"))
    assert calls == [1]  # the old recipes' `flash_attention: true` meant exactly this


def test_axolotl_own_validation_still_runs(tmp_path):
    # a known key with an invalid value: Axolotl's pydantic schema rejects it
    with pytest.raises(RecipeError, match="micro_batch_size"):
        validate(_planted(tmp_path, micro_batch_size="eight"))


def test_deepspeed_configs():
    from finlora.params import load_spec

    for stage in (1, 2, 3):
        d = rm.check_deepspeed_json(f"recipes/deepspeed/zero{stage}.json")
        assert d["zero_optimization"]["stage"] == stage
    # the planner and the 70B recipes read the stage from the JSON
    assert load_spec("finer_70b_r4").zero_stage == 3
    assert load_spec("finer_r8").zero_stage == 0


def test_accelerate_configs_parse():
    for name in ("single_gpu", "multi_gpu", "multi_node"):
        d = yaml.safe_load((ROOT / "recipes" / "accelerate" / f"{name}.yaml").read_text())
        assert d["distributed_type"] == ("NO" if name == "single_gpu" else "MULTI_GPU")
    assert yaml.safe_load((ROOT / "recipes" / "accelerate" / "multi_node.yaml").read_text())["num_machines"] == 2


def test_slurm_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "slurm_train.sh")], check=True)
    text = (ROOT / "scripts" / "slurm_train.sh").read_text()
    assert "scontrol show hostnames" in text and "MACHINE_RANK" in text  # run with stubs in test_launch.py


def test_launch_command(monkeypatch):
    from finlora.errors import LaunchError
    from finlora.launch import launch_command

    r = "recipes/sentiment_r8.yml"
    assert launch_command(r, None, None) == ["axolotl", "train", r]
    assert launch_command(ROOT / r, None, None, extra_args=["--max-steps", "3"]) == \
        ["axolotl", "train", r, "--max-steps", "3"]
    assert launch_command(r, 1, None) == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/single_gpu.yaml",
        "--num_processes", "1", "-m", "axolotl.cli.train", r]
    assert launch_command(r, 8, None) == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/multi_gpu.yaml",
        "--num_processes", "8", "-m", "axolotl.cli.train", r]
    assert launch_command(r, 8, 1) == launch_command(r, 8, None)
    monkeypatch.setenv("MASTER_ADDR", "node001")
    monkeypatch.setenv("MACHINE_RANK", "1")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert launch_command(r, 8, 2) == [
        "accelerate", "launch", "--config_file", "recipes/accelerate/multi_node.yaml",
        "--num_machines", "2", "--num_processes", "16", "--machine_rank", "1",
        "--main_process_ip", "node001", "--main_process_port", "29500", "-m", "axolotl.cli.train", r]
    with pytest.raises(LaunchError, match="GPUS"):
        launch_command(r, None, 2)
    with pytest.raises(LaunchError):
        launch_command(r, 0, None)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        launch_command(r, 8, 2)


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
