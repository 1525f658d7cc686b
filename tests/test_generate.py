"""`make recipes`: the matrix -> generated recipes (ruamel.yaml keeps the comments), the
drift check, and the README recipe table."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from finlora import ROOT
from finlora import generate as gen
from finlora.recipes import load_matrix, recipe_names

GENERATED = recipe_names()


def test_matrix_covers_every_task_and_variant():
    m = load_matrix()
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
    assert gen.drift(recipe_dir=tmp_path) == []
    p = tmp_path / "ner_r8.yml"
    p.write_text(p.read_text().replace("lora_r: 8", "lora_r: 16"))
    (tmp_path / "finer_r4.yml").unlink()
    stale = tmp_path / "old_r2.yml"
    stale.write_text(gen.HEADER + "\nlora_r: 2\n")
    problems = "\n".join(gen.drift(recipe_dir=tmp_path))
    assert "ner_r8.yml: differs" in problems
    assert "finer_r4.yml: missing" in problems
    assert "old_r2.yml: generated but no longer in the matrix" in problems


def test_rendered_yaml_round_trips_and_has_header():
    m = load_matrix()
    for variant in m["variants"]:
        for task in m["tasks"]:
            doc = gen.document(gen.build_items(task, variant, m))
            text = gen.render(doc)
            assert text.startswith(gen.HEADER + "\n")
            assert yaml.safe_load(text) == doc


def test_emitter_keeps_the_recipe_layout():
    # the layout of the hand-written recipe: comments beside values at column 34, `null`
    # written out, double quotes where YAML needs quotes, list items indented under their key
    m = load_matrix()
    text = gen.render(gen.document(gen.build_items("sentiment", "r8", m)))
    lines = text.splitlines()
    assert "trust_remote_code: false          # plain Llama architecture: no remote code needed" in lines
    assert "deepspeed: null" in lines
    assert '      format: "{instruction}"' in lines and '  eos_token: "<|eot_id|>"' in lines
    assert lines[lines.index("lora_target_modules:              # attention projections only, as in FinLoRA")
                 + 1] == "  - q_proj"
    assert "  - path: ./data/train/sentiment_train.jsonl" in lines and "    ds_type: json" in lines
    # every comment beside a value that fits starts at column 34; a longer one follows it
    beside = [ln for ln in lines if not ln.startswith("#") and " # " in ln]
    assert len(beside) > 20
    for ln in beside:
        value = ln.split(" # ", 1)[0].rstrip()
        assert ln.index("# ") == (34 if len(value) < 34 else len(value) + 1), ln
    # the section headers and the comment lines above a key stay where they were put
    assert "\n\n# --- multi-GPU " in text and "\n# --- outputs " in text
    assert text.index("# FinLoRA {\"context\", \"target\"} JSONL") < text.index("\ndatasets:")


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


def test_recipe_table_lists_every_recipe():
    from finlora.generate import recipe_table

    table = recipe_table()
    for name in GENERATED:
        assert f"| `{name}` |" in table
    assert "| `sentiment_70b_r4` | sentiment | Llama-3.1-70B-Instruct | 4 | 4 (NF4) | QLoRA | 11,141,120 |" in table


def test_table_comes_from_the_matrix_not_an_edited_file(tmp_path, monkeypatch):
    """Editing a generated recipe by hand is drift of that recipe alone: the README table is
    the matrix's, so it does not drift with it."""
    from finlora import generate

    path = ROOT / "recipes" / "ner_r8.yml"
    text = path.read_text()
    edited = tmp_path / "recipes"
    edited.mkdir()
    for p in (ROOT / "recipes").glob("*.yml"):
        (edited / p.name).write_text(p.read_text())
    (edited / "ner_r8.yml").write_text(text.replace("lora_r: 8", "lora_r: 16"))
    problems = generate.drift(recipe_dir=edited, readme=ROOT / "README.md")
    assert problems == [f"{edited / 'ner_r8.yml'}: differs from the matrix"]
