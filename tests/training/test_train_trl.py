"""TRL drop-in: UALSFTTrainer keeps `eps`, uses ual's loss, and matches `ual train`'s UALTrainer on the same batch."""

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, TrainingArguments  # noqa: E402
from trl import SFTConfig  # noqa: E402

from ual.sample import Sample  # noqa: E402
from ual.data.tokenize import encode_sample  # noqa: E402
from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer  # noqa: E402
from ual.loss import shift_labels, smoothed_cross_entropy  # noqa: E402
from ual.training.trl import UALSFTTrainer  # noqa: E402

EPS = [0.0, 0.5, 0.2, 0.9]


def _encoded(tokenizer):
    texts = [("hi", "hello there"), ("2+2?", "4"), ("tell me a story", "once upon a time " * 8), ("x", "y z")]
    return [encode_sample(tokenizer, Sample.create("t", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]).messages, 96)
            for q, a in texts]


def _sequential(trainer):
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def _ual(model_dir, tokenizer, tmp_path, accumulation=1):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(tmp_path / "ual"), per_device_train_batch_size=4 // accumulation,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                             lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, seed=0, disable_tqdm=True, logging_steps=1)
    return _sequential(UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(_encoded(tokenizer), EPS),
                                  data_collator=SmoothingCollator(tokenizer.pad_token_id)))


def _trl(model_dir, tokenizer, tmp_path, accumulation=1, **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "eps": x} for e, x in zip(_encoded(tokenizer), EPS)]
    kw = {"per_device_train_batch_size": 4 // accumulation, "max_length": None, **kw}
    args = SFTConfig(output_dir=str(tmp_path / "trl"), gradient_accumulation_steps=accumulation, max_steps=1,
                     learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", report_to="none", use_cpu=True,
                     save_strategy="no", seed=0, disable_tqdm=True, bf16=False, gradient_checkpointing=False,
                     logging_steps=1, **kw)  # SFTConfig defaults to bf16 + checkpointing; remove_unused_columns stays on: eps survives
    return _sequential(UALSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                     processing_class=tokenizer))


def test_same_batch_same_loss(tiny_model_dir, tokenizer, tmp_path):
    ual, trl = _ual(tiny_model_dir, tokenizer, tmp_path), _trl(tiny_model_dir, tokenizer, tmp_path)
    b_ual = next(iter(ual.get_train_dataloader()))
    b_trl = next(iter(trl.get_train_dataloader()))
    assert torch.equal(b_trl["eps"], b_ual["eps"]) and torch.equal(b_trl["labels"], b_ual["labels"])
    with torch.no_grad():
        l_ual = ual.compute_loss(ual.model, dict(b_ual))
        l_trl = trl.compute_loss(trl.model, dict(b_trl))
        l_sft = ual.compute_loss(ual.model, {**b_ual, "eps": torch.zeros(4)})
    assert float(l_trl) == pytest.approx(float(l_ual), rel=1e-6)
    assert float(l_trl) != pytest.approx(float(l_sft), rel=1e-4)  # eps is used, not dropped


def _train_each(trainers):
    """Train each trainer in turn: per trainer (training loss, parameter update, logged loss rows)."""
    runs = []
    for t in trainers:
        before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
        out = t.train()
        logged = [h for h in t.state.log_history if "loss" in h]
        runs.append((out.training_loss, {n: before[n] - p.detach() for n, p in t.model.named_parameters()}, logged))
    return runs


@pytest.mark.parametrize("accumulation", [1, 2])
def test_same_update_as_ual_train(tiny_model_dir, tokenizer, tmp_path, accumulation):
    (loss_a, upd_a, log_a), (loss_b, upd_b, log_b) = _train_each(
        make(tiny_model_dir, tokenizer, tmp_path, accumulation) for make in (_ual, _trl))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    # The drop-in logs the plain NLL (eps = 0 term) beside the loss, as `ual train` does.
    assert len(log_a) == len(log_b) == 1
    assert log_b[0]["nll"] == pytest.approx(log_a[0]["nll"], rel=1e-5)
    assert log_b[0]["nll"] != pytest.approx(log_b[0]["loss"], rel=1e-4)
    worst = max(float((upd_a[n] - upd_b[n]).abs().max() / (upd_a[n].abs().max() + 1e-12)) for n in upd_a)
    assert worst < 1e-5


def test_refuses_what_would_break_per_sample_eps(tiny_model_dir, tokenizer, tmp_path):
    for strategy in ("wrapped", "bfd_split"):
        with pytest.raises(ValueError, match=f"packing_strategy '{strategy}' cuts samples"):
            _trl(tiny_model_dir, tokenizer, tmp_path, packing=True, packing_strategy=strategy, max_length=64)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        _trl(tiny_model_dir, tokenizer, tmp_path, label_smoothing_factor=0.1)
    t = _trl(tiny_model_dir, tokenizer, tmp_path)
    with pytest.raises(ValueError, match="no `eps`"):
        t.data_collator([{"input_ids": [1, 2], "labels": [1, 2]}])


def test_trl_drop_in_carries_weight_and_token_scale(tiny_model_dir, tokenizer, tmp_path):
    reference = _trl(tiny_model_dir, tokenizer, tmp_path)  # no weight column, no token scale
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "eps": x, "weight": w}
            for e, x, w in zip(_encoded(tokenizer), EPS, [1.0, 0.0, 2.0, 0.5])]
    args = SFTConfig(output_dir=str(tmp_path / "trl_w"), per_device_train_batch_size=4, max_steps=1, report_to="none",
                     use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, max_length=None, bf16=False,
                     gradient_checkpointing=False)
    trainer = _sequential(UALSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                        processing_class=tokenizer, token_scale="dft"))
    batch = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(batch["weight"], torch.tensor([1.0, 0.0, 2.0, 0.5]))
    plain = next(iter(reference.get_train_dataloader()))
    assert "weight" not in plain and torch.equal(plain["labels"], batch["labels"])
    with torch.no_grad():
        ours = trainer.compute_loss(trainer.model, dict(batch))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = smoothed_cross_entropy(logits, shift_labels(batch["labels"]), batch["eps"], token_scale="dft",
                                      sample_weights=batch["weight"])
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="token_scale"):
        UALSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                      token_scale="focal")


@pytest.mark.parametrize("kw", [dict(padding_free=True), dict(packing=True, max_length=512, per_device_train_batch_size=1)],
                         ids=["padding_free", "packing_bfd"])
@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
def test_padding_free_and_packing_same_update_as_padded(tiny_model_dir, tokenizer, tmp_path, kw, loss_impl):
    """One step over the same four samples with their own eps: TRL's padding-free row, or bfd packing (all
    four in one packed row), gives `ual train`'s padded loss, logged NLL and update."""
    ual = _ual(tiny_model_dir, tokenizer, tmp_path)
    ual.loss_impl = loss_impl
    trl = _trl(tiny_model_dir, tokenizer, tmp_path, **kw)
    trl.loss_impl = loss_impl
    batch = next(iter(trl.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    assert batch["eps"].shape == batch["input_ids"].shape
    assert sorted(set(batch["eps"][0].tolist())) == pytest.approx(sorted(set(EPS)))
    (loss_a, upd_a, log_a), (loss_b, upd_b, log_b) = _train_each((ual, trl))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert log_b[0]["nll"] == pytest.approx(log_a[0]["nll"], rel=1e-5)
    worst = max(float((upd_a[n] - upd_b[n]).abs().max() / (upd_a[n].abs().max() + 1e-12)) for n in upd_a)
    assert worst < 1e-4


@pytest.mark.parametrize("kw", [dict(padding_free=True), dict(packing=True, max_length=512, per_device_train_batch_size=1)],
                         ids=["padding_free", "packing_bfd"])
def test_ppl_eps_fn_in_a_packed_row_same_update_as_padded(tiny_model_dir, tokenizer, tmp_path, kw):
    """The ppl mode's eps_fn in TRL's padding-free or packed row gives each of the four samples its own eps:
    `ual train`'s padded ppl step (loss, update, running mean)."""
    from ual.training.ppl import PerplexitySmoothing

    ual, trl = _ual(tiny_model_dir, tokenizer, tmp_path), _trl(tiny_model_dir, tokenizer, tmp_path, **kw)
    ual.eps_fn, trl.eps_fn = PerplexitySmoothing(0.2), PerplexitySmoothing(0.2)
    (loss_a, upd_a, _), (loss_b, upd_b, _) = _train_each((ual, trl))
    assert len(trl.eps_fn.last_eps) == 4 and trl.eps_fn.count == ual.eps_fn.count == 4
    assert sorted(trl.eps_fn.last_eps) == pytest.approx(sorted(ual.eps_fn.last_eps), rel=1e-5)  # bfd reorders
    assert trl.eps_fn.running_mean == pytest.approx(ual.eps_fn.running_mean, rel=1e-6)
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    worst = max(float((upd_a[n] - upd_b[n]).abs().max() / (upd_a[n].abs().max() + 1e-12)) for n in upd_a)
    assert worst < 1e-4


def test_padding_free_refuses_attention_that_crosses_samples(tiny_model_dir, tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="paged|eager")
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "eps": x} for e, x in zip(_encoded(tokenizer), EPS)]
    args = SFTConfig(output_dir=str(tmp_path / "pf"), report_to="none", use_cpu=True, max_length=None, bf16=False,
                     gradient_checkpointing=False, padding_free=True)
    with pytest.raises(ValueError, match="'paged|eager' would let the samples"):
        UALSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
