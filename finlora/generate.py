"""`make recipes`: the matrix (`recipes/matrix.yml`) -> generated `recipes/<task>_<variant>.yml`,
and the recipe table in README.md. The top layer (README, Layout): nothing imports it.
"""

from __future__ import annotations

import argparse
import io
import json
import string
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.scalarstring import DoubleQuotedScalarString

from finlora import ROOT
from finlora.atomic import write_text
from finlora.errors import RecipeError
from finlora.params import count_recipe
from finlora.plan import estimate
from finlora.recipes import BITS_LABEL, DEFAULT_RECIPE, RECIPE_DIR, Recipe, load_matrix, recipe_name, recipe_names, \
    rel, split_name

HEADER = "# generated from recipes/matrix.yml by `make recipes`; edit the matrix, not this file"


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


def _fill(value, ctx: dict, fmt: string.Formatter = string.Formatter()):
    """A template value with its `{...}` filled from `ctx`: a string that is one placeholder
    keeps the placeholder's type (an int, a list, None); strings that YAML must quote
    (`<|eot_id|>`, `{instruction}`) are written in double quotes; lists and mappings recursively."""
    if isinstance(value, dict):
        return {k: _fill(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, ctx) for v in value]
    if not isinstance(value, str):
        return value
    parsed = list(fmt.parse(value))
    if len(parsed) == 1 and parsed[0][0] == "" and parsed[0][1] and not parsed[0][2]:
        return fmt.get_field(parsed[0][1], (), ctx)[0]
    text = value.format_map(ctx)
    return dq(text) if "<" in text or "{" in text else text


def build_items(task: str, variant: str, m: dict) -> list[Item]:
    """The recipe of `task` x `variant` as the matrix's `recipe:` template writes it."""
    t, v, model = m["tasks"][task], m["variants"][variant], m["models"][m["variants"][variant]["model"]]
    accum = t["gradient_accumulation_steps"] * int(m["reference_gpus"])
    config = json.loads((ROOT / model["config_dir"] / "config.json").read_text())
    ctx = {"header": HEADER[2:], "name": recipe_name(task, variant), "task_name": task, "task": t, "variant": v,
           "model": model, "common": m["common"], "reference_gpus": m["reference_gpus"], "accum": accum,
           "global_batch": t["micro_batch_size"] * accum, "scale": v["lora_alpha"] / v["lora_r"],
           "rs_scale": v["lora_alpha"] / v["lora_r"] ** 0.5, "layers": config["num_hidden_layers"]}
    items: list[Item] = []
    for entry in m["recipe"]:
        if "only" in entry and variant not in entry["only"]:
            continue
        if "#" in entry:
            items.append(("#", entry["#"].format_map(ctx)))
        elif "section" in entry:
            title = entry["section"]
            items += [("#", ""), ("#", f"--- {title} " + "-" * max(3, 73 - len(title)))]
        else:
            value, why = v.get("keys", {}).get(entry["key"], (entry.get("value"), entry.get("why")))
            items.append((entry["key"], _fill(value, ctx), why.format_map(ctx) if why else None))
    return items


def generate(matrix: dict | None = None) -> dict[str, str]:
    """{recipe name: file text} for the whole matrix."""
    m = matrix or load_matrix()
    out = {}
    for variant in m["variants"]:
        for task in m["tasks"]:
            name = recipe_name(task, variant)
            if name == DEFAULT_RECIPE:  # the one recipe written by hand
                raise RecipeError(f"matrix would overwrite hand-written recipe {name}")
            out[name] = render(document(build_items(task, variant, m)))
    return out


README = ROOT / "README.md"
TABLE_START = "<!-- recipe-table:start (generated by `make recipes` from recipes/matrix.yml) -->"
TABLE_END = "<!-- recipe-table:end -->"


def recipe_table(generated: dict[str, str] | None = None, gpus: int = 1) -> str:
    """The README table: every generated recipe as the matrix makes it (not as a file on
    disk may have been edited), with its trainable parameters and planned memory."""
    m = load_matrix()
    rows = ["| recipe | task | model | rank | bits | variant | trainable params | "
            f"planned GiB/GPU ({gpus} GPU{'s' if gpus > 1 else ''}) | smallest card |",
            "|---|---|---|---:|---|---|---:|---:|---|"]
    for name, text in (generated or generate(m)).items():
        task, variant = split_name(name, m)
        r = Recipe.from_text(RECIPE_DIR / f"{name}.yml", text)
        pc, p = count_recipe(r), estimate(r, gpus)
        card = f"{p.smallest_card} GB" if p.smallest_card else "> 141 GB"
        label = m["models"][m["variants"][variant]["model"]]["label"]
        rows.append(f"| `{name}` | {task} | {label} | {pc.r} | {r.bits} ({BITS_LABEL[r.bits]}) | {r.variant} | "
                    f"{pc.trainable:,} | {p.peak_gib:.1f} | {card} |")
    return "\n".join(rows)


def readme_with_table(text: str, generated: dict[str, str] | None = None) -> str:
    """README.md's text with the recipe table between the markers regenerated."""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        raise RecipeError(f"{README}: recipe table markers not found ({TABLE_START!r} ... {TABLE_END!r})")
    return text[:start + len(TABLE_START)] + "\n" + recipe_table(generated) + "\n" + text[end:]


def expected_files(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR,
                   readme: Path | None = README) -> dict[Path, str]:
    """{path: the text the matrix gives it}: every generated recipe, and README.md with its table."""
    generated = generate(matrix)
    out = {recipe_dir / f"{name}.yml": text for name, text in generated.items()}
    if readme is not None and readme.is_file():
        out[readme] = readme_with_table(readme.read_text(encoding="utf-8"), generated)
    return out


def write_all(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR) -> list[Path]:
    written = []
    for p, text in expected_files(matrix, recipe_dir, README if recipe_dir == RECIPE_DIR else None).items():
        if not p.is_file() or p.read_text(encoding="utf-8") != text:
            write_text(p, text)
            written.append(p)
    return written


def drift(matrix: dict | None = None, recipe_dir: Path = RECIPE_DIR, readme: Path | None = README) -> list[str]:
    """Messages for every generated recipe that differs from the matrix, is missing,
    or carries the generated header without a matrix entry (stale)."""
    expected = expected_files(matrix, recipe_dir, readme)
    problems = []
    for p, text in expected.items():
        if not p.is_file():
            problems.append(f"{rel(p)}: missing")
        elif p.read_text(encoding="utf-8") != text:
            problems.append("README.md: recipe table differs from the matrix" if p == readme
                            else f"{rel(p)}: differs from the matrix")
    for p in sorted(recipe_dir.glob("*.yml")):
        if p not in expected and p.read_text(encoding="utf-8").startswith(HEADER):
            problems.append(f"{rel(p)}: generated but no longer in the matrix (delete it)")
    return problems


def main(argv: list[str] | None = None) -> int:
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
