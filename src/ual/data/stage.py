"""The `ual data` stage: load every source, split it into held-out and training samples, write them.

Outputs in the run folder (written atomically; a later stage trusts them):
  samples.jsonl    training samples, one Sample.to_dict() per line, sources mixed
  heldout.jsonl    held-out samples for evaluation (never trained on)
  data_stats.json  per source: rows read, skipped, duplicates, train, held-out, and (with a
                   tokenizer) how many samples exceed data.max_length and will be truncated

Selection is deterministic: each source's samples are shuffled by an RNG seeded from
(cfg.seed, source label), so adding a source leaves the others' selection unchanged;
the first `heldout` go to held-out, the next `train` to training. The two sets are
disjoint by construction, and by content id, since identical samples are deduplicated
when loaded. Across sources too (two files that overlap): a training sample with the same
conversation as a held-out sample of another source is dropped from training and counted
(`dropped_also_heldout`), so no held-out conversation is trained on, and one trained by an
earlier source is trained once (`dropped_trained_by_another_source`); one file given as two
sources is refused.

A conversation the model's chat template refuses to render (Llama-2 and Mistral templates
raise on turns that do not alternate) is an error naming its file and line, or under
`on_error: skip` skipped and counted like a malformed row (kind "chat template").

Every source is read once, a sample at a time, into a scratch file beside the outputs (data/spool.py);
the stage keeps each sample's position, 64-bit id and content id and token counts (a few dozen bytes a
sample, counted in `data.num_proc` worker processes as the samples stream past) and writes the outputs
by reading the picked samples back by offset, so a million-sample source is never held in memory.

A rerun replaces the three outputs together once everything is built (a failure leaves the
last run's outputs and config.yaml as they were: ual/lineage.py); when the samples changed, the
scores and smoothing derived from the old ones are removed (they name samples by id), and so are the
tokenized sets of the old samples (tokenized/: they would be rebuilt anyway, and take GBs at scale).
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ual.config import ExperimentConfig
from ual.data.formats import DataError, count_skipped
from ual.data.spool import SampleSpool, counted
from ual.data.tokenized import default_num_proc
from ual.sample import Sample, content_id
from ual.data.sources import input_path, source_label, stream_source
from ual.io import write_json, write_jsonl
from ual.runfolder import STAGE_OUTPUTS, RunFolder

log = logging.getLogger(__name__)

OUTPUTS = STAGE_OUTPUTS["data"]
PROGRESS_EVERY = 100_000  # samples between progress lines while a source is read


@dataclass
class SourceRead:
    """One source after its single pass: its usable samples' spool positions (in file order), ids,
    content ids (the conversation alone, to find overlaps across sources) and token counts. Ids are
    64-bit hashes (16 hex digits), held as numbers: 8 bytes a sample, not a string object."""

    positions: array = field(default_factory=lambda: array("q"))
    ids: array = field(default_factory=lambda: array("Q"))
    content: array = field(default_factory=lambda: array("Q"))
    tokens: array = field(default_factory=lambda: array("q"))  # before the max_length cut
    supervised: array = field(default_factory=lambda: array("q"))  # after it

    def add(self, spool: SampleSpool, sample: Sample, counts: tuple[int, int] | None = None) -> None:
        self.positions.append(spool.add(sample))
        self.ids.append(int(sample.id, 16))
        self.content.append(int(content_id("", sample.messages), 16))
        if counts is not None:
            self.tokens.append(counts[0])
            self.supervised.append(counts[1])

    def __len__(self) -> int:
        return len(self.positions)


def split_source(n: int, label: str, seed: int, heldout: int, train: int | None) -> tuple[list[int], list[int]]:
    """Seeded shuffle of a source's n samples, then held-out first and training next (indices into
    the source); an error if there are too few."""
    want = heldout + (train or 0)
    if n < want:
        asked = f"{heldout} held-out + {train} training" if train is not None else f"{heldout} held-out"
        raise DataError(f"source '{label}' has only {n} usable samples, but {asked} = "
                        f"{want} were asked; lower the counts or add data")
    order = list(range(n))
    random.Random(f"{seed}:{label}").shuffle(order)  # the permutation depends on n alone
    held = order[:heldout]
    rest = order[heldout:]
    return (rest if train is None else rest[:train]), held


def length_stats(read: SourceRead, which: list[int], max_length: int) -> dict:
    """How many of the samples `which` (indices into `read`) the max_length cut would truncate, and how
    many it leaves nothing to learn."""
    lengths = [read.tokens[i] for i in which]
    return {
        "truncated": sum(n > max_length for n in lengths),
        "no_supervised_tokens_after_truncation": sum(n > max_length and read.supervised[i] == 0
                                                     for n, i in zip(lengths, which)),
        "tokens_mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
        "tokens_max": max(lengths, default=0),
    }


def first_exchanges(sample: Sample, max_turns: int) -> Sample:
    """Keep the system prompt and the first `max_turns` user/assistant exchanges."""
    kept, answers = [], 0
    for m in sample.messages:
        if answers == max_turns:
            break
        kept.append(m)
        answers += m["role"] == "assistant"
    return Sample.create(sample.source, kept, sample.meta)


def unique_first_exchanges(samples, max_turns: int, stats: dict):
    """`first_exchanges` of each sample; one cut to the same conversation as an earlier one is dropped
    and counted (the first one read is kept)."""
    seen: set[int] = set()  # ids as numbers (16 hex digits)
    stats["max_turns"] = max_turns
    stats["duplicates_after_max_turns"] = 0
    for s in samples:
        s = first_exchanges(s, max_turns)
        key = int(s.id, 16)
        if key in seen:
            stats["duplicates_after_max_turns"] += 1
            continue
        seen.add(key)
        yield s


def read_source(spec, label: str, need: int | None, cfg: ExperimentConfig, tokenizer,
                spool: SampleSpool) -> tuple[SourceRead, dict]:
    """Read one source once into the spool. With a tokenizer, samples whose response is cut away
    entirely by max_length teach nothing and cannot be scored (0 response tokens): they are dropped
    and counted (`dropped_no_response_tokens`).

    A sample the chat template refuses (TemplateRefused) is a DataError naming its origin, or under
    on_error "skip" left out and counted like a bad row (kind "chat template"); when it refuses
    every sample, the first refusal is raised whatever on_error says.
    """
    samples, stats = stream_source(spec, need, cfg.data.on_error)
    if spec.max_turns is not None:
        samples = unique_first_exchanges(samples, spec.max_turns, stats)
    read = SourceRead()
    if tokenizer is None:
        for s in samples:
            read.add(spool, s)
            _progress(label, len(read))
        return read, stats
    refused, first_refusal, dropped = 0, None, 0
    num_proc = cfg.data.num_proc or default_num_proc()
    for chunk, counts in counted(tokenizer, samples, cfg.data.max_length, cfg.data.train_on_prompt, num_proc):
        for s, c in zip(chunk, counts):
            if isinstance(c, Exception):
                err = DataError(f"{s.meta.get('origin', s.id)}: {c}", "chat template")
                if cfg.data.on_error != "skip":
                    raise err from None
                refused += 1
                first_refusal = first_refusal or err
                count_skipped(stats, err)
            elif c[1]:
                read.add(spool, s, c)
            else:
                dropped += 1
        _progress(label, len(read) + dropped + refused, len(chunk))
    if refused and not (len(read) or dropped):
        raise DataError(f"none of the {refused} samples can be rendered by the chat template (first: "
                        f"{first_refusal})", "chat template")
    stats["kept"] -= refused
    stats["dropped_no_response_tokens"] = dropped
    return read, stats


def _progress(label: str, done: int, step: int = 1) -> None:
    if done // PROGRESS_EVERY != (done - step) // PROGRESS_EVERY:
        log.info("data: %s: %d samples read", label, done)


def _resolved(path: Path) -> Path | None:
    """path.resolve(), or None for a path that cannot be resolved (a symlink loop: not a file at all,
    so neither an output to keep nor one to refuse; the loader says what it is)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 on a symlink loop
        return None


def refuse_overwriting_inputs(cfg: ExperimentConfig) -> None:
    """A source file that is also one of this stage's outputs would be overwritten: refused before anything."""
    outs = {(cfg.run_path / name).resolve() for name in OUTPUTS}
    for path in (p for p in (input_path(s) for s in cfg.data.sources) if p is not None and _resolved(p) is not None):
        if path.resolve() in outs:
            raise DataError(f"source file {path} is also an output of `ual data` in {cfg.run_path}; "
                            "it would be overwritten: use another run folder or move the file")


def check_distinct_files(cfg: ExperimentConfig) -> None:
    """One file given as two sources (two paths to it, or the same path twice) is refused: its rows
    would be in the mix twice, and one source's held-out samples in the other's training."""
    seen: dict[tuple[int, int], tuple[int, Path]] = {}
    for i, spec in enumerate(cfg.data.sources):
        path = input_path(spec)
        try:
            st = path.stat() if path is not None else None
        except (OSError, RuntimeError):
            st = None  # missing or unreadable: the loader says so
        if st is None:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            j, other = seen[key]
            same = f"{path}" if str(other) == str(path) else f"{other} and {path} are the same file"
            raise DataError(f"data.sources[{j}] and data.sources[{i}] both read {same}: give each file once "
                            "(its rows would be mixed in twice, and one source's held-out samples trained on "
                            "as the other's)")
        seen[key] = (i, path)


def _write_outputs(out: Path, spool: SampleSpool, train, held, stats: dict) -> None:
    """samples.jsonl, heldout.jsonl, data_stats.json (`train`, `held`: spool positions in output order),
    all three or none: each is written beside its final name first and the three renamed into place
    together, so a failure leaves the last run's outputs. When the samples changed (other ids, or the
    same in another order), what was derived from the old ones (scores, smoothing, tokenized sets) is
    removed after."""
    from ual.lineage import Lineage

    names = ("samples.jsonl", "heldout.jsonl", "data_stats.json")
    before = [_ids_digest(out / n) for n in names[:2]]
    after: list[str] = []
    staged = {n: out / f".{n}.new" for n in names}
    try:
        write_jsonl(staged["samples.jsonl"], _hashing_ids(spool.rows(train, "train"), after))
        write_jsonl(staged["heldout.jsonl"], _hashing_ids(spool.rows(held, "heldout"), after))
        write_json(staged["data_stats.json"], stats)
        for n in names:
            os.replace(staged[n], out / n)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    if before != after:
        removed = RunFolder(out).discard("score")  # the scores and smoothing name other samples by id
        tokenized = out / "tokenized"
        if tokenized.is_dir() and not tokenized.is_symlink():  # sets of the old samples: GBs at scale
            shutil.rmtree(tokenized)
            removed.append(tokenized)
        lineage = Lineage(out)
        lineage.drop("score", "map", *[k for k in lineage.read() if k.startswith("tokenized/")])
        if removed:
            log.info("data: the samples changed; removed what was derived from the old ones: %s",
                     ", ".join(p.name for p in removed))


def _ids_digest(path: Path) -> str | None:
    """A hash of the sample ids of an earlier output, in order (None if missing or unreadable): the id column
    read by Arrow (io.jsonl_columns), so a million-row file is never held as rows."""
    import hashlib

    import pyarrow as pa

    from ual.io import jsonl_columns

    if not path.exists():
        return None
    digest = hashlib.sha256()
    try:
        for chunk in jsonl_columns(path, pa.schema([("id", pa.string())])).column("id").chunks:
            for sid in chunk.to_pylist():
                digest.update(f"{sid}\n".encode())
    except (OSError, ValueError):
        return None
    return digest.hexdigest()


def _hashing_ids(rows, digests: list[str]):
    """`rows` as they are written; the hash of their ids (as `_ids_digest` makes it) appended to `digests` after."""
    import hashlib

    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['id']}\n".encode())
        yield row
    digests.append(digest.hexdigest())


def build_dataset(cfg: ExperimentConfig, tokenizer=None, *, model_tokenizer: bool = False) -> dict:
    """Run the data stage for `cfg`; returns (and writes) the data statistics. With a tokenizer (or
    `model_tokenizer`: cfg.model's), samples with no supervised token are dropped and lengths counted."""
    refuse_overwriting_inputs(cfg)
    if model_tokenizer:
        from ual.models import load_tokenizer

        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    if not cfg.data.sources:
        raise DataError("no data sources configured (data.sources is empty)")
    check_distinct_files(cfg)
    labels = [source_label(s) for s in cfg.data.sources]
    if len(set(labels)) != len(labels):
        raise DataError(f"two sources share a label in {labels}; give them distinct `label`s")

    out = cfg.run_path
    with SampleSpool(out) as spool:
        result, (train_all, held_all) = _select(cfg, labels, tokenizer, spool)
        _write_outputs(out, spool, train_all, held_all, result)
    return result


def _select(cfg: ExperimentConfig, labels: list[str], tokenizer, spool: SampleSpool) -> tuple[dict, tuple]:
    """Read every source into the spool and pick the training and held-out samples: (the statistics,
    (training, held-out) spool positions in output order)."""
    reads: dict[str, SourceRead] = {}
    train_by: dict[str, list[int]] = {}
    held_by: dict[str, list[int]] = {}
    per_source = {}
    for spec, label in zip(cfg.data.sources, labels):
        need = spec.heldout + spec.train if spec.train is not None else None
        if need is not None and tokenizer is not None:
            need += need // 2 + 8  # read a margin, so dropping unlearnable samples still leaves enough
        log.info("data: loading %s (%s)", label, spec.name)
        read, stats = read_source(spec, label, need, cfg, tokenizer, spool)
        train, held = split_source(len(read), label, cfg.seed, spec.heldout, spec.train)
        stats.update(available=len(read), train=len(train), heldout=len(held))
        per_source[label] = stats
        reads[label], train_by[label], held_by[label] = read, train, held

    # Two files that overlap: a conversation held out by one source and picked for training by
    # another would be trained on, so its training copy goes; one picked for training by two
    # sources would be trained on twice, so the later source's copy goes.
    held_content = {reads[label].content[i] for label, held in held_by.items() for i in held}
    trained: set[int] = set()
    for label, train in train_by.items():
        stats, read = per_source[label], reads[label]
        content = [read.content[i] for i in train]
        also_held = sum(c in held_content for c in content)
        again = sum(c not in held_content and c in trained for c in content)
        if also_held:
            stats["dropped_also_heldout"] = also_held
            log.warning("data: %s: %d training samples are held-out samples of another source (the files "
                        "overlap); dropped from training", label, also_held)
        if again:
            stats["dropped_trained_by_another_source"] = again
            log.warning("data: %s: %d training samples are training samples of an earlier source (the files "
                        "overlap); trained once, as that source's", label, again)
        kept = [(i, c) for i, c in zip(train, content) if c not in held_content and c not in trained]
        trained.update(c for _, c in kept)
        if also_held or again:
            train = [i for i, _ in kept]
            stats["train"] = len(train)
            train_by[label] = train
        held = held_by[label]
        if tokenizer is not None:
            stats["train_lengths"] = length_stats(read, train, cfg.data.max_length)
            stats["heldout_lengths"] = length_stats(read, held, cfg.data.max_length)
            stats["truncated"] = stats["train_lengths"]["truncated"] + stats["heldout_lengths"]["truncated"]
        log.info("data: %s: %d read, %d skipped, %d train, %d held-out", label,
                 stats["read"], stats["skipped"], len(train), len(held))
        if stats.get("skipped"):
            log.warning("data: %s: %d bad rows skipped (%s); first: %s", label, stats["skipped"],
                        ", ".join(f"{k}: {n}" for k, n in stats.get("skipped_by_kind", {}).items()),
                        stats["skipped_reasons"][0])
        if stats.get("trailing_turns_dropped"):
            log.warning("data: %s: %d conversations go on after the last reply (an unanswered user turn, an "
                        "odd-length LIMA list); those trailing turns were dropped; first: %s", label,
                        stats["trailing_turns_dropped"], stats["trailing_turns_examples"][0])

    # Ids hash (source label, messages), labels are distinct and each source is deduplicated,
    # so no id is in both sets; checked anyway, as evaluation on trained samples would mislead.
    train_all, held_all = _gather(reads, train_by, "positions"), _gather(reads, held_by, "positions")
    assert not np.isin(_gather(reads, held_by, "ids"), _gather(reads, train_by, "ids")).any()
    order = list(range(len(train_all)))
    random.Random(f"{cfg.seed}:mix").shuffle(order)  # sources interleaved in the file
    stats = {
        "seed": cfg.seed,
        "max_length": cfg.data.max_length,
        "train_on_prompt": cfg.data.train_on_prompt,
        "train": len(train_all),
        "heldout": len(held_all),
        "sources": per_source,
    }
    return stats, (train_all[np.array(order, dtype=np.int64)], held_all)


def _gather(reads: dict[str, SourceRead], picks: dict[str, list[int]], column: str):
    """One column (positions or ids) of the picked samples of every source, in source order, as an array."""
    dtype = np.int64 if column == "positions" else np.uint64
    return np.concatenate([np.frombuffer(getattr(reads[label], column), dtype)[idx] for label, idx in picks.items()]
                          or [np.zeros(0, dtype)]).astype(dtype)


def read_samples(path: str | Path) -> list[Sample]:
    """Samples written by build_dataset (samples.jsonl or heldout.jsonl)."""
    from ual.io import read_jsonl

    return [Sample.from_dict(row) for row in read_jsonl(path)]
