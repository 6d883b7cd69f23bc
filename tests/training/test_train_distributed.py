"""Scale-out through `accelerate launch` (2 CPU processes, gloo): per-sample eps and token normalisation survive.

accelerate's `--cpu --num_processes 2` starts a single process unless mpirun is set up (its
multi-CPU launcher is MPI-based), so the processes are started the way configs/accelerate/cpu2.yaml
does: accelerate's torchrun launcher, which on a machine without a GPU runs each process on the
CPU with the gloo backend (the Trainer reports DistributedType.MULTI_CPU).

A 2-process step over a global batch must equal a 1-process step over the same global
batch: the Trainer gathers the supervised-token count over processes (num_items_in_batch)
and UALTrainer undoes DDP's gradient average, so the update is the global per-token mean.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ual.cli import main
from ual.io import read_json

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"

STEP_SCRIPT = textwrap.dedent('''
    import sys, torch
    from transformers import AutoModelForCausalLM, TrainingArguments
    from ual.data.tokenize import encode_sample
    from ual.models import load_tokenizer
    from ual.training.ppl import PerplexitySmoothing
    from ual.training.batches import PaddingFreeCollator
    from ual.training.trainer import SmoothedDataset, SmoothingCollator, UALTrainer

    model_dir, out, batch, accumulation = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    padding_free = sys.argv[5:] == ["padding_free"]  # ppl's eps_fn refuses padding-free rows: ual alone then
    tok = load_tokenizer(model_dir)
    texts = [("hi", "hello there"), ("2+2?", "4"), ("tell me a story", "once upon a time " * 10), ("x", "y z w v")]
    enc = [encode_sample(tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], 96) for q, a in texts]
    result = {}
    for name, eps_fn in (("ual", None), ("ppl", PerplexitySmoothing(0.3)))[: 1 if padding_free else 2]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        args = TrainingArguments(output_dir=out + ".tmp", per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
                                 lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="no",
                                 remove_unused_columns=False, seed=0, disable_tqdm=True)
        trainer = UALTrainer(model=model, args=args, train_dataset=SmoothedDataset(enc, [0.0, 0.6, 0.2, 0.9]),
                             data_collator=PaddingFreeCollator() if padding_free else SmoothingCollator(tok.pad_token_id),
                             eps_fn=eps_fn)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer.train()
        delta = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}
        result[name] = {"delta": delta, "procs": trainer.args.world_size,
                        "running": eps_fn.running_mean if eps_fn else None}
    if trainer.is_world_process_zero():
        torch.save(result, out)
''')


def _launch(args, cwd, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cpu2 = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "cpu2.yaml"
    proc = subprocess.run([ACCELERATE, "launch", "--config_file", str(cpu2), "--dynamo_backend", "no"] + args,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _worst(a, b):
    return max(float((a[n] - b[n]).abs().max() / (a[n].abs().max() + 1e-12)) for n in a)


def test_two_processes_equal_one_over_the_global_batch(tmp_path, tiny_model_dir):
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    one = tmp_path / "one.pt"
    subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(one), "4", "1"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    ref = torch.load(one)
    # 2 processes x 2 samples; 2 processes x 1 sample x 2 micro-batches; 2 processes x a padding-free row of 2
    # samples (the same update as one process's padded batch of 4)
    for batch, accumulation, batching in ((2, 1, "padded"), (1, 2, "padded"), (2, 1, "padding_free")):
        out = tmp_path / f"two-{batch}-{accumulation}-{batching}.pt"
        _launch([str(script), str(tiny_model_dir), str(out), str(batch), str(accumulation), batching], cwd=tmp_path)
        got = torch.load(out)
        for mode in ("ual", "ppl") if batching == "padded" else ("ual",):
            assert got[mode]["procs"] == 2 and ref[mode]["procs"] == 1
            assert _worst(ref[mode]["delta"], got[mode]["delta"]) < 1e-4, (mode, batch, accumulation)
        if batching == "padded":
            assert got["ppl"]["running"] == pytest.approx(ref["ppl"]["running"], rel=1e-5)  # synced over processes


def test_ual_train_under_accelerate_launch(tmp_path, tiny_model_dir):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": "an answer " * (1 + i % 4)}]})
                              for i in range(16)) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path / 'run'}
model: {tiny_model_dir}
data: {{max_length: 48, sources: [{{name: {chat}, train: 16}}]}}
smoothing: {{target_mean: 0.2}}
train: {{modes: [ls], max_steps: 3, batch_size: 2, global_batch_size: 8, logging_steps: 1, report_to: none}}
""")
    assert main(["data", str(cfg)]) == 0
    _launch(["-m", "ual.cli", "train", str(cfg)], cwd=Path(__file__).resolve().parents[2])
    res = read_json(tmp_path / "run" / "train" / "ls" / "result.json")
    assert res["processes"] == 2 and res["steps"] == 3
    assert res["gradient_accumulation_steps"] == 2  # 8 = 2 per process x 2 processes x 2 micro-batches
    assert (tmp_path / "run" / "train" / "ls" / "adapter" / "adapter_config.json").exists()


def test_accelerate_configs_parse():
    import yaml

    folder = Path(__file__).resolve().parents[2] / "configs" / "accelerate"
    kinds = {}
    for p in folder.glob("*.yaml"):
        kinds[p.stem] = yaml.safe_load(p.read_text())["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "cpu2": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED",
                     "deepspeed_zero3": "DEEPSPEED", "fsdp2": "FSDP"}
    for name, stage in (("ds_zero2.json", 2), ("ds_zero3.json", 3)):
        assert json.loads((folder / name).read_text())["zero_optimization"]["stage"] == stage
