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
    kept = run.scorer_scores(scorer.name)
    if not force:
        for path in (run.scores, kept):
            done = _complete_scores(path, samples, scorer.name)
            if done is None:
                continue
            if path == kept:  # scored before another scorer replaced them: these become the scores again
                write_jsonl(run.scores, done)
                write_scores_report(run)
            log.info("%s already scores every sample with %s; reused (use --force to rescore)", path.name, scorer.name)
            return {"scorer": scorer.name, "scored": len(samples), "failed": 0, "reused": True}
    results = scorer.score(samples)
    by_id = {s.id: s for s in samples}
    rows = [{"id": r.id, "source": by_id[r.id].source, "score": r.score, "scorer": scorer.name, "details": r.details}
            for r in results]
    write_jsonl(run.scores, rows)
    write_jsonl(kept, rows)  # kept per scorer: running another scorer later does not erase these
    write_scores_report(run)
    failed = [r for r in results if r.score is None]
    summary = {"scorer": scorer.name, "scored": len(results) - len(failed), "failed": len(failed),
               "failure_reasons": dict(Counter(str(r.details.get("error")) for r in failed).most_common(10))}
    if failed:
        log.warning("%d samples could not be scored: %s", len(failed), summary["failure_reasons"])
    return summary


def write_scores_report(run: RunFolder, compare_with=None) -> dict:
    """scores_report/ for scores.jsonl: histograms per source, failures with reasons, and the rank
    correlation with each file of compare_with (default: every other scorer kept in scores/)."""
    from ual.scoring.analysis import scores_report

    if compare_with is None:
        own = {run.scorer_scores(r["scorer"]) for r in read_jsonl(run.scores)}
        compare_with = [p for p in sorted(run.scores_dir.glob("*.jsonl")) if p not in own]
    return scores_report(run.scores, run.scores_report, compare_with=compare_with)


def _complete_scores(path, samples, scorer_name: str) -> list[dict] | None:
    """The rows of `path` for `samples`, in order, if that file scores every one with this scorer; else None."""
    if not path.exists():
        return None
    done = {r["id"]: r for r in read_jsonl(path)}
    rows = [done.get(s.id) for s in samples]
    if all(r is not None and r["scorer"] == scorer_name and r["score"] is not None for r in rows):
        return rows
    return None
