"""Full LoRA training steps on SmolLM2-135M: ual training (UALTrainer, chunked
per-sample label-smoothed loss) against the plain Hugging Face Trainer SFT loss
(the model's own loss on full logits), same model, LoRA, batch and data. Each
variant trains in a fresh subprocess; all in one run.

    python benchmarks/train_step.py            # batch 2 x 512 tokens, 1 warm-up + 3 timed steps
    python benchmarks/train_step.py --quick    # a tiny random Llama, for a smoke test

A step is the Trainer's whole optimiser step (forward, backward, AdamW), timed
with a TrainerCallback; tokens/s counts all tokens of the batch. Peak memory is
the growth of the process's peak RSS (ru_maxrss) from just before training
(model and LoRA loaded) to its end: tracemalloc does not see torch tensors.

Variants:
  hf_sft       transformers.Trainer, labels into the model (HF's loss on full logits)
  ual_naive    UALTrainer, train.loss = naive (full logits), per-sample eps
  ual_chunked  UALTrainer, train.loss = chunked (hidden states + lm_head weight), per-sample eps

Ends with one JSON line: {"tokens_per_s_vs_hf": ..., "mem_vs_hf": ...} (ual_chunked / hf_sft).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ["hf_sft", "ual_naive", "ual_chunked"]
SUPERVISED = 0.7


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tiny_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def worker(spec):
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from ual.config import TrainConfig
    from ual.training.stage import add_lora
    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    variant, batch, seq, steps = spec["variant"], spec["batch"], spec["seq"], spec["steps"]
    set_seed(0)
    if spec["model"] == "tiny":
        model = _tiny_model()
    else:
        from ual.models import load_model

        model = load_model(spec["model"], "cpu")
    vocab = model.config.vocab_size
    model = add_lora(model, TrainConfig())  # the training default: LoRA r=8 on q_proj, v_proj

    # Synthetic SFT data: a prompt prefix (~30%, varying) is not supervised.
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + 1)
    encoded, eps = [], []
    for _ in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g).tolist()
        prompt = int(seq * (1 - SUPERVISED) * (0.5 + torch.rand((), generator=g).item()))
        encoded.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        eps.append(float(torch.rand((), generator=g)) * 0.3)

    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=steps + 1,
            learning_rate=3e-4,
            logging_steps=10**6,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
            data_seed=0,
        )
        collator = SmoothingCollator(pad_token_id=0)
        dataset = SmoothedDataset(encoded, eps)
        if variant == "hf_sft":

            def hf_collate(rows):
                out = collator(rows)
                out.pop("eps")
                return out

            trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=hf_collate, callbacks=[Timer()])
        else:
            loss_impl = variant.split("_", 1)[1]
            trainer = UALTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                data_collator=collator,
                loss_impl=loss_impl,
                callbacks=[Timer()],
            )
        base = maxrss_mib()
        trainer.train()
        peak = maxrss_mib() - base
    timed = step_times[1:]  # the first step pays one-time set-up (optimizer state, ...)
    return {
        "step_s": statistics.median(timed),
        "steps": [round(t, 2) for t in step_times],
        "peak_mib": peak,
        "tokens": batch * seq,
        "threads": torch.get_num_threads(),
    }


def run_worker(script: str, spec: dict, what: str) -> dict:
    """`script --worker SPEC` in a fresh process (its own peak memory, nothing shared); its last line, as JSON.
    Also benchmarks/batching.py's."""
    cmd = [sys.executable, os.path.abspath(script), "--worker", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {what} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run(spec):
    return run_worker(__file__, spec, spec["variant"])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny random model, short sequences: a smoke test")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=1, help="rounds over all variants (median over rounds)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.model, args.batch, args.seq, args.steps, args.rounds = "tiny", 2, 64, 2, 1
    variants = [v for v in args.variants.split(",") if v]
    import torch

    print(
        f"# Training-step benchmark: {args.model} + LoRA (r=8, q_proj/v_proj), batch {args.batch} x {args.seq} tokens "
        f"(~{SUPERVISED:.0%} supervised), fp32 CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (" (QUICK: tiny random model; a smoke test, not a measurement)" if args.quick else "")
    )
    print(
        f"# each variant a fresh subprocess, {args.rounds} round(s); step time = median of {args.steps} timed "
        "optimiser steps after 1 warm-up; memory = growth of peak RSS (ru_maxrss) over training, after the "
        "model is loaded"
    )
    res = {v: [] for v in variants}
    t0 = time.time()
    for _ in range(args.rounds):
        for v in variants:
            res[v].append(
                _run({"variant": v, "model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps})
            )
    rows = {
        v: {
            "step_s": statistics.median(x for r in rs for x in r["steps"][1:]),
            "steps": [x for r in rs for x in r["steps"]],
            "mem": statistics.median(r["peak_mib"] for r in rs),
            "tokens": rs[0]["tokens"],
        }
        for v, rs in res.items()
    }
    hf = rows["hf_sft"]
    print()
    print(f"[{time.time() - t0:.0f} s]")
    print()
    print("| variant | step (s) | tokens/s | tokens/s vs hf_sft | peak mem growth (MiB) | mem vs hf_sft |")
    print("|---|---|---|---|---|---|")
    for v, r in rows.items():
        tps = r["tokens"] / r["step_s"]
        print(
            f"| {v} | {r['step_s']:.2f} | {tps:.0f} | {tps / (hf['tokens'] / hf['step_s']):.2f}x "
            f"| {r['mem']:.0f} | {r['mem'] / hf['mem']:.2f}x |"
        )
    print()
    print("all steps (s, first is warm-up): " + "; ".join(f"{v} {r['steps']}" for v, r in rows.items()))
    ours = rows.get("ual_chunked")
    summary = {
        "tokens_per_s_vs_hf": None if ours is None else round(hf["step_s"] / ours["step_s"], 3),
        "mem_vs_hf": None if ours is None else round(ours["mem"] / hf["mem"], 3),
    }
    print()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
