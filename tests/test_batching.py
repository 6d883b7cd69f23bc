"""ual.batching: the one padding routine (training collator, scoring, evaluation) and the one
inference-mode batching routine (evaluation passes)."""

import copy

import pytest
import torch

from ual.batching import (
    inference,
    inference_batches,
    pad_batch,
    pad_id,
    pad_sequences,
    positions,
)


def test_right_padding_keeps_tokens_at_their_positions():
    ids, mask = pad_batch([[5, 6, 7], [8], []], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_left_padding_ends_every_row_in_the_last_column_with_unpadded_positions():
    ids, mask = pad_batch([[5, 6, 7], [8, 9]], pad=2, side="left")
    assert ids.tolist() == [[5, 6, 7], [2, 8, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    assert positions(mask).tolist() == [[0, 1, 2], [0, 0, 1]]


def test_labels_padded_with_their_own_value_to_a_given_width():
    labels = pad_sequences([[-100, 4], [3]], -100, width=4)
    assert labels.tolist() == [[-100, 4, -100, -100], [3, -100, -100, -100]]
    with pytest.raises(ValueError, match="row 0 has 2 tokens, more than the width 1"):
        pad_sequences([[1, 2]], 0, width=1)
    with pytest.raises(ValueError, match="side must be right or left"):
        pad_sequences([[1]], 0, side="middle")


def test_pad_id_falls_back_only_when_the_tokenizer_has_none(tokenizer):
    assert tokenizer.pad_token_id is not None and pad_id(tokenizer, fallback=-1) == tokenizer.pad_token_id
    without = copy.deepcopy(tokenizer)  # the fixture is shared by the session
    without.pad_token = None
    assert without.pad_token_id is None and pad_id(without, fallback=7) == 7


def _model(training: bool) -> torch.nn.Module:
    model = torch.nn.Linear(2, 1)
    model.train(training)
    return model


@pytest.mark.parametrize("training", [True, False])
def test_inference_batches_cover_order_in_order_in_eval_mode_without_autograd(training):
    model = _model(training)
    seen = []
    for batch in inference_batches(model, [4, 2, 0, 3, 1], 2, "test", progress=False):
        assert not model.training and torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        assert not model(torch.ones(1, 2)).requires_grad
        seen.append(batch)
    assert seen == [[4, 2], [0, 3], [1]]
    assert model.training == training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    assert list(inference_batches(model, [], 2, "test", progress=False)) == []
    assert model.training == training


@pytest.mark.parametrize("training", [True, False])
def test_the_model_mode_comes_back_after_an_exception_inside_a_batch(training):
    model = _model(training)
    with pytest.raises(RuntimeError, match="boom"):
        for _ in inference_batches(model, [0, 1, 2], 1, "test", progress=False):
            raise RuntimeError("boom")
    assert model.training == training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="boom"), inference(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError("boom")
    assert model.training == training and torch.is_grad_enabled()
