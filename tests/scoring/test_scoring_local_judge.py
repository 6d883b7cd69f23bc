"""LocalJudgeScorer: the one-pass tree-masked trie must equal scoring every candidate separately."""

import math

import pytest
import torch

from judge_server import small_dataset
from ual.config import ScoreConfig
from ual.scoring.local_judge import LocalJudgeScorer, build_local_judge_scorer


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return LocalJudgeScorer(str(tiny_model_dir), model=model, tokenizer=tokenizer, batch_size=2)


def brute_force(scorer, sample):
    """P(score = k) by a separate forward over prompt + each candidate's tokens."""
    ids, _ = scorer._prompt_ids(sample)
    cands = scorer._trie[0]
    digit = torch.tensor(scorer._digit_start)
    logs = []
    for k, seq in cands.items():
        with torch.no_grad():  # rows: after the prompt, after each candidate token
            out = scorer.model(torch.tensor([ids + seq]), logits_to_keep=len(seq) + 1)
        lp = torch.log_softmax(out.logits[0].double(), -1)
        v = sum(lp[d, t].item() for d, t in enumerate(seq))
        logs.append(v + math.log1p(-lp[-1, digit].exp().sum().item()))
    m = max(logs)
    w = [math.exp(x - m) for x in logs]
    return [x / sum(w) for x in w]


def test_tree_pass_equals_brute_force(tiny):
    samples = small_dataset(3)
    res = tiny.score(samples)  # batch of 2 + 1: left padding exercised
    assert [r.id for r in res] == [s.id for s in samples]
    cands, nodes, _ = tiny._trie
    assert len(cands) == 100 and len(nodes) == 100  # SmolLM2, digit by digit: 10 tens + 90 two-digit nodes
    exact = brute_force(tiny, samples[2])
    tree = tiny.distribution(samples[2])
    assert max(abs(a - b) for a, b in zip(exact, tree)) < 1e-5
    assert sum(tree) == pytest.approx(1.0)
    r = res[2]
    assert r.details["expected"] == pytest.approx(sum(k * p for k, p in enumerate(exact)), abs=1e-3)
    assert r.score == pytest.approx(r.details["expected"] / 99) and 0 <= r.score <= 1
    assert 0 < r.details["format_mass"] <= 1 and r.details["mode"] == max(range(100), key=exact.__getitem__)


def test_long_sample_is_cut_to_fit_or_listed(tiny):
    from ual.sample import Sample

    long = Sample.create("x", [{"role": "user", "content": "word " * 3000}, {"role": "assistant", "content": "ok"}])
    scorer = LocalJudgeScorer("tiny", model=tiny.model, tokenizer=tiny.tokenizer, max_length=600)
    r = scorer.score([long])[0]
    assert r.ok and r.details["truncated_chars"] > 0
    tight = LocalJudgeScorer("tiny", model=tiny.model, tokenizer=tiny.tokenizer, max_length=100)
    r = tight.score([long])[0]
    assert r.score is None and "longer than 100 tokens" in r.details["error"]


@pytest.mark.slow
def test_real_smollm2_local_judge():
    s = build_local_judge_scorer(ScoreConfig(scorer="local_judge", batch_size=4), "smollm2-135m", "cpu")
    samples = small_dataset(4)
    res = s.score(samples)
    for r in res:
        assert r.ok and 0 <= r.score <= 1 and r.details["format_mass"] > 1e-3, r.details
    print({s.messages[0]["content"][:30]: round(r.details["expected"], 1) for s, r in zip(samples, res)})
