"""`make check`: each planted fault in a copy of the default recipe is one clear line
naming the file and the key; nothing trains."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DEFAULT_RECIPE, ROOT, SENTIMENT_PROMPT, TINY_ROWS


@pytest.fixture
def make_recipe(base_model_dir, tmp_path):
    """make_recipe(text=None, rows=None, **overrides) -> a tmp copy of the default recipe."""

    def make(text: str | None = None, rows: list | None = None, raw_data: str | None = None, **overrides) -> Path:
        data = tmp_path / "train.jsonl"
        if raw_data is not None:
            data.write_text(raw_data)
        else:
            data.write_text("".join(json.dumps({"context": SENTIMENT_PROMPT.format(text=t), "target": y}) + "\n"
                                    for t, y in (rows or TINY_ROWS)))
        recipe = tmp_path / "r.yml"
        if text is None:
            cfg = yaml.safe_load(DEFAULT_RECIPE.read_text())
            cfg["datasets"][0]["path"] = str(data)
            cfg["output_dir"] = str(tmp_path / "out")
            cfg["dataset_prepared_path"] = str(tmp_path / "prepared")
            cfg.update(overrides)
            text = yaml.safe_dump(cfg, sort_keys=False)
        recipe.write_text(text)
        return recipe

    return make


def run_check(recipe: Path, **kw):
    from finlora import check

    return check.run(recipe, pending=False, **kw)


def only_error(r, *needles: str) -> str:
    assert r.errors, f"expected an error, got none; notes: {r.notes} warnings: {r.warnings}"
    for e in r.errors:
        assert "\n" not in e and e.startswith("error: "), e
    hits = [e for e in r.errors if all(n in e for n in needles)]
    assert hits, f"no error with {needles}: {r.errors}"
    return hits[0]


def test_default_recipe_copy_passes(make_recipe):
    r = run_check(make_recipe())
    assert not r.errors, r.errors
    assert any("rows, longest" in n for n in r.notes)
    assert any(n.startswith("note: disk:") for n in r.notes)


def test_yaml_syntax_error_names_file_and_line(make_recipe):
    text = DEFAULT_RECIPE.read_text().replace("lora_r: 8", "lora_r: [8")
    recipe = make_recipe(text=text)
    r = run_check(recipe)
    line = next(i for i, s in enumerate(text.splitlines(), 1) if "lora_r: [8" in s)
    e = only_error(r, "not valid YAML")
    assert f"r.yml:{line + 1}" in e or f"r.yml:{line}" in e


def test_unknown_key_typo(make_recipe):
    recipe = make_recipe()
    recipe.write_text(recipe.read_text().replace("lora_r: 8", "lora_rnak: 8"))
    e = only_error(run_check(recipe), "lora_rnak: unknown key")
    assert "did you mean lora_r?" in e
    assert f"{recipe}:" in e and e.split(":")[2].isdigit()  # file:line


def test_deprecated_keys_name_axolotls_replacement(make_recipe):
    # the old GPU recipes' `flash_attention: true` (pydantic Field(deprecated=...))
    recipe = make_recipe()
    recipe.write_text(recipe.read_text().replace("attn_implementation: sdpa", "flash_attention: true"))
    e = only_error(run_check(recipe), "flash_attention: deprecated in Axolotl: Use `attn_implementation: flash_attention_2`")
    assert f"{recipe}:" in e and e.split(":")[2].isdigit()  # file:line
    # a deprecation only one of Axolotl's validators logs (a dataset's message_field_role)
    recipe = make_recipe()
    cfg = yaml.safe_load(recipe.read_text())
    cfg["datasets"][0].update(type="chat_template", message_field_role="from")
    recipe.write_text(yaml.safe_dump(cfg, sort_keys=False))
    only_error(run_check(recipe), "deprecated in Axolotl: message_field_role is deprecated")


def test_duplicate_key(make_recipe):
    recipe = make_recipe()
    recipe.write_text(recipe.read_text() + "lora_r: 16\n")
    only_error(run_check(recipe), "lora_r: key appears twice")


def test_axolotl_rejects_a_wrong_type(make_recipe):
    # our own check says so first, before Axolotl's validation (which would say it too)
    only_error(run_check(make_recipe(lora_r="eight")), "lora_r", "'eight' is not a whole number")


def test_missing_paths(make_recipe, tmp_path):
    only_error(run_check(make_recipe(base_model=str(tmp_path / "nope"))), "base_model", "does not exist")
    recipe = make_recipe()
    cfg = yaml.safe_load(recipe.read_text())
    cfg["datasets"][0]["path"] = str(tmp_path / "missing.jsonl")
    recipe.write_text(yaml.safe_dump(cfg))
    only_error(run_check(recipe), "datasets[0].path", "missing.jsonl does not exist")
    only_error(run_check(make_recipe(deepspeed="recipes/deepspeed/zero9.json")), "deepspeed", "zero9.json")


def test_bad_data_rows_name_the_line(make_recipe):
    good = json.dumps({"context": "Q: x\nAnswer: ", "target": "positive"})
    raw = "\n".join([good, "{not json", json.dumps({"context": "Q"}), json.dumps({"context": "Q", "target": 3})]) + "\n"
    r = run_check(make_recipe(raw_data=raw))
    only_error(r, "datasets[0].path", "line 2", "invalid JSON")
    only_error(r, "line 3", "missing field 'target'")
    only_error(r, "line 4", "wrong type for field 'target'")


def test_sequence_len_shorter_than_the_data(make_recipe):
    e = only_error(run_check(make_recipe(sequence_len=32)), "sequence_len: 32 is shorter than")
    assert "tokens" in e


def test_tokenizer_without_pad(make_recipe, base_model_dir, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in base_model_dir.iterdir():  # all but the weights: nothing here loads them
        if f.suffix != ".safetensors":
            (base / f.name).write_bytes(f.read_bytes())
    tc = json.loads((base / "tokenizer_config.json").read_text())
    tc.pop("pad_token", None)
    tc.pop("pad_token_id", None)
    (base / "tokenizer_config.json").write_text(json.dumps(tc))
    r = run_check(make_recipe(base_model=str(base), special_tokens={"eos_token": "<|im_end|>"}))
    only_error(r, "special_tokens.pad_token", "no pad token")
    r = run_check(make_recipe(base_model=str(base), special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))
    assert not [e for e in r.errors if "pad" in e], r.errors


def test_safetensors_required(make_recipe):
    only_error(run_check(make_recipe(save_safetensors=False)), "save_safetensors", "pickled")


def fake_checkpoint(folder: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    ck = folder / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    save_file({"base_model.model.x.lora_B.weight": torch.zeros(4, 2)}, str(ck / "adapter_model.safetensors"))
    (ck / "adapter_config.json").write_text("{}")
    torch.save({"state": {}, "param_groups": []}, ck / "optimizer.pt")
    torch.save({"last_epoch": step}, ck / "scheduler.pt")
    torch.save({"python": None, "cpu": torch.get_rng_state()}, ck / "rng_state.pth")
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return ck


def test_output_dir_with_checkpoints_needs_resume(make_recipe, tmp_path):
    recipe = make_recipe()
    fake_checkpoint(tmp_path / "out", 2)
    only_error(run_check(recipe), "output_dir", "already holds checkpoints", "RESUME=1")
    r = run_check(recipe, resume=True)
    assert not r.errors, r.errors
    assert f"note: resuming from {tmp_path / 'out' / 'checkpoint-2'}" in r.notes


def test_auto_resume_starts_afresh_without_checkpoints_and_resumes_with_them(make_recipe, tmp_path):
    """As Axolotl does: `auto_resume_from_checkpoints` is no error on a first run."""
    recipe = make_recipe(auto_resume_from_checkpoints=True)
    r = run_check(recipe)
    assert not r.errors and not any("resuming" in n for n in r.notes), r.errors
    ck = fake_checkpoint(tmp_path / "out", 2)
    assert f"note: resuming from {ck}" in run_check(recipe).notes
    (ck / "optimizer.pt").unlink()
    only_error(run_check(recipe), "auto_resume_from_checkpoints but", "no complete checkpoint")


def test_a_prepared_data_folder_make_train_would_refuse_to_empty(make_recipe, tmp_path):
    recipe = make_recipe()
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "notes.txt").write_text("mine")
    only_error(run_check(recipe), "dataset_prepared_path", "notes.txt", "not Axolotl's tokenised-data cache")
    assert (tmp_path / "prepared" / "notes.txt").read_text() == "mine"


def test_numbers_as_axolotl_reads_them(make_recipe):
    """`1e-4` (YAML 1.1 reads a string; Axolotl's schema the number) and the Trainer's fractional save steps."""
    recipe = make_recipe()
    recipe.write_text(recipe.read_text().replace("learning_rate: 0.0015", "learning_rate: 1e-4"))
    from finlora.recipes import Recipe

    r = Recipe.open(recipe, ["--save-steps", "0.25", "--warmup-steps=1e1"])
    assert (r.get("learning_rate"), r.get("save_steps")) == (1e-4, 0.25)
    assert r.value_problems() == [("warmup_steps", "10.0 is not a whole number")]
    assert not run_check(recipe, extra_args=["--save-steps", "0.25"]).errors


def test_resume_skips_partial_newest_checkpoint(make_recipe, tmp_path):
    from finlora.check import checkpoint_problems

    recipe = make_recipe()
    out = tmp_path / "out"
    fake_checkpoint(out, 2)
    ck4 = fake_checkpoint(out, 4)
    # each way a save can be cut short makes checkpoint-4 incomplete
    for cut in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "adapter_model.safetensors"):
        data = (ck4 / cut).read_bytes()
        (ck4 / cut).write_bytes(data[: len(data) // 2])
        assert checkpoint_problems(ck4), cut
        (ck4 / cut).unlink()
        assert checkpoint_problems(ck4), cut
        (ck4 / cut).write_bytes(data)
        assert not checkpoint_problems(ck4), cut
    (ck4 / "optimizer.pt").unlink()
    r = run_check(recipe, resume=True)
    assert not r.errors and f"note: resuming from {out / 'checkpoint-2'}" in r.notes
    assert any("checkpoint-4 is incomplete" in w and "optimizer.pt missing" in w for w in r.warnings)
    # only incomplete checkpoints: RESUME=1 is an error, not a fresh start
    import shutil

    shutil.rmtree(out / "checkpoint-2")
    only_error(run_check(recipe, resume=True), "RESUME=1", "no complete checkpoint")


def test_pickled_checkpoint_weights_are_not_resumed(tmp_path):
    from finlora.check import checkpoint_problems

    ck = fake_checkpoint(tmp_path, 2)
    (ck / "adapter_model.safetensors").rename(ck / "adapter_model.bin")
    assert any("pickled" in p for p in checkpoint_problems(ck))


def test_existing_adapter_only_warns(make_recipe, tmp_path):
    recipe = make_recipe()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"x")
    r = run_check(recipe)
    assert not r.errors and any("will overwrite it" in w for w in r.warnings)


def test_not_enough_disk(make_recipe, monkeypatch):
    import shutil

    from finlora import check

    real = shutil.disk_usage
    monkeypatch.setattr(check.shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    e = only_error(run_check(make_recipe(save_total_limit=4)), "output_dir", "MB free", "save_total_limit")
    assert "5 checkpoint(s)" in e


def test_make_check_cli_and_train_refuses_before_loading_anything(make_recipe, tmp_path):
    recipe = make_recipe()
    recipe.write_text(recipe.read_text().replace("lora_r: 8", "lora_rnak: 8"))
    p = subprocess.run(["make", "-s", "check", f"RECIPE={recipe}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0
    assert "lora_rnak: unknown key" in p.stderr
    recipe = make_recipe()
    fake_checkpoint(tmp_path / "out", 2)
    p = subprocess.run([sys.executable, "scripts/train.py", str(recipe)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "RESUME=1" in p.stderr and "nothing was started" in p.stderr
    assert not (tmp_path / "out" / "debug.log").exists()  # Axolotl never ran
