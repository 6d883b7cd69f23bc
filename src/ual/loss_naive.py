"""The full-logits loss, and the per-token definitions the chunked loss shares.

Pure torch, no I/O, no state. The definitions (smoothed cross-entropy, token
scales, sample weights, normalisation) are written out in `ual.loss`'s
docstring; import from `ual.loss`, which re-exports everything public here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
TOKEN_SCALES = ("none", "dft", "eaft")


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t + 1]."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def check_token_scale(token_scale: str, eaft_topk: int, vocab: int) -> None:
    if token_scale not in TOKEN_SCALES:
        raise ValueError(f"token_scale must be one of {TOKEN_SCALES}, got {token_scale!r}")
    if token_scale == "eaft" and min(eaft_topk, vocab) < 2:
        raise ValueError(f"eaft needs at least 2 logits for its top-k entropy (eaft_topk {eaft_topk}, vocabulary {vocab})")


def topk_entropy_scale(z: torch.Tensor, k: int) -> torch.Tensor:
    """EAFT's scale, detached: H(softmax(top-k of z)) / log k over the last dim,
    k = min(k, V); in [0, 1]. z: fp32 logits (..., V)."""
    k = min(k, z.shape[-1])
    with torch.no_grad():
        top = torch.topk(z, k, dim=-1, sorted=False).values
        logq = top - torch.logsumexp(top, dim=-1, keepdim=True)
        return -(logq.exp() * logq).sum(-1) / math.log(k)


def token_scale_factor(z, gold, lse, token_scale: str, eaft_topk: int):
    """The per-token scale s (detached, fp32), or None for "none". z: fp32
    logits (..., V); gold = z_y and lse = logsumexp(z), both (...)."""
    if token_scale == "none":
        return None
    if token_scale == "dft":
        return torch.exp(gold - lse).detach()  # p_y
    return topk_entropy_scale(z, eaft_topk)


def per_sample(values, targets: torch.Tensor, device) -> torch.Tensor:
    """A float, one value per sample (B,), or one per token (shaped like targets: a padding-free row, each
    token carrying its own sample's value, ual.training.batches), as an fp32 tensor broadcastable to targets."""
    t = torch.as_tensor(values, dtype=torch.float32, device=device)
    if t.dim() == 1:
        t = t.view(-1, *([1] * (targets.dim() - 1)))
    elif t.dim() > 1 and t.shape != targets.shape:
        raise ValueError(f"per-token values of shape {tuple(t.shape)} for targets of shape {tuple(targets.shape)}: "
                         "give one value per sample (B,) or one per token (B, T)")
    return t


def token_smoothed_nll(
    logits: torch.Tensor, targets: torch.Tensor, eps: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-token loss (fp32), zero where targets == ignore_index.

    logits: (..., V); targets: (...); eps: broadcastable to targets (per token).
    """
    return _token_losses(logits, targets, eps, ignore_index, False)[0]


def _token_losses(logits, targets, eps, ignore_index, with_nll, token_scale="none", eaft_topk=20, weights=None):
    """Per-token loss w * s * l(eps) and, if with_nll, the detached per-token plain
    NLL lse - z_y (else None), both zero where ignored. weights: broadcastable to
    targets, or None."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    mask = targets != ignore_index
    gold = z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    eps = eps.to(z.dtype)
    loss = lse - (1 - eps) * gold - eps * z.mean(dim=-1)
    coef = token_scale_factor(z, gold, lse, token_scale, eaft_topk)
    if weights is not None:
        weights = weights.detach().to(z.dtype)
        coef = weights if coef is None else coef * weights
    if coef is not None:
        loss = loss * coef
    zero = torch.zeros_like(loss)
    # lse - z_y is bitwise what the loss line gives at eps = 0 ((1 - 0) * z_y = z_y,
    # 0 * mean = 0), so the logged NLL equals an eps = 0 run's loss exactly.
    nll = torch.where(mask, (lse - gold).detach(), zero) if with_nll else None
    return torch.where(mask, loss, zero), nll


def smoothed_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    eps: torch.Tensor | float,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    return_nll: bool = False,
    token_scale: str = "none",
    eaft_topk: int = 20,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample label-smoothed cross-entropy over supervised tokens, each
    token's loss times its scale and its sample's weight (`ual.loss` docstring).

    logits: (B, T, V) aligned with targets (B, T) (already shifted, see `shift_labels`);
    eps: (B,) per-sample smoothing, (B, T) per token (a padding-free row: each token its own
    sample's eps), or a float for uniform smoothing.
    token_scale: "none" | "dft" (sg(p_y)) | "eaft" (sg(top-k entropy / log k),
    k = min(eaft_topk, V)). sample_weights: (B,) per-sample weights (constants,
    no gradient), (B, T) per token like eps, or None (all 1).
    The sum is divided by `num_items_in_batch` when given (the supervised-token
    count of the whole accumulated batch), else by this batch's count; never by
    the weights or scales.
    return_nll: return `(loss, nll)`, nll the detached fp32 plain NLL (the
    eps = 0 term, unscaled and unweighted) under the same normalisation: what
    this call with eps = 0, token_scale "none" and no weights returns.
    """
    check_token_scale(token_scale, eaft_topk, logits.shape[-1])
    eps_t = per_sample(eps, targets, logits.device)
    w_t = None if sample_weights is None else per_sample(sample_weights, targets, logits.device)
    tok, nll_tok = _token_losses(logits, targets, eps_t, ignore_index, return_nll, token_scale, eaft_topk, w_t)
    denom = denominator(targets, num_items_in_batch, ignore_index)
    loss = tok.sum() / denom
    if not return_nll:
        return loss
    return loss, nll_tok.sum() / denom


def denominator(targets, num_items_in_batch, ignore_index):
    if num_items_in_batch is None:
        count = (targets != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=targets.device)
    # An all-ignored batch yields 0 / 1 = 0 with a zero gradient, never NaN.
    return count.clamp_min(1).float()
