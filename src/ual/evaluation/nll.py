"""Per-sample negative log-likelihood of the supervised (response) tokens.

Shared by the perplexity scorer (each sample's mean NLL is its uncertainty) and
the held-out evaluation (token-weighted mean NLL per data source). Labels are
shifted: position t is scored on token t + 1 (the reference code scored each
token at its own position).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ual.loss import IGNORE_INDEX, shift_labels


@torch.no_grad()
def sample_nll(model, tokenizer, samples, max_length: int, batch_size: int = 8,
               train_on_prompt: bool = False, desc: str = "NLL") -> list[tuple[float, int]]:
    """(sum of NLL, number of scored tokens) for each sample, in order."""
    from ual.data.tokenize import encode_sample

    encoded = [encode_sample(tokenizer, s.messages, max_length, train_on_prompt) for s in samples]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    device = next(model.parameters()).device
    results: list[tuple[float, int] | None] = [None] * len(encoded)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]["input_ids"]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            n = len(encoded[i]["input_ids"])
            ids[row, :n] = torch.tensor(encoded[i]["input_ids"])
            labels[row, :n] = torch.tensor(encoded[i]["labels"])
            mask[row, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        targets = shift_labels(labels).to(device)
        nll = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
        counts = (targets != IGNORE_INDEX).sum(dim=1)
        for row, i in enumerate(idx):
            results[i] = (float(nll[row].sum()), int(counts[row]))
    return results


def nll_by_source(samples, per_sample: list[tuple[float, int]]) -> dict[str, dict]:
    """Token-weighted mean NLL (and perplexity) per data source and overall."""
    sums, counts = defaultdict(float), defaultdict(int)
    for s, (total, n) in zip(samples, per_sample):
        for key in (s.source, "all"):
            sums[key] += total
            counts[key] += n
    return {k: {"nll": sums[k] / max(counts[k], 1), "ppl": float(torch.tensor(sums[k] / max(counts[k], 1)).exp()),
                "tokens": counts[k]} for k in sums}
