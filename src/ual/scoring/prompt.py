"""The judge prompt (versioned), the answer parser, and the expected score from log-probabilities.

Why a version: every cached judge answer is keyed by it, so editing the prompt
must change the key. The built-in prompt is "uncertainty-v1"; a prompt file
gets "<its declared version or 'custom'>+<hash of its text>", so two different
files can never share cache entries even when they declare the same name.

Why a strict format with a tolerant fallback: strong judges answer "73" as
told; weaker ones say "Score: 73", "**73**" or "I'd rate this 73/99". Those
are accepted (and flagged non-strict). Refusals, out-of-range numbers, numbers
on another scale, several different numbers and garbage are failures with a
reason: the caller retries them and finally lists them. There is no default.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PROMPT_VERSION = "uncertainty-v1"
SCORE_MIN, SCORE_MAX = 0, 99

SYSTEM = "You are a careful data annotator. You answer with a single integer and nothing else."

TEMPLATE = """Rate the conversation below on a 0-99 scale of answer diversity: how many different responses to its task would be equally good.

- 70-99: open social, everyday or creative dialogue (chit-chat, advice, stories, poems, opinions): many different answers are equally good.
- 40-69: semi-formal dialogue (explanations, summaries, formal emails, recommendations): some freedom in content and wording.
- 0-39: technical, mathematical or coding work that needs strict precision: essentially one correct answer.

Judge the task as a whole, over all turns; do not judge the quality of the response.

<conversation>
{conversation}
</conversation>

What is the diversity score of this conversation, from 0 to 99? Reply with the integer only."""


@dataclass(frozen=True)
class JudgePrompt:
    version: str
    template: str  # must contain "{conversation}"
    system: str = SYSTEM
    max_chars: int = 16000  # conversation budget; longer ones lose their middle (recorded)

    def render(self, messages: list[dict]) -> tuple[list[dict], int]:
        """Chat messages for the judge, and how many characters were cut (0 if none)."""
        text = "\n\n".join(f"### {m['role'].capitalize()}:\n{m['content']}" for m in messages)
        cut = max(0, len(text) - self.max_chars)
        if cut:
            head = self.max_chars // 2
            text = f"{text[:head]}\n[... {cut} characters omitted ...]\n{text[len(text) - (self.max_chars - head):]}"
        user = self.template.replace("{conversation}", text)
        out = [{"role": "system", "content": self.system}] if self.system else []
        return out + [{"role": "user", "content": user}], cut


class RenderedPrompts(Sequence):
    """`prompt.render` of each sample, made when asked for and never kept: a million judge prompts (each a
    whole conversation and the rubric) would be GBs. Cheap to make again: string formatting."""

    def __init__(self, prompt: JudgePrompt, samples: Sequence):
        self.prompt, self.samples = prompt, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[list[dict], int]:
        return self.prompt.render(self.samples[i].messages)

    def __iter__(self) -> Iterator[tuple[list[dict], int]]:
        return (self.prompt.render(s.messages) for s in self.samples)


def default_prompt() -> JudgePrompt:
    return JudgePrompt(PROMPT_VERSION, TEMPLATE)


def load_prompt(path: str | Path | None) -> JudgePrompt:
    """The built-in prompt, or one from a file.

    File format: optional header lines `version: NAME` and `system: TEXT`, then
    the user template containing `{conversation}`.
    """
    if path is None:
        return default_prompt()
    raw = Path(path).read_text(encoding="utf-8")
    lines, header = raw.splitlines(), {}
    while lines and re.match(r"^(version|system):", lines[0]):
        key, _, value = lines.pop(0).partition(":")
        header[key] = value.strip()
    template = "\n".join(lines).strip("\n")
    if "{conversation}" not in template:
        raise ValueError(f"{path}: the prompt template must contain {{conversation}}")
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:10]
    return JudgePrompt(f"{header.get('version', 'custom')}+{digest}", template, header.get("system", SYSTEM))


# --------------------------------------------------------------------------- parsing

@dataclass(frozen=True)
class Parsed:
    value: float | None  # the score on 0-99, or None
    error: str | None = None  # why there is no score
    strict: bool = False  # the answer was exactly the integer (or "Score: N")
    span: tuple[int, int] | None = None  # where the number sits in the answer text


_STRICT = re.compile(r"^\s*(?:(?:score|rating)\s*[:=]\s*)?(\d{1,2})\s*$", re.I)
# "0-99", "70-99", "between 0 and 100": ranges are the scale being quoted, not an answer
_SCALE = re.compile(r"\b\d{1,3}\s*(?:-|–|—|to)\s*\d{1,3}\b|\bbetween\s+\d{1,3}\s+and\s+\d{1,3}\b", re.I)
_NUMBER = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?![\w])")
_OUT_OF = re.compile(r"^\s*(?:/|out\s+of|of)\s*(\d+)", re.I)
_KEYWORD = re.compile(r"(?:score|rating|rate\s+(?:this|it)(?:\s+a)?|uncertainty|diversity)\s*(?:is|of|would\s+be|:|=|-)?\s*[*\"']*\s*$", re.I)
_REFUSAL = re.compile(
    r"\b(?:i\s*(?:'m|am)\s+(?:sorry|unable|not able)|i\s+(?:can(?:'|no)t|cannot|won't|will not|am unable)"
    r"|as an ai\b|unable to (?:rate|score|provide|determine)|i apologi[sz]e)", re.I)


# A reasoning model served without a reasoning parser (Qwen3, DeepSeek-R1 on vLLM or llama.cpp; gpt-oss's
# harmony channels) writes its thinking into the answer: its numbers are not the score.
_REASONING_END = re.compile(r"</(think|thinking|reasoning)>|<\|channel\|>final<\|message\|>", re.I)
_REASONING_START = re.compile(r"<(think|thinking|reasoning)>|<\|channel\|>analysis", re.I)


def after_reasoning(text: str) -> tuple[int, str] | None:
    """(offset, the answer after any reasoning block); None for a block never closed (cut while thinking)."""
    ends = list(_REASONING_END.finditer(text))
    if not ends:
        return None if _REASONING_START.search(text) else (0, text)
    return ends[-1].end(), text[ends[-1].end():]


def parse_answer(text: str | None) -> Parsed:
    """Read the judge's score from its answer; see the module docstring for the rules.

    Only what follows a reasoning block is read (after_reasoning); the span is still an
    index into `text`.
    """
    if text is None or not text.strip():
        return Parsed(None, "empty answer")
    answer = after_reasoning(text)
    if answer is None:
        return Parsed(None, "cut short while reasoning (a reasoning block with no end): give the judge more max_tokens")
    offset, rest = answer
    parsed = _parse(rest)
    if not offset:
        return parsed
    if parsed.value is None:
        return Parsed(None, f"after its reasoning: {parsed.error}")
    return Parsed(parsed.value, None, parsed.strict, (parsed.span[0] + offset, parsed.span[1] + offset))


def _parse(text: str) -> Parsed:
    if not text.strip():
        return Parsed(None, "empty answer")
    m = _STRICT.match(text)
    if m:
        return _checked(float(m.group(1)), strict=True, span=m.span(1))
    masked = _SCALE.sub(lambda s: " " * len(s.group(0)), text)  # "0-99" is the scale, not an answer
    found = []
    for n in _NUMBER.finditer(masked):
        scale = _OUT_OF.match(masked[n.end():])
        if scale and scale.group(1) not in ("99", "100"):
            return Parsed(None, f"wrong scale: {text[n.start():n.end() + scale.end()].strip()!r}")
        keyword = bool(_KEYWORD.search(masked[max(0, n.start() - 40):n.start()]))
        found.append((float(n.group(1)), n.span(1), keyword))
    if not found:
        if _REFUSAL.search(text):
            return Parsed(None, "refusal")
        why = "a range, not a score" if masked != text else "no number in answer"
        return Parsed(None, f"{why}: {_clip(text)!r}")
    flagged = [f for f in found if f[2]]
    if flagged:
        value, span, _ = flagged[0]
    elif len({f[0] for f in found}) == 1:
        value, span, _ = found[0]
    else:
        return Parsed(None, f"ambiguous: several numbers {sorted({_fmt(f[0]) for f in found})} in {_clip(text)!r}")
    if _REFUSAL.search(text) and not flagged:
        return Parsed(None, f"refusal with a number: {_clip(text)!r}")
    return _checked(value, strict=False, span=span)


def _checked(value: float, strict: bool, span) -> Parsed:
    if not (SCORE_MIN <= value <= SCORE_MAX) or math.isnan(value):
        return Parsed(None, f"out of range: {_fmt(value)}")
    return Parsed(value, None, strict, span)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


# --------------------------------------------------------------------------- expected score

_DIGITS = re.compile(r"^(\d*)(.*)$", re.S)


def expected_score(content: list[dict], text: str, span: tuple[int, int]) -> dict | None:
    """Expectation of the score under the judge's top log-probabilities, or None if unusable.

    content: OpenAI `choices[0].logprobs.content`, one entry per sampled token
    with "token", "logprob" and "top_logprobs" [{"token", "logprob"}].
    Whole-number tokenizers (GPT: "73" is one token) give the distribution over
    scores at one position. Digit-by-digit tokenizers (Llama, SmolLM2) give the
    tens digit at one position and the units digit (or the end of the number)
    at the next, observed only after the sampled tens digit: we assume the
    units distribution is the same after the other tens digits. Exact for the
    sampled tens digit, an approximation elsewhere; documented in the result.
    Non-numeric alternatives are left out and the rest renormalised;
    `numeric_mass` says how much probability that kept.
    """
    tokens = [c.get("token", "") for c in content]
    if "".join(tokens) != text:
        return None  # tokens do not spell the text (byte-level pieces): no reliable alignment
    starts, pos = [], 0
    for t in tokens:
        starts.append(pos)
        pos += len(t)
    i = max(k for k, s in enumerate(starts) if s <= span[0])
    prefix = text[starts[i]:span[0]]  # e.g. " " or ": " glued to the digit in the same token
    sampled_tok = tokens[i][len(prefix):]
    digit_by_digit = len(sampled_tok) == 1 and sampled_tok.isdigit()
    cont = _continuation(content[i + 1]) if digit_by_digit and i + 1 < len(content) else None
    total, mass, weighted = 0.0, 0.0, 0.0
    for alt in content[i].get("top_logprobs") or []:
        p = math.exp(alt["logprob"])
        total += p
        tok = alt["token"]
        if not tok.startswith(prefix):
            continue
        digits, rest = _DIGITS.match(tok[len(prefix):]).groups()
        if not digits or len(digits) > 2:
            continue
        if len(digits) == 1 and not rest and digit_by_digit and cont is not None:
            p_end, units = cont
            value = p_end * int(digits) + sum(q * (10 * int(digits) + d) for d, q in units.items())
        else:
            value = int(digits)
        mass += p
        weighted += p * value
    if mass <= 0:
        return None
    return {"expected": weighted / mass, "numeric_mass": mass, "top_mass": total,
            "method": "digit-by-digit" if digit_by_digit else "whole-number"}


def _continuation(entry: dict) -> tuple[float, dict[int, float]]:
    """After a tens digit: P(number ends) and P(units digit d), renormalised over the top-k."""
    p_end, units = 0.0, {}
    for alt in entry.get("top_logprobs") or []:
        p = math.exp(alt["logprob"])
        digits, _ = _DIGITS.match(alt["token"]).groups()
        if not digits:
            p_end += p
        elif len(digits) == 1:
            units[int(digits)] = units.get(int(digits), 0.0) + p
        # two or more digits after a tens digit: an out-of-range score, left out
    z = p_end + sum(units.values())
    if z <= 0:
        return 1.0, {}
    return p_end / z, {d: q / z for d, q in units.items()}


def answer_record(text: str, content: list[dict] | None, usage, temperature, scrub) -> tuple[dict | None, str | None]:
    """A judge's answer as the record the answer cache keeps, or (None, why) when it holds no score.

    The chat path (judge.py) and the batch path (batch.py) both keep this record, so a sample's score is
    the same whichever way it was asked. With log-probabilities the score is their expectation over the
    numbers (expected_score); the sampled number is kept beside it. scrub(text) removes the API key.
    """
    parsed = parse_answer(text)
    if parsed.value is None:
        return None, scrub(f"unparseable answer: {parsed.error}")[:300]
    exp = expected_score(content, text, parsed.span) if content else None
    return {"ok": True, "score": exp["expected"] if exp else parsed.value, "sampled": parsed.value,
            "expected": exp and exp["expected"], "numeric_mass": exp and exp["numeric_mass"],
            "strict": parsed.strict, "answer": scrub(text)[:200], "temperature": temperature,
            "usage": list(usage)}, None
