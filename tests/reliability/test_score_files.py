"""`ual map` on malformed score files, driven through the CLI.

Every case starts from a run folder holding the real outputs of a good `ual data` + `ual map`
run, then replaces scores.jsonl with a bad one. For each: exit 2 with one line naming the file,
the line, the id and the field; scores.jsonl and samples.jsonl byte-for-byte unchanged; and the
folder's config.yaml, smoothing.jsonl and smoothing_stats.json as they were (a failed stage records
nothing: ual/lineage.py; the report and `ual train` say the smoothing was made from other scores).
"""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from ual.cli import main
from ual.io import read_json, read_jsonl

UNKNOWN = "0000ffff0000ffff"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("scores")
    src = tmp / "chat.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completion": f"Answer {i}."}) + "\n"
                           for i in range(8)))
    cfg = tmp / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "model": "smollm2-135m",
                                   "data": {"sources": [{"name": str(src), "heldout": 2}]}}))
    assert main(["data", str(cfg)]) == 0
    run = tmp / "run"
    (run / "scores.jsonl").write_bytes(lines(good_rows(run)))
    assert main(["map", str(cfg)]) == 0
    assert (run / "smoothing.jsonl").exists() and (run / "smoothing_stats.json").exists()
    return run


def assert_map_outputs_as_before(run, good_run):
    for name in ("config.yaml", "smoothing.jsonl", "smoothing_stats.json", "lineage.json"):
        assert (run / name).read_bytes() == (good_run / name).read_bytes(), name


def good_rows(run) -> list:
    ids = [r["id"] for r in read_jsonl(run / "samples.jsonl")]
    return [{"id": i, "source": "chat", "score": (k + 1) / len(ids), "scorer": "test", "details": {}}
            for k, i in enumerate(ids)]


def lines(rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def with_row(rows, index, **change):
    rows = [dict(r) for r in rows]
    rows[index].update(change)
    for key in [k for k, v in change.items() if v is DROP]:
        del rows[index][key]
    return rows


DROP = object()


def raw(row: dict, score: str) -> bytes:
    """A row whose score is JSON text json.dumps would not write (NaN, Infinity)."""
    return json.dumps({k: v for k, v in row.items() if k != "score"})[:-1].encode() + f', "score": {score}}}'.encode()


# (case, rows -> file content, extra flags, fragments of the message; {f} file, {id0}/{id1} ids of rows 1/2)
CASES = [
    ("duplicate-id-different-scores", lambda r: lines(r + [dict(r[0], score=0.9)]), [],
     ["{f}: id '{id0}' is scored twice with different scores", "at line 1", "at line 7"]),
    ("score-is-a-string", lambda r: lines(with_row(r, 1, score="0.5")), [],
     ["{f}:2: id '{id1}': field 'score': expected a number in [0, 1] or null, got the string '0.5'"]),
    ("score-is-true", lambda r: lines(with_row(r, 1, score=True)), [], ["{f}:2: id '{id1}': field 'score'", "got true"]),
    ("score-is-false", lambda r: lines(with_row(r, 1, score=False)), [], ["{f}:2: id '{id1}': field 'score'", "got false"]),
    ("score-is-a-list", lambda r: lines(with_row(r, 1, score=[0.5])), [], ["{f}:2: id '{id1}': field 'score'", "got list"]),
    ("unknown-id-besides-all-samples", lambda r: lines(r + [dict(r[0], id=UNKNOWN)]), [],
     ["{f}: 1 of 7 scored ids match no training sample", f"'{UNKNOWN}' (line 7)"]),
    ("unknown-id-hidden-by-missing-drop", lambda r: lines(with_row(r, 1, id=UNKNOWN)), ["--smoothing.missing", "drop"],
     ["{f}: 1 of 6 scored ids match no training sample", f"'{UNKNOWN}' (line 2)"]),
    ("unknown-id-hidden-by-missing-mean", lambda r: lines(with_row(r, 1, id=UNKNOWN)), ["--smoothing.missing", "mean"],
     ["{f}: 1 of 6 scored ids match no training sample", f"'{UNKNOWN}' (line 2)"]),
    ("id-field-missing", lambda r: lines(with_row(r, 2, id=DROP)), [], ["{f}:3: field 'id': missing"]),
    ("id-is-null", lambda r: lines(with_row(r, 2, id=None)), [], ["{f}:3: field 'id': missing"]),
    ("id-is-a-number", lambda r: lines(with_row(r, 2, id=17)), [], ["{f}:3: field 'id': expected a string, got int"]),
    ("score-field-missing", lambda r: lines(with_row(r, 1, score=DROP)), [], ["{f}:2: id '{id1}': field 'score': missing"]),
    ("score-is-nan", lambda r: lines([r[0], raw(r[1], "NaN")] + r[2:]), [],
     ["{f}:2: id '{id1}': field 'score': nan is not a finite number"]),
    ("score-is-infinity", lambda r: lines([r[0], raw(r[1], "Infinity")] + r[2:]), [],
     ["{f}:2: id '{id1}': field 'score': inf is not a finite number"]),
    ("score-is-negative", lambda r: lines(with_row(r, 1, score=-0.1)), [],
     ["{f}:2: id '{id1}': field 'score': -0.1 is outside [0, 1]"]),
    ("score-above-one", lambda r: lines(with_row(r, 1, score=1.5)), [],
     ["{f}:2: id '{id1}': field 'score': 1.5 is outside [0, 1]"]),
    ("not-json", lambda r: lines([r[0], b'{"id": "x", "score": 0.', *r[2:]]), [], ["{f}:2: not valid JSON"]),
    ("not-an-object", lambda r: lines([r[0], b"[0.5]", *r[2:]]), [], ["{f}:2: expected a JSON object, got list"]),
    ("not-utf8", lambda r: lines([r[0], json.dumps(r[1]).encode()[:-1] + b', "note": "\xff"}', *r[2:]]), [],
     ["{f}:2: field 'note': invalid UTF-8 byte 0xff"]),
    ("empty-file", lambda r: b"", [], ["{f}: no score rows"]),
    ("blank-lines-only", lambda r: b"\n\n  \n", [], ["{f}: no score rows"]),
    ("all-scores-equal-under-minmax", lambda r: lines([dict(x, score=0.5) for x in r]), ["--smoothing.normalize", "minmax"],
     ["normalize minmax: all 6 scores equal 0.5"]),
]


def run_map(capsys, tmp_path, good_run, content, flags=()):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    scores = run / "scores.jsonl"
    if content is None:
        scores.unlink()
    else:
        scores.write_bytes(content)
    samples = (run / "samples.jsonl").read_bytes()
    code = main(["map", str(run), *flags])
    err = capsys.readouterr().err
    assert (run / "samples.jsonl").read_bytes() == samples
    if content is not None:
        assert scores.read_bytes() == content
    return run, code, err


@pytest.mark.parametrize("make,flags,fragments", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_score_file_is_a_clear_error(tmp_path, capsys, good_run, make, flags, fragments):
    rows = good_rows(good_run)
    run, code, err = run_map(capsys, tmp_path, good_run, make(rows), flags)
    assert code == 2 and "Traceback" not in err
    [message] = [x for x in err.splitlines() if x.startswith("ual map: error: ")]
    for fragment in fragments:
        assert fragment.format(f=run / "scores.jsonl", id0=rows[0]["id"], id1=rows[1]["id"]) in message
    assert_map_outputs_as_before(run, good_run)


def test_missing_score_file_says_which_stage_to_run(tmp_path, capsys, good_run):
    run, code, err = run_map(capsys, tmp_path, good_run, None)
    assert code == 2 and f"{run / 'scores.jsonl'} not found: run `ual score`" in err
    assert_map_outputs_as_before(run, good_run)


def test_identical_repeated_rows_are_counted_once(tmp_path, capsys, caplog, good_run):
    rows = good_rows(good_run)
    run, code, err = run_map(capsys, tmp_path, good_run, lines(rows + [rows[3]]))
    assert code == 0, err
    assert read_json(run / "smoothing_stats.json")["repeated_score_rows"] == 1
    assert len(read_jsonl(run / "smoothing.jsonl")) == len(rows)
    assert "1 rows repeat an earlier row" in caplog.text


def test_unscored_samples_follow_the_missing_policy(tmp_path, capsys, good_run):
    """null is how `ual score` marks a sample it could not score: allowed, and counted as missing."""
    rows = good_rows(good_run)
    content = lines(with_row(rows, 1, score=None))
    run, code, err = run_map(capsys, tmp_path, good_run, content)
    assert code == 2 and "1 of 6 training samples have no score" in err
    assert_map_outputs_as_before(run, good_run)
    run, code, err = run_map(capsys, tmp_path / "drop", good_run, content, ["--smoothing.missing", "drop"])
    assert code == 0, err
    assert read_json(run / "smoothing_stats.json")["missing"] == 1
    assert len(read_jsonl(run / "smoothing.jsonl")) == 5
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["smoothing"]["missing"] == "drop"
