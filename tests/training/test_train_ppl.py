"""The ppl mode: eps_i = clip(eps_mean * nll_i / running_mean_nll, 0, eps_max), nll from the same forward."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainingArguments

from ual.data.tokenize import encode_sample
from ual.loss import shift_labels
from ual.training.ppl import PerplexitySmoothing, per_sample_nll_from_hidden, per_sample_nll_from_logits
from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer, final_hidden_states


def _batch(tokenizer, n=4):
    texts = [("hi", "hello there"), ("2+2?", "4"), ("tell me a story", "once upon a time " * 6), ("x", "y z w")]
    enc = [encode_sample(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 96)
           for q, a in texts[:n]]
    return enc, SmoothingCollator(tokenizer.pad_token_id)(list(SmoothedDataset(enc, [0.0] * len(enc))))


def test_per_sample_nll_is_hf_shifted_loss(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    enc, batch = _batch(tokenizer)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    sums, counts = per_sample_nll_from_logits(logits, shift_labels(batch["labels"]))
    for i, e in enumerate(enc):
        # Hugging Face's own causal-LM loss shifts labels: position t predicts token t+1.
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
        assert counts[i] == sum(x != -100 for x in e["labels"][1:])
        assert float(sums[i] / counts[i]) == pytest.approx(float(ref), rel=1e-5)
    # Unshifted scoring (the reference code's defect) would give something else.
    wrong = per_sample_nll_from_logits(logits, batch["labels"])[0]
    assert not torch.allclose(wrong, sums)


def test_nll_from_hidden_states_equals_from_logits(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    _, batch = _batch(tokenizer)
    targets = shift_labels(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        a = per_sample_nll_from_logits(model(**inputs).logits, targets)
        hidden, head = final_hidden_states(model, inputs)
        b = per_sample_nll_from_hidden(hidden, head.weight, targets, chunk_rows=7)
    assert torch.allclose(a[0], b[0], rtol=1e-5) and torch.equal(a[1], b[1])


def test_running_mean_and_clipping():
    fn = PerplexitySmoothing(eps_mean=0.2, eps_max=0.99)
    targets = torch.tensor([[5, 6, -100], [7, -100, -100], [-100, -100, -100]])
    logits = torch.zeros(3, 3, 10)  # uniform: nll = log 10 everywhere
    logits[0, :, 5] = 3.0
    logits[0, 1, 6] = 3.0  # sample 0 is confident, sample 1 is not
    eps = fn(targets, logits=logits)
    nll = per_sample_nll_from_logits(logits, targets)
    mean_nll = ((nll[0][0] / 2) + nll[0][1]) / 2
    assert fn.count == 2 and fn.running_mean == pytest.approx(float(mean_nll))
    assert eps[0] == pytest.approx(0.2 * float(nll[0][0] / 2) / float(mean_nll), rel=1e-6)
    assert eps[1] == pytest.approx(0.2 * float(nll[0][1]) / float(mean_nll), rel=1e-6)
    assert float(eps[:2].mean()) == pytest.approx(0.2)  # first batch: mean eps is eps_mean exactly
    assert eps[2] == pytest.approx(0.2)  # no supervised token: placeholder, contributes nothing
    # Later batches are measured against the running mean over everything seen so far.
    easy = torch.zeros(1, 3, 10)
    easy[0, :, 5] = 20.0
    e2 = fn(torch.tensor([[5, 5, 5]]), logits=easy)
    assert fn.count == 3 and e2[0] < 0.01
    # A sample far above the running mean is clipped at eps_max.
    fn2 = PerplexitySmoothing(eps_mean=0.9, eps_max=0.95)
    fn2.nll_sum, fn2.count = 0.01, 1
    assert float(fn2(torch.tensor([[1]]), logits=torch.zeros(1, 1, 10))[0]) == pytest.approx(0.95)
    # Evaluation does not move the running mean.
    before = (fn.nll_sum, fn.count)
    fn(targets, logits=logits, training=False)
    assert (fn.nll_sum, fn.count) == before
    # Checkpoint state round-trips.
    fn3 = PerplexitySmoothing(0.2)
    fn3.load_state_dict(fn.state_dict())
    assert fn3.running_mean == fn.running_mean
    with pytest.raises(ValueError):
        PerplexitySmoothing(eps_mean=0.99, eps_max=0.99)


@pytest.mark.parametrize("loss_impl", ["naive", "chunked"])
def test_trainer_uses_ppl_eps_from_its_own_forward(tiny_model_dir, tokenizer, tmp_path, loss_impl):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    enc, batch = _batch(tokenizer)
    targets = shift_labels(batch["labels"])
    with torch.no_grad():
        sums, counts = per_sample_nll_from_logits(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, targets)
    nll = sums / counts
    expect = (0.3 * nll / nll.mean()).clamp(0, 0.99)

    fn = PerplexitySmoothing(eps_mean=0.3)
    args = TrainingArguments(output_dir=str(tmp_path / loss_impl), per_device_train_batch_size=4, max_steps=1,
                             learning_rate=1e-3, report_to="none", use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, seed=0, disable_tqdm=True)
    trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(enc, [0.3] * 4),
                         data_collator=SmoothingCollator(tokenizer.pad_token_id), loss_impl=loss_impl, eps_fn=fn)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    trainer.train()
    assert fn.count == 4
    assert fn.running_mean == pytest.approx(float(nll.mean()), rel=1e-5)
    assert fn.last_eps == pytest.approx(expect.tolist(), rel=1e-4)
    assert not math.isclose(min(fn.last_eps), max(fn.last_eps))  # per-sample, not uniform
