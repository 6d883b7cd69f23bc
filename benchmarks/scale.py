"""Every CPU stage at data-set scale: wall time and peak memory from 10k to 1M samples, against the floor
and TRL's SFTTrainer on the same set, in one run.

    python benchmarks/scale.py                         # 10k, 100k, 300k samples (what fits 2 cores in ~30 min)
    python benchmarks/scale.py --sizes 10000,1000000   # any sizes
    python benchmarks/scale.py --sizes 1000000 --skip trl_first,trl_cached   # stages left out (named in the log)

For each size, two synthetic sources written as local JSONL files (not committed; made here): "maths",
short worked answers (one or two sentences), and "chat", replies whose word count is drawn log-normally
(median ~110 words, clipped to 20..1,500), as open chat replies are. Each stage runs in a fresh process
on the same run folder, through the real CLI, and reports its wall time and its peak RSS (the process's
ru_maxrss; worker processes are listed apart):
  data      `ual data`  (read, deduplicate, count tokens, split, write)
  score     `ual score --score.scorer prior`
  judge_plan `ual score --judge openai --model gpt-4o-mini --score.via batch --dry-run` (every judge request
            built and cut into Batch API files' sizes; nothing is sent)
  map       `ual map`
  export    `ual export-data --format parquet`
  tokenize  the training set tokenized into the run folder (ual.data.tokenized, data.num_proc = cores)
  train     `ual train` (LoRA): first use (the tokenized set missing) and cached (it exists); time and
            peak RSS to the moment the first step starts (the process ends there: the step is not measured)
  trl       TRL's SFTTrainer on the same samples.jsonl (LoRA, dataset_num_proc = cores, same model and
            max_length): first use and cached (its datasets cache), time and peak RSS to the first step
The floor of tokenizing: the least program that does it on all cores: a pool of one worker a core, each
loading the tokenizer, parsing its share of samples.jsonl, rendering each conversation once and tokenizing
in batched fast-tokenizer calls with offsets, keeping and writing nothing. `tokenize` (the same samples
into the run's Arrow set, from the same file, libraries imported beforehand in both) is a ratio to it.
Growth exponents between sizes: log(t2/t1) / log(N2/N1), for time (goal ~1) and for peak RSS above
the process's start (goal ~0).

Ends with one JSON line: per size, each stage's seconds and peak MB, ual/TRL ratios, the tokenizing
ratio to the floor, and the exponents.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in that it is was for on are with as his they be at one have this from by hot word but "
         "what some we can out other were all there when up use your how said an each she which do their time if "
         "will way about many then them write would like so these her long make thing see him two has look more "
         "day could go come did number sound no most people my over know water than call first who may down side "
         "been now find any new work part take get place made live where after back little only round man year").split()
HELDOUT = 200
MODEL = "smollm2-135m"
MAX_LENGTH = 512


def cores() -> int:
    return len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- data

def write_sources(folder: Path, n: int) -> None:
    """n + 2 * HELDOUT rows, half maths and half chat, seeded."""
    rng = random.Random(n)
    half = n // 2 + HELDOUT
    with open(folder / "maths.jsonl", "w") as fh:
        for i in range(half):
            a, b = rng.randint(2, 999), rng.randint(2, 999)
            fh.write(json.dumps({"prompt": f"Problem {i}: what is {a} times {b}?",
                                 "completion": f"{a} times {b} is {a * b}. So the answer is {a * b}."}) + "\n")
    with open(folder / "chat.jsonl", "w") as fh:
        for i in range(half):
            words = min(1500, max(20, int(rng.lognormvariate(math.log(110), 0.7))))
            ask = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            fh.write(json.dumps({"messages": [
                {"role": "user", "content": f"Request {i}: {ask}?"},
                {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words))}]}) + "\n")


def write_config(folder: Path, n: int) -> Path:
    half = n // 2
    cfg = folder / "scale.yaml"
    cfg.write_text(f"""name: scale
run_dir: {folder / 'run'}
model: {MODEL}
data:
  max_length: {MAX_LENGTH}
  sources:
    - {{name: {folder / 'maths.jsonl'}, label: maths, train: {half}, heldout: {HELDOUT}}}
    - {{name: {folder / 'chat.jsonl'}, label: chat, train: {n - half}, heldout: {HELDOUT}}}
score: {{scorer: prior, prior: {{maths: 0.2, chat: 0.8}}}}
train: {{modes: [sft], max_steps: 1, batch_size: 4, save_steps: 0, report_to: none, eval_strategy: "no"}}
""")
    return cfg


# --------------------------------------------------------------------------- children (fresh processes)

def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def stop_here(result: dict) -> None:
    """Print the result and end the process where the first step would start: the step itself (tens of
    seconds on a CPU, the same whatever N) is not what is measured."""
    print(json.dumps(result), flush=True)
    os._exit(0)


def child_ual(argv: list[str]) -> dict:
    """`ual ARGV` in this process; the time and peak RSS when training's first step starts, if it does."""
    import logging

    start = time.perf_counter()
    first: dict = {}

    class FirstStep(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("training ") and not first:
                first.update(first_step_s=time.perf_counter() - start, first_step_peak_mb=peak_mb())
                stop_here({"rc": 0, "seconds": first["first_step_s"], "peak_mb": peak_mb(),
                           "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN), **first})

    logging.getLogger("ual.training.stage").addHandler(FirstStep())
    from ual.cli import main

    rc = main(argv)
    return {"rc": rc, "seconds": time.perf_counter() - start, "peak_mb": peak_mb(),
            "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN), **first}


def child_tokenize(run: str, num_proc: int) -> dict:
    import datasets  # noqa: F401 - imported before the clock starts, as transformers is in the `floor` child

    from ual.data.tokenized import tokenized_set
    from ual.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    shutil.rmtree(Path(run) / "tokenized", ignore_errors=True)
    before, start = peak_mb(), time.perf_counter()
    ds = tokenized_set(Path(run), "train", tok, MAX_LENGTH, num_proc=num_proc)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": len(ds), "samples_per_s": len(ds) / seconds, "peak_mb": peak_mb(),
            "start_mb": before, "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN),
            "tokens": int(sum(ds["tokens"][:]))}


def _floor_chunk(args):
    path, start, stop = args
    from ual.models import load_tokenizer

    tok = load_tokenizer(MODEL)
    convs = []
    with open(path) as fh:
        for i, line in enumerate(fh):
            if start <= i < stop:
                convs.append(json.loads(line)["messages"])
    for k in range(0, len(convs), 256):
        texts = tok.apply_chat_template(convs[k : k + 256], tokenize=False)
        tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    return len(convs)


def child_floor(run: str, num_proc: int) -> dict:
    """The floor: the least program that tokenizes the file on all cores: a pool of num_proc workers, each
    loading the tokenizer, reading and parsing its share of the lines, rendering each conversation once and
    tokenizing it in batched fast-tokenizer calls with offsets (nothing kept, nothing written)."""
    from multiprocessing import get_context

    import transformers  # noqa: F401 - imported before the clock starts, as in the `tokenize` child

    path = str(Path(run) / "samples.jsonl")
    with open(path) as fh:
        n = sum(1 for _ in fh)
    step = math.ceil(n / num_proc)
    start = time.perf_counter()
    with get_context("fork").Pool(num_proc) as pool:
        done = sum(pool.map(_floor_chunk, [(path, i, min(n, i + step)) for i in range(0, n, step)]))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples": done, "samples_per_s": done / seconds}


def child_trl(run: str, num_proc: int, cache: str) -> dict:
    """TRL's SFTTrainer on samples.jsonl (its messages column), LoRA, to the start of its first step."""
    start = time.perf_counter()
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ual.models import load_tokenizer, resolve_model

    first: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not first:
                first.update(first_step_s=time.perf_counter() - start, first_step_peak_mb=peak_mb())
                stop_here({"seconds": first["first_step_s"], "peak_mb": peak_mb(),
                           "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN), **first})

    data = load_dataset("json", data_files=str(Path(run) / "samples.jsonl"), split="train", cache_dir=cache)
    data = data.select_columns(["messages"])
    tok = load_tokenizer(MODEL)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL))
    args = SFTConfig(output_dir=str(Path(cache) / "out"), max_steps=1, per_device_train_batch_size=4,
                     max_length=MAX_LENGTH, dataset_num_proc=num_proc, report_to="none", save_strategy="no",
                     use_cpu=True, logging_steps=1, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"), callbacks=[FirstStep()])
    trainer.train()
    return {"seconds": time.perf_counter() - start, "peak_mb": peak_mb(),
            "workers_peak_mb": peak_mb(resource.RUSAGE_CHILDREN), **first}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines or json.loads(lines[-1]).get("rc"):
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# --------------------------------------------------------------------------- the run

STAGES = ("data", "score", "judge_plan", "map", "export", "floor", "tokenize", "train_first", "train_cached",
          "trl_first", "trl_cached")


def measure(n: int, base: Path, skip: set[str] = frozenset()) -> dict:
    folder = base / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    write_sources(folder, n)
    cfg, run, p = write_config(folder, n), str(folder / "run"), str(cores())
    cache = str(folder / "trl-cache")
    children = {
        "data": ("ual", "data", str(cfg)),
        "score": ("ual", "score", run, "--score.scorer", "prior"),
        # the judge's requests built and cut into Batch API files, nothing sent (the key is never read)
        "judge_plan": ("ual", "score", run, "--judge", "openai", "--model", "gpt-4o-mini", "--score.via", "batch",
                       "--dry-run"),
        "map": ("ual", "map", run),
        "export": ("ual", "export-data", run, "--format", "parquet", "--out", str(folder / "export.parquet")),
        "floor": ("floor", run, p),
        "tokenize": ("tokenize", run, p),
        "train_first": ("ual", "train", run),
        "train_cached": ("ual", "train", run, "--force"),
        "trl_first": ("trl", run, p, cache),
        "trl_cached": ("trl", run, p, cache),
    }
    out = {"n": n}
    for stage in STAGES:
        if stage == "train_first" and (Path(run) / "tokenized").exists():
            shutil.rmtree(Path(run) / "tokenized")  # first use: the set is built by training itself
        if stage not in skip:
            out[stage] = run_child(*children[stage])
    shutil.rmtree(folder, ignore_errors=True)  # GBs at 1M
    return out


def exponent(a: float, b: float, n1: int, n2: int) -> float:
    return math.log(max(b, 1e-9) / max(a, 1e-9)) / math.log(n2 / n1)


def table(results: list[dict]) -> tuple[str, dict]:
    rows = ["| stage | " + " | ".join(f"{r['n']:,}: s | MB" for r in results) + " |",
            "|---|" + "---:|---:|" * len(results)]
    for name in STAGES:
        cells = []
        for r in results:
            m = r.get(name)
            mb = None if m is None else m.get("first_step_peak_mb", m.get("peak_mb"))
            cells.append("not run | -" if m is None else f"{_seconds(m):.1f} | " + (f"{mb:.0f}" if mb is not None else "-"))
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    summary = {"sizes": [r["n"] for r in results], "per_size": []}
    ratios = {"tokenize_vs_floor": ("tokenize", "floor", "speed"),
              "train_first_vs_trl_first_time": ("train_first", "trl_first", "time"),
              "train_cached_vs_trl_cached_time": ("train_cached", "trl_cached", "time"),
              "train_first_vs_trl_first_rss": ("train_first", "trl_first", "rss"),
              "train_cached_vs_trl_cached_rss": ("train_cached", "trl_cached", "rss")}
    measured = ("data", "score", "judge_plan", "map", "export", "tokenize", "train_cached")
    for r in results:
        row = {"n": r["n"]}
        for key, (a, b, what) in ratios.items():
            if a in r and b in r:
                row[key] = (r[a]["samples_per_s"] / r[b]["samples_per_s"] if what == "speed" else
                            _seconds(r[a]) / _seconds(r[b]) if what == "time" else _peak(r[a]) / _peak(r[b]))
        row.update({f"{k}_s": round(_seconds(r[k]), 2) for k in measured if k in r})
        row.update({f"{k}_peak_mb": round(_peak(r[k])) for k in measured if k in r})
        summary["per_size"].append(row)
    growth = {}
    for a, b in zip(results, results[1:]):
        growth[f"{a['n']}->{b['n']}"] = {
            name: {"time": round(exponent(_seconds(a[name]), _seconds(b[name]), a["n"], b["n"]), 2),
                   "peak_mb_growth": round(_peak(b[name]) - _peak(a[name]))}
            for name in measured if name in a and name in b}
    summary["growth"] = growth
    return "\n".join(rows), summary


def _seconds(m: dict) -> float:
    return m.get("first_step_s", m["seconds"])


def _peak(m: dict) -> float:
    return m.get("first_step_peak_mb", m["peak_mb"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,300000")
    p.add_argument("--skip", default="", help=f"stages not run, comma-separated (of {', '.join(STAGES)})")
    p.add_argument("--child", nargs=argparse.REMAINDER)
    args = p.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        result = {"ual": lambda: child_ual(rest), "tokenize": lambda: child_tokenize(rest[0], int(rest[1])),
                  "floor": lambda: child_floor(rest[0], int(rest[1])),
                  "trl": lambda: child_trl(rest[0], int(rest[1]), rest[2])}[kind]()
        print(json.dumps(result))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STAGES):
        p.error(f"--skip: unknown stage(s) {sorted(skip - set(STAGES))}; stages: {', '.join(STAGES)}")
    base = Path(tempfile.mkdtemp(prefix="ual-scale-"))
    results = []
    print(f"# benchmarks/scale.py on {cores()} cores, sizes {sizes}, model {MODEL}, max_length {MAX_LENGTH}"
          + (f", not run: {', '.join(sorted(skip))}" if skip else ""), flush=True)
    for n in sizes:
        t = time.time()
        results.append(measure(n, base, skip))
        print(f"# n={n:,} measured in {time.time() - t:.0f} s: {json.dumps(results[-1])}", flush=True)
        text, summary = table(results)
        print(text, flush=True)
    shutil.rmtree(base, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
