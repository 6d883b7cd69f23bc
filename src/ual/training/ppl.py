"""The perplexity variant of UAL (paper §3.2, docs/method.md §4): eps from the model's own loss, during training.

For each training sample i in a batch, from the same forward pass that trains on it:

    nll_i  = mean over the sample's supervised (response) tokens of -log p(y_t | y_<t)
    eps_i  = clip(eps_mean * nll_i / running_mean_nll, 0, eps_max)

`running_mean_nll` is the mean of nll over every sample seen so far in training,
this batch included (so the very first batch has mean eps exactly eps_mean before
clipping, and nothing is ever divided by zero). The NLL is computed without
gradient from the logits (or, with the chunked loss, from the final hidden states
and the output projection), with labels shifted so position t scores token t+1:
the reference code scored each token at its own position, which we do not copy.

Under data parallelism the batch statistics are summed over all processes before
the running mean is updated, so every process holds the same running mean and a
2-process run matches a 1-process run over the same global batch. The running
sums are part of a checkpoint (`ual_ppl_state.json` beside trainer_state.json),
so a resumed run continues with the same running mean.
"""

from __future__ import annotations

import json
import logging
import math
import os

import torch

from ual.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

STATE_FILE = "ual_ppl_state.json"


def sample_index(targets: torch.Tensor, position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Which sample each position belongs to, and how many samples there are: a batch row each, or in a
    padding-free row (several samples, position ids restarting at 0 for each) a new sample at every 0."""
    if position_ids is None:
        B = targets.shape[0]
        return torch.arange(B, device=targets.device).unsqueeze(1).expand_as(targets), B
    starts = (position_ids == 0).reshape(-1)
    owner = (torch.cumsum(starts.long(), 0) - 1).clamp_min(0).reshape(position_ids.shape)
    return owner, int(starts.sum()) or 1


def _per_sample_sums(nll_of, targets: torch.Tensor, owner: torch.Tensor | None, n: int | None, chunk_rows: int,
                     ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (fp32) and supervised-token count per sample; `nll_of(flat_positions)` gives the NLL of the
    targets at those positions of the flattened (B * T) batch, `chunk_rows` at a time."""
    if owner is None:
        owner, n = sample_index(targets)
    mask = (targets != ignore_index).reshape(-1)
    positions = mask.nonzero().squeeze(1)
    owners = owner.reshape(-1)[positions]
    sums = torch.zeros(n, dtype=torch.float32, device=targets.device)
    for s in range(0, len(positions), chunk_rows):
        sums.index_add_(0, owners[s:s + chunk_rows], nll_of(positions[s:s + chunk_rows]))
    counts = torch.zeros(n, dtype=torch.float32, device=targets.device).index_add_(
        0, owners, torch.ones_like(owners, dtype=torch.float32))
    return sums, counts


def per_sample_nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor | None = None,
                               n: int | None = None, chunk_rows: int = 1024,
                               ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL (fp32) and supervised-token count per sample, no gradient.

    logits (B, T, V) aligned with already-shifted targets (B, T); `owner` (B, T) and `n` from `sample_index`
    (default: a sample per row). Only supervised positions are read, `chunk_rows` at a time, so the fp32
    temporaries are (chunk_rows, V), never (B, T, V).
    """
    flat_logits, flat_targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def nll_of(pos):
        z = flat_logits[pos].float()
        return torch.logsumexp(z, -1) - z.gather(-1, flat_targets[pos].unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        return _per_sample_sums(nll_of, targets, owner, n, chunk_rows, ignore_index)


def per_sample_nll_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, owner: torch.Tensor | None = None,
                               n: int | None = None, chunk_rows: int = 1024,
                               ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """As `per_sample_nll_from_logits`, from final hidden states (B, T, H) and the lm_head weight (V, H):
    only supervised rows are projected, `chunk_rows` at a time (the chunked loss path never holds all
    logits, and neither does this)."""
    flat_hidden, flat_targets, w = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1), weight.float()

    def nll_of(pos):
        z = flat_hidden[pos].float() @ w.T
        if bias is not None:
            z = z + bias.float()
        return torch.logsumexp(z, -1) - z.gather(-1, flat_targets[pos].unsqueeze(-1)).squeeze(-1)

    with torch.no_grad():
        return _per_sample_sums(nll_of, targets, owner, n, chunk_rows, ignore_index)


class PerplexitySmoothing:
    """Stateful eps function for the `ppl` mode; pass it to UALTrainer as `eps_fn`.

    Call it with the batch's targets (shifted) and either `logits` or (`hidden`, `head`); it returns eps
    (B,), a sample per row, and in training updates the running mean. For a padding-free row give its
    `position_ids`: each sample in it (a new one at every position 0) gets its own eps, returned per
    token (1, T), as the loss takes a padding-free row's eps.
    """

    def __init__(self, eps_mean: float, eps_max: float = 0.99):
        if not 0 <= eps_mean < eps_max:
            raise ValueError(f"ppl mode needs 0 <= eps_mean < eps_max, got eps_mean={eps_mean}, eps_max={eps_max}")
        self.eps_mean, self.eps_max = float(eps_mean), float(eps_max)
        self.nll_sum = 0.0  # sum over samples seen of their mean NLL
        self.count = 0  # samples seen (with at least one supervised token)
        self.last_eps: list[float] = []
        self.history: list[float] = []  # mean eps per training micro-batch, for logs and tests

    @property
    def running_mean(self) -> float:
        return self.nll_sum / self.count if self.count else float("nan")

    def __call__(self, targets: torch.Tensor, logits: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                 head=None, training: bool = True, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        owner, n = sample_index(targets, position_ids)
        if logits is not None:
            sums, counts = per_sample_nll_from_logits(logits, targets, owner, n)
        else:
            sums, counts = per_sample_nll_from_hidden(hidden, head.weight, targets, getattr(head, "bias", None),
                                                      owner, n)
        has = counts > 0
        nll = torch.where(has, sums / counts.clamp_min(1), torch.zeros_like(sums))
        if training:
            batch = torch.stack([nll.sum(), has.sum().float()]).double()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(batch)  # same running mean on every process
            self.nll_sum += float(batch[0])
            self.count += int(round(float(batch[1])))
        mean = self.running_mean
        if not math.isfinite(mean) or mean <= 0:
            eps = torch.full_like(nll, self.eps_mean)
        else:
            eps = (self.eps_mean * nll / mean).clamp(0.0, self.eps_max)
        # A sample with no supervised token contributes no loss; give it the mean for the record.
        eps = torch.where(has, eps, torch.full_like(eps, self.eps_mean))
        if training:
            self.last_eps = eps.tolist()
            self.history.append(float(eps.mean()))
        return eps if position_ids is None else eps[owner]

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"eps_mean": self.eps_mean, "eps_max": self.eps_max, "nll_sum": self.nll_sum, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.nll_sum, self.count = float(state["nll_sum"]), int(state["count"])

    def save(self, checkpoint_dir: str | os.PathLike) -> None:
        from ual.io import write_json

        write_json(os.path.join(checkpoint_dir, STATE_FILE), self.state_dict())

    def load(self, checkpoint_dir: str | os.PathLike) -> bool:
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.exists(path):
            return False
        with open(path, encoding="utf-8") as fh:
            self.load_state_dict(json.load(fh))
        return True


def ppl_callback(eps_fn: PerplexitySmoothing):
    """A TrainerCallback saving the running mean into each checkpoint (on the main process)."""
    from transformers import TrainerCallback

    class PerplexityStateCallback(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
                if os.path.isdir(ckpt):
                    eps_fn.save(ckpt)
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs and eps_fn.count:
                logs["ppl_running_nll"] = eps_fn.running_mean
            return control

    return PerplexityStateCallback()
