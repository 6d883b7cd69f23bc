"""Sample files (samples.jsonl, heldout.jsonl) as one sequence read from disk, for a million samples.

`SampleFile` holds the samples' ids and sources as columns and each line's byte offset; a sample is
parsed only when it is asked for (by index, or in order when iterated). A stage that needs only
ids and sources (the prior scorer, the completeness checks of `ual score`) never parses a
conversation; one that needs them all reads them one at a time.
"""

from __future__ import annotations

import json
from array import array
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from pathlib import Path

from ual.sample import Sample


class SampleFile(Sequence):
    """The samples of `paths`, in order, one file after another."""

    def __init__(self, *paths: str | Path):
        import pyarrow as pa

        from ual.io import jsonl_columns

        self.paths = [Path(p) for p in paths]
        self._offsets: list[array] = []
        self.ids: list[str] = []
        self.sources: list[str] = []
        schema = pa.schema([("id", pa.string()), ("source", pa.string())])
        for path in self.paths:
            table = jsonl_columns(path, schema, check=lambda lineno, row, path=path: _check(path, lineno, row),
                                  dictionary=("source",))
            offsets = _line_offsets(path)
            if len(offsets) != table.num_rows or table.column("id").null_count or table.column("source").null_count:
                from ual.io import iter_jsonl

                for lineno, row in iter_jsonl(path):
                    _check(path, lineno, row)
                raise ValueError(f"{path}: {table.num_rows} rows read as columns, {len(offsets)} lines")
            self._offsets.append(offsets)
            self.ids += table.column("id").to_pylist()
            sources = table.column("source").combine_chunks()  # a few distinct values: one str each, shared
            names = sources.dictionary.to_pylist()
            self.sources += [names[k] for k in sources.indices.to_numpy(zero_copy_only=False)]
        self._starts = [0]
        for offsets in self._offsets:
            self._starts.append(self._starts[-1] + len(offsets))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._read(range(*i.indices(len(self))))
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._read([i])[0]

    def _read(self, indices) -> list[Sample]:
        """The samples at `indices` (each file opened once a call)."""
        out, handles = [], {}
        try:
            for i in indices:
                f = bisect_right(self._starts, i) - 1
                if f not in handles:
                    handles[f] = open(self.paths[f], "rb")
                handles[f].seek(self._offsets[f][i - self._starts[f]])
                out.append(Sample.from_dict(json.loads(handles[f].readline())))
        finally:
            for fh in handles.values():
                fh.close()
        return out

    def __iter__(self) -> Iterator[Sample]:
        for path in self.paths:
            with open(path, "rb") as fh:
                for line in fh:
                    if line.strip():
                        yield Sample.from_dict(json.loads(line))

    def split_sizes(self) -> list[int]:
        """How many samples each file holds."""
        return [len(o) for o in self._offsets]


def _line_offsets(path: Path) -> array:
    """The byte offset of every non-blank line (read in blocks; no line is kept)."""
    offsets, position = array("q"), 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                offsets.append(position)
            position += len(line)
    return offsets


def _check(path: Path, lineno: int, row: dict) -> None:
    for field in ("id", "source"):
        if not isinstance(row.get(field), str):
            raise ValueError(f"{path}:{lineno}: field '{field}': missing or not a string")


def ids_and_sources(samples: Sequence[Sample]) -> tuple[list[str], list[str]]:
    """(ids, sources) of `samples`, from a SampleFile's columns without parsing a sample."""
    if isinstance(samples, SampleFile):
        return samples.ids, samples.sources
    return [s.id for s in samples], [s.source for s in samples]
