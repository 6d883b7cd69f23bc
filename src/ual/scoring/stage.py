"""The `ual score` stage: samples.jsonl -> scores.jsonl with the configured scorer."""

from __future__ import annotations

import logging
from collections import Counter

from ual.config import ExperimentConfig
from ual.io import read_jsonl, write_jsonl
from ual.runfolder import RunFolder

log = logging.getLogger(__name__)


def build_scorer(cfg: ExperimentConfig):
    sc = cfg.score
    max_length = sc.max_length or cfg.data.max_length
    if sc.scorer == "perplexity":
        from ual.scoring.perplexity import PerplexityScorer

        return PerplexityScorer(sc.model or cfg.model, max_length, sc.batch_size, cfg.device, cfg.trust_remote_code)
    if sc.scorer == "judge":
        from ual.scoring.judge import build_judge_scorer

        return build_judge_scorer(sc, cfg.run_path)
    if sc.scorer == "local_judge":
        from ual.scoring.local_judge import build_local_judge_scorer

        return build_local_judge_scorer(sc, sc.model or cfg.model, cfg.device)
    raise ValueError(f"score.scorer must be perplexity, judge or local_judge, got {sc.scorer!r}")


def run_score(cfg: ExperimentConfig, force: bool = False) -> dict:
    run = RunFolder(cfg.run_path)
    samples = run.load_samples("train")
    scorer = build_scorer(cfg)
    if cfg.score.dry_run:
        # Plan only: nothing is sent and scores.jsonl is left as it is.
        if not hasattr(scorer, "plan"):
            raise ValueError(f"--score.dry_run plans paid judge requests; scorer {cfg.score.scorer!r} has nothing to plan")
        return {"dry_run": scorer.plan(samples)}
    if run.scores.exists() and not force:
        done = {r["id"]: r for r in read_jsonl(run.scores)}
        if all(s.id in done and done[s.id]["scorer"] == scorer.name and done[s.id]["score"] is not None for s in samples):
            log.info("scores.jsonl already scores every sample with %s; skipping (use --force to rescore)", scorer.name)
            return {"scorer": scorer.name, "scored": len(samples), "failed": 0, "reused": True}
    results = scorer.score(samples)
    by_id = {s.id: s for s in samples}
    rows = [{"id": r.id, "source": by_id[r.id].source, "score": r.score, "scorer": scorer.name, "details": r.details}
            for r in results]
    write_jsonl(run.scores, rows)
    from ual.scoring.analysis import scores_report

    # Histograms per source, failures with reasons (scores_report.json, failures.jsonl, *.png).
    scores_report(run.scores, run.root / "scores_report")
    failed = [r for r in results if r.score is None]
    summary = {"scorer": scorer.name, "scored": len(results) - len(failed), "failed": len(failed),
               "failure_reasons": dict(Counter(str(r.details.get("error")) for r in failed).most_common(10))}
    if failed:
        log.warning("%d samples could not be scored: %s", len(failed), summary["failure_reasons"])
    return summary
