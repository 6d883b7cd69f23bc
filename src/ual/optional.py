"""Optional dependencies: import one, or fail with one line that says what to install.

`make demo` installs the package alone; the extras in pyproject.toml add lm-evaluation-harness
(`eval`), TRL and TensorBoard (`trl`) and llama.cpp's server (`judge-server`). Every code path that
needs one of them imports it through `require`, so a missing one is a `MissingExtra` naming the
extra, never a bare ModuleNotFoundError from deep inside a stage.
"""

from __future__ import annotations

import importlib

# top-level module -> how to install it
INSTALL = {
    "lm_eval": "pip install 'ual[eval]'",
    "trl": "pip install 'ual[trl]'",
    "tensorboard": "pip install 'ual[trl]'",
    "llama_cpp": "pip install 'ual[judge-server]'",
    "deepspeed": "pip install 'ual[deepspeed]'",
    "wandb": "pip install wandb",
    "trackio": "pip install trackio",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed (or cannot be imported); the message says what to do."""


def require(module: str, purpose: str):
    """Import `module` (e.g. "lm_eval" or "lm_eval.tasks") for `purpose`, or raise MissingExtra."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        install = INSTALL.get(top, f"pip install {top}")
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == top:
            raise MissingExtra(f"{purpose} needs the optional package {top}: {install}") from None
        # installed, but one of its own imports fails: say so, still on one line
        raise MissingExtra(f"{purpose} needs {top}, which is installed but fails to import "
                           f"({type(exc).__name__}: {exc}); reinstall it: {install}") from None
