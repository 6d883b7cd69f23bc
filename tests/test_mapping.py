"""The map stage and the eps join, directly: run_map on a run folder built by hand, and
eps_for_mode giving each training sample its own eps whatever the file order."""

import random

import numpy as np
import pytest

from ual.config import load_config
from ual.io import read_json, read_jsonl, write_jsonl
from ual.mapping import run_map
from ual.runfolder import RunFolder
from ual.sample import Sample
from ual.smoothing import map_to_smoothing, normalize_scores
from ual.training.columns import read_smoothing
from ual.training.stage import eps_for_mode


def _run(tmp_path, normalize="rank", target=0.2):
    samples = [Sample.create("maths" if i % 2 else "chat", [{"role": "user", "content": f"q{i}"},
                                                           {"role": "assistant", "content": f"a{i}"}])
               for i in range(10)]
    scores = [0.05 + 0.09 * i for i in range(10)]
    cfg = load_config(None, {"run_dir": str(tmp_path / "run"), "smoothing.normalize": normalize,
                             "smoothing.target_mean": target})
    run = RunFolder(cfg.run_path)
    run.root.mkdir(parents=True)
    write_jsonl(run.samples, [s.to_dict() for s in samples])
    rows = [{"id": s.id, "source": s.source, "score": x, "scorer": "hand", "details": {}} for s, x in zip(samples, scores)]
    random.Random(0).shuffle(rows)  # the join is by id, never by position
    write_jsonl(run.scores, rows)
    return cfg, run, samples, scores


@pytest.mark.parametrize("normalize", ["max", "minmax", "rank"])
def test_run_map_writes_the_pure_map_joined_by_id(tmp_path, normalize):
    cfg, run, samples, scores = _run(tmp_path, normalize)
    run_map(cfg)
    rows = {r["id"]: r for r in read_jsonl(run.smoothing)}
    expected = map_to_smoothing(normalize_scores(scores, normalize), 0.2)
    assert [rows[s.id]["eps"] for s in samples] == pytest.approx(list(expected))
    assert [rows[s.id]["score"] for s in samples] == pytest.approx(scores)
    assert np.mean([r["eps"] for r in rows.values()]) == pytest.approx(0.2)
    stats = read_json(run.smoothing_stats)
    (pair,) = stats["separation"]
    assert {pair["high"], pair["low"]} == {"chat", "maths"}


def test_eps_join_per_mode(tmp_path):
    cfg, run, samples, scores = _run(tmp_path)
    run_map(cfg)
    by_id = {r["id"]: r["eps"] for r in read_jsonl(run.smoothing)}
    table = read_smoothing(run)
    order = [s.id for s in reversed(samples)]  # training order differs from the file's
    assert eps_for_mode("sft", order, cfg, table, run).tolist() == [0.0] * 10
    assert eps_for_mode("ls", order, cfg, table, run).tolist() == [0.2] * 10
    assert eps_for_mode("ual", order, cfg, table, run).tolist() == [by_id[i] for i in order]
    assert eps_for_mode("ual+dft", order, cfg, table, run).tolist() == [by_id[i] for i in order]
    assert eps_for_mode("dft", order, cfg, table, run).tolist() == [0.0] * 10
    stranger = Sample.create("chat", [{"role": "user", "content": "new"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match=r"1 training samples have no eps .* \(first: " + stranger.id):
        eps_for_mode("ual", order + [stranger.id], cfg, table, run)
    with pytest.raises(ValueError, match="unknown training mode"):
        eps_for_mode("nope", order, cfg, table, run)
    assert eps_for_mode("ppl", order, cfg, None) is None  # the trainer's eps_fn computes each batch's
    with pytest.raises(ValueError, match="needs the smoothing map"):
        eps_for_mode("ual", order, cfg, None)
