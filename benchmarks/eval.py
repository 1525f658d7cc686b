"""Benchmark: `make eval`'s generation against one prompt at a time.

Same adapter, same prompts, same process. The baseline is what a user writes first:
the PEFT model, one `generate()` per prompt. Then each of make eval's choices is added
in turn: length-sorted batches, then the shared-prefix KV cache (make eval's default).
Prints examples per second of each, the ratio to the baseline, and how many generated
texts and parsed labels are identical to the baseline's. Each configuration runs
`--repeat` times, interleaved, and the fastest run counts: on a shared 2-core VM the
same run varies by 10-20% from one minute to the next.

    python -m benchmarks.eval [--n 128] [--batch-size 32] [--repeat 2] [--adapter DIR|none]
"""
import argparse
import sys
import time
from pathlib import Path

from finlora import ROOT
from finlora.cli import run
from finlora.data.tasks import TEST_SETS
from finlora.errors import EvalError
from finlora.evaluate import read_rows
from finlora.models import generate, load_model
from finlora.scoring import answer_text, first_label


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=str(ROOT / "outputs/base/SmolLM2-135M-Instruct"))
    p.add_argument("--adapter", default=str(ROOT / "outputs/smollm2_sentiment_r8"))
    p.add_argument("--data", type=Path, default=ROOT / "data/test/fpb_heldout_test.jsonl")
    p.add_argument("--set", default="fpb_heldout", help="the registry test set the file is (its token budget)")
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)
    s = TEST_SETS[a.set]
    adapter = a.adapter if (Path(a.adapter) / "adapter_config.json").is_file() else None
    peft_model, tok = load_model(a.base, adapter=adapter)
    rows, _ = read_rows(s, a.data.parent, limit=a.n) if a.data.name == s.file else (None, None)
    if rows is None:
        raise EvalError(f"--data {a.data}: must be named {s.file}, the file of --set {s.name}")
    prompts = [r.context for r in rows]
    labels = sorted({r.target.lower() for r in rows})
    new = s.max_new_tokens
    generate(peft_model, tok, prompts[:2], new, 2, desc="warm-up")

    bs = a.batch_size
    plan = [("one at a time (baseline)", peft_model, 1, False),
            (f"batched ({bs})", peft_model, bs, False),
            ("+ shared prefix (make eval)", peft_model, bs, True)]
    runs: dict[str, tuple[float, list[str]]] = {}
    for rep in range(a.repeat):
        for label, model, size, share in plan:
            t0 = time.perf_counter()
            texts = generate(model, tok, prompts, new, size, desc=f"{label} [{rep + 1}/{a.repeat}]", share_prefix=share)
            secs = time.perf_counter() - t0
            if label not in runs or secs < runs[label][0]:
                runs[label] = (secs, texts)

    base_secs, base_texts = runs[plan[0][0]]
    base_labels = [first_label(answer_text(t), labels)[0] for t in base_texts]
    print(f"\nmodel: {a.base}" + (f" + adapter {adapter}" if adapter else " (no adapter found)"))
    print(f"data:  {a.data} ({len(prompts)} prompts, max_new_tokens {new}); best of {a.repeat} runs each")
    print(f"{'':26} {'examples/s':>10} {'seconds':>8} {'speed-up':>8}  identical text / labels")
    for label, (secs, texts) in runs.items():
        same_text = sum(x == y for x, y in zip(texts, base_texts))
        same_label = sum(first_label(answer_text(x), labels)[0] == y for x, y in zip(texts, base_labels))
        print(f"{label:26} {len(prompts) / secs:10.2f} {secs:8.1f} {base_secs / secs:7.2f}x  "
              f"{same_text}/{len(prompts)} / {same_label}/{len(prompts)}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
