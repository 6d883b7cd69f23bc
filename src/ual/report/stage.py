"""The `ual report` stage: one Markdown page, the same as one self-contained HTML page, and metrics.json.

Reads whatever stages have run (data stats, scores, smoothing, training logs,
evaluations) and writes report.md with tables and PNG plots beside it.
"""

from __future__ import annotations

from pathlib import Path

from ual.config import ExperimentConfig, to_dict
from ual.io import read_json, read_jsonl, write_json, write_text
from ual.modes import MODES
from ual.report.answers import answers_section, collect_answers
from ual.lineage import read_folder_settings
from ual.report.html import markdown_to_html
from ual.report.plots import (plot_benchmarks, plot_distributions, plot_loss_curves, plot_seed_curves,
                              plot_training_curves)
from ual.report.training_curves import (curves_section, read_curve, read_seed_curves, seed_curve_summary,
                                        seed_curves_section)
from ual.report.provenance import provenance, provenance_section, stale_warning
from ual.runfolder import RunFolder

MODEL_ORDER = ("base", *MODES)  # the base model, then the training modes in their declared order


def collect(cfg: ExperimentConfig) -> dict:
    run = RunFolder(cfg.run_path)
    out = {"name": cfg.name, "model": cfg.model, "seed": cfg.seed}
    if run.data_stats.exists():
        out["data"] = read_json(run.data_stats)
    if run.smoothing_stats.exists():
        out["smoothing"] = read_json(run.smoothing_stats)
    out["train"] = {m: read_json(run.train_dir(m) / "result.json")
                    for m in MODEL_ORDER if (run.train_dir(m) / "result.json").exists()}
    out["eval"] = {m: read_json(run.eval_file(m)) for m in MODEL_ORDER if run.eval_file(m).exists()}
    curves = {m: read_curve(run.train_dir(m) / "curve.jsonl") for m in MODEL_ORDER}
    out["curves"] = {m: rows for m, rows in curves.items() if rows}
    if (run.root / "timings.json").exists():
        out["timings"] = read_json(run.root / "timings.json")
    if run.tasks_dir.is_dir():
        found = {p.stem: read_json(p) for p in sorted(run.tasks_dir.glob("*.json"))}
        order = [m for m in MODEL_ORDER if m in found] + [m for m in found if m not in MODEL_ORDER]
        out["benchmarks"] = {m: found[m]["results"] for m in order}
        out["benchmark_items"] = {m: found[m]["benchmarks"] for m in order if found[m].get("benchmarks")}
        out["benchmark_positions"] = {f"{m}, {t} (lm-eval)": {**p, "shuffled": found[m]["config"].get("mc_shuffle")}
                                      for m in order for t, p in (found[m].get("positions") or {}).items()}
    if (run.root / "ablation.md").exists():
        out["ablation_md"] = (run.root / "ablation.md").read_text(encoding="utf-8")
    if (run.root / "clustering.json").exists():
        c = read_json(run.root / "clustering.json")
        out["clustering"] = {k: c[k] for k in ("models", "settings", "selection") if k in c}
    if (run.scores_report / "scores_report.json").exists():
        out["scores"] = read_json(run.scores_report / "scores_report.json")
    if (run.root / "eval" / "pairwise.json").exists():
        out["pairwise"] = read_json(run.root / "eval" / "pairwise.json")
    if run.comparisons.exists():
        out["comparisons"] = read_json(run.comparisons)
    if (answers := collect_answers(run, MODEL_ORDER)) is not None:
        out["answers"] = answers
    if (run.root / "seeds.json").exists():
        out["seeds"] = read_json(run.root / "seeds.json")
        out["seeds_md"] = (run.root / "seeds.md").read_text(encoding="utf-8")
        out["seed_curves"] = read_seed_curves(run.root, out["seeds"].get("seeds", []), MODEL_ORDER)
    out["provenance"] = provenance(run.root, read_folder_settings(run.config) or to_dict(cfg))
    return out


def training_histories(run: RunFolder, metrics: dict) -> dict[str, list[dict]]:
    """Each mode's training log (with seeds: one per seed folder, named 'MODE seed K')."""
    histories = {m: read_json(run.train_dir(m) / "log.json") for m in metrics["train"]}
    for seed in (metrics.get("seeds") or {}).get("seeds", []):
        sub = RunFolder(run.root / "seeds" / f"seed-{seed}")
        for m in MODEL_ORDER:
            if (sub.train_dir(m) / "log.json").exists():
                histories[f"{m} seed {seed}"] = read_json(sub.train_dir(m) / "log.json")
    return histories


def reliability_images(run: RunFolder, metrics: dict) -> list[tuple[str, Path]]:
    """Reliability diagrams: next-token predictions per source, and multiple-choice answers."""
    from ual.report.plots import plot_reliability_grid

    panels: dict[str, dict] = {}
    for name, ev in metrics["eval"].items():
        for source, cal in (ev.get("calibration") or {}).items():
            panels.setdefault(f"next token, {source}", {})[name] = cal["reliability"]
        if (ev.get("multiple_choice") or {}).get("reliability"):
            panels.setdefault("multiple choice", {})[name] = ev["multiple_choice"]["reliability"]
    if not panels:
        return []
    path = plot_reliability_grid(panels, run.root / "reliability.png", "reliability diagrams (equal-mass bins)")
    return [("Reliability diagrams", path)]


def run_report(cfg: ExperimentConfig) -> str:
    run = RunFolder(cfg.run_path)
    metrics = collect(cfg)
    write_json(run.metrics, metrics)
    images = []
    if run.scores.exists():
        rows = read_jsonl(run.scores)
        images.append(("Uncertainty scores per source", plot_distributions(
            rows, "score", "uncertainty score u per data source", "u", run.root / "scores.png")))
    if run.smoothing.exists():
        rows = read_jsonl(run.smoothing)
        images.append(("Label smoothing per source (UAL)", plot_distributions(
            rows, "eps", "per-sample label smoothing eps per data source", "eps", run.root / "smoothing.png")))
    if (run.root / "clustering.png").exists():
        images.append(("Feature clustering (PCA of a few token pairs)", run.root / "clustering.png"))
    for c in metrics.get("scores", {}).get("rank_correlation", []):
        if c.get("plot") and (run.scores_report / c["plot"]).exists():
            images.append((f"Scorers compared: {c['scorer_a']} vs {c['scorer_b']}", run.scores_report / c["plot"]))
    images += reliability_images(run, metrics)
    if metrics.get("benchmark_items"):
        images.append(("Benchmarks", plot_benchmarks(metrics["benchmark_items"], run.root / "benchmarks.png")))
    histories = training_histories(run, metrics)
    if histories:
        images.append(("Training loss", plot_loss_curves(histories, run.root / "loss.png")))
    if metrics.get("curves"):
        images.append(("Evaluation during training", plot_training_curves(metrics["curves"], run.root / "curves.png")))
    if metrics.get("seed_curves"):
        images.append(("Evaluation during training, across seeds", plot_seed_curves(
            seed_curve_summary(metrics["seed_curves"])["modes"], run.root / "seed_curves.png")))
    text = render_markdown(metrics, [(title, path.relative_to(run.root)) for title, path in images])
    write_text(run.report, text)
    write_text(run.root / "report.html", markdown_to_html(text, run.root, f"UAL run {cfg.name}"))
    return text


def render_markdown(m: dict, images) -> str:
    from ual.report.verdict import render_verdict

    lines = [f"# UAL run `{m['name']}`", "", f"Model: `{m['model']}`, seed {m['seed']}"
             + (f"; training seeds {', '.join(map(str, m['seeds']['seeds']))} (RUN/seeds/)" if m.get("seeds") else "")
             + ".", ""]
    lines += stale_warning(m.get("provenance", {}))  # before the verdict: which tables mix different runs
    if m.get("comparisons"):
        lines += render_verdict(m["comparisons"], m.get("seeds"))
    if "data" in m:
        lines += ["## Data", "", "| source | read | skipped | train | held-out | truncated |", "|---|---:|---:|---:|---:|---:|"]
        for src, s in m["data"].get("sources", {}).items():
            lines.append(f"| {src} | {s.get('read', '')} | {s.get('skipped', 0)} | {s.get('train', '')} | "
                         f"{s.get('heldout', '')} | {s.get('truncated', '')} |")
        notes = list(m["data"].get("notes", []))
        notes += [f"{src}: {s['note']}" for src, s in m["data"].get("sources", {}).items() if s.get("note")]
        for note in notes:
            lines += ["", f"Note: {note}."]
        lines.append("")
    if "scores" in m:
        lines += scores_section(m["scores"])
    if "smoothing" in m:
        s = m["smoothing"]
        lines += ["## Smoothing", "",
                  f"Target mean eps {s['target_mean']}, cap {s['eps_max']}, scale k = {s['scale_k']:.4f}; "
                  f"mean eps reached {s['mean_eps']:.6f} over {s['n']} samples, {s['clipped']} at the cap, "
                  f"{s['missing']} without a score ({s['missing_policy']}).", "",
                  "| source | mean eps (UAL) |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in s["mean_eps_by_source"].items()]
        lines.append("")
        if s.get("separation"):
            lines += separation_section(s, m.get("scores", {}))
    if m["train"]:
        lines += ["## Training", "", "| mode | steps | samples | mean eps | train loss (objective) | last logged NLL term | "
                  "seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
        for mode, t in m["train"].items():
            lines.append(f"| {mode} | {t['steps']} | {t['samples']} | {t['mean_eps']:.4f} | {t['train_loss']:.4f} | "
                         f"{_fmt(t.get('final_nll'), 4)} | {t['seconds']:.0f} |")
        lines += ["", "Train losses include each mode's own smoothing term, so they are not comparable across modes; "
                  "the plain NLL term logged beside them (left panel of the loss plot) and the held-out NLL below are.",
                  ""]
    if m.get("curves"):
        lines += curves_section(m["curves"])
    if m.get("seed_curves"):
        lines += seed_curves_section(m["seed_curves"])
    if m["eval"]:
        lines += ["## Evaluation", ""] + eval_table(m["eval"]) + [""]
        lines += calibration_section(m["eval"])
    lines += mc_positions_section(m)
    if m.get("comparisons"):
        lines += comparisons_section(m["comparisons"])
    if m.get("seeds_md"):
        lines += [ln.replace("## ", "### ") for ln in m["seeds_md"].split("\n") if not ln.startswith("# ")] + [""]
    if m.get("benchmark_items"):
        lines += benchmark_section(m["benchmark_items"])
    if m.get("benchmarks"):
        lines += ["## Benchmarks (lm-evaluation-harness)", "", "lm-eval's own aggregates, as it printed them:", ""]
        lines += benchmark_table(m["benchmarks"]) + [""]
    if m.get("ablation_md"):
        body = m["ablation_md"].split("\n")
        lines += ["## Ablation", ""] + [ln for ln in body if not ln.startswith("# ")] + [""]
    if "pairwise" in m:
        p = m["pairwise"]
        lines += ["## Pairwise comparison", "",
                  f"Judge `{p['judge']}` on held-out `{p['source']}` prompts, each pair judged in both answer orders "
                  "(ties count half).", "",
                  "| A vs B | prompts | wins | ties | losses | win rate of A | length-controlled | position consistency |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for pair, r in p["comparisons"].items():
            lines.append(f"| {pair.replace(':', ' vs ')} | {r['n_valid']} | {r['wins']} | {r['ties']} | {r['losses']} | "
                         f"{_fmt(r['win_rate'])} | {_fmt(r['lc_win_rate'])} | {_fmt(r['position_consistency'])} |")
        lines.append("")
    if m.get("answers"):
        lines += answers_section(m["answers"])
    if "clustering" in m:
        c = m["clustering"]
        st = c["settings"]
        lines += ["## Feature clustering", "",
                  f"Silhouette of final hidden states grouped by next token, in a 2-D PCA per token pair: the "
                  f"{st['top_k']} most frequent tokens of {st['n_texts']} held-out texts, mean over **all** pairs "
                  "with a bootstrap 95% interval (higher = tighter same-token clusters).", "",
                  "| model | mean over all pairs | 95% CI | pairs |", "|---|---:|---|---:|"]
        for name, r in c["models"].items():
            lines.append(f"| {name} | {r['mean_all_pairs']:.4f} | [{r['ci_low']:.4f}, {r['ci_high']:.4f}] | {r['n_pairs']} |")
        if "selection" in c:
            sel = c["selection"]
            lines += ["", f"Declared selection, not the headline: {sel['rule']}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in sel["mean"].items()) + "."]
        lines.append("")
    if m.get("timings"):
        t = m["timings"]
        lines += ["## Time per stage", "", "| " + " | ".join(t) + " | total |", "|" + "---:|" * (len(t) + 1),
                  "| " + " | ".join(f"{v:.0f} s" for v in t.values()) + f" | {sum(t.values()) / 60:.1f} min |", ""]
    lines += provenance_section(m.get("provenance", {}))
    for title, path in images:
        lines += [f"### {title}", "", f"![{title}]({Path(path).as_posix()})", ""]
    return "\n".join(lines)


def scores_section(rep: dict) -> list[str]:
    """Per-source score statistics, what failed and why, and how the scorers run on this data agree."""
    lines = ["## Uncertainty scores", "", "| source | scored | failed | mean score | median | std |",
             "|---|---:|---:|---:|---:|---:|"]
    for src, st in rep["summary"].items():
        lines.append(f"| {src} | {st['scored']} | {st['failed']} | {_fmt(st.get('mean'))} | {_fmt(st.get('median'))} | "
                     f"{_fmt(st.get('std'))} |")
    if rep.get("failures"):
        reasons = ", ".join(f"{k} ({v})" for k, v in rep["failure_reasons"].items())
        lines += ["", f"{rep['failures']} samples have no score (listed in scores_report/failures.jsonl): {reasons}."]
    if rep.get("rank_correlation"):
        lines += ["", "| scorer | compared with | samples scored by both | Spearman rho |", "|---|---|---:|---:|"]
        for c in rep["rank_correlation"]:
            rho = _fmt(c["spearman"]) if c["spearman"] is not None else c.get("note", "")
            lines.append(f"| {c['scorer_a']} | {c['scorer_b']} | {c['n']} | {rho} |")
    return lines + [""]


def separation_section(smoothing: dict, scores: dict) -> list[str]:
    """Does UAL treat the sources differently? AUC of the scores and ratio of mean eps, per pair of sources;
    then, for every scorer run on this data, the same under each normalisation (to choose one)."""
    lines = [f"Separation of the sources by the scores (`smoothing.normalize: {smoothing.get('normalize', 'max')}`): "
             "AUC = chance that a sample of the first source scores above one of the second (0.5: no separation); "
             "eps ratio = ratio of their mean eps after the map (1: uniform smoothing in all but name).", "",
             "| sources | AUC | mean eps ratio |", "|---|---:|---:|"]
    for p in smoothing["separation"]:
        lines.append(f"| {p['high']} over {p['low']} | {p['auc']:.3f} | {_ratio(p['eps_ratio'].get('applied'))} |")
    runs = scores.get("separation") or []
    if runs:
        st = scores.get("separation_settings") or {}
        lines += ["", f"Every scorer run on this data, each normalisation (target mean {st.get('target_mean', '?')}):", "",
                  "| scorer | sources | AUC | eps ratio, max | minmax | rank |", "|---|---|---:|---:|---:|---:|"]
        for r in runs:
            for p in r["pairs"]:
                ratios = p["eps_ratio"]
                lines.append(f"| {r['scorer']} | {p['high']} over {p['low']} | {p['auc']:.3f} | "
                             + " | ".join(_ratio(ratios.get(k)) for k in ("max", "minmax", "rank")) + " |")
    return lines + [""]


def _ratio(x) -> str:
    return "" if x is None else f"{x:.2f}x"


def eval_table(ev: dict) -> list[str]:
    """Headline metrics first: the graded ones that separate models at small scale (held-out NLL, its
    calibration, the probability given to the right choice); exact-match accuracies after them."""
    sources = sorted({k for e in ev.values() for k in e.get("nll", {}) if k != "all"})
    head = (["model"] + [f"NLL {s}" for s in sources] + ["NLL all", "ECE all", "MC p(gold)", "MC acc", "MC ECE",
                                                          "MC acc_norm", "MC pass@N", "GSM8K acc"])
    rows = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, e in ev.items():
        nll = e.get("nll", {})
        cells = [name] + [f"{nll[s]['nll']:.4f}" if s in nll else "" for s in sources]
        cells.append(f"{nll['all']['nll']:.4f}" if "all" in nll else "")
        cells.append(_fmt((e.get("calibration") or {}).get("all", {}).get("ece"), 4))
        mc = e.get("multiple_choice")
        cells += ([_fmt(mc.get("p_gold"), 4), f"{mc['accuracy']:.3f} (n={mc['n_questions']})", _fmt(mc.get("ece"), 4),
                   _fmt(mc.get("acc_norm")),
                   f"{_fmt(mc.get('pass_at_n'))} (N={mc['n_samples']})" if mc.get("pass_at_n") is not None else ""]
                  if mc else ["", "", "", "", ""])
        maths = e.get("maths")
        cells.append(f"{maths['accuracy']:.3f} ({maths['correct']}/{maths['n_questions']})" if maths else "")
        rows.append("| " + " | ".join(cells) + " |")
    chance = next((e["multiple_choice"].get("chance_accuracy") for e in ev.values() if e.get("multiple_choice")), None)
    if chance is not None:
        rows += ["", f"Multiple choice: chance accuracy is {chance:.3f}; the per-question records "
                 "(eval/items/MODEL.mc.jsonl) show each model's predicted letters."]
    return rows


def calibration_section(ev: dict) -> list[str]:
    """ECE per source and model: label smoothing acts on confidence first."""
    sources = list(dict.fromkeys(k for e in ev.values() for k in (e.get("calibration") or {})))
    if not sources:
        return []
    first = next(e["calibration"] for e in ev.values() if e.get("calibration"))
    lines = ["## Calibration", "",
             f"Expected calibration error of next-token predictions on held-out response tokens (confidence = the "
             f"top probability, correct = it is the gold token), {first[sources[0]]['bins']} equal-mass bins; "
             "in brackets the mean confidence and the accuracy (conf > acc: overconfident).", "",
             "| model | " + " | ".join(f"ECE {s}" for s in sources) + " |", "|---|" + "---:|" * len(sources)]
    for name, e in ev.items():
        cal = e.get("calibration") or {}
        lines.append(f"| {name} | " + " | ".join(
            f"{cal[s]['ece']:.4f} ({cal[s]['confidence']:.3f} / {cal[s]['accuracy']:.3f})" if s in cal else ""
            for s in sources) + " |")
    return lines + [""]


def mc_positions_section(m: dict) -> list[str]:
    """Multiple-choice accuracy by the gold answer's position and where the model answers: a model that
    always answers "A" shows here, even on a file whose gold answers all sit at A."""
    rows = {name: {**e["multiple_choice"]["positions"], "shuffled": e["multiple_choice"].get("shuffled")}
            for name, e in m.get("eval", {}).items() if (e.get("multiple_choice") or {}).get("positions")}
    rows.update(m.get("benchmark_positions") or {})
    if not rows:
        return []
    letters = list(dict.fromkeys(x for p in rows.values() for x in p["gold"]))
    lines = ["## Multiple choice by answer position", "",
             "Accuracy when the right answer is at each position (in brackets: questions with it there) and how "
             "many times the model answered each position. Choices are shuffled per question unless "
             "`eval.mc_shuffle: false` (order given).", "",
             "| model | choices | " + " | ".join(f"acc, gold {x}" for x in letters) + " | "
             + " | ".join(f"answered {x}" for x in letters) + " |", "|---|---|" + "---:|" * (2 * len(letters))]
    for name, p in rows.items():
        order = {True: "shuffled", False: "order given"}.get(p.get("shuffled"), "")
        lines.append(f"| {name} | {order} | " + " | ".join(
            f"{_fmt(p['accuracy_by_gold'].get(x))} ({p['gold'].get(x, 0)})" for x in letters) + " | "
            + " | ".join(str(p["pred"].get(x, 0)) for x in letters) + " |")
    return lines + [""]


def comparisons_section(comp: dict) -> list[str]:
    """Every metric of every compared pair with its paired interval; then the results per bucket of u."""
    from ual.report.verdict import interval_text

    st = comp.get("settings", {})
    lines = ["## Paired differences", "",
             f"A − B for every metric, on the same held-out items; 95% paired-bootstrap intervals ({st.get('bootstrap')} "
             "resamples of items); * = excludes zero.", "",
             "| metric | better | " + " | ".join(p.replace(":", " − ") for p in comp["pairs"]) + " |",
             "|---|---|" + "---:|" * len(comp["pairs"])]
    names = list(dict.fromkeys(n for rows in comp["pairs"].values() for n in rows))
    for name in names:
        better = next(rows[name]["better"] for rows in comp["pairs"].values() if name in rows)
        lines.append(f"| {name} | {better} | " + " | ".join(interval_text(rows.get(name)) for rows in comp["pairs"].values())
                     + " |")
    b = comp.get("buckets") or {}
    if b.get("models"):
        edges = b["edges"]
        lines += ["", "### By uncertainty of the held-out sample", "",
                  f"Held-out samples split by quartiles of their u (scorer `{st.get('u_scorer')}`; edges "
                  + ", ".join(f"{e:.3g}" for e in edges) + "): each model's NLL and token ECE per bucket "
                  "(the paired differences per bucket are the nll/u-qK and ece/u-qK rows above).", "",
                  "| model | " + " | ".join(f"{r['bucket']} NLL / ECE" for r in next(iter(b["models"].values())))
                  + " |", "|---|" + "---:|" * len(next(iter(b["models"].values())))]
        for name, rows in b["models"].items():
            lines.append(f"| {name} | " + " | ".join(f"{r['nll']:.4f} / {_fmt(r['ece'], 4)}" for r in rows) + " |")
        first = next(iter(b["models"].values()))
        lines += ["", "Sources per bucket: " + "; ".join(
            f"{r['bucket']}: " + ", ".join(f"{k} {v}" for k, v in r["sources"].items()) for r in first) + "."]
    return lines + [""]


def benchmark_section(per_model: dict) -> list[str]:
    """Each model's benchmark results from its per-item answers: accuracy with its bootstrap interval over the
    items, and the graded measures beside it."""
    lines = ["## Benchmarks, each choice scored as a continuation", "",
             "lm-evaluation-harness's task definitions, prompts and metrics (acc, acc_norm; TruthfulQA MC2 as acc); "
             "p(gold) is the softmax of the choices' log-likelihoods at the right choice(s), margin the log-likelihood "
             "of the best right choice minus the best wrong one, Brier and ECE the calibration of that softmax. "
             "acc's interval: 95% bootstrap over the items.", "",
             "| task | model | items | acc [95% CI] | acc_norm | p(gold) | margin | Brier | ECE |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    tasks = list(dict.fromkeys(t for r in per_model.values() for t in r))
    for task in tasks:
        for model, rows in per_model.items():
            r = rows.get(task)
            if not r:
                continue
            ci = r.get("acc_ci") or [None, None]
            acc = f"{_fmt(r['acc'])} [{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci[0] is not None else _fmt(r["acc"])
            lines.append(f"| {task} | {model} | {r['n']} | {acc} | {_fmt(r.get('acc_norm'))} | {_fmt(r.get('p_gold'))} | "
                         f"{_fmt(r.get('margin'))} | {_fmt(r.get('brier'))} | {_fmt(r.get('ece'))} |")
    sources = {t: r[t].get("data") for r in per_model.values() for t in r if r[t].get("data")}
    lines += [""] + [f"- {t}: {d}" for t, d in sources.items()] + [""]
    return lines


def benchmark_table(bench: dict) -> list[str]:
    """One row per task and metric, one column per model, then each model's delta against SFT."""
    models = list(bench)
    others = [m for m in models if m != "sft"] if "sft" in bench else []
    head = ["task", "metric"] + models + [f"{m} − sft" for m in others]
    rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    tasks = list(dict.fromkeys(t for r in bench.values() for t in r))
    for task in tasks:
        metrics = list(dict.fromkeys(k for r in bench.values() for k in r.get(task, {}) if "stderr" not in k))
        for metric in metrics:
            vals = {m: bench[m].get(task, {}).get(metric) for m in models}
            sft = vals.get("sft")
            deltas = [f"{vals[m] - sft:+.3f}" if vals[m] is not None and sft is not None else "" for m in others]
            rows.append("| " + " | ".join([task, metric] + [_fmt(vals[m]) for m in models] + deltas) + " |")
    return rows


def _fmt(x, nd: int = 3) -> str:
    return "" if x is None else f"{x:.{nd}f}"
