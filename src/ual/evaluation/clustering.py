"""Feature clustering (paper §4, Table 5; docs/method.md §7): do same-next-token features cluster?

1. `collect_features`: run held-out texts through the model; at every position
   take the final hidden state, i.e. the input of the output projection
   (lm_head), labelled with the token that follows. In transformers >= 4.4x
   (checked here on 5.x for Llama) `hidden_states[-1]` is the decoder output
   *after* the final norm, exactly what lm_head multiplies; a test checks this
   against a hook on lm_head.
2. `silhouette_pairs`: the K most frequent next tokens, every one of the
   K(K-1)/2 pairs, a 2-component PCA fitted on that pair's features and the
   silhouette coefficient of the two tokens in that plane. The headline is the
   mean over ALL pairs with a bootstrap 95% interval (over pairs; pairs share
   tokens so the interval is optimistic). The paper reported 100 pairs picked by
   the best UAL/LS ratio out of 861; a selection like that appears only under
   the separately named `selection` field, declared with its rule.
3. `plot_pairs`: PCA scatter plots of a few pairs, one column per model.
4. `clustering_report`: all of it for several models on the same texts, the
   content of clustering.json.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np


def collect_features(model, tokenizer, texts: list[str], max_length: int = 256, batch_size: int = 8,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, H) float32, next_token_ids (N,) int64) over every position that has a next token."""
    from ual.batching import inference_batches, pad_batch, pad_id

    encoded = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
               for t in texts]
    encoded = [e for e in encoded if len(e) >= 2]
    if not encoded:
        raise ValueError("no text has two or more tokens")
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    feats, labels = [], []
    for idx in inference_batches(model, range(len(encoded)), batch_size, "features", progress):
        batch = [encoded[i] for i in idx]
        ids, mask = pad_batch(batch, pad)
        kwargs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
        try:  # skip computing logits for every position when the model allows it
            out = model(**kwargs, logits_to_keep=1)
        except TypeError:
            out = model(**kwargs)
        hidden = out.hidden_states[-1].float().cpu()
        for r, e in enumerate(batch):
            feats.append(hidden[r, : len(e) - 1].numpy())
            labels.append(np.asarray(e[1:], dtype=np.int64))
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels)


def top_tokens(labels: np.ndarray, top_k: int, min_count: int = 2) -> list[int]:
    """The top_k most frequent labels (ties broken by id) seen at least min_count times."""
    counts = Counter(labels.tolist())
    ranked = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return ranked[:top_k]


def _pair_points(features, labels, a, b, max_per_token, seed):
    """The features of tokens a and b, each subsampled to max_per_token with a seed fixed per token."""
    parts, ys = [], []
    for tok, y in ((a, 0), (b, 1)):
        idx = np.flatnonzero(labels == tok)
        if max_per_token and len(idx) > max_per_token:
            idx = np.sort(np.random.default_rng([seed, int(tok)]).choice(idx, max_per_token, replace=False))
        parts.append(features[idx])
        ys.append(np.full(len(idx), y))
    return np.concatenate(parts), np.concatenate(ys)


def pair_silhouette(features, labels, a, b, max_per_token=200, seed=0, return_points=False):
    """Silhouette of tokens a vs b in the 2-D PCA plane of their features."""
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    x, y = _pair_points(features, labels, a, b, max_per_token, seed)
    z = PCA(n_components=2, random_state=seed).fit_transform(x.astype(np.float64))
    score = float(silhouette_score(z, y))
    return (score, z, y) if return_points else score


def bootstrap_ci(values, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def silhouette_pairs(features: np.ndarray, labels: np.ndarray, top_k: int = 42, max_per_token: int = 200,
                     seed: int = 0, n_boot: int = 1000, tokens: list[int] | None = None) -> dict:
    """Silhouette of every pair of the top_k most frequent next tokens, and their mean with a 95% CI."""
    tokens = list(tokens) if tokens is not None else top_tokens(labels, top_k)
    if len(tokens) < 2:
        raise ValueError("fewer than two tokens occur twice or more: no pairs to compare")
    pairs = [{"a": int(a), "b": int(b), "silhouette": pair_silhouette(features, labels, a, b, max_per_token, seed)}
             for a, b in itertools.combinations(tokens, 2)]
    values = [p["silhouette"] for p in pairs]
    lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
    return {
        "mean_all_pairs": float(np.mean(values)),
        "ci_low": lo,
        "ci_high": hi,
        "n_pairs": len(pairs),
        "top_k": len(tokens),
        "tokens": [int(t) for t in tokens],
        "token_counts": [int((labels == t).sum()) for t in tokens],
        "max_per_token": max_per_token,
        "pairs": pairs,
    }


def select_by_ratio(numerator: dict, denominator: dict, n: int = 100) -> list[tuple[int, int]]:
    """The paper's selection: the n pairs with the highest silhouette ratio numerator/denominator."""
    den = {(p["a"], p["b"]): p["silhouette"] for p in denominator["pairs"]}
    ratios = [((p["a"], p["b"]), p["silhouette"] / den[(p["a"], p["b"])])
              for p in numerator["pairs"] if den.get((p["a"], p["b"]), 0) > 0]
    ratios.sort(key=lambda kv: (-kv[1], kv[0]))
    return [pair for pair, _ in ratios[:n]]


def plot_pairs(collected: dict, pairs: list[tuple[int, int]], tokenizer, path, max_per_token: int = 200,
               seed: int = 0) -> str:
    """One PNG: a row per token pair, a column per model, each a PCA scatter of the two tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ual.io import atomic_open

    names = list(collected)
    fig, axes = plt.subplots(len(pairs), len(names), figsize=(3.2 * len(names), 3.0 * len(pairs)), squeeze=False)
    for r, (a, b) in enumerate(pairs):
        for c, name in enumerate(names):
            feats, labels = collected[name]
            score, z, y = pair_silhouette(feats, labels, a, b, max_per_token, seed, return_points=True)
            ax = axes[r][c]
            for val, tok, color in ((0, a, "tab:blue"), (1, b, "tab:orange")):
                ax.scatter(z[y == val, 0], z[y == val, 1], s=6, alpha=0.6, color=color,
                           label=repr(tokenizer.decode([tok])))
            ax.set_title(f"{name}: silhouette {score:.3f}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=90)
    plt.close(fig)
    return str(path)


def clustering_report(models: dict, texts: list[str], max_length: int = 256, batch_size: int = 8, top_k: int = 42,
                      max_per_token: int = 200, seed: int = 0, n_boot: int = 1000, plot_path=None,
                      n_plot_pairs: int = 3, selection: tuple[str, str, int] | None = None,
                      progress: bool = False) -> dict:
    """clustering.json content for {name: (model, tokenizer)} on the same held-out texts.

    Every model is scored on the same tokens and pairs (the K most frequent
    next tokens of the texts). `selection=(num, den, n)` adds, under a separate
    declared field, each model's mean over the n pairs with the best num/den
    silhouette ratio (the paper's choice: ("ual", "ls", 100)).
    """
    collected = {name: collect_features(m, tok, texts, max_length, batch_size, progress)
                 for name, (m, tok) in models.items()}
    tokenizer = next(iter(models.values()))[1]
    return clustering_from_features(collected, tokenizer, top_k, max_per_token, seed, n_boot, plot_path,
                                    n_plot_pairs, selection, n_texts=len(texts), max_length=max_length)


def clustering_from_features(collected: dict, tokenizer, top_k: int = 42, max_per_token: int = 200, seed: int = 0,
                             n_boot: int = 1000, plot_path=None, n_plot_pairs: int = 3,
                             selection: tuple[str, str, int] | None = None, n_texts: int | None = None,
                             max_length: int | None = None) -> dict:
    """clustering.json content from {name: (features, next_token_ids)} collected on the same texts
    (one model at a time, so only one model need be in memory)."""
    first = next(iter(collected.values()))[1]
    for name, (_, labels) in collected.items():
        if not np.array_equal(labels, first):
            raise ValueError(f"model {name!r} tokenises the texts differently; clustering needs one tokenizer")
    tokens = top_tokens(first, top_k)
    results = {name: silhouette_pairs(f, l, top_k, max_per_token, seed, n_boot, tokens=tokens)
               for name, (f, l) in collected.items()}
    report = {
        "models": {name: {k: r[k] for k in ("mean_all_pairs", "ci_low", "ci_high", "n_pairs", "top_k")}
                   for name, r in results.items()},
        "settings": {"n_texts": n_texts, "n_positions": int(len(first)), "max_length": max_length,
                     "top_k": top_k, "max_per_token": max_per_token, "seed": seed, "n_boot": n_boot,
                     "feature": "final hidden state (input of lm_head), labelled with the next token"},
        "tokens": tokens,
        "token_counts": next(iter(results.values()))["token_counts"],
        "token_strings": [tokenizer.decode([t]) for t in tokens],
        "pairs": {name: [p["silhouette"] for p in r["pairs"]] for name, r in results.items()},
        "pair_ids": [[p["a"], p["b"]] for p in next(iter(results.values()))["pairs"]],
    }
    if selection is not None:
        num, den, n = selection
        chosen = set(select_by_ratio(results[num], results[den], n))
        report["selection"] = {
            "rule": f"the {len(chosen)} pairs with the highest {num}/{den} silhouette ratio (the paper's selection; "
                    "biased towards the numerator by construction)",
            "mean": {name: float(np.mean([p["silhouette"] for p in r["pairs"] if (p["a"], p["b"]) in chosen]))
                     for name, r in results.items()},
        }
    if plot_path is not None:
        shown = list(itertools.combinations(tokens, 2))[:n_plot_pairs]
        report["plot"] = plot_pairs(collected, shown, tokenizer, plot_path, max_per_token, seed)
    return report
