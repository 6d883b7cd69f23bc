"""Uncertainty given per data source: the judge's rubric at its coarsest, for users with no judge.

The paper's judge puts technical, mathematical and coding work low (0-39 of 99) and open
social or creative dialogue high (70-99). Someone who knows their sources can say so
directly: `score.prior: {gsm8k: 0.2, sharegpt: 0.8}`. Every sample of a source gets its
value; a source with no value is an error (never a default), naming the sources given.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

from ual.sample import Sample
from ual.sample_file import ids_and_sources
from ual.scoring.base import ScoreResult


class PriorScorer:
    def __init__(self, prior: dict[str, float]):
        if not prior:
            raise ValueError("score.scorer prior needs score.prior: a value in [0, 1] per data source, "
                             "e.g. {gsm8k: 0.2, sharegpt: 0.8}")
        for source, value in prior.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 <= value <= 1:
                raise ValueError(f"score.prior.{source}: expected a number in [0, 1], got {value!r}")
        self.prior = {k: float(v) for k, v in prior.items()}
        self.name = "prior:" + ",".join(f"{k}={v:g}" for k, v in sorted(self.prior.items()))

    def score(self, samples: Sequence[Sample]) -> Iterator[ScoreResult]:
        """Each sample's source's value, in order, made as they are read (a SampleFile's columns: no
        conversation is parsed)."""
        ids, sources = ids_and_sources(samples)
        unknown = sorted(set(sources) - set(self.prior))
        if unknown:
            raise ValueError(f"score.prior has no value for source(s) {unknown} (it gives {sorted(self.prior)}); "
                             "add them, e.g. --score.prior '{" + ", ".join(f"{s}: 0.5" for s in unknown) + "}'")
        return (ScoreResult(sid, self.prior[source], {"prior": self.prior[source]}) for sid, source in zip(ids, sources))
