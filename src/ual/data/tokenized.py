"""The tokenized sets: a run's samples tokenized once, kept in the run folder as Arrow, memory-mapped.

    runs/NAME/tokenized/SPLIT-LMAX[-prompt]/   a `datasets` folder (save_to_disk), one row per sample
        id          the sample's id (samples.jsonl order)
        line        its line in samples.jsonl / heldout.jsonl (for messages that name it)
        input_ids   int32 token ids after the chat template, cut to max_length
        labels      int32, -100 where not supervised (ual.data.tokenize: assistant tokens only by default)
        tokens      len(input_ids); full_tokens: the length before the cut; supervised: labels != -100

What a set is made from is recorded in lineage.json ("tokenized/SPLIT-LMAX") like any other output,
and in the set's own folder (ual_record.json, so a sub-run of `ual ablate` linking to the folder reuses
it): the samples file's sha256, the tokenizer (its full definition and chat template, hashed), max_length
and train_on_prompt. Training (every mode, every seed), the held-out NLL and the model scorers open
the set that matches their settings; a change to any of them rebuilds it, saying what changed. A stage
with its own max_length (score.max_length) gets its own folder, built once too.

Building is `datasets.map` over the file's lines in worker processes (data.num_proc, default the
cores), each encoding batches with one fast-tokenizer call (ual.data.tokenize.encode_batch), as TRL's
SFTTrainer does with dataset_num_proc. The map writes into a scratch folder beside the set, and
`atomic_path` puts the finished set in place, so an interrupted build leaves the previous set (or
none) and the next run starts it again from clean; rows are never held as Python lists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from ual.data.formats import DataError
from ual.io import atomic_path, read_json, write_json
from ual.lineage import Lineage, file_digest, record_changes, record_of
from ual.data.tokenize import IGNORE

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the columns or their meaning change: every older set is rebuilt
ROWS_PER_BATCH = 256  # conversations per tokenizer call (and per map batch)
RECORD = "ual_record.json"  # in the set's folder: what it was made from (as in lineage.json)


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_name(split: str, max_length: int | None, train_on_prompt: bool) -> str:
    return f"{split}-L{max_length or 'full'}" + ("-prompt" if train_on_prompt else "")


def tokenizer_digest(tokenizer) -> str:
    """What a tokenizer turns text into: its full definition (vocabulary, merges, normaliser, added
    tokens) and its chat template. Two loads of one model give the same digest."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def tokenized_record(source: Path, tokenizer, max_length: int | None, train_on_prompt: bool) -> dict:
    settings = {"format": FORMAT, "max_length": max_length, "train_on_prompt": train_on_prompt}
    return record_of(settings, {source.name: file_digest(source), "tokenizer": tokenizer_digest(tokenizer)})


def tokenized_set(root: Path, split: str, tokenizer, max_length: int | None, train_on_prompt: bool = False,
                  num_proc: int | None = None):
    """The run's tokenized `split` ("train": samples.jsonl, "heldout": heldout.jsonl) as a memory-mapped
    `datasets.Dataset`, built (or rebuilt, saying why) when it is missing or was made from anything else."""
    from datasets import load_from_disk

    root = Path(root)
    source = root / ("samples.jsonl" if split == "train" else f"{split}.jsonl")
    if not source.exists():
        raise FileNotFoundError(f"{source} not found: run `ual data` on this run folder first")
    if not any(line.strip() for line in _first_lines(source)):  # no samples (datasets cannot save an empty set)
        from datasets import Dataset
        from datasets.table import InMemoryTable

        return Dataset(InMemoryTable(set_features().arrow_schema.empty_table()))
    name = set_name(split, max_length, train_on_prompt)
    folder, lineage = root / "tokenized" / name, Lineage(root)
    record = tokenized_record(source, tokenizer, max_length, train_on_prompt)
    own = _own_record(folder)  # the set carries its record: a sub-run linking to it (ablate) reuses it too
    if own is not None and own.get("fingerprint") == record["fingerprint"]:
        try:
            dataset = load_from_disk(str(folder))
            lineage.put(f"tokenized/{name}", record)
            return dataset
        except (OSError, ValueError) as exc:  # a folder damaged by hand: built again
            log.warning("tokenized/%s cannot be read (%s); building it again", name, exc)
    elif folder.exists():
        log.info("tokenized/%s was made from other inputs or settings (%s); building it again", name,
                 "; ".join(record_changes(own, record) if own else ["no record"]))
    build(source, folder, tokenizer, max_length, train_on_prompt, num_proc, record)
    lineage.put(f"tokenized/{name}", record)
    return load_from_disk(str(folder))


def _own_record(folder: Path) -> dict | None:
    try:
        return read_json(folder / RECORD)
    except (OSError, ValueError):
        return None


def build(source: Path, folder: Path, tokenizer, max_length: int | None, train_on_prompt: bool,
          num_proc: int | None = None, record: dict | None = None) -> None:
    from datasets import Dataset, Features, Value
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar

    num_proc = num_proc or default_num_proc()
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".build-{folder.name}-*"):  # left by a killed build (one writer a folder)
        shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".build-{folder.name}-", dir=folder.parent))
    features = set_features()
    try:
        disable_progress_bar()  # the file's lines are read without a bar; the tokenizing has one
        lines = Dataset.from_generator(_lines, gen_kwargs={"path": str(source)}, cache_dir=str(scratch / "lines"),
                                       features=Features({"line": Value("int64"), "text": Value("string")}))
        enable_progress_bar()
        log.info("tokenizing %s: %d samples in %d process%s -> %s", source.name, len(lines), num_proc,
                 "es" if num_proc > 1 else "", folder)
        tokens = lines.map(_encode_rows, batched=True, batch_size=ROWS_PER_BATCH, remove_columns=["line", "text"],
                           features=features, num_proc=num_proc if num_proc > 1 and len(lines) > ROWS_PER_BATCH else None,
                           fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "source": str(source),
                                      "train_on_prompt": train_on_prompt},
                           cache_file_name=str(scratch / "tokens.arrow"), desc=f"tokenizing {source.name}")
        with atomic_path(folder, folder=True) as tmp:
            tokens.save_to_disk(str(tmp))
            write_json(tmp / RECORD, record or {})  # last: a set without it is never reused
        del lines, tokens
    finally:
        enable_progress_bar()
        shutil.rmtree(scratch, ignore_errors=True)


def set_features():
    from datasets import Features, Sequence, Value

    return Features({"id": Value("string"), "line": Value("int64"), "input_ids": Sequence(Value("int32")),
                     "labels": Sequence(Value("int32")), "tokens": Value("int32"), "full_tokens": Value("int32"),
                     "supervised": Value("int32")})


def _first_lines(path: Path, n: int = 1000):
    with open(path, encoding="utf-8") as fh:
        for _, line in zip(range(n), fh):
            yield line


def _lines(path: str):
    with open(path, encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, 1):
            if text.strip():
                yield {"line": lineno, "text": text}


def _encode_rows(batch: dict, tokenizer, max_length: int | None, train_on_prompt: bool, source: str) -> dict:
    """One map batch: the JSON lines of samples -> token columns (runs in a worker process)."""
    from ual.data.tokenize import TemplateError, encode_or_refusal

    rows = [json.loads(t) for t in batch["text"]]
    encoded = encode_or_refusal(tokenizer, [r["messages"] for r in rows], max_length, train_on_prompt, TemplateError)
    for lineno, row, e in zip(batch["line"], rows, encoded):
        if isinstance(e, TemplateError):  # named with its line
            raise DataError(f"{source}:{lineno}: id '{row.get('id')}': {e}", "chat template") from None
    return {"id": [r["id"] for r in rows], "line": batch["line"],
            "input_ids": [ids for ids, _, _ in encoded], "labels": [labels for _, labels, _ in encoded],
            "tokens": [len(ids) for ids, _, _ in encoded], "full_tokens": [n for _, _, n in encoded],
            "supervised": [int((labels != IGNORE).sum()) for _, labels, _ in encoded]}
