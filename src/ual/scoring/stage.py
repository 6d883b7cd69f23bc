"""The `ual score` stage: samples.jsonl -> scores.jsonl with the configured scorer.

With score.heldout (the default) the held-out samples are scored in the same call and
written to heldout_scores.jsonl: evaluation reports its results per quartile of u.
Scores are kept per scorer in scores/ (held-out ones in scores/heldout/), so switching
back to a scorer already run, or between the entropy and perplexity of one reference
model (one forward pass gives both), costs no model call.
"""

from __future__ import annotations

import logging
from ual.config import SCORERS, ExperimentConfig, to_dict
from ual.config_checks import choice_problem
from ual.io import write_jsonl
from ual.lineage import Lineage, score_record
from ual.runfolder import RunFolder, read_scores
from ual.scoring.parallel import score_samples
from ual.scoring.unscored import unscored_summary

log = logging.getLogger(__name__)


def build_scorer(cfg: ExperimentConfig):
    sc = cfg.score
    max_length = sc.max_length or cfg.data.max_length
    if sc.scorer in ("perplexity", "entropy", "entropy_ratio", "nll_ratio"):
        from ual.scoring.perplexity import ModelUncertaintyScorer

        reference = sc.model or cfg.model
        return ModelUncertaintyScorer(sc.scorer, reference, max_length, sc.batch_size, cfg.device,
                                      cfg.trust_remote_code, cfg.chat_template if reference == cfg.model else None)
    if sc.scorer == "prior":
        from ual.scoring.prior import PriorScorer

        return PriorScorer(sc.prior)
    if sc.scorer == "judge":
        from ual.scoring.judge import build_judge_scorer

        return build_judge_scorer(sc, cfg.run_path)
    if sc.scorer == "local_judge":
        from ual.scoring.local_judge import build_local_judge_scorer

        return build_local_judge_scorer(sc, sc.model or cfg.model, cfg.device)
    # Unreachable for a config as built (ScoreConfig checks its choices); only one changed afterwards.
    raise ValueError(f"score.scorer: {choice_problem(sc.scorer, SCORERS)}")


def run_score(cfg: ExperimentConfig, force: bool = False) -> dict:
    run = RunFolder(cfg.run_path)
    splits = score_splits(cfg, run)
    scorer = build_scorer(cfg)
    everything = [s for samples in splits.values() for s in samples]
    if cfg.score.dry_run:
        # Plan only: nothing is sent and scores.jsonl is left as it is.
        if not hasattr(scorer, "plan"):
            raise ValueError(f"--score.dry_run plans paid judge requests; scorer {cfg.score.scorer!r} has nothing to plan")
        return {"dry_run": scorer.plan(everything)}
    reused = {"scorer": scorer.name, "scored": len(everything), "failed": 0, "reused": True}
    record = score_record(to_dict(cfg), run.root)
    changed = Lineage(run.root).stale("score", record)
    if changed:  # same scorer name, other settings (length, prompt file, samples): its kept rows do not apply
        log.info("scores were made with other settings or inputs (%s); scoring again", "; ".join(changed))
    fresh = force or bool(changed)
    if not fresh and all(_complete_scores(run.scores if split == "train" else run.heldout_scores, samples, scorer.name)
                         for split, samples in splits.items()):
        log.info("%s already scored every sample; reused (use --force to rescore)", scorer.name)
        Lineage(run.root).put("score", record)
        return reused  # the current scores are this scorer's: they, and the smoothing mapped from them, stay
    # The current scores are replaced only once the new ones exist (a failure leaves them, the smoothing and
    # config.yaml as they were); the rows kept per scorer in scores/ are a cache, so the same scorer again
    # costs no model call.
    if not fresh:
        stored = _stored_rows(run, scorer.name, splits)
        if stored is not None:  # scored before another scorer replaced them
            _write_rows(run, scorer.name, stored, record)
            log.info("%s already scored every sample; restored from scores/ (use --force to rescore)", scorer.name)
            return reused
    results, derived = None, None
    for sibling in [] if force else getattr(scorer, "siblings", []):
        stored = _stored_rows(run, sibling, splits)
        if stored is not None:  # the same forward pass gave this scorer's measure too
            rows = [r for split_rows in stored.values() for r in split_rows]
            results = scorer.from_details([r["id"] for r in rows], [r["details"] for r in rows])
            derived = sibling
            log.info("%s: derived from %s's kept details (same forward pass); no model call", scorer.name, sibling)
            break
    if results is None:
        results = score_samples(cfg, scorer, everything, _tokenized(cfg, run, scorer, splits), record, scoring_inputs)
    by_id = {s.id: s for s in everything}
    rows = [{"id": r.id, "source": by_id[r.id].source, "score": r.score, "scorer": scorer.name, "details": r.details}
            for r in results]
    n_train = len(splits["train"])
    _write_rows(run, scorer.name, {"train": rows[:n_train], "heldout": rows[n_train:]} if "heldout" in splits
                else {"train": rows}, record)
    # what is left without a score, per split, with its reasons: the CLI exits with EXIT_UNSCORED then
    per_split = {"train": results[:n_train], **({"heldout": results[n_train:]} if "heldout" in splits else {})}
    left = unscored_summary(per_split, scorer.name, cfg.score.scorer == "judge", cfg.score.via)
    return {"scorer": scorer.name, "scored": n_train - left["failed"],
            "heldout_scored": sum(r.score is not None for r in results[n_train:]) if "heldout" in splits else None,
            "derived_from": derived, **left}


def score_splits(cfg: ExperimentConfig, run: RunFolder) -> dict:
    """{split: samples} this command scores: the training set, and the held-out set with score.heldout."""
    splits = {"train": run.load_samples("train")}
    if cfg.score.heldout and run.heldout.exists():
        splits["heldout"] = run.load_samples("heldout")
    return splits


def scoring_inputs(cfg: ExperimentConfig) -> tuple:
    """(scorer, samples) of this command, built again in each follower process (scoring/parallel.py)."""
    return build_scorer(cfg), [s for samples in score_splits(cfg, RunFolder(cfg.run_path)).values() for s in samples]


def _tokenized(cfg: ExperimentConfig, run: RunFolder, scorer, splits: dict) -> dict:
    """{"encoded": the splits' tokenized sets at score.max_length} for a model scorer that reads the run's
    own tokenizer (ual.data.tokenized: built once, reused by every scorer of the same length); else {}."""
    if not getattr(scorer, "reads_tokenized", False) or cfg.score.model not in (None, cfg.model):
        return {}
    from datasets import concatenate_datasets

    from ual.data.tokenized import tokenized_set
    from ual.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    max_length = cfg.score.max_length or cfg.data.max_length
    sets = [tokenized_set(run.root, split, tokenizer, max_length, False, cfg.data.num_proc) for split in splits]
    return {"encoded": concatenate_datasets(sets) if len(sets) > 1 else sets[0]}


def _write_rows(run: RunFolder, scorer_name: str, rows: dict[str, list[dict]], record: dict) -> None:
    """The current scores (what `ual map` and evaluation read), a copy kept per scorer, and the report.
    The smoothing mapped from the scores they replace goes (it would describe other scores)."""
    run.discard("score")
    Lineage(run.root).drop("score", "map")
    for split, split_rows in rows.items():
        current = run.scores if split == "train" else run.heldout_scores
        write_jsonl(run.scorer_scores(scorer_name, split), split_rows)
        write_jsonl(current, split_rows)
    write_scores_report(run)
    Lineage(run.root).put("score", record)


def _stored_rows(run: RunFolder, scorer_name: str, splits: dict) -> dict[str, list[dict]] | None:
    """Rows of this scorer for every sample of every split, from the current or the kept files; else None."""
    out = {}
    for split, samples in splits.items():
        current = run.scores if split == "train" else run.heldout_scores
        for path in (current, run.scorer_scores(scorer_name, split)):
            done = _complete_scores(path, samples, scorer_name)
            if done is not None:
                out[split] = done
                break
        else:
            return None
    return out


def write_scores_report(run: RunFolder, compare_with=None, smoothing=None) -> dict:
    """scores_report/ for scores.jsonl: histograms per source, failures with reasons, the rank
    correlation with each file of compare_with (default: every other scorer kept in scores/), and
    how well each of them separates the sources (smoothing: the SmoothingConfig the map will use;
    default: the run's config.yaml)."""
    if smoothing is None:
        smoothing = _run_smoothing(run)
    from ual.scoring.analysis import scores_report

    if compare_with is None:
        own = {run.scorer_scores(r["scorer"]) for r in read_scores(run.scores).row.values()}
        compare_with = [p for p in sorted(run.scores_dir.glob("*.jsonl")) if p not in own]
    return scores_report(run.scores, run.scores_report, compare_with=compare_with, smoothing=smoothing)


def _complete_scores(path, samples, scorer_name: str) -> list[dict] | None:
    """The rows of `path` for `samples`, in order, if that file scores every one with this scorer; else None."""
    if not path.exists():
        return None
    try:
        done = read_scores(path).row
    except ValueError as exc:  # a damaged file is not reused: the samples are scored again
        log.warning("not reused: %s", exc)
        return None
    rows = [done.get(s.id) for s in samples]
    if all(r is not None and r.get("scorer") == scorer_name and r["score"] is not None for r in rows):
        return rows
    return None


def _run_smoothing(run: RunFolder):
    from ual.config import SmoothingConfig, load_config

    return load_config(run.config).smoothing if run.config.exists() else SmoothingConfig()
