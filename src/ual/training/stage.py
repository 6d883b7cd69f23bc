"""The `ual train` stage: train each mode (sft, ls, ual) on the same data, seed and steps.

The modes differ only in each sample's eps:
  sft  eps = 0 for every sample (plain cross-entropy)
  ls   eps = smoothing.target_mean for every sample (uniform label smoothing)
  ual  eps from smoothing.jsonl (per-sample, from the uncertainty scores)
The data order is fixed by the seed, so every mode sees the same batches.
A finished mode (train/MODE/result.json) is skipped on rerun.
"""

from __future__ import annotations

import logging
import math
import time

from ual.config import ExperimentConfig, TrainConfig
from ual.io import read_json, read_jsonl, write_json
from ual.runfolder import RunFolder

log = logging.getLogger(__name__)

MODES = ("sft", "ls", "ual")


def smoothing_for_mode(mode: str, samples, cfg: ExperimentConfig, run: RunFolder) -> list[float]:
    if mode == "sft":
        return [0.0] * len(samples)
    if mode == "ls":
        return [cfg.smoothing.target_mean] * len(samples)
    if mode == "ual":
        eps = {r["id"]: r["eps"] for r in read_jsonl(run.require(run.smoothing, "map"))}
        missing = [s.id for s in samples if s.id not in eps]
        if missing:
            raise ValueError(f"{len(missing)} training samples have no eps in {run.smoothing} (first: {missing[0]}); rerun `ual map`")
        return [eps[s.id] for s in samples]
    raise ValueError(f"unknown training mode {mode!r}; choose from {MODES}")


def run_train(cfg: ExperimentConfig, force: bool = False) -> dict:
    from ual.data.tokenize import encode_sample
    from ual.models import load_tokenizer

    run = RunFolder(cfg.run_path)
    samples = run.load_samples("train")
    if cfg.smoothing.missing == "drop" and "ual" in cfg.train.modes and run.smoothing.exists():
        # Samples dropped at the map stage are dropped for every mode, so the modes stay comparable.
        have = {r["id"] for r in read_jsonl(run.smoothing)}
        samples = [s for s in samples if s.id in have]
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    encoded = [encode_sample(tokenizer, s.messages, cfg.data.max_length, cfg.data.train_on_prompt) for s in samples]
    results = {}
    for mode in cfg.train.modes:
        out = run.train_dir(mode)
        if (out / "result.json").exists() and not force:
            log.info("train/%s already done; skipping (use --force to retrain)", mode)
            results[mode] = read_json(out / "result.json")
            continue
        eps = smoothing_for_mode(mode, samples, cfg, run)
        results[mode] = train_one(cfg, mode, encoded, eps, tokenizer, out)
    return results


def train_one(cfg: ExperimentConfig, mode: str, encoded, eps, tokenizer, out) -> dict:
    import torch
    from transformers import set_seed

    from ual.models import load_model, pick_device
    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    tc = cfg.train
    set_seed(cfg.seed)  # same LoRA init for every mode
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if tc.bf16 and device.type == "cuda" else torch.float32
    model = load_model(cfg.model, cfg.device, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if tc.lora:
        model = add_lora(model, tc)
    dataset = SmoothedDataset(encoded, eps)
    args = training_arguments(cfg, out, len(dataset), device.type)
    trainer = UALTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=SmoothingCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        loss_impl=tc.loss,
    )
    start = time.time()
    log.info("training %s: %d samples, %d optimiser steps", mode, len(dataset), args.max_steps)
    train_output = trainer.train()
    seconds = time.time() - start
    model.save_pretrained(out / "adapter" if tc.lora else out / "model")
    if not tc.lora:
        tokenizer.save_pretrained(out / "model")
    losses = [h for h in trainer.state.log_history if "loss" in h]
    write_json(out / "log.json", trainer.state.log_history)
    result = {
        "mode": mode,
        "steps": trainer.state.global_step,
        "samples": len(dataset),
        "mean_eps": float(sum(eps) / len(eps)),
        "train_loss": train_output.training_loss,
        "final_loss": losses[-1]["loss"] if losses else None,
        "seconds": seconds,
        "adapter": str(out / "adapter") if tc.lora else None,
        "model": str(out / "model") if not tc.lora else None,
    }
    write_json(out / "result.json", result)
    return result


def add_lora(model, tc: TrainConfig):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=tc.lora_r,
        lora_alpha=tc.lora_alpha,
        lora_dropout=tc.lora_dropout,
        target_modules=list(tc.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def training_arguments(cfg: ExperimentConfig, out, n_samples: int, device_type: str):
    from transformers import TrainingArguments

    tc = cfg.train
    per_step = tc.batch_size * tc.gradient_accumulation_steps
    steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * n_samples / per_step)
    # Warm-up is counted in optimiser steps (the reference code compared micro-steps
    # with optimiser steps, which kept its learning rate near 5e-5).
    warmup = math.ceil(tc.warmup_ratio * steps)
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=tc.weight_decay,
        max_steps=steps,
        logging_steps=tc.logging_steps,
        save_strategy="steps" if tc.save_steps > 0 else "no",
        save_steps=tc.save_steps if tc.save_steps > 0 else 500,
        report_to=tc.report_to,
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        bf16=tc.bf16 and device_type == "cuda",
        use_cpu=device_type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
