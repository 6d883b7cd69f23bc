"""Uncertainty from a reference model's own predictions on the response (docs/method.md §1).

Measures from one forward pass (ual/token_stats.py), all kept in every row's
details, so switching between them rescores nothing:
- `perplexity`: the sample's mean response NLL, -log p(gold). High when the model
  finds the written answer surprising, which mixes "many good answers" with "hard
  for this model" (a maths step it cannot do is surprising too).
- `entropy`: the sample's mean predictive entropy H(p_t) over its response tokens.
  It ignores which token was written and measures how spread the model's next-token
  distribution is where the answer is being written: on a worked maths solution the
  continuation is nearly forced at most positions even when the model would get the
  arithmetic wrong, while in open chat many continuations are plausible. On the demo's
  data it separates open chat from maths much better than NLL (README, docs/scoring.md).
The ratio measures add a second pass over the same conversation with its instructions
blanked (every user and system turn emptied, the template and the assistant turns kept,
so the same response tokens are scored), and ask how much of the response's
uncertainty the instruction removes:
- `entropy_ratio`: mean entropy with the instructions / mean entropy without them. A
  precise task pins its answer down (a maths question fixes the numbers and steps of
  its solution: the ratio is low); an open request leaves the answer about as free as
  no request at all (near 1). Text the model finds hard in itself is hard in both
  passes and divides out, which plain entropy cannot do.
- `nll_ratio`: the same with the mean NLL: the instruction-following difficulty (IFD)
  score of Li et al. 2023, "From Quantity to Quality".

u_i = measure_i / max_j measure_j, in [0, 1]. The map is scale-free, so this is the
paper's proportional PPL variant (eps proportional to NLL) under `smoothing.normalize:
max`; `minmax` and `rank` spread the scores over [0, 1] first (smoothing.py).
"""

from __future__ import annotations

from typing import Sequence

from ual.sample import Sample
from ual.scoring.base import ScoreResult

# scorer -> the details fields it reads: (numerator, denominator or None)
MEASURES = {"perplexity": ("mean_nll", None), "entropy": ("mean_entropy", None),
            "entropy_ratio": ("mean_entropy", "mean_entropy_alone"), "nll_ratio": ("mean_nll", "mean_nll_alone")}


class ModelUncertaintyScorer:
    def __init__(self, measure: str, model_name: str, max_length: int, batch_size: int = 8, device: str = "auto",
                 trust_remote_code: bool = False, chat_template: str | None = None):
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {sorted(MEASURES)}, got {measure!r}")
        self.measure = measure
        self.model_name = model_name
        self.max_length = max_length
        self.batch_size = batch_size
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.chat_template = chat_template  # the run's, for a reference model that ships none
        self.name = scorer_name(measure, model_name)
        self.needs_alone = MEASURES[measure][1] is not None
        self._model = self._tokenizer = None
        # Scorers whose rows carry everything this one needs (computed in the same passes).
        self.siblings = [scorer_name(m, model_name) for m, (_, alone) in MEASURES.items()
                         if m != measure and (alone is not None or not self.needs_alone)]

    # The scoring stage hands score() the run's tokenized samples (at self.max_length) when this scorer's
    # tokenizer is the run's own: the first pass then tokenizes nothing.
    reads_tokenized = True

    def score(self, samples: Sequence[Sample], encoded=None) -> list[ScoreResult]:
        from ual.token_stats import response_token_stats

        model, tokenizer = self._loaded()
        stats = response_token_stats(model, tokenizer, samples, self.max_length, self.batch_size, desc=self.measure,
                                     encoded=encoded)
        details = [{"mean_nll": st.mean_nll, "mean_entropy": st.mean_entropy, "tokens": st.tokens}
                   if st.tokens else {"error": "no response tokens left after truncation"} for st in stats]
        if self.needs_alone:
            alone = response_token_stats(model, tokenizer, [without_instructions(s) for s in samples], self.max_length,
                                         self.batch_size, desc=f"{self.measure}, instructions blanked")
            for d, st in zip(details, alone):
                if "error" not in d:
                    d.update(mean_nll_alone=st.mean_nll, mean_entropy_alone=st.mean_entropy)
        return self.from_details([s.id for s in samples], details)

    def _loaded(self):
        """(model, tokenizer), loaded on first use and kept: across processes score() runs once per shard."""
        if self._model is None:
            from ual.models import load_model, load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name, self.trust_remote_code, self.chat_template)
            self._model = load_model(self.model_name, self.device, trust_remote_code=self.trust_remote_code)
        return self._model, self._tokenizer

    def from_details(self, ids: Sequence[str], details: Sequence[dict]) -> list[ScoreResult]:
        """Scores from kept details (this scorer's or a sibling's rows): no forward pass."""
        values = [self.measure_of(d) for d in details]
        top = max((v for v in values if v is not None), default=None)
        return [ScoreResult(i, None if v is None else (v / top if top > 0 else 0.0), dict(d))
                for i, v, d in zip(ids, values, details)]

    def measure_of(self, d: dict) -> float | None:
        key, alone = MEASURES[self.measure]
        if d.get(key) is None:
            return None
        if alone is None:
            return d[key]
        if d.get(alone) is None:
            raise ValueError(f"score details lack {alone!r}: rows scored by {self.measure}'s siblings without "
                             "the instruction-blanked pass cannot give it (score with --force)")
        if d[alone] <= 0:
            return None  # nothing to divide by: a response the model predicts with certainty alone
        return d[key] / d[alone]


def without_instructions(sample: Sample) -> Sample:
    """The same conversation with every non-assistant turn emptied (same id, same response tokens)."""
    messages = [m if m["role"] == "assistant" else {**m, "content": ""} for m in sample.messages]
    return Sample(id=sample.id, source=sample.source, messages=messages, meta=sample.meta)


def scorer_name(measure: str, model_name: str) -> str:
    return f"{measure}:{model_name}"
