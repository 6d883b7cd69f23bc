"""Forward + backward time and peak memory of LM-head losses, each variant in a
fresh subprocess, all in one run, as ratios against plain cross-entropy
measured in that same run.

    python benchmarks/loss.py            # full run (both shapes; long on a 2-core CPU)
    python benchmarks/loss.py --quick    # smoke run on tiny shapes (a few seconds)

Variants (all: hidden (B, T, H) and lm_head weight (V, H) in, scalar loss out,
gradients for the hidden states and, unless --frozen-head, for the weight):
  ce            plain F.cross_entropy on full logits (what Hugging Face models do)
  hf_ls         transformers' LabelSmoother (uniform eps) on full logits (Trainer's label_smoothing_factor)
  torch_chunked F.linear_cross_entropy with chunking (LinearCrossEntropyOptions() defaults), no
                smoothing: its chunked path supports label_smoothing == 0 only. On CPU fp32 its default
                chunk is tiny (rows = N / ceil(V / H) / 2: 32 rows for SmolLM2, 64 for the 7B head),
                and every chunk adds into the whole (V, H) weight gradient
  torch_chunked_512  the same with batch_chunk_size=512 (a stronger, tuned baseline)
  torch_ls      F.linear_cross_entropy with chunking options and uniform smoothing: torch
                falls back to its full-logits reference path (it warns); measured as is
  ual_naive     ual.loss.smoothed_cross_entropy, per-sample eps, on full logits
  ual_chunked   ual.loss.chunked_smoothed_cross_entropy, per-sample eps (ours)
  ual_dft       the same with token_scale="dft" (each token's smoothed CE times sg(p_y): ual+dft)
  ual_eaft      the same with token_scale="eaft" (times sg(top-20 entropy / log 20): ual+eaft)
  ual_weighted  the same with per-sample loss weights (0.5 + i / B for sample i)
  ual_naive_eaft  ual.loss.smoothed_cross_entropy with token_scale="eaft" on full logits (as
                LLaMA-Factory computes EAFT)
The token-scale and weighted variants are also compared with ual_chunked measured in the
same run (columns "vs ual_chunked"; the target is within 1.1x in time and memory).

Peak memory: tracemalloc does not see torch's allocations and CPU tensors have no
allocator statistics, so each worker measures the growth of the process's peak
resident set (resource.getrusage ru_maxrss) over one forward + backward, taken
after the inputs are allocated and touched. Large tensors are mmap'd by glibc
and returned on free, so this is the real high-water mark of the loss. The
weight's gradient (V x H fp32, part of the peak of every variant when the head
is trained) is reported separately as `grad_w MiB`.

Ends with one JSON line of ratios (ours / baseline; < 1 is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings

SHAPES = {
    # name: (batch, tokens, hidden, vocab)
    "smollm2": (4, 1024, 576, 49152),  # SmolLM2-135M head
    "llama7b_head": (1, 1024, 4096, 32000),  # Llama-2-7B-sized head
}
QUICK_SHAPES = {"smollm2": (2, 128, 128, 1024), "llama7b_head": (1, 128, 256, 1024)}
VARIANTS = ["ce", "hf_ls", "torch_chunked", "torch_chunked_512", "torch_ls", "ual_naive", "ual_chunked",
            "ual_dft", "ual_eaft", "ual_weighted", "ual_naive_eaft"]
# Variants compared with ual_chunked (same loss, a token scale or sample weights added).
MODE_VARIANTS = ("ual_dft", "ual_eaft", "ual_weighted", "ual_naive_eaft")
UNIFORM_EPS = 0.1
SUPERVISED = 0.7  # fraction of supervised (response) tokens


def _inputs(shape, frozen_head, seed=0):
    import torch

    b, t, h, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).requires_grad_()
    weight = torch.randn(v, h, generator=g).mul_(h**-0.5)  # logits ~ N(0, 1); in place: no temporary
    weight.requires_grad_(not frozen_head)
    # Realistic SFT masks: a prompt prefix (~30% of the tokens, varying per sample)
    # is ignored, the response is supervised.
    targets = torch.randint(0, v, (b, t), generator=g)
    for i in range(b):
        prompt = int(t * (1 - SUPERVISED) * (0.5 + torch.rand((), generator=g).item()))
        targets[i, :prompt] = -100
    eps = torch.rand(b, generator=g) * 0.3  # per-sample smoothing
    return hidden, weight, targets, eps


def _loss_fn(variant):
    import torch
    import torch.nn.functional as F

    if variant == "ce":

        def fn(hidden, weight, targets, eps):
            logits = F.linear(hidden, weight).float()
            n = (targets != -100).sum()
            return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction="sum") / n

    elif variant == "hf_ls":
        from transformers.trainer_pt_utils import LabelSmoother

        smoother = LabelSmoother(epsilon=UNIFORM_EPS)

        def fn(hidden, weight, targets, eps):
            return smoother({"logits": F.linear(hidden, weight)}, targets, shift_labels=False)

    elif variant in ("torch_chunked", "torch_chunked_512", "torch_ls"):
        if not hasattr(F, "linear_cross_entropy"):
            return None
        if variant == "torch_chunked_512":
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=512)
        else:
            options = torch.nn.LinearCrossEntropyOptions()
        smoothing = UNIFORM_EPS if variant == "torch_ls" else 0.0

        def fn(hidden, weight, targets, eps):
            return F.linear_cross_entropy(
                hidden.view(-1, hidden.shape[-1]),
                weight,
                targets.view(-1),
                reduction="mean",
                ignore_index=-100,
                label_smoothing=smoothing,
                options=options,
            )

    elif variant == "ual_naive":
        from ual.loss import smoothed_cross_entropy

        def fn(hidden, weight, targets, eps):
            return smoothed_cross_entropy(F.linear(hidden, weight), targets, eps)

    elif variant == "ual_chunked":
        from ual.loss import chunked_smoothed_cross_entropy

        def fn(hidden, weight, targets, eps):
            return chunked_smoothed_cross_entropy(hidden, weight, targets, eps)

    elif variant in ("ual_dft", "ual_eaft", "ual_weighted"):
        from ual.loss import chunked_smoothed_cross_entropy

        token_scale = {"ual_dft": "dft", "ual_eaft": "eaft"}.get(variant, "none")

        def fn(hidden, weight, targets, eps):
            b = targets.shape[0]
            weights = 0.5 + torch.arange(b) / b if variant == "ual_weighted" else None
            return chunked_smoothed_cross_entropy(hidden, weight, targets, eps, token_scale=token_scale,
                                                  sample_weights=weights)

    elif variant == "ual_naive_eaft":
        from ual.loss import smoothed_cross_entropy

        def fn(hidden, weight, targets, eps):
            return smoothed_cross_entropy(F.linear(hidden, weight), targets, eps, token_scale="eaft")

    else:
        raise ValueError(variant)
    return fn


def _maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(variant, shape, frozen_head, iters):
    """Runs in a fresh process: one warm-up step (its peak is the memory figure),
    then `iters` timed steps."""
    import gc

    import torch

    fn = _loss_fn(variant)
    if fn is None:
        return {"skipped": "not available in this torch"}
    hidden, weight, targets, eps = _inputs(shape, frozen_head)
    gc.collect()
    base = _maxrss_mib()
    notes = []
    times = []
    cpu_times = []
    for i in range(1 + iters):
        c0 = time.process_time()
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = fn(hidden, weight, targets, eps)
            loss.backward()
        dt = time.perf_counter() - t0
        dc = time.process_time() - c0
        if i == 0:
            peak = _maxrss_mib() - base
            notes = sorted({str(w.message).split(";")[0][:80] for w in caught})
            value = float(loss.detach())
        else:
            times.append(dt)
            cpu_times.append(dc)
        hidden.grad = None
        weight.grad = None
        del loss
    return {
        "times": times,
        "cpu_times": cpu_times,
        "peak_mib": peak,
        "loss": value,
        "notes": notes,
        "threads": torch.get_num_threads(),
    }


def _run_forked(variant, shape_name, shape, frozen_head, iters):
    """--quick: a forked child of this process (which has imported torch but run
    no op, so no OpenMP pool exists yet): a fresh process without paying the
    interpreter and import start-up (seconds) per variant."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        try:
            payload = json.dumps(worker(variant, shape, frozen_head, iters)).encode()
            code = 0
        except BaseException as exc:  # noqa: BLE001 - reported by the parent
            payload = json.dumps({"error": repr(exc)}).encode()
            code = 1
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    if "error" in out:
        raise RuntimeError(f"worker {variant}/{shape_name} failed: {out['error']}")
    return out


def _run_worker(variant, shape_name, shape, frozen_head, iters, fork=False):
    if fork and hasattr(os, "fork"):
        return _run_forked(variant, shape_name, shape, frozen_head, iters)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        json.dumps({"variant": variant, "shape": shape, "frozen_head": frozen_head, "iters": iters}),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {variant}/{shape_name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, one round: a smoke test")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all variants (median over rounds)")
    p.add_argument("--iters", type=int, default=1, help="timed steps per worker (after one warm-up step)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument(
        "--heads",
        default=None,
        help="comma-separated; trainable: gradients for hidden and weight; frozen: hidden only (LoRA "
        "fine-tuning). Default: trainable,frozen (--quick: trainable)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["variant"], tuple(spec["shape"]), spec["frozen_head"], spec["iters"])))
        return

    import torch

    shapes = QUICK_SHAPES if args.quick else SHAPES
    shape_names = [s for s in args.shapes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    heads = [h for h in (args.heads or ("trainable" if args.quick else "trainable,frozen")).split(",") if h]
    rounds = 1 if args.quick else args.rounds
    if args.quick:
        import transformers.trainer_pt_utils  # noqa: F401 - imported once, before forking

        import ual.loss  # noqa: F401
    assert "ce" in variants and "ual_chunked" in variants, "ratios need ce and ual_chunked"

    print(
        f"# Loss benchmark: forward + backward of the LM-head loss; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        + (" (QUICK: tiny shapes, forked workers; a smoke test, not a measurement)" if args.quick else "")
    )
    print(
        f"# {rounds} round(s) x {len(variants)} variants, each a fresh subprocess (1 warm-up + {args.iters} timed "
        "step); time = median over rounds of the timed steps' wall time (CPU time = the process's user + "
        "system time, less sensitive to other load on a shared machine), memory = growth of peak RSS (ru_maxrss) over "
        "the warm-up step, after inputs are allocated (tracemalloc cannot see torch tensors)."
    )
    print(f"# masks: ~{SUPERVISED:.0%} supervised tokens (prompt prefix ignored); uniform eps {UNIFORM_EPS} for hf_ls / torch_ls; per-sample eps in [0, 0.3] for ual_*")
    summary = {}
    for head in heads:
        frozen = head == "frozen"
        for name in shape_names:
            shape = shapes[name]
            b, t, h, v = shape
            results = {var: [] for var in variants}
            t_start = time.time()
            load_start = os.getloadavg()[0]
            for r in range(rounds):
                for var in variants:  # interleaved, so load drift hits every variant alike
                    results[var].append(_run_worker(var, name, shape, frozen, args.iters, fork=args.quick))
            rows = {}
            for var, rs in results.items():
                if "skipped" in rs[0]:
                    rows[var] = None
                    continue
                rows[var] = {
                    "time": statistics.median(x for r_ in rs for x in r_["times"]),
                    "times": [round(x, 2) for r_ in rs for x in r_["times"]],
                    "cpu": statistics.median(x for r_ in rs for x in r_["cpu_times"]),
                    "mem": statistics.median(r_["peak_mib"] for r_ in rs),
                    "loss": rs[0]["loss"],
                    "notes": rs[0]["notes"],
                }
            ce = rows["ce"]
            ours = rows["ual_chunked"]
            grad_w = 0.0 if frozen else v * h * 4 / 2**20
            print()
            print(
                f"## {name}: hidden {h}, vocab {v}, batch {b} x {t} tokens, lm_head "
                f"{'frozen (grad for hidden only, as in LoRA)' if frozen else 'trained (grad for hidden and weight)'}"
                f"  [{time.time() - t_start:.0f} s, load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}]"
            )
            print()
            print(
                "| variant | per-sample eps | time (s) | time vs ce | CPU time (s) | CPU time vs ce "
                "| peak mem (MiB) | mem vs ce | mem - grad_w vs ce | time vs ual_chunked | CPU time vs ual_chunked "
                "| mem vs ual_chunked | loss |"
            )
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
            for var in variants:
                row = rows[var]
                if row is None:
                    print(f"| {var} | | n/a | | | | | | | | | | |")
                    continue
                work = (row["mem"] - grad_w) / max(ce["mem"] - grad_w, 1e-9)
                vs_ours = var in MODE_VARIANTS
                print(
                    f"| {var} | {'yes' if var.startswith('ual') else 'no'} | {row['time']:.2f} "
                    f"| {_fmt_ratio(row['time'] / ce['time'])} | {row['cpu']:.2f} | {_fmt_ratio(row['cpu'] / ce['cpu'])} "
                    f"| {row['mem']:.0f} | {_fmt_ratio(row['mem'] / ce['mem'])} "
                    f"| {_fmt_ratio(work)} | {_fmt_ratio(row['time'] / ours['time']) if vs_ours else ''} "
                    f"| {_fmt_ratio(row['cpu'] / ours['cpu']) if vs_ours else ''} "
                    f"| {_fmt_ratio(row['mem'] / max(ours['mem'], 1e-9)) if vs_ours else ''} | {row['loss']:.4f} |"
                )
            print()
            print(f"all timed steps (s): " + "; ".join(f"{k} {r['times']}" for k, r in rows.items() if r))
            if not frozen:
                print(f"grad_w (the weight's fp32 gradient, in every variant's peak): {grad_w:.0f} MiB")
            for var, row in rows.items():
                if row and row["notes"]:
                    print(f"note {var}: " + " | ".join(row["notes"]))
            def ratio(key, base, var="ual_chunked"):
                if rows.get(base) is None or rows.get(var) is None:
                    return None
                return round(rows[var][key] / max(rows[base][key], 1e-9), 3)

            entry = {
                "time_vs_ce": ratio("time", "ce"),
                "time_vs_torch_chunked": ratio("time", "torch_chunked"),
                "mem_vs_ce": ratio("mem", "ce"),
                "time_vs_torch_chunked_512": ratio("time", "torch_chunked_512"),
                "time_vs_torch_ls": ratio("time", "torch_ls"),
                "time_vs_hf_ls": ratio("time", "hf_ls"),
                "mem_vs_torch_chunked": ratio("mem", "torch_chunked"),
                "cpu_time_vs_ce": ratio("cpu", "ce"),
                "cpu_time_vs_torch_chunked": ratio("cpu", "torch_chunked"),
                "time_s": round(ours["time"], 3),
                "ce_time_s": round(ce["time"], 3),
                # token scales and sample weights: against ce and against ual_chunked (target <= 1.1)
                "modes": {
                    var: {
                        "time_vs_ce": ratio("time", "ce", var),
                        "mem_vs_ce": ratio("mem", "ce", var),
                        "time_vs_ual_chunked": ratio("time", "ual_chunked", var),
                        "cpu_time_vs_ual_chunked": ratio("cpu", "ual_chunked", var),
                        "mem_vs_ual_chunked": ratio("mem", "ual_chunked", var),
                    }
                    for var in MODE_VARIANTS if rows.get(var) is not None
                },
            }
            summary[name if not frozen or heads == ["frozen"] else f"{name}_frozen_head"] = entry
    print()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
