"""Paired comparisons from per-item results (eval/items/), on constructed run folders with known values."""

import numpy as np
import pytest

from ual.config import load_config
from ual.evaluation.compare import ModelItems, compare, run_comparisons
from ual.io import read_json, write_jsonl
from ual.runfolder import RunFolder


def _write_model(run: RunFolder, model: str, nll: list[float], tokens: list[int], sources: list[str],
                 conf: np.ndarray, correct: np.ndarray, mc_correct=None, mc_p=None):
    write_jsonl(run.items_file(model, "nll"), [
        {"id": f"h{i}", "source": s, "nll": x, "entropy": 0.0, "tokens": n}
        for i, (x, n, s) in enumerate(zip(nll, tokens, sources))])
    item = np.concatenate([np.full(n, i) for i, n in enumerate(tokens)])
    run.tokens_file(model).parent.mkdir(parents=True, exist_ok=True)
    np.savez(run.tokens_file(model), confidence=conf, correct=correct, item=item)
    if mc_correct is not None:
        write_jsonl(run.items_file(model, "mc"), [
            {"id": f"q{i}", "correct": c, "p_gold": p, "confidence": max(p, 0.5)}
            for i, (c, p) in enumerate(zip(mc_correct, mc_p))])


def _folder(tmp_path, shift=0.0):
    run = RunFolder(tmp_path / "run")
    tokens = [3, 2, 4, 1, 2, 3]
    sources = ["maths", "maths", "maths", "chat", "chat", "chat"]
    n_tok = sum(tokens)
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.2, 0.9, n_tok)
    correct = rng.uniform(size=n_tok) < conf
    base_nll = [3.0, 2.0, 5.0, 1.5, 4.0, 6.0]
    _write_model(run, "sft", base_nll, tokens, sources, conf, correct, [True, False, True, False], [0.6, 0.2, 0.7, 0.3])
    # ual: every sample's NLL sum lower by `shift` per token; overconfident by +0.1; MC one more right
    _write_model(run, "ual", [x - shift * n for x, n in zip(base_nll, tokens)], tokens, sources,
                 np.clip(conf + 0.1, 0, 1), correct, [True, True, True, False], [0.6, 0.6, 0.7, 0.3])
    return run, tokens, base_nll


def test_differences_equal_hand_computation(tmp_path):
    run, tokens, base = _folder(tmp_path, shift=0.25)
    rows = compare(ModelItems([run], "ual"), ModelItems([run], "sft"), n_boot=300)
    # Token-weighted NLL: every token 0.25 lower -> exactly -0.25 in every group, with a zero-width interval.
    for group in ("nll/all", "nll/maths", "nll/chat"):
        assert rows[group]["estimate"] == pytest.approx(-0.25)
        assert rows[group]["low"] == pytest.approx(-0.25) and rows[group]["high"] == pytest.approx(-0.25)
        assert rows[group]["excludes_zero"] and rows[group]["better"] == "lower"
    assert rows["mc/accuracy"]["estimate"] == pytest.approx(0.25)
    assert rows["mc/p_gold"]["estimate"] == pytest.approx(0.1)
    assert rows["mc/p_gold"]["better"] == "higher" and rows["mc/ece"]["better"] == "lower"
    assert set(rows) >= {"ece/all", "ece/maths", "ece/chat", "mc/ece"}


def test_identical_models_differ_by_exactly_zero(tmp_path):
    run, *_ = _folder(tmp_path)
    rows = compare(ModelItems([run], "sft"), ModelItems([run], "sft"), n_boot=200)
    for name, r in rows.items():
        assert r["estimate"] == pytest.approx(0) and not r["excludes_zero"], name


def test_buckets_and_run_comparisons(tmp_path):
    run, *_ = _folder(tmp_path, shift=0.1)
    u = {f"h{i}": x for i, x in enumerate([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])}
    rows = compare(ModelItems([run], "ual"), ModelItems([run], "sft"), u=u, n_buckets=2, n_boot=200)
    assert rows["nll/u-q1"]["estimate"] == pytest.approx(-0.1) and "ece/u-q2" in rows
    # Through the run folder: heldout_scores.jsonl from the scorer of scores.jsonl gives the buckets.
    write_jsonl(run.scores, [{"id": "t0", "source": "maths", "score": 0.5, "scorer": "entropy:m"}])
    write_jsonl(run.heldout_scores, [{"id": k, "source": "x", "score": v, "scorer": "entropy:m"} for k, v in u.items()])
    cfg = load_config(None, {"run_dir": str(run.root), "eval.models": ["sft", "ual"], "eval.u_buckets": 2,
                             "eval.bootstrap": 200, "eval.compare": ["ual:sft", "ual:ls"]})
    out = run_comparisons(cfg)
    assert set(out["pairs"]) == {"ual:sft"}  # ls was not evaluated: that pair is left out
    saved = read_json(run.comparisons)
    assert saved["settings"]["u_scorer"] == "entropy:m"
    buckets = saved["buckets"]["models"]["sft"]
    assert [b["items"] for b in buckets] == [3, 3]
    assert buckets[0]["sources"] == {"maths": 3}
    assert buckets[0]["nll"] == pytest.approx((3.0 + 2.0 + 5.0) / 9)


def test_seed_folders_pool_per_item(tmp_path):
    a, *_ = _folder(tmp_path / "s0", shift=0.2)
    b, *_ = _folder(tmp_path / "s1", shift=0.4)
    rows = compare(ModelItems([a, b], "ual"), ModelItems([a, b], "sft"), n_boot=200)
    assert rows["nll/all"]["estimate"] == pytest.approx(-0.3)  # token-weighted over both seeds
    assert rows["nll/all"]["n"] == 6  # items, not items x seeds
