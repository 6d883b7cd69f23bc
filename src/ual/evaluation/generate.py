"""Batched generation of answers to chat prompts, shared by every generative evaluation.

Prompts are rendered with the tokenizer's chat template (with the generation
prompt), sorted by length so each batch pads little, left-padded (a decoder
continues from the right end of its input), generated until an end token, and
only the new tokens are decoded. Answers come back in the order of `prompts`.

Greedy decoding is deterministic: the same prompts, model and batch size give
the same answers. Sampling is seeded (`seed`) without touching the caller's
global random state.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

log = logging.getLogger(__name__)


def render_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Token ids of each chat prompt, ending with the assistant generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; generation needs one to render chat prompts")
    ids = []
    for i, messages in enumerate(prompts):
        if not messages:
            raise ValueError(f"prompt {i} has no messages")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos and the model's generation eos(s)."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    if not ids:
        raise ValueError("neither the tokenizer nor the model names an end-of-sequence token")
    return sorted(ids)


def _until_stop(ids: list[int], stops: list[int]) -> list[int]:
    """The new tokens up to (not including) the first end token; padding after it goes too."""
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k]
    return ids


@contextmanager
def _seeded(seed: int, device):
    import torch

    devices = [device] if getattr(device, "type", "cpu") == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_answers(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
    progress: bool = True,
    top_p: float = 1.0,
) -> list[str] | list[list[str]]:
    """Answer each chat prompt; a list of strings, or of n strings each when n > 1.

    Sampling uses plain temperature sampling (top_p=1, no top-k) unless top_p is
    given, so the model's own generation defaults never change the meaning of a
    run. num_return_sequences > 1 requires do_sample (n greedy answers would be
    identical).
    """
    from transformers import GenerationConfig

    from ual.batching import inference_batches, pad_batch, pad_id

    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("batch_size, max_new_tokens and num_return_sequences must be >= 1")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy answers would repeat)")
    if not prompts:
        return []
    encoded = render_prompts(tokenizer, prompts)
    order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
    eos = stop_token_ids(model, tokenizer)
    pad = pad_id(tokenizer, fallback=eos[0])
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_return_sequences=num_return_sequences,
        eos_token_id=eos,
        pad_token_id=pad,
        **({"temperature": temperature, "top_p": top_p, "top_k": 0} if do_sample else {}),
    )
    device = next(model.parameters()).device
    answers: list = [None] * len(encoded)
    with _seeded(seed, device):
        for batch in inference_batches(model, order, batch_size, "generate", progress):
            input_ids, attention = pad_batch([encoded[i] for i in batch], pad, side="left")
            width = input_ids.shape[1]
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=config,
            )
            texts = tokenizer.batch_decode(
                [_until_stop(row, eos) for row in out[:, width:].tolist()], skip_special_tokens=True
            )
            for row, i in enumerate(batch):
                chunk = texts[row * num_return_sequences : (row + 1) * num_return_sequences]
                chunk = [t.strip() for t in chunk]
                answers[i] = chunk if num_return_sequences > 1 else chunk[0]
    return answers
