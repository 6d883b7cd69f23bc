"""Feature clustering: the features are lm_head's input, silhouettes over all pairs, the report."""

from __future__ import annotations

import numpy as np
import pytest

from ual.evaluation.clustering import (
    bootstrap_ci,
    clustering_report,
    collect_features,
    pair_silhouette,
    select_by_ratio,
    silhouette_pairs,
    top_tokens,
)

TEXTS = [
    "The cat sat on the mat. The dog sat on the log. The cat and the dog are friends.",
    "In the morning the sun rises, and in the evening the sun sets over the hills.",
    "One, two, three, four, five, six, seven, eight, nine, ten. The end of the list.",
    "Hi",
    "A",  # one token: no next-token position, skipped
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer


def test_features_are_the_input_of_lm_head(tiny):
    """hidden_states[-1] must equal what lm_head multiplies (after the final norm)."""
    import torch

    model, tok = tiny
    feats, labels = collect_features(model, tok, TEXTS, max_length=64, batch_size=2)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert feats.dtype == np.float32 and feats.shape == (sum(len(i) - 1 for i in ids if len(i) >= 2), 32)
    assert labels.tolist() == [t for i in ids if len(i) >= 2 for t in i[1:]]
    captured = []
    handle = model.lm_head.register_forward_pre_hook(lambda m, args: captured.append(args[0][0].detach()))
    try:
        with torch.no_grad():
            for i in ids:
                if len(i) >= 2:
                    model(torch.tensor([i]))
    finally:
        handle.remove()
    want = torch.cat([c[:-1] for c in captured]).numpy()
    np.testing.assert_allclose(feats, want, atol=1e-5)
    # and it is after the final norm: not the last decoder layer's raw output
    raw = []
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, args, out: raw.append((out[0] if isinstance(out, tuple) else out).detach()))
    try:
        with torch.no_grad():
            model(torch.tensor([ids[0]]))
    finally:
        handle.remove()
    pre_norm = raw[0][0, :-1].numpy()
    assert pre_norm.shape == feats[: len(ids[0]) - 1].shape
    assert not np.allclose(pre_norm, feats[: len(ids[0]) - 1], atol=1e-3)
    np.testing.assert_allclose(model.model.norm(raw[0])[0, :-1].detach().numpy(), feats[: len(ids[0]) - 1], atol=1e-5)


def test_features_through_a_peft_adapter(tiny):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    import copy

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    feats, labels = collect_features(peft_model, tok, TEXTS[:2], max_length=32)
    base, base_labels = collect_features(model, tok, TEXTS[:2], max_length=32)
    np.testing.assert_array_equal(labels, base_labels)
    np.testing.assert_allclose(feats, base, atol=1e-5)  # LoRA B starts at zero: same features
    assert peft_model.training  # mode restored


def test_truncation_to_max_length(tiny):
    model, tok = tiny
    feats, labels = collect_features(model, tok, [TEXTS[0]], max_length=5)
    assert len(labels) == 4


def test_top_tokens_ranks_by_count_then_id():
    labels = np.array([5, 5, 5, 2, 2, 9, 9, 1, 7])
    assert top_tokens(labels, 3) == [5, 2, 9]
    assert top_tokens(labels, 10) == [5, 2, 9]  # singletons cannot form a cluster


def _blobs(k, n, spread, seed=0, dim=8):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * 10
    feats = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c in centers]).astype(np.float32)
    labels = np.repeat(np.arange(100, 100 + k), n)
    return feats, labels


def test_silhouette_separated_vs_mixed_clusters():
    tight = silhouette_pairs(*_blobs(5, 40, 0.1), top_k=5, max_per_token=30)
    mixed = silhouette_pairs(*_blobs(5, 40, 100.0), top_k=5, max_per_token=30)
    assert tight["n_pairs"] == 10 and tight["top_k"] == 5 and len(tight["pairs"]) == 10
    assert tight["mean_all_pairs"] > 0.9 and abs(mixed["mean_all_pairs"]) < 0.15
    assert tight["ci_low"] <= tight["mean_all_pairs"] <= tight["ci_high"]
    assert tight["mean_all_pairs"] == pytest.approx(np.mean([p["silhouette"] for p in tight["pairs"]]))


def test_pair_silhouette_matches_sklearn_in_the_pca_plane():
    from sklearn.decomposition import PCA
    from sklearn.metrics import silhouette_score

    feats, labels = _blobs(2, 25, 3.0, seed=3)
    x = feats.astype(np.float64)
    y = (labels == 101).astype(int)
    want = silhouette_score(PCA(n_components=2).fit_transform(x), y)
    assert pair_silhouette(feats, labels, 100, 101, max_per_token=None) == pytest.approx(want, abs=1e-9)


def test_subsampling_is_seeded():
    feats, labels = _blobs(3, 300, 5.0)
    a = silhouette_pairs(feats, labels, top_k=3, max_per_token=50, seed=1)
    b = silhouette_pairs(feats, labels, top_k=3, max_per_token=50, seed=1)
    c = silhouette_pairs(feats, labels, top_k=3, max_per_token=50, seed=2)
    assert a == b and a["pairs"] != c["pairs"]


def test_bootstrap_ci_brackets_the_mean():
    vals = np.random.default_rng(0).normal(0.4, 0.1, size=500)
    lo, hi = bootstrap_ci(vals, n_boot=500)
    assert lo < vals.mean() < hi and hi - lo < 0.03
    assert bootstrap_ci([0.3] * 10) == pytest.approx((0.3, 0.3))


def test_select_by_ratio_picks_the_best_ratios():
    num = {"pairs": [{"a": 1, "b": 2, "silhouette": 0.5}, {"a": 1, "b": 3, "silhouette": 0.2},
                     {"a": 2, "b": 3, "silhouette": 0.9}]}
    den = {"pairs": [{"a": 1, "b": 2, "silhouette": 0.1}, {"a": 1, "b": 3, "silhouette": 0.4},
                     {"a": 2, "b": 3, "silhouette": 0.8}]}
    assert select_by_ratio(num, den, n=2) == [(1, 2), (2, 3)]


def test_clustering_report_two_models_with_plot(tiny, tmp_path):
    import copy

    import torch

    model, tok = tiny
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.norm.weight.mul_(3.0)  # a different model with the same tokenizer
    path = tmp_path / "pairs.png"
    rep = clustering_report({"base": (model, tok), "other": (other, tok)}, TEXTS, max_length=64, top_k=4,
                            max_per_token=20, n_boot=200, plot_path=path, n_plot_pairs=2,
                            selection=("other", "base", 3))
    assert set(rep["models"]) == {"base", "other"}
    for m in rep["models"].values():
        assert set(m) == {"mean_all_pairs", "ci_low", "ci_high", "n_pairs", "top_k"}
        assert m["n_pairs"] == 6 and m["top_k"] == 4 and -1 <= m["mean_all_pairs"] <= 1
        assert m["ci_low"] <= m["mean_all_pairs"] <= m["ci_high"]
    assert len(rep["pair_ids"]) == 6 and len(rep["pairs"]["other"]) == 6
    assert "ratio" in rep["selection"]["rule"] and set(rep["selection"]["mean"]) == {"base", "other"}
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert rep["plot"] == str(path)


def test_analyze_clustering_renders_with_the_configured_chat_template(tmp_path, tiny_model_dir):
    """A base model's tokenizer ships no chat template; `ual analyze clustering` on its own (a fresh
    process, after `ual data` ran in another) must render with the config's `chat_template`, as every
    stage does (it used to depend on a module-level template set only by the other stages)."""
    import json
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    base = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = None
    tok.save_pretrained(base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    assert not getattr(AutoTokenizer.from_pretrained(base), "chat_template", None)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i} twice."},
                                                     {"role": "assistant", "content": f"{i} and {i} again, {i}."}]}) + "\n"
                            for i in range(12)))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nmodel: {base}\nchat_template: chatml\n"
                   f"data: {{max_length: 64, sources: [{{name: {data}, label: mix, train: 6, heldout: 6}}]}}\n"
                   "eval: {models: [base], clustering_texts: 6, clustering_top_k: 4}\n")

    def ual(*args):
        return subprocess.run([sys.executable, "-m", "ual.cli", *args], capture_output=True, text=True)

    assert ual("data", str(cfg)).returncode == 0
    done = ual("analyze", "clustering", str(cfg))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "base" in json.loads((tmp_path / "run" / "clustering.json").read_text())["models"]
