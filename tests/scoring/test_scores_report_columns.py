"""The scores report read as columns: the same report as the row-based one, in flat memory.

The golden files under golden/scores_report/ were written by the row-based report (ual before the
columns, commit c17875c) from the files `write_realistic` writes: the columnar report must give
them byte for byte (same numbers, same float formatting, same failures in the same order)."""

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ual.config import SmoothingConfig
from ual.runfolder import read_score_table
from ual.scoring.analysis import _builtin_sum, scores_report

GOLDEN = Path(__file__).parent / "golden" / "scores_report"
SMOOTHING = SmoothingConfig(target_mean=0.2, eps_max=0.9, normalize="rank")
REASONS = ["unparseable answer: out of range: 150", "timeout after 30 s", "HTTP 429: rate limited: retry 3",
           "unparseable answer: no number in 'I cannot rate this'"]


def write_realistic(folder: Path) -> list[str]:
    """A judge's score file (4 sources, one of them unnamed, failures with and without a reason, rows
    repeated identically, a blank line), a perplexity file sharing most ids (some only on one side,
    some failed), and a third scorer's file sharing none; returns their names."""
    rng = random.Random(38)
    sources = ["maths", "chat", "open/hermes 2.5", None]
    judge, ppl = [], []
    for i in range(3000):
        src = sources[i % 4] if i % 7 else sources[(i // 7) % 4]
        row = {"id": f"s{i:05d}", "score": rng.randrange(100) / 99, "scorer": "judge:gpt-4o-mini:uncertainty-v1",
               "details": {"answer": "42"}}
        if src is not None:
            row["source"] = src
        if rng.random() < 0.04:
            row["score"] = None
            row["details"] = {"error": rng.choice(REASONS)} if rng.random() < 0.8 else (None if i % 2 else {})
        judge.append(row)
        if i % 10:  # a tenth of the judge's ids are not in the perplexity file
            value = min(1.0, rng.lognormvariate(-1.2, 0.5)) if rng.random() > 0.02 else None
            ppl.append({"id": row["id"], "source": src or "chat", "score": value, "scorer": "perplexity:smollm2-135m",
                        "details": {} if value is not None else {"error": "nan loss: empty response"}})
    ppl += [{"id": f"x{i}", "source": "chat", "score": rng.random(), "scorer": "perplexity:smollm2-135m"}
            for i in range(200)]
    judge += [judge[5], judge[17], next(r for r in judge if r["score"] is None)]  # given twice, identically
    rng.shuffle(ppl)
    lines = [json.dumps(r) for r in judge]
    lines.insert(1500, "")
    (folder / "judge.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "ppl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ppl))
    (folder / "other.jsonl").write_text("".join(
        json.dumps({"id": f"o{i}", "source": "maths", "score": 0.5, "scorer": "prior"}) + "\n" for i in range(5)))
    return ["judge.jsonl", "ppl.jsonl", "other.jsonl"]


def test_columnar_report_matches_the_row_based_one_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths: the report names its inputs as given
    scores, *others = write_realistic(tmp_path)
    report = scores_report(scores, "report", compare_with=others, smoothing=SMOOTHING)
    for name in ("scores_report.json", "failures.jsonl"):
        assert (tmp_path / "report" / name).read_text() == (GOLDEN / name).read_text(), name
    assert report["failures"] == 97 and report["rank_correlation"][0]["only_b"] == 200
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")) == sorted(
        report["histograms"] + ["compare_0.png"])  # no overlap with other.jsonl: no plot


def test_table_reads_each_id_once_and_the_failed_rows_whole(tmp_path):
    write_realistic(tmp_path)
    table = read_score_table(tmp_path / "judge.jsonl")
    assert len(table.ids) == 3000 and table.repeated == 3 and len(table.failed) == int(np.isnan(table.score).sum())
    assert set(table.source.tolist()) == {"maths", "chat", "open/hermes 2.5", "?"}
    assert all(r["score"] is None and "details" in r for r in table.failed)


@pytest.mark.parametrize("text, message", [
    ('{"id": "a", "score": 0.5}\n{"id": "b"}\n', ":2: id 'b': field 'score': missing"),
    ('{"id": "a", "score": null, "source": "x"}\n{"id": "a", "score": 0.3}\n', "scored twice"),
    ('{"id": "a", "score": 0.5}\n{"id": "b", "score": 1.5}\n', ":2: id 'b': field 'score': 1.5 is outside"),
    ('{"id": "a", "score": 0.5, "source": 3}\n', ":1: id 'a': field 'source': expected a string"),
    ('{"id": "a", "score": "0.5"}\n', ":1: id 'a': field 'score': expected a number"),
    ('{"score": 0.5}\n', ":1: field 'id': missing"),
])
def test_a_bad_file_is_named_with_line_id_and_field(tmp_path, text, message):
    (tmp_path / "s.jsonl").write_text(text)
    with pytest.raises(ValueError, match=str(tmp_path / "s.jsonl").replace(".", r"\.") + ".*"):
        read_score_table(tmp_path / "s.jsonl")
    with pytest.raises(ValueError) as err:
        read_score_table(tmp_path / "s.jsonl")
    assert message in str(err.value)


def neumaier_sum(values: list[float]) -> float:
    """Python 3.12's sum() of floats, as written in CPython's bltinmodule.c."""
    total, comp = values[0], 0.0
    for x in values[1:]:
        t = total + x
        comp += (total - t) + x if abs(total) >= abs(x) else (x - t) + total
        total = t
    return total + comp if comp and math.isfinite(comp) else total


def test_builtin_sum_is_pythons_sum_bit_for_bit():
    rng = np.random.default_rng(0)
    for values in (rng.random(10_000), rng.integers(0, 100, 5000) / 99, rng.lognormal(-3, 4, 5000), np.array([0.3])):
        assert _builtin_sum(values) == sum(values.tolist())
        assert _builtin_sum(values, compensated=False) == math.fsum([0.0]) + float(np.cumsum(values)[-1])
        assert _builtin_sum(values, compensated=True) == neumaier_sum(values.tolist())


def test_report_on_200k_rows_grows_memory_by_tens_of_mb():
    """benchmarks/scores_report_memory.py, run as a user would: the report on 200k rows grew its process
    by about 82 MB as columns, 235 MB as the row-based report (a dict a row). The bound is generous
    for the columns and fails a return to rows."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "scores_report_memory.py"), "--rows", "200000",
                          "--no-compare", "--src", str(root / "src")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["rows"] == 200_000 and 0 < measured["growth_mb"] < 150, measured
