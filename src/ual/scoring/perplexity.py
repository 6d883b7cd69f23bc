"""Perplexity as uncertainty: a sample the reference model finds surprising is uncertain.

u_i = mean NLL of sample i's response tokens / the largest such mean over the
data set. Dividing by a constant (not min-max) keeps u proportional to the NLL,
so after the smoothing map eps_i is proportional to the NLL too: the paper's
PPL variant (eps_i = eps_mean * nll_i / mean nll), with the cap applied exactly.
"""

from __future__ import annotations

from typing import Sequence

from ual.data.sample import Sample
from ual.scoring.base import ScoreResult


class PerplexityScorer:
    def __init__(self, model_name: str, max_length: int, batch_size: int = 8, device: str = "auto",
                 trust_remote_code: bool = False):
        self.model_name = model_name
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.name = f"perplexity:{model_name}"

    def score(self, samples: Sequence[Sample]) -> list[ScoreResult]:
        from ual.evaluation.nll import sample_nll
        from ual.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(self.model_name, self.trust_remote_code)
        model = load_model(self.model_name, self.device, trust_remote_code=self.trust_remote_code)
        per_sample = sample_nll(model, tokenizer, samples, self.max_length, self.batch_size, desc="perplexity")
        means = [total / n if n else None for total, n in per_sample]
        top = max((m for m in means if m is not None), default=None)
        results = []
        for s, m, (_, n) in zip(samples, means, per_sample):
            if m is None:
                results.append(ScoreResult(s.id, None, {"error": "no response tokens left after truncation"}))
            else:
                results.append(ScoreResult(s.id, m / top if top > 0 else 0.0, {"mean_nll": m, "tokens": n}))
        return results
