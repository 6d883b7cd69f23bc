"""The paper's data sets (docs/method.md §5), by name, from the hub or from a local copy in the published layout.

Use them in `data.sources` by name, with an optional `path:` to a local file:

    data:
      sources:
        - {name: lima}                                   # GAIR/lima train.jsonl from the hub (gated)
        - {name: lima, path: /data/lima/train.jsonl}     # the same file, downloaded before
        - {name: metamathqa, path: MetaMathQA-395K.json, train: 6000}

  name          hub file (published layout)                                  label      layout
  lima          GAIR/lima train.jsonl                                         lima       {"conversations": [str, str, ...], "source"}
  deita-6k      hkust-nlp/deita-6k-v0 deita_6k.json                           deita      {"id", "conversations": [{"from", "value"}]}
  metamathqa    meta-math/MetaMathQA MetaMathQA-395K.json                     metamath   {"query", "response", "type", "original_question"}
  sharegpt-v3   anon8231489123/ShareGPT_Vicuna_unfiltered                     sharegpt   [{"id", "conversations": [{"from", "value"}]}]
                ShareGPT_V3_unfiltered_cleaned_split.json
  sharegpt-6k, sharegpt-3k, metamath-6k, metamath-3k
                DEITA selections made by `ual select` (local JSONL in the `messages` layout; `path:` required)

ShareGPT-6k, MetaMath-6k and the halves of Mixed-6k (3k + 3k) are DEITA selections
from the ShareGPT and MetaMathQA pools (paper §4.1): build them with `ual select`
(scoring/deita.py), then name them here. The labels are what reports and the maths
evaluation go by: MetaMath samples are labelled `metamath` and carry their gold
final answer (the text after "The answer is:") in meta["answer"].

Hub files are fetched with `huggingface_hub.hf_hub_download` (cached by it) and then
read exactly like a local copy, so one parser serves both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Iterator

from ual.data.formats import DataError, iter_rows, iter_samples, new_stats, sharegpt_first_parts, stream_file
from ual.sample import Sample


@dataclass(frozen=True)
class PaperSource:
    label: str
    repo: str | None  # hub data set repo (None: a local selection, path required)
    filename: str | None
    layout: str  # lima | sharegpt | metamath | selection
    note: str = ""
    rows: int | None = None  # published size (for estimates)


PAPER_SOURCES: dict[str, PaperSource] = {
    "lima": PaperSource("lima", "GAIR/lima", "train.jsonl", "lima", "1,030 curated conversations; gated on the hub", 1030),
    "deita-6k": PaperSource("deita", "hkust-nlp/deita-6k-v0", "deita_6k.json", "sharegpt", "6k DEITA selection (ShareGPT, UltraChat)", 6000),
    "metamathqa": PaperSource("metamath", "meta-math/MetaMathQA", "MetaMathQA-395K.json", "metamath", "395k maths QA pool", 395000),
    "sharegpt-v3": PaperSource("sharegpt", "anon8231489123/ShareGPT_Vicuna_unfiltered",
                               "ShareGPT_V3_unfiltered_cleaned_split.json", "sharegpt_pool", "~94k conversations pool", 94145),
    "sharegpt-6k": PaperSource("sharegpt", None, None, "selection", "ual select --source sharegpt-v3 --n 6000"),
    "sharegpt-3k": PaperSource("sharegpt", None, None, "selection", "ual select --source sharegpt-v3 --n 3000"),
    "metamath-6k": PaperSource("metamath", None, None, "selection", "ual select --source metamathqa --n 6000"),
    "metamath-3k": PaperSource("metamath", None, None, "selection", "ual select --source metamathqa --n 3000"),
}

ANSWER = re.compile(r"The answer is:?\s*(.+?)\s*$", re.S)


def hub_file(repo: str, filename: str) -> Path:
    """Download (or find in the hub cache) one file of a hub data set."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename, repo_type="dataset"))
    except Exception as exc:  # offline, gated, not found: say what to do instead
        raise DataError(f"hub {repo}/{filename}: could not download ({type(exc).__name__}: {exc}); download it "
                        f"where the hub is reachable (gated sets need `huggingface-cli login` and accepting their "
                        f"terms) and give the file as `path:` of the source") from None


def source_file(name: str, path: str | None) -> Path:
    spec = PAPER_SOURCES[name]
    if path:
        p = Path(path)
        if not p.is_file():
            hint = f"; build it with `{spec.note} --out {p}`" if spec.repo is None else ""
            raise DataError(f"source '{name}': path {p}: no such file{hint}")
        return p
    if spec.repo is None:
        raise DataError(f"source '{name}' is a DEITA selection with no hub copy: build it with `{spec.note} --out FILE` "
                        f"and give FILE as its `path:`")
    return hub_file(spec.repo, spec.filename)


def metamath_answer(response: str) -> str | None:
    """The gold final answer of a MetaMathQA response ("... The answer is: 18" -> "18")."""
    m = ANSWER.search(response.strip().splitlines()[-1]) if response.strip() else None
    if m is None:
        m = ANSWER.search(response)
    if m is None:
        return None
    return m.group(1).strip().rstrip(".").replace(",", "") if m.group(1).strip() else None


def stream_paper_source(spec, need: int | None = None, on_error: str = "raise") -> tuple[Iterator[Sample], dict]:
    """A named paper source (SourceConfig `spec`), a sample at a time: (unique samples in file order,
    stats complete once they are read)."""
    info = PAPER_SOURCES[spec.name]
    label = spec.label or info.label
    path = source_file(spec.name, spec.path)
    if info.layout == "metamath":
        samples, stats = _metamath(path, label, on_error)
    elif info.layout == "sharegpt_pool":
        samples, stats = _sharegpt_pool(path, label, need)
    else:
        fmt = spec.format if spec.format != "auto" or info.layout == "selection" else info.layout
        samples, stats = stream_file(path, source=label, fmt=fmt, on_error=on_error)
        if info.layout == "selection" and info.label == "metamath":
            samples = map(_add_answer, samples)
    stats.update(path=str(path), paper_source=spec.name, hub=None if spec.path else info.repo)
    return samples, stats


def _add_answer(sample: Sample) -> Sample:
    ans = metamath_answer(sample.final_response)
    if ans is not None:
        sample.meta["answer"] = ans
    return sample


def _metamath(path: Path, label: str, on_error: str) -> tuple[Iterator[Sample], dict]:
    """MetaMathQA rows {query, response, type, original_question} as user=query, assistant=response."""
    kinds: dict[str, str] = {}  # origin -> type, for the row a sample is being made from
    stats = {**new_stats(), "with_answer": 0}

    def rows():  # a bad row goes on as a DataError: iter_samples raises or skips and counts it
        for where, row in iter_rows(path):
            bad = row if isinstance(row, DataError) else next(
                (DataError(f"{where}: field '{key}': missing or not a non-empty string", "missing field")
                 for key in ("query", "response") if not isinstance(row.get(key), str) or not row[key].strip()), None)
            if bad is not None:
                yield where, bad
                continue
            kinds.clear()  # a duplicate's type is never read: keep one entry, not one per row
            kinds[where] = str(row.get("type", ""))
            yield where, {"prompt": row["query"], "completion": row["response"]}

    def samples():
        for s in iter_samples(rows(), label, "prompt_completion", on_error, name=str(path), stats=stats):
            s.meta["type"] = kinds.get(s.meta["origin"], "")
            stats["with_answer"] += "answer" in _add_answer(s).meta
            yield s

    return samples(), stats


def _sharegpt_pool(path: Path, label: str, need: int | None) -> tuple[Iterator[Sample], dict]:
    """The ShareGPT V3 dump (a JSON list): the first part of each conversation, noisy rows skipped and counted.

    Same rules as the packaged `sharegpt` source: ids "abc_1", "abc_2" are later parts of
    "abc" (they mostly start mid-conversation, and would leak across a train/held-out split).
    """
    stats = new_stats()
    stats["other_parts"] = 0  # counted by sharegpt_first_parts as the dump is read
    return iter_samples(sharegpt_first_parts(path, stats), label, "sharegpt", on_error="skip", limit=need,
                        stats=stats), stats


def describe() -> list[dict]:
    """The named sources, for docs and `--dry-run`."""
    return [{"name": k, "label": v.label, "hub": f"{v.repo}/{v.filename}" if v.repo else None, "note": v.note}
            for k, v in PAPER_SOURCES.items()]

