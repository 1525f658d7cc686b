"""`make seeds RECIPE=x SEEDS=1,2,3`: train and score a recipe once per seed, then report
the mean, the spread and FinLoRA's t-interval of every score.

Each seed is `make train`'s code with `--seed s` into `<output_dir>-seed<s>/`, then `make
eval`'s code on the recipe's sets (the base is scored once, with the first seed). The
interval is FinLoRA's (test/compute_dataset_stats/confidence_intervals.py): half-width
t(0.975, n-1) x s / sqrt(n), s the sample standard deviation (n-1). Written to
`<output_dir>-seeds/seeds.json` and `seeds.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

from finlora.errors import RecipeError


def t_interval(values: list[float]) -> dict:
    """Mean, sample standard deviation and FinLoRA's 95% t half-width of `values`."""
    from scipy.stats import t

    n = len(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    return {"n": n, "mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values),
            "half_width_95": float(t.ppf(0.975, n - 1)) * sd / math.sqrt(n) if n > 1 else None}


def main(argv: list[str] | None = None) -> int:
    from finlora import evaluate, recipes, train
    from finlora.atomic import write_json, write_text

    p = argparse.ArgumentParser(description="Train and score a recipe over several seeds")
    p.add_argument("--recipe", default=recipes.DEFAULT_RECIPE)
    p.add_argument("--seeds", required=True, help="comma list, e.g. 1,2,3 (at least two)")
    p.add_argument("--datasets", help="as make eval's DATASETS (default: the recipe task's sets)")
    p.add_argument("--sample", help="as make eval's SAMPLE")
    p.add_argument("axolotl_args", nargs=argparse.REMAINDER, help="overrides for every run, e.g. --max-steps 20")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"SEEDS={a.seeds!r}: whole numbers, comma-separated") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise RecipeError(f"SEEDS={a.seeds!r}: at least two different seeds")
    recipe = recipes.Recipe.open(a.recipe, a.axolotl_args)
    base_out = recipe.output_dir
    scores: dict[str, dict[str, list[float]]] = {}
    for k, seed in enumerate(seeds):
        out = base_out.with_name(f"{base_out.name}-seed{seed}")
        args = [*a.axolotl_args, "--seed", str(seed), "--output-dir", str(out),
                "--dataset-prepared-path", str(out / "prepared")]
        rc = train.main([str(recipe.path), *args])
        if rc:
            return rc
        eval_args = ["--recipe", str(recipe.path), "--adapter", str(out), *(["--no-base"] if k else [])]
        eval_args += ["--datasets", a.datasets] if a.datasets else []
        eval_args += ["--sample", a.sample] if a.sample else []
        evaluate.main(eval_args)
        doc = json.loads((out / "eval" / "metrics.json").read_text())
        for name, res in doc["results"]["adapter"].items():
            # dict.fromkeys: the headline metric is often "accuracy" itself, counted once per seed
            for metric in dict.fromkeys(("accuracy", "f1_weighted", res["finlora"].get("metric"))):
                if metric in res["finlora"]:
                    scores.setdefault(name, {}).setdefault(metric, []).append(res["finlora"][metric])
    summary = {name: {m: t_interval(v) | {"values": v} for m, v in ms.items()} for name, ms in scores.items()}
    folder = base_out.with_name(f"{base_out.name}-seeds")
    write_json(folder / "seeds.json", {"recipe": recipes.rel(recipe.path), "seeds": seeds, "scores": summary})
    lines = [f"# {recipe.name} over seeds {', '.join(map(str, seeds))} (FinLoRA's scoring)", "",
             "| set | metric | mean | sd | 95% t half-width | min | max |", "|---|---|---|---|---|---|---|"]
    for name, ms in summary.items():
        for m, s in ms.items():
            hw = "-" if s["half_width_95"] is None else f"{s['half_width_95']:.4f}"
            lines.append(f"| {name} | {m} | {s['mean']:.4f} | {s['sd']:.4f} | {hw} | {s['min']:.4f} | {s['max']:.4f} |")
    write_text(folder / "seeds.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"seeds: wrote {recipes.rel(folder / 'seeds.json')}, seeds.md")
    return 0
