"""Supervised tokens from the real SmolLM2 chat template, for every input shape."""

from __future__ import annotations

import copy
import json

import pytest

from ual.data.formats import load_file
from ual.data.tokenize import IGNORE, TemplateError, encode_prompt, encode_sample

from test_data_formats import EXPECTED, SHAPES


def supervised_runs(enc):
    """Contiguous runs of supervised token ids."""
    runs, cur = [], []
    for tok, lab in zip(enc["input_ids"], enc["labels"]):
        if lab != IGNORE:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_every_shape_round_trips_to_assistant_tokens(tmp_path, tokenizer):
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(SHAPES[f]) + "\n" for f in SHAPES), encoding="utf-8")
    samples, _ = load_file(path)
    end = tokenizer.eos_token
    assert end == "<|im_end|>"
    for fmt, sample in zip(SHAPES, samples):
        assert sample.messages == EXPECTED[fmt]
        enc = encode_sample(tokenizer, sample.messages, max_length=512)
        assert not enc["truncated"] and len(enc["labels"]) == len(enc["input_ids"])
        replies = [m["content"] + end for m in sample.messages if m["role"] == "assistant"]
        assert [tokenizer.decode(r) for r in supervised_runs(enc)] == replies, fmt
        # the unsupervised rest is exactly the prompt side of the rendered text
        full = tokenizer.apply_chat_template(sample.messages, tokenize=False)
        assert tokenizer.decode(enc["input_ids"]) == full


def test_multi_turn_supervises_every_reply_and_no_prompt(tokenizer):
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"question number {i}?"},
                 {"role": "assistant", "content": f"answer {i}:\n  - item {i}\n"}]
    enc = encode_sample(tokenizer, msgs, max_length=None)
    runs = [tokenizer.decode(r) for r in supervised_runs(enc)]
    assert runs == [f"answer {i}:\n  - item {i}\n<|im_end|>" for i in range(4)]
    assert not any("question" in r or "terse" in r for r in runs)
    # the end-of-turn token of each reply is supervised; the newline after it is not
    ids, labels = enc["input_ids"], enc["labels"]
    ends = [i for i, (t, l) in enumerate(zip(ids, labels)) if t == tokenizer.eos_token_id and l != IGNORE]
    assert len(ends) == 4 and all(labels[i + 1] == IGNORE for i in ends if i + 1 < len(ids))


def test_train_on_prompt_supervises_everything(tokenizer):
    enc = encode_sample(tokenizer, EXPECTED["sharegpt"], 512, train_on_prompt=True)
    assert enc["labels"] == enc["input_ids"]


def test_truncation_from_the_right_is_reported(tokenizer):
    msgs = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": " ".join(map(str, range(200)))}]
    full = encode_sample(tokenizer, msgs, None)
    cut = encode_sample(tokenizer, msgs, 48)
    assert len(full["input_ids"]) > 48 and cut["truncated"]
    assert cut["input_ids"] == full["input_ids"][:48] and cut["labels"] == full["labels"][:48]
    assert any(label != IGNORE for label in cut["labels"])
    assert not encode_sample(tokenizer, msgs, len(full["input_ids"]))["truncated"]


def test_encode_prompt_is_the_generation_prefix(tokenizer):
    msgs = EXPECTED["lima"]
    full = encode_sample(tokenizer, msgs, None)
    prompt = encode_prompt(tokenizer, msgs[:1])
    assert tokenizer.decode(prompt).endswith("Write a haiku.<|im_end|>\n<|im_start|>assistant\n")
    assert full["input_ids"][: len(prompt)] == prompt
    assert all(label == IGNORE for label in full["labels"][: len(prompt)])
    assert full["labels"][len(prompt)] != IGNORE
    prompt = encode_prompt(tokenizer, msgs[:3])  # a later turn: the earlier reply is in the prompt
    assert tokenizer.decode(prompt).endswith("Another?<|im_end|>\n<|im_start|>assistant\n")
    assert full["input_ids"][: len(prompt)] == prompt
    assert full["labels"][len(prompt) - 1] == IGNORE and full["labels"][len(prompt)] != IGNORE


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # like templates that strip reasoning from earlier replies: not prefix-consistent
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}[earlier]{% else %}{{ m['content'] }}{% endif %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="not prefix-consistent"):
        encode_sample(tok, EXPECTED["sharegpt"], 512)
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        encode_sample(tok, EXPECTED["alpaca"], 512)


def test_a_template_that_raises_on_a_conversation_is_a_refusal_of_that_conversation(tokenizer):
    from ual.data.tokenize import TemplateRefused

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first, please') }}{% endif %}"
                         + tokenizer.chat_template)
    assert encode_sample(tok, EXPECTED["alpaca"], 512)["input_ids"]
    with pytest.raises(TemplateRefused, match="refuses this conversation: user first, please"):
        encode_sample(tok, EXPECTED["messages"], 512)  # starts with a system turn
