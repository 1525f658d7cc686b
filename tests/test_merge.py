"""`make merge`: the streamed merge against PEFT's merge_and_unload, on the real SmolLM2
with a really trained adapter and on small random models for each LoRA variant; the
refusals, the atomic destination and the side-by-side benchmark's dry run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT
from finlora.cli import run
from finlora.merge import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


# ------------------------------------------------------------------ helpers

def tiny_llama(path: Path, *, tie: bool = False, dtype=torch.float32, shard: str = "20KB", seed: int = 0,
               hidden: int = 32, inter: int = 64) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def tiny_gpt2(path: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def make_adapter(base: Path, out: Path, safe: bool = True, **lora) -> Path:
    """A PEFT adapter with random non-zero B (and a non-trivial DoRA magnitude)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    lora.setdefault("target_modules", ["q_proj", "k_proj", "v_proj"])
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding" in n:  # PEFT starts embedding A at zero, not only B
                p.normal_(0, 0.2)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.rand_like(p))
    pm.save_pretrained(out, safe_serialization=safe)
    return out


def peft_merged(base: Path, adapter: Path, dtype=torch.float32) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    return {k: v.clone() for k, v in PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict().items()}


def read_out(out: Path) -> dict[str, torch.Tensor]:
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for f in files:
        with safe_open(out / f, framework="pt") as sf:
            for k in sf.keys():
                tensors[k] = sf.get_tensor(k)
    return tensors


def assert_same_as_peft(out: Path, ref: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    ours = read_out(out)
    assert ours, "no tensors written"
    for k, v in ours.items():
        assert k in ref, k
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape, k
        diff = (v.float() - ref[k].float()).abs().max().item()
        assert diff <= atol, f"{k}: max diff {diff}"


def run_merge(base, adapter, out, *extra) -> int:
    """scripts/merge.py as a user runs it: `error: ...` on stderr and exit code 1 on refusal."""
    return run(main, ["--base", str(base), "--adapter", str(adapter), "--out", str(out), "--no-progress", *map(str, extra)])


# ------------------------------------------------------------------ the real model

@pytest.mark.slow
def test_smollm2_trained_adapter_equals_peft_and_verifies(tiny_run, tmp_path):
    base, adapter, out = tiny_run["base"], tiny_run["out"], tmp_path / "merged"
    assert run_merge(base, adapter, out, "--verify", "--max-shard-size", "200MB") == 0
    # 538 MB of fp32 in shards of at most 200 MB, with the index transformers reads
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes()
    assert_same_as_peft(out, peft_merged(base, adapter), atol=0.0)  # bit-identical in fp32
    info = json.loads((out / "merge_info.json").read_text())
    assert info["scale"] == {"k_proj": 2.0, "q_proj": 2.0, "v_proj": 2.0} and info["modules_merged"] == 90
    assert info["dtype"] == "float32" and info["quantized_training"] is False
    assert info["verify"]["passed"] and info["verify"]["max_abs_logit_diff"] <= info["verify"]["tolerance"]["limit"]
    assert info["verify"]["adapter_effect"] > 10 * info["verify"]["max_abs_logit_diff"]
    assert not list(out.parent.glob(".merged.*"))


# ------------------------------------------------------------------ variants on small random models

VARIANTS = {
    "sharded_lora": dict(),
    "rslora": dict(use_rslora=True, r=8, lora_alpha=4),
    "rank_alpha_pattern": dict(target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
                               alpha_pattern={"v_proj": 3}),
    "dora": dict(use_dora=True),
    "untied_embed_and_head": dict(target_modules=["embed_tokens", "lm_head", "o_proj"]),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_equals_peft(name, tmp_path):
    base = tiny_llama(tmp_path / "base")
    assert (base / "model.safetensors.index.json").exists()  # sharded input
    adapter = make_adapter(base, tmp_path / "adapter", **VARIANTS[name])
    out = tmp_path / "out"
    assert run_merge(base, adapter, out, "--max-shard-size", "30KB") == 0
    assert_same_as_peft(out, peft_merged(base, adapter))
    info = json.loads((out / "merge_info.json").read_text())
    if name == "rslora":
        assert info["scale"]["q_proj"] == pytest.approx(4 / 8 ** 0.5)
    if name == "rank_alpha_pattern":
        assert sorted(info["scale"]["q_proj"]) == [8 / 4, 8 / 2] and info["scale"]["v_proj"] == 3 / 4
        assert info["scale"]["down_proj"] == 8 / 6


def test_fan_in_fan_out_gpt2_conv1d(tmp_path):
    base = tiny_gpt2(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    out = tmp_path / "out"
    assert run_merge(base, adapter, out) == 0
    assert_same_as_peft(out, peft_merged(base, adapter))


def test_bf16_base_matches_peft_within_rounding(tmp_path):
    base = tiny_llama(tmp_path / "base", dtype=torch.bfloat16, shard="10MB")
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out"
    assert run_merge(base, adapter, out, "--verify") == 0
    ref = peft_merged(base, adapter, dtype=torch.bfloat16)
    ours = read_out(out)
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        # one bf16 rounding of the float32 result: at most one ulp apart from PEFT
        ulp = ref[k].float().abs().clamp_min(1e-30) * 2 ** -7
        assert ((v.float() - ref[k].float()).abs() <= ulp).all(), k
    info = json.loads((out / "merge_info.json").read_text())
    assert info["dtype"] == "bfloat16" and info["verify"]["passed"]


def test_recipe_mode_quantized_training_and_default_out(tmp_path, capsys):
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "run")
    recipe = tmp_path / "q.yml"
    recipe.write_text(yaml.safe_dump({"base_model": str(base), "output_dir": str(adapter), "adapter": "qlora",
                                      "load_in_4bit": True, "load_in_8bit": False}))
    assert main(["--recipe", str(recipe), "--no-progress", "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "quantized base" in printed and "unquantized base weights" in printed and "PASS" in printed
    out = adapter / "merged"
    info = json.loads((out / "merge_info.json").read_text())
    assert info["quantized_training"] is True and "load_in_4bit" in info["quantized_training_evidence"][0]
    assert info["verify"]["passed"] and info["base"] == str(base)
    assert_same_as_peft(out, peft_merged(base, adapter))
    # the merged folder loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)


# ------------------------------------------------------------------ refusals: clear message, nothing written

@pytest.fixture
def pair(tmp_path):
    base = tiny_llama(tmp_path / "base")
    return base, make_adapter(base, tmp_path / "adapter")


def refused(capsys, base, adapter, out, *extra) -> str:
    assert run_merge(base, adapter, out, *extra) == 1
    assert not out.exists() or out.is_dir() and (out / "keep").exists()
    assert not list(out.parent.glob(f".{out.name}.*.tmp"))
    return capsys.readouterr().err


def edit_adapter(adapter: Path, rename=None, config=None) -> None:
    if rename:
        t = load_file(adapter / "adapter_model.safetensors")
        save_file({rename(k): v for k, v in t.items()}, adapter / "adapter_model.safetensors")
    if config:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg.update(config)
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))


def test_existing_destination_needs_force(pair, tmp_path, capsys):
    base, adapter = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    err = refused(capsys, base, adapter, out)
    assert "already exists" in err and "--force" in err and (out / "keep").exists()
    # --force replaces only an earlier merge's output: a folder of the user's is never one
    assert "holds no merge_info.json" in refused(capsys, base, adapter, out, "--force")
    assert (out / "keep").read_text() == "x"


def test_missing_module_refused(pair, tmp_path, capsys):
    base, adapter = pair
    edit_adapter(adapter, rename=lambda k: k.replace("layers.1.self_attn.k_proj", "layers.7.self_attn.k_proj"))
    err = refused(capsys, base, adapter, tmp_path / "out")
    assert "model.layers.7.self_attn.k_proj" in err and "not in the base model" in err


def test_other_architecture_refused(pair, tmp_path, capsys):
    _, adapter = pair
    other = tiny_llama(tmp_path / "other", hidden=48)
    err = refused(capsys, other, adapter, tmp_path / "out")
    assert "another model" in err and "hidden_size: 32 vs 48" in err


def test_shape_mismatch_refused(pair, tmp_path, capsys):
    _, adapter = pair
    other = tiny_llama(tmp_path / "other", hidden=48)
    edit_adapter(adapter, config={"base_model_name_or_path": "somewhere/else"})  # no local config to compare
    err = refused(capsys, other, adapter, tmp_path / "out")
    assert "shape mismatch" in err and "module model.layers.0.self_attn." in err and "[24, 48]" in err


def test_rank_mismatch_refused(pair, tmp_path, capsys):
    base, adapter = pair
    edit_adapter(adapter, config={"r": 8})
    err = refused(capsys, base, adapter, tmp_path / "out")
    assert "lora_A has 4 rows" in err and "r=8" in err and "module model.layers.0.self_attn." in err


def test_tied_head_refused(tmp_path, capsys):
    base = tiny_llama(tmp_path / "base", tie=True)
    adapter = make_adapter(base, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    err = refused(capsys, base, adapter, tmp_path / "out")
    assert "lm_head" in err and "tie_word_embeddings" in err


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_residual_base_initialisations(init, tmp_path, capsys):
    """PiSSA and OLoRA subtract the adapter's starting product from the base while training. Their
    full SVD / QR rebuild that residual from the base, so the merge equals PEFT's (which rebuilds it
    the same way on loading); a random SVD's draw cannot be rebuilt: refused until saved converted
    to plain LoRA (PEFT's own recipe), then merged."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_llama(tmp_path / "base")
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    pm.peft_config["default"].init_lora_weights = True  # the starting point, saved as PEFT's docs say
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for n, prm in pm.named_parameters():
            if "lora_B" in n:
                prm.add_(0.05 * torch.randn_like(prm))  # "training"
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    trained = pm(input_ids=ids).logits.detach()
    pm.save_pretrained(tmp_path / "saved")
    if init == "pissa_niter_2":
        err = refused(capsys, base, tmp_path / "saved", tmp_path / "out")
        assert "init_lora_weights='pissa_niter_2'" in err and "path_initial_model_for_weight_conversion" in err
        pm.save_pretrained(tmp_path / "saved", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert run_merge(base, tmp_path / "saved", tmp_path / "out") == 0
    assert_same_as_peft(tmp_path / "out", peft_merged(base, tmp_path / "saved"), atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=ids).logits.detach()
    assert (merged - trained).abs().max() < 1e-4  # the model as trained, not the original base + adapter


def test_saved_copy_of_a_base_layer_is_checked_not_dropped(pair, tmp_path, capsys):
    base, adapter = pair
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    embed = read_out(base)["model.embed_tokens.weight"]  # a base layer without LoRA, saved beside the adapter
    t = load_file(adapter / "adapter_model.safetensors")
    save_file({**t, key: embed + 1}, adapter / "adapter_model.safetensors")
    err = refused(capsys, base, adapter, tmp_path / "out")
    assert "model.embed_tokens" in err and "differs from the base's" in err
    save_file({**t, key: embed.clone()}, adapter / "adapter_model.safetensors")
    assert run_merge(base, adapter, tmp_path / "out") == 0
    assert_same_as_peft(tmp_path / "out", peft_merged(base, adapter))


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_truncated_safetensors_refused_by_name(pair, tmp_path, capsys, which):
    # safetensors.safe_open reads the header; a cut-off download must still name the file
    base, adapter = pair
    path = sorted(base.glob("model-*.safetensors"))[0] if which == "base" else adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    for cut in (5, len(data) - 16):  # inside the length prefix; inside the last tensor
        path.write_bytes(data[:cut])
        err = refused(capsys, base, adapter, tmp_path / "out")
        assert str(path) in err and "truncated" in err, err
    path.write_bytes(data)
    assert run_merge(base, adapter, tmp_path / "out") == 0


def test_bad_shard_size_refused(pair, tmp_path, capsys):
    base, adapter = pair
    for size in ("lots", "0MB"):
        assert "is not a size" in refused(capsys, base, adapter, tmp_path / "out", "--max-shard-size", size)


def test_merge_error_is_an_exception_until_main(pair, tmp_path):
    from finlora.merge import MergeError, merge

    base, adapter = pair
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge(base, adapter, tmp_path / "out", progress=False)


def test_pickled_adapter_needs_opt_in(tmp_path, capsys):
    base = tiny_llama(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", safe=False)
    assert (adapter / "adapter_model.bin").exists()
    err = refused(capsys, base, adapter, tmp_path / "out")
    assert "pickled" in err and "--allow-pickle" in err
    assert run_merge(base, adapter, tmp_path / "out", "--allow-pickle") == 0
    assert_same_as_peft(tmp_path / "out", peft_merged(base, adapter))


# ------------------------------------------------------------------ interruption

@pytest.mark.slow
def test_killed_merge_leaves_no_destination(tiny_run, tmp_path, capsys):
    """SIGKILL between the first and second output shard, at that point whatever the CPU's
    speed: the child merges with an `on_shard` callback that pauses after the first shard."""
    from benchmarks.merge import OURS_PAUSED, kill_between_shards

    base, adapter, out = tiny_run["base"], tiny_run["out"], tmp_path / "merged"
    k = kill_between_shards([sys.executable, "-c", OURS_PAUSED, str(base), str(adapter), str(out), "50MB"], out)
    assert k == {"destination_exists": False, "files": [], "hidden_temp": [k["hidden_temp"][0]]}, k
    assert len(list((tmp_path / k["hidden_temp"][0]).glob("model-00001-of-*.safetensors"))) == 1  # shard 1 was done
    assert run_merge(base, adapter, out, "--max-shard-size", "50MB") == 0  # the next run removes the leftover
    assert "left by an interrupted merge" in capsys.readouterr().out
    assert not list(tmp_path.glob(".merged.*")) and (out / "merge_info.json").exists()


# ------------------------------------------------------------------ what --force may replace

def refused_keeping(capsys, base, adapter, out, *extra) -> str:
    """A refusal that leaves no temporary folder behind; what must survive is checked by the caller."""
    assert run_merge(base, adapter, out, *extra) == 1
    assert not list(out.parent.glob(f".{out.name}.*.tmp"))
    return capsys.readouterr().err


def _hashes(root: Path) -> dict[str, str]:
    from conftest import sha256

    return {str(p.relative_to(root)): sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_force_never_replaces_a_folder_holding_an_adapter_or_a_users_file(pair, tmp_path, capsys):
    base, adapter = pair
    run = tmp_path / "run"
    shutil.copytree(adapter, run / "adapter")
    (run / "notes.txt").write_text("my notes")
    before = _hashes(tmp_path)
    for out in (run, tmp_path, base.parent):  # contains the adapter; contains everything; contains the base
        err = refused_keeping(capsys, base, run / "adapter", out, "--force")
        assert "--force replaces only an earlier merge's output" in err and "choose another output folder" in err, err
    assert _hashes(tmp_path) == before


def test_force_does_not_turn_a_file_into_a_folder(pair, tmp_path, capsys):
    base, adapter = pair
    f = tmp_path / "merged"
    f.write_text("a user's file")
    assert "is not a folder" in refused_keeping(capsys, base, adapter, f, "--force")
    assert f.read_text() == "a user's file" and not list(tmp_path.glob(".merged*"))


def test_force_replaces_an_earlier_merge_and_the_message_says_how(pair, tmp_path, capsys, monkeypatch):
    base, adapter = pair
    out = tmp_path / "merged"
    assert run_merge(base, adapter, out) == 0
    monkeypatch.setenv("FINLORA_MAKE", "1")  # as `make merge` runs it
    err = refused_keeping(capsys, base, adapter, out)
    assert 'already exists: add ARGS="--force" to replace an earlier merge\'s output' in err
    (out / "extra.txt").write_text("x")
    assert "holds extra.txt, which a merged model folder does not" in \
        refused_keeping(capsys, base, adapter, out, "--force")
    (out / "extra.txt").unlink()
    assert run_merge(base, adapter, out, "--force") == 0 and (out / "merge_info.json").is_file()


# ------------------------------------------------------------------ benchmark dry run

@pytest.mark.slow  # starts `axolotl merge-lora` twice: ~3 min of imports on 2 cores
def test_bench_small_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.merge", "--small", "--workdir", str(tmp_path)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "axolotl merge-lora" in out and out.count("peak RSS") == 3, out
    # ours is PEFT's merge by construction: bit-identical on the bf16 model and every float32 variant
    assert "ours    vs peft: bit-identical" in out, out
    assert out.count("ours: bit-identical") == 6, out
    assert "SIGKILL mid-merge, ours   : destination absent" in out, out
    # axolotl's, killed at the same point, leaves its first shard in the destination
    assert "SIGKILL mid-merge, axolotl: destination holds [" in out and "model-00001-of-00004.safetensors" in out, out
