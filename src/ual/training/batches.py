"""How a micro-batch's samples are laid out for the model (train.batching).

  padded        each sample a row, padded to the batch's longest (SmoothingCollator, trainer.py).
  grouped       the same padded rows, but the samples are drawn in length-grouped order
                (HF's group_by_length: a seeded permutation cut into mega-batches, each sorted by
                length), so a batch's samples have similar lengths and little padding. It changes
                which samples meet in a step, so it is a different (equally valid) run.
  padding_free  the batch's samples concatenated into one row without padding
                (`PaddingFreeCollator`), position ids restarting at 0 for each sample, as
                transformers' DataCollatorWithFlattening and TRL's padding_free lay them out.
                The same samples, order, loss and gradients as padded, to float rounding.

In a padding-free row every token carries its own sample's eps and loss weight: batch["eps"]
and batch["weight"] are (1, T) instead of (B,), one value per token, which ual.loss takes as
it takes per-sample values; the token scales (dft, eaft) are per token anyway. A sample's first
token is never a target (in a padded row, the shift drops it), so its label is IGNORE_INDEX:
the previous sample's last token predicts nothing across the boundary, and the supervised-token
count (the loss's denominator, counted by the Trainer over labels[..., 1:]) is the padded one.

Attention must not cross samples. With no attention mask and position ids that restart,
transformers builds a block-diagonal causal mask for eager, sdpa and flex_attention (checked
against the per-sample logits in tests/training/test_train_batching.py; only without a KV cache,
which training never uses), and flash_attention_2/3 take the varlen kernel from the sequence
boundaries (`cu_seq_lens_*`, given by the collator). A mask-based row computes every (T, T)
block, masked or not, so `ual train` runs an sdpa model's padding-free rows with "sdpa_varlen"
(below): SDPA a sample at a time on the row's slices. Any other implementation is refused
(`check_packed_attention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ual.loss import IGNORE_INDEX

BATCHINGS = ("padded", "grouped", "padding_free")
# Attention implementations that keep the samples of a padding-free row apart (module docstring).
PACKED_ATTENTION = ("eager", "sdpa", "sdpa_varlen", "flex_attention", "flash_attention_2", "flash_attention_3")
# Those that take the row's sample boundaries (cu_seq_lens_*) from the collator and run each sample alone.
VARLEN_ATTENTION = ("sdpa_varlen", "flash_attention_2", "flash_attention_3")
# Batch keys, beside input_ids and attention_mask, that the model's forward takes for a padding-free row.
# (seq_idx: TRL's, for the short convolutions of linear-attention layers.)
PACKED_FORWARD_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def is_padding_free(batch: dict) -> bool:
    """A padding-free row (this module's collator, TRL's padding_free or packing): position ids that restart
    per sample and no attention mask, so one row holds several samples."""
    return "position_ids" in batch and "attention_mask" not in batch


def attention_implementation(model) -> str | None:
    from accelerate.utils import extract_model_from_parallel

    lm = extract_model_from_parallel(model)
    config = getattr(lm, "config", None)
    return getattr(config, "_attn_implementation", None)


def check_packed_attention(model) -> str:
    """The model's attention implementation, if it keeps the samples of a padding-free row apart; else a
    one-line error naming it."""
    impl = attention_implementation(model)
    if impl not in PACKED_ATTENTION:
        raise ValueError(f"train.batching padding_free: attention implementation {impl!r} would let the samples "
                         f"of a packed row attend to each other; use one of {', '.join(PACKED_ATTENTION)}, "
                         "or train.batching padded")
    return impl


@dataclass
class PaddingFreeCollator:
    """A micro-batch's samples as one row (1, T) with no padding: input_ids, labels (each sample's first
    token IGNORE_INDEX), position_ids restarting per sample, and per-token "eps" / "weight" (1, T) when
    the samples carry them; with `varlen`, the sequence boundaries flash-attention's varlen kernel takes."""

    varlen: bool = False

    def __call__(self, rows: list[dict]) -> dict:
        lengths = torch.tensor([len(r["input_ids"]) for r in rows])
        ids = torch.cat([torch.as_tensor(r["input_ids"], dtype=torch.long) for r in rows])
        labels = torch.cat([torch.as_tensor(r["labels"], dtype=torch.long) for r in rows])
        if labels.shape != ids.shape:
            raise ValueError(f"{len(labels)} labels for {len(ids)} input ids: every sample needs one label per token")
        starts = torch.cumsum(lengths, 0) - lengths
        labels[starts[lengths > 0]] = IGNORE_INDEX
        positions = torch.arange(len(ids)) - torch.repeat_interleave(starts, lengths)
        batch = {"input_ids": ids[None], "labels": labels[None], "position_ids": positions[None]}
        for key in ("eps", "weight"):  # per-sample floats, one per token of the sample
            if key in rows[0]:
                values = torch.tensor([r[key] for r in rows], dtype=torch.float32)
                batch[key] = torch.repeat_interleave(values, lengths)[None]
        if self.varlen:
            cu = torch.cat([starts, lengths.sum().view(1)]).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = int(lengths.max()) if len(lengths) else 0
        return batch


class LengthGroupedSampler(torch.utils.data.Sampler):
    """train.batching grouped: transformers' length-grouped order (get_length_grouped_indices over
    batch_size x accumulation samples), drawn from a generator seeded by (seed, epoch) alone, so every
    process draws the same order and a resumed run draws the epoch it was killed in again."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def sample_lengths(encoded) -> np.ndarray:
    """Token count of each sample: a tokenized set's input_ids lengths, read from Arrow without
    decoding the rows; or the lengths of a list of encoded dicts."""
    if hasattr(encoded, "with_format"):  # a datasets.Dataset, maybe a selection of its table's rows
        import pyarrow.compute as pc

        parts = [pc.list_value_length(b["input_ids"]).to_numpy(zero_copy_only=False)
                 for b in encoded.with_format("arrow").iter(batch_size=65536)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return np.array([len(e["input_ids"]) for e in encoded], dtype=np.int64)


def pad_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of pad tokens when `batches` (lists of sample indices) are padded to their longest sample."""
    real = padded = 0
    for batch in batches:
        lens = [int(lengths[i]) for i in batch]
        real += sum(lens)
        padded += max(lens, default=0) * len(lens)
    return 1 - real / padded if padded else 0.0


# --------------------------------------------------------------------------- varlen SDPA (any device)
# On a padding-free row, sdpa and eager attend over the whole row through a block-diagonal (T, T) mask: the
# masked-out blocks are computed anyway (on CPU, (sum of lengths)^2 instead of the sum of squares), and a
# mask keeps SDPA off its fused causal kernel. "sdpa_varlen" is SDPA run sample by sample on the row's
# slices (the collator's cu_seq_lens), each causal with no mask: what flash-attention's varlen kernel does
# on CUDA, from PyTorch's own kernels. Rows without boundaries (padded batches, evaluation) are plain sdpa.
SDPA_VARLEN = "sdpa_varlen"


def sdpa_varlen_attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """Without boundaries, or with a sliding window shorter than a sample (its mask, built with the packed
    rows' blocks, is then used whole), this is sdpa itself. A window no sample outgrows (Mistral's 4096 at
    the paper's 768 tokens) masks nothing within a sample: each is plain causal."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = cu_seq_lens_q.tolist() if cu_seq_lens_q is not None else []
    window = kwargs.get("sliding_window")
    # transformers' window: a query at i sees keys j with i - j < window; a sample of n tokens has i - j < n.
    longest = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    if (not bounds or query.shape[0] != 1 or query.shape[2] != key.shape[2]
            or (window is not None and longest > window)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    kwargs.pop("sliding_window", None)
    parts = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True,
                                    **kwargs)[0] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return torch.cat(parts, dim=1), None


def register_sdpa_varlen() -> str:
    """Make attn_implementation "sdpa_varlen" known to transformers (attention and its masks: sdpa's)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if SDPA_VARLEN not in AttentionInterface._global_mapping:
        AttentionInterface.register(SDPA_VARLEN, sdpa_varlen_attention)
        AttentionMaskInterface.register(SDPA_VARLEN, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return SDPA_VARLEN


def prepare_packed_attention(model) -> bool:
    """For train.batching padding_free: refuse an attention implementation that would cross samples, switch
    sdpa to sdpa_varlen; whether the collator must give the row's boundaries (PaddingFreeCollator varlen)."""
    impl = check_packed_attention(model)
    if impl == "sdpa":
        from accelerate.utils import extract_model_from_parallel

        lm = extract_model_from_parallel(model)
        (lm.get_base_model() if hasattr(lm, "get_base_model") else lm).set_attn_implementation(register_sdpa_varlen())
        impl = SDPA_VARLEN
    return impl in VARLEN_ATTENTION
