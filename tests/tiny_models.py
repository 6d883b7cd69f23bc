"""The tiny random causal LM of the fast tests: one set of sizes, built from a config (no download).

`tiny_llama_config(vocab_size, **overrides)` gives the config fields, so a test can build a Llama,
or another architecture with the same sizes (a Gemma-3 with soft-capping), or pass them to a
subprocess; tests/conftest.py saves one with SmolLM2's vocabulary as the `tiny_model_dir` fixture.
"""

from __future__ import annotations

TINY_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=1024)


def tiny_llama_config(vocab_size: int, **overrides) -> dict:
    return {"vocab_size": vocab_size, **TINY_SIZES, **overrides}


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A LlamaForCausalLM with random weights drawn from `seed`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**tiny_llama_config(vocab_size, **overrides)))
