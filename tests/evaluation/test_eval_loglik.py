"""Shared-context log-likelihoods (evaluation/loglik.py, lm_eval_model.py) against separate forwards and
against lm-eval's own Hugging Face backend, on a tiny random Llama with SmolLM2's vocabulary."""

from __future__ import annotations

import random

import pytest
import torch

from ual.evaluation.loglik import group_by_context, shared_context_loglikelihoods


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()


def _separate(model, ctx, cont):
    """The reference: one plain forward over context + continuation."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)
    rows = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def _requests(seed=0, n_contexts=7):
    rng = random.Random(seed)
    out = []
    for _ in range(n_contexts):
        ctx = [rng.randrange(10, 4000) for _ in range(rng.randint(1, 30))]
        for _ in range(rng.randint(1, 5)):  # 1 to 5 choices of 1 to 12 tokens
            out.append((ctx, [rng.randrange(10, 4000) for _ in range(rng.randint(1, 12))]))
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("batch_tokens", [1, 64, 100_000])  # one row per forward, a few, all at once
def test_equal_to_separate_forwards(model, batch_tokens):
    requests = _requests()
    got = shared_context_loglikelihoods(model, requests, pad=0, batch_tokens=batch_tokens)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        ref_ll, ref_greedy = _separate(model, ctx, cont)
        assert ll == pytest.approx(ref_ll, abs=1e-4)
        assert greedy == ref_greedy


def test_greedy_continuation_is_flagged(model):
    ctx = [100, 200, 300]
    with torch.no_grad():
        best = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    (_, greedy), (_, other) = shared_context_loglikelihoods(model, [(ctx, [best]), (ctx, [(best + 1) % 4000])], pad=0)
    assert greedy and not other


def test_groups_and_model_mode(model):
    requests = [([1, 2], [3]), ([1, 2], [4, 5]), ([9], [3]), ([1, 2], [6]), ([1, 2], [4, 5])]
    assert group_by_context(requests) == [((1, 2), [0, 1, 3]), ((9,), [2])]  # the repeat is scored once
    model.train()
    got = shared_context_loglikelihoods(model, requests, pad=0)
    assert got[4] == got[1] and got[4][0] == pytest.approx(_separate(model, [1, 2], [4, 5])[0], abs=1e-4)
    assert model.training  # its own mode back
    model.eval()
    with pytest.raises(ValueError, match="request 1: an empty context or continuation"):
        shared_context_loglikelihoods(model, [([1], [2]), ([], [3])], pad=0)


def test_same_numbers_as_lm_eval_hflm(model, tokenizer):
    """SharedContextHFLM is lm-eval's HFLM with one method replaced: the same requests give the same
    log-likelihoods (1e-4) and greedy flags through lm-eval's own tokenisation and truncation."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from ual.evaluation.lm_eval_model import SharedContextHFLM

    questions = [("Question: Which gas do plants take in?\nAnswer:", [" carbon dioxide", " oxygen", " helium gas"]),
                 ("A man is sitting on a roof. He", [" starts pulling up roofing.", " is using wrap to wrap skis."]),
                 ("Q: What is 2 + 2?\nA:", [" 4", " 5", " twenty-two", " I have no comment."])]
    reqs = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, conts) in enumerate(questions) for cont in conts]
    ours = SharedContextHFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, progress=False).loglikelihood(reqs)
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).loglikelihood(reqs)
    assert len(ours) == len(theirs) == 9
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4)
        assert ga == gb
