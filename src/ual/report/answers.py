"""The report's "Answers side by side" (the paper's case study, its Figure 4): the same held-out prompts
answered by every model, with each sample's uncertainty score, its eps and the gold answer where the
source has one.

The prompts and their rule come from eval/answers/side_by_side.json and the answers from
eval/answers/MODEL.json (ual/evaluation/answers.py). eps: held-out samples are never trained on, so
theirs is what UAL's map gives their score, read off the training samples' (score, eps) pairs in
smoothing.jsonl by linear interpolation (the map is non-decreasing in the score, whatever the
normalisation). Model text is shown HTML-escaped in <pre> blocks, so neither Markdown nor HTML in an
answer changes the page; an answer longer than FOLD_CHARS is folded (<details>), a shorter one open.
"""

from __future__ import annotations

import html

import numpy as np

from ual.io import read_json, read_jsonl
from ual.runfolder import RunFolder

FOLD_CHARS = 300


def collect_answers(run: RunFolder, model_order: tuple[str, ...]) -> dict | None:
    """What the section shows, or None where no model answered the side-by-side prompts."""
    if not run.answers_selection.exists() or not run.heldout.exists():
        return None
    chosen = read_json(run.answers_selection)
    found = {p.stem: {r.get("id"): r["output"] for r in read_json(p)}
             for p in sorted(run.answers_selection.parent.glob("*.json")) if p != run.answers_selection}
    models = [m for m in model_order if m in found] + [m for m in found if m not in model_order]
    if not chosen.get("ids") or not any(i in found[m] for m in models for i in chosen["ids"]):
        return None
    heldout = {r["id"]: r for r in read_jsonl(run.heldout)}
    scores = {r["id"]: r for r in read_jsonl(run.heldout_scores)} if run.heldout_scores.exists() else {}
    to_eps = eps_of_score(read_jsonl(run.smoothing)) if run.smoothing.exists() else None
    prompts = []
    for sample_id in chosen["ids"]:
        sample = heldout.get(sample_id)
        if sample is None:  # the held-out set changed since: these answers are another set's
            continue
        score = (scores.get(sample_id) or {}).get("score")
        messages = sample["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompts.append({
            "id": sample_id, "source": sample["source"], "prompt": messages[last - 1]["content"] if last else "",
            "reference": messages[last]["content"], "gold": (sample.get("meta") or {}).get("answer"),
            "u": score, "scorer": (scores.get(sample_id) or {}).get("scorer"),
            "eps": float(to_eps(score)) if to_eps is not None and score is not None else None,
            "answers": {m: found[m].get(sample_id) for m in models}})
    return {"rule": chosen["rule"], "per_source": chosen["per_source"], "cost": chosen.get("cost", {}),
            "models": models, "prompts": prompts}


def eps_of_score(smoothing_rows: list[dict]):
    """score -> the eps UAL's map gives it, interpolated between the training samples' (score, eps)."""
    pairs = sorted((r["score"], r["eps"]) for r in smoothing_rows if r.get("score") is not None)
    if not pairs:
        return None
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    return lambda score: np.interp(score, xs, ys)


def _block(text: str | None, label: str) -> list[str]:
    """`label` over the escaped text, folded when long."""
    if text is None:
        return [f"<p>{label}: <i>no answer</i></p>", ""]
    # one line: a blank line in the answer would end the HTML block in CommonMark renderers (GitHub)
    body = '<pre style="white-space: pre-wrap">' + html.escape(text.strip(), quote=False).replace("\n", "&#10;") + "</pre>"
    opened = " open" if len(text) <= FOLD_CHARS else ""
    return [f"<details{opened}><summary>{label}</summary>", body, "</details>", ""]


def answers_section(data: dict) -> list[str]:
    from ual.evaluation.maths import answers_match, extract_final_answer

    cost = data["cost"]
    lines = ["## Answers side by side", "",
             f"The same held-out prompts answered by every model (greedy), {data['per_source']} per source, chosen by "
             f"a fixed rule: {data['rule']}. u is the sample's uncertainty score; eps is what UAL's map gives that "
             "score (held-out samples are not trained on: read off the training samples' scores and eps). Answers "
             f"longer than {FOLD_CHARS} characters are folded."]
    if cost:
        lines += ["", "Generating them took " + ", ".join(
            f"{m} {c['seconds']:.1f} s ({c['prompts']} prompts)" for m, c in cost.items() if c.get("seconds") is not None)
            + " (the pairwise judge reuses these answers)."]
    lines.append("")
    count: dict[str, int] = {}
    for p in data["prompts"]:
        count[p["source"]] = count.get(p["source"], 0) + 1
        maths = p["gold"] is not None  # a maths source's final answer (meta["answer"])
        facts = [f"u = {p['u']:.3f}" + (f" ({p['scorer']})" if p["scorer"] else "") if p["u"] is not None else "no score",
                 f"eps = {p['eps']:.3f}" if p["eps"] is not None else "no eps (no smoothing.jsonl)"]
        if maths:
            facts.append(f"gold answer **{p['gold']}**")
        lines += [f"### {p['source']} {count[p['source']]}: `{p['id']}`", "", "; ".join(facts) + ".", ""]
        lines += _block(p["prompt"], "<b>prompt</b>")
        for model, text in p["answers"].items():
            label = f"<b>{model}</b> ({len(text.split()) if text else 0} words)"
            if maths and text is not None:
                final = extract_final_answer(text)
                label += f", final answer {html.escape(final or 'none')}: " + (
                    "right" if answers_match(final, str(p["gold"])) else "wrong")
            lines += _block(text, label)
        lines += _block(p["reference"], "gold solution" if maths else "the data's own reply (not a gold answer)")
    return lines
