"""Data parallel for `ual score` and `ual eval` across the processes of `accelerate launch`.

Under `accelerate launch` (torchrun: RANK and WORLD_SIZE set) every process runs the same command. Global
rank 0, the leader, runs the stage as a lone process would: it holds the run folder's lock (runlock.py),
decides what is to be done and writes every output. The other processes, the followers, write none of
the stage's outputs: they carry out the leader's orders until it is done (`follow`). An order is a
module-level function and its arguments, sent to every process with torch.distributed's
`broadcast_object_list`; every process, the leader included, then runs it (`order`). In an order:

- `map_shards` cuts items 0..n-1 into shards of `shard_size` consecutive items; shard k is process
  k % processes'. A process computes each of its shards and writes its rows to
  RUN/shards/JOB/shard-K.jsonl (atomically) as it finishes; a shard whose file is there (written before
  a kill -9) is read, not computed again. After a barrier the leader reads every shard in order: the rows
  come back in item order, as one process would have made them. JOB carries a fingerprint of everything
  that defines the rows, so a changed setting or input never reuses a shard. The leader removes
  RUN/shards once the stage has written its outputs.
- lm-eval's benchmarks shard their requests themselves (its data-parallel path, harness.py).

One process (no launcher) runs everything itself and writes no shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterator

from ual.io import read_jsonl, write_jsonl

log = logging.getLogger(__name__)

SHARDS_DIR = "shards"
# Followers wait on the leader's next order while it does work of its own (the multiple-choice questions,
# the clustering, the answers side by side): a wait that long is not a hang.
WAIT = timedelta(hours=12)


def processes() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_follower() -> bool:
    return processes() > 1 and rank() != 0


def _group():
    """torch.distributed's default group, started once per process through accelerate (gloo without a GPU;
    with GPUs, NCCL and this process's own GPU, LOCAL_RANK, as the device its models load on)."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        # without a GPU accelerate counts the processes only when told they run on the CPU (MULTI_CPU)
        PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist


def accelerator():
    """accelerate's Accelerator over the launched processes (what lm-eval's models gather with)."""
    import torch
    from accelerate import Accelerator

    _group()
    return Accelerator(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if processes() > 1:
        _group().barrier()


def _broadcast(message):
    box = [message]
    _group().broadcast_object_list(box, src=0)
    return box[0]


def _close() -> None:
    """Every process leaves the group together: a process that exits while gloo's threads still serve the
    group can abort at exit ("terminate called without an active exception"), failing the launch."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def order(job: Callable, cfg, *args, **leader_only):
    """Run job(cfg, *args) in every process, each with its own cfg (every process parsed the same command):
    the leader sends the job and `args`, then runs it with `leader_only` too (what it has at hand already:
    a loaded model, the samples), which the followers build for themselves."""
    if processes() > 1:
        _broadcast((job, args))
    return job(cfg, *args, **leader_only)


def follow(cfg) -> None:
    """A follower's whole stage: the leader's orders, in its order, until it sends None (its stage is done).
    Each job gets `kept`: what the follower loaded for the stage's earlier orders (a model evaluated in
    several orders is loaded once)."""
    kept: dict = {}
    while (message := _broadcast(None)) is not None:
        job, args = message
        job(cfg, *args, kept=kept)
    _close()


@contextmanager
def leading(root: Path, clean: bool = True) -> Iterator[None]:
    """The leader's side of a stage run across processes: once the stage succeeds the followers are let go
    and (clean: a stage that wrote its outputs) the shards, now in those outputs, removed. A failure ends every process (the launcher stops
    the others when one fails), the shards finished so far kept for the next run."""
    yield
    if processes() > 1:
        _broadcast(None)
        _close()
    if clean:
        shutil.rmtree(Path(root) / SHARDS_DIR, ignore_errors=True)


def job_folder(root: Path, job: str, definition) -> Path:
    """RUN/shards/JOB-FINGERPRINT: `definition` (JSON-able) is everything the job's rows depend on."""
    digest = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / SHARDS_DIR / f"{job}-{digest}"


def map_shards(folder: Path, n: int, shard_size: int, compute: Callable[[range], list[dict]]) -> list[dict] | None:
    """compute(items) for this process's shards of range(n) (JSON-able rows, one per item), written to
    `folder` as each finishes; on the leader, every shard's rows in item order (None on the followers)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    shards = range((n + shard_size - 1) // shard_size)
    for k in shards[rank()::processes()]:
        path = folder / f"shard-{k:06d}.jsonl"
        items = range(k * shard_size, min(n, (k + 1) * shard_size))
        if path.exists():
            log.info("%s: shard %d (items %d-%d) was finished by an earlier run; not computed again",
                     folder.name, k, items.start, items.stop - 1)
            continue
        rows = compute(items)
        if len(rows) != len(items):
            raise RuntimeError(f"{folder.name}: shard {k} gave {len(rows)} rows for {len(items)} items")
        write_jsonl(path, rows)
        log.info("%s: shard %d of %d written (items %d-%d)", folder.name, k + 1, len(shards), items.start,
                 items.stop - 1)
    barrier()
    if is_follower():
        return None
    rows = []
    for k in shards:
        rows += read_jsonl(folder / f"shard-{k:06d}.jsonl")
    if len(rows) != n:
        raise RuntimeError(f"{folder}: the shards hold {len(rows)} rows for {n} items")
    return rows


def arrow_files(dataset) -> list[str]:
    """The files a memory-mapped `datasets` set reads: a follower maps the same files (`open_arrow`) rather
    than building or registering the set (which writes the run folder's lineage)."""
    return [f["filename"] for f in dataset.cache_files]


def open_arrow(files: list[str]):
    from datasets import Dataset, concatenate_datasets

    sets = [Dataset.from_file(f) for f in files]
    return sets[0] if len(sets) == 1 else concatenate_datasets(sets)
