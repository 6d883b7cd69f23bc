"""FSDP2 (`fully_shard`) with the chunked loss, on 2 CPU processes over gloo.

The chunked loss reads the output projection's weight after the model's forward. Under
FSDP2 that weight is a full tensor when it sits in the root unit (FSDP2 keeps the root
gathered from the forward to the backward) and a DTensor shard when the head is a unit of
its own, which `gather_output_projection` gathers with `FSDPModule.unshard()`. Either way
FSDP must reduce-scatter the weight gradient our loss writes.

accelerate turns FSDP on only over GPUs (on a CPU machine its FSDP config falls back to
plain data parallel), so the test shards the model itself the way accelerate's FSDP2 does
(`fully_shard` on every decoder layer, then on the root) and calls `UALTrainer.compute_loss`
on each process's half of the batch: the gradients must equal a 1-process full-logits step
over the whole batch.
"""

import os
import subprocess
import sys
import textwrap


# The script imports tests/tiny_models.py, so the tests folder (this file's parent) goes on its path.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + [p for p in [os.environ.get("PYTHONPATH")] if p])}

SCRIPT = textwrap.dedent('''
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from tiny_models import tiny_llama
    from transformers import TrainingArguments
    from ual.loss import shift_labels, smoothed_cross_entropy
    from ual.training.trainer import UALTrainer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def make(lora):
        model = tiny_llama(256, tie_word_embeddings=False)
        if lora:
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="gaussian",
                                                     target_modules=["q_proj", "v_proj"]))
        return model

    torch.manual_seed(1)
    ids = torch.randint(0, 256, (4, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 9:] = -100
    eps = torch.tensor([0.0, 0.6, 0.2, 0.9])
    total = int((shift_labels(labels) != -100).sum())
    args = TrainingArguments(output_dir="out", use_cpu=True, report_to="none")
    for tuning, head_unit in (("full", False), ("lora", False), ("full", True)):
        ref = make(tuning == "lora")
        smoothed_cross_entropy(ref(input_ids=ids).logits, shift_labels(labels), eps, num_items_in_batch=total).backward()

        model = make(tuning == "lora")
        lm = model.get_base_model() if tuning == "lora" else model
        for layer in lm.model.layers:  # what accelerate's FSDP2 does with TRANSFORMER_BASED_WRAP
            fully_shard(layer, mesh=mesh)
        if head_unit:
            fully_shard(lm.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        trainer = UALTrainer(model=model, args=args, loss_impl="chunked")
        assert trainer.accelerator.num_processes == world
        mine = slice(rank * 2, rank * 2 + 2)
        batch = {"input_ids": ids[mine], "attention_mask": torch.ones_like(ids[mine]), "labels": labels[mine],
                 "eps": eps[mine]}
        trainer.compute_loss(model, batch, num_items_in_batch=torch.tensor(total)).backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert set(grads) == set(want), sorted(set(grads) ^ set(want))
        head_grad = any("lm_head" in n for n in grads)
        worst = max(float((grads[n] - want[n]).abs().max() / (want[n].abs().max() + 1e-8)) for n in want)
        sharded = all(isinstance(p, DTensor) for p in model.parameters())
        if rank == 0:
            print("CASE", tuning, "head_unit" if head_unit else "head_in_root", worst, head_grad, sharded)
''')


def test_fsdp2_chunked_loss_equals_one_process(tmp_path):
    script = tmp_path / "fsdp2.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            _, tuning, where, worst, head_grad, sharded = line.split()
            cases[(tuning, where)] = (float(worst), head_grad == "True", sharded == "True")
    assert set(cases) == {("full", "head_in_root"), ("lora", "head_in_root"), ("full", "head_unit")}
    for (tuning, where), (worst, head_grad, sharded) in cases.items():
        assert sharded, (tuning, where)  # every parameter a DTensor shard again after the backward
        assert head_grad == (tuning == "full"), (tuning, where)  # the head's own gradient is part of the check
        assert worst < 1e-4, (tuning, where, worst)


def test_auto_loss_under_each_sharding():
    from transformers import LlamaConfig

    from ual.training.trainer import resolve_loss

    assert resolve_loss("auto", "fsdp2", LlamaConfig()) == "chunked"
    assert resolve_loss("auto", "fsdp", LlamaConfig()) == "naive"
    assert resolve_loss("auto", "zero3", LlamaConfig()) == "naive"
    assert resolve_loss("auto", "zero2", LlamaConfig()) == "chunked"


def test_sharding_from_env(monkeypatch):
    from ual.training.plan import sharding_from_env

    for var in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(var, raising=False)
    assert sharding_from_env() == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert sharding_from_env() == "fsdp"
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert sharding_from_env() == "fsdp2"
