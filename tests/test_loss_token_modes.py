"""Exactness of the token scales (DFT, EAFT) and per-sample weights (ual.loss docstring).

The reference is tests/test_loss.py's dense float64 one: the full (T, V) smoothed
target (1 - eps) * onehot(y) + eps / V against log_softmax(z), times the token
scale s (sg(p_y) or sg(H_topk / log k)) and the sample weight w, summed over
supervised tokens and divided by the supervised-token count. Here every mode and
weighting is drawn; test_loss.py draws the plain loss (mode none, unweighted) more
often. The stop-gradient is checked both ways: our gradients equal the reference's
with s.detach(), and differ from the reference's without it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_loss import (SETTINGS, _check, _chunked_grads, _close, _LoraLikeHead, _reference_grads,
                       dense_reference, problems)

import ual.loss as L
from ual.loss import IGNORE_INDEX, TOKEN_SCALES, chunked_smoothed_cross_entropy, smoothed_cross_entropy


@st.composite
def mode_problems(draw):
    problem = draw(problems())
    b = problem[3].shape[0]
    token_scale = draw(st.sampled_from(TOKEN_SCALES))
    k = draw(st.sampled_from([2, 3, 20, 1000]))
    weights = None
    if draw(st.booleans()):
        weights = torch.tensor(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=b, max_size=b)))
    return problem, token_scale, k, weights


@settings(max_examples=120, **SETTINGS)
@given(mode_problems())
def test_chunked_modes_match_dense_reference_fp32(case):
    _check(case, torch.float32, 1e-5)


@settings(max_examples=50, **SETTINGS)
@given(mode_problems())
def test_chunked_modes_match_dense_reference_bf16(case):
    # bf16 inputs; the reference sees the same bf16 values in float64.
    _check(case, torch.bfloat16, 1e-2)


@settings(max_examples=40, **SETTINGS)
@given(mode_problems())
def test_chunked_modes_bf16_native_matmul_path(case):
    # The CUDA code path (bf16 GEMMs, c folded into the cast of the softmax), exercised on CPU.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "_LOWP_MM_DEVICES", ("cuda", "cpu"))
        _check(case, torch.bfloat16, 2e-2, term_scale=True)


@settings(max_examples=120, **SETTINGS)
@given(mode_problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_naive_modes_match_dense_reference(case, dtype):
    problem, token_scale, k, weights = case
    hidden, weight, bias, targets, eps, num_items, *_ = problem
    logits = (hidden @ weight.T + (0 if bias is None else bias)).to(dtype).requires_grad_()
    loss = smoothed_cross_entropy(logits, targets, eps, num_items, token_scale=token_scale, eaft_topk=k,
                                  sample_weights=weights)
    loss.backward()
    leaf = logits.detach().double().requires_grad_()
    ref = dense_reference(leaf, targets, eps, num_items, token_scale, k, weights)
    ref.backward()
    rtol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: the returned gradient is rounded to bf16
    _close(loss, ref, 1e-5)
    _close(logits.grad, leaf.grad, rtol)


# --------------------------------------------------------------------------
# The stop-gradient through the scale
# --------------------------------------------------------------------------


def _fixed_problem(seed=0, b=3, t=9, hid=8, vocab=40, logit_scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, hid, generator=gen)
    weight = torch.randn(vocab, hid, generator=gen) * logit_scale / hid**0.5
    bias = torch.randn(vocab, generator=gen)
    targets = torch.randint(0, vocab, (b, t), generator=gen)
    targets[0, :3] = IGNORE_INDEX
    targets[2, 7:] = IGNORE_INDEX
    eps = torch.tensor([0.0, 0.3, 0.8])[:b]
    return hidden, weight, bias, targets, eps


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 0.0, 2.0])], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("token_scale", ["dft", "eaft"])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_scale_is_stop_gradient(impl, token_scale, weights):
    """Our gradient is the reference's with s.detach(), and far from the one without it."""
    hidden, weight, bias, targets, eps = _fixed_problem()
    problem = (hidden, weight, bias, targets, eps, None, 4, True, 1.0)
    if impl == "chunked":
        _, grads, leaves = _chunked_grads(problem, token_scale, 20, weights, torch.float32)
    else:
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        logits = leaves[0] @ leaves[1].T + leaves[2]
        smoothed_cross_entropy(logits, targets, eps, token_scale=token_scale, sample_weights=weights).backward()
        grads = [x.grad for x in leaves]
    _, detached = _reference_grads(leaves, problem, token_scale, 20, weights, detach=True)
    _, through = _reference_grads(leaves, problem, token_scale, 20, weights, detach=False)
    for ours, ref, other in zip(grads, detached, through):
        _close(ours, ref, 1e-5)
        gap = (other - ref).abs().max().item()
        assert gap > 1e-2 * ref.abs().max().item(), "the reference without detach should differ"
        assert (ours.double() - other).abs().max().item() > 100 * (ours.double() - ref).abs().max().item()


# --------------------------------------------------------------------------
# The definitions, against the formulas of the tools they come from
# --------------------------------------------------------------------------


def test_dft_is_trl_dft():
    """TRL's SFTTrainer, loss_type="dft": per token -log p_y * exp(log p_y).detach(),
    summed, divided by the supervised-token count (eps = 0, no weights)."""
    hidden, weight, _, targets, _ = _fixed_problem(1)
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.double(), -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    mask = targets != IGNORE_INDEX
    trl = ((-logp * logp.exp()) * mask).sum() / mask.sum()
    for ours in (smoothed_cross_entropy(logits, targets, 0.0, token_scale="dft"),
                 chunked_smoothed_cross_entropy(hidden, weight, targets, 0.0, chunk_size=5, token_scale="dft")):
        torch.testing.assert_close(ours.double(), trl, rtol=1e-6, atol=1e-7)


def test_eaft_is_llamafactory_eaft_up_to_its_constant():
    """LLaMA-Factory's eaft_loss_func: CE times (entropy of softmax over the top-20
    logits) / 3.0, no gradient through the weight. Ours divides by log 20 instead:
    the same loss times 3.0 / ln 20."""
    hidden, weight, _, targets, _ = _fixed_problem(2, vocab=64)
    logits = hidden @ weight.T
    z = logits.double()
    ce = F.cross_entropy(z.view(-1, 64), targets.view(-1), reduction="none").view(targets.shape)
    top = torch.topk(z, 20, dim=-1).values
    logq = top - torch.logsumexp(top, -1, keepdim=True)
    lf_weight = -(logq.exp() * logq).sum(-1) / 3.0
    mask = targets != IGNORE_INDEX
    llamafactory = (ce * lf_weight)[mask].mean()
    for ours in (smoothed_cross_entropy(logits, targets, 0.0, token_scale="eaft"),
                 chunked_smoothed_cross_entropy(hidden, weight, targets, 0.0, chunk_size=5, token_scale="eaft")):
        torch.testing.assert_close(ours.double(), llamafactory * 3.0 / math.log(20), rtol=1e-6, atol=1e-7)


def test_eaft_scale_range():
    z = torch.randn(50, 30) * 5
    s = L.topk_entropy_scale(z, 20)
    assert (s >= 0).all() and (s <= 1 + 1e-6).all()
    torch.testing.assert_close(L.topk_entropy_scale(torch.zeros(3, 30), 20), torch.ones(3))  # flat top k: s = 1
    torch.testing.assert_close(L.topk_entropy_scale(torch.zeros(3, 5), 20), torch.ones(3))  # k = min(20, V)
    # equal logits: eaft is plain (smoothed) cross-entropy
    targets = torch.randint(0, 30, (2, 4))
    flat = torch.zeros(2, 4, 30)
    torch.testing.assert_close(smoothed_cross_entropy(flat, targets, 0.2, token_scale="eaft"),
                               smoothed_cross_entropy(flat, targets, 0.2))


def test_ual_plus_dft_is_smoothed_ce_times_gold_probability():
    """The composition, written out: each token's smoothed CE times sg(p_y) (the
    model's probability of the gold token), times its sample's weight."""
    hidden, weight, bias, targets, eps = _fixed_problem(3)
    logits = hidden @ weight.T + bias
    weights = torch.tensor([0.5, 2.0, 1.0])
    per_token = L.token_smoothed_nll(logits, targets, eps.view(-1, 1))  # the smoothed CE, unscaled
    p_gold = torch.softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    n = (targets != IGNORE_INDEX).sum()
    expected = (per_token * p_gold * weights.view(-1, 1)).sum() / n
    for ours in (smoothed_cross_entropy(logits, targets, eps, token_scale="dft", sample_weights=weights),
                 chunked_smoothed_cross_entropy(hidden, weight, targets, eps, bias=bias, chunk_size=4,
                                                token_scale="dft", sample_weights=weights)):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# Sample weights and normalisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_zero_weight_removes_the_sample_but_keeps_the_denominator(impl, token_scale):
    """Weight 0 = the sample's tokens ignored, divided by the same (unweighted) token count."""
    hidden, weight, bias, targets, eps = _fixed_problem(4)
    n = int((targets != IGNORE_INDEX).sum())
    dropped = targets.clone()
    dropped[1] = IGNORE_INDEX

    def run(y, weights, num_items):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if impl == "naive":
            loss = smoothed_cross_entropy(h @ w.T + bias, y, eps, num_items, token_scale=token_scale,
                                          sample_weights=weights)
        else:
            loss = chunked_smoothed_cross_entropy(h, w, y, eps, num_items, chunk_size=5, bias=bias,
                                                  token_scale=token_scale, sample_weights=weights)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    zero = run(targets, torch.tensor([1.0, 0.0, 1.0]), None)
    ref = run(dropped, None, n)
    for a, b in zip(zero, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert (zero[1][1] == 0).all()  # no gradient reaches the zero-weight sample's hidden states
    # Weights multiply the loss linearly; all ones is no weighting.
    twice = run(targets, torch.full((3,), 2.0), None)
    ones, plain = run(targets, torch.ones(3), None), run(targets, None, None)
    for a, b, c in zip(twice, ones, plain):
        torch.testing.assert_close(a, 2 * b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7)
    everything_off = run(targets, torch.zeros(3), None)
    assert everything_off[0].item() == 0.0 and all((g == 0).all() for g in everything_off[1:])


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_gradient_accumulation_is_exact_with_modes(impl, token_scale):
    hidden, weight, bias, targets, eps = _fixed_problem(5, b=4, t=7)
    eps = torch.tensor([0.0, 0.2, 0.5, 0.9])
    weights = torch.tensor([1.0, 0.0, 2.0, 0.5])
    targets[2] = IGNORE_INDEX

    def loss_fn(h, w, y, e, sw, n):
        if impl == "naive":
            return smoothed_cross_entropy(h @ w.T, y, e, n, token_scale=token_scale, sample_weights=sw)
        return chunked_smoothed_cross_entropy(h, w, y, e, n, chunk_size=3, token_scale=token_scale, sample_weights=sw)

    w_big = weight.clone().requires_grad_()
    big = loss_fn(hidden, w_big, targets, eps, weights, None)
    big.backward()
    total = int((targets != IGNORE_INDEX).sum())
    w_acc = weight.clone().requires_grad_()
    parts = []
    for part in (slice(0, 2), slice(2, 4)):
        loss = loss_fn(hidden[part], w_acc, targets[part], eps[part], weights[part], total)
        loss.backward()
        parts.append(loss.detach())
    torch.testing.assert_close(sum(parts), big.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_acc.grad, w_big.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------
# The logged NLL, the module path, edge cases
# --------------------------------------------------------------------------


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_is_unscaled_unweighted_and_free(token_scale, dtype):
    """nll is the plain NLL whatever the mode (comparable across modes); asking for it
    changes neither the loss nor the gradients, to the bit."""
    hidden, weight, bias, targets, eps = _fixed_problem(6)
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    weights = torch.tensor([0.0, 1.5, 1.0])
    kw = dict(token_scale=token_scale, sample_weights=weights)
    plain = chunked_smoothed_cross_entropy(hidden, weight, targets, 0.0, chunk_size=4)
    runs = []
    for return_nll in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = chunked_smoothed_cross_entropy(h, w, targets, eps, chunk_size=4, return_nll=return_nll, **kw)
        loss, nll = out if return_nll else (out, None)
        loss.backward()
        runs.append((loss.detach(), nll, h.grad, w.grad))
    (l0, _, h0, w0), (l1, nll, h1, w1) = runs
    assert torch.equal(l0, l1) and torch.equal(h0, h1) and torch.equal(w0, w1)
    assert torch.equal(nll, plain.detach()) and not nll.requires_grad
    logits = hidden.float() @ weight.float().T  # the chunked loss's fp32 matmul on CPU
    naive_loss, naive_nll = smoothed_cross_entropy(logits, targets, eps, return_nll=True, **kw)
    assert torch.equal(naive_nll, smoothed_cross_entropy(logits, targets, 0.0))
    torch.testing.assert_close(nll, naive_nll, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
def test_module_path_modes(token_scale):
    """A head that is not a plain Linear (LoRA): the checkpointed chunk path applies the same modes."""
    torch.manual_seed(7)
    head = _LoraLikeHead(12, 30)
    hidden = torch.randn(3, 11, 12)
    targets = torch.randint(0, 30, (3, 11))
    targets[0, :4] = IGNORE_INDEX
    eps, weights = torch.tensor([0.3, 0.0, 0.8]), torch.tensor([1.0, 0.0, 2.0])
    L._warned_module_fallback = True
    results = []
    for chunked in (False, True):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        kw = dict(token_scale=token_scale, eaft_topk=5, sample_weights=weights)
        if chunked:
            loss = chunked_smoothed_cross_entropy(h, head, targets, eps, chunk_size=6, **kw)
        else:
            loss = smoothed_cross_entropy(head(h), targets, eps, **kw)
        loss.backward()
        results.append([loss.detach(), h.grad] + [p.grad.clone() for p in head.parameters()])
    for a, b in zip(*results):
        _close(a, b, 1e-5)


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_all_ignored_batch_is_zero_with_modes(impl, token_scale):
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    targets = torch.full((2, 3), IGNORE_INDEX)
    kw = dict(token_scale=token_scale, sample_weights=torch.tensor([1.0, 2.0]))
    if impl == "naive":
        loss = smoothed_cross_entropy(hidden @ weight.T, targets, 0.1, **kw)
    else:
        loss = chunked_smoothed_cross_entropy(hidden, weight, targets, 0.1, **kw)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in (hidden.grad, weight.grad))


def test_scales_with_underflowing_gold_probability():
    # Logits of hundreds of nats, gold the least likely token: p_y underflows in fp32, the loss's
    # lse comes from the exact fallback, and dft's s = exp(z_y - lse) is ~0 (not NaN).
    torch.manual_seed(2)
    hidden = torch.randn(1, 6, 8)
    weight = torch.randn(40, 8) * 30
    targets = (hidden @ weight.T).argmin(-1)
    for lse_from_softmax in (True, False):
        problem = (hidden, weight, None, targets, torch.tensor([0.3]), None, 4, lse_from_softmax, 1.0)
        for token_scale in ("dft", "eaft"):
            loss, grads, leaves = _chunked_grads(problem, token_scale, 20, None, torch.float32)
            ref, ref_grads = _reference_grads(leaves, problem, token_scale, 20, None)
            assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads[:2])
            # eaft's entropies here (1e-28 .. 7e-3) come from top-k logit gaps computed from
            # fp32 logits of ~500 (ulp 3e-5): relative error ~1e-4 against float64 logits,
            # in the naive fp32 path alike; against that path the chunked loss is exact.
            rtol = 1e-5 if token_scale == "dft" else 1e-3
            _close(loss, ref, rtol)
            for a, b in zip(grads[:2], ref_grads[:2]):
                _close(a, b, rtol)
            naive = smoothed_cross_entropy(hidden @ weight.T, targets, 0.3, token_scale=token_scale)
            _close(loss, naive, 1e-5)


def test_bad_arguments():
    logits, targets = torch.randn(1, 3, 5), torch.randint(0, 5, (1, 3))
    with pytest.raises(ValueError, match="token_scale"):
        smoothed_cross_entropy(logits, targets, 0.0, token_scale="focal")
    with pytest.raises(ValueError, match="token_scale"):
        chunked_smoothed_cross_entropy(torch.randn(1, 3, 4), torch.randn(5, 4), targets, 0.0, token_scale="DFT")
    with pytest.raises(ValueError, match="eaft"):
        smoothed_cross_entropy(logits, targets, 0.0, token_scale="eaft", eaft_topk=1)


# --------------------------------------------------------------------------
# Training glue: UALTrainer, the TRL drop-in, the modes of `ual train` / `ual ablate`
# --------------------------------------------------------------------------

WEIGHTS = [1.0, 0.0, 2.0, 0.5]


@pytest.mark.parametrize("token_scale", ["dft", "eaft"])
def test_trainer_step_with_token_scale_and_weights_chunked_equals_naive(tmp_path, token_scale):
    """One optimiser step of UALTrainer (accumulation 2, per-sample weights from the dataset):
    the chunked and naive losses give the same update, and the trainer's loss is the loss function's."""
    from test_loss import _tiny_llama
    from transformers import TrainingArguments

    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    gen = torch.Generator().manual_seed(8)
    encoded = []
    for n in (12, 7, 15, 9):
        ids = torch.randint(1, 64, (n,), generator=gen).tolist()
        encoded.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
    eps = [0.0, 0.5, 0.2, 0.9]

    def step(loss_impl):
        model = _tiny_llama(tie=True)
        args = TrainingArguments(
            output_dir=str(tmp_path / loss_impl), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none",
            use_cpu=True, save_strategy="no", remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True,
            logging_steps=1,
        )
        trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(encoded, eps, WEIGHTS),
                             data_collator=SmoothingCollator(0), loss_impl=loss_impl, token_scale=token_scale)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        batch = SmoothingCollator(0)([trainer.train_dataset[i] for i in range(4)])
        assert torch.equal(batch["weight"], torch.tensor(WEIGHTS))
        with torch.no_grad():  # the whole batch through the trainer = the loss function on its logits
            direct = smoothed_cross_entropy(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                            L.shift_labels(batch["labels"]), batch["eps"], token_scale=token_scale,
                                            sample_weights=batch["weight"])
            model.eval()
            via = trainer.compute_loss(model, dict(batch))
            model.train()
        torch.testing.assert_close(via, direct, rtol=1e-5, atol=1e-7)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        return out.training_loss, {n: before[n] - p.detach() for n, p in model.named_parameters()}, logged

    naive_loss, naive, naive_log = step("naive")
    loss, chunked, chunked_log = step("chunked")
    assert loss == pytest.approx(naive_loss, rel=1e-5)
    assert chunked_log[0]["nll"] == pytest.approx(naive_log[0]["nll"], rel=1e-5)
    assert chunked_log[0]["nll"] != pytest.approx(chunked_log[0]["loss"], rel=1e-3)  # nll is unscaled
    for name in naive:
        _close(chunked[name], naive[name], 1e-4)
    assert any(naive[n].abs().max() > 0 for n in naive)


def test_training_modes():
    from types import SimpleNamespace

    from ual.training.ablate import ALL_MODES, DEFAULT_MODES, parse_modes
    from ual.training.plan import MODES, mode_parts, uses_smoothing_map
    from ual.training.stage import eps_for_mode

    assert ALL_MODES == MODES and set(DEFAULT_MODES) <= set(MODES)
    assert parse_modes("sft,ls,ual,dft,eaft,ual+dft") == ["sft", "ls", "ual", "dft", "eaft", "ual+dft"]
    assert [mode_parts(m) for m in ("sft", "ual", "dft", "eaft", "ual+dft", "ual+eaft")] == [
        ("sft", "none"), ("ual", "none"), ("sft", "dft"), ("sft", "eaft"), ("ual", "dft"), ("ual", "eaft")]
    assert [uses_smoothing_map(m) for m in ("sft", "dft", "ual", "ual+dft")] == [False, False, True, True]
    samples = ["a", "b"]  # the samples' ids
    cfg = SimpleNamespace(smoothing=SimpleNamespace(target_mean=0.3))
    assert eps_for_mode("dft", samples, cfg, None).tolist() == [0.0, 0.0]
    assert eps_for_mode("eaft", samples, cfg, None).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown training mode"):
        eps_for_mode("focal", samples, cfg, None)
