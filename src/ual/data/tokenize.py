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
    return render_many(tokenizer, [messages], add_generation_prompt)[0]


def render_many(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    """Each conversation through the chat template, in one call (the template is set up once, not once
    a conversation); a conversation the template refuses is a TemplateRefused naming the reason."""
    from jinja2 import TemplateError as JinjaError

    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; "
                            "use an instruction-tuned model or set tokenizer.chat_template")
    if not conversations:
        return []
    try:
        if len(conversations) == 1:
            return [tokenizer.apply_chat_template(conversations[0], tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)]
        return list(tokenizer.apply_chat_template(conversations, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt))
    except JinjaError as exc:
        if len(conversations) > 1:  # one of them: find it (it raises), the others render alone
            return [render_many(tokenizer, [c], add_generation_prompt)[0] for c in conversations]
        raise TemplateRefused(f"the chat template of {tokenizer.name_or_path!r} refuses this conversation: "
                              f"{exc}") from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of each assistant reply."""
    return assistant_spans_many(tokenizer, [messages])[0]


def assistant_spans_many(tokenizer, conversations: list[list[dict]]) -> list[tuple[str, list[tuple[int, int]]]]:
    """`assistant_spans` of each conversation, with every render of the batch in two template calls."""
    turns = [(c, i) for c, messages in enumerate(conversations)
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    middle = [(c, i) for c, i in turns if i < len(conversations[c]) - 1]  # the last turn's "upto" is `full`
    rendered = render_many(tokenizer, list(conversations) + [conversations[c][: i + 1] for c, i in middle])
    full, upto = rendered[: len(conversations)], dict(zip(middle, rendered[len(conversations):]))
    before = dict(zip(turns, render_many(tokenizer, [conversations[c][:i] for c, i in turns],
                                         add_generation_prompt=True)))
    out = [(text, []) for text in full]
    for c, i in turns:
        text, spans = out[c]
        a_text, b_text = before[(c, i)], upto.get((c, i), text)
        if not (text.startswith(b_text) and b_text.startswith(a_text)):
            raise TemplateRefused(
                f"the chat template of {tokenizer.name_or_path!r} is not prefix-consistent at turn {i} "
                "(rendering a conversation's first turns is not a prefix of rendering all of it, e.g. it "
                "rewrites earlier turns), so assistant tokens cannot be located; use train_on_prompt "
                "or a template without that behaviour")
        a, b = len(a_text), len(b_text)
        # Keep the end-of-turn token, drop the separator whitespace the template puts after it
        # (but never the reply's own trailing characters).
        b = min(b, max(a + len(text[a:b].rstrip()), a + len(conversations[c][i]["content"])))
        spans.append((a, b))
    return out


def encode_sample(tokenizer, messages: list[dict], max_length: int | None,
                  train_on_prompt: bool = False) -> dict:
    """Token ids and labels (-100 = not supervised) for one conversation (`encode_batch` of one).

    Truncated from the right to max_length (None: never); `truncated` says whether it was.
    With train_on_prompt every token is supervised, as the paper's reference code did.
    """
    ids, labels, full_length = encode_batch(tokenizer, [messages], max_length, train_on_prompt)[0]
    return {"input_ids": ids.tolist(), "labels": labels.tolist(), "truncated": full_length > len(ids)}


def encode_many(tokenizer, conversations: list[list[dict]], max_length: int | None,
                train_on_prompt: bool = False, batch_size: int = 256) -> list[dict]:
    """`encode_sample` of each conversation, `batch_size` at a time through `encode_batch`."""
    return [{"input_ids": ids.tolist(), "labels": labels.tolist(), "truncated": n > len(ids)}
            for i in range(0, len(conversations), batch_size)
            for ids, labels, n in encode_batch(tokenizer, conversations[i : i + batch_size], max_length, train_on_prompt)]


def encode_or_refusal(tokenizer, conversations: list[list[dict]], max_length: int | None,
                      train_on_prompt: bool = False, refusal: type[Exception] = TemplateRefused) -> list:
    """`encode_batch`, except that a conversation the template refuses gives its `refusal` exception in
    its place instead of failing the batch (the batch is encoded whole; only a refused one is retried alone)."""
    try:
        return encode_batch(tokenizer, conversations, max_length, train_on_prompt)
    except refusal:
        pass
    out: list = []
    for messages in conversations:
        try:
            out += encode_batch(tokenizer, [messages], max_length, train_on_prompt)
        except refusal as exc:
            out.append(exc)
    return out


def encode_batch(tokenizer, conversations: list[list[dict]], max_length: int | None,
                 train_on_prompt: bool = False) -> list[tuple]:
    """(input_ids, labels, length before truncation) per conversation: int32 arrays, cut to max_length.

    One fast-tokenizer call for the whole batch (the Rust side splits it across threads), which is
    what makes tokenizing a large set cheap; the assistant spans come from `assistant_spans`, and a
    token is supervised when its characters overlap a span.
    """
    import numpy as np

    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError("finding assistant tokens needs a fast tokenizer (offset mappings)")
    rendered = assistant_spans_many(tokenizer, conversations)
    enc = tokenizer([full for full, _ in rendered], add_special_tokens=False,
                    return_offsets_mapping=not train_on_prompt, return_attention_mask=False)
    out = []
    for i, (_, spans) in enumerate(rendered):
        ids = np.asarray(enc["input_ids"][i], dtype=np.int32)
        if train_on_prompt:
            labels = ids.copy()
        else:
            offsets = np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
            inside = np.zeros(len(ids), dtype=bool)
            for a, b in spans:  # overlap with any span (sorted, disjoint)
                inside |= (offsets[:, 0] < b) & (offsets[:, 1] > a)
            labels = np.where(inside, ids, IGNORE).astype(np.int32)
        cut = len(ids) if max_length is None else min(len(ids), max_length)
        out.append((ids[:cut], labels[:cut], len(ids)))
    return out


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a prompt ready for generation (template with the assistant header appended)."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
