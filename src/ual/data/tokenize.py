"""Chat messages -> token ids and labels, supervising assistant tokens only (by default).

Which tokens are the assistant's is found from the chat template itself, for any model:
render the conversation up to an assistant turn with the generation prompt, and up to
and including that turn; the characters in between are what the model must produce,
end-of-turn token included (so it learns to stop). The full text is tokenized once
with offsets, and every token overlapping such a span is supervised. This does not
need `{% generation %}` markers, which most templates (SmolLM2's included) lack.
"""

from __future__ import annotations

IGNORE = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot be used to find assistant tokens."""


class TemplateRefused(TemplateError):
    """The chat template cannot render this conversation (others may render): it raised (e.g. Llama-2
    or Mistral templates' "Conversation roles must alternate"), or is not prefix-consistent on it."""


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError as JinjaError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
                            "use an instruction-tuned model or set tokenizer.chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as exc:
        raise TemplateRefused(f"the chat template of {tokenizer.name_or_path!r} refuses this conversation: "
                              f"{exc}") from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of each assistant reply."""
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not (full.startswith(upto) and upto.startswith(before)):
            raise TemplateRefused(
                f"the chat template of {tokenizer.name_or_path!r} is not prefix-consistent at turn {i} "
                "(rendering a conversation's first turns is not a prefix of rendering all of it, e.g. it "
                "rewrites earlier turns), so assistant tokens cannot be located; use train_on_prompt "
                "or a template without that behaviour")
        a, b = len(before), len(upto)
        # Keep the end-of-turn token, drop the separator whitespace the template puts after it
        # (but never the reply's own trailing characters).
        b = min(b, max(a + len(full[a:b].rstrip()), a + len(m["content"])))
        spans.append((a, b))
    return full, spans


def encode_sample(tokenizer, messages: list[dict], max_length: int | None,
                  train_on_prompt: bool = False) -> dict:
    """Token ids and labels (-100 = not supervised) for one conversation.

    Truncated from the right to max_length (None: never); `truncated` says whether it was.
    With train_on_prompt every token is supervised, as the paper's reference code did.
    """
    full, spans = assistant_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("finding assistant tokens needs a fast tokenizer (offset mappings)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        labels = list(ids)
    else:
        labels, k = [], 0
        for tok, (s, e) in zip(ids, enc["offset_mapping"]):
            while k < len(spans) and spans[k][1] <= s:  # spans are sorted and disjoint
                k += 1
            inside = k < len(spans) and s < spans[k][1] and e > spans[k][0]
            labels.append(tok if inside else IGNORE)
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (template with the assistant header appended)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
