"""Uncertainty from a reference model's own predictions on the response: perplexity or entropy.

Two measures from the same forward pass (evaluation/nll.py), both kept in every
row's details, so switching between them rescores nothing:
- `perplexity`: the sample's mean response NLL, -log p(gold). High when the model
  finds the written answer surprising, which mixes "many good answers" with "hard
  for this model" (a maths step it cannot do is surprising too).
- `entropy`: the sample's mean predictive entropy H(p_t) over its response tokens.
  It ignores which token was written and measures how spread the model's next-token
  distribution is where the answer is being written: on a worked maths solution the
  continuation is nearly forced at most positions even when the model would get the
  arithmetic wrong, while in open chat many continuations are plausible. On the demo's
  data it separates open chat from maths much better than NLL (README, docs/scoring.md).

u_i = measure_i / max_j measure_j, in [0, 1]. The map is scale-free, so this is the
paper's proportional PPL variant (eps proportional to NLL) under `smoothing.normalize:
max`; `minmax` and `rank` spread the scores over [0, 1] first (smoothing.py).
"""

from __future__ import annotations

from typing import Sequence

from ual.data.sample import Sample
from ual.scoring.base import ScoreResult

MEASURES = {"perplexity": "mean_nll", "entropy": "mean_entropy"}  # scorer -> the details field it reads


class ModelUncertaintyScorer:
    def __init__(self, measure: str, model_name: str, max_length: int, batch_size: int = 8, device: str = "auto",
                 trust_remote_code: bool = False):
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {sorted(MEASURES)}, got {measure!r}")
        self.measure = measure
        self.model_name = model_name
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.name = scorer_name(measure, model_name)
        # Scorers whose rows carry everything this one needs (computed in the same pass).
        self.siblings = [scorer_name(m, model_name) for m in MEASURES if m != measure]

    def score(self, samples: Sequence[Sample]) -> list[ScoreResult]:
        from ual.evaluation.nll import response_token_stats
        from ual.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(self.model_name, self.trust_remote_code)
        model = load_model(self.model_name, self.device, trust_remote_code=self.trust_remote_code)
        stats = response_token_stats(model, tokenizer, samples, self.max_length, self.batch_size, desc=self.measure)
        details = [{"mean_nll": st.mean_nll, "mean_entropy": st.mean_entropy, "tokens": st.tokens}
                   if st.tokens else {"error": "no response tokens left after truncation"} for st in stats]
        return self.from_details([s.id for s in samples], details)

    def from_details(self, ids: Sequence[str], details: Sequence[dict]) -> list[ScoreResult]:
        """Scores from kept details (this scorer's or a sibling's rows): no forward pass."""
        key = MEASURES[self.measure]
        values = [d.get(key) for d in details]
        top = max((v for v in values if v is not None), default=None)
        return [ScoreResult(i, None if v is None else (v / top if top > 0 else 0.0), dict(d))
                for i, v, d in zip(ids, values, details)]


def scorer_name(measure: str, model_name: str) -> str:
    return f"{measure}:{model_name}"
