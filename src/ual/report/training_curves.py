"""The report's section on evaluation during training (train/MODE/curve.jsonl, training/curves.py)."""

from __future__ import annotations

from pathlib import Path

from ual.io import read_jsonl


def read_curve(path: Path) -> list[dict]:
    """train/MODE/curve.jsonl's rows (none when the mode was not evaluated during training)."""
    return read_jsonl(path) if path.exists() else []


def best_point(rows: list[dict]) -> dict | None:
    """The row with the lowest held-out NLL over all sources (the first of equals)."""
    scored = [r for r in rows if r.get("heldout", {}).get("all") is not None]
    return min(scored, key=lambda r: r["heldout"]["all"]) if scored else None


def curves_section(curves: dict[str, list[dict]]) -> list[str]:
    """Per mode: held-out NLL at the start, at its best point and at the end, with the training NLL beside it.
    The verdict compares the final models; the best point is a selection on the held-out data, declared as one."""
    lines = ["## Evaluation during training", "",
             "Held-out NLL (all sources) and training NLL per response token at each evaluated point "
             "(train/MODE/curve.jsonl). The verdict above compares the **final** models; the best point by held-out "
             "NLL is chosen on the held-out data itself, so it is shown here as a selection, not compared.", "",
             "| mode | points | start | best (step) | final (step) | final train NLL | final gap |",
             "|---|---:|---:|---|---|---:|---:|"]
    for mode, rows in curves.items():
        if not rows:
            continue
        first, last, best = rows[0], rows[-1], best_point(rows)
        gap = (last["heldout"]["all"] - last["train"]) if last.get("train") is not None else None
        lines.append(f"| {mode} | {len(rows)} | {first['heldout']['all']:.4f} | "
                     f"{best['heldout']['all']:.4f} ({best['step']}) | {last['heldout']['all']:.4f} ({last['step']}) | "
                     f"{last['train']:.4f} | {gap:+.4f} |" if gap is not None else
                     f"| {mode} | {len(rows)} | {first['heldout']['all']:.4f} | {best['heldout']['all']:.4f} "
                     f"({best['step']}) | {last['heldout']['all']:.4f} ({last['step']}) | | |")
    turned = [m for m, rows in curves.items() if rows and best_point(rows) is not rows[-1]]
    lines += ["", ("Held-out NLL turned up after its best point (overfitting) for: " + ", ".join(turned) + ".")
              if turned else "No mode's held-out NLL turned up before the end of training.", ""]
    return lines
