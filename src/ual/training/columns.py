"""Per-sample columns of a run's training samples, read and checked once for `ual train` and
`ual export-data`: the smoothing row (score, u, eps) from smoothing.jsonl and the loss weight
from a field of the sample's meta (train.weight_column).

A weight is a finite number >= 0 (ual.loss: w_i multiplies every token loss of sample i; 0
removes the sample from the numerator, the token count stays the denominator). A sample
without the field, or with a value that is not such a number, is an error naming
samples.jsonl, its line, the sample id and where the row came from.
"""

from __future__ import annotations

import math

from ual.io import iter_jsonl, read_jsonl
from ual.runfolder import RunFolder
from ual.sample import Sample


def read_smoothing(run: RunFolder) -> dict[str, dict]:
    """smoothing.jsonl by sample id: {id: {id, source, score, u, eps}}."""
    if not run.smoothing.exists():
        stages = "`ual map`" if run.scores.exists() else "`ual score` then `ual map`"
        raise FileNotFoundError(f"{run.smoothing} not found: run {stages} on this run folder first "
                                "(the per-sample eps come from the uncertainty scores)")
    return {r["id"]: r for r in read_jsonl(run.smoothing)}


def mapped_samples(samples: list[Sample], smoothing: dict[str, dict]) -> list[Sample]:
    """The samples smoothing.jsonl has a row for: under smoothing.missing "drop", `ual map` leaves the
    unscored ones out, and every mode (and export) leaves them out too, so the modes stay comparable."""
    return [s for s in samples if s.id in smoothing]


def smoothing_rows(run: RunFolder, samples: list[Sample], smoothing: dict[str, dict] | None = None) -> list[dict]:
    """Each sample's smoothing.jsonl row, in the samples' order (`smoothing`: the file, read already)."""
    smoothing = read_smoothing(run) if smoothing is None else smoothing
    missing = [s.id for s in samples if s.id not in smoothing]
    if missing:
        raise ValueError(f"{len(missing)} training samples have no eps in {run.smoothing} "
                         f"(first: {missing[0]}); rerun `ual map`")
    return [smoothing[s.id] for s in samples]


def sample_weights(run: RunFolder, samples: list[Sample], column: str | None) -> list[float] | None:
    """meta[column] of every sample as its loss weight (None when column is None: all weights 1)."""
    if column is None:
        return None
    weights = []
    for s in samples:
        value = s.meta.get(column)
        problem = _weight_problem(value, column in s.meta, column)
        if problem:
            raise ValueError(f"{_where(run, s)}: {problem} (train.weight_column: {column})")
        weights.append(float(value))
    return weights


def _weight_problem(value, present: bool, column: str) -> str | None:
    if not present:
        return (f"meta field '{column}': missing; every training sample needs its weight there (`ual data` "
                f"carries a source's numeric column '{column}' into meta)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"the string {value!r}" if isinstance(value, str) else type(value).__name__
        return f"meta field '{column}': expected a number >= 0, got {shown}"
    if not math.isfinite(value) or value < 0:
        return f"meta field '{column}': {value} is not a finite number >= 0"
    return None


def _where(run: RunFolder, sample: Sample) -> str:
    """'runs/x/samples.jsonl:7: id 'ab12' (from data.jsonl:3)': the line is looked up only for an error."""
    line = next((n for n, row in iter_jsonl(run.samples) if row.get("id") == sample.id), None)
    origin = sample.meta.get("origin")
    return (f"{run.samples}" + (f":{line}" if line else "") + f": id '{sample.id}'"
            + (f" (from {origin})" if origin else ""))
