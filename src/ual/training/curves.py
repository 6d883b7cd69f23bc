"""Evaluation during training: when does each mode start to overfit?

With `train.eval_strategy: steps` (every `train.eval_steps` optimiser steps) or `epoch` (at the end
of every epoch), and once before the first step, a TrainerCallback measures on the model being
trained:
  heldout   the token-weighted NLL of the held-out responses, per data source and over all
  train     the same on a fixed subset of the training samples (`train.eval_train_samples`), so
            heldout - train is the generalisation gap
and appends one row to train/MODE/curve.jsonl:
  {"step", "epoch", "heldout": {SOURCE: nll, ..., "all": nll}, "train": nll, "point": folder}
keeping that point's adapter (or full model) in train/MODE/points/MODE-stepN/, which
`ual eval RUN --adapter RUN/train/MODE/points/MODE-stepN` evaluates like any adapter.

The NLL is the same measure `ual eval` reports (token_stats.response_token_stats: shifted labels,
response tokens only, the training truncation), so the last row matches eval/MODE.json's held-out NLL
of the final model. The pass runs in eval mode without gradients and gives the model its training
mode back. Rows of a resumed run replace the rows after its checkpoint's step.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from ual.io import iter_jsonl, read_jsonl, write_jsonl

log = logging.getLogger(__name__)


def subset_indices(count: int, n: int, seed: int) -> list[int]:
    """Positions of n of `count` training samples, drawn with the run's seed (all of them when there are fewer)."""
    if n >= count:
        return list(range(count))
    return sorted(random.Random(f"curve:{seed}").sample(range(count), n))


def train_subset(run, ids: list[str], n: int, seed: int) -> list:
    """The Samples at `subset_indices` of the training ids, read from samples.jsonl without holding the rest."""
    from ual.sample import Sample

    picked = [ids[i] for i in subset_indices(len(ids), n, seed)]
    wanted, found = set(picked), {}
    for _, row in iter_jsonl(run.samples):
        if row.get("id") in wanted:
            found[row["id"]] = Sample.from_dict(row)
    return [found[i] for i in picked]


def curve_callback(cfg, mode: str, tokenizer, heldout: list, train_samples: list, out: Path, keep: bool = True):
    """The TrainerCallback that writes train/MODE/curve.jsonl (see the module docstring)."""
    from transformers import TrainerCallback

    from ual.token_stats import nll_by_source, response_token_stats

    tc = cfg.train
    path = out / "curve.jsonl"

    def measure(model, samples, desc):
        stats = response_token_stats(model, tokenizer, samples, cfg.data.max_length, cfg.eval.batch_size,
                                     cfg.data.train_on_prompt, desc=desc)
        return {k: v["nll"] for k, v in nll_by_source(samples, stats).items()}

    class CurveCallback(TrainerCallback):
        def __init__(self):
            self.rows: list[dict] = []

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # a resumed run keeps the rows up to its checkpoint and measures again from there
            earlier = read_jsonl(path) if path.exists() else []
            self.rows = [r for r in earlier if r["step"] < state.global_step]
            self._point(args, state, model)
            return control

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if tc.eval_strategy == "steps" and state.global_step % tc.eval_steps == 0:
                self._point(args, state, model)
            return control

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if tc.eval_strategy == "epoch":
                self._point(args, state, model)
            return control

        def _point(self, args, state, model):
            if not state.is_world_process_zero or any(r["step"] == state.global_step for r in self.rows):
                return
            step = state.global_step
            row = {"step": step, "epoch": state.epoch or 0.0, "heldout": measure(model, heldout, f"held-out NLL @{step}"),
                   "train": measure(model, train_samples, f"train NLL @{step}").get("all"), "point": None}
            if keep:
                folder = out / "points" / f"{mode}-step{step}"
                model.save_pretrained(str(folder))
                if not tc.lora:
                    tokenizer.save_pretrained(str(folder))
                row["point"] = str(folder)
            self.rows.append(row)
            write_jsonl(path, self.rows)  # atomic: the file always holds whole rows
            log.info("%s step %d: held-out NLL %.4f, train NLL %.4f", mode, step, row["heldout"].get("all", float("nan")),
                     row["train"] if row["train"] is not None else float("nan"))

    return CurveCallback()
