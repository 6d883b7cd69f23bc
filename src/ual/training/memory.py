"""Memory of a training run: the estimate logged before it starts (training/estimate.py) and the
peak it really reached, measured the same way on every run (result.json's "memory")."""

from __future__ import annotations

import logging

from ual.config import ExperimentConfig
from ual.training.plan import sharding_from_env

log = logging.getLogger(__name__)


def estimate_and_measure_start(cfg: ExperimentConfig, n_samples: int, device) -> dict:
    """Log the memory/time estimate (training/estimate.py) and start measuring the real peak."""
    from ual.training import estimate as E

    memory: dict = {}
    try:
        if sharding_from_env() == "zero3":  # a meta-device model under zero.Init: skip, do not risk it
            raise RuntimeError("not estimated under DeepSpeed ZeRO-3")
        est = E.estimate_for_config(cfg, n_samples, device=E.detect_device() if device.type == "cuda" else "cpu")
        log.info("estimate before training:\n%s", est["text"])
        memory["estimate_bytes"] = est["estimate"]["bytes"]
    except Exception as exc:  # an estimate must never stop a run
        log.warning("no memory estimate: %s", exc)
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_peak_rss()
        memory["rss_before_bytes"] = rss_bytes()
    return memory


def estimate_and_measure_end(memory: dict, device) -> dict:
    if device.type == "cuda":
        import torch

        memory["measured_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        memory["measured"] = "torch.cuda.max_memory_allocated (weights included)"
    elif memory.get("rss_before_bytes") is not None and rss_bytes("VmHWM") is not None:
        memory["measured_peak_bytes"] = rss_bytes("VmHWM") - memory["rss_before_bytes"]
        memory["measured"] = "peak RSS minus RSS before training (weights excluded)"
    return memory


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str = "VmRSS") -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
