"""Inference: `make infer` against plain PEFT, adapter switching, merged model, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, SENTIMENT_PROMPT
from finlora.infer import InferError, main, parse_adapters, read_requests
from finlora.models import ModelError

PROMPT = "The company reported record quarterly revenue and raised its dividend."


def infer_json(*args: str) -> list[dict]:
    proc = subprocess.run([sys.executable, "scripts/infer.py", "--json", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def peft_greedy(base, adapter, prompt: str, max_new_tokens: int = 16) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_prompt_file_with_unknown_tag_names_the_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("[sentiment] Sales rose.\n\n[ner] Who is Tim Cook?\n")
    with pytest.raises(InferError, match=r"prompts.txt:3: unknown adapter tag 'ner' \(adapters: sentiment\)"):
        read_requests(f, {"sentiment": "x"})
    g = tmp_path / "prompts.jsonl"
    g.write_text('{"adapter": "sentiment", "prompt": "ok"}\n{"adapter": "sentiment"}\n')
    with pytest.raises(InferError, match=r"prompts.jsonl:2: field 'prompt' is missing"):
        read_requests(g, {"sentiment": "x"})
    assert parse_adapters(["a=/x", "b=/y"]) == {"a": "/x", "b": "/y"}


def test_a_bare_sentence_fills_the_text_of_its_tasks_template_only(tmp_path):
    import yaml

    from finlora.infer import Template, template_from_recipe

    sentiment = template_from_recipe(yaml.safe_load((ROOT / "recipes" / "sentiment_r8.yml").read_text()), "fpb")
    assert sentiment.filled("Sales rose.") == SENTIMENT_PROMPT.format(text="Sales rose.")
    assert sentiment.filled("x", "headline").startswith("Instruction: Does the news headline talk about price going up?")
    ner = template_from_recipe(yaml.safe_load((ROOT / "recipes" / "ner_r8.yml").read_text()))
    with pytest.raises(InferError, match="task ner's template also needs instruction"):
        ner.filled("John works at IBM")  # the instruction is per row: not the sentence again
    whole = "Instruction: What is the entity type of 'IBM'?\nInput: John works at IBM\nAnswer: "
    assert ner.filled(whole) == whole
    f = tmp_path / "prompts.jsonl"
    f.write_text(json.dumps({"prompt": "Who?", "task": "ner"}) + "\n")
    [req] = read_requests(f, {})
    with pytest.raises(InferError, match="needs instruction"):
        Template().filled(req.prompt, req.task)
    # the refusal comes before any model loads
    proc = subprocess.run([sys.executable, "scripts/infer.py", "--recipe", "ner_r8", "--prompt", "John works at IBM"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "needs instruction" in proc.stderr and "Traceback" not in proc.stderr


def test_a_prompt_files_line_keeps_its_trailing_space(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("[a] " + SENTIMENT_PROMPT.format(text="Sales rose.").replace("\n", "\\n") + "\n")
    [req] = read_requests(f, {"a": "x"})
    assert req.prompt == SENTIMENT_PROMPT.format(text="Sales rose.") and req.prompt.endswith("Answer: ")


@pytest.mark.slow
def test_make_infer_equals_direct_peft(tiny_run):
    proc = subprocess.run(["make", "-s", "infer", f"RECIPE={tiny_run['recipe']}", f"PROMPT={PROMPT}",
                           "ARGS=--no-stream --max-new-tokens 16 --task sentiment"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = peft_greedy(tiny_run["base"], tiny_run["out"], SENTIMENT_PROMPT.format(text=PROMPT))
    assert expected.strip() and expected in proc.stdout


@pytest.mark.slow
def test_adapters_switch_per_prompt_on_one_base(label_adapters, base_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"[pos] {PROMPT}\n[neg] {PROMPT}\n[pos] The meeting is on Tuesday.\n")
    rows = infer_json("--base", str(base_model_dir), "--adapter", f"pos={label_adapters['positive']}",
                      "--adapter", f"neg={label_adapters['negative']}", "--task", "sentiment",
                      "--file", str(prompts), "--max-new-tokens", "4")
    assert [r["adapter"] for r in rows] == ["pos", "neg", "pos"]
    # each adapter gives its own trained answer, whatever the text says
    assert rows[0]["answer"].strip().startswith("positive"), rows
    assert rows[1]["answer"].strip().startswith("negative"), rows
    assert rows[2]["answer"].strip().startswith("positive"), rows


@pytest.mark.slow
def test_three_adapters_cost_three_small_adapters_not_three_bases(tiny_run):
    from finlora.infer import load

    adapters = {name: str(tiny_run["out"]) for name in ("a", "b", "c")}
    model, tok, report = load(str(tiny_run["base"]), adapters, None, "float32", None, verbose=False)
    base_params = report[0][2]
    assert [r[0] for r in report] == ["base", "adapter a", "adapter b", "adapter c"]
    for what, mib, n in report[1:]:
        assert n == 645_120  # r x (in + out) over q/k/v, per adapter
        assert mib < 100, f"{what} grew RSS by {mib:.0f} MiB: a second base was loaded?"
    total = sum(p.numel() for p in model.parameters())
    assert total == base_params + 3 * 645_120


@pytest.mark.slow
def test_merged_and_adapter_give_the_same_greedy_text(tiny_run, tmp_path):
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "scripts/merge.py", "--base", str(tiny_run["base"]),
                           "--adapter", str(tiny_run["out"]), "--out", str(merged), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    common = ["--base", str(tiny_run["base"]), "--task", "sentiment", "--prompt", PROMPT, "--max-new-tokens", "12"]
    with_adapter = infer_json(*common, "--adapter", str(tiny_run["out"]))
    with_merged = infer_json(*common, "--merged", str(merged))
    assert with_adapter[0]["answer"] == with_merged[0]["answer"] and with_adapter[0]["answer"].strip()


@pytest.mark.slow
def test_adapter_for_another_base_is_refused_before_loading(tiny_run, tmp_path):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run["out"], adapter, ignore=shutil.ignore_patterns("prepared"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Qwen/Qwen2.5-0.5B"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="was trained on 'Qwen/Qwen2.5-0.5B'"):
        main(["--base", str(tiny_run["base"]), "--adapter", str(adapter), "--prompt", "hi"])


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["--load-in-8bit", "--load-in-4bit"])
def test_quantised_base_loads_and_answers_on_cpu(tiny_run, quant):
    rows = infer_json("--base", str(tiny_run["base"]), "--adapter", str(tiny_run["out"]), quant,
                      "--task", "sentiment", "--prompt", PROMPT, "--max-new-tokens", "4")
    assert rows[0]["answer"].strip()
