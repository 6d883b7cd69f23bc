"""The table of contents: ual's stages in data-path order, and the recipes that compose them.

    stage   reads                          writes                                 module
    data    data sources                   samples.jsonl, heldout.jsonl           ual.data.stage
    score   samples                        scores.jsonl, heldout_scores.jsonl     ual.scoring.stage
    map     scores.jsonl                   smoothing.jsonl                        ual.mapping
    train   samples, smoothing.jsonl       train/MODE/                            ual.training.stage
    eval    held-out samples, train/       eval/, comparisons.json                ual.evaluation.stage
    report  everything above               report.md, report.html, *.png          ual.report.stage

Recipes compose the stages on one run folder (each stage skips work already done, so a
killed recipe resumes where it stopped):
    run_demo      every stage in order, on configs/demo.yaml
    run_ablation  the paper's ablation: modes side by side, optionally per target mean (--sweep)
    run_seeds     every mode with N training seeds, metrics and differences across seeds
The components they use (tables, sub-run folders) are in ual.training.ablate; `cli.py`
parses arguments and calls this module; no library module imports it.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import nullcontext

from ual.config import ConfigError, ExperimentConfig, run_dir_origin, to_dict
from ual.lineage import announce_differences, record_settings
from ual.io import write_json, write_text
from ual import shards
from ual.optional import require
from ual.runlock import run_folder_lock
from ual.training.ablate import (SEED_SHARED_FILES, across_seed_table, comparison, render, render_seeds,
                                 seed_run_dir, share_base_eval, share_inputs, sub_run_dir)
from ual.training.plan import mode_parts, sharding_from_env, uses_smoothing_map

log = logging.getLogger(__name__)

# Stages that run data parallel under `accelerate launch` (ual/shards.py); training is the Trainer's own.
PARALLEL_STAGES = ("score", "eval")

STAGES = {
    "data": "build the training and held-out sets from the configured sources",
    "score": "score each training sample's uncertainty",
    "map": "map scores to per-sample label smoothing",
    "train": "train the configured modes (sft, ls, ual) with the same seed, order and steps",
    "eval": "evaluate the base model and each trained mode",
    "report": "write report.md, metrics.json and plots",
    "demo": "run every stage on the built-in default (configs/demo.yaml)",
}


def run_stage(stage: str, cfg: ExperimentConfig, force: bool = False, settings: ExperimentConfig | None = None):
    """Run one stage on cfg's run folder, holding its lock (ual/runlock.py). The folder's config.yaml is
    updated only once the stage has succeeded, with the settings that define its outputs (ual/lineage.py:
    the contract); `settings` is the config to record when cfg carries changes for this command only
    (`ual eval --tasks`)."""
    check_extras(stage, cfg)
    if stage in PARALLEL_STAGES and shards.is_follower():
        shards.follow(cfg)  # under `accelerate launch`: this process scores or evaluates its shards, rank 0 writes
        return None
    now, folder_config = to_dict(settings or cfg), cfg.run_path / "config.yaml"
    try:
        cfg.run_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{run_dir_origin(cfg)}: cannot write the run folder {cfg.run_path} "
                          f"({exc.strerror or exc})") from None
    dry_run = stage == "score" and cfg.score.dry_run  # plans only: writes nothing, so takes no lock
    with nullcontext() if dry_run else run_folder_lock(cfg.run_path):
        announce_differences(stage, folder_config, now, defaults=to_dict(ExperimentConfig()))
        with shards.leading(cfg.run_path, clean=not dry_run) if stage in PARALLEL_STAGES else nullcontext():
            result = _run_stage(stage, cfg, force)
        if not dry_run:
            record_settings(stage, folder_config, now)
    return result


def _run_stage(stage: str, cfg: ExperimentConfig, force: bool):
    if stage == "data":
        from ual.data.stage import build_dataset

        return build_dataset(cfg, model_tokenizer=True)
    if stage == "score":
        from ual.scoring.stage import run_score

        return run_score(cfg, force=force)
    if stage == "map":
        from ual.mapping import run_map

        return run_map(cfg)
    if stage == "train":
        from ual.training.stage import run_train

        return run_train(cfg, force=force)
    if stage == "eval":
        from ual.evaluation.stage import run_eval

        return run_eval(cfg, force=force)
    if stage == "report":
        from ual.report.stage import run_report

        run_report(cfg)
        return {"report": str(cfg.run_path / "report.md")}
    if stage == "demo":
        return run_demo(cfg, force=force)
    raise ValueError(stage)


def check_extras(stage: str, cfg: ExperimentConfig) -> None:
    """Optional packages this stage will need, checked before it writes or loads anything."""
    if stage in ("eval", "demo") and cfg.eval.tasks:
        from ual.evaluation.harness import require_lm_eval

        require_lm_eval()
    if stage in ("train", "demo") and cfg.train.report_to in ("tensorboard", "wandb", "trackio"):
        require(cfg.train.report_to, f"train.report_to: {cfg.train.report_to}")
    if stage in ("train", "demo") and sharding_from_env() in ("zero2", "zero3"):
        require("deepspeed", "training under `accelerate launch` with a DeepSpeed config")


# --------------------------------------------------------------------------- recipes

PIPELINE = ("data", "score", "map", "train", "eval", "report")


def run_demo(cfg: ExperimentConfig, force: bool = False) -> dict:
    timings = {}
    start = time.time()
    for stage in PIPELINE:
        t = time.time()
        log.info("== stage %s ==", stage)
        run_stage(stage, cfg, force=force)
        timings[stage] = round(time.time() - t, 1)
        log.info("== stage %s done in %.0f s (total %.0f s) ==", stage, timings[stage], time.time() - start)
        write_json(cfg.run_path / "timings.json", timings)  # the report shows where the time went
    return {"run": str(cfg.run_path), "report": str(cfg.run_path / "report.md"), "seconds": timings}


def run_ablation(cfg: ExperimentConfig, modes: list[str], sweep: list[float] | None = None,
                 evaluate: bool = False, force: bool = False) -> dict:

    root = cfg.run_path
    prepare(cfg, need_scores=any(map(uses_smoothing_map, modes)))
    if sweep is None:
        runs = [(cfg.smoothing.target_mean, cfg, modes)]
        shared_modes: list[str] = []
    else:  # eps 0 modes (sft, dft, eaft) do not depend on the target mean
        shared_modes = [m for m in modes if mode_parts(m)[0] == "sft"]
        runs = []
        for mean in sweep:
            sub = copy.deepcopy(cfg)
            sub.run_dir = str(sub_run_dir(root, mean))
            sub.smoothing.target_mean = mean
            share_inputs(root, sub.run_path)
            runs.append((mean, sub, [m for m in modes if m not in shared_modes]))
        if shared_modes:
            train_modes(cfg, shared_modes, force)
            if evaluate:
                evaluate_models(cfg, ["base"] + shared_modes, force)
    for mean, sub, sub_modes in runs:
        log.info("ablate: target mean %g: %s", mean, ", ".join(sub_modes))
        if any(map(uses_smoothing_map, sub_modes)):
            run_stage("map", sub)
        train_modes(sub, sub_modes, force)
        if evaluate:
            evaluate_models(sub, ([] if shared_modes or sweep else ["base"]) + sub_modes, force)
    if evaluate and sweep is None:
        from ual.report.stage import run_report

        run_report(cfg)
    table = comparison(cfg, modes, sweep)
    write_json(root / "ablation.json", table)
    write_text(root / "ablation.md", render(table))
    return {"table": str(root / "ablation.md"), "json": str(root / "ablation.json"), "rows": len(table["rows"])}


def prepare(cfg: ExperimentConfig, need_scores: bool) -> None:
    """Run `data` (and `score`, for ual) unless their outputs exist: all modes share them."""

    root = cfg.run_path
    if not (root / "samples.jsonl").exists():
        run_stage("data", cfg)
    if need_scores and not (root / "scores.jsonl").exists():
        run_stage("score", cfg)


def run_seeds(cfg: ExperimentConfig, modes: list[str], n_seeds: int, evaluate: bool = False,
              force: bool = False) -> dict:
    """Every mode with n_seeds training seeds; per-seed folders, then the across-seed tables."""
    from ual.evaluation.compare import run_comparisons
    from ual.runfolder import RunFolder

    root = cfg.run_path
    prepare(cfg, need_scores=any(map(uses_smoothing_map, modes)))
    if any(map(uses_smoothing_map, modes)):
        run_stage("map", cfg)
    if evaluate:
        evaluate_models(cfg, ["base"], force)
    seeds = [cfg.seed + k for k in range(n_seeds)]
    subs = []
    for seed in seeds:
        sub = copy.deepcopy(cfg)
        sub.run_dir, sub.seed = str(seed_run_dir(root, seed)), seed
        share_inputs(root, sub.run_path, SEED_SHARED_FILES)
        log.info("ablate: seed %d (%d of %d): %s", seed, len(subs) + 1, n_seeds, ", ".join(modes))
        train_modes(sub, modes, force)
        if evaluate:
            share_base_eval(root, sub.run_path)
            evaluate_models(sub, modes, force)
        subs.append(sub)
    result = {"seeds": seeds, "folders": [str(s.run_path) for s in subs]}
    if evaluate:
        pooled = run_comparisons(cfg, runs=[RunFolder(s.run_path) for s in subs])
        table = across_seed_table(cfg, modes, subs, pooled)
        write_json(root / "seeds.json", table)
        write_text(root / "seeds.md", render_seeds(table))
        from ual.report.stage import run_report

        run_report(cfg)
        result.update(table=str(root / "seeds.md"), json=str(root / "seeds.json"))
    return result


def train_modes(cfg: ExperimentConfig, modes: list[str], force: bool) -> dict:

    c = copy.deepcopy(cfg)
    c.train.modes = list(modes)
    return run_stage("train", c, force=force)


def evaluate_models(cfg: ExperimentConfig, models: list[str], force: bool) -> dict:
    from ual.config import split_pair

    c = copy.deepcopy(cfg)
    c.eval.models = list(models)
    # Pairwise comparisons need both models in this run folder (with a sweep, sft and base live in RUN).
    c.eval.pairwise = [p for p in c.eval.pairwise if all(m in models for m in split_pair(p))]
    return run_stage("eval", c, force=force)
