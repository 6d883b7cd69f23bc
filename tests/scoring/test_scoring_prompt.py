"""The judge prompt, the answer parser and the expected score from top log-probabilities."""

import math

import pytest

from ual.scoring.prompt import PROMPT_VERSION, default_prompt, expected_score, load_prompt, parse_answer

GOOD = [
    ("73", 73, True), ("0", 0, True), ("99", 99, True), ("  42\n", 42, True), ("Score: 73", 73, True),
    ("score=12", 12, True), ("Rating: 5", 5, True), ("Score: 05", 5, True),
    ("**73**", 73, False), ("73.", 73, False), ('"64"', 64, False), ("I would rate this 73/99.", 73, False),
    ("I'd rate this 73 out of 100", 73, False), ("The score is 42. It is creative writing.", 42, False),
    ("This falls in the 70-99 range; score: 85", 85, False), ("On a scale from 0 to 99: 30", 30, False),
    ("42 42", 42, False), ("72.5", 72.5, False), ("Score: **81**", 81, False),
    ("I cannot be sure, but I would rate this 40.", 40, False), ("Uncertainty: 88\n\nReason: open chat.", 88, False),
    # reasoning models served without a reasoning parser: the numbers in the thinking are not the score
    ("<think>A score of 40? Or 60, since 3 answers fit.</think>\n\n55", 55, True),
    ("<think>\nscore 10\n</think>Score: 72", 72, True),
    ("<|channel|>analysis<|message|>Maybe 30.<|end|><|start|>assistant<|channel|>final<|message|>81", 81, True),
]

BAD = [
    ("", "empty"), ("   ", "empty"), (None, "empty"), ("banana", "no number"), ("Score:", "no number"),
    ("100", "out of range"), ("Score: 150", "out of range"), ("-5", "out of range"), ("999", "out of range"),
    ("7/10", "wrong scale"), ("Score: 7/10", "wrong scale"), ("8 out of 10", "wrong scale"),
    ("I'm sorry, but I cannot rate this.", "refusal"), ("As an AI I cannot provide a score from 0 to 99.", "refusal"),
    ("I apologize, I am unable to determine that.", "refusal"), ("I'm sorry, 50", "refusal"),
    ("40 or 60", "ambiguous"), ("The answer is 42, but 3 turns.", "ambiguous"),
    ("Score: 70-80", "range"), ("between 40 and 60", "range"), ("<html>{{{", "no number"),
    ("<think>The score is 40 because", "cut short while reasoning"),  # max_tokens spent thinking
    ("<think>Score: 40</think>", "after its reasoning: empty"), ("<think>40</think> 150", "out of range"),
]


@pytest.mark.parametrize("text,value,strict", GOOD)
def test_parse_good(text, value, strict):
    p = parse_answer(text)
    assert p.error is None and p.value == value and p.strict is strict
    s, e = p.span
    assert float(text[s:e]) == value


@pytest.mark.parametrize("text,why", BAD)
def test_parse_bad_is_a_failure_with_a_reason(text, why):
    p = parse_answer(text)
    assert p.value is None and why in p.error


def test_prompt_is_versioned_and_sees_every_turn():
    p = default_prompt()
    assert p.version == PROMPT_VERSION
    msgs = [{"role": "system", "content": "be nice"}, {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "FINAL"}]
    rendered, cut = p.render(msgs)
    user = rendered[-1]["content"]
    assert cut == 0 and rendered[0]["role"] == "system"
    for m in msgs:
        assert m["content"] in user
    assert "70-99" in user and "40-69" in user and "0-39" in user


def test_long_conversation_loses_its_middle_and_says_so():
    p = default_prompt()
    text = "A" * 10000 + "MIDDLE" + "Z" * 10000
    rendered, cut = p.render([{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}])
    user = rendered[-1]["content"]
    assert cut > 0 and "MIDDLE" not in user and f"{cut} characters omitted" in user
    assert user.count("A") > 1000 and "ok" in user


def test_prompt_file_override_changes_the_version(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("version: mine\nsystem: terse\nScore this: {conversation}\nOne integer.")
    p = load_prompt(f)
    assert p.version.startswith("mine+") and p.system == "terse"
    assert "Score this: ### User:\nhi" in p.render([{"role": "user", "content": "hi"}])[0][-1]["content"]
    f.write_text("version: mine\nsystem: terse\nRate: {conversation}")
    assert load_prompt(f).version != p.version  # same declared name, different text: different cache key
    f.write_text("no placeholder")
    with pytest.raises(ValueError, match="conversation"):
        load_prompt(f)


def _tok(token, alts):
    return {"token": token, "logprob": math.log(dict(alts).get(token, 1e-9)),
            "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alts]}


def test_expected_whole_number_tokens():
    content = [_tok("70", [("70", 0.5), ("80", 0.3), ("60", 0.1), ("Sorry", 0.1)])]
    e = expected_score(content, "70", (0, 2))
    assert e["expected"] == pytest.approx((0.5 * 70 + 0.3 * 80 + 0.1 * 60) / 0.9)
    assert e["numeric_mass"] == pytest.approx(0.9) and e["method"] == "whole-number"


def test_expected_digit_by_digit():
    # tens: 7 (0.6) / 8 (0.4); after "7": units 3 (0.5) / 0 (0.25) / end (0.25)
    content = [_tok("7", [("7", 0.6), ("8", 0.4)]), _tok("3", [("3", 0.5), ("0", 0.25), ("<|im_end|>", 0.25)])]
    units = 0.5 * 3 + 0.25 * 0
    v7 = 0.25 * 7 + 0.75 * 70 + units
    v8 = 0.25 * 8 + 0.75 * 80 + units
    e = expected_score(content, "73", (0, 2))
    assert e["expected"] == pytest.approx(0.6 * v7 + 0.4 * v8) and e["method"] == "digit-by-digit"


def test_expected_single_digit_answer_at_end_of_stream():
    content = [_tok("5", [("5", 0.8), ("6", 0.2)])]
    assert expected_score(content, "5", (0, 1))["expected"] == pytest.approx(5.2)


def test_expected_with_prefix_tokens_and_glued_space():
    content = [_tok("Score", [("Score", 1.0)]), _tok(":", [(":", 1.0)]), _tok(" 4", [(" 4", 0.5), (" 6", 0.5)]),
               _tok("0", [("0", 1.0)])]
    e = expected_score(content, "Score: 40", (7, 9))
    assert e["expected"] == pytest.approx(50.0)


def test_expected_none_when_tokens_do_not_spell_the_answer():
    assert expected_score([_tok("7", [("7", 1.0)])], "73", (0, 2)) is None
    assert expected_score([_tok("7", [("Sorry", 1.0)])], "7", (0, 1)) is None  # no numeric alternative
