"""`make recipes`: the matrix (`recipes/matrix.yml`) -> generated `recipes/<task>_<variant>.yml`,
and the recipe table in README.md.

This sits on top of the house: it imports the readers and the planner, and nothing on
the training path imports it.
"""

from __future__ import annotations

import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from finlora import ROOT
from finlora.errors import RecipeError
from finlora.recipes import RECIPE_DIR, load_matrix, recipe_name, rel

HEADER = "# generated from recipes/matrix.yml by `make recipes`; edit the matrix, not this file"
HAND_WRITTEN = {"smollm2_sentiment_r8"}


# --------------------------------------------------------------------------- rendering

# A recipe is built as a list of items: ("#", text) is a comment line ("" = blank
# line) above the next key, (key, value, why) a key with its value and the comment
# beside it.
Item = tuple

# Comments beside values start at this column (0-based), as in the hand-written recipe.
COMMENT_COLUMN = 34
# Special tokens and format templates in double quotes, as in the hand-written recipe
# (ruamel would write `<|eot_id|>` plain and `'{instruction}'` in single quotes).
dq = DoubleQuotedScalarString


def document(items: list[Item]) -> CommentedMap:
    """The recipe as a ruamel.yaml mapping, with every comment line and `why` attached."""
    doc, above = CommentedMap(), []
    for it in items:
        if it[0] == "#":
            above.append(it[1])
            continue
        key, value, why = it
        doc[key] = value
        if above:
            doc.yaml_set_comment_before_after_key(key, before="\n".join(above))
            above = []
        if why:
            doc.yaml_add_eol_comment(why, key, column=COMMENT_COLUMN)
    return doc


class _Representer(RoundTripRepresenter):
    """Writes `deepspeed: null`, not round-trip mode's bare `deepspeed:`."""


_Representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))


def render(doc: CommentedMap) -> str:
    y = YAML()  # round-trip mode: keeps the comments
    y.Representer = _Representer
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 4096  # a long value stays on its line
    out = io.StringIO()
    y.dump(doc, out)
    return out.getvalue()


def _section(title: str) -> list[Item]:
    return [("#", ""), ("#", f"--- {title} " + "-" * max(3, 73 - len(title)))]


def build_items(task: str, variant: str, m: dict) -> list[Item]:
    t = m["tasks"][task]
    v = m["variants"][variant]
    c = m["common"]
    model = m["models"][v["model"]]
    name = recipe_name(task, variant)
    bits = v["bits"]
    is_70b = "70b" in v["model"]
    rslora = bool(v.get("rslora", False))
    dora = bool(v.get("dora", False))
    ds = v.get("deepspeed")
    ref_gpus = int(m["reference_gpus"])
    # FinLoRA's accumulation is per GPU on `ref_gpus` GPUs; one process reaches the same
    # global batch by accumulating ref_gpus times as many micro batches.
    accum = t["gradient_accumulation_steps"] * ref_gpus
    global_batch = t["micro_batch_size"] * accum
    scale = v["lora_alpha"] / v["lora_r"]

    it: list[Item] = [
        ("#", HEADER[2:]),
        ("#", ""),
        ("#", f"{name}: {v['summary']}."),
        ("#", f"Model {model['label']}, task {task}. GPU recipe (SDPA attention, bitsandbytes);"),
        ("#", "the CPU default is recipes/smollm2_sentiment_r8.yml."),
        ("#", f"Run:    make train RECIPE={name} [GPUS=n] [NODES=m]   (after `make setup GPU=1`)"),
        ("#", f"Memory: make plan RECIPE={name} GPUS=n     Trainable parameters: make params RECIPE={name}"),
        ("#", f"Global batch {global_batch} = micro_batch_size {t['micro_batch_size']} x gradient_accumulation_steps "
              f"{accum} on one GPU, FinLoRA's {t['micro_batch_size']} x {t['gradient_accumulation_steps']} x {ref_gpus} GPUs;"),
        ("#", "`make train GPUS=n` divides the accumulation by n to keep it (and says so when it cannot)."),
    ]
    it += _section("model")
    it += [
        ("base_model", model["base_model"], "gated on the hub: accept the license, then `hf auth login`"),
        ("model_type", "LlamaForCausalLM", None),
        ("tokenizer_type", "AutoTokenizer", None),
        ("trust_remote_code", False, "plain Llama architecture: no remote code needed"),
        ("load_in_8bit", bits == 8, "LLM.int8 frozen base: half the memory of bf16" if bits == 8 else None),
        ("load_in_4bit", bits == 4,
         "NF4 + double quantization (Axolotl's qlora defaults), bf16 compute" if bits == 4 else None),
        ("special_tokens", {"eos_token": dq("<|eot_id|>"), "pad_token": dq("<|finetune_right_pad_id|>")},
         "Instruct turns end in <|eot_id|>; 128004 is Llama 3.1's reserved pad"),
    ]
    it += _section("LoRA")
    adapter_why = ("Axolotl builds the 4-bit bitsandbytes config only for adapter: qlora"
                   if bits == 4 else "LoRA on a frozen base")
    it += [
        ("adapter", "qlora" if bits == 4 else "lora", adapter_why),
        ("lora_r", v["lora_r"], None),
        ("lora_alpha", v["lora_alpha"],
         f"alpha/sqrt(r) = {v['lora_alpha'] / v['lora_r'] ** 0.5:.2f} (rsLoRA scaling)" if rslora
         else f"scale alpha/r = {scale:g}, as in the reference recipe" if scale == 2
         else f"scale alpha/r = {scale:g}: FinLoRA's {v['lora_r']}-rank configs keep alpha {v['lora_alpha']}"),
        ("lora_dropout", c["lora_dropout"], None),
        ("lora_target_modules", list(c["lora_target_modules"]), c["why_targets"]),
        ("lora_fan_in_fan_out", False, "Llama stores Linear weights as (out, in)"),
        ("peft_use_rslora", rslora, "rank-stabilised scaling alpha/sqrt(r)" if rslora else None),
        ("peft_use_dora", dora,
         "adds a magnitude vector per output channel; slower: recomputes the weight norm each step"
         if dora else None),
        # Axolotl 0.19 turns its fused Triton LoRA kernels on for non-8-bit LoRA unless told
        # not to; they are CUDA-only and none has run under these recipes (or with ZeRO-3).
        ("lora_qkv_kernel", False, "Axolotl's fused LoRA kernels: off until proven with these recipes"),
        ("lora_o_kernel", False, None),
        ("lora_mlp_kernel", False, None),
        ("lora_embedding_kernel", False, None),
    ]
    it += _section("data")
    it += [
        ("#", f"FinLoRA {{\"context\", \"target\"}} JSONL at ./data/train/{task}_train.jsonl. The"),
        ("#", "context ends in \"Answer: \", so the prompt is the context as is and the loss"),
        ("#", "covers only the answer tokens (train_on_inputs: false)."),
        ("datasets", [{
            "path": f"./data/train/{task}_train.jsonl",
            "ds_type": "json",
            "type": {
                "field_instruction": "context",
                "field_output": "target",
                "format": dq("{instruction}"),
                "no_input_format": dq("{instruction}"),
            },
        }], None),
        ("dataset_prepared_path", f"./outputs/{name}/prepared", None),
        ("val_set_size", 0.0, "held-out scoring is `make eval`'s job"),
        ("train_on_inputs", False, None),
        ("sequence_len", t["sequence_len"], t["why_len"]),
        ("excess_length_strategy", "drop",
         "a longer row is left out, and the finlora plugin lists it (file:line, tokens); `raise` stops the run"),
        ("sample_packing", False, f"one example per row keeps the global batch = {global_batch} examples"),
        ("pad_to_sequence_len", False, None),
        ("shuffle_merged_datasets", True, None),
    ]
    it += _section("optimisation")
    opt_why = {
        "adamw_bnb_8bit": "8-bit AdamW states (bitsandbytes), as in the reference recipe",
        "paged_adamw_8bit": "QLoRA's optimizer: 8-bit states, paged to CPU on memory spikes",
    }.get(v["optimizer"])
    it += [
        ("seed", 42, None),
        ("num_epochs", t["num_epochs"], f"FinLoRA {t['finlora']}"),
        ("micro_batch_size", t["micro_batch_size"], "per GPU, FinLoRA's batch_size"),
        ("gradient_accumulation_steps", accum,
         f"FinLoRA's {t['gradient_accumulation_steps']} x its {ref_gpus} GPUs: global batch {global_batch} on one GPU"),
        ("optimizer", v["optimizer"], opt_why),
        ("learning_rate", c["learning_rate"], "every FinLoRA config"),
        ("lr_scheduler", "cosine", "FinLoRA's template"),
        ("warmup_steps", c["warmup_steps"], "FinLoRA's template"),
        ("weight_decay", 0.0, None),
        ("max_grad_norm", 1.0, None),
    ]
    it += _section("precision and speed")
    it += [
        ("bf16", "auto", "bf16 on Ampere or newer GPUs; fp16 on older ones"),
        ("fp16", False, None),
        ("tf32", False, "matmuls run in bf16; tf32 would only touch the fp32 LoRA math"),
        ("gradient_checkpointing", True,
         f"recompute activations in backward: {'80' if is_70b else '32'} layers x {t['sequence_len']} tokens"),
        ("gradient_checkpointing_kwargs", {"use_reentrant": True},
         "QLoRA + ZeRO-3 fails with non-reentrant checkpointing" if ds and "zero3" in ds
         else "Axolotl's default, written out"),
        ("attn_implementation", "sdpa",
         "torch SDPA (its flash/mem-efficient kernels on CUDA): no flash-attn build to install"),
        ("dataloader_num_workers", 0, "data is tokenised up front; collation is cheap"),
    ]
    it += _section("multi-GPU")
    if ds and "zero3" in ds:
        it += [
            ("#", "ZeRO-3 shards the frozen 4-bit base over the GPUs (70B NF4 is ~37 GB + bf16"),
            ("#", "embeddings). QLoRA + ZeRO-3 needs the 4-bit weights stored in a float dtype so"),
            ("#", "DeepSpeed can partition them: Axolotl sets bnb_4bit_quant_storage=bfloat16, and"),
            ("#", "skips prepare_model_for_kbit_training (no fp32 upcast of embeddings/norms)."),
            ("#", "On one 80 GB+ GPU ZeRO-3 adds nothing but works; needs `make setup GPU=1` (deepspeed)."),
            ("deepspeed", ds, None),
        ]
    else:
        it += [
            ("#", "Plain DDP when GPUS>1: every GPU holds the whole frozen base. FinLoRA's template"),
            ("#", "names ZeRO-1, which would shard only the LoRA optimizer state (tens of MB"),
            ("#", "here); use recipes/deepspeed/zero3.json to shard the base itself."),
            ("deepspeed", ds, None),
        ]
    it += _section("outputs")
    it += [
        ("output_dir", f"./outputs/{name}", None),
        ("save_safetensors", True, None),
        ("save_strategy", "epoch", "an adapter per epoch (a few MB each)"),
        ("save_total_limit", 2, None),
        ("logging_steps", 10, None),
        ("use_tensorboard", False, None),
        ("plugins", ["finlora.axolotl_plugin.FinLoRAPlugin"],
         "on a GPU only the loss log and curve (loss_log.jsonl, loss.png)"),
    ]
    return it


def generate(matrix: dict | None = None) -> dict[str, str]:
    """{recipe name: file text} for the whole matrix."""
    m = matrix or load_matrix()
    out = {}
    for variant in m["variants"]:
        for task in m["tasks"]:
            name = recipe_name(task, variant)
            if name in HAND_WRITTEN:
                raise RecipeError(f"matrix would overwrite hand-written recipe {name}")
            out[name] = render(document(build_items(task, variant, m)))
    return out


README = ROOT / "README.md"
TABLE_START = "<!-- recipe-table:start (generated by `make recipes` from recipes/matrix.yml) -->"
TABLE_END = "<!-- recipe-table:end -->"


def recipe_table(generated: dict[str, str] | None = None, gpus: int = 1) -> str:
    """The README table: every generated recipe as the matrix makes it (not as a file on
    disk may have been edited), with its trainable parameters and planned memory."""
    from finlora.params import count_recipe
    from finlora.plan import estimate
    from finlora.recipes import Recipe

    generated = generated or generate()
    rows = ["| recipe | task | model | rank | bits | variant | trainable params | "
            f"planned GiB/GPU ({gpus} GPU{'s' if gpus > 1 else ''}) | smallest card |",
            "|---|---|---|---:|---|---|---:|---:|---|"]
    m = load_matrix()
    for variant, v in m["variants"].items():
        for task in m["tasks"]:
            name = recipe_name(task, variant)
            r = Recipe.from_text(RECIPE_DIR / f"{name}.yml", generated[name])
            pc, p = count_recipe(r), estimate(r, gpus)
            card = f"{p.smallest_card} GB" if p.smallest_card else "> 141 GB"
            bits = {16: "16 (bf16)", 8: "8 (int8)", 4: "4 (NF4)"}[r.bits]
            rows.append(f"| `{name}` | {task} | {m['models'][v['model']]['label']} | {pc.r} | {bits} | {r.variant} | "
                        f"{pc.trainable:,} | {p.peak_gib:.1f} | {card} |")
    return "\n".join(rows)


def readme_with_table(text: str, generated: dict[str, str] | None = None) -> str:
    """README.md's text with the recipe table between the markers regenerated."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise RecipeError(f"{README}: recipe table markers not found ({TABLE_START!r} ... {TABLE_END!r})")
    return text[:start + len(TABLE_START)] + "\n" + recipe_table(generated) + "\n" + text[end:]


def write_all(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR) -> list[Path]:
    from finlora.atomic import write_text

    written = []
    generated = generate(matrix)
    for name, text in generated.items():
        p = recipe_dir / f"{name}.yml"
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            write_text(p, text)
            written.append(p)
    if recipe_dir == RECIPE_DIR and README.is_file():
        old = README.read_text(encoding="utf-8")
        new = readme_with_table(old, generated)
        if new != old:
            write_text(README, new)
            written.append(README)
    return written


def drift(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR, readme: Path | None = README) -> list[str]:
    """Messages for every generated recipe that differs from the matrix, is missing,
    or carries the generated header without a matrix entry (stale)."""
    expected = generate(matrix)
    problems = []
    for name, text in expected.items():
        p = recipe_dir / f"{name}.yml"
        if not p.is_file():
            problems.append(f"{rel(p)}: missing")
        elif p.read_text(encoding="utf-8") != text:
            problems.append(f"{rel(p)}: differs from the matrix")
    for p in sorted(recipe_dir.glob("*.yml")):
        if p.stem not in expected and p.read_text(encoding="utf-8").startswith(HEADER):
            problems.append(f"{rel(p)}: generated but no longer in the matrix (delete it)")
    if readme is not None and readme.is_file():
        text = readme.read_text(encoding="utf-8")
        if readme_with_table(text, expected) != text:
            problems.append("README.md: recipe table differs from the matrix")
    return problems


def main(argv: list[str] | None = None) -> int:
    """`make recipes` writes the recipes that differ; `make recipes-check` fails listing the
    recipes (and the README table) that drift from the matrix; --table prints the table."""
    import argparse

    from finlora.recipes import recipe_names

    p = argparse.ArgumentParser(description="Generate recipes/<task>_<variant>.yml from recipes/matrix.yml")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="fail when a committed recipe differs from the matrix")
    g.add_argument("--table", action="store_true", help="print the Markdown recipe table")
    p.add_argument("--gpus", type=int, default=1, help="GPUs for the table's memory column (default 1)")
    a = p.parse_args(argv)
    if a.check:
        problems = drift()
        if problems:
            raise RecipeError("recipes drift from recipes/matrix.yml (run `make recipes`):\n"
                              + "\n".join(f"  {line}" for line in problems))
        print(f"recipes: {len(recipe_names())} generated recipes match recipes/matrix.yml")
        return 0
    if a.table:
        print(recipe_table(gpus=a.gpus))
        return 0
    written = write_all()
    for path in written:
        print(f"recipes: wrote {rel(path)}")
    print(f"recipes: {len(recipe_names())} recipes, {len(written)} changed")
    return 0
