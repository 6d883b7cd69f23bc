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

Each mode optimises a different objective (eps differs), so its loss values are
not comparable across modes; the eps = 0 term lse(z) - z_y (plain NLL) is. Both
losses can return it beside the loss (`return_nll=True`): it is built from the
lse and z_y the loss computes anyway, so it costs no pass over the logits.
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
    return _token_losses(logits, targets, eps, ignore_index, False)[0]


def _token_losses(logits, targets, eps, ignore_index, with_nll):
    """Per-token loss and, if with_nll, the detached per-token plain NLL
    lse - z_y (else None), both zero where ignored."""
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    mask = targets != ignore_index
    gold = z.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    eps = eps.to(z.dtype)
    loss = lse - (1 - eps) * gold - eps * z.mean(dim=-1)
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mean per-sample label-smoothed cross-entropy over supervised tokens.

    logits: (B, T, V) aligned with targets (B, T) (already shifted, see `shift_labels`);
    eps: (B,) per-sample smoothing, or a float for uniform smoothing.
    The sum is divided by `num_items_in_batch` when given (the supervised-token
    count of the whole accumulated batch), else by this batch's count.
    return_nll: return `(loss, nll)`, nll the detached fp32 plain NLL (the
    eps = 0 term) under the same normalisation: what this call with eps = 0 returns.
    """
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=logits.device)
    if eps_t.dim() == 1:
        eps_t = eps_t.view(-1, *([1] * (targets.dim() - 1)))
    tok, nll_tok = _token_losses(logits, targets, eps_t, ignore_index, return_nll)
    denom = _denominator(targets, num_items_in_batch, ignore_index)
    loss = tok.sum() / denom
    if not return_nll:
        return loss
    return loss, nll_tok.sum() / denom


def _denominator(targets, num_items_in_batch, ignore_index):
    if num_items_in_batch is None:
        count = (targets != ignore_index).sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=targets.device)
    # An all-ignored batch yields 0 / 1 = 0 with a zero gradient, never NaN.
    return count.clamp_min(1).float()


# --------------------------------------------------------------------------
# Chunked loss from hidden states and the output projection (never all logits)
# --------------------------------------------------------------------------
#
# Design (CPU first, see benchmarks/loss.py for the numbers):
# - Only supervised rows are gathered first, so ignored (prompt, padding)
#   tokens cost nothing: no matmul, no softmax, no gradient rows.
# - Per chunk of C rows: one matmul into a reused (C, V) fp32 buffer, one
#   in-place row softmax (torch's row-blocked kernel: the row stays in cache
#   for its max / exp-sum / normalise, so it reads and writes the buffer once).
#   The loss terms never need another pass over the buffer:
#     gold  z_y          gathered before the softmax (C values),
#     lse   = z_y - log p_y   (p_y gathered after the softmax; rows where p_y
#           underflows are recomputed exactly with logsumexp, rarely if ever),
#     mean  mean_v(z) = h . mean_v(w_v) + mean(b)   (a matvec, not a pass).
#   The plain NLL (the eps = 0 term, logged to compare modes) is sum(lse - z_y)
#   over the same C values: no pass either, and only when asked for.
# - Gradients are computed in the forward (like torch's own chunked
#   linear_cross_entropy), from the softmax buffer before it is reused:
#     dL/dz = a * (p - (1 - eps) onehot(y) - eps / V),   a = 1 / denominator.
#   The constant and one-hot parts are never written into the buffer: they are
#   folded into (C, H) / (V, H)-sized terms instead,
#     dh = a * (P @ W - (1 - eps) W[y] - (eps / V) sum_v w_v)
#     dW = a * (sum_chunks P^T h - index_add_y((1 - eps) h) - 1 (x) sum (eps / V) h)
#   so each chunk costs exactly three matmuls (the minimum: the same three a
#   plain linear + cross-entropy does) plus one softmax over the buffer.
#   Recomputing the logits in the backward instead would cost a fourth matmul
#   (+33% of the dominant cost on CPU); storing dh and dW (fp32) costs no more
#   memory than the backward allocates anyway. The backward only scales them
#   by the incoming gradient.
# - fp32 accumulation throughout. On CPU (no native bf16 GEMM with AVX2) bf16
#   / fp16 inputs are upcast to fp32 for the matmuls; on CUDA the matmuls run
#   in the input dtype with fp32 output and the softmax in fp32.

_LSE_TINY = 1e-30  # below this p_y, lse = z_y - log p_y loses precision: recompute
# Devices whose bf16 / fp16 GEMMs are native (run them in the input dtype with an
# fp32 result); elsewhere low-precision inputs are upcast to fp32 for the matmuls.
_LOWP_MM_DEVICES = ("cuda",)
_warned_module_fallback = False


def _default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: a (C, V) fp32 logits buffer of about 32 MiB on CPU, at
    least 256 rows (a multiple of 64); 1 GiB on CUDA. On CPU the matmuls are
    ~95% of the time and only a few percent faster with bigger chunks
    (SmolLM2 head: 256 rows 18.4 s, 2048 rows 17.4 s CPU time; Llama-7B head:
    256 rows 22.5 s, 512 rows 20.7 s, 1024 rows 19.5 s), while the buffer is
    most of the loss's own memory; the buffer never fits a cache anyway."""
    budget = (1 << 30) if device.type == "cuda" else (32 << 20)
    c = max(256, budget // (4 * vocab) // 64 * 64)
    return max(1, min(c, n_rows))


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 result (fp32 accumulation)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    try:  # CUDA: low-precision GEMM with an fp32 output
        r = torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        r = torch.mm(a.float(), b.float())
    if out is None:
        return r
    return out.copy_(r)


class _ChunkedSmoothedCE(torch.autograd.Function):
    """Sum over supervised rows r of a * (lse(z) - (1 - eps) z_y - eps mean(z)),
    z = h[r] W^T + b. h: (N, H) all rows; rows: (n,) supervised row indices, with
    their targets y and eps (n,). The supervised rows are gathered chunk by chunk
    and their gradient is written straight into the (N, H) gradient (no gathered
    copy of h, no separate gradient to scatter). Returns the fp32 scalar, or with
    need_nll the pair (loss, a * sum_r (lse - z_y)), the second non-differentiable.
    """

    @staticmethod
    def forward(ctx, h, rows, w, b, y, eps, scale, chunk_size, need_h, need_w, need_b, lse_from_softmax,
                need_nll=False):
        n = rows.numel()
        hid = h.shape[1]
        vocab = w.shape[0]
        dev = h.device
        f32 = torch.float32
        # Matmul dtype: fp32 on CPU (bf16 GEMM is emulated there) or whenever
        # either side is fp32; the input dtype on CUDA for bf16 / fp16.
        low = h.dtype == w.dtype and h.dtype in (torch.bfloat16, torch.float16) and dev.type in _LOWP_MM_DEVICES
        mm_dtype = h.dtype if low else f32
        wm = w.to(mm_dtype)
        w_sum = torch.sum(w, 0, dtype=f32)  # one pass over W: sum_v w_v
        w_mean = w_sum / vocab  # mean_v(z) = h . w_mean + mean(b)
        b32 = None if b is None else b.to(f32)
        keep = 1.0 - eps  # (n,) fp32
        spread = eps / vocab  # (n,) fp32

        loss = torch.zeros((), dtype=f32, device=dev)
        nll = torch.zeros((), dtype=f32, device=dev) if need_nll else None
        gh = torch.zeros(h.shape, dtype=f32, device=dev) if need_h else None
        gw = torch.zeros(vocab, hid, dtype=f32, device=dev) if need_w else None
        gb = torch.zeros(vocab, dtype=f32, device=dev) if need_b else None
        h_spread = torch.zeros(hid, dtype=f32, device=dev) if need_w else None

        c = chunk_size or _default_chunk_size(n, vocab, dev)
        buf = torch.empty(min(c, n), vocab, dtype=f32, device=dev) if n else None
        wt = wm.t()
        for s in range(0, n, c):
            e = min(s + c, n)
            z = buf[: e - s]
            rc = rows[s:e]
            hc = h.index_select(0, rc).to(mm_dtype)
            yc = y[s:e].unsqueeze(1)
            kc, sc = keep[s:e], spread[s:e]
            _mm_f32(hc, wt, out=z)
            if b32 is not None:
                z.add_(b32)
            gold = z.gather(1, yc).squeeze(1)
            hc32 = hc.to(f32)
            mean = hc32 @ w_mean
            if b32 is not None:
                mean = mean + b32.mean()
            if lse_from_softmax:
                torch._softmax(z, 1, False, out=z)  # z <- softmax, in place
                p_gold = z.gather(1, yc).squeeze(1)
                lse = gold - torch.log(p_gold)
                bad = (p_gold < _LSE_TINY).nonzero().squeeze(1)
                if bad.numel():  # exact fallback for the (rare) underflowed rows
                    zr = _mm_f32(hc.index_select(0, bad), wt)
                    if b32 is not None:
                        zr.add_(b32)
                    lse[bad] = torch.logsumexp(zr, 1)
            else:  # no data-dependent branch (no host sync): for CUDA
                lse = torch.logsumexp(z, 1)
                z.sub_(lse.unsqueeze(1)).exp_()
            loss += (lse - kc * gold - eps[s:e] * mean).sum()
            if need_nll:  # the eps = 0 loss of these rows (bitwise: (1 - 0) z_y = z_y, 0 * mean = 0)
                nll += (lse - gold).sum()
            if need_h or need_w:
                zm = z if mm_dtype == f32 else z.to(mm_dtype)
            if need_h:
                g = _mm_f32(zm, wm)  # P @ W
                g.addcmul_(wm.index_select(0, yc.squeeze(1)).to(f32), kc.unsqueeze(1), value=-1.0)
                g.addr_(sc, w_sum, alpha=-1.0)
                gh.index_copy_(0, rc, g.mul_(scale))
            if need_w:
                if mm_dtype == f32:
                    gw.addmm_(zm.t(), hc32, alpha=scale)
                else:
                    gw.add_(_mm_f32(zm.t(), hc), alpha=scale)
                gw.index_add_(0, yc.squeeze(1), hc32 * kc.unsqueeze(1), alpha=-scale)
                h_spread.addmv_(hc32.t(), sc)
            if need_b:
                gb.add_(z.sum(0))
                gb.index_add_(0, yc.squeeze(1), kc, alpha=-1.0)
        if need_w:  # one pass over (V, H): the constant part of dL/dz
            gw.sub_(h_spread.mul_(scale))
        if need_b:
            gb.sub_(spread.sum()).mul_(scale)
        ctx.grads = (gh, None, gw, gb)
        ctx.dtypes = (h.dtype, None, w.dtype, None if b is None else b.dtype)
        if not need_nll:
            return loss * scale
        # A second output, not a side channel: autograd never asks for its
        # gradient, so the backward below stays as it is.
        nll = nll * scale
        ctx.mark_non_differentiable(nll)
        return loss * scale, nll

    @staticmethod
    def backward(ctx, grad_out, *_):  # *_: the nll output's (unused) gradient
        if ctx.grads is None:
            raise RuntimeError("chunked_smoothed_cross_entropy: backward called twice (gradients are precomputed once)")
        grads, ctx.grads = ctx.grads, None  # release our references: no copy when autograd takes them
        one = grad_out.device.type == "cpu" and float(grad_out) == 1.0
        out = []
        for g, dt in zip(grads, ctx.dtypes):
            if g is None:
                out.append(None)
                continue
            if not one:
                g = g.mul_(grad_out)
            out.append(g.to(dt))
        return tuple(out) + (None,) * 9


def _is_plain_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) and not hasattr(module, "lora_A")


def _module_fallback(hidden, head, targets, eps_tok, scale, chunk_size, ignore_index, need_nll=False):
    """Output projection that is not a plain Linear (e.g. carries LoRA): logits
    per chunk through the module, each chunk checkpointed, so memory stays at one
    chunk of logits; slower (the logits are computed twice). With need_nll,
    returns (loss, nll) like `_ChunkedSmoothedCE`."""
    global _warned_module_fallback
    if not _warned_module_fallback:
        import warnings

        warnings.warn(
            f"chunked_smoothed_cross_entropy: the output projection is a {type(head).__module__}.{type(head).__name__}, not a plain "
            "nn.Linear (e.g. it carries LoRA); using the slower chunk-by-chunk path through the module.",
            stacklevel=3,
        )
        _warned_module_fallback = True
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(hc, yc, ec):
        # Both terms from the one set of chunk logits: the NLL needs no second
        # forward through the head (the checkpoint's recompute redoes both, cheaply).
        tok, nll = _token_losses(head(hc), yc, ec, ignore_index, need_nll)
        return (tok.sum(), nll.sum()) if need_nll else tok.sum()

    n = hidden.shape[0]
    vocab = getattr(head, "out_features", None) or 32768
    c = chunk_size or _default_chunk_size(n, vocab, hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    nll = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, c):
        hc = hidden[s : s + c]
        if torch.is_grad_enabled():
            out = checkpoint(chunk_loss, hc, targets[s : s + c], eps_tok[s : s + c], use_reentrant=False)
        else:
            out = chunk_loss(hc, targets[s : s + c], eps_tok[s : s + c])
        if need_nll:
            total, nll = total + out[0], nll + out[1]
        else:
            total = total + out
    return (total * scale, nll * scale) if need_nll else total * scale


def chunked_smoothed_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | torch.nn.Module,
    targets: torch.Tensor,
    eps: torch.Tensor | float,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    *,
    bias: torch.Tensor | None = None,
    lse_from_softmax: bool | None = None,
    return_nll: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`smoothed_cross_entropy(hidden @ weight.T + bias, ...)` without ever
    materialising all logits.

    hidden: (B, T, H) final hidden states (the output projection's input);
    weight: (V, H) output-projection weight, or the projection module itself
    (a plain nn.Linear takes the fast path with its bias; any other module,
    e.g. a LoRA-wrapped lm_head, takes a correct slower chunk-by-chunk path,
    with a one-time warning); targets: (B, T) already shifted; eps: (B,) per
    sample or a float. Normalisation as `smoothed_cross_entropy`.
    chunk_size: supervised rows per chunk (default: a ~32 MiB fp32 logits
    buffer on CPU, >= 256 rows). lse_from_softmax: how the log-normaliser is obtained
    (default: True on CPU, False on CUDA, where it avoids a host sync).
    Returns an fp32 scalar; an all-ignored batch gives 0 with zero gradients.
    return_nll: return `(loss, nll)` as `smoothed_cross_entropy` does (nll: the
    detached plain NLL, what this call with eps = 0 returns), accumulated in the
    same pass over each chunk; loss and gradients are unchanged.
    """
    hid = hidden.shape[-1]
    flat_t = targets.reshape(-1)
    rows = (flat_t != ignore_index).nonzero().squeeze(1)
    y = flat_t.index_select(0, rows)
    eps_t = torch.as_tensor(eps, dtype=torch.float32, device=hidden.device)
    if eps_t.dim() == 1:
        eps_t = eps_t.view(-1, *([1] * (targets.dim() - 1)))
    eps_tok = eps_t.expand(targets.shape).reshape(-1).index_select(0, rows)
    scale = 1.0 / float(_denominator(targets, num_items_in_batch, ignore_index))

    if isinstance(weight, torch.nn.Module):
        if not _is_plain_linear(weight):
            h = hidden.reshape(-1, hid).index_select(0, rows)
            return _module_fallback(h, weight, y, eps_tok, scale, chunk_size, ignore_index, return_nll)
        weight, bias = weight.weight, weight.bias
    if lse_from_softmax is None:
        lse_from_softmax = hidden.device.type != "cuda"
    grad = torch.is_grad_enabled()
    h = hidden.reshape(-1, hid)
    return _ChunkedSmoothedCE.apply(
        h,
        rows,
        weight,
        bias,
        y,
        eps_tok,
        scale,
        chunk_size,
        grad and h.requires_grad,
        grad and weight.requires_grad,
        grad and bias is not None and bias.requires_grad,
        lse_from_softmax,
        return_nll,
    )
