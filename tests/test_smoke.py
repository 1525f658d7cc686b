"""`make smoke`: every variant of the generated GPU recipes trains through Axolotl on the CPU.

One task per variant (the variants differ in quantisation, LoRA flavour, optimizer and
DeepSpeed; the tasks only in data sizes): each test runs `scripts/smoke.py` as
`make smoke` does and checks what the run left behind, from the files themselves:
two finite losses, an adapter whose config and tensor shapes are the recipe's (rank,
rsLoRA, DoRA magnitude vectors), a merged model that `finlora.merge --verify` matched
against base + adapter, and an evaluation report of base and merged on held-out rows.
The ZeRO-3 variant needs DeepSpeed (`make setup-deepspeed`; CI installs it).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import yaml
from safetensors import safe_open

from finlora import ROOT

# One task per variant, spread over the tasks so that their data shapes are covered too.
CASES = {
    "r8": "sentiment",
    "r4": "formula",
    "r8_bf16": "xbrl_term",
    "r8_rslora": "ner",
    "r8_dora": "headline",
    "70b_r4": "sentiment",
}


def _smoke(name: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "smoke.py"), name], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    log = proc.stdout + proc.stderr
    work = ROOT / "outputs" / "smoke" / name
    work.mkdir(parents=True, exist_ok=True)
    (work / "smoke.log").write_text(log)
    assert proc.returncode == 0, f"smoke {name} failed; log in {work / 'smoke.log'}:\n{log[-4000:]}"
    return json.loads((work / "smoke.json").read_text()), log


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(CASES))
def test_smoke_trains_merges_and_scores(variant):
    name = f"{CASES[variant]}_{variant}"
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yml").read_text())
    if recipe.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (`make setup-deepspeed`): the ZeRO-3 recipes cannot be smoked")
    result, log = _smoke(name)
    out = ROOT / result["smoke_recipe"].rsplit("/", 1)[0] / "out"

    # The smoke recipe is the generated one but for the printed changes.
    smoke_cfg = yaml.safe_load((ROOT / result["smoke_recipe"]).read_text())
    for key in ("micro_batch_size", "gradient_accumulation_steps", "sequence_len", "sample_packing", "adapter",
                "load_in_8bit", "load_in_4bit", "lora_r", "lora_alpha", "peft_use_rslora", "peft_use_dora",
                "lora_target_modules", "bf16", "gradient_checkpointing", "special_tokens", "deepspeed"):
        assert smoke_cfg.get(key) == recipe.get(key), key
    if "SUBSTITUTE optimizer" not in log:
        assert smoke_cfg["optimizer"] == recipe["optimizer"]
    if recipe.get("flash_attention"):
        assert "SUBSTITUTE flash_attention: true -> sdp_attention: true" in log
    assert smoke_cfg["max_steps"] == 2

    # Two optimizer steps with finite losses, logged by the project's plugin.
    assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    steps = [json.loads(line) for line in (out / "loss_log.jsonl").read_text().splitlines()]
    assert [s["loss"] for s in steps if "loss" in s] == result["losses"]
    # The smoke feeds exactly 2 global batches (micro x accumulation x processes), so each
    # step is half an epoch: the recipe's batch geometry ran, and with 2 processes the rows
    # were sharded (each process alone on all rows would log 0.25, 0.5).
    assert [s["epoch"] for s in steps if "loss" in s] == [0.5, 1.0]

    # The adapter: the recipe's rank and flavour on every target module of every layer.
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert (acfg["r"], acfg["lora_alpha"], acfg["use_rslora"], acfg["use_dora"]) == (
        recipe["lora_r"], recipe["lora_alpha"], recipe["peft_use_rslora"], recipe["peft_use_dora"])
    tiny = json.loads((ROOT / result["tiny_model"]["dir"] / "config.json").read_text())
    hidden, kv = tiny["hidden_size"], tiny["num_key_value_heads"] * tiny["head_dim"]
    out_dim = {"q_proj": hidden, "k_proj": kv, "v_proj": kv}
    r = recipe["lora_r"]
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    per_module = 3 if recipe["peft_use_dora"] else 2
    assert len(shapes) == tiny["num_hidden_layers"] * len(recipe["lora_target_modules"]) * per_module
    for layer in range(tiny["num_hidden_layers"]):
        for t in recipe["lora_target_modules"]:
            pre = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            assert shapes[f"{pre}.lora_A.weight"] == (r, hidden)
            assert shapes[f"{pre}.lora_B.weight"] == (out_dim[t], r)
            if recipe["peft_use_dora"]:
                assert shapes[f"{pre}.lora_magnitude_vector"] == (out_dim[t],)

    # Merged weights give base + adapter's logits (through PEFT), and the adapter moved
    # them by far more than the merge's error, so the check had something to see.
    v = result["merge"]["verify"]
    assert v["passed"] and v["adapter_effect"] > 10 * v["max_abs_logit_diff"]
    assert (out / "merged" / "model.safetensors").is_file()
    merge_info = json.loads((out / "merged" / "merge_info.json").read_text())
    assert merge_info["r"] == r and merge_info["use_dora"] == recipe["peft_use_dora"]

    # `make eval`'s code scored base and merged on the held-out rows.
    report = ROOT / result["eval_report"]
    metrics = json.loads((report.parent / "metrics.json").read_text())["results"]
    assert set(metrics) == {"base", "merged"}
    for scores in metrics.values():
        (m,) = scores.values()
        fin = m["finlora"]
        assert fin["n"] >= 4 and 0.0 <= fin[fin["metric"]] <= 1.0 and m["strict"]
    assert report.is_file()
    # the vocabulary is Llama 3.1's, and so is the tokenizer the model was trained with
    assert result["tiny_model"]["vocab_size"] == result["tiny_model"]["tokenizer_size"] == 128_256

    if recipe.get("deepspeed"):
        ds = json.loads((ROOT / recipe["deepspeed"]).read_text())
        assert ds["zero_optimization"]["stage"] == 3
        assert result["processes"] == 2 and '"world_size": 2' in log
        # DeepSpeed's engine wrote one ZeRO optimizer shard per rank (plain DDP writes none).
        shards = sorted(p.name for p in out.glob("checkpoint-*/global_step*/zero_pp_rank_*_optim_states.pt"))
        assert shards == [f"zero_pp_rank_{k}_mp_rank_00_optim_states.pt" for k in (0, 1)]


def test_cpu_deepspeed_launch_is_refused_where_accelerate_would_drop_deepspeed(monkeypatch, capsys):
    """Accelerate runs plain DDP, without a word, when told to use the CPU with DeepSpeed set.
    Inside `axolotl train` the plugin's hook ends the process with one `error:` line, not a
    traceback through Axolotl's frames."""
    import torch

    from finlora.axolotl_plugin import FinLoRAPlugin, check_cpu_launch
    from finlora.errors import LaunchError

    if torch.cuda.is_available():
        pytest.skip("the CPU launch rules apply only without CUDA")
    with pytest.raises(LaunchError, match="drops DeepSpeed silently.*set ACCELERATE_USE_CPU=0"):
        check_cpu_launch({"WORLD_SIZE": "2", "ACCELERATE_USE_CPU": "1", "DS_ACCELERATOR": "cpu"}, deepspeed=True)
    with pytest.raises(LaunchError, match="set DS_ACCELERATOR=cpu"):
        check_cpu_launch({"WORLD_SIZE": "2"}, deepspeed=True)
    check_cpu_launch({"WORLD_SIZE": "2", "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": "0"}, deepspeed=True)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(SystemExit) as e:
        FinLoRAPlugin().register({"deepspeed": "recipes/deepspeed/zero3.json"})
    assert e.value.code == 1
    err = capsys.readouterr().err  # importing the plugin may log torch's import noise before it
    assert err.splitlines()[-1].startswith("error: DeepSpeed on a machine without CUDA needs DeepSpeed's CPU") and \
        err.splitlines()[-1].endswith("set DS_ACCELERATOR=cpu (`make train GPUS=n` sets it)")


@pytest.mark.slow
def test_cpu_int8_dora_needs_the_smokes_workaround(tmp_path):
    """8-bit DoRA cannot take two forward passes on a CPU with peft 0.20 + bitsandbytes 0.50
    (finlora.patches.keep_int8_scale says why); with the workaround it trains. When this test
    fails at its first `raises`, the libraries fixed it and the workaround can go."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import peft.tuners.lora.dora as dora
    from finlora.patches import keep_int8_scale
    from finlora.smoke import tiny_model, tokenizer_dir

    if torch.cuda.is_available():
        pytest.skip("the failure is on the CPU path only")
    base = tiny_model(ROOT / "recipes" / "models" / "llama-3.1-8b", tmp_path / "tiny",
                      tokenizer=tokenizer_dir("meta-llama/Llama-3.1-8B-Instruct"))

    def train_two_steps():
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True))
        model.train()
        ids = torch.randint(0, 1000, (2, 12))
        losses = []
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.item())
        return losses

    with pytest.raises(AttributeError, match="NoneType"):
        train_two_steps()
    original = dora.dequantize_module_weight
    dora.dequantize_module_weight = keep_int8_scale(original)
    try:
        assert all(math.isfinite(x) for x in train_two_steps())
    finally:
        dora.dequantize_module_weight = original


@pytest.mark.slow
def test_cpu_int8_dora_adapter_is_scored_on_an_8bit_base(tmp_path):
    """`make eval --bits 8` of a DoRA adapter (as bench-variants scores r8_dora) loads it through
    finlora.models.load_model, which installs the same workaround: two generations run where
    plain PEFT fails at the second forward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import peft.tuners.lora.dora as dora
    from finlora.models import load_model
    from finlora.smoke import tiny_model, tokenizer_dir

    if torch.cuda.is_available():
        pytest.skip("the failure is on the CPU path only")
    base = tiny_model(ROOT / "recipes" / "models" / "llama-3.1-8b", tmp_path / "tiny",
                      tokenizer=tokenizer_dir("meta-llama/Llama-3.1-8B-Instruct"))
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True))
    peft_model.save_pretrained(tmp_path / "adapter")
    original = dora.dequantize_module_weight
    try:
        model, tok = load_model(str(base), adapter=str(tmp_path / "adapter"), quant="8bit")
        assert getattr(dora.dequantize_module_weight, "_finlora_keeps_int8_scale", False)
        ids = tok("Operating profit rose", return_tensors="pt").input_ids
        for _ in range(2):
            assert model.generate(input_ids=ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    finally:
        dora.dequantize_module_weight = original
