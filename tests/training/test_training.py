"""The Trainer glue: exact token normalisation under gradient accumulation, eps per mode."""

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from ual.sample import Sample
from ual.data.tokenize import encode_sample
from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer


def _samples():
    # Very different response lengths: a per-micro-batch mean would weight them wrongly.
    texts = [("hi", "hello there"), ("2+2?", "4"), ("tell me a story", "once upon a time " * 12), ("x", "y z")]
    return [Sample.create("t", [{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in texts]


def _one_step(model_dir, tokenizer, tmp_path, batch_size, accumulation, eps):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    encoded = [encode_sample(tokenizer, s.messages, 128) for s in _samples()]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"o{batch_size}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
        remove_unused_columns=False, seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(encoded, eps),
                         data_collator=SmoothingCollator(tokenizer.pad_token_id))
    # Same order regardless of batch size: no shuffling.
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, tokenizer, tmp_path):
    eps = [0.0, 0.5, 0.2, 0.9]
    big = _one_step(tiny_model_dir, tokenizer, tmp_path, batch_size=4, accumulation=1, eps=eps)
    acc = _one_step(tiny_model_dir, tokenizer, tmp_path, batch_size=2, accumulation=2, eps=eps)
    worst = max(float((big[n] - acc[n]).abs().max() / (big[n].abs().max() + 1e-12)) for n in big)
    assert worst < 1e-4, worst


def test_eps_changes_the_update(tiny_model_dir, tokenizer, tmp_path):
    sft = _one_step(tiny_model_dir, tokenizer, tmp_path, 4, 1, [0.0] * 4)
    ual = _one_step(tiny_model_dir, tokenizer, tmp_path, 4, 1, [0.0, 0.5, 0.2, 0.9])
    assert any(not torch.allclose(sft[n], ual[n]) for n in sft)


def test_collator_pads_and_carries_eps(tokenizer):
    encoded = [encode_sample(tokenizer, s.messages, 64) for s in _samples()[:2]]
    batch = SmoothingCollator(tokenizer.pad_token_id)(list(SmoothedDataset(encoded, [0.1, 0.7])))
    assert batch["eps"].tolist() == [0.10000000149011612, 0.699999988079071]
    n0 = len(encoded[0]["input_ids"])
    assert batch["attention_mask"][0].sum() == n0
    assert (batch["labels"][0, n0:] == -100).all()
    assert batch["input_ids"][0, n0:].eq(tokenizer.pad_token_id).all() and "weight" not in batch


def test_rows_without_eps_need_an_eps_fn(tiny_model_dir, tokenizer, tmp_path):
    """The ppl mode's dataset carries no eps (its eps_fn computes each batch's): the collator sends
    none, and a trainer without an eps_fn refuses such a batch instead of training on made-up eps."""
    encoded = [encode_sample(tokenizer, s.messages, 64) for s in _samples()]
    dataset = SmoothedDataset(encoded, None, [1.0, 2.0, 0.0, 1.0])
    assert dataset.mean_eps is None and dataset.mean_weight == 1.0
    batch = SmoothingCollator(tokenizer.pad_token_id)(list(dataset))
    assert "eps" not in batch and batch["weight"].tolist() == [1.0, 2.0, 0.0, 1.0]
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = UALTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=dataset,
                         data_collator=SmoothingCollator(tokenizer.pad_token_id))
    with pytest.raises(ValueError, match="the batch has no 'eps' and the trainer no eps_fn"):
        trainer.compute_loss(trainer.model, batch)
    with pytest.raises(ValueError, match="4 samples but 3 smoothing values"):
        SmoothedDataset(encoded, [0.1] * 3)


@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
def test_logged_nll_is_the_eps_zero_loss_of_the_same_batch(tiny_model_dir, tokenizer, tmp_path, loss_impl):
    """Training with eps != 0 logs "nll" beside "loss": the plain NLL (eps = 0 loss) of each
    step's batch, scaled as the loss is (two micro-batches accumulated into one step here)."""
    from transformers import TrainerCallback

    from ual.loss import shift_labels, smoothed_cross_entropy

    eps = [0.0, 0.5, 0.2, 0.9]
    encoded = [encode_sample(tokenizer, s.messages, 128) for s in _samples()]
    batch = SmoothingCollator(tokenizer.pad_token_id)(list(SmoothedDataset(encoded, eps)))
    targets = shift_labels(batch["labels"])
    with torch.no_grad():  # the initial model on the one batch every step sees (4 samples, no shuffling)
        logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    nll_1 = float(smoothed_cross_entropy(logits, targets, 0.0))
    loss_1 = float(smoothed_cross_entropy(logits, targets, batch["eps"]))

    references = {}

    class EvalModeNll(TrainerCallback):
        """After step 1: the eps = 0 loss of the updated model (what step 2 sees) through the trainer's
        own compute_loss in evaluation mode, which must leave the training window's NLL alone."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                model.eval()
                with torch.no_grad():
                    zero = {**batch, "eps": torch.zeros(4)}
                    references[2] = float(trainer.compute_loss(model, {k: v.clone() for k, v in zero.items()}))
                model.train()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = TrainingArguments(
        output_dir=str(tmp_path / loss_impl), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=2, logging_steps=1, learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant",
        report_to="none", use_cpu=True, save_strategy="no", remove_unused_columns=False, seed=0, data_seed=0,
        disable_tqdm=True,
    )
    trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(encoded, eps),
                         data_collator=SmoothingCollator(tokenizer.pad_token_id), loss_impl=loss_impl,
                         callbacks=[EvalModeNll()])
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    out = trainer.train()

    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    assert sorted(logged) == [1, 2]
    assert logged[1]["nll"] == pytest.approx(nll_1, rel=1e-5)
    assert logged[1]["loss"] == pytest.approx(loss_1, rel=1e-5)
    assert abs(logged[1]["loss"] - logged[1]["nll"]) > 1e-3 * nll_1  # eps > 0: the objective is not the NLL
    assert logged[2]["nll"] == pytest.approx(references[2], rel=1e-5)
    assert out.training_loss == pytest.approx((logged[1]["loss"] + logged[2]["loss"]) / 2, rel=1e-6)


def test_sampling_with_replacement_is_seeded_and_repeats(tiny_model_dir, tokenizer, tmp_path):
    """train.sampling replacement (the paper's reference code): each of an epoch's draws is uniform over the
    samples, with repeats, and the same for the same data seed; shuffle is the Trainer's permutation."""
    encoded = [encode_sample(tokenizer, s.messages, 64) for s in _samples() * 8]  # 32 samples

    def order(sampling, seed):
        args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, data_seed=seed,
                                 seed=seed, remove_unused_columns=False)
        trainer = UALTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args,
                             train_dataset=SmoothedDataset(encoded, [0.0] * 32),
                             data_collator=SmoothingCollator(tokenizer.pad_token_id), sampling=sampling)
        return list(trainer._get_train_sampler())

    drawn = order("replacement", 0)
    assert len(drawn) == 32 and len(set(drawn)) < 32  # repeats (P(no repeat) = 32!/32^32 ~ 1e-13)
    assert drawn == order("replacement", 0) and drawn != order("replacement", 1)
    assert sorted(order("shuffle", 0)) == list(range(32))  # a permutation
    with pytest.raises(ValueError, match="sampling must be shuffle or replacement"):
        UALTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=TrainingArguments(
            output_dir=str(tmp_path / "p"), report_to="none", use_cpu=True), sampling="bootstrap")
