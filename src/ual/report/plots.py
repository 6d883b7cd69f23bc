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
    """Training curves per optimiser step, one line per mode, in two panels.

    Left, the plain NLL (the eps = 0 term of the loss, logged as "nll"): the
    same quantity for every mode, so the lines are comparable. Right, each
    mode's own objective ("loss"): its smoothing term makes it differ per mode.
    A run logged before "nll" existed appears on the right only.
    """
    fig, (ax_nll, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.6))
    panels = [(ax_nll, "nll", "plain NLL (eps = 0 term): comparable across modes", "NLL"),
              (ax_loss, "loss", "each mode's own objective", "loss")]
    for ax, key, title, ylabel in panels:
        # One colour per mode in both panels, whether or not the mode has an "nll".
        for i, (mode, history) in enumerate(histories.items()):
            points = [(h["step"], h[key]) for h in history if key in h and "step" in h]
            if points:
                ax.plot(*zip(*points), label=mode, linewidth=1.2, color=f"C{i}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f'no "{key}" logged', ha="center", va="center", transform=ax.transAxes, color="grey")
    return _save(fig, path)


def _reliability_axes(ax, curves: dict[str, list[dict]], title: str) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="calibrated")
    for name, bins in curves.items():
        if bins:
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o",
                    markersize=3, linewidth=1.2, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.set_xlabel("confidence (bin mean)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8, loc="upper left")


def plot_reliability(curves: dict[str, list[dict]], path: Path, title: str = "reliability diagram") -> Path:
    """Reliability diagram: per model, bin mean confidence against bin accuracy (bins given as data)."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    _reliability_axes(ax, curves, title)
    return _save(fig, path)


def plot_reliability_grid(panels: dict[str, dict[str, list[dict]]], path: Path, title: str) -> Path:
    """One reliability diagram per panel (e.g. per data source), side by side."""
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        _reliability_axes(ax, curves, name)
    fig.suptitle(title)
    return _save(fig, path)


def plot_benchmarks(per_model: dict[str, dict[str, dict]], path: Path) -> Path:
    """Accuracy per benchmark (one group of bars per task, one bar per model) with its 95% bootstrap interval
    over the items, and the chance level of each task's choices as a dashed line where it is known."""
    import numpy as np

    tasks = list(dict.fromkeys(t for rows in per_model.values() for t in rows))
    models = list(per_model)
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(tasks) + 1), 3.6))
    for k, model in enumerate(models):
        x = np.arange(len(tasks)) + (k - (len(models) - 1) / 2) * width
        acc = [per_model[model].get(t, {}).get("acc") for t in tasks]
        ci = [per_model[model].get(t, {}).get("acc_ci") or [a, a] for t, a in zip(tasks, acc)]
        keep = [i for i, a in enumerate(acc) if a is not None]
        err = np.array([[acc[i] - ci[i][0] for i in keep], [ci[i][1] - acc[i] for i in keep]])
        ax.bar(x[keep], [acc[i] for i in keep], width, yerr=err, capsize=2, label=model)
    ax.set_xticks(np.arange(len(tasks)), [f"{t}\n(n={max(r.get(t, {}).get('n', 0) for r in per_model.values())})"
                                          for t in tasks], fontsize=8)
    ax.set_ylabel("accuracy (95% CI over items)")
    ax.set_ylim(0, 1)
    ax.set_title("benchmarks, each choice scored as a continuation")
    ax.legend(fontsize=8, ncol=len(models))
    return _save(fig, path)


def plot_training_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Held-out NLL (solid) and training NLL (dashed) against the optimiser step, one colour per mode: where
    the held-out curve turns up while the training one keeps falling, the mode overfits."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, (mode, rows) in enumerate(curves.items()):
        colour = f"C{k}"
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["heldout"].get("all") for r in rows], "-o", ms=3, color=colour, label=f"{mode} held-out")
        ax.plot(steps, [r.get("train") for r in rows], "--", color=colour, alpha=0.7, label=f"{mode} train")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("NLL per response token")
    ax.set_title("evaluation during training")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_seed_curves(modes: dict[str, dict], path: Path) -> Path:
    """Across training seeds (training_curves.seed_curve_summary's "modes"): per mode the mean held-out NLL
    (solid) and training NLL (dashed) against the optimiser step, each in its shaded 95% t band across seeds."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for k, (mode, summary) in enumerate(modes.items()):
        colour = f"C{k}"
        for key, style, alpha, label in (("heldout", "-o", 0.2, "held-out"), ("train", "--", 0.1, "train")):
            cells = [(p["step"], p["heldout"].get("all") if key == "heldout" else p["train"]) for p in summary["points"]]
            cells = [(x, c) for x, c in cells if c and c.get("estimate") is not None]
            if not cells:
                continue
            ax.plot([x for x, _ in cells], [c["estimate"] for _, c in cells], style, ms=3, color=colour,
                    alpha=1.0 if key == "heldout" else 0.7, label=f"{mode} {label} ({len(summary['seeds'])} seeds)")
            band = [(x, c["low"], c["high"]) for x, c in cells if c.get("low") is not None and c.get("high") is not None]
            if band:  # one seed gives no interval, hence no band
                ax.fill_between(*zip(*band), color=colour, alpha=alpha, linewidth=0)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("NLL per response token")
    ax.set_title("evaluation during training: mean over seeds, 95% t band")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)
