"""The report's opening: for each claim of the paper, the difference, its interval, and what it says.

Claims (docs/method.md §6, paper §3-4), each read from comparisons.json (and seeds.json):
  UAL vs SFT, UAL vs LS     held-out NLL over all sources
  precise vs open data      the same per data source (UAL should help where answers are many
                            without hurting where there is one)
  calibration               ECE of next-token predictions per source, and of multiple-choice answers
  multiple choice           probability of the right answer among the choices
  feature clustering        silhouette of same-next-token hidden states (paper §4, Table 5)
  benchmark                 the paper's benchmarks scored as continuations (ARC, HellaSwag, MMLU,
                            TruthfulQA, ...): accuracy, and the log-likelihood margin of the right
                            choice over the best wrong one, which moves before accuracy does
A difference counts only when its 95% interval excludes zero; otherwise the reading is
"no detectable difference", which is a result, not a gap to fill. With several seeds a
claim is "supported" only when the item interval and the across-seed interval both
exclude zero on the same side.
"""

from __future__ import annotations

CLAIM_PAIRS = ("ual:sft", "ual:ls")


def interval_text(row: dict | None, nd: int = 4) -> str:
    """'+0.0123 [-0.0040, +0.0290]', with ' *' when the interval excludes zero."""
    if not row or row.get("estimate") is None:
        return ""
    est = f"{row['estimate']:+.{nd}f}"
    if row.get("low") is None or row.get("high") is None:
        return f"{est} (no interval)"
    return f"{est} [{row['low']:+.{nd}f}, {row['high']:+.{nd}f}]" + (" *" if row.get("excludes_zero") else "")


def reading(row: dict, a: str, seeds_row: dict | None = None) -> str:
    """What the interval(s) say about model A, in words."""
    if not row.get("excludes_zero"):
        return "no detectable difference"
    better = (row["estimate"] < 0) == (row["better"] == "lower")
    text = f"{a.upper()} {'better' if better else 'worse'}"
    if seeds_row is not None:
        same_side = seeds_row.get("excludes_zero") and (seeds_row["estimate"] > 0) == (row["estimate"] > 0)
        text += "" if same_side else " over these items only (not beyond seed-to-seed variation)"
    return text


def claim_rows(comparisons: dict, seeds: dict | None = None) -> list[dict]:
    """One row per (claim, pair, metric) present in the comparisons."""
    rows = []
    pairs = comparisons.get("pairs", {})
    for pair in [p for p in CLAIM_PAIRS if p in pairs] + [p for p in pairs if p not in CLAIM_PAIRS]:
        metrics = pairs[pair]
        a, b = pair.split(":")
        sources = sorted(m.split("/", 1)[1] for m in metrics if m.startswith("nll/") and m != "nll/all"
                         and not m.startswith("nll/u-"))
        wanted = [("overall", "nll/all")] + [("per source", f"nll/{s}") for s in sources]
        wanted += [("calibration", f"ece/{s}") for s in sources + ["all"]] + [("calibration", "mc/ece")]
        wanted += [("multiple choice", "mc/p_gold"), ("feature clustering", "clustering/silhouette")]
        tasks = [m.split("/", 1)[0] for m in metrics if m.endswith("/acc")]
        wanted += [("benchmark", f"{t}/{k}") for t in tasks for k in ("acc", "margin")]
        for claim, metric in wanted:
            if metric not in metrics:
                continue
            row = metrics[metric]
            seeds_row = (seeds or {}).get("pairs", {}).get(pair, {}).get(metric, {}).get("across_seeds")
            rows.append({"claim": claim, "pair": pair, "a": a, "b": b, "metric": metric, "row": row,
                         "seeds_row": seeds_row, "reading": reading(row, a, seeds_row)})
    return rows


def render_verdict(comparisons: dict, seeds: dict | None = None) -> list[str]:
    rows = claim_rows(comparisons, seeds)
    if not rows:
        return []
    st = comparisons.get("settings", {})
    n_runs = len(st.get("runs", [])) or 1
    lines = ["## Verdict", "",
             f"Differences A − B on the same held-out items, 95% paired-bootstrap intervals ({st.get('bootstrap')} "
             f"resamples of items{f', {n_runs} seeds pooled per item' if n_runs > 1 else ''}); * = the interval "
             f"excludes zero. NLL, ECE and Brier: lower is better; p(gold), accuracy, margin and silhouette: higher is better. ECE with {st.get('ece_bins')} "
             "equal-mass bins.", ""]
    head = "| claim | A − B | metric | A − B [95% CI] |" + (" across seeds [95% CI] |" if seeds else "") + " reading |"
    lines += [head, "|---|---|---|---:|" + ("---:|" if seeds else "") + "---|"]
    for r in rows:
        cells = [r["claim"], f"{r['a']} − {r['b']}", r["metric"], interval_text(r["row"])]
        if seeds:
            cells.append(interval_text(r["seeds_row"]))
        lines.append("| " + " | ".join(cells + [r["reading"]]) + " |")
    found = [r for r in rows if r["reading"] != "no detectable difference"]
    summary = (f"{len(found)} of {len(rows)} differences exclude zero"
               + (": " + "; ".join(f"{r['metric']} ({r['a']} − {r['b']}): {r['reading']}" for r in found[:6]) if found
                  else ": no claim is supported at this scale (a null result)"))
    return lines + ["", f"**In short:** {summary}.", ""]
