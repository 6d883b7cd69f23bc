"""A scorer over every sample, across the processes of `accelerate launch` (ual/shards.py).

Each process scores its shards of the samples (the model scorers read their rows of the run's tokenized set,
mapped from the leader's files) and keeps each shard's rows as it finishes; the leader merges them in sample
order. A model scorer's u is relative to the largest measure over every sample, so the merged rows' scores
are made again from their details (`from_details`), as one process scoring everything would make them.
"""

from __future__ import annotations

from pathlib import Path

from ual.lineage import MODEL_SCORERS
from ual.scoring.base import ScoreResult
from ual.shards import arrow_files, job_folder, map_shards, open_arrow, order, processes


def score_samples(cfg, scorer, samples, tokenized: dict, record: dict, inputs) -> list[ScoreResult]:
    """scorer.score(samples, **tokenized), across processes when launched as several. `record`: the score
    stage's lineage record (its fingerprint covers the samples and the settings); inputs(cfg): the scorer and
    samples, as a follower builds them (a module-level function: it is sent to the followers)."""
    if processes() == 1 or not samples or cfg.score.scorer not in MODEL_SCORERS:
        # the judge and the prior run on rank 0 alone: an API judge's requests, cache and batch files are one
        # writer's (the other processes are let go when the stage ends)
        return scorer.score(samples, **tokenized)
    encoded = tokenized.get("encoded")
    folder = job_folder(cfg.run_path, "score", [record["fingerprint"], scorer.name, len(samples), cfg.shard_size])
    rows = order(score_shards, cfg, str(folder), len(samples), arrow_files(encoded) if encoded is not None else None,
                 inputs, scorer=scorer, samples=samples, encoded=encoded)
    results = [ScoreResult(r["id"], r["score"], r["details"]) for r in rows]
    if hasattr(scorer, "from_details"):
        results = scorer.from_details([r.id for r in results], [r.details for r in results])
    return results


def score_shards(cfg, folder: str, n: int, files: list[str] | None, inputs, scorer=None, samples=None,
                 encoded=None, kept=None):
    """This process's shards (an order of the leader's: a follower builds the same scorer and reads the same
    samples and tokenized rows)."""
    if scorer is None:
        scorer, samples = inputs(cfg)
        encoded = open_arrow(files) if files else None
        if len(samples) != n:
            raise RuntimeError(f"this process read {len(samples)} samples, the leader {n}: the samples changed")

    def compute(items: range) -> list[dict]:
        part = [samples[i] for i in items]
        results = scorer.score(part, encoded=encoded.select(items)) if encoded is not None else scorer.score(part)
        return [{"id": r.id, "score": r.score, "details": r.details} for r in results]

    return map_shards(Path(folder), n, cfg.shard_size, compute)
