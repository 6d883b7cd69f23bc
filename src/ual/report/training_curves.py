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


# ---------------------------------------------------------------- across training seeds (ual ablate --seeds N)


def read_seed_curves(root: Path, seeds, modes) -> dict[str, dict]:
    """{mode: {seed: rows}} from each seed's sub-run RUN/seeds/seed-K/train/MODE/curve.jsonl; only the modes and
    seeds that have rows, modes in the order given."""
    from ual.runfolder import RunFolder

    found = {m: {s: read_curve(RunFolder(root / "seeds" / f"seed-{s}").train_dir(m) / "curve.jsonl") for s in seeds}
             for m in modes}
    return {m: {s: rows for s, rows in by_seed.items() if rows} for m, by_seed in found.items() if any(by_seed.values())}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def seed_curve_summary(curves: dict[str, dict], level: float = 0.95) -> dict:
    """Curves of several training seeds, {mode: {seed: rows}}, summarised across the seeds (no I/O).

    Every mean comes with a Student-t interval across seeds (evaluation.stats.across_seeds, as a dict):
      modes[MODE]  seeds; points (per step evaluated in EVERY seed: mean epoch, held-out NLL per source and
                   "all", training NLL); start; best (each seed's best point by held-out "all" and the mean
                   over seeds of its NLL and step); final (NLL, training NLL, step); gap (final held-out -
                   train, per seed); turned_up (seeds whose held-out NLL ended above their best point)
      pairs["A − B"]  for A later than B in the order of `curves`: the interval of the per-seed differences
                   A - B at the final point and at each seed's own best point, over the seeds both have.
    """
    from ual.evaluation.stats import across_seeds  # scipy: loaded only when a run has seeds

    def iv(values):
        return across_seeds(list(values), level).to_dict()

    modes, best, final = {}, {}, {}
    for mode, by_seed in curves.items():
        by_seed = {s: [r for r in rows if (r.get("heldout") or {}).get("all") is not None] for s, rows in by_seed.items()}
        by_seed = {s: rows for s, rows in by_seed.items() if rows}
        if not by_seed:
            continue
        best[mode] = {s: best_point(rows) for s, rows in by_seed.items()}
        final[mode] = {s: rows[-1] for s, rows in by_seed.items()}
        # Only steps every seed evaluated: a mean over a changing set of seeds would move for that reason alone.
        at = {s: {r["step"]: r for r in rows} for s, rows in by_seed.items()}
        points = []
        for step in sorted(set.intersection(*(set(steps) for steps in at.values()))):
            rs = [at[s][step] for s in by_seed]
            sources = [k for k in rs[0]["heldout"] if all(r["heldout"].get(k) is not None for r in rs)]
            trains = [r.get("train") for r in rs]
            points.append({"step": step, "epoch": _mean(r.get("epoch") or 0.0 for r in rs),
                           "heldout": {k: iv(r["heldout"][k] for r in rs) for k in sources},
                           "train": iv(trains) if None not in trains else None})
        lasts = list(final[mode].values())
        trains = [r.get("train") for r in lasts]
        modes[mode] = {
            "seeds": list(by_seed), "points": points,
            "start": iv(rows[0]["heldout"]["all"] for rows in by_seed.values()),
            "best": {"nll": iv(b["heldout"]["all"] for b in best[mode].values()),
                     "step": _mean(b["step"] for b in best[mode].values()),
                     "per_seed": {s: {"step": b["step"], "epoch": b.get("epoch"), "nll": b["heldout"]["all"],
                                      "point": b.get("point")} for s, b in best[mode].items()}},
            "final": {"nll": iv(r["heldout"]["all"] for r in lasts), "step": _mean(r["step"] for r in lasts),
                      "train": iv(trains) if None not in trains else None},
            "gap": iv(r["heldout"]["all"] - r["train"] for r in lasts) if None not in trains else None,
            # strictly above: a final row that only ties an earlier best is flat, not turning up
            "turned_up": sum(final[mode][s]["heldout"]["all"] > best[mode][s]["heldout"]["all"] for s in by_seed)}
    names, pairs = list(modes), {}
    for i in reversed(range(len(names))):  # "ual − sft", "ual − ls", "ls − sft" for modes sft, ls, ual
        a = names[i]
        for b in names[:i]:
            shared = [s for s in modes[a]["seeds"] if s in modes[b]["seeds"]]
            if shared:
                pairs[f"{a} − {b}"] = {
                    "a": a, "b": b, "seeds": shared,
                    "final": iv(final[a][s]["heldout"]["all"] - final[b][s]["heldout"]["all"] for s in shared),
                    "best": iv(best[a][s]["heldout"]["all"] - best[b][s]["heldout"]["all"] for s in shared)}
    return {"level": level, "modes": modes, "pairs": pairs}


def _level_text(row: dict | None, nd: int = 4) -> str:
    # An NLL level, not a difference: no sign and no "excludes zero" mark (an NLL always excludes zero).
    if not row or row.get("estimate") is None:
        return ""
    if row.get("low") is None or row.get("high") is None:
        return f"{row['estimate']:.{nd}f} (no interval)"
    return f"{row['estimate']:.{nd}f} [{row['low']:.{nd}f}, {row['high']:.{nd}f}]"


def seed_curves_section(curves: dict[str, dict]) -> list[str]:
    """The curves of every training seed ({mode: {seed: rows}}): per mode the mean over seeds at the start, at the
    best point and at the end, then the differences between modes; the best point declared as a selection."""
    from ual.report.verdict import interval_text

    summary = seed_curve_summary(curves)
    if not summary["modes"]:
        return []
    lines = ["## Evaluation during training, across seeds", "",
             "Each training seed's held-out NLL (all sources) and training NLL per response token at each evaluated "
             "point (RUN/seeds/seed-K/train/MODE/curve.jsonl): mean over the seeds with a 95% t interval across "
             "seeds. The best point is chosen per seed on the held-out data itself, so it is a **selection on "
             "held-out data** (its NLL is optimistic); the final models are what the verdict compares.", "",
             "| mode | seeds | start | best [95% CI] (mean step) | final [95% CI] (step) | final train NLL [95% CI] | "
             "final gap, held-out − train | turned up |", "|---|---:|---:|---|---|---|---|---:|"]
    for mode, r in summary["modes"].items():
        n = len(r["seeds"])
        lines.append(f"| {mode} | {n} | {r['start']['estimate']:.4f} | {_level_text(r['best']['nll'])} "
                     f"({r['best']['step']:.0f}) | {_level_text(r['final']['nll'])} ({r['final']['step']:.0f}) | "
                     f"{_level_text(r['final']['train'])} | {interval_text(r['gap'])} | {r['turned_up']} of {n} |")
    lines += ["", "Turned up: seeds whose held-out NLL at the end is above its best point (overfitting by the end)."]
    if summary["pairs"]:
        lines += ["", "Held-out NLL (all sources), A − B per seed, then the mean with its 95% t interval across the "
                  "seeds both modes have (negative: A lower); * = the interval excludes zero. At the best point each "
                  "seed of each mode is taken at its own best step: a selection on held-out data, not a verdict.", "",
                  "| A − B | seeds | final | best point (selection) |", "|---|---:|---|---|"]
        for pair, p in summary["pairs"].items():
            lines.append(f"| {pair} | {len(p['seeds'])} | {interval_text(p['final'])} | {interval_text(p['best'])} |")
    return lines + [""]
