"""Hugging Face Trainer glue for per-sample label smoothing.

Three pieces, all thin:
- `SmoothedDataset` / `SmoothingCollator`: tokenised samples that carry their
  eps (and, optionally, a loss weight) through batching (a float per sample,
  padded alongside input_ids).
- `UALTrainer.compute_loss`: the model's logits (or, with the chunked loss, its
  final hidden states) into `ual.loss`, normalised by the supervised-token count
  of the whole accumulated batch, so accumulation and data parallel are exact;
  with the trainer's token scale (none, dft, eaft) and the batch's per-sample
  weights (a "weight" key), if any.
- `NllLogging`: every training log entry carries "nll" beside "loss", the plain
  NLL (the loss's eps = 0 term) of the same batches, which the loss returns at no
  extra cost: each mode's "loss" is its own objective, "nll" compares the modes.

SFT, uniform label smoothing and UAL are the same code with different eps; DFT
and EAFT the same code with a token scale (ual.loss docstring).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import Trainer

from ual.batching import pad_batch, pad_sequences
from ual.loss import IGNORE_INDEX, shift_labels, smoothed_cross_entropy
from ual.training.batches import is_padding_free

log = logging.getLogger(__name__)


class SmoothedDataset(Dataset):
    """Tokenised samples ({"input_ids", "labels"}), each with its eps and, if given, its loss weight.

    `encoded`: a list of such dicts, or a run's tokenized set (ual.data.tokenized: a memory-mapped
    `datasets.Dataset`), read a row at a time as the loader asks; eps and weights are float arrays
    beside it. eps None: the rows carry none, for a trainer whose eps_fn computes each batch's (the ppl mode).
    """

    def __init__(self, encoded, eps, weights=None):
        for name, column in (("smoothing values", eps), ("loss weights", weights)):
            if column is not None and len(column) != len(encoded):
                raise ValueError(f"{len(encoded)} samples but {len(column)} {name}")
        if hasattr(encoded, "select_columns"):  # a datasets.Dataset: only the columns a batch needs
            encoded = encoded.select_columns(["input_ids", "labels"])
        self.encoded = encoded
        self.eps = None if eps is None else np.asarray(eps, dtype=np.float64)
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float64)
        self.mean_eps = float(self.eps.mean()) if self.eps is not None and len(self.eps) else None
        self.mean_weight = float(self.weights.mean()) if self.weights is not None and len(self.weights) else 1.0

    def __len__(self):
        return len(self.encoded)

    def lengths(self):
        """Each sample's token count (train.batching grouped orders samples by it)."""
        from ual.training.batches import sample_lengths

        return sample_lengths(self.encoded)

    def __getitem__(self, i):
        e = self.encoded[int(i)]
        row = {"input_ids": e["input_ids"], "labels": e["labels"]}
        for key, column in (("eps", self.eps), ("weight", self.weights)):
            if column is not None:
                row[key] = float(column[i])
        return row


@dataclass
class SmoothingCollator:
    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        ids, mask = pad_batch([r["input_ids"] for r in rows], self.pad_token_id)
        labels = pad_sequences([r["labels"] for r in rows], IGNORE_INDEX)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for key in ("eps", "weight"):  # per-sample floats, when the rows carry them
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        return batch


class NllLogging:
    """Mixin for a Trainer whose compute_loss calls `_record_nll`: adds "nll" to
    each training log entry, as the Trainer logs "loss": the per-micro-step terms
    summed on device (no host sync per step), then gathered, averaged over
    processes and divided by the optimiser steps since the last log."""

    _nll_sum: torch.Tensor | None = None
    _nll_window_start = 0

    def _record_nll(self, nll: torch.Tensor) -> None:
        if self._nll_sum is None:
            # The first micro-step after a log (or at the start) runs at the step the
            # Trainer last logged at: the window the Trainer divides "loss" by.
            self._nll_sum = torch.zeros((), dtype=torch.float32, device=self.args.device)
            self._nll_window_start = self.state.global_step
        nll = nll.detach().float().to(self._nll_sum.device)
        if self.args.logging_nan_inf_filter:
            # As the Trainer does for the loss: a non-finite step counts as the window's mean
            # so far; torch.where, not an if, so there is no host sync.
            mean = self._nll_sum / (1 + self.state.global_step - self._nll_window_start)
            nll = torch.where(torch.isfinite(nll), nll, mean)
        self._nll_sum += nll

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._nll_sum is not None:
            from transformers.trainer_pt_utils import nested_gather

            # Every process logs at the same steps (the Trainer gathers the loss here too),
            # so this collective is entered by all of them.
            total = nested_gather(self._nll_sum, self.args.parallel_mode).mean().item()
            steps = max(self.state.global_step - self._nll_window_start, 1)
            logs = {**logs, "nll": total / steps}
            self._nll_sum = None
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._nll_sum = None  # a previous train() call's unlogged remainder is not this run's
        return super().train(*args, **kwargs)


class UALLoss(NllLogging):
    """Mixin giving a transformers Trainer (UALTrainer) or TRL's SFTTrainer (UALSFTTrainer, trl.py)
    ual's loss: per-sample label-smoothed cross-entropy, optionally token-scaled and sample-weighted.

    `loss_impl`: "naive" (full logits) or "chunked" (from hidden states and the output-projection
    weight, never materialising all logits). `token_scale`: "none", "dft" or "eaft" (top `eaft_topk`
    logits), applied to every token (ual.loss). A batch's "eps" (B,) smooths its samples and its
    "weight" (B,), if any, weights their losses. `eps_fn` (the ppl mode, training/ppl.py) computes
    each batch's eps from its own forward pass instead. Logs "nll" beside "loss" (`NllLogging`): the
    plain NLL, unscaled and unweighted, comparable across modes.
    """

    # Our loss is divided by num_items_in_batch (the whole accumulated batch's
    # token count), so the Trainer must not divide it again by the accumulation steps.
    loss_is_scaled_for_ga = True

    @staticmethod
    def check_loss_options(loss_impl: str, token_scale: str) -> None:
        from ual.loss import TOKEN_SCALES
        from ual.modes import LOSS_IMPLS

        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"train.loss must be one of {', '.join(LOSS_IMPLS)}, got {loss_impl!r}")
        if token_scale not in TOKEN_SCALES:
            raise ValueError(f"token_scale must be one of {TOKEN_SCALES}, got {token_scale!r}")

    def init_loss(self, loss_impl: str, eps_fn, token_scale: str, eaft_topk: int) -> None:
        """Called after the Trainer's own __init__."""
        self.loss_impl, self.eps_fn = loss_impl, eps_fn
        self.token_scale, self.eaft_topk = token_scale, eaft_topk
        # Make the Trainer count supervised tokens over the accumulated batch
        # (it only does so for models it believes take loss kwargs), over the
        # shifted labels, exactly as our loss counts them.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._hidden_checked = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        eps = inputs.pop("eps", None)
        if eps is None and self.eps_fn is None:
            raise ValueError("the batch has no 'eps' and the trainer no eps_fn: build the dataset with each "
                             "sample's eps (SmoothedDataset) or give the trainer an eps_fn")
        # A padding-free row (position ids, no attention mask) holds several samples: eps_fn gives each its own.
        packed = inputs["position_ids"] if is_padding_free(inputs) else None
        targets = shift_labels(inputs.pop("labels"))
        # The token scale and the per-sample weights (None: all 1) act beside eps (ual.loss).
        modes = dict(token_scale=self.token_scale, eaft_topk=self.eaft_topk, sample_weights=inputs.pop("weight", None))
        if self.loss_impl == "chunked":
            from ual.loss import chunked_smoothed_cross_entropy

            hidden, head = final_hidden_states(model, inputs, check=not self._hidden_checked)
            self._hidden_checked = True
            if self.eps_fn is not None:
                eps = self.eps_fn(targets, hidden=hidden.detach(), head=head, training=model.training,
                                   position_ids=packed)
            # The module, not its weight: a LoRA-carrying head then takes the loss's
            # slower exact path instead of silently dropping its adapter.
            loss, nll = chunked_smoothed_cross_entropy(hidden, head, targets, eps, num_items_in_batch=num_items_in_batch,
                                                       return_nll=True, **modes)
            outputs = None
        else:
            outputs = model(**inputs, use_cache=False)
            if self.eps_fn is not None:
                eps = self.eps_fn(targets, logits=outputs.logits.detach(), training=model.training,
                                   position_ids=packed)
            loss, nll = smoothed_cross_entropy(outputs.logits, targets, eps, num_items_in_batch=num_items_in_batch,
                                               return_nll=True, **modes)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch is summed over processes; DDP averages gradients,
            # so undo that average to get the global per-token mean. The NLL gets the
            # same factor, so its mean over processes at logging is the global one too.
            loss = loss * self.accelerator.num_processes
            nll = nll * self.accelerator.num_processes
        # Only training steps: evaluation (model.eval(), no grad) must not leak into
        # the training window's NLL.
        if model.training and torch.is_grad_enabled():
            self._record_nll(nll)
        return (loss, outputs) if return_outputs else loss



class UALTrainer(UALLoss, Trainer):
    """A transformers Trainer whose loss is ual's (UALLoss): batches carry "eps" (and "weight")."""

    def __init__(self, *args, loss_impl: str = "naive", eps_fn=None, token_scale: str = "none", eaft_topk: int = 20,
                 sampling: str = "shuffle", group_lengths=None, **kwargs):
        self.check_loss_options(loss_impl, token_scale)
        if sampling not in ("shuffle", "replacement"):
            raise ValueError(f"sampling must be shuffle or replacement, not {sampling!r}")
        if group_lengths is not None and sampling != "shuffle":
            raise ValueError("train.batching grouped orders each epoch's permutation by length; sampling "
                             "replacement draws with replacement instead: use batching padded or padding_free with it")
        self.sampling, self.group_lengths = sampling, group_lengths
        super().__init__(*args, **kwargs)
        self.init_loss(loss_impl, eps_fn, token_scale, eaft_topk)

    def _get_train_sampler(self, *args, **kwargs):
        """`sampling: replacement` draws every sample of an epoch at random with replacement, as the paper's
        reference code drew its micro-batches (seeded by data_seed); `shuffle` is the Trainer's own order, or
        with `group_lengths` (train.batching grouped) a length-grouped permutation (training/batches.py)."""
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if self.group_lengths is not None:
            from ual.training.batches import LengthGroupedSampler

            per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
            return LengthGroupedSampler(self.group_lengths, per_step * self.args.world_size, seed)
        if self.sampling == "shuffle":
            return super()._get_train_sampler(*args, **kwargs)
        dataset = (args[0] if args else kwargs.get("train_dataset")) or self.train_dataset
        generator = torch.Generator().manual_seed(seed)
        return torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=len(dataset), generator=generator)


# Shardings under which the chunked loss cannot read the output projection: FSDP1 and ZeRO-3
# gather it only inside the module's own forward (FSDP2 is handled: `gather_output_projection`).
CHUNKED_REFUSED = {"fsdp": "FSDP1 shards the output projection (use FSDP2: fsdp_version 2)",
                   "zero3": "ZeRO-3 shards the output projection"}


def resolve_loss(loss: str, sharding: str | None, model_config=None) -> str:
    """train.loss auto: the chunked loss (benchmarks/loss.py: faster and a fraction of the memory),
    except where it cannot run: an output projection sharded out of reach (FSDP1, ZeRO-3) or logits
    that are not hidden @ lm_head (soft-capping, scaling; checked when model_config is given).
    An explicit chunked where the projection is sharded out of reach is an error."""
    if loss == "chunked" and sharding in CHUNKED_REFUSED:
        raise ValueError(f"train.loss chunked reads the output-projection weight outside the model's forward, and "
                         f"{CHUNKED_REFUSED[sharding]}: use train.loss naive (or auto) here (docs/training.md)")
    if loss != "auto":
        return loss
    reason = (CHUNKED_REFUSED[sharding] if sharding in CHUNKED_REFUSED
              else chunked_unsupported(model_config) if model_config is not None else None)
    if reason:
        log.info("train.loss auto: naive loss, since %s", reason)
        return "naive"
    return "chunked"


def chunked_unsupported(config) -> str | None:
    """Why logits are not hidden @ lm_head for this architecture (None: they are)."""
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0, 0, 0.0):
            return f"{config.model_type} post-processes its logits ({attr}={value})"
    return None


def final_hidden_states(model, inputs, check: bool = False):
    """Run a causal LM up to (not through) its output projection.

    Returns the final hidden states (B, T, H) and the output-projection module.
    The model is called through its own forward, whatever wraps it (peft, DDP,
    DeepSpeed), so the wrappers' hooks run (DDP must see the forward to reduce
    gradients); `logits_to_keep=1` keeps the model's own logits to one position.
    `check` compares the head applied to the last hidden state with the model's
    own last logits, so an architecture whose last reported hidden state is not
    the head's input fails loudly instead of training on the wrong features.
    """
    from accelerate.utils import extract_model_from_parallel

    lm = extract_model_from_parallel(model)
    if hasattr(lm, "get_base_model"):  # peft wrapper
        lm = lm.get_base_model()
    reason = chunked_unsupported(lm.config)
    if reason:
        raise ValueError(f"train.loss chunked: {reason}; use train.loss: naive for this model")
    from ual.training.batches import PACKED_FORWARD_KEYS

    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False,
                  output_hidden_states=True, **{k: inputs[k] for k in PACKED_FORWARD_KEYS if k in inputs})
    try:
        out = model(**kwargs, logits_to_keep=1)
    except TypeError:  # architectures without logits_to_keep: their full logits are computed and dropped
        out = model(**kwargs)
    hidden, head = out.hidden_states[-1], lm.get_output_embeddings()
    if check:
        with torch.no_grad():
            ours, theirs = head(hidden[:, -1]).float(), out.logits[:, -1].float()
            if (ours - theirs).abs().max() > 1e-2 * theirs.abs().max() + 1e-3:
                raise ValueError(f"train.loss chunked: {type(lm).__name__}'s last hidden state is not the input of "
                                 "its output projection; use train.loss: naive for this model")
    gather_output_projection(lm, head)  # after the check: calling an FSDP unit reshards it
    return hidden, head


def gather_output_projection(root, head) -> None:
    """Make the output projection's full weight readable after the forward, under FSDP2.

    FSDP2 keeps the root unit's parameters gathered from the forward to the backward, so a
    head in the root unit (the usual per-decoder-layer wrapping) is already a full tensor.
    A head that is its own unit (or in another resharded one) holds a DTensor shard: its
    owning unit is gathered with `FSDPModule.unshard()`. Either way the loss's weight
    gradient lands on the gathered parameter, which FSDP reduce-scatters at the end of the
    backward as usual (tests/training/test_train_fsdp.py checks the gradients against one process).
    """
    weight = getattr(head, "weight", None)
    if not _is_dtensor(weight):
        return
    from torch.distributed.fsdp import FSDPModule

    path = next((n for n, m in root.named_modules() if m is head), None)
    parts = path.split(".") if path is not None else []
    owners = [root.get_submodule(".".join(parts[:i])) for i in range(len(parts), -1, -1)]
    owner = next((m for m in owners if isinstance(m, FSDPModule)), None)
    if owner is not None:
        owner.unshard()
    if _is_dtensor(getattr(head, "weight", None)):
        raise ValueError("train.loss chunked: the output projection is sharded (a DTensor) and no FSDP2 unit "
                         "owns it to gather it; use train.loss: naive")


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)
