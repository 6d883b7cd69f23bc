"""`ual export`: merge a trained LoRA adapter into its base model, as a standalone model folder.

    ual export CONFIG --mode ual --out models/lima-ual        # adapter of runs/NAME/train/ual
    ual export runs/lima --mode ual --out models/lima-ual     # the same, from the run folder
    ual export --adapter runs/x/train/ual/adapter --base meta-llama/Llama-2-7b-hf --out merged/

The folder loads with `AutoModelForCausalLM.from_pretrained(out)` (and vLLM, lm-eval,
...), with no peft. The weights are W + (alpha / r) * B A, computed by peft's
`merge_and_unload`; the tokenizer is saved beside them. The folder is written to a
temporary name and renamed, so a crash never leaves a half-written model, and an
existing folder is never overwritten unless --force.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p) -> None:
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="experiment config of the run (gives the base model and run folder)")
    p.add_argument("--config", help="same as CONFIG")
    p.add_argument("--mode", default="ual", help="trained mode whose adapter to merge (default: ual)")
    p.add_argument("--adapter", help="adapter folder (instead of CONFIG + --mode)")
    p.add_argument("--base", help="base model id, folder or alias (default: the config's model)")
    p.add_argument("--out", help="output folder (default: RUN/export/MODE)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of the saved weights (auto: the base model's)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")


def run(args) -> dict:
    from ual.config import load_config
    from ual.runfolder import RunFolder

    # The CLI resolves a run folder given as CONFIG to its config.yaml (args.config) and
    # records the folder itself, which wins over the run_dir inside (the folder may have moved).
    cfg_path = args.config or args.config_file
    run_dir = getattr(args, "cfg:run_dir", None)
    if args.adapter:
        adapter = Path(args.adapter)
        base = args.base or (load_config(cfg_path).model if cfg_path else None)
        if base is None:
            raise ValueError("--adapter needs --base (or a CONFIG naming the model)")
        out = Path(args.out) if args.out else adapter.parent / "merged"
    else:
        if not cfg_path:
            raise ValueError("give a CONFIG (with --mode) or --adapter and --base")
        cfg = load_config(cfg_path, {"run_dir": run_dir} if run_dir else None)
        run_folder = RunFolder(cfg.run_path)
        adapter = run_folder.require(run_folder.train_dir(args.mode) / "adapter", "train")
        base = args.base or cfg.model
        out = Path(args.out) if args.out else cfg.run_path / "export" / args.mode
    return merge_adapter(base, adapter, out, dtype=args.dtype, force=args.force)


def merge_adapter(base: str, adapter: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto",
                  force: bool = False, trust_remote_code: bool = False) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ual.io import atomic_path, write_json
    from ual.models import load_tokenizer, resolve_model

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json (not a LoRA adapter folder; a full "
                                "fine-tune is already a standalone model folder)")
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    log.info("export: merging %s into %s", adapter, base)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch_dtype,
                                                 trust_remote_code=trust_remote_code)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tok_src = str(adapter) if (adapter / "tokenizer_config.json").exists() else base
    tokenizer = load_tokenizer(tok_src, trust_remote_code)

    with atomic_path(out, folder=True) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"base": base, "adapter": str(adapter), "dtype": str(next(merged.parameters()).dtype),
                "parameters": sum(p.numel() for p in merged.parameters())}
        write_json(tmp / "ual_export.json", info)
    return {"out": str(out), **info}
