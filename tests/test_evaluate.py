"""`make eval`: the sets a recipe is scored on, bad input before any model, and real runs
(both scorers, intervals, the cache, merged against adapter)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from conftest import SENTIMENT_PROMPT, TINY_ROWS, tiny_recipe
from finlora import ROOT
from finlora.data.tasks import RECIPE_TASKS, TEST_SETS
from finlora.errors import EvalError, FinLoRAError
from finlora.evaluate import bar_chart, default_sets, main, read_rows, report_table, score_set
from finlora.models import ModelError
from finlora.recipes import Recipe


def test_every_recipe_is_scored_on_its_own_tasks_sets():
    from finlora.recipes import recipe_names, split_name

    for name in recipe_names():
        task, _ = split_name(name)
        assert [s.name for s in default_sets(Recipe.open(name))] == [s.name for s in RECIPE_TASKS[task].test_sets]
    assert [s.name for s in default_sets(Recipe.open("ner_r8"))] == ["ner"]  # not fpb,fiqa
    assert [s.name for s in default_sets(Recipe.open("finer_r8"))] == ["finer", "fnxl"]
    cpu = [s.name for s in default_sets(Recipe.open("smollm2_sentiment_r8"))]
    assert sorted(cpu) == ["fiqa", "fpb_heldout", "nwgi_heldout", "tfns"] and "nwgi" not in cpu


def test_every_public_finlora_set_has_a_file_a_budget_and_published_figures():
    finlora = [s for s in TEST_SETS.values() if s.source is not None]
    assert len(finlora) == 15  # FinLoRA's 19 less CFA I-III and CPA REG, which are not public
    budgets = {s.finlora_name: s.max_new_tokens for s in finlora}
    assert budgets["fpb"] == 10 and budgets["xbrl_tags_extract"] == 20 and budgets["xbrl_formula_calc_extract"] == 30
    assert budgets["xbrl_finer"] == budgets["xbrl_fnxl"] == 100 and budgets["financebench"] == 50
    for s in finlora:
        assert s.source.path == f"test/{s.file}" and set(s.published) == {"base", "r8", "r4", "r8_dora", "r8_rslora"}
    assert TEST_SETS["fpb"].published["r8"] == (85.64, 0.922)  # FinLoRA README, LoRA 8-bit r8


def test_unknown_set_lists_the_known_ones():
    with pytest.raises(FinLoRAError, match="unknown test set .nosuch.; sets are: fpb, fiqa"):
        main(["--base", "x", "--datasets", "fpb,nosuch"])


def test_bad_rows_are_listed_by_line_before_any_model(tmp_path):
    s = TEST_SETS["fpb"]
    (tmp_path / s.file).write_text('{"context": "a", "target": "positive"}\n{"context": "b"}\nnot json\n'
                                   '{"context": 3, "target": "x"}\n')
    with pytest.raises(EvalError) as e:
        read_rows(s, tmp_path)
    msg = str(e.value)
    assert f"{tmp_path / s.file}:2: needs a string `context` and a `target`" in msg
    assert f"{tmp_path / s.file}:3:" in msg and f"{tmp_path / s.file}:4:" in msg and ":1:" not in msg


def _write(path, targets):
    path.write_text("".join(json.dumps({"context": f"Question {i}. Answer:", "target": t}) + "\n"
                            for i, t in enumerate(targets)))


def test_the_finlora_block_scores_the_targets_pandas_reads(tmp_path):
    """FinLoRA reads a test file with pandas' read_json(lines=True) and str()s each target, so a
    column of numbers is coerced ("1000000" beside "2.5": "1000000.0"); the finlora block scores
    those targets, the strict block the file's."""
    import pandas as pd

    s = TEST_SETS["formula"]
    path = tmp_path / s.file

    def finloras(sample=None):  # test_dataset.py's test_fin_tasks, as written
        df = pd.read_json(path_or_buf=path, lines=True)
        df = df.sample(frac=sample, random_state=42) if sample else df
        return [str(x) for x in df["target"].tolist()]

    for targets, want in ((["1000000", "2.5", "0.10", "3"], ["1000000.0", "2.5", "0.1", "3.0"]),
                          (["1000000", "abc", "2.5"], ["1000000", "abc", "2.5"]),  # text in the column: kept
                          (["1000000", "25"], ["1000000", "25"]),  # integers stay integers
                          ([1000000, 2.5], ["1000000.0", "2.5"])):  # JSON numbers, as FinLoRA's pandas reads them
        _write(path, targets)
        rows, _ = read_rows(s, tmp_path)
        assert [r.finlora_target for r in rows] == want == finloras()
        assert [r.target for r in rows] == [str(t) for t in targets]
    _write(path, ["1000000", "2.5", "7", "12.25"])
    assert [r.finlora_target for r in read_rows(s, tmp_path, sample=0.5)[0]] == finloras(0.5)
    rows, _ = read_rows(s, tmp_path)
    res = score_set(s, rows, [" 1000000", " 2.5", " 7", " 12.25"], "unused")
    # finlora: "1000000" holds no label ("1000000.0", ...) and "7" is not "7.0": 2.5 and 12.25 right
    assert res["finlora"]["accuracy"] == 0.5 and res["finlora"]["targets"] == ["1000000.0", "2.5", "7.0", "12.25"]
    assert res["strict"]["formula"]["accuracy"] == 1.0  # the file's numbers, to two decimals


def test_finloras_published_figure_stands_only_beside_its_metric(tmp_path):
    """FinLoRA published BERTScore F1 for xbrl_term: beside ROUGE-L F1 (the stand-in where the
    BERTScore model cannot be had) the table shows "-" and the chart no bar of FinLoRA's."""
    def block(metric, v):
        return {"n": 2, metric: v, "metric": metric, "ci": {metric: [v - 0.1, v + 0.1]}}

    def doc(text_metric):
        return {"meta": {"variant": "r8"},
                "sets": {n: {"published": dict(TEST_SETS[n].published)} for n in ("fpb", "xbrl_term")},
                "results": {m: {"fpb": {"finlora": block("accuracy", 0.5) | {"f1_weighted": 0.4}, "strict": {}},
                                "xbrl_term": {"finlora": block(text_metric, 0.3), "strict": {}}}
                            for m in ("base", "adapter")}}

    def cells(table, metric):  # FinLoRA base and r8 of the row of `metric`
        return [line.split(" | ")[6:8] for line in table.splitlines() if f" | {metric} | " in line][0]

    table = report_table(doc("rougeL_f1"))
    assert cells(table, "rougeL_f1") == ["-", "-"]
    assert cells(table, "accuracy") == ["68.73", "85.64"] and cells(table, "f1_weighted") == ["0.677", "0.922"]
    assert cells(report_table(doc("bertscore_f1")), "bertscore_f1") == ["0.574", "0.599"]
    bar_chart(doc("rougeL_f1"), tmp_path / "scores.png")
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_a_missing_set_names_the_command_that_writes_it(tmp_path):
    with pytest.raises(EvalError, match="headline_test.jsonl: test set headline not found; `make data TASK=headline`"):
        read_rows(TEST_SETS["headline"], tmp_path)
    with pytest.raises(EvalError, match="`make data` writes it"):
        read_rows(TEST_SETS["fpb_heldout"], tmp_path)


def test_sets_are_listed_before_a_model_loads_and_torch_is_not_needed_for_that(tmp_path):
    s = TEST_SETS["fiqa"]
    (tmp_path / s.file).write_text(json.dumps({"context": "Instruction: x\nInput: y\nAnswer: ", "target": "positive"})
                                   + "\n")
    code = ("import sys; from finlora.cli import run\n"
            f"rc = run('finlora.evaluate', ['--base', '{tmp_path}/no-model', '--adapter', '{tmp_path}/no-adapter',"
            f" '--datasets', 'fiqa', '--data-dir', '{tmp_path}'])\n"
            "print('torch loaded:', 'torch' in sys.modules); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: no adapter at {tmp_path}/no-adapter (no such folder)")
    assert "torch loaded: False" in proc.stdout and "Traceback" not in proc.stderr


def _tiny_set(tmp_path, name="fpb"):
    s = TEST_SETS[name]
    (tmp_path / s.file).write_text("".join(json.dumps({"context": SENTIMENT_PROMPT.format(text=t), "target": y}) + "\n"
                                           for t, y in TINY_ROWS))
    return s


@pytest.mark.slow
def test_adapter_for_another_base_is_refused(tiny_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(tiny_run["out"], adapter, ignore=shutil.ignore_patterns("prepared", "checkpoint-*"))
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    _tiny_set(tmp_path)
    with pytest.raises(ModelError, match="was trained on 'meta-llama/Llama-3.1-8B-Instruct'"):
        main(["--base", str(tiny_run["base"]), "--adapter", str(adapter), "--datasets", "fpb",
              "--data-dir", str(tmp_path), "--out", str(tmp_path / "eval")])


@pytest.mark.slow
def test_eval_writes_both_scorers_with_intervals_and_keeps_what_it_scored(tiny_run, tmp_path, capsys):
    _tiny_set(tmp_path)
    _tiny_set(tmp_path, "tfns")
    out = tmp_path / "eval"
    args = ["--base", str(tiny_run["base"]), "--adapter", str(tiny_run["out"]), "--datasets", "fpb,tfns",
            "--data-dir", str(tmp_path), "--out", str(out), "--batch-size", "8"]
    assert main(args) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert set(doc["results"]) == {"base", "adapter"}
    for model in ("base", "adapter"):
        r = doc["results"][model]["fpb"]
        assert r["finlora"]["n"] == len(TINY_ROWS) and set(r["finlora"]["ci"]) == {"accuracy", "f1_weighted"}
        lo, hi = r["finlora"]["ci"]["accuracy"]
        assert lo <= r["finlora"]["accuracy"] <= hi
        assert set(r["strict"]) == {"fpb"} and "unparsed" in r["strict"]["fpb"]
    assert "ci_minus_base" in doc["results"]["adapter"]["fpb"]["finlora"]
    rows = [json.loads(x) for x in (out / "predictions_adapter_tfns.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"id", "generated", "answer", "target", "target_repaired"}  # both targets, named
    report = (out / "report.md").read_text()
    assert "| fpb | 8 | accuracy |" in report and "69.97" in report  # FinLoRA's published TFNS base
    assert (out / "scores.png").read_bytes()[:4] == b"\x89PNG"
    # scored again with the same model, data and settings: kept, not generated again
    capsys.readouterr()
    before = (out / "predictions_adapter_fpb.jsonl").read_bytes()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert said.count("already scored with this model, data and settings: kept") == 4
    assert (out / "predictions_adapter_fpb.jsonl").read_bytes() == before
    assert json.loads((out / "metrics.json").read_text())["results"] == doc["results"]


@pytest.mark.slow
def test_merged_model_answers_as_the_adapter_does_in_fp32(tiny_run, tmp_path):
    """The same greedy answers from base + adapter (PEFT) and from the merged weights, in fp32;
    the disagreement rate is printed whatever it is."""
    from finlora.merge import merge

    s = _tiny_set(tmp_path)
    merged = tmp_path / "merged"
    merge(tiny_run["base"], tiny_run["out"], merged, progress=False)
    answers = {}
    for label, extra in (("adapter", ["--adapter", str(tiny_run["out"])]), ("merged", ["--merged", str(merged)])):
        out = tmp_path / f"eval_{label}"
        assert main(["--base", str(tiny_run["base"]), *extra, "--no-base", "--datasets", s.name,
                     "--data-dir", str(tmp_path), "--out", str(out)]) == 0
        answers[label] = [json.loads(x)["generated"] for x in (out / f"predictions_{label}_fpb.jsonl").read_text().splitlines()]
    differ = sum(a != b for a, b in zip(answers["adapter"], answers["merged"]))
    print(f"merged vs adapter: {differ} of {len(TINY_ROWS)} greedy answers differ")
    assert differ == 0


@pytest.mark.slow
def test_finloras_own_functions_give_the_finlora_block(finlora_scorer, tiny_run, tmp_path):
    """Re-score the written predictions with FinLoRA's test/test_dataset.py functions: the same
    accuracy and F1 to the last digit."""
    import sklearn.metrics

    ns = finlora_scorer
    _tiny_set(tmp_path)
    out = tmp_path / "eval"
    assert main(["--base", str(tiny_run["base"]), "--adapter", str(tiny_run["out"]), "--datasets", "fpb",
                 "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    for model in ("base", "adapter"):
        rows = [json.loads(x) for x in (out / f"predictions_{model}_fpb.jsonl").read_text().splitlines()]
        outs = [r["generated"].split("Answer:")[-1].strip() for r in rows]
        targets = [r["target"] for r in rows]
        acc, response = ns["evaluate_accuracy"](outs, targets, list(set(targets)))
        f1 = sklearn.metrics.f1_score(targets, response, average="weighted")
        assert doc["results"][model]["fpb"]["finlora"]["accuracy"] == acc
        assert doc["results"][model]["fpb"]["finlora"]["f1_weighted"] == f1


def test_shared_prefix_len_leaves_every_prompt_a_token():
    from finlora.models import shared_prefix_len

    assert shared_prefix_len([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter keeps its last token to feed
    assert shared_prefix_len([[1, 2, 3]]) == 0
    assert shared_prefix_len([[7, 1], [8, 1]]) == 0


@pytest.mark.slow
def test_shared_prefix_batches_generate_what_one_prompt_at_a_time_does(base_model_dir):
    """make eval's batches (left padding inside, prefix KV copied in) against plain
    per-prompt `model.generate` on the whole prompt: the base model rambles for all 8
    tokens, so every position after the prefix is exercised."""
    import torch

    from finlora.models import generate
    from finlora.models import load_model

    model, tok = load_model(str(base_model_dir))
    prompts = [SENTIMENT_PROMPT.format(text=t) for t, _ in TINY_ROWS[:6]]
    plain = []
    with torch.inference_mode():
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            g = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
            plain.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    ids = [tok(p)["input_ids"] for p in prompts]
    assert len({len(i) for i in ids}) > 1  # uneven lengths: the padding sits between prefix and prompt
    for bs in (4, 6):
        assert generate(model, tok, prompts, 8, bs, share_prefix=True) == plain
    assert generate(model, tok, prompts, 8, 4, share_prefix=False) == plain
    assert not model.get_output_embeddings()._forward_pre_hooks  # generate's head hook is removed


@pytest.mark.slow
def test_bench_eval_prints_ratios_and_identical_counts(tiny_run, tmp_path):
    """python -m benchmarks.eval end to end on 6 prompts: three rows, each with its ratio, and
    every batched text identical to the one-at-a-time baseline's."""
    s = _tiny_set(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "benchmarks.eval", "--base", str(tiny_run["base"]),
                           "--adapter", str(tiny_run["out"]), "--data", str(tmp_path / s.file), "--set", "fpb", "--n", "6",
                           "--batch-size", "3", "--repeat", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.rstrip().endswith("6/6 / 6/6")]
    assert [r.split()[0] for r in rows] == ["one", "batched", "+"]
    assert rows[0].split()[-4] == "1.00x"


def test_bitsandbytes_int8_cast_notice_is_dropped(caplog):
    """`make eval BITS=8` on a CPU: bitsandbytes logs one notice per 8-bit matmul (76,640 lines
    in one variants benchmark). finlora.cli drops that record; the logger and the message are
    bitsandbytes' own (read from its source here, so a release that renames them fails by name)."""
    import inspect
    import logging

    import bitsandbytes.autograd._functions as bnb_functions

    import finlora.cli  # noqa: F401  (installs the filters on import)

    msg = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"
    assert msg in inspect.getsource(bnb_functions) and bnb_functions.logger.name == "bitsandbytes.autograd._functions"
    with caplog.at_level(logging.WARNING):
        bnb_functions.logger.warning(msg, "torch.float32")
        bnb_functions.logger.warning("MatMul8bitLt: another notice")
    assert [r.getMessage() for r in caplog.records] == ["MatMul8bitLt: another notice"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A one-layer random Llama with a WordPiece tokenizer of a few words."""
    import torch
    from transformers import BertTokenizerFast, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_lm")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"question answer revenues goodwill , . :".split()]
    (path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(str(path / "vocab.txt"), clean_up_tokenization_spaces=True).save_pretrained(path)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=2,
                                 eos_token_id=3)).save_pretrained(path)
    return path


def test_generate_decodes_as_the_tokenizer_does(tiny_lm):
    """FinLoRA decodes with the tokenizer's own defaults; so does generate. Here the tokenizer's
    default cleans the spaces before "," and "." in Python (`clean_up_tokenization_spaces`) and
    its Rust decoder does not, so passing the flag would change the text; the generation is
    forced token by token. (For the BPE tokenizers of FinLoRA's models transformers 5 skips that
    clean-up whatever the flag: docs/EVAL.md, "Generation".)"""
    from tokenizers.decoders import WordPiece

    from finlora.models import generate, load_base

    model, tok = load_base(str(tiny_lm))
    tok.backend_tokenizer.decoder = WordPiece(cleanup=False)
    assert tok.clean_up_tokenization_spaces
    prompt = "question answer :"
    width = len(tok(prompt)["input_ids"])
    forced = tok("revenues , goodwill .", add_special_tokens=False)["input_ids"]
    out = generate(model, tok, [prompt], len(forced), progress=False,
                   prefix_allowed_tokens_fn=lambda _b, ids: [forced[len(ids) - width]])
    assert out == [tok.decode(forced, skip_special_tokens=True)] == ["revenues, goodwill."]


def test_4bit_is_nf4_with_double_quantization(tiny_lm):
    from finlora.models import load_base

    model, _ = load_base(str(tiny_lm), quant="4bit")
    q = model.config.quantization_config
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.nested  # the scales quantized too


def test_the_base_loads_at_the_recipes_precision_unless_bits_says(tiny_lm, tmp_path, capsys):
    """--recipe of a 4-bit (QLoRA) recipe: the base loads in 4-bit, as FinLoRA evaluates an r4
    adapter; --bits 16 loads it unquantized. (The merged "model" is the base itself.)"""
    recipe, _ = tiny_recipe(tmp_path, TINY_ROWS, base_model=str(tiny_lm), load_in_4bit=True)
    assert Recipe.open(recipe).bits == 4
    s = _tiny_set(tmp_path)
    for extra, bits, said in (([], 4, "eval: base in 4-bit, float32 (the recipe's precision; --bits to change it)"),
                              (["--bits", "16"], None, "eval: base unquantized, float32\n")):
        out = tmp_path / f"eval{bits}"
        assert main(["--recipe", str(recipe), "--merged", str(tiny_lm), "--no-base", "--datasets", s.name,
                     "--data-dir", str(tmp_path), "--out", str(out), "--limit", "2", *extra]) == 0
        assert said in capsys.readouterr().out
        assert json.loads((out / "metrics.json").read_text())["meta"]["bits"] == bits
