"""train.batching: a padding-free row (or a length-grouped padded batch) trains exactly as the padded batch
of the same samples, on a real length mix (ShareGPT first exchanges and GSM8K, shipped offline), with a
sample cut at max_length and a sample with no supervised token among them."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from ual.data.sources import load_gsm8k, load_sharegpt
from ual.data.tokenize import encode_sample
from ual.loss import IGNORE_INDEX
from ual.training.batches import (
    PACKED_ATTENTION,
    LengthGroupedSampler,
    PaddingFreeCollator,
    check_packed_attention,
    pad_share,
    prepare_packed_attention,
    register_sdpa_varlen,
    sample_lengths,
)
from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def mix(tokenizer):
    """Seven real samples of mixed length: short and long ShareGPT exchanges (one cut at max_length with
    supervised tokens, one whose prompt alone fills max_length: no supervised token) and GSM8K problems."""
    chats, _ = load_sharegpt(limit=60)
    maths, _ = load_gsm8k()
    enc = [encode_sample(tokenizer, s.messages, MAX_LENGTH) for s in chats]
    supervised = [any(x != IGNORE_INDEX for x in e["labels"]) for e in enc]
    cut = next(e for e, s in zip(enc, supervised) if s and len(e["input_ids"]) == MAX_LENGTH)
    empty = next(e for e, s in zip(enc, supervised) if not s)
    short = sorted((e for e, s in zip(enc, supervised) if s and len(e["input_ids"]) < MAX_LENGTH),
                   key=lambda e: len(e["input_ids"]))
    gsm = [encode_sample(tokenizer, s.messages, MAX_LENGTH) for s in maths[:2]]
    return [short[0], cut, gsm[0], empty, short[-1], gsm[1], short[len(short) // 2]]


EPS = [0.0, 0.3, 0.1, 0.5, 0.9, 0.2, 0.05]
WEIGHTS = [1.0, 2.0, 0.0, 1.0, 0.5, 1.5, 1.0]


def _trainer(model_dir, tmp_path, rows, eps=EPS, weights=WEIGHTS, collator=None, accumulation=1, batch=None,
             steps=1, attn="sdpa", **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=batch or len(rows),
                             gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=1.0,
                             optim="sgd", lr_scheduler_type="constant", report_to="none", use_cpu=True,
                             save_strategy="no", remove_unused_columns=False, seed=0, disable_tqdm=True,
                             logging_steps=1)
    return UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(rows, eps, weights),
                      data_collator=collator or SmoothingCollator(0), **kw)


def test_mix_has_what_the_exactness_needs(mix):
    lengths = [len(e["input_ids"]) for e in mix]
    assert MAX_LENGTH in lengths and min(lengths) < MAX_LENGTH // 2
    assert sum(all(x == IGNORE_INDEX for x in e["labels"]) for e in mix) >= 1


def test_padding_free_row_layout(mix):
    rows = [{**e, "eps": x, "weight": w} for e, x, w in zip(mix, EPS, WEIGHTS)]
    batch = PaddingFreeCollator(varlen=True)(rows)
    lengths = torch.tensor([len(e["input_ids"]) for e in mix])
    total = int(lengths.sum())
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, total)
    assert "attention_mask" not in batch  # a mask would hide the sample boundaries from the attention
    starts = torch.cumsum(lengths, 0) - lengths
    assert torch.equal(batch["position_ids"][0, starts], torch.zeros(len(mix), dtype=torch.long))
    assert (batch["labels"][0, starts] == IGNORE_INDEX).all()
    for i, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist())):
        assert torch.equal(batch["input_ids"][0, s : s + n], torch.tensor(mix[i]["input_ids"]))
        assert torch.equal(batch["labels"][0, s + 1 : s + n], torch.tensor(mix[i]["labels"][1:]))
        assert (batch["eps"][0, s : s + n] == torch.tensor(EPS[i])).all()
        assert (batch["weight"][0, s : s + n] == torch.tensor(WEIGHTS[i])).all()
    assert batch["cu_seq_lens_q"].tolist() == [*starts.tolist(), total]
    assert batch["max_length_q"] == int(lengths.max())


def _flat_and_alone(model, mix):
    batch = PaddingFreeCollator(varlen=True)(mix)
    boundaries = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                     **boundaries).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]]), use_cache=False).logits[0] for e in mix])
    return flat, alone


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex_attention", "sdpa_varlen"])
def test_cpu_attention_keeps_samples_apart(tiny_model_dir, mix, attn):
    register_sdpa_varlen()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    assert check_packed_attention(model) == attn
    flat, alone = _flat_and_alone(model, mix)
    torch.testing.assert_close(flat, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [4096, 16])
def test_sdpa_varlen_keeps_samples_apart_under_a_sliding_window(tokenizer, mix, window):
    """Mistral's sliding window: 4096 (the paper's models) binds on no sample of the mix, so each sample runs
    plain causal; 16 binds on most, so the row takes sdpa with transformers' packed sliding mask. Both give
    each sample its own logits."""
    from transformers import MistralConfig, MistralForCausalLM

    from tiny_models import tiny_llama_config

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**tiny_llama_config(len(tokenizer), sliding_window=window))).eval()
    model.set_attn_implementation(register_sdpa_varlen())
    flat, alone = _flat_and_alone(model, mix)
    torch.testing.assert_close(flat, alone, rtol=1e-4, atol=1e-5)


def test_sdpa_varlen_runs_each_sample_alone_when_the_window_never_binds():
    """The per-sample path ignores the row's mask (None here: over the whole row it would be causal across
    samples); a window shorter than a sample falls back to sdpa on the row, here without a mask: not apart."""
    from ual.training.batches import sdpa_varlen_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 8) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = True
    expected = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True).transpose(1, 2) for a, b in ((0, 5), (5, 12))], 1)
    for window in (None, 7, 100):
        out, _ = sdpa_varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, sliding_window=window)
        torch.testing.assert_close(out, expected)
    out, _ = sdpa_varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu, sliding_window=6)
    assert (out - expected).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attention's varlen kernel needs CUDA (docs/gpu.md)")
@pytest.mark.parametrize("attn", ["flash_attention_2", "sdpa_varlen"])
def test_cuda_varlen_attention_keeps_samples_apart(tiny_model_dir, mix, attn):
    """The next GPU run's check (docs/gpu.md): in bf16 on CUDA, a padding-free row through flash-attention's
    varlen kernel (the collator's cu_seq_lens) or sdpa_varlen gives each sample's own logits."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    register_sdpa_varlen()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn,
                                                 dtype=torch.bfloat16).to("cuda").eval()
    batch = PaddingFreeCollator(varlen=True)(mix)
    with torch.no_grad():
        flat = model(**{k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()
                        if k not in ("labels",)}, use_cache=False).logits[0].float()
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]], device="cuda"), use_cache=False).logits[0]
                           for e in mix]).float()
    torch.testing.assert_close(flat, alone, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("attn", ["paged|eager", "custom_sdpa"])
def test_attention_that_crosses_samples_is_refused_in_one_line(tiny_model_dir, mix, attn):
    """paged|eager (continuous batching's) and a kernel registered by the user (here sdpa itself, under its
    own name: transformers builds no packed-sequence mask for it) let a packed row's samples see each other."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register("custom_sdpa", sdpa_attention_forward)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn).eval()
    flat, alone = _flat_and_alone(model, mix)
    assert (flat - alone).abs().max() > 1e-2  # what the refusal prevents
    with pytest.raises(ValueError) as err:
        check_packed_attention(model)
    assert f"'{attn}'" in str(err.value) and "\n" not in str(err.value)
    assert all(name in str(err.value) for name in PACKED_ATTENTION)


def _loss_and_grads(trainer, batch, count):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
@pytest.mark.parametrize("token_scale", ["none", "dft", "eaft"])
def test_padding_free_same_loss_and_gradients_as_padded(tiny_model_dir, tmp_path, mix, loss_impl, token_scale):
    trainer = _trainer(tiny_model_dir, tmp_path, mix, loss_impl=loss_impl, token_scale=token_scale)
    rows = [trainer.train_dataset[i] for i in range(len(mix))]
    padded, flat = SmoothingCollator(0)(rows), PaddingFreeCollator()(rows)
    # The count the Trainer divides by (labels[..., 1:]): the same supervised tokens either way.
    count = (padded["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert int((flat["labels"][:, 1:] != IGNORE_INDEX).sum()) == int(count) > 0
    loss_p, grads_p = _loss_and_grads(trainer, padded, count)
    loss_f, grads_f = _loss_and_grads(trainer, flat, count)
    # what `ual train` runs: sdpa switched to sdpa_varlen, the row's boundaries from the collator
    assert prepare_packed_attention(trainer.model) is True
    assert trainer.model.config._attn_implementation == "sdpa_varlen"
    loss_v, grads_v = _loss_and_grads(trainer, PaddingFreeCollator(varlen=True)(rows), count)
    for loss, grads in ((loss_f, grads_f), (loss_v, grads_v)):
        torch.testing.assert_close(loss, loss_p, rtol=1e-5, atol=1e-6)
        for name in grads_p:
            torch.testing.assert_close(grads[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)
    # eps and the weights reach each token: other values give another loss
    other = dict(flat, eps=torch.zeros_like(flat["eps"]), weight=torch.ones_like(flat["weight"]))
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model, other, num_items_in_batch=count)) != pytest.approx(
            float(loss_f), rel=1e-4)


@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
def test_padding_free_training_equals_padded_with_accumulation_and_replacement(tiny_model_dir, tmp_path, mix,
                                                                               loss_impl):
    """Two optimiser steps of 2 micro-batches of 2 samples each, drawn with replacement (the paper's schedule):
    the same updates and logged loss and NLL, padded or padding-free."""
    runs = []
    for name, collator in (("padded", SmoothingCollator(0)), ("padding_free", PaddingFreeCollator())):
        trainer = _trainer(tiny_model_dir, tmp_path / name, mix, collator=collator, accumulation=2, batch=2, steps=2,
                           loss_impl=loss_impl, sampling="replacement")
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        runs.append(({n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}, logged))
    (upd_p, log_p), (upd_f, log_f) = runs
    assert [h["loss"] for h in log_f] == pytest.approx([h["loss"] for h in log_p], rel=1e-5)
    assert [h["nll"] for h in log_f] == pytest.approx([h["nll"] for h in log_p], rel=1e-5)
    worst = max(float((upd_p[n] - upd_f[n]).abs().max() / (upd_p[n].abs().max() + 1e-12)) for n in upd_p)
    assert worst < 1e-4


@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
def test_ppl_padding_free_gives_each_sample_of_a_row_its_padded_eps(tiny_model_dir, tmp_path, mix, loss_impl):
    """The ppl mode computes eps from each sample's own NLL in the same forward pass: in a padding-free row each
    sample gets the eps it gets in a padded batch, so loss, gradients and the running mean are the padded ones."""
    from ual.training.ppl import PerplexitySmoothing

    results = []
    for collator in (SmoothingCollator(0), PaddingFreeCollator(varlen=True)):
        eps_fn = PerplexitySmoothing(0.2)
        trainer = _trainer(tiny_model_dir, tmp_path, mix, eps=None, weights=WEIGHTS, eps_fn=eps_fn,
                           loss_impl=loss_impl)
        if isinstance(collator, PaddingFreeCollator):
            prepare_packed_attention(trainer.model)
        trainer.model.train()  # eps_fn updates its running mean in training only (no dropout in the tiny model)
        rows = [trainer.train_dataset[i] for i in range(len(mix))]
        batch = collator(rows)
        count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        first = _loss_and_grads(trainer, batch, count)  # the running mean starts from this batch
        second = _loss_and_grads(trainer, batch, count)  # and now holds two batches
        results.append((first, second, list(eps_fn.last_eps), eps_fn.running_mean))
    (first_p, second_p, eps_p, mean_p), (first_f, second_f, eps_f, mean_f) = results
    assert len(eps_f) == len(eps_p) == len(mix)  # an eps per sample of the row, not one per row
    assert eps_f == pytest.approx(eps_p, rel=1e-5) and len(set(round(e, 6) for e in eps_p)) > 2
    assert mean_f == pytest.approx(mean_p, rel=1e-6)
    for (loss_p, grads_p), (loss_f, grads_f) in ((first_p, first_f), (second_p, second_f)):
        torch.testing.assert_close(loss_f, loss_p, rtol=1e-5, atol=1e-6)
        for name in grads_p:
            torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sample_index_of_a_padding_free_row(mix):
    from ual.training.ppl import sample_index

    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in mix[:3]]
    flat = PaddingFreeCollator()(rows)
    owner, n = sample_index(flat["labels"], flat["position_ids"])
    lengths = [len(r["input_ids"]) for r in rows]
    assert n == 3 and owner[0].tolist() == [i for i, k in enumerate(lengths) for _ in range(k)]
    owner, n = sample_index(torch.zeros(2, 5, dtype=torch.long))  # padded: a sample per row
    assert n == 2 and owner.tolist() == [[0] * 5, [1] * 5]


def test_grouped_order_seeded_per_epoch_and_less_padding(mix):
    lengths = [len(e["input_ids"]) for e in mix] * 8  # 56 samples
    a, b = LengthGroupedSampler(lengths, 4, seed=3), LengthGroupedSampler(lengths, 4, seed=3)
    first = list(a)
    assert sorted(first) == list(range(len(lengths))) and first == list(b)  # a permutation, the same each time
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(second) == sorted(first)
    b.set_epoch(1)
    assert list(b) == second  # a resumed run draws the epoch it was killed in again
    grouped = [second[i : i + 4] for i in range(0, len(second), 4)]
    shuffled = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    plain = [shuffled[i : i + 4] for i in range(0, len(shuffled), 4)]
    assert pad_share(lengths, grouped) < pad_share(lengths, plain)


def test_grouped_trainer_sampler_and_refusal(tiny_model_dir, tmp_path, mix):
    lengths = sample_lengths(mix)
    assert lengths.tolist() == [len(e["input_ids"]) for e in mix]
    trainer = _trainer(tiny_model_dir, tmp_path, mix, batch=2, group_lengths=lengths)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler) and sampler.batch_size == 2
    with pytest.raises(ValueError, match="replacement"):
        _trainer(tiny_model_dir, tmp_path, mix, group_lengths=lengths, sampling="replacement")


def test_sample_lengths_of_a_selected_tokenized_set(mix):
    from datasets import Dataset

    ds = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in mix]).select([4, 0, 2])
    assert sample_lengths(ds).tolist() == [len(mix[i]["input_ids"]) for i in (4, 0, 2)]


def test_config_refuses_what_batching_cannot_do(tmp_path):
    from ual.config import ConfigError, load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  batching: grouped\n  sampling: replacement\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:train\.batching: grouped orders .* sampling replacement"):
        load_config(cfg)
    assert load_config(None, {"train.batching": "padding_free", "train.modes": ["sft", "ppl"]}).train.modes \
        == ["sft", "ppl"]  # ppl gives each sample of a padding-free row its own eps
    with pytest.raises(ConfigError, match="did you mean 'padding_free'"):
        load_config(None, {"train.batching": "padding-free"})
    assert load_config(None, {"train.batching": "padding_free", "train.sampling": "replacement"}).train.batching \
        == "padding_free"


def test_lineage_records_batching_except_padded(tmp_path):
    """padded is what a record made before train.batching existed trained with; padding_free and grouped are
    other runs (with dropout, padding_free draws other dropout masks; grouped meets other samples)."""
    from ual.config import load_config, to_dict
    from ual.lineage import train_record

    def record(batching):
        now = to_dict(load_config(None, {"train.batching": batching or "padded"}))
        if batching is None:
            del now["train"]["batching"]
        return train_record(now, tmp_path, "ls")["fingerprint"]

    assert record(None) == record("padded")
    assert len({record("padded"), record("padding_free"), record("grouped")}) == 3
    # why a mode retrains, in the words of the settings (a left-out padded reads as padded, not null)
    from ual.lineage import record_changes

    def full(batching):
        return train_record(to_dict(load_config(None, {"train.batching": batching})), tmp_path, "ls")

    assert record_changes(full("padding_free"), full("padded")) == ["train.batching padding_free -> padded"]
    assert record_changes(full("padded"), full("grouped")) == ["train.batching padded -> grouped"]
