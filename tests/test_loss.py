"""Exactness of the per-sample label-smoothed losses (docs/method.md §3).

Everything is checked against a dense reference written out by hand here: the
full (T, V) target distribution (1 - eps) * onehot(y) + eps / V, and
-sum(target * log_softmax(logits)), in float64; with a token scale and sample
weights (`dense_reference`'s other arguments) it is the reference of
tests/test_loss_token_modes.py too.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ual.loss as L
from ual.loss import IGNORE_INDEX, chunked_smoothed_cross_entropy, shift_labels, smoothed_cross_entropy

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def _per_sample(values, targets):
    t = torch.as_tensor(values, dtype=torch.float64)
    if t.dim() == 1:
        t = t.view(-1, *([1] * (targets.dim() - 1)))
    return t.expand(targets.shape)


def reference_scale(logits, targets, token_scale, k=20):
    """s per token (float64, NOT detached): p_y, or the top-k entropy over log k."""
    z = logits.double()
    if token_scale == "dft":
        return torch.log_softmax(z, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1).exp()
    if token_scale == "eaft":
        k = min(k, z.shape[-1])
        logq = torch.log_softmax(torch.topk(z, k, dim=-1).values, -1)
        return -(logq.exp() * logq).sum(-1) / math.log(k)
    return torch.ones(targets.shape, dtype=torch.float64)


def dense_reference(logits, targets, eps, num_items=None, token_scale="none", k=20, weights=None, detach=True):
    """sum_t w_i * s_t * (-sum_v target_v log p_v) / count, dense, float64."""
    z = logits.double()
    vocab = z.shape[-1]
    eps = _per_sample(eps, targets).unsqueeze(-1)
    mask = targets != IGNORE_INDEX
    onehot = F.one_hot(targets.clamp_min(0), vocab).double()
    per_token = -(((1 - eps) * onehot + eps / vocab) * torch.log_softmax(z, -1)).sum(-1)
    s = reference_scale(z, targets, token_scale, k)
    per_token = per_token * (s.detach() if detach else s)
    if weights is not None:
        per_token = per_token * _per_sample(weights, targets)
    denom = mask.sum() if num_items is None else torch.as_tensor(num_items)
    return (per_token * mask).sum() / denom.clamp_min(1).double()



def _close(actual, expected, rtol, floor=0.0):
    """Relative to the tensor's own scale (elementwise relative error is meaningless
    where a gradient entry is a cancellation of much larger terms), or to `floor`,
    the scale of the terms that cancel, where that is larger."""
    expected = expected.double()
    actual = actual.double()
    scale = max(expected.abs().max().item(), floor)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-12))


@st.composite
def problems(draw, max_b=3, max_t=6, max_h=8, max_v=24):
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    h = draw(st.integers(1, max_h))
    v = draw(st.integers(2, max_v))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    eps_values = st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))
    eps = torch.tensor(draw(st.lists(eps_values, min_size=b, max_size=b)), dtype=torch.float32)
    if draw(st.booleans()):
        eps = float(eps[0])
    mask_p = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))  # fraction supervised
    targets = torch.randint(0, v, (b, t), generator=gen)
    targets[torch.rand(b, t, generator=gen) >= mask_p] = IGNORE_INDEX
    logit_scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * logit_scale / h**0.5
    bias = torch.randn(v, generator=gen) if draw(st.booleans()) else None
    n_sup = int((targets != IGNORE_INDEX).sum())
    num_items = draw(st.sampled_from([None, n_sup + draw(st.integers(0, 5))]))
    chunk = draw(st.sampled_from([None, 1, 2, 3, 5, 64]))
    lse_from_softmax = draw(st.booleans())
    grad_scale = draw(st.sampled_from([1.0, 2.5]))
    return hidden, weight, bias, targets, eps, num_items, chunk, lse_from_softmax, grad_scale


def _chunked_grads(problem, token_scale, k, weights, dtype):
    """The chunked loss and its gradients on `problem` (see problems()), inputs cast to `dtype`."""
    hidden, weight, bias, targets, eps, num_items, chunk, lse_from_softmax, grad_scale = problem
    h, w, b = (None if x is None else x.detach().to(dtype).clone().requires_grad_() for x in (hidden, weight, bias))
    loss = chunked_smoothed_cross_entropy(h, w, targets, eps, num_items, chunk_size=chunk, bias=b,
                                          lse_from_softmax=lse_from_softmax, token_scale=token_scale, eaft_topk=k,
                                          sample_weights=weights)
    (loss * grad_scale).backward()
    return loss, [h.grad, w.grad, None if b is None else b.grad], (h, w, b)


def _reference_grads(leaves, problem, token_scale, k, weights, detach=True):
    targets, eps, num_items, grad_scale = problem[3], problem[4], problem[5], problem[8]
    h, w, b = (None if x is None else x.detach().double().requires_grad_() for x in leaves)
    logits = h @ w.T + (0 if b is None else b)
    loss = dense_reference(logits, targets, eps, num_items, token_scale, k, weights, detach)
    (loss * grad_scale).backward()
    return loss, [h.grad, w.grad, None if b is None else b.grad]


def _check(case, dtype, rtol, term_scale=False):
    """case: (problem, token_scale, eaft k, weights): the chunked loss and gradients against the dense reference."""
    problem, token_scale, k, weights = case
    loss, grads, leaves = _chunked_grads(problem, token_scale, k, weights, dtype)
    ref, ref_grads = _reference_grads(leaves, problem, token_scale, k, weights)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    _close(loss, ref, rtol)
    g = problem[8]
    # Low-precision GEMMs: the error is relative to the terms that cancel (see test_loss).
    floors = [g * leaves[1].detach().abs().max().item(), g * leaves[0].detach().abs().max().item(), g]
    for actual, expected, floor in zip(grads, ref_grads, floors):
        if expected is not None:
            _close(actual, expected, rtol, floor if term_scale else 0.0)



@settings(max_examples=100, **SETTINGS)
@given(problems())
def test_chunked_matches_dense_reference_fp32(problem):
    _check((problem, "none", 20, None), torch.float32, 1e-5)


@settings(max_examples=40, **SETTINGS)
@given(problems())
def test_chunked_matches_dense_reference_bf16(problem):
    # Inputs are bf16; the reference uses the same bf16 values in float64, so the
    # only loss of precision is rounding the returned gradients to bf16.
    _check((problem, "none", 20, None), torch.bfloat16, 1e-2)


@settings(max_examples=25, **SETTINGS)
@given(problems())
def test_chunked_bf16_native_matmul_path(problem):
    # The CUDA code path (bf16 GEMMs with fp32 results), exercised on CPU.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(L, "_LOWP_MM_DEVICES", ("cuda", "cpu"))
        _check((problem, "none", 20, None), torch.bfloat16, 2e-2, term_scale=True)


@settings(max_examples=100, **SETTINGS)
@given(problems())
def test_naive_matches_dense_reference(problem):
    hidden, weight, bias, targets, eps, num_items, *_ = problem
    logits = (hidden @ weight.T + (0 if bias is None else bias)).requires_grad_()
    loss = smoothed_cross_entropy(logits, targets, eps, num_items)
    loss.backward()
    leaf = logits.detach().double().requires_grad_()
    ref = dense_reference(leaf, targets, eps, num_items)
    ref.backward()
    _close(loss, ref, 1e-5)
    _close(logits.grad, leaf.grad, 1e-5)


@settings(max_examples=50, **SETTINGS)
@given(problems())
def test_naive_eps_zero_is_cross_entropy(problem):
    hidden, weight, bias, targets, *_ = problem
    logits = hidden @ weight.T
    ours = smoothed_cross_entropy(logits, targets, torch.zeros(targets.shape[0]))
    ours_float = smoothed_cross_entropy(logits, targets, 0.0)
    if (targets != IGNORE_INDEX).any():
        ref = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    else:
        assert ours.item() == 0.0
    torch.testing.assert_close(ours, ours_float)


def test_naive_uniform_eps_is_torch_label_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13)
    targets = torch.randint(0, 13, (2, 5))
    targets[0, :2] = IGNORE_INDEX
    ours = smoothed_cross_entropy(logits, targets, 0.3)
    ref = F.cross_entropy(logits.reshape(-1, 13), targets.reshape(-1), label_smoothing=0.3)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_gradient_accumulation_equals_one_big_batch(impl):
    torch.manual_seed(1)
    b, t, hid, v = 4, 9, 6, 17
    hidden = torch.randn(b, t, hid)
    weight = torch.randn(v, hid)
    targets = torch.randint(0, v, (b, t))
    targets[torch.rand(b, t) < 0.4] = IGNORE_INDEX
    targets[2] = IGNORE_INDEX  # one half has fewer supervised tokens
    eps = torch.tensor([0.0, 0.2, 0.5, 0.9])

    def loss_fn(h, w, y, e, n):
        if impl == "naive":
            return smoothed_cross_entropy(h @ w.T, y, e, n)
        return chunked_smoothed_cross_entropy(h, w, y, e, n, chunk_size=4)

    w_big = weight.clone().requires_grad_()
    loss_fn(hidden, w_big, targets, eps, None).backward()

    total = int((targets != IGNORE_INDEX).sum())
    w_acc = weight.clone().requires_grad_()
    losses = []
    for part in (slice(0, 2), slice(2, 4)):
        loss = loss_fn(hidden[part], w_acc, targets[part], eps[part], total)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(w_acc.grad, w_big.grad, rtol=1e-5, atol=1e-7)
    big = smoothed_cross_entropy(hidden @ weight.T, targets, eps)
    torch.testing.assert_close(sum(losses), big, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_all_ignored_batch_is_zero_with_zero_grads(impl, dtype):
    hidden = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
    weight = torch.randn(7, 4, dtype=dtype, requires_grad=True)
    targets = torch.full((2, 3), IGNORE_INDEX)
    if impl == "naive":
        loss = smoothed_cross_entropy(hidden @ weight.T, targets, torch.tensor([0.1, 0.5]))
    else:
        loss = chunked_smoothed_cross_entropy(hidden, weight, targets, torch.tensor([0.1, 0.5]))
    loss.backward()
    assert loss.item() == 0.0
    for g in (hidden.grad, weight.grad):
        assert g is not None and torch.isfinite(g).all() and (g == 0).all()


def test_chunked_underflowing_gold_probability_is_exact():
    # Gold logits far below the max: p_y underflows in fp32 and the log-normaliser
    # must come from the exact fallback, not from log(p_y).
    torch.manual_seed(2)
    hidden = torch.randn(1, 6, 8)
    weight = torch.randn(40, 8) * 30
    logits = hidden @ weight.T
    targets = logits.argmin(-1)  # the least likely token: loss of hundreds of nats
    eps = torch.tensor([0.3])
    for lse_from_softmax in (True, False):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss = chunked_smoothed_cross_entropy(h, w, targets, eps, chunk_size=4, lse_from_softmax=lse_from_softmax)
        loss.backward()
        ref, (rh, rw, _) = _reference_grads((h, w, None), (None, None, None, targets, eps, None, None, None, 1.0),
                                            "none", 20, None)
        assert ref.item() > 100
        _close(loss, ref, 1e-5)
        _close(h.grad, rh, 1e-5)
        _close(w.grad, rw, 1e-5)


def test_chunked_without_grad_and_single_backward():
    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    targets = torch.randint(0, 9, (2, 5))
    with torch.no_grad():
        loss = chunked_smoothed_cross_entropy(hidden, weight, targets, 0.1)
    torch.testing.assert_close(loss, smoothed_cross_entropy(hidden @ weight.T, targets, 0.1).detach())
    # Only the hidden states need a gradient (a frozen lm_head, as with LoRA).
    frozen = weight.detach()
    chunked_smoothed_cross_entropy(hidden, frozen, targets, 0.1).backward()
    hidden_grad = hidden.grad.clone()
    hidden.grad = None
    smoothed_cross_entropy(hidden @ frozen.T, targets, 0.1).backward()
    torch.testing.assert_close(hidden_grad, hidden.grad)
    loss = chunked_smoothed_cross_entropy(hidden, weight, targets, 0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_chunked_tied_embeddings_accumulate():
    """The output projection shares its weight with the input embedding."""
    torch.manual_seed(4)
    v, hid = 19, 6
    emb = torch.nn.Embedding(v, hid)
    mix = torch.nn.Linear(hid, hid)
    ids = torch.randint(0, v, (3, 7))
    targets = shift_labels(ids)
    targets[0, :3] = IGNORE_INDEX
    eps = torch.tensor([0.0, 0.4, 1.0])

    def run(chunked):
        emb.zero_grad()
        mix.zero_grad()
        hidden = torch.tanh(mix(emb(ids)))
        if chunked:
            loss = chunked_smoothed_cross_entropy(hidden, emb.weight, targets, eps, chunk_size=5)
        else:
            loss = smoothed_cross_entropy(hidden @ emb.weight.T, targets, eps)
        loss.backward()
        return loss.detach(), emb.weight.grad.clone(), mix.weight.grad.clone()

    naive, chunked = run(False), run(True)
    for a, b in zip(chunked, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Both uses contribute: the tied weight's gradient differs from that of its use as the head alone.
    emb.zero_grad()
    chunked_smoothed_cross_entropy(torch.tanh(mix(emb(ids))).detach(), emb.weight, targets, eps, chunk_size=5).backward()
    head_only = emb.weight.grad.clone()
    assert head_only.abs().sum() > 0
    assert not torch.allclose(chunked[1], head_only, rtol=1e-3, atol=1e-5)


def _tiny_llama(tie=True):
    from tiny_models import tiny_llama

    return tiny_llama(64, seed=5, tie_word_embeddings=tie)


def _model_losses(model, head_arg):
    torch.manual_seed(6)
    ids = torch.randint(0, 64, (2, 10))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    targets = shift_labels(labels)
    eps = torch.tensor([0.2, 0.6])
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            hidden = base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            head = base.get_output_embeddings()
            loss = chunked_smoothed_cross_entropy(hidden, head_arg(head), targets, eps, chunk_size=3)
        else:
            loss = smoothed_cross_entropy(model(input_ids=ids, use_cache=False).logits, targets, eps)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    return results


@pytest.mark.parametrize("head_arg", [lambda m: m.weight, lambda m: m], ids=["weight", "module"])
@pytest.mark.parametrize("tie", [True, False])
def test_chunked_on_hf_causal_lm(tie, head_arg):
    model = _tiny_llama(tie)
    (naive_loss, naive_grads), (loss, grads) = _model_losses(model, head_arg)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == naive_grads.keys()
    for name in grads:
        _close(grads[name], naive_grads[name], 1e-5)


@pytest.mark.parametrize("targets_", [["q_proj", "v_proj"], ["q_proj", "v_proj", "lm_head"]])
def test_chunked_with_lora(targets_, recwarn):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(tie=False), LoraConfig(r=4, lora_alpha=8, target_modules=targets_, init_lora_weights=False)
    )
    L._warned_module_fallback = False
    (naive_loss, naive_grads), (loss, grads) = _model_losses(model, lambda m: m)
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == naive_grads.keys() and any("lora" in n for n in grads)
    for name in grads:
        _close(grads[name], naive_grads[name], 1e-5)
    fallback = [w for w in recwarn.list if "slower chunk-by-chunk" in str(w.message)]
    assert len(fallback) == ("lm_head" in targets_)
    if fallback:  # said once, not at every call
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _model_losses(model, lambda m: m)


def test_loss_benchmark_quick_runs_and_ends_with_json():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "loss.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.startswith("| ual_chunked |") for line in lines)
    result = json.loads(lines[-1])
    for shape in ("smollm2", "llama7b_head"):
        for key in ("time_vs_ce", "time_vs_torch_chunked", "mem_vs_ce"):
            assert result[shape][key] is None or result[shape][key] > 0
        assert result[shape]["time_vs_ce"] > 0


@pytest.mark.parametrize("lora_targets", [None, ["q_proj", "v_proj"], ["v_proj", "lm_head"]])
def test_trainer_chunked_step_equals_naive(tmp_path, lora_targets):
    """One optimiser step of UALTrainer (train.loss = chunked vs naive, tied
    embeddings, with and without LoRA, LoRA on the output projection too) gives the same update."""
    from transformers import TrainingArguments

    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    gen = torch.Generator().manual_seed(7)
    encoded = []
    for n in (12, 7, 15, 9):
        ids = torch.randint(1, 64, (n,), generator=gen).tolist()
        encoded.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3 :]})
    eps = [0.0, 0.5, 0.2, 0.9]

    def step(loss_impl):
        model = _tiny_llama(tie=True)
        if lora_targets:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets, init_lora_weights=False))
        args = TrainingArguments(
            output_dir=str(tmp_path / loss_impl), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none",
            use_cpu=True, save_strategy="no", remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True,
        )
        trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(encoded, eps),
                             data_collator=SmoothingCollator(0), loss_impl=loss_impl)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        out = trainer.train()
        after = dict(model.named_parameters())
        return out.training_loss, {n: before[n] - after[n].detach() for n in before}

    naive_loss, naive = step("naive")
    loss, chunked = step("chunked")
    assert loss == pytest.approx(naive_loss, rel=1e-5)
    assert naive.keys() == chunked.keys()
    moved = 0
    for name in naive:
        _close(chunked[name], naive[name], 1e-4)
        moved += bool(naive[name].abs().max() > 0)
    assert moved > 0


def test_auto_loss_picks_chunked_where_it_can_run():
    from transformers import Gemma2Config, LlamaConfig

    from ual.training.trainer import resolve_loss

    assert resolve_loss("auto", "none", LlamaConfig()) == "chunked"
    assert resolve_loss("auto", "fsdp", LlamaConfig()) == "naive"  # sharded lm_head
    assert resolve_loss("auto", "zero3", LlamaConfig()) == "naive"
    assert resolve_loss("auto", "zero2", LlamaConfig()) == "chunked"
    assert resolve_loss("auto", "none", Gemma2Config(final_logit_softcapping=30.0)) == "naive"  # logits != h @ W
    assert resolve_loss("naive", "none", LlamaConfig()) == "naive"


# --------------------------------------------------------------------------
# return_nll: the plain NLL (eps = 0 term) logged beside every mode's objective
# --------------------------------------------------------------------------


def _nll_reference(hidden, weight, bias, targets, num_items):
    """What the loss returns with eps = 0, from the same (possibly bf16) values in fp32."""
    logits = hidden.float() @ weight.float().T + (0 if bias is None else bias.float())
    return smoothed_cross_entropy(logits, targets, 0.0, num_items_in_batch=num_items)


def _run_both(fn, leaves):
    """fn(*leaves, return_nll) with and without return_nll: loss, nll and gradients of each."""
    runs = []
    for return_nll in (False, True):
        xs = [None if x is None else x.detach().clone().requires_grad_() for x in leaves]
        out = fn(*xs, return_nll)
        loss, nll = out if return_nll else (out, None)
        loss.backward()
        runs.append((loss.detach(), nll, [None if x is None else x.grad for x in xs]))
    return runs


def _assert_same_loss_and_grads(runs):
    (loss0, _, grads0), (loss1, nll, grads1) = runs
    # Asking for the NLL must not change what is optimised, to the bit.
    assert torch.equal(loss0, loss1)
    for g0, g1 in zip(grads0, grads1):
        assert (g0 is None) == (g1 is None)
        if g0 is not None:
            assert torch.equal(g0, g1)
    assert nll.dtype == torch.float32 and nll.dim() == 0
    assert not nll.requires_grad and nll.grad_fn is None
    return nll


def _check_chunked_nll(problem, dtype, rtol):
    hidden, weight, bias, targets, eps, num_items, chunk, lse_from_softmax, _ = problem
    leaves = [hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)]

    def fn(h, w, b, return_nll):
        return chunked_smoothed_cross_entropy(h, w, targets, eps, num_items, chunk_size=chunk, bias=b,
                                              lse_from_softmax=lse_from_softmax, return_nll=return_nll)

    nll = _assert_same_loss_and_grads(_run_both(fn, leaves))
    _close(nll, _nll_reference(*leaves, targets, num_items), rtol)
    with torch.no_grad():  # the chunked loss's own eps = 0 value: the very same sum
        zero = chunked_smoothed_cross_entropy(*leaves[:2], targets, 0.0, num_items, chunk_size=chunk, bias=leaves[2],
                                              lse_from_softmax=lse_from_softmax)
    assert torch.equal(nll, zero)


@settings(max_examples=60, **SETTINGS)
@given(problems())
def test_chunked_nll_is_the_eps_zero_loss_fp32(problem):
    _check_chunked_nll(problem, torch.float32, 1e-5)


@settings(max_examples=30, **SETTINGS)
@given(problems())
def test_chunked_nll_is_the_eps_zero_loss_bf16(problem):
    # bf16 inputs, fp32 matmuls on CPU: the reference sees the same bf16 values.
    _check_chunked_nll(problem, torch.bfloat16, 1e-5)


@settings(max_examples=60, **SETTINGS)
@given(problems(), st.sampled_from([torch.float32, torch.bfloat16]))
def test_naive_nll_is_the_eps_zero_loss(problem, dtype):
    hidden, weight, bias, targets, eps, num_items, *_ = problem
    logits = (hidden @ weight.T + (0 if bias is None else bias)).to(dtype)

    def fn(z, return_nll):
        return smoothed_cross_entropy(z, targets, eps, num_items, return_nll=return_nll)

    nll = _assert_same_loss_and_grads(_run_both(fn, [logits]))
    assert torch.equal(nll, smoothed_cross_entropy(logits, targets, 0.0, num_items_in_batch=num_items))


def test_chunked_nll_several_chunks_masks_and_per_sample_eps():
    """The explicit case: many chunks, prompt masks, per-sample eps, with and without num_items_in_batch."""
    gen = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(3, 40, 16, generator=gen), torch.randn(50, 16, generator=gen) / 4
    targets = torch.randint(0, 50, (3, 40), generator=gen)
    targets[0, :10], targets[1, :25], targets[2, 35:] = IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX
    eps = torch.tensor([0.1, 0.7, 0.35])
    n_sup = int((targets != IGNORE_INDEX).sum())
    for dtype in (torch.float32, torch.bfloat16):
        for num_items in (None, n_sup + 17):
            _check_chunked_nll((hidden, weight, None, targets, eps, num_items, 7, True, 1.0), dtype, 1e-5)
            _check_chunked_nll((hidden, weight, None, targets, eps, num_items, 7, False, 1.0), dtype, 1e-5)


class _LoraLikeHead(torch.nn.Module):
    """Not an nn.Linear: W h + B A h, as a LoRA-wrapped lm_head computes it."""

    def __init__(self, hid, vocab, rank=3):
        super().__init__()
        self.base = torch.nn.Linear(hid, vocab, bias=False)
        self.lora_A = torch.nn.Linear(hid, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, vocab, bias=False)
        self.out_features = vocab

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class _LinearWithAdapter(torch.nn.Linear):
    """An nn.Linear subclass carrying `lora_A`: not plain, so the module path must run its forward."""

    def __init__(self, hid, vocab):
        super().__init__(hid, vocab)
        self.lora_A = torch.nn.Parameter(torch.randn(vocab, hid) * 0.05)

    def forward(self, x):
        return super().forward(x) + x @ self.lora_A.T


@pytest.mark.parametrize("make_head", [_LoraLikeHead, _LinearWithAdapter], ids=["lora_like", "linear_subclass"])
@pytest.mark.parametrize("num_items", [None, 71])
def test_module_fallback_returns_the_nll(make_head, num_items):
    torch.manual_seed(3)
    head = make_head(12, 30)
    hidden = torch.randn(2, 25, 12)
    targets = torch.randint(0, 30, (2, 25))
    targets[0, :8] = IGNORE_INDEX
    eps = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        ref = smoothed_cross_entropy(head(hidden), targets, 0.0, num_items_in_batch=num_items)
    L._warned_module_fallback = True  # the warning has its own test
    runs = []
    for return_nll in (False, True):
        head.zero_grad()
        h = hidden.clone().requires_grad_()
        out = chunked_smoothed_cross_entropy(h, head, targets, eps, num_items, chunk_size=6, return_nll=return_nll)
        loss, nll = out if return_nll else (out, None)
        loss.backward()  # through the checkpointed chunks
        runs.append((loss.detach(), nll, [h.grad] + [p.grad.clone() for p in head.parameters()]))
    nll = _assert_same_loss_and_grads(runs)
    _close(nll, ref, 1e-5)
    with torch.no_grad():  # the path without checkpointing
        loss_ng, nll_ng = chunked_smoothed_cross_entropy(hidden, head, targets, eps, num_items, chunk_size=6,
                                                         return_nll=True)
    assert torch.equal(nll_ng, nll) and torch.equal(loss_ng, runs[0][0])


@pytest.mark.parametrize("impl", ["naive", "chunked"])
def test_all_ignored_batch_nll_is_zero(impl):
    hidden, weight = torch.randn(2, 4, 8), torch.randn(10, 8)
    targets = torch.full((2, 4), IGNORE_INDEX)
    if impl == "naive":
        loss, nll = smoothed_cross_entropy(hidden @ weight.T, targets, 0.4, return_nll=True)
    else:
        loss, nll = chunked_smoothed_cross_entropy(hidden, weight, targets, 0.4, return_nll=True)
    assert loss.item() == 0.0 and nll.item() == 0.0
