"""lm-evaluation-harness offline: local task YAMLs over files the test writes, base model and adapter."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")

from ual.evaluation.harness import run_harness, summarize_results, write_local_mc_task  # noqa: E402
from ual.evaluation.multiple_choice import evaluate_multiple_choice, load_packaged_mc  # noqa: E402


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    """The 24 shortest packaged MMLU questions, written in ual's local layout (answer as a letter)."""
    path = tmp_path_factory.mktemp("mc") / "mini_mc.jsonl"
    shortest = sorted(load_packaged_mc(), key=lambda q: len(q.question) + sum(map(len, q.choices)))[:24]
    with path.open("w") as fh:
        for q in shortest:
            fh.write(json.dumps({"question": q.question, "choices": q.choices, "answer": "ABCD"[q.answer]}) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) B, so it really changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(path)
    return path


def test_local_task_yaml_is_written(tmp_path, mc_file):
    import yaml

    path = write_local_mc_task(tmp_path, "mini", mc_file)
    config = yaml.safe_load(path.read_text())
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"
    rows = [json.loads(x) for x in (tmp_path / "mini.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and rows[0]["letters"] == ["A", "B", "C", "D"] and rows[0]["prompt"].endswith("Answer:")
    with pytest.raises(ValueError, match="style"):
        write_local_mc_task(tmp_path, "bad", mc_file, style="essay")


def test_summarize_results():
    raw = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1,
                             "exact_match,strict-match": 0.25, "x,none": "N/A"}}}
    assert summarize_results(raw) == {"t": {"acc": 0.5, "acc_stderr": 0.1, "exact_match[strict-match]": 0.25}}


def _ual_accuracy(model, tok, path):
    from ual.evaluation.multiple_choice import load_mc_file

    return evaluate_multiple_choice(model, tok, load_mc_file(path), n_samples=0, acc_norm=False,
                                    progress=False)["accuracy"]


def test_harness_matches_ual_scoring_with_and_without_adapter(tiny_model_dir, tokenizer, mc_file, adapter_dir):
    """lm-eval's letter accuracy equals ual's own scorer on the same prompt, base and base+LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = run_harness(str(tiny_model_dir), local_mc={"mini_mc": mc_file}, batch_size=8)
    tuned = run_harness(str(tiny_model_dir), adapter=adapter_dir, local_mc={"mini_mc": mc_file}, batch_size=8)
    assert base["n_samples"]["mini_mc"] == 24 and base["config"]["adapter"] is None
    acc_base, acc_tuned = base["results"]["mini_mc"]["acc"], tuned["results"]["mini_mc"]["acc"]
    assert "acc_norm" in base["results"]["mini_mc"] and "acc_stderr" in base["results"]["mini_mc"]

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert acc_base == pytest.approx(_ual_accuracy(model, tokenizer, mc_file))
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    assert acc_tuned == pytest.approx(_ual_accuracy(peft, tokenizer, mc_file))
    assert acc_base != acc_tuned  # the adapter was applied


def test_local_gsm8k_task_and_loaded_model(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "gsm.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [
        {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
        {"question": "What is 10 - 4?", "answer": "10 - 4 = 6\n#### 6"},
    ]) + "\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = run_harness(model, tokenizer=tokenizer, local_gsm8k={"mini_gsm8k": data}, batch_size=2,
                      gen_kwargs={"max_gen_toks": 8})
    row = out["results"]["mini_gsm8k"]
    assert set(row) >= {"exact_match[strict-match]", "exact_match[flexible-extract]"}
    assert row["exact_match[strict-match]"] == 0.0  # a random model does not write "#### 5"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: field 'answer'"):
        run_harness(model, tokenizer=tokenizer, local_gsm8k={"x": bad})
