"""`ual export`: a LoRA adapter merged into a standalone model folder gives the same logits as base + adapter."""

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from ual.cli import main
from ual.io import read_json


def _adapter(tiny_model_dir, folder):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # lora_B starts at zero; make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def test_merged_logits_equal_base_plus_adapter(tmp_path, tiny_model_dir, tokenizer):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {tiny_model_dir}\n")
    adapter = _adapter(tiny_model_dir, tmp_path / "run" / "train" / "ual" / "adapter")
    assert main(["export", str(cfg), "--mode", "ual"]) == 0
    out = tmp_path / "run" / "export" / "ual"
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    assert read_json(out / "ual_export.json")["adapter"] == str(adapter)

    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    assert not torch.allclose(plain, peft, atol=1e-3)  # the adapter matters
    assert torch.allclose(merged, peft, atol=1e-4), (merged - peft).abs().max()

    # Never overwrites without --force; --adapter/--base works without a config.
    assert main(["export", str(cfg), "--mode", "ual"]) == 2
    other = tmp_path / "merged2"
    assert main(["export", "--adapter", str(adapter), "--base", str(tiny_model_dir), "--out", str(other)]) == 0
    assert (other / "model.safetensors").exists() or any(other.glob("*.safetensors"))
    assert main(["export", str(cfg), "--mode", "sft"]) == 2  # no such adapter: clear error


def test_export_from_a_run_folder_even_moved(tmp_path, tiny_model_dir):
    """`ual export RUN_FOLDER --mode M --out DIR` (it crashed reading the folder as a config file); a
    run folder moved elsewhere still finds its own adapter, not the one its config.yaml names."""
    import shutil

    run = tmp_path / "run"
    _adapter(tiny_model_dir, run / "train" / "ual" / "adapter")
    (run / "config.yaml").write_text(f"run_dir: {run}\nmodel: {tiny_model_dir}\n")
    assert main(["export", str(run), "--mode", "ual", "--out", str(tmp_path / "m1")]) == 0
    assert read_json(tmp_path / "m1" / "ual_export.json")["adapter"] == str(run / "train" / "ual" / "adapter")
    moved = tmp_path / "moved"
    shutil.move(run, moved)
    assert main(["export", str(moved), "--mode", "ual", "--out", str(tmp_path / "m2")]) == 0
    assert read_json(tmp_path / "m2" / "ual_export.json")["adapter"] == str(moved / "train" / "ual" / "adapter")
