"""`ual export-data`: a run's training samples with their uncertainty columns, as a dataset for any trainer.

    ual export-data runs/demo --format parquet --out demo.parquet
    ual export-data runs/demo --format hf --out demo_hf          # datasets.load_from_disk
    ual export-data runs/demo --format jsonl --out demo.jsonl --weight-column quality

One row per training sample, in samples.jsonl order, with the columns
  messages  [{role, content}, ...]   the conversation, as `ual data` normalised it
  source, id                         the data source's label and the sample's content id
  score, u, eps                      from smoothing.jsonl (`ual score`, then `ual map`): the raw
                                     uncertainty, its normalised u in [0, 1], the label smoothing
  weight                             the loss weight (train.weight_column of the run's config, or
                                     --weight-column; 1.0 without one), checked as `ual train` checks it
so people who train with TRL (`ual.training.trl.UALSFTTrainer` reads the eps and weight columns),
axolotl or LLaMA-Factory can use ual's scoring with their own trainer. Samples that `ual map`
dropped (smoothing.missing: drop) are left out, as `ual train` leaves them out; score and u are
null for samples given the mean eps (smoothing.missing: mean).

The output is written under a temporary name and renamed into place, so a crash never leaves a
half-written dataset, and an existing output is never replaced unless --force.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

from ual.io import atomic_path, iter_jsonl, write_jsonl
from ual.runfolder import RunFolder
from ual.runlock import run_folder_lock
from ual.training.columns import mapped_indices, read_smoothing, sample_weights, smoothing_rows

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "hf")
COLUMNS = ("messages", "source", "id", "score", "u", "eps", "weight")


def add_arguments(p) -> None:
    p.add_argument("config_file", metavar="RUN", help="run folder (or its experiment config) with samples.jsonl "
                   "and smoothing.jsonl")
    p.add_argument("--format", default="jsonl", choices=FORMATS,
                   help="jsonl (one JSON object a line), parquet, or hf (a datasets folder: load_from_disk)")
    p.add_argument("--out", required=True, help="output file (jsonl, parquet) or folder (hf)")
    p.add_argument("--weight-column", help="meta field giving each sample's loss weight (default: the run's "
                   "train.weight_column; none: weight 1.0)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> dict:
    from ual.config import load_config

    # The CLI resolves a run folder given as RUN to its config.yaml (args.config) and records the
    # folder itself (cfg:run_dir), which wins over the run_dir inside (the folder may have moved).
    run_dir = getattr(args, "cfg:run_dir", None)
    cfg = load_config(args.config or args.config_file, {"run_dir": run_dir} if run_dir else None)
    with run_folder_lock(cfg.run_path):  # what it reads is not rewritten meanwhile
        return export_data(RunFolder(cfg.run_path), args.format, args.out, weight_column=args.weight_column or
                           cfg.train.weight_column, missing=cfg.smoothing.missing, force=args.force)


def training_rows(run: RunFolder, weight_column: str | None = None, missing: str = "error"):
    """The exported rows (COLUMNS), in samples.jsonl order, one at a time (a million samples are never held
    as rows). missing: the run's smoothing.missing ("drop": the samples `ual map` left out are left out here too).
    Every column is checked before the first row is yielded, so a bad weight or a missing eps writes nothing."""
    from ual.training.columns import sample_ids

    table, weights = read_smoothing(run), sample_weights(run, weight_column)
    ids = sample_ids(run)
    keep = mapped_indices(ids, table) if missing == "drop" else range(len(ids))
    rows = smoothing_rows(run, [ids[i] for i in keep], table)  # raises if a kept sample has no eps
    del ids
    eps, score, u = (rows[c].to_numpy() for c in ("eps", "score", "u"))
    wanted = iter(keep)
    want, k = next(wanted, None), 0
    for position, (_, row) in enumerate(iter_jsonl(run.samples)):
        if position != want:
            continue
        yield {"messages": row["messages"], "source": row["source"], "id": row["id"], "score": _number(score[k]),
               "u": _number(u[k]), "eps": float(eps[k]), "weight": float(weights[position]) if weights is not None
               else 1.0}
        want, k = next(wanted, None), k + 1


def _number(x) -> float | None:
    return None if x is None or x != x else float(x)  # NaN: a null in smoothing.jsonl


def export_data(run: RunFolder, fmt: str, out, weight_column: str | None = None, missing: str = "error",
                force: bool = False) -> dict:
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not force:
        raise ValueError(f"{out} exists; pass --force to replace it")
    rows = training_rows(run, weight_column, missing)
    first = next(rows, None)  # the checks run here, before anything is written
    if first is None:
        raise ValueError(f"{run.samples}: no training samples to export")
    totals = {"samples": 0, "eps": 0.0, "weight": 0.0}

    def counted():
        for row in itertools.chain([first], rows):
            totals["samples"] += 1
            totals["eps"] += row["eps"]
            totals["weight"] += row["weight"]
            yield row

    with atomic_path(out, folder=fmt == "hf") as tmp:
        if fmt == "jsonl":
            write_jsonl(tmp, counted())
        else:
            import tempfile
            import uuid

            from datasets import Dataset, Features, Value

            text, number = Value("string"), Value("float64")
            features = Features({"messages": [{"role": text, "content": text}], "source": text, "id": text,
                                 "score": number, "u": number, "eps": number, "weight": number})
            with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=f".{out.name}.cache-") as cache:
                # written to Arrow in batches; the fingerprint is fresh, the rows are read once
                dataset = Dataset.from_generator(counted, features=features, cache_dir=cache,
                                                 fingerprint=uuid.uuid4().hex)
                dataset.to_parquet(str(tmp)) if fmt == "parquet" else dataset.save_to_disk(str(tmp))
                del dataset
    n = totals["samples"]
    log.info("export-data: %d samples -> %s (%s)", n, out, fmt)
    return {"out": str(out), "format": fmt, "samples": n, "columns": list(COLUMNS), "weight_column": weight_column,
            "mean_eps": totals["eps"] / n, "mean_weight": totals["weight"] / n}
