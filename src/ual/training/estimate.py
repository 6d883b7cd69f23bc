"""Memory and time estimate of a training run, before it starts; and `ual train CONFIG --dry-run`.

The estimate is per process (per GPU), for the peak of one optimiser step:

  weights      every parameter, in the training dtype (bf16 on GPU with train.bf16, else fp32)
  gradients    trainable parameters (LoRA: the adapters, kept in fp32 by peft; full: all, in the weight dtype)
  optimiser    AdamW: two moments per trainable parameter, in the trainable parameters' dtype
  activations  what autograd keeps for the backward, per token and decoder layer, for a
               Llama/Mistral-style block with SDPA attention (no T x T matrix):
                 attention  7 h + 3 kv     (norm in/out, q, k, v, rotated q/k, attention out)
                 MLP        4 I            (gate, up, act(gate), act(gate) * up)
                 LoRA       h per adapted module (its dropout's output)
               with gradient checkpointing: h per layer (the layer input) plus one layer's full set.
  loss         naive: the (B, T, V) logits in the weight dtype plus four fp32 (B, T, V) tensors
               alive at the backward's peak (the fp32 copy, logsumexp's exp, the softmax
               gradient and the summed gradient): about 20 bytes per logit (measured on CPU);
               chunked: one (C, V) fp32 chunk plus fp32 (tokens, h) hidden-state gradients.

B x T is the micro-batch at data.max_length (the padded worst case). With ZeRO/FSDP the
weight, gradient and optimiser terms are divided by the number of processes (ZeRO-2:
gradients and optimiser only). Not counted: the CUDA context and allocator slack
(~0.5-2 GiB on a GPU), the Python process itself on CPU.

Time: 2 N FLOPs per token forward; the backward costs 4 N for full fine-tuning (input
and weight gradients) and 2 N for LoRA (input gradients only: frozen weights get none;
the adapters' own cost is negligible); gradient checkpointing adds a forward. Divided by an assumed sustained throughput (40% of the
device's dense bf16 peak). A rough order of magnitude: trust a measured step time over it.

The parameter count is exact: the model is instantiated from its config on PyTorch's
`meta` device (no weights are read or allocated). Offline, the configs of the paper's
base models are built in, so `--dry-run` on configs/paper/*.yaml works without the hub.
"""

from __future__ import annotations

import logging
import math

from ual.training.plan import accumulation_steps, sharding_from_env, world_size

log = logging.getLogger(__name__)

GiB = 1 << 30

# Shardings that split the weights themselves over processes (ZeRO-2 splits only gradients and optimiser).
FULL_SHARDING = ("zero3", "fsdp", "fsdp2")

# Public architecture configs of the paper's base models (for offline dry runs).
KNOWN_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                                     vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False),
    "mistralai/Mistral-7B-v0.1": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                      vocab_size=32000, max_position_embeddings=32768, sliding_window=4096,
                                      tie_word_embeddings=False),
}

# Dense bf16 peak TFLOP/s; the estimate assumes 40% of it is sustained. CPU: a guess for a few cores.
DEVICE_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX3090": 71.0, "RTX4090": 165.0,
                 "cpu": 0.2}
MFU = 0.4


# --------------------------------------------------------------------------- model shape

def model_config(name: str, trust_remote_code: bool = False):
    """(config, where it came from): the local/cached config, else the built-in table, else the hub."""
    from transformers import AutoConfig

    from ual.models import BUILTIN_MODELS, resolve_model

    if name in BUILTIN_MODELS:
        return AutoConfig.from_pretrained(resolve_model(name)), "built-in alias"
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code), "local"
    except Exception:
        pass
    if name in KNOWN_CONFIGS:
        kw = dict(KNOWN_CONFIGS[name])
        return AutoConfig.for_model(kw.pop("model_type"), **kw), "built-in table (offline)"
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code), "hub"
    except Exception as exc:
        raise ValueError(f"model '{name}': cannot read its config ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                         "give a local model folder, a hub id reachable from here, or a built-in alias") from None


def model_shape(config, lora_targets: list[str] | None = None, lora_r: int = 8,
                trust_remote_code: bool = False) -> dict:
    """Exact parameter counts (and LoRA-trainable ones) from a model instantiated on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    lora = 0
    adapted = 0
    if lora_targets:
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in lora_targets):
                lora += lora_r * (mod.in_features + mod.out_features)
                adapted += 1
    tc = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = tc.hidden_size
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or h // heads
    return {
        "parameters": total,
        "lora_parameters": lora,
        "lora_modules": adapted,
        "hidden": h,
        "intermediate": getattr(tc, "intermediate_size", 4 * h),
        "layers": tc.num_hidden_layers,
        "kv_dim": (getattr(tc, "num_key_value_heads", None) or heads) * head_dim,
        "vocab": tc.vocab_size,
        "tied": bool(getattr(tc, "tie_word_embeddings", False)),
    }


# --------------------------------------------------------------------------- the estimate

def estimate(shape: dict, *, batch_size: int, seq_len: int, lora: bool, lora_targets_per_layer: int = 2,
             weight_bytes: int = 4, gradient_checkpointing: bool = False, loss: str = "naive",
             processes: int = 1, sharding: str = "none", chunk_rows: int | None = None,
             device: str = "cuda") -> dict:
    """Bytes per process at the peak of one optimiser step; see the module docstring for each term."""
    N = shape["parameters"]
    h, I, kv, L, V = shape["hidden"], shape["intermediate"], shape["kv_dim"], shape["layers"], shape["vocab"]
    act_bytes = weight_bytes  # activations live in the compute dtype
    if lora:
        trainable = shape["lora_parameters"]
        train_bytes = 4  # peft keeps adapters in fp32
    else:
        trainable, train_bytes = N, weight_bytes
    weights = N * weight_bytes
    grads = trainable * train_bytes
    optim = 2 * trainable * train_bytes
    shard = max(1, processes)
    if sharding in FULL_SHARDING:
        weights, grads, optim = weights / shard, grads / shard, optim / shard
    elif sharding == "zero2":
        grads, optim = grads / shard, optim / shard
    tokens = batch_size * seq_len
    per_layer = 7 * h + 3 * kv + 4 * I + (lora_targets_per_layer * h if lora else 0)
    if gradient_checkpointing:
        acts = tokens * (L * h + per_layer) * act_bytes
    else:
        acts = tokens * L * per_layer * act_bytes
    if loss == "auto":
        from ual.training.trainer import resolve_loss

        loss = resolve_loss(loss, sharding)
    if loss == "chunked":
        from ual.loss import default_chunk_size  # the buffer the loss really allocates (32 MiB CPU, 1 GiB CUDA)

        c = chunk_rows or default_chunk_size(tokens, V, device)
        loss_bytes = min(c, tokens) * V * 4 + 2 * tokens * h * 4
    else:
        loss_bytes = tokens * V * (4 * 4 + act_bytes)
    total = weights + grads + optim + acts + loss_bytes
    return {
        "parameters": N, "trainable": trainable, "tokens_per_micro_batch": tokens,
        "bytes": {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts,
                  "loss_logits": loss_bytes, "total": total},
    }


def flops_per_token(shape: dict, lora: bool, gradient_checkpointing: bool) -> float:
    N = shape["parameters"]
    fwd = 2 * N
    bwd = 2 * N if lora else 4 * N  # LoRA: input gradients only (frozen weights get none)
    return fwd + bwd + (fwd if gradient_checkpointing else 0)


def time_estimate(shape: dict, *, tokens_per_step: int, steps: int, lora: bool, gradient_checkpointing: bool,
                  device: str, processes: int = 1) -> dict:
    peak = DEVICE_TFLOPS.get(device, DEVICE_TFLOPS["cpu"]) * 1e12
    f = flops_per_token(shape, lora, gradient_checkpointing) * tokens_per_step
    step_s = f / (peak * MFU * max(1, processes))
    return {"device": device, "assumed_tflops": peak / 1e12, "mfu": MFU, "flops_per_step": f,
            "seconds_per_step": step_s, "steps": steps, "hours": step_s * steps / 3600}


def detect_device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).replace(" ", "")
            for k in DEVICE_TFLOPS:
                if k.replace(" ", "") in name:
                    return k
            return "A100"
    except Exception:
        pass
    return "cpu"


def format_estimate(est: dict, t: dict | None = None) -> str:
    b = est["bytes"]
    lines = [f"parameters {est['parameters'] / 1e6:,.1f} M, trainable {est['trainable'] / 1e6:,.2f} M "
             f"({100 * est['trainable'] / est['parameters']:.2f}%), {est['tokens_per_micro_batch']} tokens per micro-batch",
             "memory per process (estimate):"]
    for k in ("weights", "gradients", "optimizer", "activations", "loss_logits", "total"):
        lines.append(f"  {k:<12} {b[k] / GiB:9.2f} GiB")
    if t:
        lines.append(f"time: {t['seconds_per_step']:.2f} s per optimiser step, {t['steps']} steps, ~{t['hours']:.2f} h "
                     f"(assuming {t['mfu']:.0%} of {t['assumed_tflops']:g} TFLOP/s on {t['device']}; rough)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- from a config

def estimate_for_config(cfg, n_samples: int | None = None, shape: dict | None = None, device: str | None = None) -> dict:

    tc = cfg.train
    if shape is None:
        config, _ = model_config(cfg.model, cfg.trust_remote_code)
        shape = model_shape(config, tc.lora_target_modules if tc.lora else None, tc.lora_r, cfg.trust_remote_code)
    assumed = ""
    if device is None:
        device = detect_device()
        if device == "cpu" and tc.bf16 and cfg.device in ("auto", "cuda"):
            device, assumed = "H100", "no GPU here and train.bf16 is set: estimated for one H100"
    gpu = device != "cpu"
    procs = world_size()
    est = estimate(shape, batch_size=tc.batch_size, seq_len=cfg.data.max_length, lora=tc.lora,
                   lora_targets_per_layer=max(1, shape["lora_modules"] // max(1, shape["layers"])) if tc.lora else 0,
                   weight_bytes=2 if (tc.bf16 and gpu) else 4, gradient_checkpointing=tc.gradient_checkpointing,
                   loss=tc.loss, processes=procs, sharding=sharding_from_env(), device="cuda" if gpu else "cpu")
    acc = accumulation_steps(tc, procs)
    per_step = tc.batch_size * acc * procs
    if tc.max_steps > 0:
        steps = tc.max_steps
    elif n_samples:
        steps = math.ceil(tc.epochs * n_samples / per_step)
    else:
        steps = 0
    t = time_estimate(shape, tokens_per_step=per_step * cfg.data.max_length, steps=steps, lora=tc.lora,
                      gradient_checkpointing=tc.gradient_checkpointing, device=device, processes=procs)
    text = format_estimate(est, t) + (f"\n({assumed})" if assumed else "")
    return {"estimate": est, "time": t, "shape": shape, "samples_per_step": per_step, "assumed": assumed or None,
            "gradient_accumulation_steps": acc, "processes": procs, "text": text}


# --------------------------------------------------------------------------- --dry-run

def validate(cfg) -> list[str]:
    """Problems in a config that building it does not catch: the config checks each field's type,
    choices and range, and the rules between its fields, when it is built (ual.config); these need
    the run's context (the process count) or are legal in a config that does not train."""
    tc, problems = cfg.train, []
    if not tc.modes:
        problems.append("train.modes is empty")
    try:
        accumulation_steps(tc)
    except ValueError as exc:
        problems.append(str(exc))
    if not cfg.data.sources:
        problems.append("data.sources is empty")
    return problems


def dry_run(cfg) -> dict:
    """Validate, resolve data and model (config only), print the estimate. Raises ValueError on a bad config."""
    problems = validate(cfg)
    if problems:
        raise ValueError("invalid config:\n  " + "\n  ".join(problems))
    from ual.data.sources import describe_sources

    sources = describe_sources(cfg)
    config, where = model_config(cfg.model, cfg.trust_remote_code)
    n = sum(s["train"] if s["train"] is not None else max(0, (s.get("rows") or 0) - s["heldout"])
            for s in sources) or None
    result = estimate_for_config(cfg, n_samples=n)
    print(f"config ok: {cfg.name} -> {cfg.run_path}")
    for s in sources:
        print(f"  data {s['label']}: {s['kind']}" + (f" ({s['path']})" if s.get("path") else "")
              + (f", train {s['train']}" if s["train"] is not None else ", train all") + f", held-out {s['heldout']}")
    print(f"  model {cfg.model}: {config.model_type} config from {where}")
    print(f"  modes {', '.join(cfg.train.modes)}; {'LoRA r=%d' % cfg.train.lora_r if cfg.train.lora else 'full fine-tuning'}; "
          f"{result['samples_per_step']} samples per optimiser step "
          f"({cfg.train.batch_size} x {result['gradient_accumulation_steps']} accumulation x {result['processes']} process(es))")
    print(result["text"])
    return {"ok": True, "sources": sources, "model_config_from": where,
            "estimate_bytes": result["estimate"]["bytes"], "parameters": result["estimate"]["parameters"],
            "trainable": result["estimate"]["trainable"], "seconds_per_step": result["time"]["seconds_per_step"],
            "steps": result["time"]["steps"]}
