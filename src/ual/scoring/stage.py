"""The `ual score` stage: samples.jsonl -> scores.jsonl with the configured scorer.

With score.heldout (the default) the held-out samples are scored in the same call and
written to heldout_scores.jsonl: evaluation reports its results per quartile of u.
Scores are kept per scorer in scores/ (held-out ones in scores/heldout/), so switching
back to a scorer already run, or between the entropy and perplexity of one reference
model (one forward pass gives both), costs no model call.

The samples are read from disk as they are needed (ual/sample_file.py: ids and sources as columns), and
the score rows are written as the scorer gives its results, so scoring a million samples holds their ids,
not them (the prior scorer never parses a conversation; the judge renders its prompts one at a time).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ual.config import SCORERS, ExperimentConfig, to_dict
from ual.config_checks import choice_problem
from ual.io import atomic_path, write_jsonl
from ual.lineage import Lineage, score_record
from ual.runfolder import RunFolder, read_score_table
from ual.sample_file import SampleFile
from ual.scoring.base import ScoreResult
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
    paths = score_paths(cfg, run)
    # Read from disk a sample at a time: ids and sources are columns, a conversation is parsed when a
    # scorer asks for it (the prior scorer never does), so a million samples take ids' memory, not theirs.
    everything = SampleFile(*paths.values())
    split_ids = dict(zip(paths, _split(everything.ids, everything.split_sizes())))
    scorer = build_scorer(cfg)
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
    if not fresh and all(_complete_scores(run.scores if split == "train" else run.heldout_scores, ids, scorer.name)
                         for split, ids in split_ids.items()):
        log.info("%s already scored every sample; reused (use --force to rescore)", scorer.name)
        Lineage(run.root).put("score", record)
        return reused  # the current scores are this scorer's: they, and the smoothing mapped from them, stay
    # The current scores are replaced only once the new ones exist (a failure leaves them, the smoothing and
    # config.yaml as they were); the rows kept per scorer in scores/ are a cache, so the same scorer again
    # costs no model call.
    if not fresh:
        stored = _stored_files(run, scorer.name, split_ids)
        if stored is not None:  # scored before another scorer replaced them
            _write_rows(run, scorer.name, {split: _rows_in_order(path, split_ids[split])
                                           for split, path in stored.items()}, record)
            log.info("%s already scored every sample; restored from scores/ (use --force to rescore)", scorer.name)
            return reused
    results, derived = None, None
    for sibling in [] if force else getattr(scorer, "siblings", []):
        stored = _stored_files(run, sibling, split_ids)
        if stored is not None:  # the same forward pass gave this scorer's measure too
            rows = [r for split, path in stored.items() for r in _rows_in_order(path, split_ids[split])]
            results = scorer.from_details([r["id"] for r in rows], [r["details"] for r in rows])
            derived = sibling
            log.info("%s: derived from %s's kept details (same forward pass); no model call", scorer.name, sibling)
            break
    if results is None:
        results = score_samples(cfg, scorer, everything, _tokenized(cfg, run, scorer, list(paths)), record,
                                scoring_inputs)
    failed = {split: [] for split in paths}  # the results without a score (few), per split
    results = iter(results)
    rows = {split: _score_rows(results, ids, everything.sources[start:], scorer.name, failed[split])
            for (split, ids), start in zip(split_ids.items(), (0, len(split_ids["train"])))}
    _write_rows(run, scorer.name, rows, record)
    # what is left without a score, per split, with its reasons: the CLI exits with EXIT_UNSCORED then
    left = unscored_summary(failed, {split: len(ids) for split, ids in split_ids.items()}, scorer.name,
                            cfg.score.scorer == "judge", cfg.score.via)
    heldout = split_ids.get("heldout")
    return {"scorer": scorer.name, "scored": len(split_ids["train"]) - left["failed"],
            "heldout_scored": len(heldout) - left["heldout_failed"] if heldout is not None else None,
            "derived_from": derived, **left}


def score_paths(cfg: ExperimentConfig, run: RunFolder) -> dict[str, Path]:
    """{split: sample file} this command scores: the training set, and the held-out set with score.heldout."""
    paths = {"train": run.require(run.samples, "data")}
    if cfg.score.heldout and run.heldout.exists():
        paths["heldout"] = run.heldout
    return paths


def scoring_inputs(cfg: ExperimentConfig) -> tuple:
    """(scorer, samples) of this command, built again in each follower process (scoring/parallel.py)."""
    return build_scorer(cfg), SampleFile(*score_paths(cfg, RunFolder(cfg.run_path)).values())


def _split(ids: list[str], sizes: list[int]) -> list[list[str]]:
    starts = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def _score_rows(results: Iterator[ScoreResult], ids: list[str], sources: list[str], scorer_name: str,
                failed: list[ScoreResult]) -> Iterator[dict]:
    """The score rows of the next len(ids) results, made as they are written; the failures go to `failed`."""
    for sid, source in zip(ids, sources):
        r = next(results, None)
        if r is None or r.id != sid:  # a scorer gives its results in the samples' order, one each
            raise RuntimeError(f"scorer {scorer_name} gave {'no result' if r is None else 'a result for ' + r.id} "
                               f"where sample {sid} was expected")
        if r.score is None:
            failed.append(r)
        yield {"id": r.id, "source": source, "score": r.score, "scorer": scorer_name, "details": r.details}


def _tokenized(cfg: ExperimentConfig, run: RunFolder, scorer, splits: list[str]) -> dict:
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


def _write_rows(run: RunFolder, scorer_name: str, rows: dict[str, Iterable[dict]], record: dict) -> None:
    """The current scores (what `ual map` and evaluation read), a copy kept per scorer, and the report.
    The smoothing mapped from the scores they replace goes (it would describe other scores). `rows` are
    read once, in the order given (training first), and written as they come."""
    kept = {split: run.scorer_scores(scorer_name, split) for split in rows}
    for split, split_rows in rows.items():  # the per-scorer cache first: a scorer failing half-way changes nothing else
        write_jsonl(kept[split], split_rows)
    run.discard("score")
    Lineage(run.root).drop("score", "map")
    for split, path in kept.items():
        with atomic_path(run.scores if split == "train" else run.heldout_scores) as current:
            shutil.copyfile(path, current)
    write_scores_report(run)
    Lineage(run.root).put("score", record)


def _stored_files(run: RunFolder, scorer_name: str, split_ids: dict[str, list[str]]) -> dict[str, Path] | None:
    """Per split, a file (the current or the kept one) with this scorer's rows for every sample; else None."""
    out = {}
    for split, ids in split_ids.items():
        current = run.scores if split == "train" else run.heldout_scores
        for path in (current, run.scorer_scores(scorer_name, split)):
            if _complete_scores(path, ids, scorer_name):
                out[split] = path
                break
        else:
            return None
    return out


def _rows_in_order(path: Path, ids: list[str]) -> Iterator[dict]:
    """The rows of score file `path` for `ids`, in that order (read by offset where the file's order differs)."""
    import json

    with open(path, "rb") as fh:
        offsets, position = {}, 0
        for line in fh:
            if line.strip():
                offsets.setdefault(json.loads(line)["id"], position)
            position += len(line)
        for sid in ids:
            fh.seek(offsets[sid])
            yield json.loads(fh.readline())


def write_scores_report(run: RunFolder, compare_with=None, smoothing=None) -> dict:
    """scores_report/ for scores.jsonl: histograms per source, failures with reasons, the rank
    correlation with each file of compare_with (default: every other scorer kept in scores/), and
    how well each of them separates the sources (smoothing: the SmoothingConfig the map will use;
    default: the run's config.yaml)."""
    if smoothing is None:
        smoothing = _run_smoothing(run)
    from ual.scoring.analysis import scores_report

    if compare_with is None:
        own = {run.scorer_scores(name) for name in set(read_score_table(run.scores).scorer) if name}
        compare_with = [p for p in sorted(run.scores_dir.glob("*.jsonl")) if p not in own]
    return scores_report(run.scores, run.scores_report, compare_with=compare_with, smoothing=smoothing)


def _complete_scores(path: Path, ids: list[str], scorer_name: str) -> bool:
    """Whether `path` scores every one of `ids` with this scorer (read as columns: no row is kept)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not path.exists():
        return False
    try:
        table = read_score_table(path)
    except ValueError as exc:  # a damaged file is not reused: the samples are scored again
        log.warning("not reused: %s", exc)
        return False
    good = table.ids.filter(pa.array(~np.isnan(table.score) & (table.scorer == scorer_name)))
    return bool(pc.all(pc.is_in(pa.array(ids, pa.string()), value_set=good)).as_py() is not False)


def _run_smoothing(run: RunFolder):
    from ual.config import SmoothingConfig, load_config

    return load_config(run.config).smoothing if run.config.exists() else SmoothingConfig()
