"""ual.token_stats beyond the scorers' tests (tests/scoring/test_scoring_entropy.py): the model's mode."""

from ual.sample import Sample
from ual.token_stats import response_token_stats


def test_a_model_in_train_mode_is_in_train_mode_afterwards(tiny_model_dir, tokenizer):
    from ual.models import load_model

    model = load_model(str(tiny_model_dir), "cpu").train()
    samples = [Sample.create("chat", [{"role": "user", "content": "What is 2 + 3?"},
                                      {"role": "assistant", "content": "2 + 3 = 5."}])]
    (stats,) = response_token_stats(model, tokenizer, samples, 64, batch_size=1)
    assert stats.tokens > 0 and stats.nll > 0
    assert model.training and all(m.training for m in model.modules())
