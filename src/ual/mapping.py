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
import numpy as np
import pandas as pd

from ual.config import ExperimentConfig, to_dict
from ual.io import jsonl_columns, write_json, write_jsonl
from ual.lineage import Lineage, map_record
from ual.runfolder import RunFolder, read_score_column, read_scores
from ual.smoothing import fit_scale, map_to_smoothing, normalize_scores

log = logging.getLogger(__name__)


def run_map(cfg: ExperimentConfig) -> dict:
    import pyarrow as pa

    run = RunFolder(cfg.run_path)
    table = jsonl_columns(run.require(run.samples, "data"), pa.schema([("id", pa.string()), ("source", pa.string())]))
    ids, sources = table.column("id").to_pylist(), np.array(table.column("source").to_pylist(), dtype=object)
    del table
    scores_path = run.require(run.scores, "score")
    score_ids, score_values, repeated = read_score_column(scores_path)
    where = pd.Index(ids).get_indexer(score_ids)
    if (where < 0).any():  # scores of other samples: the strict reader names them with their lines
        read_scores(scores_path, keep_rows=False).require_known(set(ids))
    raw_all = np.full(len(ids), np.nan)
    raw_all[where] = score_values
    del score_ids, score_values, where
    opts = cfg.smoothing

    missing = np.flatnonzero(np.isnan(raw_all))
    if len(missing) and opts.missing == "error":
        first = int(missing[0])
        raise ValueError(
            f"{len(missing)} of {len(ids)} training samples have no score in {scores_path} "
            f"(first: {ids[first]} from {sources[first]}); rerun `ual score`, or pass "
            f"--smoothing.missing drop (train without them) or --smoothing.missing mean (give them the mean eps)"
        )
    kept = np.flatnonzero(~np.isnan(raw_all))
    if not len(kept):
        raise ValueError("no training sample has a score")

    raw = raw_all[kept]
    u = normalize_scores(raw, opts.normalize)
    eps = map_to_smoothing(u, opts.target_mean, opts.eps_max)
    with_mean = opts.missing == "mean"
    all_eps = np.concatenate([eps, np.full(len(missing) if with_mean else 0, float(opts.target_mean))])
    all_source = np.concatenate([sources[kept], sources[missing] if with_mean else sources[:0]])

    def rows():
        for i, x, v, e in zip(kept.tolist(), raw.tolist(), u.tolist(), eps.tolist()):
            yield {"id": ids[i], "source": sources[i], "score": x, "u": v, "eps": e}
        if with_mean:
            for i in missing.tolist():
                yield {"id": ids[i], "source": sources[i], "score": None, "u": None, "eps": float(opts.target_mean)}

    if len(missing):
        log.warning("%d training samples without a score: %s", len(missing),
                    "dropped" if opts.missing == "drop" else f"given eps = {opts.target_mean}")
    if repeated:
        log.warning("%s: %d rows repeat an earlier row of the same id (identical; counted once)", scores_path, repeated)

    from ual.scoring.analysis import separation_arrays

    stats = {
        "target_mean": opts.target_mean,
        "normalize": opts.normalize,
        "eps_max": opts.eps_max,
        "scale_k": fit_scale(u, opts.target_mean, opts.eps_max),
        "n": len(all_eps),
        "missing": len(missing),
        "missing_policy": opts.missing,
        "repeated_score_rows": repeated,
        "mean_eps": float(np.mean(all_eps)),
        "clipped": int(np.sum(eps >= opts.eps_max)),
        "mean_eps_by_source": {k: float(np.mean(all_eps[all_source == k])) for k in sorted(set(all_source.tolist()))},
        # How far apart the sources end up: AUC of their scores, ratio of their mean eps.
        "separation": separation_arrays(sources[kept], raw, {"applied": eps}),
    }
    # Written once everything is computed (a failure leaves the last smoothing and config.yaml as they were);
    # the stats last, so smoothing_stats.json never describes another smoothing.jsonl than the one beside it.
    run.smoothing_stats.unlink(missing_ok=True)
    write_jsonl(run.smoothing, rows())
    write_json(run.smoothing_stats, stats)
    Lineage(run.root).put("map", map_record(to_dict(cfg), run.root))
    return stats
