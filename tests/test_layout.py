"""The package's shape, as README's Layout section draws it: layers, bottom to top, and
no module importing one above it (lazy imports inside functions included), so that the
training path never pulls in the generator and no import circle can form."""

from __future__ import annotations

import ast

from finlora import ROOT

LAYERS = [
    {"finlora", "errors", "cli", "atomic", "redact", "llama_tokenizer", "patches"},
    {"recipes", "lengths"},
    {"axolotl_config", "launch", "axolotl_plugin", "answer_logits", "loss_curve"},
    {"data"},
    {"params", "plan", "scoring"},
    {"check", "train", "evaluate", "infer", "merge", "merge_io", "smoke", "base_model", "models", "gpu_install",
     "clean", "seeds"},
    {"generate"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """`finlora.data.prepare` -> "data"; `finlora.check` -> "check"; `finlora` -> "finlora"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "finlora"


def _imports(path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "finlora":
            if node.module == "finlora":  # `from finlora import recipes, ROOT`
                out += [(node.lineno, f"finlora.{a.name}") for a in node.names if a.name != "ROOT"]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "finlora"]
    return out


def test_every_module_has_a_layer():
    units = {_unit("finlora." + str(p.relative_to(ROOT / "finlora").with_suffix("")).replace("/", "."))
             for p in (ROOT / "finlora").rglob("*.py")}
    units.discard("__init__")
    assert units <= set(LAYER), f"modules without a layer (add them to README's Layout and here): {units - set(LAYER)}"


def test_no_module_imports_one_above_it():
    upward = []
    for p in sorted((ROOT / "finlora").rglob("*.py")):
        me = _unit("finlora." + str(p.relative_to(ROOT / "finlora").with_suffix("")).replace("/", "."))
        if me == "__init__":
            continue
        for line, module in _imports(p):
            them = _unit(module)
            if LAYER.get(them, -1) > LAYER[me]:
                upward.append(f"{p.relative_to(ROOT)}:{line}: {me} (layer {LAYER[me]}) imports {module} "
                              f"(layer {LAYER[them]})")
    assert not upward, "\n".join(upward)


def test_the_product_never_reads_the_shared_folder_beside_the_checkout():
    """Users clone without ../shared: no product code, script or benchmark names it (the tests
    may, through conftest.SHARED, and skip without it)."""
    import re

    named = []
    for folder in ("finlora", "scripts", "benchmarks"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.suffix in (".py", ".sh") and re.search(r"ROOT\.parent|\.\./shared|\"shared\"", p.read_text()):
                named.append(str(p.relative_to(ROOT)))
    assert named == [], named
