"""Batched generation on the tiny random model: order, determinism, stopping, sampling."""

from __future__ import annotations

import pytest

from ual.evaluation.generate import _until_stop, generate_answers, render_prompts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the capital of France? Answer in one word, please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2 = ?"}],
    [{"role": "user", "content": "Tell me a story about a dragon and a knight in a long sentence."}],
    [{"role": "user", "content": "ok"}],
]


def test_render_prompts_end_with_the_assistant_header(tokenizer):
    ids = render_prompts(tokenizer, PROMPTS[:1])[0]
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert "Hi" in text


def test_greedy_is_deterministic_and_order_is_restored(tiny):
    model, tok = tiny
    a = generate_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=2, progress=False)
    b = generate_answers(model, tok, PROMPTS, max_new_tokens=8, batch_size=2, progress=False)
    assert a == b and len(a) == len(PROMPTS) and all(isinstance(x, str) for x in a)
    # A permuted input gives the permuted output (same batches after the length sort).
    perm = [3, 0, 4, 2, 1]
    c = generate_answers(model, tok, [PROMPTS[i] for i in perm], max_new_tokens=8, batch_size=2, progress=False)
    assert c == [a[i] for i in perm]


def test_left_padded_batches_match_one_by_one(tiny):
    """Left padding must not change what a prompt generates (fp32, greedy)."""
    model, tok = tiny
    batched = generate_answers(model, tok, PROMPTS, max_new_tokens=6, batch_size=5, progress=False)
    single = [generate_answers(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single


def test_only_new_tokens_are_decoded(tiny):
    model, tok = tiny
    out = generate_answers(model, tok, PROMPTS[1:2], max_new_tokens=4, progress=False)[0]
    assert "capital of France" not in out and "<|im_start|>" not in out
    assert len(tok(out, add_special_tokens=False)["input_ids"]) <= 6  # ~4 tokens, re-tokenisation may differ


def test_until_stop_cuts_at_first_end_token():
    assert _until_stop([5, 6, 2, 7, 2], [2]) == [5, 6]
    assert _until_stop([5, 6], [2]) == [5, 6]
    assert _until_stop([2, 2], [2]) == []


def test_eos_stops_generation(tiny):
    """Force the eos logit up: the answer must be empty, whatever max_new_tokens is."""
    import torch

    model, tok = tiny
    with torch.no_grad():
        old = model.lm_head.weight.data.clone()
        bias = torch.zeros(model.config.vocab_size)
        bias[tok.eos_token_id] = 1e4
        model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        out = generate_answers(model, tok, PROMPTS[:2], max_new_tokens=16, progress=False)
    finally:
        model.lm_head._forward_hooks.clear()
        model.lm_head.weight.data.copy_(old)
    assert out == ["", ""]


def test_sampling_is_seeded_and_returns_n(tiny):
    import torch

    model, tok = tiny
    state = torch.random.get_rng_state()
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, num_return_sequences=3, progress=False)
    a = generate_answers(model, tok, PROMPTS[:2], seed=1, **kw)
    b = generate_answers(model, tok, PROMPTS[:2], seed=1, **kw)
    c = generate_answers(model, tok, PROMPTS[:2], seed=2, **kw)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    assert a == b and a != c
    assert len(a) == 2 and all(len(x) == 3 for x in a)
    assert len(set(a[0])) > 1  # a random model at T=1.5 samples different answers


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="do_sample"):
        generate_answers(model, tok, PROMPTS, num_return_sequences=2, progress=False)
    assert generate_answers(model, tok, [], progress=False) == []
