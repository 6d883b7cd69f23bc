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
3. Packing and padding-free batches are refused: they concatenate samples into one
   row, and each sample has its own eps.

TRL's extra metrics (entropy, token accuracy) need the fused head's outputs and are
not logged; the loss is, and beside it "nll", the plain NLL (the eps = 0 term), as
`ual train` logs it.
"""

from __future__ import annotations

from typing import Any

import torch

from ual.optional import require
from ual.training.trainer import UALLoss

SFTTrainer = require("trl", "UALSFTTrainer (TRL's SFTTrainer with ual's loss)").SFTTrainer


class EpsCollator:
    """Wrap any collator: take each example's `eps` (and `weight`, if any) out, collate the
    rest, add eps (B,) (and weight (B,)) to the batch."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        try:
            eps = [float(ex["eps"]) for ex in examples]
        except KeyError:
            raise ValueError("UALSFTTrainer: a training example has no `eps` (add a float column `eps` "
                             "to the dataset: the sample's label smoothing, 0 for plain SFT)") from None
        weighted = "weight" in examples[0]
        weights = [float(ex["weight"]) for ex in examples] if weighted else None
        batch = self.inner([{k: v for k, v in ex.items() if k not in ("eps", "weight")} for ex in examples])
        batch["eps"] = torch.tensor(eps, dtype=torch.float32)
        if weighted:
            batch["weight"] = torch.tensor(weights, dtype=torch.float32)
        return batch

    def __getattr__(self, name):  # look like the wrapped collator (TRL reads some of its fields)
        return getattr(self.inner, name)


class UALSFTTrainer(UALLoss, SFTTrainer):
    """TRL's SFTTrainer with ual's per-sample label-smoothed loss; the dataset needs an `eps` column
    (and may have a `weight` column). token_scale: "none", "dft" or "eaft" (ual.loss)."""

    def __init__(self, *args, loss_impl: str = "naive", eps_fn=None, token_scale: str = "none", eaft_topk: int = 20,
                 **kwargs):
        cfg = kwargs.get("args") if "args" in kwargs else (args[1] if len(args) > 1 else None)
        if cfg is not None:
            if getattr(cfg, "packing", False) or getattr(cfg, "padding_free", False):
                raise ValueError("UALSFTTrainer: packing / padding_free put several samples in one row, "
                                 "but each sample has its own eps; turn them off")
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

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        extra = [c for c in ("eps", "weight") if c not in self._signature_columns]
        if extra:
            self._signature_columns = [*self._signature_columns, *extra]
