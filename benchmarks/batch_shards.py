"""Building the batch files for a data set of judge requests: time and peak memory, against the floor.

    python benchmarks/batch_shards.py              # 200,000 synthetic samples
    python benchmarks/batch_shards.py --n 20000    # quicker

Two variants, each in a fresh subprocess on the same synthetic samples (instructions and answers of
varied length, about 1 kB a sample):
  floor  each sample's judge request (the prompt rendered, then json.dumps of the request line) written to
         one file: the least any batch client must do
  ual    what `ual score --score.via batch` does before it sends anything: render and hash every sample,
         look up the answer cache, build the request bodies through the chat path's own code, cut shards
         within OpenAI's limits (50,000 lines, 200 MB a file), write each shard's file and commit every
         shard and item to the SQLite store (batch.py, BatchRun._build)
Peak memory is the growth of the process's resident high-water mark (ru_maxrss) from after the samples
are made to the end. Ends with one JSON line: ual / floor ratios of time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model answers a question about data sets and the judge rates how certain a good answer is "
         "while shards keep each file under its limits so nothing is sent twice").split()


def samples(n: int):
    from ual.sample import Sample

    rng = random.Random(0)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60)))
        a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
        out.append(Sample.create("synthetic", [{"role": "user", "content": f"{q} #{i}"},
                                               {"role": "assistant", "content": a}]))
    return out


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant: str, n: int) -> dict:
    from ual.config import ScoreConfig
    from ual.scoring.judge import JudgeOptions, JudgeScorer
    from ual.scoring.prompt import default_prompt

    data = samples(n)
    folder = Path(tempfile.mkdtemp(prefix="ual-batch-bench-"))
    before, start = peak_mib(), time.perf_counter()
    if variant == "floor":
        prompt = default_prompt()
        with open(folder / "requests.jsonl", "w", encoding="utf-8") as fh:
            for i, s in enumerate(data):
                msgs, _ = prompt.render(s.messages)
                fh.write(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"model": "gpt-4o-mini", "messages": msgs}}) + "\n")
        files = 1
    else:
        from ual.scoring.batch import BatchRun
        from ual.scoring.batch_files import custom_id

        cfg = ScoreConfig(scorer="judge", model="gpt-4o-mini", via="batch")
        scorer = JudgeScorer(cfg, folder / "judge_cache.sqlite", options=JudgeOptions(progress=False))
        rendered, hashes, _, todo, _ = scorer._todo(data)
        wanted = {custom_id(hashes[i], d): (i, d) for i, d in todo}
        run = BatchRun(scorer, folder / "judge_cache.sqlite")
        run._build(list(wanted), wanted, rendered, 0)
        files = len(list((folder / "batches").glob("*.input.jsonl")))
        run.store.close()
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return {"variant": variant, "n": n, "seconds": seconds, "peak_mib": peak_mib() - before, "files": files,
            "disk_mib": size / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--worker", choices=("floor", "ual"))
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n)))
        return
    rows = {}
    for variant in ("floor", "ual"):
        out = subprocess.run([sys.executable, __file__, "--worker", variant, "--n", str(a.n)], check=True,
                             capture_output=True, text=True).stdout
        rows[variant] = json.loads(out.strip().splitlines()[-1])
    print(f"{'variant':8} {'samples':>8} {'seconds':>8} {'per 1k':>8} {'peak MiB':>9} {'files':>6} {'disk MiB':>9}")
    for r in rows.values():
        print(f"{r['variant']:8} {r['n']:8d} {r['seconds']:8.1f} {r['seconds'] / r['n'] * 1000:8.3f} "
              f"{r['peak_mib']:9.0f} {r['files']:6d} {r['disk_mib']:9.0f}")
    print(json.dumps({"n": a.n, "time_ratio": rows["ual"]["seconds"] / rows["floor"]["seconds"],
                      "peak_memory_ratio": rows["ual"]["peak_mib"] / max(rows["floor"]["peak_mib"], 1.0),
                      "ual_seconds": rows["ual"]["seconds"], "ual_peak_mib": rows["ual"]["peak_mib"],
                      "ual_files": rows["ual"]["files"]}))


if __name__ == "__main__":
    main()
