"""Maths word problems (GSM8K, MetaMath): final-answer extraction and exact numeric match.

The final answer of a response is, in this order:
1. the first number after the last `####` (GSM8K's convention),
2. the number after the last "the answer is" / "answer:" / `\\boxed{...}` (MetaMath's),
3. the last number anywhere in the text.

Numbers are compared as exact rationals (`fractions.Fraction`), never as
strings or substrings: "18" does not match "180", "3.50" matches "3.5",
"1,000" matches "1000", "$5" matches "5.00", "-0" matches "0". The paper's
reference code counted a hit when the gold number appeared anywhere in the
response; that rule is reported beside the exact one as
`substring_match_accuracy`, for comparison only.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A number: optional sign, thousands groups "1,234,567" or plain digits, an optional
# decimal part, or ".5"; optionally a fraction "a/b". Not preceded by a letter,
# digit or point, so "x2", "v1.2" and the "3" of "5-3" (a minus between numbers)
# are read sensibly.
_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER_RE = re.compile(rf"(?<![\w.])(-?)(?:\$\s*)?((?:{_UNSIGNED})(?:\s*/\s*(?:{_UNSIGNED}))?)")
_MARKERS = [
    re.compile(r"####"),
    re.compile(r"\\boxed\s*\{"),
    re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?", re.IGNORECASE),
]
MATHS_SOURCES = ("gsm8k", "metamath")  # the held-out sources whose samples carry a gold final answer
_DASHES = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\uff0d": "-"}


def _clean(text: str) -> str:
    for dash, minus in _DASHES.items():
        text = text.replace(dash, minus)
    # "$-5" and "- 5" read as -5; "5 %" as 5.
    return re.sub(r"\$\s*-", "-$", text)


def parse_number(text: str) -> Fraction | None:
    """The exact value of a number string ("1,000", "$3.50", "-0", "3/4", "50%"), else None."""
    if text is None:
        return None
    s = _clean(str(text)).strip().rstrip(".").strip()
    s = s.replace("$", "").replace(",", "").rstrip("%").strip()
    if s.startswith("+"):
        s = s[1:]
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*-?(?:\d+(?:\.\d+)?|\.\d+))?", s):
        return None
    try:
        if "/" in s:
            num, den = (Fraction(part.strip()) for part in s.split("/"))
            return None if den == 0 else num / den
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: Fraction) -> str:
    """Canonical text for an exact value: "1000", "3.5", "-0.25", or "1/3" when not a finite decimal."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    if den != 1:  # not a terminating decimal
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    scaled = value * 10**digits
    sign = "-" if scaled < 0 else ""
    body = str(abs(scaled.numerator)).rjust(digits + 1, "0")
    return f"{sign}{body[:-digits]}.{body[-digits:]}"


def find_numbers(text: str) -> list[str]:
    """Every number in `text`, as matched (sign kept, "$" and spaces dropped)."""
    return [sign + body.replace(" ", "") for sign, body in NUMBER_RE.findall(_clean(text))]


def extract_final_answer(text: str | None) -> str | None:
    """The final numeric answer of a response, canonicalised (see module doc), or None."""
    if not text:
        return None
    text = _clean(text)
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            numbers = find_numbers(text[hits[-1].end() :])
            if numbers:
                return _canonical(numbers[0])
    numbers = find_numbers(text)
    return _canonical(numbers[-1]) if numbers else None


def _canonical(number: str) -> str | None:
    value = parse_number(number)
    return None if value is None else format_number(value)


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Exact numeric equality of two answers; non-numeric golds compare as trimmed, case-folded text."""
    if pred is None or gold is None:
        return False
    p, g = parse_number(pred), parse_number(gold)
    if g is None:
        return str(pred).strip().casefold() == str(gold).strip().casefold()
    return p is not None and p == g


def gold_answer(sample) -> str:
    """A sample's gold final answer: meta["answer"], or the `####` line of its reference response."""
    gold = sample.meta.get("answer")
    if gold is None:
        gold = extract_final_answer(sample.final_response) if "####" in sample.final_response else None
    if gold is None or str(gold).strip() == "":
        raise ValueError(f"sample {sample.id} ({sample.source}) has no gold answer in meta['answer']")
    value = parse_number(str(gold))
    return format_number(value) if value is not None else str(gold).strip()


def substring_match(response: str, gold: str) -> bool:
    """The paper's reference rule (a defect, kept for comparison): gold appears anywhere in the text."""
    return str(gold) in (response or "")


def maths_samples(ec, heldout) -> list:
    """The held-out maths samples GSM8K's exact match is measured on (ec: EvalConfig)."""
    return [s for s in heldout if s.source in MATHS_SOURCES and "answer" in s.meta][: ec.gsm8k_limit]


def maths_summary(records: list[dict], max_new_tokens: int) -> dict:
    """Greedy accuracy (exact and substring) over per-question records (one process's, or merged shards')."""
    correct, total = sum(r["correct"] for r in records), len(records)
    return {
        "n_questions": total,
        "correct": correct,
        "accuracy": correct / total,
        "substring_match_accuracy": sum(substring_match(r["prediction"], r["gold"]) for r in records) / total,
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
    }


def evaluate_maths(
    model,
    tokenizer,
    samples,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    n: int = 1,
    temperature: float = 0.7,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Greedy accuracy on `samples` (and, with do_sample, pass@n over n sampled answers each).

    Returns {"n_questions", "correct", "accuracy", "substring_match_accuracy",
    "records": [{id, prediction, extracted, gold, correct}]} and, when sampling,
    also {"n", "pass@n", "pass_at_n", "sample_accuracy", "temperature"} with each
    record's "samples": [{prediction, extracted, correct}]. sample_accuracy is the
    mean over all sampled answers (the unbiased pass@1 estimate).
    """
    from ual.evaluation.generate import generate_answers

    samples = list(samples)
    if not samples:
        raise ValueError("no maths samples to evaluate")
    golds = [gold_answer(s) for s in samples]
    prompts = [s.prompt_messages for s in samples]
    greedy = generate_answers(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    records = []
    for s, gold, text in zip(samples, golds, greedy):
        extracted = extract_final_answer(text)
        records.append(
            {"id": s.id, "prediction": text, "extracted": extracted, "gold": gold, "correct": answers_match(extracted, gold)}
        )
    total = len(records)
    result = maths_summary(records, max_new_tokens)
    if do_sample:
        sampled = generate_answers(
            model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=True,
            temperature=temperature, num_return_sequences=n, seed=seed, progress=progress,
        )
        hits, draws = 0, 0
        for rec, answers in zip(records, sampled):
            answers = answers if isinstance(answers, list) else [answers]
            rec["samples"] = []
            for text in answers:
                extracted = extract_final_answer(text)
                ok = answers_match(extracted, rec["gold"])
                rec["samples"].append({"prediction": text, "extracted": extracted, "correct": ok})
                draws += ok
            hits += any(x["correct"] for x in rec["samples"])
        result.update(
            {
                "n": n,
                "temperature": temperature,
                "seed": seed,
                f"pass@{n}": hits / total,
                "pass_at_n": hits / total,
                "sample_accuracy": draws / (total * n),
            }
        )
    result["records"] = records
    return result
