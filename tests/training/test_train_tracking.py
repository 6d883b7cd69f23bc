"""Tracking through the Trainer's report_to: TensorBoard by default when it is installed."""

import importlib.util
import json

import pytest

from ual.cli import main
from ual.training.stage import resolve_report_to


def test_auto_means_tensorboard_when_installed():
    has_tb = importlib.util.find_spec("tensorboard") is not None
    assert resolve_report_to("auto") == ("tensorboard" if has_tb else "none")
    assert resolve_report_to("wandb") == "wandb" and resolve_report_to("none") == "none"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_training_writes_tensorboard_events(tmp_path, tiny_model_dir):
    chat = tmp_path / "c.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": f"answer {i}"}]})
                              for i in range(4)) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {tiny_model_dir}\n"
                   f"data: {{max_length: 96, sources: [{{name: {chat}}}]}}\n"
                   "train: {modes: [sft], max_steps: 2, batch_size: 2}\n")  # report_to: auto (the default)
    assert main(["data", str(cfg)]) == 0 and main(["train", str(cfg)]) == 0
    events = list((tmp_path / "run" / "train" / "sft").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
