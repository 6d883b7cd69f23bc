"""The demo recipe: every stage, in order, on one run folder. Composition only.

Each stage skips work whose outputs already exist, so a killed demo resumes
where it stopped (pass --force to redo training and evaluation).
"""

from __future__ import annotations

import logging
import time

from ual.config import ExperimentConfig
from ual.io import write_json

log = logging.getLogger(__name__)

PIPELINE = ("data", "score", "map", "train", "eval", "report")


def run_demo(cfg: ExperimentConfig, force: bool = False) -> dict:
    from ual.cli import run_stage

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
