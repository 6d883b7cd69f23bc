"""Peak memory of the scores report (`ual score` / `ual eval`'s scores_report/) on a large score file.

Writes a judge's score file of ROWS rows (5 sources, 1% failures with a reason) and a perplexity file
over the same ids, then runs scores_report on them, with one comparison, in a fresh Python process and
prints how much that process grew (ru_maxrss after the report minus ru_maxrss after a warm-up report
on 50 rows, which loads numpy, pandas, pyarrow, scipy and matplotlib and draws the first plots).

    python benchmarks/scores_report_memory.py [--rows 200000] [--src PATH_TO_A_UAL_SRC] [--no-compare]

--src measures another checkout's report (e.g. an older one, to compare). Ends with one JSON line:
{"rows", "compare", "growth_mb", "peak_mb", "seconds"}. tests/scoring/test_scores_report_columns.py runs it at 200k rows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

MEASURE = """
import json, resource, sys, time
from ual.scoring.analysis import scores_report
folder = sys.argv[1]
scores_report(folder + "/small.jsonl", folder + "/warm")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
scores_report(folder + "/big.jsonl", folder + "/report", compare_with=[folder + "/big_other.jsonl"][:int(sys.argv[2])])
print(json.dumps({"before_kb": before, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": time.perf_counter() - start}))
"""


def write_score_file(path: Path, rows: int, scorer: str, seed: int) -> None:
    """ROWS rows as `ual score` writes them: judge-style scores k/99, 1% null with an error, 5 sources."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 100, rows) / 99
    failed = rng.random(rows) < 0.01
    with open(path, "w") as fh:
        for i in range(rows):
            score = "null" if failed[i] else repr(float(scores[i]))
            details = '{"error": "timeout after 30 s"}' if failed[i] else '{"answer": "%d"}' % (i % 97)
            fh.write('{"id": "sample-%08d", "source": "src%d", "score": %s, "scorer": "%s", "details": %s}\n'
                     % (i, i % 5, score, scorer, details))


def measure(rows: int, src: Path, compare: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        write_score_file(Path(folder) / "big.jsonl", rows, "judge:gpt-4o-mini:uncertainty-v1", 1)
        write_score_file(Path(folder) / "big_other.jsonl", rows, "perplexity:smollm2-135m", 2)
        write_score_file(Path(folder) / "small.jsonl", 50, "prior", 3)
        env = dict(os.environ, PYTHONPATH=str(src), MPLBACKEND="Agg")
        out = subprocess.run([sys.executable, "-c", MEASURE, folder, str(int(compare))], capture_output=True, text=True, env=env)
        if out.returncode:
            raise SystemExit(f"the measured report failed:\n{out.stderr}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"rows": rows, "compare": compare, "growth_mb": round((got["peak_kb"] - got["before_kb"]) / 1024, 1),
            "peak_mb": round(got["peak_kb"] / 1024, 1), "seconds": round(got["seconds"], 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src",
                        help="the ual source folder to measure (default: this checkout's)")
    parser.add_argument("--no-compare", action="store_true",
                        help="no second scorer's file (the row-based report's rank correlation took time quadratic in the rows)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.rows, args.src, not args.no_compare)))


if __name__ == "__main__":
    main()
