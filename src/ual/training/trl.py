"""UAL as a drop-in for TRL's `SFTTrainer`: `UALSFTTrainer`.

    from trl import SFTConfig
    from ual.training.trl import UALSFTTrainer

    ds = ds.add_column("eps", eps)            # one smoothing value per row (e.g. smoothing.jsonl's)
    trainer = UALSFTTrainer(model=model, args=SFTConfig(output_dir="out", assistant_only_loss=True),
                            train_dataset=ds, processing_class=tokenizer)
    trainer.train()

Everything TRL does (chat templates, assistant/completion masks, truncation, peft,
DeepSpeed/FSDP through accelerate) is kept; three things change:

1. The `eps` column survives (and a float `weight` column, if the dataset has one:
   each sample's loss weight, ual.loss). TRL (like Trainer) drops dataset columns the model's
   forward does not take (`remove_unused_columns`), and its collator builds only
   input_ids / attention_mask / labels. `eps` is added to the kept columns and the
   collator is wrapped so each batch carries `eps` (B,), exactly as ual's own collator.
2. The loss is ual's per-sample label-smoothed cross-entropy (`UALLoss.compute_loss`, shared with UALTrainer,
   the same function `ual train` runs: same normalisation by the supervised tokens of
   the whole accumulated batch, same data-parallel correction), not TRL's. TRL's default
   loss goes through its fused LM head, which returns only the gold token's
   log-probability per position (no logits): label smoothing needs the mean over the
   vocabulary too, so it cannot be computed from it. We call the model's ordinary
   forward (`fused_lm_head` off), or with `loss_impl="chunked"` ual's chunked loss from
   the final hidden states. TRL's `label_smoothing_factor`, `loss_type="dft"` and
   Liger's fused linear cross-entropy would replace or fight the smoothing: refused.
   DFT is `token_scale="dft"` here (TRL's definition, composed with eps; EAFT:
   `token_scale="eaft"`), in either loss_impl.
3. `padding_free=True` and `packing=True` (strategy "bfd") carry each sample's eps (and weight)
   to every one of its tokens: a padding-free row's batch["eps"] is (1, T), one value per
   token (ual.training.batches), and for packing the dataset gets per-token eps / weight
   columns before TRL's own best-fit-decreasing packing moves the samples into rows, so they
   travel with their tokens. Each sample is truncated to max_length first (as without packing),
   so every sample keeps its whole context and the loss and gradients are the padded batch's
   (tests/training/test_train_trl.py). Refused: packing "wrapped" and "bfd_split" (they cut a
   sample into pieces that lose their context: not the same loss), an attention implementation
   that would let a row's samples see each other (batches.check_packed_attention). The ppl
   eps_fn gives each sample of a padding-free row its own eps (training/ppl.py).

TRL's extra metrics (entropy, token accuracy) need the fused head's outputs and are
not logged; the loss is, and beside it "nll", the plain NLL (the eps = 0 term), as
`ual train` logs it.
"""

from __future__ import annotations

from typing import Any

import torch

from ual.optional import require
from ual.training.batches import is_padding_free
from ual.training.trainer import UALLoss

SFTTrainer = require("trl", "UALSFTTrainer (TRL's SFTTrainer with ual's loss)").SFTTrainer


class EpsCollator:
    """Wrap any collator: take each example's `eps` (and `weight`, if any) out, collate the
    rest, add eps (B,) (and weight (B,)) to the batch; for a padding-free row (no attention
    mask, position ids), eps (1, T) and weight (1, T), one value per token of each sample (a
    packed example carries them per token already)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if any("eps" not in ex for ex in examples):
            raise ValueError("UALSFTTrainer: a training example has no `eps` (add a float column `eps` "
                             "to the dataset: the sample's label smoothing, 0 for plain SFT)")
        keys = ["eps"] + (["weight"] if "weight" in examples[0] else [])
        batch = self.inner([{k: v for k, v in ex.items() if k not in ("eps", "weight")} for ex in examples])
        flat = is_padding_free(batch)
        for key in keys:
            if flat:
                batch[key] = _per_token([ex[key] for ex in examples], examples, batch["input_ids"].shape[1], key)
            else:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)
        return batch

    def __getattr__(self, name):  # look like the wrapped collator (TRL reads some of its fields)
        return getattr(self.inner, name)


def _per_token(values, examples, width: int, key: str) -> torch.Tensor:
    """(1, width): each example's value (a float, or a packed example's list, one per token) for each of its
    tokens, in the order the padding-free collator concatenated them; 0 on any padding after them."""
    parts = []
    for value, ex in zip(values, examples):
        n = len(ex["input_ids"])
        part = torch.as_tensor(value, dtype=torch.float32)
        if part.dim() == 0:
            part = part.expand(n)
        elif len(part) != n:
            raise ValueError(f"UALSFTTrainer: a packed example has {len(part)} `{key}` values for {n} tokens")
        parts.append(part)
    row = torch.cat(parts)
    if len(row) > width:
        raise ValueError(f"UALSFTTrainer: {len(row)} tokens of `{key}` for a padding-free row of {width}")
    return torch.nn.functional.pad(row, (0, width - len(row)))[None]


class UALSFTTrainer(UALLoss, SFTTrainer):
    """TRL's SFTTrainer with ual's per-sample label-smoothed loss; the dataset needs an `eps` column
    (and may have a `weight` column). token_scale: "none", "dft" or "eaft" (ual.loss)."""

    def __init__(self, *args, loss_impl: str = "naive", eps_fn=None, token_scale: str = "none", eaft_topk: int = 20,
                 **kwargs):
        cfg = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if cfg is not None:
            if getattr(cfg, "packing", False) and getattr(cfg, "packing_strategy", "bfd") != "bfd":
                raise ValueError(f"UALSFTTrainer: packing_strategy {cfg.packing_strategy!r} cuts samples into pieces "
                                 "that lose their context, so the loss is not the samples' own; use packing_strategy "
                                 "'bfd' (or padding_free=True without packing)")
            if getattr(cfg, "label_smoothing_factor", 0) > 0:
                raise ValueError("UALSFTTrainer: leave label_smoothing_factor at 0; eps comes from the dataset")
            if getattr(cfg, "loss_type", "nll") != "nll":
                raise ValueError(f"UALSFTTrainer: loss_type {cfg.loss_type!r} would replace the UAL loss; use 'nll' "
                                 "(and token_scale='dft' for DFT)")
            if getattr(cfg, "use_liger_kernel", False):
                raise ValueError("UALSFTTrainer: Liger kernels fuse the cross-entropy and ignore eps; turn them off "
                                 "(loss_impl='chunked' is the memory-saving path)")
        self.check_loss_options(loss_impl, token_scale)
        super().__init__(*args, **kwargs)
        self.init_loss(loss_impl, eps_fn, token_scale, eaft_topk)
        self.data_collator = EpsCollator(self.data_collator)
        if self.padding_free:
            from ual.training.batches import check_packed_attention

            check_packed_attention(self.model)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        """With packing: TRL's own preparation without packing (tokenised, truncated to max_length), then each
        sample's eps and weight as per-token columns, packed with the tokens by TRL's bfd packing."""
        if not packing:
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        from trl.data_utils import pack_dataset

        dataset = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        if "eps" not in dataset.column_names:
            raise ValueError(f"UALSFTTrainer: the {dataset_name} dataset has no `eps` column (each sample's label "
                             "smoothing, 0 for plain SFT)")
        carried = [c for c in ("eps", "weight") if c in dataset.column_names]
        dataset = dataset.map(lambda ex: {c: [float(ex[c])] * len(ex["input_ids"]) for c in carried})
        return pack_dataset(dataset.select_columns(["input_ids", "labels", *carried]), args.max_length, "bfd")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in ("eps", "weight") if c not in self._signature_columns]
        if extra:
            self._signature_columns = [*self._signature_columns, *extra]
