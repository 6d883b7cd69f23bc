"""Log-likelihoods of continuations, each context paid for once.

A multiple-choice benchmark asks for log p(choice | question) for every choice of a
question: four requests that share their context (HellaSwag: a 60-token context and
four 25-token endings). lm-eval's Hugging Face backend runs each request as its own
row, so the context is computed four times (its one-token shortcut only helps when
every continuation is one token).

Here the requests that share a context become ONE row: the context, then every
continuation after it, with a tree attention mask and position ids that restart
after the context for each continuation:

    tokens     c1 c2 c3 | a1 a2 | b1 b2 b3
    positions   0  1  2 |  3  4 |  3  4  5
    a1 sees    c1 c2 c3   a1          (the context and its own earlier tokens only)
    b2 sees    c1 c2 c3         b1 b2

so each continuation's logits are exactly those of a separate forward over context +
continuation (up to float rounding: tests/evaluation/test_eval_loglik.py checks 1e-4
against lm-eval's own backend). The output head runs only at the positions that
predict a continuation token (SupervisedHead), not at all T positions: for a 135M
model with a 49k vocabulary the head is a fifth of the work per token.

The model needs eager or sdpa attention (flash attention ignores a 4D mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ual.batching import inference_batches
from ual.token_stats import SupervisedHead

# Rows of log-probabilities computed at once: ROWS x V floats (256 x 49k = 48 MiB).
_ROWS_PER_CHUNK = 256


def group_by_context(requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[tuple[tuple[int, ...], list[int]]]:
    """(context ids, indices of the requests with that context), in first-seen order; a request equal to an
    earlier one (TruthfulQA's MC1 choices are among MC2's) is left out: it is scored once and copied."""
    groups: dict[tuple[int, ...], dict[tuple[int, ...], int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        groups.setdefault(tuple(ctx), {}).setdefault(tuple(cont), i)
    return [(ctx, list(conts.values())) for ctx, conts in groups.items()]


def shared_context_loglikelihoods(model, requests: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int,
                                  batch_tokens: int = 4096, progress: bool = False) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per
    (context ids, continuation ids) request, in order. Requests with equal context ids share a row;
    rows are batched up to `batch_tokens` (rows x longest row) tokens."""
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: an empty context or continuation cannot be scored")
    groups = group_by_context(requests)
    length = [len(ctx) + sum(len(requests[i][1]) for i in idx) for ctx, idx in groups]
    order = sorted(range(len(groups)), key=lambda g: -length[g])
    batches, current = [], []
    for g in order:  # longest first, so a batch's first row is its widest
        if current and (len(current) + 1) * length[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(g)
    if current:
        batches.append(current)
    results: list = [None] * len(requests)
    head = SupervisedHead(model)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for batch_index in inference_batches(model, list(range(len(batches))), 1, "loglikelihood", progress):
        _score_rows(model, head, [groups[g] for g in batches[batch_index[0]]], requests, pad, device, dtype, results)
    first = {}
    for i, (ctx, cont) in enumerate(requests):  # the repeated requests take their first copy's answer
        results[i] = results[first.setdefault((tuple(ctx), tuple(cont)), i)]
    return results


def _score_rows(model, head, rows, requests, pad, device, dtype, results) -> None:
    """One forward over `rows` (context, request indices) with the tree mask; fills results."""
    width = max(len(ctx) + sum(len(requests[i][1]) for i in idx) for ctx, idx in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding sees itself only
    predicts = torch.zeros((len(rows), width), dtype=torch.bool)
    wanted = []  # (request, row, position predicting the token, token)
    for r, (ctx, idx) in enumerate(rows):
        n = len(ctx)
        ids[r, :n] = torch.tensor(ctx)
        pos[r, :n] = torch.arange(n)
        allowed[r, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        for i in idx:
            cont = list(requests[i][1])
            k = len(cont)
            ids[r, start:start + k] = torch.tensor(cont)
            pos[r, start:start + k] = torch.arange(n, n + k)
            allowed[r, start:start + k, :n] = True
            allowed[r, start:start + k, start:start + k] = torch.ones(k, k, dtype=torch.bool).tril()
            sources = [n - 1] + list(range(start, start + k - 1))  # the position before each token
            predicts[r, sources] = True
            wanted += [(i, r, p, t) for p, t in zip(sources, cont)]
            start += k
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    computed = head.supervised_logits(ids.to(device), mask[:, None].to(device), predicts.to(device),
                                      position_ids=pos.to(device))
    # computed rows follow predicts.nonzero() (row-major): number each predicting position
    slot = torch.full((len(rows), width), -1, dtype=torch.long)
    slot[predicts] = torch.arange(int(predicts.sum()))
    slots = torch.tensor([int(slot[r, p]) for _, r, p, _ in wanted])
    tokens = torch.tensor([t for *_, t in wanted])
    logp = torch.empty(len(wanted), dtype=torch.float64)
    greedy = torch.empty(len(wanted), dtype=torch.bool)
    for s in range(0, len(computed), _ROWS_PER_CHUNK):
        chunk = torch.log_softmax(computed.logits(s, s + _ROWS_PER_CHUNK).float(), dim=-1).cpu()
        here = ((slots >= s) & (slots < s + _ROWS_PER_CHUNK)).nonzero().squeeze(1)
        local = slots[here] - s
        logp[here] = chunk[local, tokens[here]].double()
        greedy[here] = chunk[local].argmax(-1) == tokens[here]
    request = torch.tensor([i for i, *_ in wanted])
    # per request: the sum of its tokens' log-probabilities, and whether every one was the argmax
    sums = torch.zeros(len(results), dtype=torch.float64).index_add_(0, request, logp)
    misses = torch.zeros(len(results), dtype=torch.long).index_add_(0, request, (~greedy).long())
    for i in request.unique().tolist():
        results[i] = (float(sums[i]), bool(misses[i] == 0))
