"""Per-sample columns of a run's training samples, read and checked once for `ual train` and
`ual export-data`: the smoothing row (score, u, eps) from smoothing.jsonl and the loss weight
from a field of the sample's meta (train.weight_column).

Both are read as columns (Arrow, numpy) and joined to the samples by id, never as a Python object
a row, so a million samples cost tens of MB here. A sample is named by its position in
samples.jsonl order (the order of the tokenized set, ual.data.tokenized).

A weight is a finite number >= 0 (ual.loss: w_i multiplies every token loss of sample i; 0
removes the sample from the numerator, the token count stays the denominator). A sample
without the field, or with a value that is not such a number, is an error naming
samples.jsonl, its line, the sample id and where the row came from.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ual.io import iter_jsonl, jsonl_columns
from ual.runfolder import RunFolder


def read_smoothing(run: RunFolder):
    """smoothing.jsonl as a pandas DataFrame indexed by sample id: source, score, u, eps."""
    import pyarrow as pa

    if not run.smoothing.exists():
        stages = "`ual map`" if run.scores.exists() else "`ual score` then `ual map`"
        raise FileNotFoundError(f"{run.smoothing} not found: run {stages} on this run folder first "
                                "(the per-sample eps come from the uncertainty scores)")
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("score", pa.float64()),
                        ("u", pa.float64()), ("eps", pa.float64())])
    return jsonl_columns(run.smoothing, schema).to_pandas().set_index("id")


def sample_ids(run: RunFolder, split: str = "train") -> list[str]:
    """The ids of samples.jsonl (or heldout.jsonl), in file order."""
    import pyarrow as pa

    path = run.require(run.samples if split == "train" else run.heldout, "data")
    return jsonl_columns(path, pa.schema([("id", pa.string())])).column("id").to_pylist()


def mapped_indices(ids: Sequence[str], smoothing) -> np.ndarray:
    """Positions of the samples smoothing.jsonl has a row for: under smoothing.missing "drop", `ual map`
    leaves the unscored ones out, and every mode (and export) leaves them out too, so the modes stay comparable."""
    return np.flatnonzero(smoothing.index.get_indexer(ids) >= 0)


def smoothing_rows(run: RunFolder, ids: Sequence[str], smoothing=None):
    """Each sample's smoothing.jsonl row (a DataFrame), in the order of `ids` (`smoothing`: the file, read already)."""
    smoothing = read_smoothing(run) if smoothing is None else smoothing
    where = smoothing.index.get_indexer(ids)
    missing = np.flatnonzero(where < 0)
    if len(missing):
        raise ValueError(f"{len(missing)} training samples have no eps in {run.smoothing} "
                         f"(first: {ids[int(missing[0])]}); rerun `ual map`")
    return smoothing.iloc[where]


def sample_weights(run: RunFolder, column: str | None) -> np.ndarray | None:
    """meta[column] of every training sample, in samples.jsonl order, as its loss weight (None when
    column is None: all weights 1)."""
    import pyarrow as pa

    if column is None:
        return None

    def check(lineno: int, row: dict) -> None:
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        problem = _weight_problem(meta.get(column), column in meta, column)
        if problem:
            origin = meta.get("origin")
            raise ValueError(f"{run.samples}:{lineno}: id '{row.get('id')}'" + (f" (from {origin})" if origin else "")
                             + f": {problem} (train.weight_column: {column})")

    schema = pa.schema([("meta", pa.struct([(column, pa.float64())]))])
    table = jsonl_columns(run.require(run.samples, "data"), schema, check)
    values = table.column("meta").combine_chunks().field(column).to_numpy(zero_copy_only=False)
    if np.isnan(values).any() or (values < 0).any() or not np.isfinite(values).all():
        for lineno, row in iter_jsonl(run.samples):  # a null, missing, negative or non-finite weight: name it
            check(lineno, row)
    return values.astype(np.float64)


def _weight_problem(value, present: bool, column: str) -> str | None:
    if not present:
        return (f"meta field '{column}': missing; every training sample needs its weight there (`ual data` "
                f"carries a source's numeric column '{column}' into meta)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        shown = f"the string {value!r}" if isinstance(value, str) else "null" if value is None else type(value).__name__
        return f"meta field '{column}': expected a number >= 0, got {shown}"
    if not math.isfinite(value) or value < 0:
        return f"meta field '{column}': {value} is not a finite number >= 0"
    return None
