"""Offline Axolotl validation of the recipes, DeepSpeed/accelerate configs, launch.
Generation from the matrix is tested in test_generate.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from finlora import ROOT
from finlora import axolotl_config as rm
from finlora.errors import RecipeError
from finlora.recipes import recipe_names

GENERATED = recipe_names()
DEFAULT = ROOT / "recipes" / "smollm2_sentiment_r8.yml"
SMOLLM2_CONFIG = ROOT / "outputs" / "base" / "SmolLM2-135M-Instruct" / "config.json"


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


def refused_keys(path) -> str:
    """The keys `make check` refuses before it runs Axolotl's validation."""
    from finlora.axolotl_config import unknown_keys
    from finlora.recipes import Recipe

    return ", ".join(unknown_keys(Recipe.open(path).config))


def test_unknown_key_is_refused_with_its_name(tmp_path):
    assert "lora_rnak" in refused_keys(_planted(tmp_path, lora_rnak=8))


def test_deprecated_and_nested_unknown_keys_are_refused(tmp_path):
    rope = {"rope_scaling": {"type": "linear", "factor": 2.0}}
    assert re.search(r"rope_scaling \(deprecated", refused_keys(_planted(tmp_path, **rope)))
    # deprecated through pydantic's Field(deprecated=...) in AxolotlInputConfig, with the hint
    for key, value, hint in (("flash_attention", True, "attn_implementation: flash_attention_2"),
                             ("sdp_attention", False, "attn_implementation: sdpa"),
                             ("gc_steps", 10, "torch_empty_cache_steps"),
                             ("flash_attn_d512", True, "large_head_attention"),  # by its description
                             ("sequence_parallel_degree", 1, "context_parallel_size")):
        refused = refused_keys(_planted(tmp_path, **{key: value}))
        assert re.search(rf"{key} \(deprecated in Axolotl: .*{hint}", refused), refused
    assert re.search(r"datasets\[0\]\.fiel_output", refused_keys(_planted(tmp_path, dataset_key="fiel_output")))


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
    from finlora.recipes import Recipe

    for stage in (1, 2, 3):
        d = rm.check_deepspeed_json(f"recipes/deepspeed/zero{stage}.json")
        assert d["zero_optimization"]["stage"] == stage
    # the planner and the 70B recipes read the stage from the JSON
    assert Recipe.open("finer_70b_r4").zero_stage == 3
    assert Recipe.open("finer_r8").zero_stage == 0


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
    from finlora.launch import check_launch, launch_command

    r = "recipes/sentiment_r8.yml"
    assert launch_command(r, None, None) == ["axolotl", "train", r]
    assert launch_command(ROOT / r, None, None) == ["axolotl", "train", r]  # written relative to the root
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
    with pytest.raises(LaunchError, match="GPUS"):  # make train checks its arguments first
        check_launch(None, 2)
    with pytest.raises(LaunchError):
        check_launch(0, None)
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        launch_command(r, 8, 2)


def test_unknown_recipe_lists_recipes_but_not_the_matrix():
    from finlora import recipes

    with pytest.raises(recipes.RecipeError) as e:
        recipes.resolve("nonexistent")
    msg = str(e.value)
    assert "sentiment_r8" in msg and "smollm2_sentiment_r8" in msg
    assert "matrix" not in msg.split("Recipes there are", 1)[1]
    assert "(49)" in msg  # 48 generated + the CPU default
