"""The run folder: the contract between stages (see README, "Run folder").

    runs/NAME/
      config.yaml            resolved config of the last stage run
      samples.jsonl          training samples (Sample.to_dict), heldout.jsonl for evaluation
      data_stats.json        per-source counts (read, skipped, truncated, train, heldout)
      scores.jsonl           id, source, score, scorer, details (the scores `ual map` uses: the last scorer run)
      scores/SCORER.jsonl    the same rows, kept per scorer, so scorers run on the same data can be compared
      heldout_scores.jsonl   the same scorer on the held-out samples (scores/heldout/SCORER.jsonl per scorer)
      scores_report/         histograms per source, failures with reasons, rank correlation between scorers
      smoothing.jsonl        id, source, score, eps (the UAL mode's per-sample smoothing)
      train/MODE/            adapter (or model), log.json, result.json
      eval/MODEL.json        metrics of one model (base or a trained mode)
      eval/items/            per-item results of each model: MODEL.nll.jsonl (held-out sample), MODEL.tokens.npz
                             (held-out token: confidence, correct), MODEL.mc.jsonl, MODEL.maths.jsonl, pairwise.A_vs_B.jsonl
      comparisons.json       paired differences between models (eval.compare) with bootstrap intervals
      eval/tasks/MODEL.json  lm-eval benchmarks of one model; eval/features/MODEL.npz for clustering
      report.md, metrics.json, *.png

Every stage reads its inputs from here and writes its outputs atomically, so a
stage can be rerun alone and a crashed run resumed where it stopped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ual.data.sample import Sample
from ual.io import read_jsonl


def model_key(name: str) -> str:
    """File name of a model's results: base, a trained mode, or an adapter/model folder's name."""
    return Path(name).name if ("/" in name or name.startswith(".")) else name


@dataclass(frozen=True)
class RunFolder:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def samples(self) -> Path:
        return self.root / "samples.jsonl"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.root / "data_stats.json"

    @property
    def scores(self) -> Path:
        return self.root / "scores.jsonl"

    @property
    def scores_dir(self) -> Path:
        return self.root / "scores"

    @property
    def heldout_scores(self) -> Path:
        return self.root / "heldout_scores.jsonl"

    def scorer_scores(self, scorer: str, split: str = "train") -> Path:
        """scores/SCORER.jsonl: "judge:gpt-4o-mini:uncertainty-v1" -> scores/judge_gpt-4o-mini_uncertainty-v1.jsonl
        (held-out samples: scores/heldout/SCORER.jsonl)."""
        folder = self.scores_dir if split == "train" else self.scores_dir / split
        return folder / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', scorer).strip('_')}.jsonl"

    @property
    def scores_report(self) -> Path:
        return self.root / "scores_report"

    @property
    def smoothing(self) -> Path:
        return self.root / "smoothing.jsonl"

    @property
    def smoothing_stats(self) -> Path:
        return self.root / "smoothing_stats.json"

    def train_dir(self, mode: str) -> Path:
        return self.root / "train" / mode

    def eval_file(self, model: str) -> Path:
        return self.root / "eval" / f"{model}.json"

    def items_file(self, model: str, kind: str) -> Path:
        """eval/items/MODEL.KIND.jsonl: per-item results (nll per held-out sample, mc per question, maths)."""
        return self.root / "eval" / "items" / f"{model}.{kind}.jsonl"

    def tokens_file(self, model: str) -> Path:
        """eval/items/MODEL.tokens.npz: per held-out response token, confidence and correctness (calibration)."""
        return self.root / "eval" / "items" / f"{model}.tokens.npz"

    @property
    def comparisons(self) -> Path:
        return self.root / "comparisons.json"

    def features_file(self, model: str) -> Path:
        return self.root / "eval" / "features" / f"{model}.npz"

    @property
    def tasks_dir(self) -> Path:
        return self.root / "eval" / "tasks"

    def tasks_file(self, model: str) -> Path:
        return self.tasks_dir / f"{model}.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    def require(self, path: Path, stage: str) -> Path:
        """Fail with the command to run when an earlier stage's output is missing."""
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run `ual {stage}` on this run folder first")
        return path

    def load_samples(self, which: str = "train") -> list[Sample]:
        path = self.require(self.samples if which == "train" else self.heldout, "data")
        return [Sample.from_dict(r) for r in read_jsonl(path)]
