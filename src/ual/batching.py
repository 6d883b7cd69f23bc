"""Token sequences of different lengths into one padded batch: the one padding routine of ual.

Right padding keeps every row's positions 0..len-1 (what training and scoring want); left padding
puts every row's last token in the last column (what next-token reads want), and `positions`
gives the position ids a row would have unpadded, so a row's result does not depend on the
batch it is in.

`inference` and `inference_batches` run a model in eval mode with autograd off and give the
model its own mode back afterwards: the one such routine of the evaluation passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch

Side = Literal["right", "left"]


def pad_id(tokenizer, fallback: int = 0) -> int:
    """The tokenizer's pad id, or `fallback` for tokenizers without one (padded positions are masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def pad_sequences(rows: Sequence[Sequence[int]], value: int, side: Side = "right",
                  width: int | None = None) -> torch.Tensor:
    """(len(rows), width) long tensor of `rows`, filled with `value` (width: the longest row)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be right or left, got {side!r}")
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > width:
            raise ValueError(f"row {i} has {len(r)} tokens, more than the width {width}")
        if len(r):
            span = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            out[i, span] = torch.as_tensor(r, dtype=torch.long)
    return out


def pad_batch(rows: Sequence[Sequence[int]], pad: int, side: Side = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (len(rows), longest row)."""
    ids = pad_sequences(rows, pad, side)
    mask = pad_sequences([[1] * len(r) for r in rows], 0, side, width=ids.shape[1])
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as if each row were unpadded (0 on the padding): batch-invariant under left padding."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


@contextmanager
def inference(model) -> Iterator[None]:
    """The model in eval mode with autograd off (inference mode) inside; its own mode (train or
    eval) comes back on the way out, an exception included."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def inference_batches(model, order: Sequence[int], batch_size: int, desc: str,
                      progress: bool) -> Iterator[list[int]]:
    """`order` in batches of indices, each processed by the caller inside `inference(model)`; the
    model's own mode comes back once the batches are done (or abandoned). `desc` and `progress`:
    the progress bar's label and whether it shows."""
    from tqdm.auto import tqdm

    with inference(model):
        batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
        yield from tqdm(batches, desc=desc, unit="batch", disable=not progress)
