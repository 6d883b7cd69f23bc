"""Per-sample label-smoothed cross-entropy (METHOD.md §3). Pure torch, no I/O.

For a supervised token with gold y, logits z over a vocabulary of V and the
sample's smoothing eps:

    loss = (1 - eps) * (-log p_y) + eps * mean_v(-log p_v)
         = (1 - eps) * (lse(z) - z_y) + eps * (lse(z) - mean_v(z))
         = lse(z) - (1 - eps) * z_y - eps * mean_v(z)

which is PyTorch's `label_smoothing` convention, with eps varying per sample.
The smoothed term costs one extra reduction over the logits, never a dense
(T, V) target. Losses are summed over supervised tokens and divided by the
number of supervised tokens of the whole accumulated batch
(`num_items_in_batch`, as Hugging Face does), so gradient accumulation is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t + 1]."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def token_smoothed_nll(
    logits: torch.Tensor, targets: torch.Tensor, eps: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-token loss (fp32), zero where targets == ignore_index.

    logits: (..., V); targets: (...); eps: broadcastable to targets (per token).
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    mask = targets != ignore_index
    gold = z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    eps = eps.to(z.dtype)
    loss = lse - (1 - eps) * gold - eps * z.mean(dim=-1)
    return torch.where(mask, loss, torch.zeros_like(loss))


def smoothed_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    eps: torch.Tensor | float,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean per-sample label-smoothed cross-entropy over supervised tokens.

    logits: (B, T, V) aligned with targets (B, T) (already shifted, see `shift_labels`);
    eps: (B,) per-sample smoothing, or a float for uniform smoothing.
    The sum is divided by `num_items_in_batch` when given (the supervised-token
    count of the whole accumulated batch), else by this batch's count.
    """
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=logits.device)
    if eps_t.dim() == 1:
        eps_t = eps_t.view(-1, *([1] * (targets.dim() - 1)))
    total = token_smoothed_nll(logits, targets, eps_t, ignore_index).sum()
    return total / _denominator(targets, num_items_in_batch, ignore_index)


def _denominator(targets, num_items_in_batch, ignore_index):
    if num_items_in_batch is None:
        count = (targets != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=targets.device)
    # An all-ignored batch yields 0 / 1 = 0 with a zero gradient, never NaN.
    return count.clamp_min(1).float()
