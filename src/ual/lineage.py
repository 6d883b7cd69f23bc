"""What a run folder's settings and outputs were made from: the contract between a folder and one command.

config.yaml holds the folder's settings: what a plain `ual STAGE RUN` starts from. A command's flags
apply to that command; when the stage succeeds, the settings that define its outputs are recorded
(config.yaml, and lineage.json beside the outputs), and nothing else is:

  data   the model, seed, chat template and data.*      score  score.*        map  smoothing.*
  train  the model, seed and train.* (not train.modes: which modes to train is this command's choice)
  eval, report   nothing (an evaluation is per command; each result records the settings it was made with)

Flags about one invocation never persist, whatever the stage: a dry run, --force, --resume, the
judge's concurrency and rate limits, how it is asked (score.via, score.batch_*), --tasks, --adapter,
the device. A dry run, --help, or a command that fails or is interrupted records nothing, so it leaves
config.yaml exactly as it was.

lineage.json maps each output (score, map, train/MODE, eval/MODEL, comparisons) to what made it: the
settings that shape it and a sha256 of each input file. A stage compares that record with what it would
use now and redoes an output whose record differs (saying which setting or input changed), as make or
DVC would; the report marks any table whose record no longer matches the folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import yaml

from ual.io import read_json, write_json, write_text

log = logging.getLogger(__name__)

# Fields about one invocation: never written into an existing folder's config.yaml.
PER_INVOCATION = ("device", "shard_size", "data.num_proc", "score.dry_run", "score.concurrency", "score.requests_per_minute",
                  "score.tokens_per_minute", "score.timeout_s", "score.max_retries", "score.batch_size",
                  "score.via", "score.batch_wait", "score.batch_poll_s", "score.batch_find_s",
                  "score.batch_max_lines", "score.batch_max_bytes", "score.batch_max_queued_tokens",
                  "score.batch_rounds", "score.batch_fallback",
                  "train.modes", "train.resume", "eval")
# Settings each stage records when it succeeds (dotted prefixes of config fields).
STAGE_SETTINGS = {
    "data": ("model", "seed", "trust_remote_code", "chat_template", "data"),
    "score": ("score",),
    "map": ("smoothing",),
    "train": ("model", "seed", "trust_remote_code", "chat_template", "train"),
}
IGNORED_IN_DIFF = ("name", "run_dir")  # where the folder is, not what it holds


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"train": {"max_steps": 20}} -> {"train.max_steps": 20}; lists (data.sources) stay whole values."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def under(dotted: str, prefixes) -> bool:
    return any(dotted == p or dotted.startswith(p + ".") for p in prefixes)


# Settings a training record leaves out at these values: what a record made before the setting existed
# trained with. train.batching: padding_free has the padded loss and gradients only without dropout (LoRA's
# dropout draws its masks over the batch's shape, so the trained model differs), and grouped changes which
# samples meet in a step, so both are recorded.
RECORDED_UNLESS = {"train.batching": "padded"}


def settings_diff(recorded: dict, now: dict) -> list[str]:
    """'train.max_steps 20 -> 10' for every setting that differs (flattened dicts)."""
    def show(v):
        return json.dumps(v, default=str) if isinstance(v, (list, dict)) else yaml.safe_dump(v).strip().removesuffix(
            "\n...").strip()
    def value(d, k):  # a setting a record leaves out at its default (RECORDED_UNLESS) reads as that default
        return d.get(k, RECORDED_UNLESS.get(k))

    keys = [k for k in {**recorded, **now} if not under(k, IGNORED_IN_DIFF)]
    return [f"{k} {show(value(recorded, k))} -> {show(value(now, k))}" for k in keys
            if value(recorded, k) != value(now, k)]


def read_folder_settings(path: Path) -> dict | None:
    """config.yaml as a dict (None when the folder has none yet, or it cannot be read as a mapping)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def announce_differences(stage: str, folder_config: Path, now: dict, defaults: dict | None = None) -> None:
    """One line, before the stage works, naming the settings this command uses that differ from the
    folder's, and which of them it will record. A setting the folder's config.yaml does not name (it was
    written before the setting existed) counts as its default there, not as a difference."""
    recorded = read_folder_settings(folder_config)
    if recorded is None:
        return
    changed = settings_diff({**flatten(defaults or {}), **flatten(recorded)}, flatten(now))
    if not changed:
        return
    keep = STAGE_SETTINGS.get(stage, ())
    recorded_now = [c for c in changed if under(c.split(" ")[0], keep) and not under(c.split(" ")[0], PER_INVOCATION)]
    once = [c for c in changed if c not in recorded_now]
    parts = ([f"recorded if it succeeds: {'; '.join(recorded_now)}"] if recorded_now else []) + (
        [f"this command only: {'; '.join(once)}"] if once else [])
    log.info("ual %s: settings differ from %s (%s)", stage, folder_config, " | ".join(parts))


def record_settings(stage: str, folder_config: Path, now: dict) -> None:
    """After `stage` succeeded: the folder's config.yaml with this stage's settings from `now` (a new folder:
    all of `now`, but never a dry run or a resume). Written only when it changes."""
    recorded = read_folder_settings(folder_config)
    if recorded is None:  # the folder's first settings: the config file's, as given (a dry run records nothing)
        new = copy.deepcopy(now)
        for dotted in ("score.dry_run", "train.resume"):
            _set(new, dotted, False)
    else:
        new = copy.deepcopy(recorded)
        for dotted, value in flatten(now).items():
            if under(dotted, STAGE_SETTINGS.get(stage, ())) and not under(dotted, PER_INVOCATION):
                _set(new, dotted, value)
    if new != recorded:
        write_text(folder_config, yaml.safe_dump(new, sort_keys=False, allow_unicode=True))


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


# --------------------------------------------------------------------------- outputs' records

def file_digest(path: Path) -> str | None:
    """sha256 of a file's bytes (None when it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def folder_digest(path: Path, names=("adapter_config.json", "adapter_model.safetensors", "config.json")) -> str | None:
    """A model or adapter folder's identity: the sha256 of its small defining files, plus the size of the
    rest (hashing a full model's weights on every check would cost minutes)."""
    path = Path(path)
    if not path.is_dir():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        h.update((file_digest(f) if f.name in names else str(f.stat().st_size)).encode())
    return h.hexdigest()


def pick(cfg_dict: dict, fields) -> dict:
    """The flattened settings under `fields` (dotted prefixes)."""
    return {k: v for k, v in flatten(cfg_dict).items() if under(k, fields)}


def record_of(settings: dict, inputs: dict) -> dict:
    """What an output is made from, with one fingerprint over both (inputs: name -> digest or None)."""
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return {"settings": settings, "inputs": inputs, "fingerprint": hashlib.sha256(blob.encode()).hexdigest()}


def record_changes(old: dict, new: dict) -> list[str]:
    """Why `old` no longer describes what `new` would make: changed settings, changed input files."""
    changes = settings_diff(old.get("settings", {}), new.get("settings", {}))
    for name in sorted({**old.get("inputs", {}), **new.get("inputs", {})}):
        a, b = old.get("inputs", {}).get(name), new.get("inputs", {}).get(name)
        if a != b:
            changes.append(f"{name} " + ("changed" if a and b else "is new" if b else "is gone"))
    return changes


class Lineage:
    """RUN/lineage.json: output name -> record_of(...). Read and written whole (atomically) per change."""

    def __init__(self, root: Path):
        self.path = Path(root) / "lineage.json"

    def read(self) -> dict:
        try:
            data = read_json(self.path)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, output: str) -> dict | None:
        return self.read().get(output)

    def put(self, output: str, record: dict) -> None:
        data = self.read()
        if data.get(output) != record:
            data[output] = record
            write_json(self.path, data)

    def drop(self, *outputs: str) -> None:
        data = self.read()
        if any(o in data for o in outputs):
            write_json(self.path, {k: v for k, v in data.items() if k not in outputs})

    def stale(self, output: str, now: dict) -> list[str] | None:
        """None: no record (made before records were kept, or never made); []: current; else what changed."""
        old = self.get(output)
        if old is None:
            return None
        return [] if old.get("fingerprint") == now["fingerprint"] else record_changes(old, now)


# --------------------------------------------------------------------------- what shapes each output
# Settings that change a trained model (not how often it logs, checkpoints or is evaluated along the way).
TRAIN_NOT_SHAPING = ("train.modes", "train.resume", "train.logging_steps", "train.save_steps", "train.save_total_limit",
                     "train.report_to", "train.eval_strategy", "train.eval_steps", "train.eval_train_samples",
                     "train.keep_points")
# Evaluation settings that change eval/MODEL.json (not which models, pairs or intervals, nor the benchmarks,
# whose own file records its settings).
EVAL_SHAPING = ("eval.nll", "eval.gsm8k", "eval.gsm8k_limit", "eval.max_new_tokens", "eval.multiple_choice",
                "eval.mc_file", "eval.mc_limit", "eval.mc_samples", "eval.mc_acc_norm", "eval.mc_shuffle",
                "eval.ece_bins", "eval.u_buckets", "eval.clustering", "eval.clustering_texts",
                "eval.clustering_top_k", "data.max_length", "data.train_on_prompt")
MODEL_SCORERS = ("perplexity", "entropy", "entropy_ratio", "nll_ratio", "local_judge")


def score_record(now: dict, root: Path) -> dict:
    flat = flatten(now)
    fields = ["score"] + (["model", "chat_template", "trust_remote_code"]
                          if flat.get("score.scorer") in MODEL_SCORERS and not flat.get("score.model") else [])
    settings = {k: v for k, v in pick(now, fields).items() if not under(k, PER_INVOCATION)}
    inputs = {"samples.jsonl": file_digest(root / "samples.jsonl"), "heldout.jsonl": file_digest(root / "heldout.jsonl")}
    if flat.get("score.prompt_file"):
        inputs["score.prompt_file"] = file_digest(Path(flat["score.prompt_file"]))
    return record_of(settings, inputs)


def map_record(now: dict, root: Path) -> dict:
    return record_of(pick(now, ["smoothing"]), {"scores.jsonl": file_digest(root / "scores.jsonl")})


def train_record(now: dict, root: Path, mode: str) -> dict:
    from ual.modes import mode_parts

    eps_mode = mode_parts(mode)[0]
    fields = [*STAGE_SETTINGS["train"], "data.max_length", "data.train_on_prompt"]
    fields += {"ls": ["smoothing.target_mean"], "ppl": ["smoothing.target_mean", "smoothing.eps_max"],
               "ual": ["smoothing.missing"]}.get(eps_mode, [])
    settings = {k: v for k, v in pick(now, fields).items() if not under(k, (*PER_INVOCATION, *TRAIN_NOT_SHAPING))}
    for key, default in RECORDED_UNLESS.items():
        if settings.get(key) == default:
            settings.pop(key)
    settings["mode"] = mode
    inputs = {"samples.jsonl": file_digest(root / "samples.jsonl")}
    if eps_mode == "ual":
        inputs["smoothing.jsonl"] = file_digest(root / "smoothing.jsonl")
    return record_of(settings, inputs)


def model_identity(now: dict, root: Path, name: str) -> str | None:
    """What a model name stands for: the base model's name, a trained mode's training record, or a folder's digest."""
    if name == "base":
        return f"base:{flatten(now).get('model')}"
    if "/" in name or name.startswith("."):
        return folder_digest(Path(name))
    record = Lineage(root).get(f"train/{name}")
    return record["fingerprint"] if record else folder_digest(root / "train" / name / "adapter")


def eval_record(now: dict, root: Path, name: str) -> dict:
    inputs = {"heldout.jsonl": file_digest(root / "heldout.jsonl"),
              "heldout_scores.jsonl": file_digest(root / "heldout_scores.jsonl"),
              "model": model_identity(now, root, name)}
    return record_of(pick(now, EVAL_SHAPING), inputs)
