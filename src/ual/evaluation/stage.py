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
A model whose eval file exists is skipped on rerun (delete it or use --force).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from ual.config import ExperimentConfig
from ual.io import atomic_open, read_json, write_json, write_jsonl
from ual.runfolder import RunFolder

log = logging.getLogger(__name__)

MATHS_SOURCES = ("gsm8k", "metamath")


def load_for_eval(cfg: ExperimentConfig, name: str):
    """The base model, or the base model with a trained mode's adapter merged in."""
    from ual.models import load_model

    run = RunFolder(cfg.run_path)
    if name == "base":
        return load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    out = run.train_dir(name)
    if (out / "model").exists():
        return load_model(str(out / "model"), cfg.device, trust_remote_code=cfg.trust_remote_code)
    adapter = run.require(out / "adapter", "train")
    from peft import PeftModel

    base = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    # Merging makes generation as fast as the base model's.
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def _pairwise_models(cfg) -> set[str]:
    return {m for pair in cfg.eval.pairwise for m in _split_pair(pair)}


def _split_pair(pair: str) -> tuple[str, str]:
    a, sep, b = pair.partition(":")
    if not sep or not a or not b:
        raise ValueError(f"eval.pairwise entries look like 'ual:sft', got {pair!r}")
    return a, b


def run_eval(cfg: ExperimentConfig, force: bool = False) -> dict:
    from ual.models import load_tokenizer

    run = RunFolder(cfg.run_path)
    heldout = run.load_samples("heldout")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    ec = cfg.eval
    for a, b in map(_split_pair, ec.pairwise):
        if a not in ec.models or b not in ec.models:
            raise ValueError(f"eval.pairwise compares {a} and {b}; both must be in eval.models {ec.models}")
    inputs = EvalInputs.build(cfg, heldout)
    results = {}
    for name in ec.models:
        path = run.eval_file(name)
        if path.exists() and not force:
            log.info("eval/%s.json exists; skipping", name)
            results[name] = read_json(path)
            continue
        start = time.time()
        model = load_for_eval(cfg, name)
        metrics = evaluate_model(cfg, name, model, tokenizer, inputs, run)
        metrics["seconds"] = time.time() - start
        write_json(path, metrics)
        results[name] = metrics
        del model
    if ec.clustering and inputs.cluster_texts:
        results["clustering"] = run_clustering(cfg, tokenizer, run, len(inputs.cluster_texts))
    if ec.pairwise and inputs.pair_prompts:
        results["pairwise"] = run_pairwise(cfg, run, force)
    return results


class EvalInputs:
    """The held-out material every model is evaluated on, chosen once."""

    def __init__(self, heldout, maths, mc, cluster_texts, pair_samples):
        self.heldout, self.maths, self.mc = heldout, maths, mc
        self.cluster_texts, self.pair_samples = cluster_texts, pair_samples
        self.pair_prompts = [s.prompt_messages for s in pair_samples]

    @classmethod
    def build(cls, cfg: ExperimentConfig, heldout):
        ec = cfg.eval
        maths = [s for s in heldout if s.source in MATHS_SOURCES and "answer" in s.meta] if ec.gsm8k else []
        if ec.gsm8k_limit is not None:
            maths = maths[: ec.gsm8k_limit]
        mc = []
        if ec.multiple_choice:
            from ual.evaluation.multiple_choice import load_mc_file, load_packaged_mc

            mc = load_mc_file(ec.mc_file) if ec.mc_file else load_packaged_mc()
            mc = mc[: ec.mc_limit] if ec.mc_limit is not None else mc
        cluster_texts = []
        if ec.clustering:
            from ual.data.tokenize import render
            from ual.models import load_tokenizer

            picked = round_robin_by_source(heldout)[: ec.clustering_texts]
            tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
            cluster_texts = [render(tok, s.messages) for s in picked]
        pair_samples = [s for s in heldout if s.source == ec.pairwise_source][: ec.pairwise_limit] if ec.pairwise else []
        if ec.pairwise and not pair_samples:
            log.warning("no held-out samples from %r: pairwise comparison skipped", ec.pairwise_source)
        return cls(heldout, maths, mc, cluster_texts, pair_samples)


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
    ec = cfg.eval
    metrics: dict = {"model": name}
    if ec.nll and inputs.heldout:
        from ual.evaluation.nll import nll_by_source, sample_nll

        per_sample = sample_nll(model, tokenizer, inputs.heldout, cfg.data.max_length, ec.batch_size,
                                cfg.data.train_on_prompt, desc=f"NLL {name}")
        metrics["nll"] = nll_by_source(inputs.heldout, per_sample)
    if inputs.maths:
        from ual.evaluation.maths import evaluate_maths

        res = evaluate_maths(model, tokenizer, inputs.maths, batch_size=ec.batch_size, max_new_tokens=ec.max_new_tokens)
        write_jsonl(run.root / "eval" / f"{name}.maths.jsonl", res.pop("records", []))
        metrics["maths"] = res
    if inputs.mc:
        from ual.evaluation.multiple_choice import evaluate_multiple_choice

        res = evaluate_multiple_choice(model, tokenizer, inputs.mc, batch_size=ec.batch_size,
                                       n_samples=ec.mc_samples, seed=cfg.seed, acc_norm=ec.mc_acc_norm)
        write_jsonl(run.root / "eval" / f"{name}.mc.jsonl", res.pop("records", []))
        metrics["multiple_choice"] = res
    if inputs.cluster_texts:
        from ual.evaluation.clustering import collect_features

        features, labels = collect_features(model, tokenizer, inputs.cluster_texts, cfg.data.max_length, ec.batch_size)
        with atomic_open(run.root / "eval" / "features" / f"{name}.npz", "wb") as fh:
            np.savez(fh, features=features, labels=labels)
    if name in _pairwise_models(cfg) and inputs.pair_prompts:
        from ual.evaluation.generate import generate_answers
        from ual.evaluation.pairwise import export_alpaca_eval

        answers = generate_answers(model, tokenizer, inputs.pair_prompts, max_new_tokens=ec.pairwise_max_new_tokens,
                                   batch_size=ec.batch_size)
        instructions = [p[-1]["content"] for p in inputs.pair_prompts]
        export_alpaca_eval(run.root / "eval" / "answers" / f"{name}.json", instructions, answers,
                           generator=f"{cfg.name}/{name}", dataset=ec.pairwise_source)
    return metrics


def run_clustering(cfg: ExperimentConfig, tokenizer, run: RunFolder, n_texts: int) -> dict:
    from ual.evaluation.clustering import clustering_from_features

    collected = {}
    for name in cfg.eval.models:
        with np.load(run.root / "eval" / "features" / f"{name}.npz") as data:
            collected[name] = (data["features"], data["labels"])
    selection = ("ual", "ls", 100) if {"ual", "ls"} <= set(collected) else None
    report = clustering_from_features(collected, tokenizer, top_k=cfg.eval.clustering_top_k, seed=cfg.seed,
                                      plot_path=run.root / "clustering.png", selection=selection,
                                      n_texts=n_texts, max_length=cfg.data.max_length)
    write_json(run.root / "clustering.json", report)
    return report["models"]


def run_pairwise(cfg: ExperimentConfig, run: RunFolder, force: bool) -> dict:
    from ual.evaluation import pairwise as pw

    out = run.root / "eval" / "pairwise.json"
    if out.exists() and not force:
        return read_json(out)
    ec = cfg.eval
    judge_name = ec.pairwise_judge or cfg.model
    if judge_name.startswith("openai:"):
        judge = pw.OpenAIPairwiseJudge(judge_name.split(":", 1)[1], base_url=cfg.score.base_url)
    else:
        from ual.models import load_model, load_tokenizer

        judge = pw.LocalPairwiseJudge(load_model(judge_name, cfg.device, trust_remote_code=cfg.trust_remote_code),
                                      load_tokenizer(judge_name, cfg.trust_remote_code), name=judge_name)
    results = {"judge": judge_name, "source": ec.pairwise_source, "comparisons": {}}
    for a, b in map(_split_pair, ec.pairwise):
        rows_a = read_json(run.root / "eval" / "answers" / f"{a}.json")
        rows_b = read_json(run.root / "eval" / "answers" / f"{b}.json")
        res = pw.pairwise_win_rate([r["instruction"] for r in rows_a], [r["output"] for r in rows_a],
                                   [r["output"] for r in rows_b], judge)
        write_jsonl(run.root / "eval" / f"pairwise.{a}_vs_{b}.jsonl", res.pop("records"))
        results["comparisons"][f"{a}:{b}"] = res
    write_json(out, results)
    return results
