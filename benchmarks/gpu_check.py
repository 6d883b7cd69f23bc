"""GPU acceptance in one prepared run (issue 17): the chunked loss on CUDA against naive,
PyTorch and Liger-Kernel, a Llama-2-7B-shaped training step, and `ual train` end to end.

    python benchmarks/gpu_check.py --out docs/gpu_table.md     # one GPU; --budget 420 s (not yet run on one)
    python benchmarks/gpu_check.py --device cpu --tiny           # CPU rehearsal of the same code paths

docs/gpu.md says how to run it on a machine without network or an installed `ual` (a tokenizer
folder for --tokenizer, Liger-Kernel carried as a wheel).

Sections (each guarded: a failure is recorded with its error and the next one still runs;
a global --budget in seconds, split in shares per section, skips what does not fit):
  1 exactness  chunked_smoothed_cross_entropy against smoothed_cross_entropy on full logits
               (loss, d hidden, d weight) at the Llama-2, Llama-3 and Gemma-3 heads, fp32 and bf16,
               random per-sample eps and ignore masks (prompt prefix and padding), default chunk
               and a small chunk (several chunks). The reference is the naive loss in fp32 on the
               same (dtype-rounded) inputs; naive in bf16 is shown beside it for context.
  2 speed      forward + backward time and peak memory per head, in the training dtype, each
               variant in this same run: plain F.cross_entropy on full logits, F.linear_cross_entropy
               (chunked options; uniform smoothing if its chunked path takes it), Liger-Kernel's
               fused linear cross-entropy (uniform smoothing), ual's chunked loss (per-sample eps).
  3 train step a randomly initialised Llama-2-7B-shaped model (--tiny: a tiny Llama) through
               UALTrainer with the chunked loss, LoRA and then full fine-tuning if the estimate fits:
               tokens/s and peak memory against `ual train --dry-run`'s estimate (estimate_for_config).
  4 e2e        `ual data` + `ual train` (ual.cli.main) on the tiny test model (tests/conftest.py's:
               a 2-layer Llama with the SmolLM2 tokenizer), device cuda (--device), two steps.

Writes Markdown (to --out, else stdout) and ends stdout with one JSON line; progress on stderr.
Section status: ok, failed (an error or a check out of tolerance), partial (the time budget
ran out part way), error (the section itself raised), skipped. Exit status 0 when all are ok. Peak memory: torch.cuda.max_memory_allocated growth
on CUDA; on CPU peak RSS growth (VmHWM), a rough figure.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # the checkout's ual, installed or not (the GPU machine has none)
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(_k, _v)  # everything here is local; never wait on a network that is not there

import torch
import torch.nn.functional as F

HEADS = {"llama2": (4096, 32000), "llama3": (4096, 128256), "gemma3": (640, 262144)}  # (hidden, vocab)
TINY_HEADS = {"llama2": (64, 512), "llama3": (64, 2048), "gemma3": (16, 4096)}
# Normalised errors: |loss - ref| / |ref|; max |g - g_ref| / max |g_ref| per gradient.
TOL = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 1e-3, "grad": 2e-2}}
UNIFORM_EPS = 0.1
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
SHARES = {"exactness": 0.2, "speed": 0.3, "train_step": 0.35, "e2e": 0.15}
T0 = time.time()


def log(msg):
    print(f"[gpu_check {time.time() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cleanup(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def peak_memory(dev, out: dict):
    """out["bytes"]: peak memory growth over the block (CUDA allocator statistics; on CPU peak RSS
    (VmHWM) growth, None where the kernel's peak counter cannot be reset)."""
    from ual.training.memory import reset_peak_rss, rss_bytes

    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else rss_bytes() if reset_peak_rss() else None
    try:
        yield out
    finally:
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else rss_bytes("VmHWM")
        out["bytes"] = None if base is None else max(0, peak - base)


def sft_batch(b, t, vocab, dev):
    """Targets with a prompt prefix (10-50%) and padding tail (0-20%) ignored per sample; eps ~ U(0, 0.3)."""
    targets = torch.randint(0, vocab, (b, t), device=dev)
    for i in range(b):
        prompt = int(t * (0.1 + 0.4 * torch.rand(()).item()))
        pad = int(t * 0.2 * torch.rand(()).item())
        targets[i, :prompt] = -100
        targets[i, t - pad:] = -100
    return targets, torch.rand(b, device=dev) * 0.3


def head_inputs(b, t, hid, vocab, dtype, dev):
    hidden = torch.randn(b, t, hid, device=dev).to(dtype)
    weight = torch.randn(vocab, hid, device=dev).mul_(2 / hid**0.5).to(dtype)  # logits ~ N(0, 4)
    return (hidden, weight, *sft_batch(b, t, vocab, dev))


# --------------------------------------------------------------------------- 1. exactness

def exact_rows(dev, b, t, hid, vocab, dtype, small_chunk):
    """One head and dtype: loss and gradient errors of each candidate against the naive loss
    computed in fp32 on the same (dtype-rounded) inputs."""
    from ual.loss import chunked_smoothed_cross_entropy, smoothed_cross_entropy

    torch.manual_seed(0)
    h, w, targets, eps = head_inputs(b, t, hid, vocab, dtype, dev)

    def grads(fn, a, c):
        a, c = a.detach().requires_grad_(), c.detach().requires_grad_()
        loss = fn(a, c)
        loss.backward()
        return float(loss.detach()), a.grad.float(), c.grad.float()

    def naive(a, c):
        return smoothed_cross_entropy(F.linear(a, c), targets, eps)

    def err(g, ref):
        return float((g - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    ref = grads(naive, h.float(), w.float())
    dname = str(dtype).split(".")[1]
    cands = {} if dtype == torch.float32 else {f"naive {dname} (context)": naive}
    for k in (None, small_chunk):
        cands[f"chunked, chunk {k or 'default'}"] = functools.partial(
            chunked_smoothed_cross_entropy, targets=targets, eps=eps, chunk_size=k)
    # The token-level modes (DFT, EAFT, per-sample weights: issue 16), at the default chunk, each
    # against the naive loss with the same options in fp32.
    weights = torch.rand(b, device=dev) * 2
    token_modes = {"dft": dict(token_scale="dft"), "eaft": dict(token_scale="eaft"),
                   "weighted": dict(sample_weights=weights)}
    refs = {name: ref for name in cands}
    for mode, kw in token_modes.items():
        cands[f"chunked {mode}, chunk default"] = functools.partial(
            chunked_smoothed_cross_entropy, targets=targets, eps=eps, **kw)
        refs[f"chunked {mode}, chunk default"] = grads(
            lambda a, c, kw=kw: smoothed_cross_entropy(F.linear(a, c), targets, eps, **kw), h.float(), w.float())
    rows = []
    for name, fn in cands.items():
        loss, gh, gw = grads(fn, h, w)
        r = refs[name]
        e = {"loss_err": abs(loss - r[0]) / abs(r[0]), "dh_err": err(gh, r[1]), "dw_err": err(gw, r[2])}
        tol = TOL[dname]
        ok = None if name.startswith("naive") else (e["loss_err"] <= tol["loss"]
                                                    and max(e["dh_err"], e["dw_err"]) <= tol["grad"])
        rows.append({"variant": name, **e, "pass": ok, "status": "ok"})
    return rows


def exactness(dev, plan, deadline):
    rows = []
    for head, (hid, vocab) in plan["heads"].items():
        for dtype in (torch.float32, torch.bfloat16):
            base = {"head": head, "shape": f"{hid} x {vocab}", "dtype": str(dtype).split(".")[1]}
            if time.time() > deadline:
                rows.append({**base, "variant": "-", "status": "skipped", "error": "time budget"})
                continue
            log(f"exactness {head} {hid}x{vocab} {base['dtype']}")
            try:
                rows += [{**base, **r} for r in exact_rows(dev, *plan["exact_bt"], hid, vocab, dtype, plan["exact_chunk"])]
            except Exception as exc:
                log(traceback.format_exc())
                rows.append({**base, "variant": "-", "status": "error", "error": f"{type(exc).__name__}: {exc}"})
            cleanup(dev)
    failed = any(r.get("pass") is False or r["status"] == "error" for r in rows)
    passed = not failed and all(r["status"] == "ok" for r in rows)
    return {"status": "failed" if failed else "ok" if passed else "partial", "passed": passed, "rows": rows}


# --------------------------------------------------------------------------- 2. speed

def speed_variants(dev, dtype):
    """name -> (fn(hidden (B,T,H), weight, targets (B,T), eps (B,)) or None, smoothing, note)."""
    from ual.loss import chunked_smoothed_cross_entropy

    def ce(h, w, t, e):
        return F.cross_entropy(F.linear(h, w).float().flatten(0, 1), t.flatten(), ignore_index=-100)

    out = {"ce": (ce, "none", "full logits, upcast to fp32 as HF models do")}
    try:
        out["torch_lce"] = torch_lce(dev, dtype)
    except Exception as exc:
        out["torch_lce"] = (None, "-", f"skipped: {type(exc).__name__}: {exc}")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        if dev.type != "cuda":
            raise RuntimeError("Liger-Kernel's Triton kernels need CUDA")
        liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, label_smoothing=UNIFORM_EPS)
        out["liger"] = (lambda h, w, t, e: liger_loss(w, h.flatten(0, 1), t.flatten()), f"uniform {UNIFORM_EPS:g}",
                        "fused linear cross-entropy")
    except Exception as exc:
        out["liger"] = (None, "-", f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    out["ual_chunked"] = (lambda h, w, t, e: chunked_smoothed_cross_entropy(h, w, t, e), "per-sample U(0, 0.3)",
                          "ual.loss.chunked_smoothed_cross_entropy")
    for scale in ("dft", "eaft"):  # the token-level rivals in the same pass (issue 16): target 1.1x ual_chunked
        out[f"ual_{scale}"] = (lambda h, w, t, e, scale=scale: chunked_smoothed_cross_entropy(h, w, t, e, token_scale=scale),
                               "per-sample U(0, 0.3)", f"chunked, token_scale={scale}")
    return out


def torch_lce(dev, dtype):
    """F.linear_cross_entropy with chunking options, uniform smoothing if its chunked path takes it."""
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        def warned(ls):  # does the chunked path refuse this smoothing (and fall back to full logits)?
            h, w = torch.randn(64, 16, device=dev, dtype=dtype), torch.randn(128, 16, device=dev, dtype=dtype)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                F.linear_cross_entropy(h, w, torch.randint(0, 128, (64,), device=dev), label_smoothing=ls,
                                       options=torch.nn.LinearCrossEntropyOptions())
            return any("options" in str(c.message) for c in caught)

        ls = 0.0 if warned(UNIFORM_EPS) and not warned(0.0) else UNIFORM_EPS
        note = "chunked path needs label_smoothing == 0: measured without" if ls == 0 else "chunked options"

        def lce(h, w, t, e):
            return F.linear_cross_entropy(h.flatten(0, 1), w, t.flatten(), ignore_index=-100, label_smoothing=ls,
                                          options=torch.nn.LinearCrossEntropyOptions())
        return lce, f"uniform {ls:g}" if ls else "none", note
    return None, "-", f"skipped: torch {torch.__version__} has no F.linear_cross_entropy"


def measure(fn, inputs, dev, iters):
    """One warm-up step (its peak memory is reported), then the median of `iters` timed steps."""
    h, w, t, e = inputs
    times, peak = [], {"bytes": None}
    for i in range(1 + iters):
        h.grad = w.grad = None
        meter = peak_memory(dev, peak) if i == 0 else contextlib.nullcontext()
        with meter, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sync(dev)
            t0 = time.perf_counter()
            loss = fn(h, w, t, e)
            loss.backward()
            sync(dev)
            dt = time.perf_counter() - t0
        if i == 0:
            value, notes = float(loss.detach()), {str(c.message).split(";")[0][:80] for c in caught}
        else:
            times.append(dt)
        del loss
    h.grad = w.grad = None
    return {"ms": 1e3 * statistics.median(times), "peak_mib": None if peak["bytes"] is None else peak["bytes"] / 2**20,
            "loss": value, "warnings": sorted(notes)}


def speed_rows(dev, plan, head, hid, vocab, deadline):
    """Every variant at one head, on the same inputs, with ratios against plain CE and Liger."""
    (b, t), dtype = plan["speed_bt"], plan["speed_dtype"]
    torch.manual_seed(0)
    h, w, targets, eps = head_inputs(b, t, hid, vocab, dtype, dev)
    h.requires_grad_()
    w.requires_grad_()
    res = {}
    for name, (fn, smoothing, note) in speed_variants(dev, dtype).items():
        row = res[name] = {"head": head, "shape": f"{hid} x {vocab}", "tokens": b * t, "variant": name,
                           "smoothing": smoothing, "note": note, "status": "skipped"}
        if fn is None:
            continue
        if time.time() > deadline:
            row["note"] = "time budget"
            continue
        log(f"speed {head} {hid}x{vocab} {name}")
        try:
            row.update(measure(fn, (h, w, targets, eps), dev, plan["iters"]), status="ok")
            row["tokens_per_s"] = b * t / (row["ms"] / 1e3)
        except Exception as exc:
            log(traceback.format_exc())
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
        h.grad = w.grad = None
        cleanup(dev)
    for row in res.values():  # ratios < 1: faster / smaller than the baseline
        for base in ("ce", "liger", "ual_chunked"):
            for key, out in (("ms", "time"), ("peak_mib", "mem")):
                ok = row.get(key) is not None and res[base].get(key)
                row[f"{out}_vs_{base}"] = row[key] / res[base][key] if ok else None
    return list(res.values())


def speed(dev, plan, deadline):
    rows = []
    for head, (hid, vocab) in plan["heads"].items():
        try:
            rows += speed_rows(dev, plan, head, hid, vocab, deadline)
        except Exception as exc:
            log(traceback.format_exc())
            rows.append({"head": head, "variant": "-", "status": "error", "error": f"{type(exc).__name__}: {exc}"})
        cleanup(dev)
    failed = any(r["status"] == "error" for r in rows)
    done = all(r["status"] == "ok" for r in rows if r["variant"] in ("ce", "ual_chunked"))
    status = "failed" if failed else "ok" if done else "partial"  # partial: the time budget ran out
    return {"status": status, "dtype": str(plan["speed_dtype"]).split(".")[1], "rows": rows}


# --------------------------------------------------------------------------- 3. training step

def build_llama(shape, dev, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in the training dtype on the device: no fp32 copy of 7B weights
    try:
        with torch.device(dev):
            torch.manual_seed(0)
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)


def one_train_step(dev, plan, lora, deadline):
    from transformers import LlamaConfig, TrainerCallback, TrainingArguments

    from ual.config import ExperimentConfig
    from ual.training.estimate import GiB, detect_device, estimate_for_config, model_shape
    from ual.training.stage import add_lora
    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    gpu, (b, t), steps = dev.type == "cuda", plan["train_bt"], plan["train_steps"]
    cfg = ExperimentConfig()
    cfg.device, cfg.data.max_length = dev.type, t
    tc = cfg.train
    tc.lora, tc.batch_size, tc.bf16, tc.loss, tc.max_steps = lora, b, gpu, "chunked", steps
    tc.gradient_checkpointing = False
    shape = model_shape(LlamaConfig(**plan["model"], tie_word_embeddings=False),
                        tc.lora_target_modules if lora else None, tc.lora_r)
    est = estimate_for_config(cfg, shape=shape, device=detect_device() if gpu else "cpu")
    est_bytes = est["estimate"]["bytes"]["total"]
    row = {"mode": f"LoRA r={tc.lora_r} ({', '.join(tc.lora_target_modules)})" if lora else "full fine-tuning",
           "batch": f"{b} x {t}", "estimate_gib": est_bytes / GiB,
           "estimate_tokens_per_s": b * t / est["time"]["seconds_per_step"], "estimate_device": est["time"]["device"]}
    if gpu:
        free = torch.cuda.mem_get_info(dev)[0]
        if est_bytes > 0.9 * free:
            why = f"estimate {est_bytes / GiB:.1f} GiB > 90% of free {free / GiB:.1f} GiB"
            return {**row, "status": "skipped", "error": why}
    if time.time() > deadline:
        return {**row, "status": "skipped", "error": "time budget"}
    torch.manual_seed(0)
    vocab = plan["model"]["vocab_size"]
    encoded, eps = [], []
    for _ in range(b * steps):
        ids = torch.randint(3, vocab, (t,)).tolist()
        prompt = int(t * (0.1 + 0.4 * torch.rand(()).item()))
        encoded.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        eps.append(0.3 * torch.rand(()).item())
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync(dev)
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(dev)
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp, peak_memory(dev, {}) as peak:
        log(f"train step: building {'Llama-2-7B-shaped' if gpu else 'tiny'} model ({row['mode']})")
        model = build_llama(plan["model"], dev, torch.bfloat16 if gpu else torch.float32)
        if lora:
            model = add_lora(model, tc)
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=b, max_steps=steps, learning_rate=1e-5,
                                 logging_steps=1, save_strategy="no", report_to="none", bf16=gpu, use_cpu=not gpu,
                                 remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=0)
        trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(encoded, eps),
                             data_collator=SmoothingCollator(pad_token_id=0), loss_impl="chunked", callbacks=[Timer()])
        log(f"train step: {steps} optimiser steps of {b} x {t} tokens")
        loss = trainer.train().training_loss
        del trainer, model
    step_s = statistics.median(times[1:] or times)  # the first step pays one-time set-up
    row.update(status="ok" if math.isfinite(loss) else "failed", loss=loss, step_s=step_s, steps=len(times),
               step_times=[round(x, 3) for x in times], tokens_per_s=b * t / step_s,
               peak_gib=None if peak["bytes"] is None else peak["bytes"] / GiB)
    row["peak_vs_estimate"] = None if peak["bytes"] is None else peak["bytes"] / est_bytes
    return row


def train_step(dev, plan, deadline):
    rows = []
    for lora in (True, False):
        mode = "LoRA" if lora else "full fine-tuning"
        try:
            rows.append(one_train_step(dev, plan, lora, deadline))
        except torch.cuda.OutOfMemoryError as exc:  # full fine-tuning runs "if memory allows"
            rows.append({"mode": mode, "status": "error" if lora else "skipped",
                         "error": f"out of memory: {exc}"[:300]})
        except Exception as exc:
            log(traceback.format_exc())
            rows.append({"mode": mode, "status": "error", "error": f"{type(exc).__name__}: {exc}"})
        cleanup(dev)
    failed = any(r["status"] in ("error", "failed") for r in rows)  # full fine-tuning may be skipped (memory)
    return {"status": "failed" if failed else "ok" if rows[0]["status"] == "ok" else "partial", "rows": rows}


# --------------------------------------------------------------------------- 4. ual train end to end

def e2e(dev, plan, deadline, tokenizer_name):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ual.cli import main
    from ual.io import read_json
    from ual.models import load_tokenizer

    tok = load_tokenizer(tokenizer_name)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)  # tests/conftest.py's tiny model
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        model.save_pretrained(tmp / "model")
        tok.save_pretrained(tmp / "model")
        chat = tmp / "chat.jsonl"
        rows = [{"messages": [{"role": "user", "content": f"Say something about number {i}"},
                              {"role": "assistant", "content": f"Number {i} is " + "quite nice " * (1 + i % 5)}]}
                for i in range(16)]
        chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
        cfg = tmp / "e2e.yaml"
        cfg.write_text(f"""
run_dir: {tmp / 'run'}
model: {tmp / 'model'}
device: {dev.type}
data: {{max_length: 48, sources: [{{name: {chat}, train: 16}}]}}
smoothing: {{target_mean: 0.1}}
train: {{modes: [ls], max_steps: 2, batch_size: 2, logging_steps: 1, loss: chunked, report_to: none,
         bf16: {str(dev.type == 'cuda').lower()}}}
""")
        log(f"e2e: ual data + ual train ({dev.type}, 2 steps, chunked loss)")
        rc = main(["data", str(cfg)]) or main(["train", str(cfg)])
        res = read_json(tmp / "run" / "train" / "ls" / "result.json") if rc == 0 else {}
    mem = res.get("memory") or {}
    loss = res.get("final_loss")
    ok = rc == 0 and res.get("steps") == 2 and loss is not None and math.isfinite(loss)
    return {"status": "ok" if ok else "failed", "rc": rc, "steps": res.get("steps"), "loss_impl": res.get("loss"),
            "final_loss": res.get("final_loss"), "final_nll": res.get("final_nll"), "seconds": res.get("seconds"),
            "measured_peak_mib": mem["measured_peak_bytes"] / 2**20 if mem.get("measured_peak_bytes") else None,
            "estimate_mib": mem["estimate_bytes"]["total"] / 2**20 if mem.get("estimate_bytes") else None}


# --------------------------------------------------------------------------- report

def fmt(x, spec=".3g"):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return format(x, spec) if isinstance(x, float) else str(x)


def table(rows, cols):
    """cols: (header, key, format spec)."""
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(k), s) for _, k, s in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown(result, plan):
    s = result["sections"]
    out = [f"# GPU check: {result['device_name']}", "",
           (f"torch {result['torch']}, CUDA {result['cuda']}, transformers {result['transformers']}, Liger-Kernel "
            f"{result['liger'] or 'not installed'}; {result['seconds']:.0f} s of a {plan['budget']:.0f} s budget.")]
    if plan["tiny"]:
        out += ["", "**CPU rehearsal (--tiny): tiny shapes, the same code paths; not a measurement.**"]

    def head(n, title, sec):
        extra = f" ({sec['error']})" if sec.get("error") else ""
        return ["", f"## {n}. {title}: {sec['status']}, {sec.get('seconds', 0):.1f} s{extra}", ""]

    out += head(1, "Exactness, chunked vs naive", s["exactness"])
    out += [f"Batch {plan['exact_bt'][0]} x {plan['exact_bt'][1]} tokens; reference: naive loss in fp32 on the same "
            "inputs. Errors: |loss - ref| / |ref|; max |g - g_ref| / max |g_ref|. Tolerances: "
            + "; ".join(f"{d} loss {t['loss']:g}, gradients {t['grad']:g}" for d, t in TOL.items()) + ".", ""]
    out.append(table(s["exactness"].get("rows", []), [
        ("head", "head", ""), ("H x V", "shape", ""), ("dtype", "dtype", ""), ("variant", "variant", ""),
        ("loss err", "loss_err", ".1e"), ("d hidden err", "dh_err", ".1e"), ("d weight err", "dw_err", ".1e"),
        ("pass", "pass", ""), ("status", "status", ""), ("error", "error", "")]))
    sp = s["speed"]
    out += head(2, "Speed and peak memory, forward + backward", sp)
    out += [(f"{plan['speed_bt'][0]} x {plan['speed_bt'][1]} tokens, {sp.get('dtype', '?')}, hidden and weight both "
             f"trained; median of {plan['iters']} steps after a warm-up (whose peak memory growth is shown). "
             "Ratios < 1: faster / smaller than the baseline."), ""]
    out.append(table(sp.get("rows", []), [
        ("head", "head", ""), ("H x V", "shape", ""), ("variant", "variant", ""), ("smoothing", "smoothing", ""),
        ("ms", "ms", ".1f"), ("tokens/s", "tokens_per_s", ",.0f"), ("peak MiB", "peak_mib", ",.0f"),
        ("time vs CE", "time_vs_ce", ".2f"), ("time vs Liger", "time_vs_liger", ".2f"),
        ("mem vs CE", "mem_vs_ce", ".2f"), ("mem vs Liger", "mem_vs_liger", ".2f"),
        ("time vs ual", "time_vs_ual_chunked", ".2f"), ("mem vs ual", "mem_vs_ual_chunked", ".2f"),
        ("status", "status", ""), ("note", "note", ""), ("error", "error", "")]))
    out += head(3, f"Training step, {'tiny Llama' if plan['tiny'] else 'random Llama-2-7B shape'}, UALTrainer, "
                   "chunked loss", s["train_step"])
    out.append(table(s["train_step"].get("rows", []), [
        ("mode", "mode", ""), ("batch", "batch", ""), ("step s", "step_s", ".3f"), ("tokens/s", "tokens_per_s", ",.0f"),
        ("est. tokens/s", "estimate_tokens_per_s", ",.0f"), ("peak GiB", "peak_gib", ".2f"),
        ("est. GiB (--dry-run)", "estimate_gib", ".2f"), ("peak / est.", "peak_vs_estimate", ".2f"),
        ("loss", "loss", ".4g"), ("status", "status", ""), ("error", "error", "")]))
    out += head(4, "`ual train` end to end, tiny test model", s["e2e"])
    out.append(table([s["e2e"]], [
        ("steps", "steps", ""), ("loss", "loss_impl", ""), ("final loss", "final_loss", ".4g"),
        ("final nll", "final_nll", ".4g"), ("seconds", "seconds", ".1f"), ("peak MiB", "measured_peak_mib", ",.0f"),
        ("est. MiB", "estimate_mib", ",.0f")]))
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small shapes (the CPU rehearsal)")
    p.add_argument("--out", help="Markdown table to this file (default: stdout)")
    p.add_argument("--budget", type=float, help="seconds for everything (default 420; --tiny 240)")
    p.add_argument("--tokenizer", default="smollm2-135m", help="for section 4: an alias or a tokenizer folder")
    p.add_argument("--sections", default=",".join(SHARES), help="comma-separated subset to run")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    plan = {"tiny": args.tiny, "budget": args.budget or (240.0 if args.tiny else 420.0),
            "heads": TINY_HEADS if args.tiny else HEADS, "model": TINY_LLAMA if args.tiny else LLAMA2_7B,
            "exact_bt": (4, 64) if args.tiny else (4, 512), "exact_chunk": 48 if args.tiny else 768,
            "speed_bt": (2, 128) if args.tiny else (4, 2048), "iters": 2 if args.tiny else 5,
            "train_bt": (2, 32) if args.tiny else (2, 2048), "train_steps": 3,
            "speed_dtype": torch.bfloat16 if dev.type == "cuda" else torch.float32}
    torch.set_float32_matmul_precision("highest")  # fp32 exactness: no TF32
    if args.tiny and dev.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes gain nothing from threads, and OpenMP crawls on a busy CI machine
    import transformers

    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401  (installed and importable, not only its metadata)

        liger = version("liger-kernel")
    except Exception:
        liger = None
    result = {"gpu_check": 1, "device": dev.type, "tiny": args.tiny, "torch": torch.__version__,
              "cuda": torch.version.cuda, "transformers": transformers.__version__, "liger": liger,
              "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU", "sections": {}}
    end = T0 + plan["budget"]
    funcs = {"exactness": exactness, "speed": speed, "train_step": train_step,
             "e2e": lambda d, pl, dl: e2e(d, pl, dl, args.tokenizer)}
    wanted = args.sections.split(",")
    if not set(wanted) <= set(SHARES):
        p.error(f"--sections: choose from {', '.join(SHARES)}")
    total_share = sum(SHARES[n] for n in wanted)  # the budget is shared among the sections asked for
    for name, fn in funcs.items():
        start = time.time()
        if name not in wanted or start > end:
            why = "not asked for" if name not in wanted else "time budget"
            result["sections"][name] = {"status": "skipped", "error": why}
            continue
        log(f"section {name}")
        try:
            with contextlib.redirect_stdout(sys.stderr):  # stdout holds only the table and the JSON line
                sec = fn(dev, plan, min(end, start + SHARES[name] / total_share * plan["budget"]))
        except Exception as exc:
            log(traceback.format_exc())
            sec = {"status": "error", "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        sec["seconds"] = time.time() - start
        result["sections"][name] = sec
        log(f"section {name}: {sec['status']} ({sec['seconds']:.1f} s)")
        cleanup(dev)
    result["seconds"] = time.time() - T0
    result["ok"] = all(s["status"] == "ok" for n, s in result["sections"].items() if n in wanted)
    md = markdown(result, plan)
    if args.out:
        Path(args.out).write_text(md)
        log(f"table written to {args.out}")
    else:
        print(md)
    print(json.dumps(result, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
