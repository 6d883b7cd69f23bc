"""The entropy and perplexity scorers: one forward pass, checked against hand computations on the
tiny model; switching between them costs no model call; the prior scorer; separation of sources."""

import json
import math

import numpy as np
import pytest
import torch

from tiny_models import tiny_llama_config
from ual.cli import main
from ual.sample import Sample
from ual.data.tokenize import encode_sample
from ual.token_stats import response_token_stats
from ual.io import read_jsonl
from ual.loss import IGNORE_INDEX, shift_labels
from ual.scoring.analysis import separation
from ual.scoring.perplexity import ModelUncertaintyScorer
from ual.scoring.prior import PriorScorer


def _samples(n=5):
    return [Sample.create("chat" if i % 2 else "maths",
                          [{"role": "user", "content": f"Question {i}: what is {i} + {2 * i}?"},
                           {"role": "assistant", "content": f"{i} + {2 * i} = {3 * i}. " * (1 + i % 3)}])
            for i in range(n)]


def _by_hand(model, tokenizer, sample, max_length=64):
    """Mean entropy and mean NLL over the response tokens, one sample, straight from the logits."""
    enc = encode_sample(tokenizer, sample.messages, max_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0].double()
    targets = shift_labels(torch.tensor([enc["labels"]]))[0]
    ent, nll = [], []
    for t in range(len(targets)):
        if targets[t] == IGNORE_INDEX:
            continue
        p = torch.softmax(logits[t], -1)
        ent.append(float(-(p * p.log()).sum()))
        nll.append(float(-p[targets[t]].log()))
    return sum(ent) / len(ent), sum(nll) / len(nll)


def test_entropy_scorer_equals_hand_computation(tiny_model_dir, tokenizer):
    from ual.models import load_model

    samples = _samples()
    model = load_model(str(tiny_model_dir), "cpu")
    hand = [_by_hand(model, tokenizer, s) for s in samples]
    for measure, col in (("entropy", 0), ("perplexity", 1)):
        results = ModelUncertaintyScorer(measure, str(tiny_model_dir), 64, batch_size=3, device="cpu").score(samples)
        expected = [h[col] for h in hand]
        got = [r.details["mean_entropy" if measure == "entropy" else "mean_nll"] for r in results]
        np.testing.assert_allclose(got, expected, rtol=1e-4)
        np.testing.assert_allclose([r.score for r in results], np.array(expected) / max(expected), rtol=1e-4)
        # A random model's entropy sits near ln V; its NLL too: the check is about the arithmetic.
        assert all(0 < x <= math.log(len(tokenizer)) + 1e-6 for x in (h[0] for h in hand))


def test_one_pass_equals_each_computed_alone(tiny_model_dir, tokenizer):
    """Batched (padded, length-sorted) stats equal per-sample ones, and the NLL equals HF's own loss."""
    from ual.models import load_model

    samples = _samples(6)
    model = load_model(str(tiny_model_dir), "cpu")
    batched = response_token_stats(model, tokenizer, samples, 64, batch_size=4, keep_tokens=True)
    for s, b in zip(samples, batched):
        (alone,) = response_token_stats(model, tokenizer, [s], 64, batch_size=1, keep_tokens=True)
        assert b.tokens == alone.tokens == len(b.confidence)
        assert b.nll == pytest.approx(alone.nll, rel=1e-4) and b.entropy == pytest.approx(alone.entropy, rel=1e-4)
        np.testing.assert_allclose(b.confidence, alone.confidence, rtol=1e-4)
        enc = encode_sample(tokenizer, s.messages, 64)
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])).loss
        assert b.mean_nll == pytest.approx(float(hf), rel=1e-4)


def _run_config(tmp_path, model_dir, scorer="entropy", extra=""):
    rows = [{"messages": s.messages} for s in _samples(8)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {model_dir}\n"
                   f"data: {{max_length: 64, sources: [{{name: {data}, label: mix, train: 6, heldout: 2}}]}}\n"
                   f"score: {{scorer: {scorer}, batch_size: 4}}\n{extra}")
    return cfg


def test_switching_between_entropy_and_perplexity_costs_no_model_call(tmp_path, tiny_model_dir, monkeypatch):
    cfg = _run_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    assert main(["data", str(cfg)]) == 0
    assert main(["score", str(cfg)]) == 0
    ent = read_jsonl(run / "scores.jsonl")
    assert len(ent) == 6 and len(read_jsonl(run / "heldout_scores.jsonl")) == 2
    assert all({"mean_nll", "mean_entropy"} <= set(r["details"]) for r in ent)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr("ual.models.load_model", no_model)
    assert main(["score", str(cfg), "--score.scorer", "perplexity"]) == 0
    ppl = read_jsonl(run / "scores.jsonl")
    assert {r["scorer"] for r in ppl} == {f"perplexity:{tiny_model_dir}"}
    top = max(r["details"]["mean_nll"] for r in ppl + read_jsonl(run / "heldout_scores.jsonl"))
    assert [r["score"] for r in ppl] == pytest.approx([r["details"]["mean_nll"] / top for r in ppl])
    monkeypatch.undo()
    # The derived scores equal a fresh forward pass.
    assert main(["score", str(cfg), "--score.scorer", "perplexity", "--force"]) == 0
    fresh = read_jsonl(run / "scores.jsonl")
    assert [r["score"] for r in fresh] == pytest.approx([r["score"] for r in ppl], rel=1e-5)



def test_ratio_scorers_equal_hand_computation_and_derive_one_way(tmp_path, tiny_model_dir, monkeypatch):
    """entropy_ratio = mean entropy with the instructions / with them blanked (same response tokens), by
    hand; nll_ratio likewise. Ratio rows give every plain measure without a model call; plain rows cannot
    give a ratio (they lack the blanked pass), so asking for one after them runs the model."""
    from ual.models import load_model
    from ual.scoring.perplexity import without_instructions

    samples = _samples()
    model = load_model(str(tiny_model_dir), "cpu")
    from ual.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    with_i = [_by_hand(model, tok, s) for s in samples]
    blank = [_by_hand(model, tok, without_instructions(s)) for s in samples]
    assert [len(encode_sample(tok, without_instructions(s).messages, 64)["labels"]) for s in samples] != \
        [len(encode_sample(tok, s.messages, 64)["labels"]) for s in samples]  # the instructions are gone
    for measure, col in (("entropy_ratio", 0), ("nll_ratio", 1)):
        got = ModelUncertaintyScorer(measure, str(tiny_model_dir), 64, batch_size=3, device="cpu").score(samples)
        expected = np.array([w[col] / b[col] for w, b in zip(with_i, blank)])
        np.testing.assert_allclose([r.score for r in got], expected / expected.max(), rtol=1e-4)

    cfg = _run_config(tmp_path, tiny_model_dir, scorer="entropy")
    assert main(["data", str(cfg)]) == 0 and main(["score", str(cfg)]) == 0
    calls = []
    real = load_model
    monkeypatch.setattr("ual.models.load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(["score", str(cfg), "--score.scorer", "entropy_ratio"]) == 0
    assert calls, "an entropy_ratio cannot come from plain entropy rows"
    ratio = read_jsonl(tmp_path / "run" / "scores.jsonl")
    assert all({"mean_entropy_alone", "mean_nll_alone", "mean_entropy"} <= set(r["details"]) for r in ratio)
    calls.clear()
    for plain in ("nll_ratio", "perplexity", "entropy"):
        assert main(["score", str(cfg), "--score.scorer", plain]) == 0
    assert not calls  # nll_ratio from entropy_ratio's rows; the plain ones reused or derived


def test_prior_scorer_and_its_refusal(tmp_path, tiny_model_dir, capsys):
    samples = _samples(4)
    res = PriorScorer({"maths": 0.2, "chat": 0.8}).score(samples)
    assert [r.score for r in res] == [0.2, 0.8, 0.2, 0.8]
    with pytest.raises(ValueError, match=r"no value for source\(s\) \['chat'\]"):
        PriorScorer({"maths": 0.2}).score(samples)
    for bad in ({"maths": 1.5}, {"maths": "low"}, {"maths": True}, {}):
        with pytest.raises(ValueError):
            PriorScorer(bad)
    # Through the CLI: the config's mapping, and a source the prior does not know is a clear error.
    cfg = _run_config(tmp_path, tiny_model_dir, scorer="prior", extra="")
    assert main(["data", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["score", str(cfg), "--score.prior", "{chat: 0.9}"]) == 2
    assert "no value for source(s) ['mix']" in capsys.readouterr().err
    assert main(["score", str(cfg), "--score.prior", "{mix: 0.7}"]) == 0
    assert {r["score"] for r in read_jsonl(tmp_path / "run" / "scores.jsonl")} == {0.7}
    # A failed rerun leaves the folder as it was: config.yaml, the scores and the smoothing mapped from them.
    run = tmp_path / "run"
    assert main(["map", str(cfg), "--score.prior", "{mix: 0.7}"]) == 0 and (run / "smoothing.jsonl").exists()
    before = {n: (run / n).read_bytes() for n in ("config.yaml", "scores.jsonl", "smoothing.jsonl", "lineage.json")}
    assert main(["score", str(cfg), "--score.prior", "{chat: 0.9}"]) == 2
    assert {n: (run / n).read_bytes() for n in before} == before
    # other prior values replace the scores, and the smoothing made from the old ones goes
    assert main(["score", str(cfg), "--score.prior", "{mix: 0.4}"]) == 0
    assert {r["score"] for r in read_jsonl(run / "scores.jsonl")} == {0.4} and not (run / "smoothing.jsonl").exists()


def test_separation_on_a_constructed_case():
    from ual.config import SmoothingConfig

    rows = ([{"source": "maths", "score": s} for s in (0.1, 0.2, 0.3, 0.4)]
            + [{"source": "chat", "score": s} for s in (0.35, 0.5, 0.6, 0.7)])
    (pair,) = separation(rows, smoothing=SmoothingConfig(target_mean=0.1))
    assert (pair["high"], pair["low"]) == ("chat", "maths")
    # 16 pairs (chat, maths): chat wins all but 0.35 < 0.4 -> 15/16.
    assert pair["auc"] == pytest.approx(15 / 16)
    # max: eps proportional to the score -> ratio of mean scores 2.15 / 1.0.
    assert pair["eps_ratio"]["max"] == pytest.approx(2.15 / 1.0)
    # minmax: u = (s - 0.1) / 0.6 -> means 1.75 / 0.6 over 0.6 / 0.6.
    assert pair["eps_ratio"]["minmax"] == pytest.approx((2.15 - 0.4) / (1.0 - 0.4))
    # rank: ranks 0..7 -> maths 0,1,2,4 (sum 7), chat 3,5,6,7 (sum 21).
    assert pair["eps_ratio"]["rank"] == pytest.approx(21 / 7)
    # With the map's eps given, that is what the ratio reads.
    applied = [dict(r, eps=0.05 if r["source"] == "maths" else 0.15) for r in rows]
    assert separation(applied, eps_key="eps")[0]["eps_ratio"]["applied"] == pytest.approx(3.0)
    # Three sources: every pair.
    third = rows + [{"source": "code", "score": 0.05}] * 3
    assert len(separation(third, smoothing=SmoothingConfig())) == 3


def _tiny_config(**extra):
    torch.manual_seed(0)
    return tiny_llama_config(512, max_position_embeddings=256, pad_token_id=0, **extra)


@pytest.mark.parametrize("kind", ["gemma3-softcap", "llama-scaled-logits"])
def test_supervised_head_matches_full_logits(kind):
    """The stats computed from hidden states at the supervised rows equal those from the model's own
    full logits: for a head with soft-capping (reproduced) and for one scaling its logits in forward
    (detected on the logit row the model computes, then the full forward is used)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    if kind == "gemma3-softcap":
        model = Gemma3ForCausalLM(Gemma3TextConfig(**_tiny_config(final_logit_softcapping=2.0,
                                                           sliding_window=16, query_pre_attn_scalar=8)))
    else:
        class Scaled(LlamaForCausalLM):
            def forward(self, *args, **kwargs):
                out = super().forward(*args, **kwargs)
                out.logits = out.logits * 2
                return out
        model = Scaled(LlamaConfig(**_tiny_config()))
    model.eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (3, 20), generator=gen)
    labels = ids.clone()
    labels[:, :6] = IGNORE_INDEX
    labels[2, 15:] = IGNORE_INDEX

    from ual import token_stats as nll_module

    head = nll_module.SupervisedHead(model)
    targets = shift_labels(labels)
    supervised = targets != IGNORE_INDEX
    with torch.no_grad():
        lean = nll_module._per_token(head.supervised_logits(ids, torch.ones_like(ids), supervised), targets[supervised])
        full_logits = model(input_ids=ids).logits[supervised]
        full = nll_module._per_token(nll_module._Rows(full_logits), targets[supervised])
    for a, b in zip(lean[:3], full[:3]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    assert torch.equal(lean[3], full[3])
    assert head.exact == (kind == "gemma3-softcap")
