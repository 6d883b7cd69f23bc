"""`ual analyze`: analyses across models or scorers, each on its own.

    ual analyze clustering CONFIG_OR_RUN [--eval.models base,sft,ls,ual] [--eval.clustering_texts 64]
    ual analyze scores CONFIG_OR_RUN [--compare OTHER.jsonl,...]

clustering: the paper's feature-clustering analysis (§4, Table 5). For each model
(base, trained modes, or adapter folders) it takes the final hidden states (the input
of the output projection) on the run's held-out texts, each labelled with its next
token, and scores every pair of the K most frequent tokens (clustering.py). It writes
eval/features/MODEL.npz, clustering.json (per model: mean_all_pairs, its bootstrap
interval, the number of pairs) and clustering.png (PCA scatter plots of a few pairs,
models side by side). Features already collected on the same texts (by `ual eval` or an
earlier run of this command) are reused; --force recollects them.

scores: the scores report of the run's scores.jsonl (histograms per source, failures
with reasons) with the Spearman rank correlation and a scatter plot against each other
scorer: every scorer kept in the run's scores/ folder (each `ual score` run keeps its
own), or the scores.jsonl-style files given with --compare; and for each of them the
separation of every pair of sources (AUC of the scores, ratio of mean eps after the map
under each normalisation, at the config's target mean).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ual.runlock import run_folder_lock

log = logging.getLogger(__name__)

ANALYSES = ("clustering", "scores")


def add_arguments(p) -> None:
    from ual.config_flags import add_config_flags

    p.add_argument("analysis", choices=ANALYSES, help="which analysis")
    p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML experiment config or run folder")
    add_config_flags(p)
    p.add_argument("--force", action="store_true", help="clustering: recollect features that already exist")
    p.add_argument("--compare", help="scores: comma-separated scores files to compare with (default: every other "
                   "scorer kept in the run's scores/ folder)")


def run(args) -> dict:
    from ual.config import split_commas
    from ual.config_flags import config_from_args

    cfg = config_from_args(args)
    with run_folder_lock(cfg.run_path):  # both write into the run folder
        if args.analysis == "scores":
            return analyze_scores(cfg, split_commas(args.compare) if args.compare else None)
        return analyze_clustering(cfg, force=args.force)


def analyze_scores(cfg, compare_with: list[str] | None = None) -> dict:
    from ual.runfolder import RunFolder
    from ual.scoring.stage import write_scores_report

    run = RunFolder(cfg.run_path)
    run.require(run.scores, "score")
    for other in compare_with or []:
        if not Path(other).exists():
            raise FileNotFoundError(f"--compare {other}: no such file")
    report = write_scores_report(run, compare_with=compare_with, smoothing=cfg.smoothing)
    return {"scores_report": str(run.scores_report / "scores_report.json"),
            "failures": report["failures"], "rank_correlation": report["rank_correlation"],
            "separation": report["separation"]}


def analyze_clustering(cfg, force: bool = False) -> dict:
    from ual.evaluation.clustering import collect_features
    from ual.evaluation.stage import clustering_texts, load_for_eval, run_clustering, save_features, texts_fingerprint
    from ual.runfolder import model_key
    from ual.models import load_tokenizer
    from ual.runfolder import RunFolder

    run = RunFolder(cfg.run_path)
    ec = cfg.eval
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.chat_template)
    texts = clustering_texts(run.load_samples("heldout"), tokenizer, ec.clustering_texts)
    if not texts:
        raise ValueError(f"{run.heldout}: no held-out samples to cluster")
    fingerprint = texts_fingerprint(texts)
    for name in ec.models:
        path = run.features_file(model_key(name))
        if path.exists() and not force:
            with np.load(path) as data:
                if "texts_sha" in data and str(data["texts_sha"]) == fingerprint:
                    log.info("%s: features on the same %d texts exist; reused", model_key(name), len(texts))
                    continue
        model = load_for_eval(cfg, name)
        features, labels = collect_features(model, tokenizer, texts, cfg.data.max_length, ec.batch_size,
                                            progress=True)
        save_features(path, features, labels, texts)
        del model
    return run_clustering(cfg, tokenizer, run, texts)
