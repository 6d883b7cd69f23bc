"""Per-sample statistics of the supervised (response) tokens, from one forward pass.

For every supervised token t of a sample (gold y_t, next-token distribution p_t):
  NLL      -log p_t(y_t)
  entropy  H(p_t) = -sum_v p_t(v) log p_t(v)    (how spread the model's prediction is,
           whatever the gold token: the `entropy` scorer's uncertainty)
  confidence / correct   max_v p_t(v) and [argmax_v p_t(v) == y_t]  (token-level calibration)
Shared by the perplexity and entropy scorers (one pass gives both) and the held-out
evaluation (token-weighted NLL per source, per-sample results, calibration). Labels are
shifted: position t is scored on token t + 1 (the reference code scored each token at
its own position).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ual.batching import inference_batches, pad_batch, pad_id, pad_sequences
from ual.loss import IGNORE_INDEX, shift_labels

# Supervised rows turned into fp32 log-probabilities at a time: bounds the extra memory to
# ROWS x V floats whatever the batch (256 x 49k = 48 MiB; 256 x 262k = 256 MiB).
_ROWS_PER_CHUNK = 256


@dataclass
class TokenStats:
    """One sample's sums over its supervised tokens (and, when kept, the per-token values)."""

    nll: float
    entropy: float
    tokens: int
    confidence: np.ndarray | None = None  # (tokens,) max_v p(v)
    correct: np.ndarray | None = None  # (tokens,) bool, argmax == gold

    @property
    def mean_nll(self) -> float | None:
        return self.nll / self.tokens if self.tokens else None

    @property
    def mean_entropy(self) -> float | None:
        return self.entropy / self.tokens if self.tokens else None


def response_token_stats(model, tokenizer, samples, max_length: int, batch_size: int = 8,
                         train_on_prompt: bool = False, desc: str = "NLL", keep_tokens: bool = False,
                         encoded=None) -> list[TokenStats]:
    """TokenStats for each sample, in order (keep_tokens: also the per-token confidence and correctness).
    `encoded`: the samples already tokenized with these settings (the run's tokenized set,
    ual.data.tokenized), read a batch at a time; else they are tokenized here.

    The model runs in eval mode with autograd off; its own mode comes back afterwards."""
    from ual.data.tokenize import encode_many

    if encoded is None:
        encoded = encode_many(tokenizer, [s.messages for s in samples], max_length, train_on_prompt)
        lengths = [len(e["input_ids"]) for e in encoded]
    else:
        if len(encoded) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(encoded)} tokenized rows")
        lengths = encoded["tokens"][:]
        encoded = encoded.select_columns(["input_ids", "labels"])
    order = sorted(range(len(encoded)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    results: list[TokenStats | None] = [None] * len(encoded)
    head = SupervisedHead(model)
    for idx in inference_batches(model, order, batch_size, desc, progress=True):
        rows = [encoded[i] for i in idx]
        ids, mask = pad_batch([r["input_ids"] for r in rows], pad_id(tokenizer))
        labels = pad_sequences([r["labels"] for r in rows], IGNORE_INDEX)
        targets = shift_labels(labels).to(device)
        supervised = targets != IGNORE_INDEX
        row_of = supervised.nonzero()[:, 0].cpu()  # which batch row each supervised token belongs to
        nll, ent, conf, corr = _per_token(head.supervised_logits(ids.to(device), mask.to(device), supervised),
                                          targets[supervised])
        nll_sum = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row_of, nll.double())
        ent_sum = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, row_of, ent.double())
        counts = torch.bincount(row_of, minlength=len(idx))
        for row, i in enumerate(idx):
            st = TokenStats(float(nll_sum[row]), float(ent_sum[row]), int(counts[row]))
            if keep_tokens:
                sel = row_of == row
                st.confidence, st.correct = conf[sel].numpy(), corr[sel].numpy()
            results[i] = st
    return results


class SupervisedHead:
    """Logits at the supervised positions only, without the (batch, length, V) logits tensor.

    A causal LM's forward applies its output head to every position: at 1,024 tokens and
    Gemma-3's 262k vocabulary that is 1 GiB per sample in fp32. Here the model runs with
    `logits_to_keep=1` (the head on the last position only), a hook keeps the decoder's
    final hidden states, and the head is applied to the supervised rows, a chunk at a time
    in `_per_token`. Some models post-process the head's output (Gemma-2's soft-capping,
    logit scales): the one logit row the model did compute is checked against ours on
    every batch, and a model whose head this does not reproduce falls back to its full
    forward (exact, just heavier).
    """

    def __init__(self, model):
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.cap = getattr(model.config, "final_logit_softcapping", None)
        self.exact = self.decoder is not None and self.head is not None

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def supervised_logits(self, ids, mask, supervised, **forward) -> "_Rows":
        """`forward`: further arguments of the model's forward (position ids for a tree-shaped batch)."""
        if self.exact:
            kept = {}
            hook = self.decoder.register_forward_hook(lambda mod, args, out: kept.__setitem__("h", out[0]))
            try:
                last = self.model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1,
                                  **forward).logits
            except TypeError:  # a model whose forward takes no logits_to_keep
                last = None
            finally:
                hook.remove()
            hidden = kept.get("h")
            if last is not None and hidden is not None and hidden.shape[:2] == ids.shape and torch.allclose(
                    self.project(hidden[:, -1:]).float(), last.float(), rtol=1e-3, atol=1e-3):
                return _Rows(hidden[supervised], self.project)
            self.exact = False  # this model's head is not reproduced: use its full logits from now on
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **forward).logits
        return _Rows(logits[supervised], None)


@dataclass
class _Rows:
    """Supervised rows as hidden states (and the head that makes them logits) or as logits."""

    values: torch.Tensor
    project: object = None

    def __len__(self) -> int:
        return self.values.shape[0]

    def logits(self, start: int, stop: int) -> torch.Tensor:
        rows = self.values[start:stop]
        return rows if self.project is None else self.project(rows)


def _per_token(rows: _Rows, gold: torch.Tensor):
    """(nll, entropy, confidence, correct) per supervised row, on the CPU, fp32."""
    parts = []
    for s in range(0, len(rows), _ROWS_PER_CHUNK):
        logp = torch.log_softmax(rows.logits(s, s + _ROWS_PER_CHUNK).float(), dim=-1)
        y = gold[s:s + _ROWS_PER_CHUNK].unsqueeze(1)
        top, arg = logp.max(dim=-1)
        parts.append((-logp.gather(1, y).squeeze(1), -(logp.exp() * logp).sum(-1), top.exp(), arg == y.squeeze(1)))
    if not parts:
        empty = torch.zeros(0)
        return empty, empty, empty, torch.zeros(0, dtype=torch.bool)
    return tuple(torch.cat(p).cpu() for p in zip(*parts))


def nll_by_source(samples, stats: list[TokenStats]) -> dict[str, dict]:
    """Token-weighted mean NLL (and perplexity, mean entropy) per data source and overall."""
    sums, ents, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for s, st in zip(samples, stats):
        for key in (s.source, "all"):
            sums[key] += st.nll
            ents[key] += st.entropy
            counts[key] += st.tokens
    out = {}
    for k in sums:
        nll = sums[k] / max(counts[k], 1)
        out[k] = {"nll": nll, "ppl": float(np.exp(nll)), "entropy": ents[k] / max(counts[k], 1), "tokens": counts[k]}
    return out
