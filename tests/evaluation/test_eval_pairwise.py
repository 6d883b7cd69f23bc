"""Pairwise win rate: both orders, ties, invalid verdicts, length control, the two judges, export."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ual.evaluation.pairwise import (
    LocalPairwiseJudge,
    OpenAIPairwiseJudge,
    export_alpaca_eval,
    length_controlled_win_rate,
    pairwise_win_rate,
    parse_verdict,
)


@pytest.mark.parametrize("text, verdict", [
    ("A", "A"), (" b.", "B"), ("Response A", "A"), ("[[B]]", "B"), ("Tie", "tie"), ("tie.", "tie"),
    ("I prefer Response B because it is clearer.", "B"), ("Both Response A and Response B are fine", None),
    ("", None), (None, None), ("maybe", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def _quality_judge(instruction, a, b):
    """Prefers the answer that says 'good'; tie when both or neither do."""
    ga, gb = "good" in a, "good" in b
    return "tie" if ga == gb else "A" if ga else "B"


def test_win_rate_counts_wins_losses_ties():
    instr = [f"q{i}" for i in range(5)]
    a = ["good", "good", "bad", "good", "bad"]
    b = ["bad", "good", "good", "bad", "bad"]
    out = pairwise_win_rate(instr, a, b, _quality_judge)
    assert (out["wins"], out["losses"], out["ties"]) == (2, 1, 2)
    assert out["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5) / 5)
    assert out["position_consistency"] == 1.0 and out["n_invalid"] == 0
    assert [r["preference_a"] for r in out["records"]] == [1.0, 0.5, 0.0, 1.0, 0.5]


def test_both_orders_cancel_position_bias():
    first = lambda i, a, b: "A"  # noqa: E731 - always picks whatever is shown first
    out = pairwise_win_rate(["q"] * 4, ["x"] * 4, ["y y"] * 4, first)
    assert out["win_rate"] == 0.5 and out["ties"] == 4 and out["first_position_rate"] == 1.0
    assert out["position_consistency"] == 0.0
    one_order = pairwise_win_rate(["q"] * 4, ["x"] * 4, ["y"] * 4, first, both_orders=False)
    assert one_order["win_rate"] == 1.0  # what a single order would have claimed


def test_invalid_verdicts_are_excluded_and_counted():
    judge = lambda i, a, b: None if i == "broken" else _quality_judge(i, a, b)  # noqa: E731
    out = pairwise_win_rate(["broken", "ok"], ["good", "good"], ["bad", "bad"], judge)
    assert out["n_invalid"] == 1 and out["n_valid"] == 1 and out["win_rate"] == 1.0
    none = pairwise_win_rate(["broken"], ["a"], ["b"], judge)
    assert none["win_rate"] is None and none["lc_win_rate"] is None


def _noisy_length_judge(instruction, a, b):
    """Prefers the longer answer, flipped for ~30% of (instruction, order) pairs; no quality signal."""
    flip = int(hashlib.sha256(f"{instruction}|{a}|{b}".encode()).hexdigest(), 16) % 10 < 3
    longer_first = len(a.split()) > len(b.split())
    return "A" if longer_first != flip else "B"


def test_length_control_removes_a_pure_length_preference():
    n = 600
    instr = [f"q{i}" for i in range(n)]
    # model A is longer in 80% of instructions, by 1..20 words
    a = [" ".join(["w"] * (10 + (i % 20 + 1 if i % 5 else -(i % 20 + 1)))) for i in range(n)]
    b = [" ".join(["w"] * 10)] * n
    out = pairwise_win_rate(instr, a, b, _noisy_length_judge)
    assert out["win_rate"] > 0.58  # the judge's length bias inflates A
    assert abs(out["lc_win_rate"] - 0.5) < 0.08 and out["lc_method"].startswith("logistic")


def test_length_control_keeps_a_quality_preference():
    prefs = [1.0] * 70 + [0.0] * 30
    diffs = [(-1) ** i * (i % 7) for i in range(100)]  # lengths unrelated to preference
    lc, method = length_controlled_win_rate(prefs, diffs)
    assert lc == pytest.approx(0.7, abs=0.05) and method.startswith("logistic")
    assert length_controlled_win_rate([1.0, 1.0], [3, 5]) == (1.0, "raw (no length spread or one outcome class)")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


def test_local_judge_reads_the_letter_probabilities(tiny):
    import torch

    model, tok = tiny
    judge = LocalPairwiseJudge(model, tok, batch_size=2)
    triples = [("Say hi", "hi", "hello there"), ("Add 2+2", "4", "5"), ("Name a colour", "blue", "a dog")]
    margins = judge.margins(triples)
    assert all(isinstance(m, float) and m != 0 for m in margins)
    assert judge.judge_many(triples) == [judge(*t) for t in triples] == ["A" if m > 0 else "B" for m in margins]
    # strongly bias the letter "A": every verdict is A, so both orders make every instruction a tie
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.convert_tokens_to_ids("A")] = 30.0
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = pairwise_win_rate([t[0] for t in triples], [t[1] for t in triples], [t[2] for t in triples], judge)
    finally:
        handle.remove()
    assert out["win_rate"] == 0.5 and out["ties"] == 3 and out["first_position_rate"] == 1.0
    assert LocalPairwiseJudge(model, tok, tie_margin=1e9)("q", "a", "b") == "tie"


class _Judge(BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        prompt = body["messages"][-1]["content"]
        a = prompt.split("[Response A]")[1].split("[Response B]")[0]
        text = "Response A" if "good" in a else "B"
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_judge_against_a_local_server(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        judge = OpenAIPairwiseJudge("judge-model", base_url=url, cache_path=tmp_path / "cache.sqlite")
        out = pairwise_win_rate(["q1", "q2", "q3"], ["good", "bad", "good"], ["bad", "good", "good"], judge)
        assert (out["wins"], out["losses"], out["ties"]) == (1, 1, 1) and out["win_rate"] == 0.5
        calls = _Judge.calls
        assert calls == 5  # q3 shows the same two answers in both orders: one prompt, asked once
        again = pairwise_win_rate(["q1", "q2", "q3"], ["good", "bad", "good"], ["bad", "good", "good"], judge)
        assert again["win_rate"] == 0.5 and _Judge.calls == calls  # every answer came from the cache
    finally:
        server.shutdown()
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIPairwiseJudge("gpt-4o")


def test_export_alpaca_eval(tmp_path):
    path = tmp_path / "out" / "model_outputs.json"
    assert export_alpaca_eval(path, ["q1", "q2"], ["a1", "a2"], generator="ual-smollm2") == 2
    rows = json.loads(path.read_text())
    assert rows == [{"instruction": "q1", "output": "a1", "generator": "ual-smollm2"},
                    {"instruction": "q2", "output": "a2", "generator": "ual-smollm2"}]
    with pytest.raises(ValueError):
        export_alpaca_eval(path, ["q"], [], generator="g")
