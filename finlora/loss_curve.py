"""The project's two charts share this: a training run's loss against its step (`loss.png`),
and the figure plumbing `make eval`'s `scores.png` uses too."""

from __future__ import annotations

from pathlib import Path


def subplots(figsize: tuple[float, float]):
    """A figure and its axes, drawn off screen: a bare `Figure` (matplotlib's idiom without pyplot:
    no backend, no display, freed with its last reference), laid out tight when saved."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=110, layout="tight")
    return fig, fig.subplots()


def save_png(fig, out: str | Path) -> Path:
    """Write `fig` atomically (a savefig that fails half way keeps the previous file)."""
    from finlora.atomic import atomic_open

    out = Path(out)
    with atomic_open(out, "wb", encoding=None) as f:
        fig.savefig(f, format="png")
    return out


def plot_loss(rows: list[dict], out: str | Path, title: str = "") -> Path:
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(f"LoRA training loss - {title}" if title else "LoRA training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, out)
