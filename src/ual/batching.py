"""Token sequences of different lengths into one padded batch: the one padding routine of ual.

Right padding keeps every row's positions 0..len-1 (what training and scoring want); left padding
puts every row's last token in the last column (what next-token reads want), and `positions`
gives the position ids a row would have unpadded, so a row's result does not depend on the
batch it is in.
"""

from __future__ import annotations

from typing import Literal, Sequence

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
