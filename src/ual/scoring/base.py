"""The scorer interface: every way of judging a sample's uncertainty plugs in here.

A scorer turns samples into uncertainty scores u in [0, 1] (0: one right
answer, 1: many equally good answers). A sample it could not score gets
score None and a reason in details["error"]: never a silent default.
`ual score` writes one row per sample to scores.jsonl:
{"id", "source", "score", "scorer", "details"}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence

from ual.sample import Sample


@dataclass
class ScoreResult:
    id: str
    score: float | None
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.score is not None


class Scorer(Protocol):
    #: recorded with every score, e.g. "perplexity:smollm2-135m" or "judge:gpt-4o:prompt-v1"
    name: str

    def score(self, samples: Sequence[Sample]) -> Iterable[ScoreResult]:
        """Score samples, in order, one result each; failures come back with score None and a reason.
        A list, or an iterator whose results are made as `ual score` writes them (a million samples)."""
        ...
