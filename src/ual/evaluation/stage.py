"""The `ual eval` stage: evaluate the base model and each trained mode on held-out data.

Per model it writes eval/MODEL.json with
  nll:   token-weighted mean NLL of held-out responses, per data source
  maths: GSM8K final-answer exact match (greedy) on held-out maths samples
A model whose eval file exists is skipped on rerun (delete it or use --force).
"""

from __future__ import annotations

import logging
import time

from ual.config import ExperimentConfig
from ual.io import read_json, write_json, write_jsonl
from ual.runfolder import RunFolder

log = logging.getLogger(__name__)

MATHS_SOURCES = ("gsm8k", "metamath")


def load_for_eval(cfg: ExperimentConfig, name: str):
    """The base model, or the base model with a trained mode's adapter merged in."""
    from ual.models import load_model

    run = RunFolder(cfg.run_path)
    if name == "base":
        return load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    out = run.train_dir(name)
    if (out / "model").exists():
        return load_model(str(out / "model"), cfg.device, trust_remote_code=cfg.trust_remote_code)
    adapter = run.require(out / "adapter", "train")
    from peft import PeftModel

    base = load_model(cfg.model, cfg.device, trust_remote_code=cfg.trust_remote_code)
    # Merging makes generation as fast as the base model's.
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()


def run_eval(cfg: ExperimentConfig, force: bool = False) -> dict:
    from ual.evaluation.nll import nll_by_source, sample_nll
    from ual.models import load_tokenizer

    run = RunFolder(cfg.run_path)
    heldout = run.load_samples("heldout")
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    ec = cfg.eval
    maths = [s for s in heldout if s.source in MATHS_SOURCES and "answer" in s.meta]
    if ec.gsm8k_limit is not None:
        maths = maths[: ec.gsm8k_limit]
    results = {}
    for name in ec.models:
        path = run.eval_file(name)
        if path.exists() and not force:
            log.info("eval/%s.json exists; skipping", name)
            results[name] = read_json(path)
            continue
        start = time.time()
        model = load_for_eval(cfg, name)
        metrics: dict = {"model": name}
        if ec.nll and heldout:
            per_sample = sample_nll(model, tokenizer, heldout, cfg.data.max_length, ec.batch_size,
                                    cfg.data.train_on_prompt, desc=f"NLL {name}")
            metrics["nll"] = nll_by_source(heldout, per_sample)
        if ec.gsm8k and maths:
            from ual.evaluation.maths import evaluate_maths

            res = evaluate_maths(model, tokenizer, maths, batch_size=ec.batch_size, max_new_tokens=ec.max_new_tokens)
            records = res.pop("records", [])
            write_jsonl(run.root / "eval" / f"{name}.maths.jsonl", records)
            metrics["maths"] = res
        metrics["seconds"] = time.time() - start
        write_json(path, metrics)
        results[name] = metrics
        del model
    return results
