"""Multiple choice: the packaged MMLU set, local files, shuffling, log-likelihood scoring, pass@N."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from ual.evaluation.multiple_choice import (
    MCQuestion,
    evaluate_multiple_choice,
    letter_prompt,
    load_mc_file,
    load_packaged_mc,
    loglikelihoods,
    next_token_logprobs,
    shuffle_choices,
)


def test_packaged_set_has_1000_four_choice_questions():
    qs = load_packaged_mc()
    assert len(qs) == 1000 and len({q.id for q in qs}) == 1000
    assert all(len(q.choices) == 4 and all(q.choices) and q.question for q in qs)
    assert Counter("ABCD"[q.answer] for q in qs) == {"D": 270, "B": 260, "C": 247, "A": 223}
    assert not any(q.question.endswith("Answer:") for q in qs)  # choices and cue were split off
    assert [q.id for q in load_packaged_mc(limit=5)] == [q.id for q in qs[:5]]
    assert letter_prompt(qs[1]).splitlines()[-5:] == [
        "A. Directed mutation", "B. Genetic drift", "C. Adaptive radiation", "D. Disruptive selection", "Answer:"]


def _write(tmp_path, rows, name="mc.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_load_mc_file_accepts_index_and_letter(tmp_path):
    path = _write(tmp_path, [
        {"question": "1+1?", "choices": ["1", "2", "3"], "answer": 1},
        {"question": "Sky?", "choices": ["green", "blue"], "answer": "b", "id": "sky"},
    ])
    qs = load_mc_file(path)
    assert [(q.id, q.answer, len(q.choices)) for q in qs] == [("mc-1", 1, 3), ("sky", 1, 2)]
    listed = tmp_path / "mc.json"
    listed.write_text(json.dumps([{"question": "Q", "choices": ["a", "b"], "answer": "A"}]))
    assert load_mc_file(listed)[0].answer == 0


@pytest.mark.parametrize(
    "row, message",
    [
        ({"choices": ["a", "b"], "answer": 0}, r"mc.jsonl:2: missing field 'question'"),
        ({"question": "Q", "choices": "ab", "answer": 0}, r"mc.jsonl:2: field 'choices'"),
        ({"question": "Q", "choices": ["a", ""], "answer": 0}, r"mc.jsonl:2: field 'choices'"),
        ({"question": "Q", "choices": ["a", "b"], "answer": 2}, r"mc.jsonl:2: field 'answer': 2 is out of range"),
        ({"question": "Q", "choices": ["a", "b"], "answer": "C"}, r"mc.jsonl:2: field 'answer'"),
        ({"question": "Q", "choices": ["a", "b"], "answer": "maybe"}, r"mc.jsonl:2: field 'answer'"),
        ("{not json", r"mc.jsonl:2: not valid JSON"),
    ],
)
def test_load_mc_file_errors_name_file_line_and_field(tmp_path, row, message):
    path = _write(tmp_path, [{"question": "ok", "choices": ["a", "b"], "answer": 0}, row])
    with pytest.raises(ValueError, match=message):
        load_mc_file(path)


def test_shuffle_is_deterministic_and_keeps_the_right_answer():
    qs = load_packaged_mc(limit=200)
    a, b, c = shuffle_choices(qs, seed=1), shuffle_choices(qs, seed=1), shuffle_choices(qs, seed=2)
    assert a == b and a != c
    for q, s in zip(qs, a):
        assert sorted(q.choices) == sorted(s.choices) and s.choices[s.answer] == q.choices[q.answer]
    assert sum(q.answer != s.answer for q, s in zip(qs, a)) > 100  # positions really move
    assert shuffle_choices(qs[:3], seed=1) == a[:3]  # independent of the other questions


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


def test_loglikelihoods_match_unpadded_computation(tiny):
    import torch

    model, tok = tiny
    pairs = [("The cat sat on", " the mat"), ("Hi", " there, friend"), ("A much longer context here, really long", " x")]
    batched = loglikelihoods(model, tok, pairs, batch_size=3)
    for (ctx, cont), got in zip(pairs, batched):
        c = tok(ctx, add_special_tokens=False)["input_ids"]
        k = tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([c + k])).logits[0].log_softmax(-1)
        want = sum(logp[len(c) - 1 + j, t].item() for j, t in enumerate(k))
        assert got == pytest.approx(want, abs=1e-4)


def test_next_token_logprobs_left_padding_matches_unpadded(tiny):
    import torch

    model, tok = tiny
    contexts = ["Short one", "A considerably longer context that needs a lot of left padding:", "Mid length here"]
    got = next_token_logprobs(model, tok, contexts, batch_size=3)
    for ctx, lp in zip(contexts, got):
        with torch.no_grad():
            want = model(torch.tensor([tok(ctx, add_special_tokens=False)["input_ids"]])).logits[0, -1].log_softmax(-1)
        assert lp.shape == want.shape and torch.allclose(lp, want, atol=1e-4)


QS = [
    MCQuestion("q1", "Pick one.", ["red", "green", "blue", "black"], 1),
    MCQuestion("q2", "Pick another.", ["up", "down", "left", "right"], 0),
    MCQuestion("q3", "And again?", ["one", "two", "three", "four"], 1),
    MCQuestion("q4", "Yes or no?", ["yes", "no"], 1),
]


def test_letter_scores_equal_full_loglikelihoods(tiny):
    model, tok = tiny
    out = evaluate_multiple_choice(model, tok, QS, batch_size=2, n_samples=4, progress=False)
    for q, rec in zip(QS, out["records"]):
        want = loglikelihoods(model, tok, [(letter_prompt(q), f" {x}") for x in "ABCD"[: len(q.choices)]])
        assert rec["loglik"] == pytest.approx(want, abs=1e-4)
        assert rec["pred"] == "ABCD"[max(range(len(want)), key=want.__getitem__)]
    assert 0 <= out["accuracy"] <= 1 and 0 <= out["acc_norm"] <= 1
    assert out["pass@4"] == out["pass_at_n"] and len(out["records"][0]["sampled"]) == 4
    assert out["chance_accuracy"] == pytest.approx((0.25 * 3 + 0.5) / 4)


def test_a_model_that_always_says_B(tiny):
    """Bias the output to " B": every prediction is B, pass@N hits exactly the B answers."""
    import torch

    model, tok = tiny
    bias = torch.zeros(model.config.vocab_size)
    bias[tok(" B", add_special_tokens=False)["input_ids"][0]] = 50.0
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = evaluate_multiple_choice(model, tok, QS, n_samples=3, acc_norm=False, progress=False)
        shuffled = evaluate_multiple_choice(model, tok, shuffle_choices(QS, seed=3), n_samples=3, acc_norm=False,
                                            progress=False)
    finally:
        handle.remove()
    assert [r["pred"] for r in out["records"]] == ["B"] * 4
    assert out["accuracy"] == 0.75 and out["pass_at_n"] == 0.75 and out["acc_norm"] is None
    assert all(r["sampled"] == ["B"] * 3 for r in out["records"])
    assert out["expected_pass_at_n"] == pytest.approx(0.75, abs=1e-6)
    n_b = sum(q.answer == 1 for q in shuffle_choices(QS, seed=3))
    assert shuffled["accuracy"] == n_b / 4


def test_chat_format_runs(tiny):
    model, tok = tiny
    out = evaluate_multiple_choice(model, tok, QS[:2], n_samples=2, chat=True, progress=False)
    assert out["format"] == "chat" and out["n_questions"] == 2
