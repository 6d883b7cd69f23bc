"""`ual eval` across the processes of `accelerate launch` (ual/shards.py): the held-out NLL and calibration and
GSM8K in shards of the held-out samples, merged in sample order on the leader; lm-eval's benchmarks through
lm-eval's own data-parallel path (each process runs its share of the requests, lm-eval gathers them on rank 0).

The leader evaluates a model with what it has loaded; a follower loads the same model once per model
(`kept`: what it loaded for the stage's earlier orders) and reads the same held-out samples, and the same
tokenized rows mapped from the leader's files. The multiple-choice questions, the clustering features, the
answers side by side and the pairwise judge run on the leader alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ual.shards import arrow_files, job_folder, map_shards, open_arrow, order, processes
from ual.token_stats import TokenStats


def heldout_token_stats(cfg, name: str, model, tokenizer, heldout, tokens, desc: str) -> list[TokenStats]:
    """response_token_stats over the held-out samples (per-token confidence and correctness kept)."""
    from ual.token_stats import response_token_stats

    if processes() == 1 or not heldout:
        return response_token_stats(model, tokenizer, heldout, cfg.data.max_length, cfg.eval.batch_size,
                                     cfg.data.train_on_prompt, desc=desc, keep_tokens=True, encoded=tokens)
    folder = _folder(cfg, name, "nll", len(heldout))
    rows = order(nll_shards, cfg, name, str(folder), len(heldout), arrow_files(tokens), desc,
                 model=model, tokenizer=tokenizer, samples=heldout, encoded=tokens)
    return [TokenStats(r["nll"], r["entropy"], r["tokens"], np.asarray(r["confidence"], dtype=np.float32),
                       np.asarray(r["correct"], dtype=bool)) for r in rows]


def nll_shards(cfg, name: str, folder: str, n: int, files: list[str], desc: str, model=None, tokenizer=None,
               samples=None, encoded=None, kept=None):
    from ual.token_stats import response_token_stats

    if model is None:
        model, tokenizer = _follower_model(cfg, name, kept)
        samples, encoded = _follower_heldout(cfg, kept, n), open_arrow(files)

    def compute(items: range) -> list[dict]:
        stats = response_token_stats(model, tokenizer, [samples[i] for i in items], cfg.data.max_length,
                                     cfg.eval.batch_size, cfg.data.train_on_prompt, desc=desc, keep_tokens=True,
                                     encoded=encoded.select(items))
        return [{"nll": st.nll, "entropy": st.entropy, "tokens": st.tokens, "confidence": st.confidence.tolist(),
                 "correct": st.correct.tolist()} for st in stats]

    return map_shards(folder=Path(folder), n=n, shard_size=cfg.shard_size, compute=compute)


def maths_records(cfg, name: str, model, tokenizer, maths) -> dict:
    """evaluate_maths over the held-out maths samples (greedy): the aggregates from the merged records."""
    from ual.evaluation.maths import evaluate_maths, maths_summary

    ec = cfg.eval
    if processes() == 1:
        return evaluate_maths(model, tokenizer, maths, batch_size=ec.batch_size, max_new_tokens=ec.max_new_tokens)
    folder = _folder(cfg, name, "gsm8k", len(maths))
    records = order(maths_shards, cfg, name, str(folder), len(maths), model=model, tokenizer=tokenizer,
                    maths=maths)
    return {**maths_summary(records, ec.max_new_tokens), "records": records}


def maths_shards(cfg, name: str, folder: str, n: int, model=None, tokenizer=None, maths=None, kept=None):
    from ual.evaluation.maths import evaluate_maths, maths_samples

    if model is None:
        model, tokenizer = _follower_model(cfg, name, kept)
        maths = maths_samples(cfg.eval, _follower_heldout(cfg, kept, None))
        if len(maths) != n:
            raise RuntimeError(f"this process has {len(maths)} maths samples, the leader {n}: the samples changed")

    def compute(items: range) -> list[dict]:
        return evaluate_maths(model, tokenizer, [maths[i] for i in items], batch_size=cfg.eval.batch_size,
                              max_new_tokens=cfg.eval.max_new_tokens)["records"]

    return map_shards(folder=Path(folder), n=n, shard_size=cfg.shard_size, compute=compute)


def benchmark_results(cfg, name: str, model, tokenizer, plan) -> dict:
    """run_harness's results for one model: under `accelerate launch` every process runs lm-eval, which
    shares the requests among them and gathers the results on the leader."""
    return order(harness_job, cfg, name, plan, model=model, tokenizer=tokenizer)


def harness_job(cfg, name: str, plan, model=None, tokenizer=None, kept=None) -> dict | None:
    from ual.evaluation.harness import run_harness

    if model is None:
        model, tokenizer = _follower_model(cfg, name, kept)
    ec = cfg.eval
    return run_harness(model, tasks=plan.hub, tokenizer=tokenizer, local_mc=plan.local_mc,
                       local_gsm8k=plan.local_gsm8k, batch_size=ec.batch_size, limit=ec.tasks_limit,
                       num_fewshot=ec.tasks_fewshot, apply_chat_template=ec.tasks_chat_template, seed=cfg.seed,
                       mc_shuffle=ec.mc_shuffle, ece_bins=ec.ece_bins,
                       benchmarks={t: n if n is not None else ec.tasks_limit for t, n in plan.benchmarks.items()},
                       hub_benchmarks={t: n if n is not None else ec.tasks_limit
                                       for t, n in plan.hub_benchmarks.items()})


def _folder(cfg, name: str, job: str, n: int) -> Path:
    """The shards of one model's `job`: keyed by the model's evaluation record (held-out data, the model,
    the settings that shape the metrics) and the shard cut."""
    from ual.config import to_dict
    from ual.lineage import eval_record
    from ual.runfolder import model_key

    record = eval_record(to_dict(cfg), cfg.run_path, name)
    return job_folder(cfg.run_path, f"{job}-{model_key(name)}",
                      [record["fingerprint"], n, cfg.shard_size, cfg.data.max_length, cfg.data.train_on_prompt])


def _follower_model(cfg, name: str, kept: dict):
    """(model, tokenizer) in a follower, loaded once per model of the stage (one in memory, as on the leader)."""
    from ual.evaluation.loading import load_for_eval
    from ual.models import load_tokenizer

    if kept.get("name") != name:
        kept.pop("model", None)
        kept.update(name=name, model=load_for_eval(cfg, name),
                    tokenizer=load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.chat_template))
    return kept["model"], kept["tokenizer"]


def _follower_heldout(cfg, kept: dict, n: int | None):
    """The held-out samples, read once in a follower (n: as many as the leader has)."""
    from ual.runfolder import RunFolder

    if "heldout" not in kept:
        kept["heldout"] = RunFolder(cfg.run_path).load_samples("heldout")
    if n is not None and len(kept["heldout"]) != n:
        raise RuntimeError(f"this process read {len(kept['heldout'])} held-out samples, the leader {n}")
    return kept["heldout"]
