"""The training plan: which modes exist and what each is made of, how many processes and
micro-batches make a step, how the model is sharded. Read by the train stage, the memory
estimate and the ablation recipe alike, so each is said once. No I/O beyond the environment
that `accelerate launch` sets.
"""

from __future__ import annotations

import os

from ual.config import TrainConfig

MODES = ("sft", "ls", "ual", "ppl", "dft", "eaft", "ual+dft", "ual+eaft")
# Token-scaled modes: (the mode that gives eps, the token scale).
_SCALED = {"dft": ("sft", "dft"), "eaft": ("sft", "eaft"), "ual+dft": ("ual", "dft"), "ual+eaft": ("ual", "eaft")}


def mode_parts(mode: str) -> tuple[str, str]:
    """(eps mode, token scale) of a training mode: "ual+dft" -> ("ual", "dft"), "ls" -> ("ls", "none")."""
    return _SCALED.get(mode, (mode, "none"))


def uses_smoothing_map(mode: str) -> bool:
    """Whether the mode reads smoothing.jsonl (ual's per-sample eps), so needs scores and the map."""
    return mode_parts(mode)[0] == "ual"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def accumulation_steps(tc: TrainConfig, processes: int | None = None) -> int:
    """gradient_accumulation_steps, derived from train.global_batch_size when that is set."""
    processes = processes or world_size()
    if tc.global_batch_size is None:
        return tc.gradient_accumulation_steps
    per_step = tc.batch_size * processes
    if tc.global_batch_size % per_step:
        raise ValueError(f"train.global_batch_size {tc.global_batch_size} is not a multiple of batch_size "
                         f"{tc.batch_size} x {processes} process(es)")
    return tc.global_batch_size // per_step


def sharding_from_env() -> str:
    """ZeRO stage / FSDP version as `accelerate launch` announces it to the processes:
    none | zero2 | zero3 | fsdp (FSDP1) | fsdp2."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return "fsdp2" if os.environ.get("FSDP_VERSION", "1") == "2" else "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return "zero3" if stage == "3" else "zero2"
    return "none"
