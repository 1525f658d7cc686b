"""`make infer`: ask a base model with adapters, or a merged model, streaming the answer
(docs/EVAL.md, "Inference"). Loading and decoding are finlora.models'."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from finlora.errors import InferError
from finlora.models import add_model_args, generate, load_model, open_recipe, rss_mib


@dataclass
class Request:
    prompt: str
    adapter: str | None = None
    task: str | None = None       # JSONL's "task": this prompt's template, when adapters of several tasks share a run


@dataclass
class Template:
    """How a prompt becomes model input, as the recipe trained it."""

    style: str = "raw"            # "raw" (the dataset's format string) or "chat"
    format: str = "{instruction}"
    task: str | None = None       # FinLoRA task whose template wraps a bare sentence

    def filled(self, text: str, task: str | None = None) -> str:
        """A bare sentence as the `{text}` of the task's template (a whole prompt, with its
        `Answer:`, as given); InferError when the template needs more than the sentence."""
        task = task or self.task
        if not task or "Answer:" in text:
            return text
        from finlora.data.tasks import get_task

        t = get_task(task)
        missing = [f for f in t.fields if f != "text" and f not in t.defaults]
        if missing:
            raise InferError(f"task {t.name}'s template also needs {', '.join(missing)}, which a bare sentence does not "
                             "give: write the whole prompt (ending in `Answer:`), or send it as is with --raw")
        return t.render({**t.defaults, "text": text})

    def apply(self, text: str, tok, task: str | None = None) -> str:
        text = self.filled(text, task)
        if self.style == "chat":
            return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
        return self.format.replace("{instruction}", text)


def template_from_recipe(cfg: dict, task: str | None = None) -> Template:
    from finlora.data.tasks import TASKS

    ds = (cfg.get("datasets") or [{}])[0]
    dtype = ds.get("type")
    if dtype == "chat_template":
        t = Template(style="chat")
    elif isinstance(dtype, dict):
        t = Template(style="raw", format=dtype.get("no_input_format") or dtype.get("format") or "{instruction}")
    else:
        t = Template()
    if task is None:
        # FinLoRA names data files <task>_train.jsonl; the longest matching task name wins
        stem = Path(ds.get("path", "")).name
        matches = [name for name in TASKS if stem.startswith(name + "_")]
        task = max(matches, key=len) if matches else None
    t.task = task
    return t


def read_requests(path: Path, adapters: dict[str, str]) -> list[Request]:
    """JSONL lines {"prompt": ..., "adapter": ...}, or plain text lines "[tag] prompt" / "prompt"."""
    out, problems = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e.msg})")
                continue
            prompt, tag, task = obj.get("prompt"), obj.get("adapter"), obj.get("task")
            if not isinstance(prompt, str) or not prompt.strip():
                problems.append(f"{where}: field 'prompt' is missing or empty")
                continue
        # a line's end is kept as written: a FinLoRA prompt ends in "Answer: ", as it was trained
        elif line.startswith("[") and "]" in line:
            tag, prompt, task = line[1:line.index("]")].strip(), line[line.index("]") + 1:].lstrip(), None
        else:
            tag, prompt, task = None, line.lstrip(), None
        if tag is not None and tag not in adapters:
            known = ", ".join(adapters) or "none were given"
            problems.append(f"{where}: unknown adapter tag {tag!r} (adapters: {known})")
            continue
        out.append(Request(prompt.replace("\\n", "\n"), tag, task))
    if problems:
        raise InferError("bad prompt file:\n" + "\n".join(problems))
    return out


def parse_adapters(specs: list[str]) -> dict[str, str]:
    """--adapter DIR (named "default") or --adapter NAME=DIR, repeatable."""
    out: dict[str, str] = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            name, path = "default", spec
        if name in out:
            raise InferError(f"adapter name {name!r} given twice")
        out[name] = path
    return out


def load(base: str, adapters: dict[str, str], merged: str | None, dtype: str, quant: str | None,
         allow_mismatch: bool = False, verbose: bool = True):
    """One base in memory; every adapter attached to it under its own name."""
    report: list = []
    model, tok = load_model(base, adapters, merged, dtype, quant, allow_mismatch, report=report)
    if verbose:
        for what, mib, n in report:
            print(f"infer: loaded {what}: {n:,} parameters, +{mib:.0f} MiB RSS", file=sys.stderr)
        print(f"infer: process RSS {rss_mib():.0f} MiB", file=sys.stderr)
    return model, tok, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Generate with a base model + LoRA adapter(s) or a merged model")
    add_model_args(p, "the adapter and the prompt template")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="LoRA adapter; repeat with NAME=DIR to keep several on one base")
    p.add_argument("--merged", help="merged model folder (instead of base + adapter)")
    p.add_argument("--no-adapter", action="store_true", help="with --recipe: the base model alone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt (a bare sentence is put into the task's template)")
    src.add_argument("--file", type=Path, help="prompts, one per line: '[adapter] text' or JSONL")
    p.add_argument("--task", help="FinLoRA task template for bare sentences (default: from the recipe's data)")
    p.add_argument("--raw", action="store_true", help="send prompts exactly as given, no template")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--json", action="store_true", help="print one JSON line per answer instead of text")
    a = p.parse_args(argv)

    adapters = parse_adapters(a.adapter)
    recipe = open_recipe(a, InferError)
    template = Template(task=a.task)
    if recipe is not None:
        if not adapters and not a.merged and not a.no_adapter:
            adapters = {"default": str(recipe.output_dir)}
        template = template_from_recipe(recipe.config, a.task)
    if a.merged and adapters:
        raise InferError("--merged already contains its adapter; do not also pass --adapter")
    if a.raw:
        template = Template()
    quant = "8bit" if a.load_in_8bit else "4bit" if a.load_in_4bit else None

    if a.file and not a.file.is_file():
        raise InferError(f"--file {a.file}: no such file (one prompt a line, or JSONL)")
    requests = read_requests(a.file, adapters) if a.file else [Request(a.prompt)]
    for req in requests:  # a prompt the template cannot take is refused before any model loads
        template.filled(req.prompt, req.task)
    model, tok, _ = load(a.base, adapters, a.merged, a.dtype, quant, a.allow_base_mismatch, verbose=not a.json)
    stream = not (a.no_stream or a.json)
    sampling = {"do_sample": True, "temperature": a.temperature} if a.temperature > 0 else {}
    if stream:
        from transformers import TextStreamer

        sampling["streamer"] = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    for req in requests:
        name = req.adapter or (next(iter(adapters)) if adapters else None)
        if len(adapters) > 1:
            model.set_adapter(name)
        if not a.json:
            print(f"--- [{name or ('merged' if a.merged else 'base')}] {req.prompt}", flush=True)
        [answer] = generate(model, tok, [template.apply(req.prompt, tok, req.task)], a.max_new_tokens, progress=False,
                            **sampling)
        if a.json:
            print(json.dumps({"adapter": name, "prompt": req.prompt, "answer": answer}, ensure_ascii=False), flush=True)
        elif not stream:
            print(answer, flush=True)
    return 0
