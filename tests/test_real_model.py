"""One real LoRA step and perplexity scoring on SmolLM2-135M-Instruct (the shipped GGUF)."""

import pytest

from ual.config import load_config
from ual.data.sources import load_gsm8k
from ual.io import read_json

pytestmark = pytest.mark.slow


def test_real_smollm2_scores_and_trains_one_step(tmp_path):
    from ual.scoring.perplexity import ModelUncertaintyScorer
    from ual.training.stage import train_one
    from ual.training.trainer import SmoothedDataset
    from ual.data.tokenize import encode_sample
    from ual.models import load_tokenizer

    samples = load_gsm8k()[0][:4]
    scores = ModelUncertaintyScorer("perplexity", "smollm2-135m", max_length=128, batch_size=4).score(samples)
    nll = [r.details["mean_nll"] for r in scores]
    # An instruct model of this size is far from perfect on GSM8K solutions, but far better than chance (ln 49152 = 10.8).
    assert all(0.1 < x < 6 for x in nll), nll
    assert max(r.score for r in scores) == 1.0

    cfg = load_config(None, {"run_dir": str(tmp_path), "train.max_steps": 1, "train.batch_size": 4})
    tok = load_tokenizer("smollm2-135m")
    encoded = [encode_sample(tok, s.messages, 128) for s in samples]
    result = train_one(cfg, "ual", SmoothedDataset(encoded, [0.0, 0.1, 0.2, 0.3]), tok, tmp_path / "train" / "ual")
    assert result["steps"] == 1
    assert 0.1 < result["train_loss"] < 8
    assert (tmp_path / "train" / "ual" / "adapter" / "adapter_model.safetensors").exists()
    log = read_json(tmp_path / "train" / "ual" / "log.json")
    assert any("loss" in h for h in log)
