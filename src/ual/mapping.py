"""The `ual map` stage: scores.jsonl -> smoothing.jsonl (per-sample eps for UAL).

The arithmetic is `smoothing.map_to_smoothing` (pure); this file is the glue:
join scores to training samples by id, decide what an unscored sample means
(never silently), normalise the scores (smoothing.normalize), and write the result
with its statistics, including how well the sources separate. The score file is read
through runfolder.read_scores: a bad row, an id scored twice differently, or an id that
matches no training sample is an error naming the file and line.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from ual.config import ExperimentConfig, to_dict
from ual.io import write_json, write_jsonl
from ual.lineage import Lineage, map_record
from ual.runfolder import RunFolder, read_scores
from ual.smoothing import fit_scale, map_to_smoothing, normalize_scores

log = logging.getLogger(__name__)


def run_map(cfg: ExperimentConfig) -> dict:
    run = RunFolder(cfg.run_path)
    samples = run.load_samples("train")
    scores = read_scores(run.require(run.scores, "score"))
    scores.require_known({s.id for s in samples})
    scored = scores.score
    opts = cfg.smoothing

    missing = [s for s in samples if scored.get(s.id) is None]
    if missing and opts.missing == "error":
        raise ValueError(
            f"{len(missing)} of {len(samples)} training samples have no score in {scores.path} "
            f"(first: {missing[0].id} from {missing[0].source}); rerun `ual score`, or pass "
            f"--smoothing.missing drop (train without them) or --smoothing.missing mean (give them the mean eps)"
        )
    kept = [s for s in samples if scored.get(s.id) is not None]
    if not kept:
        raise ValueError("no training sample has a score")

    raw = np.array([scored[s.id] for s in kept], dtype=np.float64)
    u = normalize_scores(raw, opts.normalize)
    eps = map_to_smoothing(u, opts.target_mean, opts.eps_max)
    rows = [{"id": s.id, "source": s.source, "score": float(x), "u": float(v), "eps": float(e)}
            for s, x, v, e in zip(kept, raw, u, eps)]
    if missing and opts.missing == "mean":
        rows += [{"id": s.id, "source": s.source, "score": None, "u": None, "eps": float(opts.target_mean)}
                 for s in missing]
    if missing:
        log.warning("%d training samples without a score: %s", len(missing),
                    "dropped" if opts.missing == "drop" else f"given eps = {opts.target_mean}")
    if scores.repeated:
        log.warning("%s: %d rows repeat an earlier row of the same id (identical; counted once)",
                    scores.path, scores.repeated)

    by_source = defaultdict(list)
    for r in rows:
        by_source[r["source"]].append(r["eps"])
    from ual.scoring.analysis import separation

    stats = {
        "target_mean": opts.target_mean,
        "normalize": opts.normalize,
        "eps_max": opts.eps_max,
        "scale_k": fit_scale(u, opts.target_mean, opts.eps_max),
        "n": len(rows),
        "missing": len(missing),
        "missing_policy": opts.missing,
        "repeated_score_rows": scores.repeated,
        "mean_eps": float(np.mean([r["eps"] for r in rows])),
        "clipped": int(np.sum(eps >= opts.eps_max)),
        "mean_eps_by_source": {k: float(np.mean(v)) for k, v in sorted(by_source.items())},
        # How far apart the sources end up: AUC of their scores, ratio of their mean eps.
        "separation": separation([r for r in rows if r["score"] is not None], eps_key="eps"),
    }
    # Written once everything is computed (a failure leaves the last smoothing and config.yaml as they were);
    # the stats last, so smoothing_stats.json never describes another smoothing.jsonl than the one beside it.
    run.smoothing_stats.unlink(missing_ok=True)
    write_jsonl(run.smoothing, rows)
    write_json(run.smoothing_stats, stats)
    Lineage(run.root).put("map", map_record(to_dict(cfg), run.root))
    return stats
