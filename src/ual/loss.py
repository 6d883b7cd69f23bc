"""Per-sample label-smoothed cross-entropy (docs/method.md §3), optionally scaled per
token (DFT, EAFT) and weighted per sample. Pure torch, no I/O, no state.

For a supervised token t of sample i, with gold y, logits z over a vocabulary
of V and the sample's smoothing eps_i, the loss is the product of three factors

    loss_t = w_i * s_t * l_t(eps_i)

l_t(eps), the label-smoothed cross-entropy (PyTorch's `label_smoothing`
convention, eps varying per sample):

    l = (1 - eps) * (-log p_y) + eps * mean_v(-log p_v)
      = lse(z) - (1 - eps) * z_y - eps * mean_v(z)

The smoothed term costs one extra reduction over the logits, never a dense
(T, V) target.

s_t, the token scale (`token_scale`), computed from the model's own predictive
distribution p = softmax(z) (never from the smoothed target), with the gradient
stopped (sg): a weight on the token, not a term that is optimised:
  none  s = 1.
  dft   s = sg(p_y). DFT (Wu et al. 2025, arXiv 2508.05629) as TRL's
        `loss_type="dft"` computes it: per token -log p_y * p_y.detach(), summed
        and divided by the supervised-token count.
  eaft  s = sg(H_k(z) / log k), H_k(z) = -sum_j q_j log q_j the entropy of
        q = softmax of the k largest logits, k = min(eaft_topk, V) (default 20).
        EAFT (arXiv 2601.02151) as LLaMA-Factory's `eaft_loss_func` computes it,
        except for the normaliser: it divides H_20 by the constant 3.0 (k fixed
        at 20); we divide by log k, the maximum of H_k, so s lies in [0, 1] for
        every k (it is 1 when the top k logits are equal). At k = 20 ours is
        3.0 / ln 20 = 1.0014 times theirs: the same objective up to a 0.14%
        constant, i.e. the learning rate. Their exponent alpha (default 1) is 1 here.

w_i, the sample's weight (`sample_weights`, (B,); None: all 1): a constant (no
gradient reaches it); zero removes the sample's tokens from the numerator.
Negative weights are not checked (that would need a host sync).

Composition. eps acts on the target distribution, s on the token, w on the
sample: the factors are independent, any combination is defined by the product
above, and each factor at its identity (eps = 0, s = 1, w = 1) gives back the
others alone. So "ual+dft" is w = 1, s = sg(p_y), eps = eps_i: each token's
smoothed cross-entropy times sg(p_y), the model's probability of the gold token
(not of the smoothed target). Since s and w are constants, the gradient is the
smoothed loss's, scaled per token:

    d loss_t / dz = w_i * s_t * (p - (1 - eps_i) onehot(y) - eps_i / V).

Normalisation. The per-token losses are summed over supervised tokens and
divided by the number of supervised tokens of the whole accumulated batch
(`num_items_in_batch`, as Hugging Face does; else this batch's count): a mean
over tokens, never divided by sum(w) or sum(s), as TRL's DFT and LLaMA-Factory's
EAFT divide. Gradient accumulation and data parallel stay exact (a weighted mean
would need sum(w) over the accumulated batch), and the mean weight sets the
effective learning rate: normalise weights to mean 1 to keep it.

Each mode optimises a different objective, so its loss values are not
comparable across modes; the plain NLL lse(z) - z_y (eps = 0, s = 1, w = 1) is.
Both losses can return it beside the loss (`return_nll=True`), under the same
denominator: it is built from the lse and z_y the loss computes anyway, so it
costs no pass over the logits.

The full-logits path (`smoothed_cross_entropy`, in `ual.loss_naive`) is the
reference; `chunked_smoothed_cross_entropy` computes the same from hidden
states and the output projection without materialising all logits.
"""

from __future__ import annotations

import torch

from ual.loss_naive import (  # noqa: F401 - re-exported: `from ual.loss import ...`
    IGNORE_INDEX,
    TOKEN_SCALES,
    _token_losses,
    check_token_scale,
    per_sample,
    shift_labels,
    smoothed_cross_entropy,
    token_smoothed_nll,
    topk_entropy_scale,
)
from ual.loss_naive import denominator as _denominator

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
# - Token scales and sample weights: each row's coefficient c = w * s is a
#   constant, so dL/dz = a * c * (p - ...) and c is folded into the same
#   (C, H)-sized operands (rows of P @ W, rows of h in P^T h) and C-sized
#   coefficients, never into the (C, V) buffer (with low-precision GEMMs, into
#   the buffer's cast, which is a pass anyway): dft's s = p_y = exp(z_y - lse)
#   costs C values; eaft's s adds one top-k over the buffer before the softmax
#   (a partial pass: ~2-3% of a chunk's three matmuls on CPU).
# - fp32 accumulation throughout. On CPU (no native bf16 GEMM with AVX2) bf16
#   / fp16 inputs are upcast to fp32 for the matmuls; on CUDA the matmuls run
#   in the input dtype with fp32 output and the softmax in fp32.

_LSE_TINY = 1e-30  # below this p_y, lse = z_y - log p_y loses precision: recompute
# Devices whose bf16 / fp16 GEMMs are native (run them in the input dtype with an
# fp32 result); elsewhere low-precision inputs are upcast to fp32 for the matmuls.
_LOWP_MM_DEVICES = ("cuda",)
_warned_module_fallback = False


def default_chunk_size(n_rows: int, vocab: int, device: torch.device | str) -> int:
    """Rows per chunk: a (C, V) fp32 logits buffer of about 32 MiB on CPU, at
    least 256 rows (a multiple of 64); 1 GiB on CUDA. On CPU the matmuls are
    ~95% of the time and only a few percent faster with bigger chunks
    (SmolLM2 head: 256 rows 18.4 s, 2048 rows 17.4 s CPU time; Llama-7B head:
    256 rows 22.5 s, 512 rows 20.7 s, 1024 rows 19.5 s), while the buffer is
    most of the loss's own memory; the buffer never fits a cache anyway."""
    kind = device if isinstance(device, str) else device.type
    budget = (1 << 30) if kind == "cuda" else (32 << 20)
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
    """Sum over supervised rows r of a * c_r * (lse(z) - (1 - eps) z_y - eps mean(z)),
    z = h[r] W^T + b, c_r = row_weight_r * s_r (the token scale, see the module
    docstring; c = 1 when token_scale is "none" and row_weight None). h: (N, H)
    all rows; rows: (n,) supervised row indices, with their targets y, eps and
    row_weight (n,). The supervised rows are gathered chunk by chunk
    and their gradient is written straight into the (N, H) gradient (no gathered
    copy of h, no separate gradient to scatter). Returns the fp32 scalar, or with
    need_nll the pair (loss, a * sum_r (lse - z_y)) (unscaled, unweighted), the
    second non-differentiable.
    """

    @staticmethod
    def forward(ctx, h, rows, w, b, y, eps, scale, chunk_size, need_h, need_w, need_b, lse_from_softmax,
                need_nll=False, token_scale="none", topk=20, row_weight=None):
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
        scaled = token_scale != "none" or row_weight is not None
        spread_sum = torch.zeros((), dtype=f32, device=dev)  # sum_r c_r eps_r / V (scaled bias gradient)

        loss = torch.zeros((), dtype=f32, device=dev)
        nll = torch.zeros((), dtype=f32, device=dev) if need_nll else None
        gh = torch.zeros(h.shape, dtype=f32, device=dev) if need_h else None
        gw = torch.zeros(vocab, hid, dtype=f32, device=dev) if need_w else None
        gb = torch.zeros(vocab, dtype=f32, device=dev) if need_b else None
        h_spread = torch.zeros(hid, dtype=f32, device=dev) if need_w else None

        c = chunk_size or default_chunk_size(n, vocab, dev)
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
            # EAFT's entropy from the logits, before the softmax overwrites them.
            ent = topk_entropy_scale(z, topk) if token_scale == "eaft" else None
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
            tok = lse - kc * gold - eps[s:e] * mean
            coef = ent if token_scale == "eaft" else torch.exp(gold - lse) if token_scale == "dft" else None
            if row_weight is not None:
                coef = row_weight[s:e] if coef is None else coef * row_weight[s:e]
            if scaled:  # c folded into the C-sized coefficients of the one-hot and constant parts
                tok = tok * coef
                kc, sc = kc * coef, sc * coef
            loss += tok.sum()
            if need_nll:  # the eps = 0 loss of these rows (bitwise: (1 - 0) z_y = z_y, 0 * mean = 0)
                nll += (lse - gold).sum()
            # c multiplies the softmax rows: in fp32, through the (C, H) operands
            # (row_c); in low precision, in the cast of P that happens anyway (one pass).
            row_c = coef if scaled and mm_dtype == f32 else None
            if need_h or need_w:
                if mm_dtype == f32:
                    zm = z
                elif scaled:
                    zm = torch.mul(z, coef.unsqueeze(1), out=torch.empty(z.shape, dtype=mm_dtype, device=dev))
                else:
                    zm = z.to(mm_dtype)
            if need_h:
                g = _mm_f32(zm, wm)  # P @ W
                if row_c is not None:
                    g.mul_(row_c.unsqueeze(1))
                g.addcmul_(wm.index_select(0, yc.squeeze(1)).to(f32), kc.unsqueeze(1), value=-1.0)
                g.addr_(sc, w_sum, alpha=-1.0)
                gh.index_copy_(0, rc, g.mul_(scale))
            if need_w:
                if mm_dtype == f32:
                    gw.addmm_(zm.t(), hc32 if row_c is None else hc32 * row_c.unsqueeze(1), alpha=scale)
                else:
                    gw.add_(_mm_f32(zm.t(), hc), alpha=scale)
                gw.index_add_(0, yc.squeeze(1), hc32 * kc.unsqueeze(1), alpha=-scale)
                h_spread.addmv_(hc32.t(), sc)
            if need_b:
                if scaled:  # P^T c
                    gb.addmv_(z.t(), coef)
                else:  # P^T 1
                    gb.add_(z.sum(0))
                gb.index_add_(0, yc.squeeze(1), kc, alpha=-1.0)
                if scaled:
                    spread_sum += sc.sum()
        if need_w:  # one pass over (V, H): the constant part of dL/dz
            gw.sub_(h_spread.mul_(scale))
        if need_b:
            gb.sub_(spread_sum if scaled else spread.sum()).mul_(scale)
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
        return tuple(out) + (None,) * 12


def _is_plain_linear(module) -> bool:
    return isinstance(module, torch.nn.Linear) and not hasattr(module, "lora_A")


def _module_fallback(hidden, head, targets, eps_tok, scale, chunk_size, ignore_index, need_nll=False,
                     token_scale="none", topk=20, w_tok=None):
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

    def chunk_loss(hc, yc, ec, wc):
        # Both terms from the one set of chunk logits: the NLL needs no second
        # forward through the head (the checkpoint's recompute redoes both, cheaply).
        tok, nll = _token_losses(head(hc), yc, ec, ignore_index, need_nll, token_scale, topk, wc)
        return (tok.sum(), nll.sum()) if need_nll else tok.sum()

    n = hidden.shape[0]
    vocab = getattr(head, "out_features", None) or 32768
    c = chunk_size or default_chunk_size(n, vocab, hidden.device)
    total = hidden.new_zeros((), dtype=torch.float32)
    nll = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, c):
        args = (hidden[s : s + c], targets[s : s + c], eps_tok[s : s + c], None if w_tok is None else w_tok[s : s + c])
        out = checkpoint(chunk_loss, *args, use_reentrant=False) if torch.is_grad_enabled() else chunk_loss(*args)
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
    token_scale: str = "none",
    eaft_topk: int = 20,
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`smoothed_cross_entropy(hidden @ weight.T + bias, ...)` without ever
    materialising all logits (same token_scale, eaft_topk, sample_weights).

    hidden: (B, T, H) final hidden states (the output projection's input);
    weight: (V, H) output-projection weight, or the projection module itself
    (a plain nn.Linear takes the fast path with its bias; any other module,
    e.g. a LoRA-wrapped lm_head, takes a correct slower chunk-by-chunk path,
    with a one-time warning); targets: (B, T) already shifted; eps: (B,) per
    sample, (B, T) per token (a padding-free row) or a float; sample_weights:
    (B,), (B, T) or None (`weight` is the output projection). Normalisation as `smoothed_cross_entropy`.
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
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else getattr(weight, "out_features", 2)
    check_token_scale(token_scale, eaft_topk, vocab)

    def per_row(values):  # a float, (B,) or (B, T) -> one value per supervised row
        return per_sample(values, targets, hidden.device).expand(targets.shape).reshape(-1).index_select(0, rows)

    eps_tok = per_row(eps)
    w_tok = None if sample_weights is None else per_row(torch.as_tensor(sample_weights).detach())
    scale = 1.0 / float(_denominator(targets, num_items_in_batch, ignore_index))

    if isinstance(weight, torch.nn.Module):
        if not _is_plain_linear(weight):
            h = hidden.reshape(-1, hid).index_select(0, rows)
            return _module_fallback(h, weight, y, eps_tok, scale, chunk_size, ignore_index, return_nll,
                                    token_scale, eaft_topk, w_tok)
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
        token_scale,
        eaft_topk,
        w_tok,
    )
