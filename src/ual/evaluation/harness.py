"""The lm-evaluation-harness path: OpenLLM tasks online, local task definitions offline.

`run_harness` calls `lm_eval.simple_evaluate` on a base model (a name ual
resolves, e.g. "smollm2-135m", a hub id, a folder, or a loaded model) with an
optional PEFT adapter folder (HFLM's `peft=`).

- Named tasks (`arc_challenge`, `hellaswag`, `mmlu`, `truthfulqa_mc2`, `gsm8k`:
  OPENLLM_TASKS) download their data from the Hugging Face hub, so they need it
  reachable; without it lm-eval's error is re-raised saying so.
- Offline, `local_mc` maps task names to multiple-choice data (a local file in
  ual's layout, "packaged" for the 1,000 MMLU questions in `evals`, or a list of
  MCQuestion) and `local_gsm8k` maps task names to GSM8K-layout JSONL files
  ({"question", "answer": "... #### N"}). ual writes the data and a task YAML
  into a temporary folder and hands it to `TaskManager(include_path=...)`; the
  data is read with the `json` builder of `datasets`, with no network.

Local multiple-choice tasks use the same prompt as multiple_choice.py
(question, lettered choices, "Answer:") and score the letters (MMLU style);
`mc_style="text"` scores the choice texts after "Question: ...\\nAnswer:"
instead (ARC style, where acc_norm is meaningful). Local GSM8K tasks copy
lm-eval's own gsm8k.yaml (prompt, stop strings, filters, exact_match) with the
dataset swapped and zero-shot, since only a test split ships offline.

lm-eval's exact_match on GSM8K compares strings after its regex filters; for
exact numeric comparison use ual.evaluation.maths.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

OPENLLM_TASKS = ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "gsm8k"]

# What `ual eval --tasks` / `eval.tasks` accept besides lm-eval's own task names.
TASK_SPEC_HELP = (
    "lm-eval task names (hub: arc_challenge, hellaswag, mmlu, truthfulqa_mc2, gsm8k; 'openllm' for all five) and "
    "offline ones: mmlu_packaged (the 1,000 questions in `evals`), gsm8k_heldout (this run's held-out GSM8K part), "
    "gsm8k_packaged (all 1,319 GSM8K test rows: overlaps a run that trains on GSM8K), mc:FILE, gsm8k:FILE"
)


@dataclass
class TaskPlan:
    """Task specs resolved into what run_harness takes."""

    hub: list[str] = field(default_factory=list)
    local_mc: dict = field(default_factory=dict)
    local_gsm8k: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.hub + list(self.local_mc) + list(self.local_gsm8k)


def resolve_tasks(specs: list[str], work_dir: Path, heldout=None) -> TaskPlan:
    """Turn task specs into hub names and local task data (GSM8K files are written into work_dir).

    `heldout` is the run's held-out samples, needed only by gsm8k_heldout.
    """
    from ual.data.sources import gsm8k_path

    plan = TaskPlan()
    for spec in specs:
        spec = spec.strip()
        kind, sep, arg = spec.partition(":")
        if spec == "openllm":
            plan.hub += [t for t in OPENLLM_TASKS if t not in plan.hub]
        elif spec == "mmlu_packaged":
            plan.local_mc[spec] = "packaged"
        elif spec == "gsm8k_packaged":
            plan.local_gsm8k[spec] = gsm8k_path()
        elif spec == "gsm8k_heldout":
            rows = [{"question": s.prompt_messages[-1]["content"], "answer": s.final_response}
                    for s in (heldout or []) if s.source == "gsm8k"]
            if not rows:
                raise ValueError("task gsm8k_heldout: this run has no held-out GSM8K samples "
                                 "(run `ual data` with a gsm8k source, or use gsm8k_packaged)")
            path = work_dir / "gsm8k_heldout.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            plan.local_gsm8k[spec] = path
        elif sep and kind in ("mc", "gsm8k"):
            path = Path(arg)
            if not path.is_file():
                raise FileNotFoundError(f"task {spec!r}: {path} is not a file")
            name = f"{kind}_{path.stem}"
            (plan.local_mc if kind == "mc" else plan.local_gsm8k)[name] = path
        elif sep or not spec:
            raise ValueError(f"task {spec!r}: not understood; tasks are {TASK_SPEC_HELP}")
        elif spec not in plan.hub:
            plan.hub.append(spec)
    if not plan.names:
        raise ValueError(f"no tasks given; tasks are {TASK_SPEC_HELP}")
    return plan


def write_local_mc_task(task_dir: Path, name: str, spec, style: str = "letters", shuffle: bool = False) -> Path:
    """Data (normalised JSONL) and a multiple_choice task YAML for `name` in task_dir; with `shuffle`,
    each question's choices in the same seeded order as `ual eval`'s own multiple choice."""
    from ual.evaluation.multiple_choice import LETTERS, letter_prompt

    if style not in ("letters", "text"):
        raise ValueError(f"mc style must be 'letters' or 'text', not {style!r}")
    from ual.evaluation.multiple_choice import load_questions

    questions = load_questions(spec, shuffle)
    data = task_dir / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as fh:
        for q in questions:
            row = {"id": q.id, "prompt": letter_prompt(q), "question": q.question, "choices": q.choices,
                   "letters": list(LETTERS[: len(q.choices)]), "answer": q.answer}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{prompt}}" if style == "letters" else "Question: {{question}}\nAnswer:",
        "doc_to_choice": "letters" if style == "letters" else "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "source": "ual local task"},
    }
    path = task_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def write_local_gsm8k_task(task_dir: Path, name: str, data_file) -> Path:
    """lm-eval's own gsm8k.yaml over a local GSM8K-layout JSONL, zero-shot."""
    lm_eval = require_lm_eval()
    data_file = Path(data_file)
    if not data_file.exists():
        raise FileNotFoundError(f"{data_file}: no such GSM8K file")
    with data_file.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                row = json.loads(line)
                for key in ("question", "answer"):
                    if key not in row:
                        raise ValueError(f"{data_file}:{lineno}: missing field '{key}'")
                if "####" not in row["answer"]:
                    raise ValueError(f"{data_file}:{lineno}: field 'answer': no '#### N' final answer line")
    base = Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"
    config = yaml.safe_load(base.read_text(encoding="utf-8"))
    for key in ("tag", "dataset_name", "training_split", "fewshot_split"):
        config.pop(key, None)
    config.update({"task": name, "dataset_path": "json", "test_split": "test", "num_fewshot": 0,
                   "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}}})
    path = task_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def require_lm_eval():
    from ual.optional import require

    return require("lm_eval", "eval.tasks (lm-evaluation-harness benchmarks, `ual eval --tasks`)")


def mc_positions(samples: list[dict]) -> dict:
    """position_stats of one local multiple-choice task from lm-eval's logged samples."""
    from ual.evaluation.multiple_choice import position_stats

    gold = [int(s["target"]) for s in samples]
    pred = [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    return position_stats(gold, pred, max((len(s["filtered_resps"]) for s in samples), default=0))


def summarize_results(raw: dict) -> dict:
    """{task: {metric: value}} from simple_evaluate's results ("acc,none" -> "acc", filters kept)."""
    out = {}
    for task, metrics in raw.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if key == "alias" or not isinstance(value, (int, float)):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt in ("", "none") else f"{metric}[{filt}]"] = float(value)
        out[task] = row
    return out


def run_harness(
    model,
    tasks: list[str] | None = None,
    adapter: str | os.PathLike | None = None,
    tokenizer=None,
    local_mc: dict | None = None,
    local_gsm8k: dict | None = None,
    mc_style: str = "letters",
    batch_size: int = 8,
    limit: int | float | None = None,
    device: str = "cpu",
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    gen_kwargs: dict | None = None,
    seed: int = 0,
    mc_shuffle: bool = False,
) -> dict:
    """Evaluate through lm-eval; returns {"results": {task: {metric: value}}, "n_samples", "config"} and,
    for local multiple-choice tasks, "positions" (position_stats: accuracy by gold position, predicted
    positions). `mc_shuffle` shows their choices in `ual eval`'s seeded order."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    from ual.models import resolve_model

    tasks = list(tasks or [])
    local_mc, local_gsm8k = dict(local_mc or {}), dict(local_gsm8k or {})
    if not tasks and not local_mc and not local_gsm8k:
        raise ValueError("no tasks: give hub task names and/or local_mc / local_gsm8k tasks")
    with tempfile.TemporaryDirectory(prefix="ual-lm-eval-") as tmp:
        task_dir = Path(tmp)
        for name, spec in local_mc.items():
            write_local_mc_task(task_dir, name, spec, style=mc_style, shuffle=mc_shuffle)
        for name, path in local_gsm8k.items():
            write_local_gsm8k_task(task_dir, name, path)
        # Indexing lm-eval's ~10,000 built-in task files takes a while: only when hub tasks are named.
        manager = TaskManager(include_path=str(task_dir) if (local_mc or local_gsm8k) else None,
                              include_defaults=bool(tasks))
        all_tasks = tasks + list(local_mc) + list(local_gsm8k)
        if isinstance(model, (str, os.PathLike)):
            model_args = {"pretrained": resolve_model(str(model)), "device": device, "dtype": "float32"}
            if adapter is not None:
                model_args["peft"] = str(adapter)
            if tokenizer is not None:
                model_args["tokenizer"] = tokenizer
            lm, lm_args = "hf", model_args
        else:
            from lm_eval.models.huggingface import HFLM

            if adapter is not None:
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, str(adapter))
            lm, lm_args = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size), None
        try:
            raw = lm_eval.simple_evaluate(
                model=lm, model_args=lm_args, tasks=all_tasks, num_fewshot=num_fewshot, batch_size=batch_size,
                limit=limit, task_manager=manager, apply_chat_template=apply_chat_template,
                log_samples=bool(local_mc),  # the per-question answers give the position statistics
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                gen_kwargs=gen_kwargs, bootstrap_iters=1000,
            )
        except Exception as exc:
            hub = [t for t in tasks if t not in local_mc and t not in local_gsm8k]
            if hub and any(s in repr(exc) for s in ("Connection", "offline", "resolve", "huggingface.co", "Hub")):
                raise RuntimeError(
                    f"lm-eval could not load {hub} from the Hugging Face hub ({type(exc).__name__}: {exc}); offline, "
                    "use local_mc / local_gsm8k tasks over local files instead"
                ) from exc
            raise
    if raw is None:
        raise RuntimeError("lm-eval returned no results (a non-zero rank in a distributed run?)")
    return {
        "results": summarize_results(raw),
        "n_samples": {t: v.get("effective", v.get("original")) for t, v in raw.get("n-samples", {}).items()},
        "positions": {t: mc_positions(raw["samples"][t]) for t in local_mc if t in raw.get("samples", {})},
        "config": {"model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
                   "adapter": str(adapter) if adapter else None, "tasks": all_tasks, "limit": limit,
                   "num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template, "mc_style": mc_style,
                   "mc_shuffle": mc_shuffle,
                   "lm_eval_version": getattr(lm_eval, "__version__", None)},
    }
