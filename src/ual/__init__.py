"""ual: uncertainty-aware learning for language models.

Each training sample gets its own label-smoothing value, derived from how much its task
admits diverse answers (its uncertainty). The stages (data -> score -> map -> train ->
eval -> report) are listed in ual/pipeline.py; the method and its formulas in docs/method.md.

For your own training loop, the pieces are importable from here (loaded on first use, so
`import ual` stays cheap):

    from ual import smoothed_cross_entropy, chunked_smoothed_cross_entropy   # the losses
    from ual import normalize_scores, map_to_smoothing, fit_scale             # scores -> eps
    from ual import ModelUncertaintyScorer, JudgeScorer, LocalJudgeScorer, PriorScorer
    from ual import UALTrainer, UALSFTTrainer, SmoothedDataset, SmoothingCollator
    from ual import Sample, load_config
"""

from importlib import import_module

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "smoothed_cross_entropy": "ual.loss",
    "chunked_smoothed_cross_entropy": "ual.loss",
    "token_smoothed_nll": "ual.loss",
    "shift_labels": "ual.loss",
    "IGNORE_INDEX": "ual.loss",
    "normalize_scores": "ual.smoothing",
    "map_to_smoothing": "ual.smoothing",
    "fit_scale": "ual.smoothing",
    "uniform_smoothing": "ual.smoothing",
    "ModelUncertaintyScorer": "ual.scoring.perplexity",
    "JudgeScorer": "ual.scoring.judge",
    "LocalJudgeScorer": "ual.scoring.local_judge",
    "PriorScorer": "ual.scoring.prior",
    "UALTrainer": "ual.training.trainer",
    "SmoothedDataset": "ual.training.trainer",
    "SmoothingCollator": "ual.training.trainer",
    "UALSFTTrainer": "ual.training.trl",
    "Sample": "ual.sample",
    "load_config": "ual.config",
    "ExperimentConfig": "ual.config",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ual' has no attribute {name!r}")


def __dir__():
    return __all__
