"""The training modes and the loss implementations: the one list of each, and what a mode is made of.

Pure (no ual imports), so the config (which checks `train.modes` and `train.loss` at load), the
training stage, the ablation recipe and the report all read the same names from here.
"""

from __future__ import annotations

import typing
from typing import Literal

# sft (eps 0), ls (uniform eps), ual (per-sample eps), ppl (eps from the current NLL), dft / eaft
# (eps 0 with a token scale), ual+dft / ual+eaft (ual's eps with the token scale). In report order.
Mode = Literal["sft", "ls", "ual", "ppl", "dft", "eaft", "ual+dft", "ual+eaft"]
MODES: tuple[str, ...] = typing.get_args(Mode)

# How the loss is computed: chunked (from hidden states and the output projection) or naive (full
# logits); train.loss may also say auto (the trainer picks, training/trainer.py resolve_loss).
LossImpl = Literal["chunked", "naive"]
LOSS_IMPLS: tuple[str, ...] = typing.get_args(LossImpl)
Loss = Literal["auto", LossImpl]  # a Literal inside a Literal is flattened: auto, chunked, naive
LOSSES: tuple[str, ...] = typing.get_args(Loss)

# Token-scaled modes: (the mode that gives eps, the token scale).
_SCALED = {"dft": ("sft", "dft"), "eaft": ("sft", "eaft"), "ual+dft": ("ual", "dft"), "ual+eaft": ("ual", "eaft")}


def mode_parts(mode: str) -> tuple[str, str]:
    """(eps mode, token scale) of a training mode: "ual+dft" -> ("ual", "dft"), "ls" -> ("ls", "none")."""
    return _SCALED.get(mode, (mode, "none"))


def uses_smoothing_map(mode: str) -> bool:
    """Whether the mode reads smoothing.jsonl (ual's per-sample eps), so needs scores and the map."""
    return mode_parts(mode)[0] == "ual"
