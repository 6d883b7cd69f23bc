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
from pathlib import Path

from ual.config import ExperimentConfig
from ual.data.formats import DataError, count_skipped
from ual.data.tokenized import default_num_proc
from ual.sample import Sample, content_id
from ual.data.sources import input_path, load_source, source_label
from ual.io import write_json, write_jsonl
from ual.runfolder import STAGE_OUTPUTS, RunFolder

log = logging.getLogger(__name__)

OUTPUTS = STAGE_OUTPUTS["data"]


def split_source(samples: list[Sample], label: str, seed: int, heldout: int,
                 train: int | None) -> tuple[list[Sample], list[Sample]]:
    """Seeded shuffle, then held-out first and training next; an error if there are too few."""
    want = heldout + (train or 0)
    if len(samples) < want:
        asked = f"{heldout} held-out + {train} training" if train is not None else f"{heldout} held-out"
        raise DataError(f"source '{label}' has only {len(samples)} usable samples, but {asked} = "
                        f"{want} were asked; lower the counts or add data")
    order = list(samples)
    random.Random(f"{seed}:{label}").shuffle(order)
    held = order[:heldout]
    rest = order[heldout:]
    return (rest if train is None else rest[:train]), held


def token_counts(tokenizer, samples: list[Sample], max_length: int, train_on_prompt: bool,
                 num_proc: int = 1) -> list:
    """(tokens before the cut, supervised tokens after it) per sample, or the TemplateRefused the chat
    template raised for it; encoded 256 at a time (one tokenizer call each), in num_proc processes."""
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial
    from multiprocessing import get_context

    chunks = [[s.messages for s in samples[i : i + 256]] for i in range(0, len(samples), 256)]
    if num_proc <= 1 or len(chunks) < 2:
        return [c for chunk in chunks for c in _counts(tokenizer, max_length, train_on_prompt, chunk)]
    # Forked workers get the tokenizer with the process, once; only the conversations are sent.
    with ProcessPoolExecutor(min(num_proc, len(chunks)), mp_context=get_context("fork"), initializer=_keep_tokenizer,
                             initargs=(tokenizer,)) as pool:
        parts = pool.map(partial(_counts, None, max_length, train_on_prompt), chunks)
        return [c for part in parts for c in part]


_WORKER_TOKENIZER: list = []  # a pool worker's tokenizer (set once by its initializer; never in the parent)


def _keep_tokenizer(tokenizer) -> None:
    _WORKER_TOKENIZER[:] = [tokenizer]


def _counts(tokenizer, max_length: int, train_on_prompt: bool, chunk: list[list[dict]]) -> list:
    from ual.data.tokenize import IGNORE, encode_or_refusal

    tokenizer = tokenizer or _WORKER_TOKENIZER[0]
    encoded = encode_or_refusal(tokenizer, chunk, None, train_on_prompt)
    return [e if isinstance(e, Exception) else (len(e[0]), int((e[1][:max_length] != IGNORE).sum())) for e in encoded]


def length_stats(counts: list[tuple[int, int]], max_length: int) -> dict:
    """How many samples the max_length cut would truncate, and how many it leaves nothing to learn
    (`counts`: token_counts of the samples)."""
    lengths = [n for n, _ in counts]
    return {
        "truncated": sum(n > max_length for n in lengths),
        "no_supervised_tokens_after_truncation": sum(n > max_length and kept == 0 for n, kept in counts),
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


def drop_unlearnable(tokenizer, samples: list[Sample], max_length: int, train_on_prompt: bool,
                     on_error: str = "raise", stats: dict | None = None, num_proc: int = 1):
    """Samples whose response is cut away entirely by max_length teach nothing and cannot be
    scored (0 response tokens); they are dropped before the split and counted (the second value).
    The third value: token_counts of the kept samples, by id (for length_stats).

    A sample the chat template refuses (TemplateRefused) is a DataError naming its origin, or under
    on_error "skip" left out and counted in `stats` like a bad row (kind "chat template"); when it
    refuses every sample, the first refusal is raised whatever on_error says.
    """
    kept, refused, counts = [], [], {}
    for s, c in zip(samples, token_counts(tokenizer, samples, max_length, train_on_prompt, num_proc)):
        if isinstance(c, Exception):
            err = DataError(f"{s.meta.get('origin', s.id)}: {c}", "chat template")
            if on_error != "skip":
                raise err from None
            refused.append(err)
            continue
        if c[1]:
            kept.append(s)
            counts[s.id] = c
    if refused and len(refused) == len(samples):
        raise DataError(f"none of the {len(samples)} samples can be rendered by the chat template (first: "
                        f"{refused[0]})", "chat template")
    if refused and stats is not None:
        stats["kept"] = stats.get("kept", len(samples)) - len(refused)
        for err in refused:
            count_skipped(stats, err)
    return kept, len(samples) - len(refused) - len(kept), counts


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


def _write_outputs(out: Path, train: list[Sample], held: list[Sample], stats: dict) -> None:
    """samples.jsonl, heldout.jsonl, data_stats.json, all three or none: each is written beside its final
    name first and the three renamed into place together, so a failure leaves the last run's outputs.
    When the samples changed (other ids), what was derived from the old ones (scores, smoothing) is removed after."""
    from ual.lineage import Lineage

    names = ("samples.jsonl", "heldout.jsonl", "data_stats.json")
    before = [_ids(out / n) for n in names[:2]]
    staged = {n: out / f".{n}.new" for n in names}
    try:
        write_jsonl(staged["samples.jsonl"], (s.to_dict() for s in train))
        write_jsonl(staged["heldout.jsonl"], (s.to_dict() for s in held))
        write_json(staged["data_stats.json"], stats)
        for n in names:
            os.replace(staged[n], out / n)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    if before != [[s.id for s in train], [s.id for s in held]]:
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


def _ids(path: Path) -> list[str] | None:
    """The sample ids of an earlier output, in order (an id hashes the source label and the conversation)."""
    from ual.io import iter_jsonl

    try:
        return [row.get("id") for _, row in iter_jsonl(path)] if path.exists() else None
    except (OSError, ValueError):
        return None


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

    train_by: dict[str, list[Sample]] = {}
    held_by: dict[str, list[Sample]] = {}
    per_source, counts = {}, {}
    for spec, label in zip(cfg.data.sources, labels):
        need = spec.heldout + spec.train if spec.train is not None else None
        if need is not None and tokenizer is not None:
            need += need // 2 + 8  # read a margin, so dropping unlearnable samples still leaves enough
        log.info("data: loading %s (%s)", label, spec.name)
        samples, stats = load_source(spec, need, cfg.data.on_error)
        if spec.max_turns is not None:
            unique = {s.id: s for s in (first_exchanges(s, spec.max_turns) for s in samples)}
            stats["max_turns"] = spec.max_turns
            stats["duplicates_after_max_turns"] = len(samples) - len(unique)
            samples = list(unique.values())
        if tokenizer is not None:
            samples, dropped, source_counts = drop_unlearnable(tokenizer, samples, cfg.data.max_length,
                                                               cfg.data.train_on_prompt, cfg.data.on_error, stats,
                                                               cfg.data.num_proc or default_num_proc())
            stats["dropped_no_response_tokens"] = dropped
            counts.update(source_counts)
        train, held = split_source(samples, label, cfg.seed, spec.heldout, spec.train)
        for s in train:
            s.meta["split"] = "train"
        for s in held:
            s.meta["split"] = "heldout"
        stats.update(available=len(samples), train=len(train), heldout=len(held))
        per_source[label] = stats
        train_by[label], held_by[label] = train, held

    # Two files that overlap: a conversation held out by one source and picked for training by
    # another would be trained on, so its training copy goes; one picked for training by two
    # sources would be trained on twice, so the later source's copy goes.
    held_all = [s for held in held_by.values() for s in held]
    held_content = {content_id("", s.messages) for s in held_all}
    trained: set[str] = set()
    for label, train in train_by.items():
        stats = per_source[label]
        content = [content_id("", s.messages) for s in train]
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
        kept = [(s, c) for s, c in zip(train, content) if c not in held_content and c not in trained]
        trained.update(c for _, c in kept)
        if also_held or again:
            train = [s for s, _ in kept]
            stats["train"] = len(train)
            train_by[label] = train
        held = held_by[label]
        if tokenizer is not None:
            stats["train_lengths"] = length_stats([counts[s.id] for s in train], cfg.data.max_length)
            stats["heldout_lengths"] = length_stats([counts[s.id] for s in held], cfg.data.max_length)
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
    train_all = [s for train in train_by.values() for s in train]
    assert not {s.id for s in train_all} & {s.id for s in held_all}
    random.Random(f"{cfg.seed}:mix").shuffle(train_all)  # sources interleaved in the file
    out = cfg.run_path
    result = {
        "seed": cfg.seed,
        "max_length": cfg.data.max_length,
        "train_on_prompt": cfg.data.train_on_prompt,
        "train": len(train_all),
        "heldout": len(held_all),
        "sources": per_source,
    }
    _write_outputs(out, train_all, held_all, result)
    return result


def read_samples(path: str | Path) -> list[Sample]:
    """Samples written by build_dataset (samples.jsonl or heldout.jsonl)."""
    from ual.io import read_jsonl

    return [Sample.from_dict(row) for row in read_jsonl(path)]
