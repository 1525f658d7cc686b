#!/usr/bin/env python
"""Benchmark: batched greedy evaluation against one prompt at a time.

Same model, same prompts, same process. Prints examples per second of each, their
ratio, and whether the predictions (generated text and parsed label) are identical.

    python scripts/bench_eval.py [--n 64] [--batch-size 32] [--data FILE]
"""
import argparse
import sys
import time
from pathlib import Path

from finlora import ROOT
from finlora.data.tasks import TASKS
from finlora.evaluate import MAX_NEW_TOKENS, generate, load_examples, parse_prediction
from finlora.models import load_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(ROOT / "outputs/base/SmolLM2-135M-Instruct"))
    p.add_argument("--adapter", default=str(ROOT / "outputs/smollm2_sentiment_r8"))
    p.add_argument("--data", type=Path, default=ROOT / "data/test/fpb_test.jsonl")
    p.add_argument("--task", default="fpb")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    a = p.parse_args()
    task = TASKS[a.task]
    adapter = a.adapter if (Path(a.adapter) / "adapter_config.json").is_file() else None
    model, tok = load_model(a.base, adapter=adapter)
    prompts = [e.context for e in load_examples(a.data, task, a.n)]
    new = MAX_NEW_TOKENS[task.answer_type]
    generate(model, tok, prompts[:2], new, 2, desc="warm-up")

    runs = {}
    for label, bs in (("one at a time", 1), (f"batched ({a.batch_size})", a.batch_size)):
        t0 = time.perf_counter()
        texts = generate(model, tok, prompts, new, bs, desc=label)
        runs[label] = (time.perf_counter() - t0, texts)
    (t1, single), (tb, batched) = runs.values()
    same_text = sum(x == y for x, y in zip(single, batched))
    same_label = sum(parse_prediction(task, x) == parse_prediction(task, y) for x, y in zip(single, batched))
    print(f"\nmodel: {a.base}" + (f" + adapter {adapter}" if adapter else " (no adapter found)"))
    print(f"data:  {a.data} ({len(prompts)} prompts, max_new_tokens {new})")
    for label, (secs, _) in runs.items():
        print(f"{label:>16}: {len(prompts) / secs:7.2f} examples/s ({secs:.1f} s)")
    print(f"{'speed-up':>16}: {t1 / tb:.2f}x")
    print(f"identical text:   {same_text}/{len(prompts)}; identical labels: {same_label}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
