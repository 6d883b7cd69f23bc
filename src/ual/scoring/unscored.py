"""Samples `ual score` left without a score: counted per split, their reasons, what to do next, an exit code.

Every scorer gives a sample it could not score score None and its reason (the provider's own message for
a judge); `ual score` keeps every score it got, writes those rows too, and then exits with EXIT_UNSCORED,
so a script never reads a partly scored run as a success.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Sequence

from ual.scoring.base import ScoreResult

log = logging.getLogger(__name__)
EXIT_UNSCORED = 3  # some training or held-out samples have no score, for good in this run (the rest are kept)


def unscored_summary(failed: dict[str, Sequence[ScoreResult]], totals: dict[str, int], scorer_name: str,
                     asks_endpoint: bool, via: str = "chat") -> dict:
    """The summary fields about what was not scored (`failed`: the results without a score, per split;
    `totals`: how many samples each split has): failed (training), heldout_failed, unscored (both, 0 when
    every sample has a score), failure_reasons (the 10 commonest, with counts) and next (what to do).
    asks_endpoint: a judge behind an endpoint, whose failures may pass when asked again (a local model's
    would not)."""
    every = [r for rows in failed.values() for r in rows]
    reasons = dict(Counter(str(r.details.get("error")) for r in every).most_common(10))
    out = {"failed": len(failed.get("train", [])),
           "heldout_failed": len(failed["heldout"]) if "heldout" in failed else None,
           "unscored": len(every), "failure_reasons": reasons}
    if every:
        steps = ["run the same command again (answers already got are not asked again)" if asks_endpoint else
                 "change what the reasons name (a larger --score.max_length for a sample cut before its response) "
                 "and run the same command again"]
        if via == "batch":
            steps.append("add --score.batch_fallback chat to ask what the batches left through the chat path")
        steps.append("or let `ual map` go on without them: --smoothing.missing drop (leave them out of training "
                     "with smoothing) or mean (give them the mean score)")
        out["next"] = "; ".join(steps)
        counts = ", ".join(f"{len(rows)} of {totals[split]} {'training' if split == 'train' else 'held-out'}"
                           for split, rows in failed.items() if rows)
        log.warning("%s left %s samples without a score (reasons, with counts: %s); every other score is kept",
                    scorer_name, counts, "; ".join(f"{why} (x{n})" for why, n in reasons.items()))
    return out


def unscored_message(summary: dict) -> str:
    """The line `ual score` ends with when samples are left unscored."""
    why = "; ".join(f"{reason} (x{n})" for reason, n in summary["failure_reasons"].items())
    return (f"{summary['unscored']} sample(s) left without a score ({summary['failed']} training, "
            f"{summary['heldout_failed'] or 0} held-out): {why}. Next: {summary['next']}")
