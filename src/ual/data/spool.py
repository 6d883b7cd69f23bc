"""What lets `ual data` read a million-sample source without holding it: a scratch file of the
samples read, and their token counts computed in worker processes as they stream past.

The stage reads each source once. Every usable sample is appended to a `SampleSpool` (one JSON
line, beside the run folder's outputs) and the stage keeps only its position, id and token
counts; the outputs are then written in their final (shuffled) order by reading the lines back
by offset. Memory grows by a few dozen bytes a sample, not by the sample.
"""

from __future__ import annotations

import json
import os
from array import array
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

from ual.sample import Sample

CHUNK = 256  # conversations per tokenizer call (and per task sent to a worker)


class SampleSpool:
    """Samples appended to a scratch JSONL file, read back by position; removed by `close`."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".data-spool-*.jsonl"):  # a killed run's (the run-folder lock keeps one writer)
            stale.unlink(missing_ok=True)
        self.path = folder / f".data-spool-{os.getpid()}.jsonl"
        self._fh = open(self.path, "w+b")
        self._offsets = array("q")
        self._end = 0

    def add(self, sample: Sample) -> int:
        """Append `sample`; its position."""
        line = (json.dumps(sample.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
        self._offsets.append(self._end)
        self._fh.write(line)
        self._end += len(line)
        return len(self._offsets) - 1

    def rows(self, positions: Iterable[int], split: str) -> Iterator[dict]:
        """The samples at `positions`, in that order, as dicts with meta["split"] = split."""
        self._fh.flush()
        for i in positions:
            self._fh.seek(self._offsets[i])
            row = json.loads(self._fh.readline())
            row["meta"]["split"] = split
            yield row

    def close(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chunks(samples: Iterable[Sample], size: int = CHUNK) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in samples:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def counted(tokenizer, samples: Iterable[Sample], max_length: int, train_on_prompt: bool,
            num_proc: int = 1) -> Iterator[tuple[list[Sample], list]]:
    """(chunk of samples, their counts) as the samples stream past: per sample (tokens before the cut,
    supervised tokens after it), or the TemplateRefused the chat template raised for it. Counted
    CHUNK at a time (one tokenizer call each) in num_proc forked processes, with a bounded number of
    chunks in flight, so a long source is never held."""
    if num_proc <= 1:
        for chunk in chunks(samples):
            yield chunk, _counts(tokenizer, max_length, train_on_prompt, [s.messages for s in chunk])
        return
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    # Forked workers get the tokenizer with the process, once; only the conversations are sent.
    with ProcessPoolExecutor(num_proc, mp_context=get_context("fork"), initializer=_keep_tokenizer,
                             initargs=(tokenizer,)) as pool:
        pending: deque = deque()
        for chunk in chunks(samples):
            pending.append((chunk, pool.submit(_counts, None, max_length, train_on_prompt,
                                               [s.messages for s in chunk])))
            if len(pending) >= 2 * num_proc:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


_WORKER_TOKENIZER: list = []  # a pool worker's tokenizer (set once by its initializer; never in the parent)


def _keep_tokenizer(tokenizer) -> None:
    _WORKER_TOKENIZER[:] = [tokenizer]


def _counts(tokenizer, max_length: int, train_on_prompt: bool, conversations: list[list[dict]]) -> list:
    from ual.data.tokenize import IGNORE, encode_or_refusal

    tokenizer = tokenizer or _WORKER_TOKENIZER[0]
    encoded = encode_or_refusal(tokenizer, conversations, None, train_on_prompt)
    return [e if isinstance(e, Exception) else (len(e[0]), int((e[1][:max_length] != IGNORE).sum())) for e in encoded]
