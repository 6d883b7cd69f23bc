"""The `ual train` stage: train each mode (sft, ls, ual, ...) on the same data, seed and steps.

The modes differ only in each sample's eps and each token's scale (ual.loss):
  sft  eps = 0 for every sample (plain cross-entropy)
  ls   eps = smoothing.target_mean for every sample (uniform label smoothing)
  ual  eps from smoothing.jsonl (per-sample, from the uncertainty scores)
  ppl  eps from each sample's current NLL relative to the running mean (training/ppl.py)
  dft  eps = 0, each token's loss times sg(p_y) (DFT, TRL's loss_type="dft")
  eaft eps = 0, each token's loss times sg(top-k entropy / log k), k = train.eaft_topk (EAFT)
  ual+dft, ual+eaft  ual's eps, and the token scale: the smoothed loss of each token scaled
With train.weight_column, every mode also weights each sample's loss by that field of its meta
(training/columns.py); modes trained on the same run then share the weights.
The data order is fixed by the seed, so every mode sees the same batches.
A finished mode (train/MODE/result.json) is skipped on rerun, unless the settings or input files it was
trained from (lineage.json) have changed since: then it is trained again, saying what changed.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from contextlib import contextmanager

from ual.config import ExperimentConfig, TrainConfig, to_dict
from ual.io import read_json, write_json
from ual.lineage import Lineage, map_record, train_record
from ual.runfolder import RunFolder
from ual.training.columns import mapped_indices, read_smoothing, sample_weights, smoothing_rows
from ual.training.memory import estimate_and_measure_end, estimate_and_measure_start
from ual.training.plan import MODES, accumulation_steps, mode_parts, sharding_from_env, uses_smoothing_map, world_size

log = logging.getLogger(__name__)


def eps_for_mode(mode: str, ids, cfg: ExperimentConfig, smoothing=None, run: RunFolder | None = None):
    """Each sample's eps under `mode` (a float array in the order of `ids`, the samples' ids; None for
    ppl: the trainer's eps_fn computes each batch's own). `smoothing`: smoothing.jsonl
    (columns.read_smoothing), needed by the ual modes."""
    import numpy as np

    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose from {MODES}")
    base = mode_parts(mode)[0]
    if base == "sft":
        return np.zeros(len(ids))
    if base == "ls":
        return np.full(len(ids), cfg.smoothing.target_mean)
    if base == "ual":
        if smoothing is None:
            raise ValueError(f"train mode {mode} needs the smoothing map (smoothing.jsonl); none was read")
        return smoothing_rows(run, ids, smoothing)["eps"].to_numpy(dtype=np.float64)
    return None  # ppl


def _tokenized_train_set(run: RunFolder, tokenizer, cfg: ExperimentConfig):
    """The run's tokenized training set. Under `accelerate launch` rank 0 builds it (or finds it current) while
    the other processes wait, then they read it: two processes building one set would clear each other's
    scratch folders, and only rank 0 writes the run folder (lineage.json included)."""
    from datasets import load_from_disk

    from ual import shards
    from ual.data.tokenized import set_name, tokenized_set

    if shards.processes() == 1:
        return tokenized_set(run.root, "train", tokenizer, cfg.data.max_length, cfg.data.train_on_prompt,
                             cfg.data.num_proc)
    if shards.rank() == 0:
        try:
            return tokenized_set(run.root, "train", tokenizer, cfg.data.max_length, cfg.data.train_on_prompt,
                                 cfg.data.num_proc)
        finally:
            shards.barrier()
    shards.barrier()
    folder = run.root / "tokenized" / set_name("train", cfg.data.max_length, cfg.data.train_on_prompt)
    if not folder.exists():  # no samples: an empty set, never written
        return tokenized_set(run.root, "train", tokenizer, cfg.data.max_length, cfg.data.train_on_prompt, 1)
    return load_from_disk(str(folder))


def run_train(cfg: ExperimentConfig, force: bool = False) -> dict:
    """The eps of every sample reaches the loss in four hops: smoothing.jsonl -> `eps_for_mode` ->
    `SmoothedDataset` (one eps per row) -> `SmoothingCollator` (batch["eps"]) -> `UALLoss.compute_loss`
    (ual.loss). The token ids come from the run's tokenized set (ual.data.tokenized), memory-mapped:
    built once, shared by every mode and seed."""
    from ual.models import load_tokenizer
    from ual.training.trainer import SmoothedDataset

    run = RunFolder(cfg.run_path)
    run.require(run.samples, "data")
    smoothing = read_smoothing(run) if any(map(uses_smoothing_map, cfg.train.modes)) else None
    if smoothing is not None:
        changed = Lineage(run.root).stale("map", map_record(to_dict(cfg), run.root))
        if changed:  # the smoothing would train ual from other scores or a target other than ls's
            raise ValueError(f"{run.smoothing} was made from other scores or settings ({'; '.join(changed)}): "
                             "run `ual map` on this run folder first")
    weights = sample_weights(run, cfg.train.weight_column)  # checked before anything loads
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    encoded = _tokenized_train_set(run, tokenizer, cfg)
    ids = encoded.data.column("id").to_pylist()
    if smoothing is not None and cfg.smoothing.missing == "drop":
        keep = mapped_indices(ids, smoothing)
        if len(keep) < len(ids):
            encoded, ids = encoded.select(keep), [ids[i] for i in keep]
            weights = None if weights is None else weights[keep]
    curve_inputs = None
    if cfg.train.eval_strategy != "no":
        from ual.training.curves import train_subset

        heldout = run.load_samples("heldout")
        if not heldout:
            raise ValueError("train.eval_strategy: this run has no held-out samples to evaluate on "
                             "(give the data sources a heldout count and run `ual data`)")
        curve_inputs = (heldout, train_subset(run, ids, cfg.train.eval_train_samples, cfg.seed))
    results, lineage, now = {}, Lineage(run.root), to_dict(cfg)
    for mode in cfg.train.modes:
        out = run.train_dir(mode)
        record = train_record(now, run.root, mode)
        if (out / "result.json").exists() and not force:
            changed = lineage.stale(f"train/{mode}", record)
            if not changed:  # current, or made before records were kept
                log.info("train/%s already done; skipping (use --force to retrain)", mode)
                results[mode] = read_json(out / "result.json")
                continue
            log.info("train/%s was made from other settings or inputs (%s); training it again", mode, "; ".join(changed))
        dataset = SmoothedDataset(encoded, eps_for_mode(mode, ids, cfg, smoothing, run), weights)
        with set_aside(out) as old:  # a retrained mode starts clean; a failure puts the old one back
            results[mode] = train_one(cfg, mode, dataset, tokenizer, out, curve_inputs)
            lineage.put(f"train/{mode}", record)
        if old:
            log.info("train/%s: retrained; the earlier model was replaced", mode)
    return results


@contextmanager
def set_aside(out):
    """A finished mode's folder moved aside while it is trained again (none of the old model's points,
    checkpoints or curve may mix with the new one's), removed once the new one is done, and put back
    if training fails or is interrupted, so a failed retraining leaves the folder as it was.
    Yields whether there was one."""
    if not (out / "result.json").exists():
        yield False
        return
    aside = out.with_name(f".{out.name}.replaced")
    shutil.rmtree(aside, ignore_errors=True)
    out.rename(aside)
    try:
        yield True
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        aside.rename(out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def train_one(cfg: ExperimentConfig, mode: str, dataset, tokenizer, out, curve_inputs=None) -> dict:
    """Train one mode on a SmoothedDataset (its rows carry their eps and, if any, their loss weight);
    with curve_inputs (held-out samples, training subset), evaluated during training (curves.py)."""
    import torch
    from transformers import set_seed

    from ual.models import load_model
    from ual.training.trainer import SmoothingCollator, UALTrainer, resolve_loss

    tc = cfg.train
    sharding = sharding_from_env()
    resolve_loss(tc.loss, sharding)  # an impossible loss for this sharding stops here, before the model loads
    set_seed(cfg.seed)  # same LoRA init for every mode
    device = local_device(cfg.device)
    dtype = torch.bfloat16 if tc.bf16 and device.type == "cuda" else torch.float32
    # The arguments come before the model: under `accelerate launch` with DeepSpeed ZeRO-3
    # they make from_pretrained load each weight already partitioned.
    args = training_arguments(cfg, out, len(dataset), device.type)
    model = load_model(cfg.model, str(device), dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if tc.lora:
        model = add_lora(model, tc)
    loss_impl = resolve_loss(tc.loss, sharding, model.config)  # refuses chunked where it cannot run
    eps_fn, callbacks = None, []
    if mode == "ppl":
        from ual.training.ppl import PerplexitySmoothing, ppl_callback

        eps_fn = PerplexitySmoothing(cfg.smoothing.target_mean, cfg.smoothing.eps_max)
        callbacks.append(ppl_callback(eps_fn))
    if curve_inputs is not None:
        from ual.training.curves import curve_callback

        if sharding in ("fsdp", "fsdp2", "zero3"):
            raise ValueError(f"train.eval_strategy: evaluating during {sharding} training is not supported (the "
                             "main process alone cannot run a sharded model); keep checkpoints with train.save_steps "
                             "and evaluate them with `ual eval --adapter`")
        callbacks.append(curve_callback(cfg, mode, tokenizer, *curve_inputs, out, keep=tc.keep_points))
    from ual.training.batches import PaddingFreeCollator, attention_implementation, prepare_packed_attention

    if tc.batching == "padding_free":
        collator = PaddingFreeCollator(varlen=prepare_packed_attention(model))  # sdpa becomes sdpa_varlen
    else:
        collator = SmoothingCollator(tokenizer.pad_token_id)
    attention = attention_implementation(model)
    trainer = UALTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        loss_impl=loss_impl,
        eps_fn=eps_fn,
        callbacks=callbacks,
        token_scale=mode_parts(mode)[1],
        eaft_topk=tc.eaft_topk,
        sampling=tc.sampling,
        group_lengths=dataset.lengths() if tc.batching == "grouped" else None,
    )
    resume = latest_checkpoint(out / "checkpoints", "ual_ppl_state.json" if eps_fn else None) if tc.resume else None
    if resume is not None:
        log.info("training %s: resuming from %s", mode, resume)
        if eps_fn is not None and not eps_fn.load(resume):
            log.warning("%s has no ppl running mean; it restarts from this step", resume)
    memory = estimate_and_measure_start(cfg, len(dataset), device)
    start = time.time()
    log.info("training %s: %d samples, %d optimiser steps, %s loss, token scale %s, %s batches, %s attention", mode,
             len(dataset), args.max_steps, loss_impl, mode_parts(mode)[1], tc.batching, attention)
    train_output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.time() - start
    memory = estimate_and_measure_end(memory, device)
    trainer.save_model(str(out / "adapter" if tc.lora else out / "model"))  # main process only, gathers shards
    if not trainer.is_world_process_zero():
        return {"mode": mode, "steps": trainer.state.global_step, "rank": trainer.args.process_index}
    if not tc.lora:
        tokenizer.save_pretrained(out / "model")
    losses = [h for h in trainer.state.log_history if "loss" in h]
    write_json(out / "log.json", trainer.state.log_history)
    result = {
        "mode": mode,
        "steps": trainer.state.global_step,
        "samples": len(dataset),
        "mean_eps": dataset.mean_eps if eps_fn is None
        else float(sum(eps_fn.history) / len(eps_fn.history)) if eps_fn.history else None,
        "resumed_from": str(resume) if resume else None,
        "processes": trainer.args.world_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        "loss": loss_impl,
        "batching": tc.batching,
        "attention": attention,
        "token_scale": mode_parts(mode)[1],
        "eaft_topk": tc.eaft_topk if mode_parts(mode)[1] == "eaft" else None,
        "weight_column": tc.weight_column,
        "mean_weight": dataset.mean_weight,
        "sharding": sharding,
        "train_loss": train_output.training_loss,
        "final_loss": losses[-1]["loss"] if losses else None,
        # the plain NLL term (eps = 0 part) of the last logged steps: comparable across modes
        "final_nll": losses[-1].get("nll") if losses else None,
        "seconds": seconds,
        "memory": memory,
        "curve": str(out / "curve.jsonl") if curve_inputs is not None else None,
        "adapter": str(out / "adapter") if tc.lora else None,
        "model": str(out / "model") if not tc.lora else None,
    }
    write_json(out / "result.json", result)
    return result


def local_device(device: str = "auto"):
    """This process's device: under `accelerate launch` / torchrun each rank takes its own GPU."""
    import os

    import torch

    from ual.models import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev


def latest_checkpoint(folder, also: str | None = None):
    """The newest complete Trainer checkpoint in `folder` (None if there is none).

    trainer_state.json is written last, so a checkpoint being written when the run
    was killed has none and is passed over (as is one without the file `also`).
    """
    from pathlib import Path

    folder = Path(folder)
    done = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
            and (p / "trainer_state.json").exists() and (also is None or (p / also).exists())]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def resolve_report_to(report_to: str) -> str:
    """`auto`: TensorBoard when it is installed, else nothing."""
    import importlib.util

    if report_to != "auto":
        return report_to
    has_tb = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None
    return "tensorboard" if has_tb else "none"


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
    accumulation = accumulation_steps(tc)
    per_step = tc.batch_size * accumulation * world_size()
    steps = tc.max_steps if tc.max_steps > 0 else math.ceil(tc.epochs * n_samples / per_step)
    # Warm-up is counted in optimiser steps (the reference code compared micro-steps
    # with optimiser steps, which kept its learning rate near 5e-5).
    warmup = math.ceil(tc.warmup_ratio * steps)
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=tc.batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=warmup,
        weight_decay=tc.weight_decay,
        max_steps=steps,
        logging_steps=tc.logging_steps,
        save_strategy="steps" if tc.save_steps > 0 else "no",
        save_steps=tc.save_steps if tc.save_steps > 0 else 500,
        save_total_limit=tc.save_total_limit,
        report_to=resolve_report_to(tc.report_to),
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        bf16=tc.bf16 and device_type == "cuda",
        use_cpu=device_type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
