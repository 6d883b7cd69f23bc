"""The training plan: which modes exist and what each is made of (declared in ual.modes, which the
config and the report read too; re-exported here), how many processes and micro-batches make a
step, how the model is sharded. Read by the train stage, the memory estimate and the ablation
recipe alike, so each is said once. No I/O beyond the environment that `accelerate launch` sets.
"""

from __future__ import annotations

import os

from ual.config import TrainConfig
from ual.modes import MODES, mode_parts, uses_smoothing_map  # re-exported: the modes are declared in ual.modes

__all__ = ["MODES", "mode_parts", "uses_smoothing_map", "world_size", "accumulation_steps", "sharding_from_env"]


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
