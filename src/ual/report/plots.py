"""PNG plots of a run: score and smoothing distributions per source, loss curves."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    from ual.io import atomic_open

    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_distributions(rows: list[dict], key: str, title: str, xlabel: str, path: Path) -> Path:
    """One histogram per data source of rows[key] (scores or eps), overlaid."""
    by_source = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            by_source[r["source"]].append(r[key])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    lo = min(min(v) for v in by_source.values())
    hi = max(max(v) for v in by_source.values())
    bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
    for source, values in sorted(by_source.items()):
        ax.hist(values, bins=bins, alpha=0.55, label=f"{source} (n={len(values)}, mean={sum(values)/len(values):.3f})")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_loss_curves(histories: dict[str, list[dict]], path: Path) -> Path:
    """Training loss per optimiser step, one line per mode."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for mode, history in histories.items():
        points = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
        if points:
            ax.plot(*zip(*points), label=mode, linewidth=1.2)
    ax.set_title("training loss (each mode's own objective)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.legend()
    return _save(fig, path)
