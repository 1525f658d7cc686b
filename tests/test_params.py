"""`make params` (trainable LoRA parameters) and `make plan` (memory planner)."""

from __future__ import annotations

import pytest

from finlora import ROOT
from finlora import params
from finlora import plan as planner
from finlora.recipe_matrix import load_spec

LLAMA_70B = ROOT / "recipes" / "models" / "llama-3.1-70b"
LLAMA_8B = ROOT / "recipes" / "models" / "llama-3.1-8b"
SMOLLM2 = ROOT / "outputs" / "base" / "SmolLM2-135M-Instruct"
QKV = ["q_proj", "k_proj", "v_proj"]


def test_llama_70b_r4_qkv():
    pc = params.count(LLAMA_70B, 4, QKV)
    assert dict(pc.per_module) == {"q_proj": 65_536, "k_proj": 36_864, "v_proj": 36_864}
    assert pc.per_block == 139_264
    assert pc.blocks == 80
    assert pc.trainable == 11_141_120
    assert pc.total_params == 70_553_706_496
    # 70,553,706,496 / 11,141,120 = 6,332.7 ("about 6,337" in the brief: within 0.1%)
    assert pc.factor == pytest.approx(6_337, rel=1e-3)


def test_llama_8b_shape():
    pc = params.count(LLAMA_8B, 8, QKV)
    assert pc.total_params == 8_030_261_248
    assert pc.trainable == 32 * 8 * ((4096 + 4096) + 2 * (4096 + 1024))


def test_recipe_and_cli(capsys):
    assert params.count_recipe("sentiment_70b_r4").trainable == 11_141_120
    params.main(["--config", str(LLAMA_70B / "config.json"), "--r", "4", "--targets", "q_proj,k_proj,v_proj"])
    out = capsys.readouterr().out
    assert "11,141,120" in out and "70,553,706,496" in out and "139,264" in out
    params.main(["--recipe", "finer_70b_r4"])
    assert "11,141,120" in capsys.readouterr().out


@pytest.mark.skipif(not (SMOLLM2 / "config.json").is_file(), reason="SmolLM2 base absent (make base-model)")
def test_smollm2_default_recipe_matches_peft():
    from peft import LoraConfig, get_peft_model

    pc = params.count_recipe("smollm2_sentiment_r8")
    assert pc.trainable == 645_120
    for dora in (False, True):  # the closed form agrees with PEFT itself (meta device)
        model, _ = params.build_meta_model(SMOLLM2)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=QKV, use_dora=dora))
        n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert n == params.count(SMOLLM2, 8, QKV, dora=dora).trainable


# ------------------------------------------------------------------- planner


def test_breakdown_sums():
    p = planner.plan_recipe("finer_r8", 1)
    assert p.total == pytest.approx(sum(p.parts.values()))
    assert set(p.parts) >= {"frozen weights", "LoRA weights", "gradients", "optimizer state",
                            "activations", "CUDA context/overhead"}
    assert all(v >= 0 for v in p.parts.values())


def test_zero3_monotonic_in_gpus():
    totals = [planner.plan_recipe("ner_70b_r4", n).total for n in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(totals, totals[1:]))
    w = [planner.plan_recipe("ner_70b_r4", n).parts["frozen weights"] for n in (1, 8)]
    assert w[1] == pytest.approx(w[0] / 8)


def test_70b_4bit_needs_more_than_24gb():
    p = planner.plan_recipe("sentiment_70b_r4", 1)
    assert p.parts["frozen weights"] / planner.GiB > 24
    assert not p.fits(24) and not p.fits(40)
    assert p.fits(80) and p.fits(141)


def test_bits_and_checkpointing_order():
    w = {v: planner.plan_recipe(f"ner_{v}", 1).parts["frozen weights"] for v in ("r4", "r8", "r8_bf16")}
    assert w["r4"] < w["r8"] < w["r8_bf16"]
    with_gc = planner.plan_recipe("finer_r8", 1)
    without = planner.plan_recipe("finer_r8", 1, gradient_checkpointing=False)
    assert without.parts["activations"] > 5 * with_gc.parts["activations"]


def test_8bit_optimizer_and_ddp():
    spec = load_spec("ner_r8")
    eight = planner.estimate(spec, 1).parts["optimizer state"]
    spec.optimizer = "adamw_torch"
    assert planner.estimate(spec, 1).parts["optimizer state"] == pytest.approx(4 * eight)
    # DDP replicates everything: more GPUs never lower the per-GPU peak without ZeRO
    assert planner.plan_recipe("ner_r8", 4).total >= planner.plan_recipe("ner_r8", 1).total


def test_8b_short_task_fits_24gb_card():
    assert planner.plan_recipe("sentiment_r8", 1).fits(24)
