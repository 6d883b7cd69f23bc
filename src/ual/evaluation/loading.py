"""The model `ual eval` evaluates under a name: the base model, a mode trained in the run folder, or a folder."""

from __future__ import annotations

from pathlib import Path

from ual.config import ExperimentConfig
from ual.runfolder import RunFolder, model_key


def load_for_eval(cfg: ExperimentConfig, name: str):
    """The base model, a trained mode, or a folder (LoRA adapter of cfg.model, or a whole model), merged."""
    from ual.models import load_model

    run = RunFolder(cfg.run_path)
    if name == "base":
        return load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    out = run.train_dir(name)
    if model_key(name) != name:  # a folder given by path (`ual eval --adapter DIR`)
        folder = Path(name)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such adapter or model folder")
        if not (folder / "adapter_config.json").exists():
            return load_model(str(folder), cfg.device, trust_remote_code=cfg.trust_remote_code)
        adapter = folder
    elif (out / "model").exists():
        return load_model(str(out / "model"), cfg.device, trust_remote_code=cfg.trust_remote_code)
    else:
        adapter = run.require(out / "adapter", "train")
    from peft import PeftModel

    base = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    # Merging makes generation as fast as the base model's.
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
