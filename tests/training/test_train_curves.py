"""Evaluation during training (training/curves.py): held-out and training NLL at fixed points, each point's
adapter kept and evaluable, the curves in the report; through the real CLI on a tiny random model."""

from __future__ import annotations


import pytest

from ual.cli import main
from ual.io import read_json
from ual.report.training_curves import best_point, read_curve
from ual.training.curves import subset_indices


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("curves")
    cfg = tmp / "exp.yaml"
    cfg.write_text(f"""
name: curves
run_dir: {tmp / 'run'}
model: {tiny_model_dir}
data:
  max_length: 64
  sources: [{{name: gsm8k, train: 8, heldout: 4}}, {{name: sharegpt, train: 8, heldout: 4, max_turns: 1}}]
train: {{modes: [sft], max_steps: 4, batch_size: 4, learning_rate: 1.0e-2, eval_strategy: steps, eval_steps: 2,
         eval_train_samples: 6}}
eval: {{models: [sft], batch_size: 4, gsm8k: false, multiple_choice: false, clustering: false, pairwise: [],
        compare: []}}
""")
    assert main(["data", str(cfg)]) == 0
    assert main(["train", str(cfg)]) == 0
    return tmp / "run"


def test_curve_points_and_kept_adapters(run):
    rows = read_curve(run / "train" / "sft" / "curve.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]  # before the first step, then every 2 steps
    for r in rows:
        assert set(r["heldout"]) == {"gsm8k", "sharegpt", "all"} and r["train"] > 0
        assert (run / "train" / "sft" / "points" / f"sft-step{r['step']}" / "adapter_config.json").exists()
    assert rows[0]["heldout"]["all"] != rows[-1]["heldout"]["all"]  # training moved it
    assert best_point(rows) in rows
    assert read_json(run / "train" / "sft" / "result.json")["curve"].endswith("curve.jsonl")


def test_last_point_is_what_ual_eval_measures(run):
    """The curve's measure is `ual eval`'s held-out NLL: the final point equals the final model's."""
    assert main(["eval", str(run)]) == 0
    final = read_json(run / "eval" / "sft.json")["nll"]["all"]["nll"]
    assert read_curve(run / "train" / "sft" / "curve.jsonl")[-1]["heldout"]["all"] == pytest.approx(final, abs=1e-4)
    # a kept point is evaluated like any adapter folder
    point = run / "train" / "sft" / "points" / "sft-step2"
    assert main(["eval", str(run), "--adapter", str(point), "--eval.nll", "true"]) == 0
    mid = read_json(run / "eval" / "sft-step2.json")["nll"]["all"]["nll"]
    assert read_curve(run / "train" / "sft" / "curve.jsonl")[1]["heldout"]["all"] == pytest.approx(mid, abs=1e-4)


def test_a_point_evaluated_once_joins_the_clustering_table(run):
    """`ual eval --adapter POINT` adds the point to clustering.json; it does not replace the folder's models.
    A model whose features came from other held-out texts is left out, not compared."""
    flags = ["--eval.clustering", "true", "--eval.clustering_top_k", "4", "--eval.nll", "false"]
    assert main(["eval", str(run), *flags, "--eval.clustering_texts", "4"]) == 0
    assert set(read_json(run / "clustering.json")["models"]) == {"sft"}
    point = run / "train" / "sft" / "points" / "sft-step2"
    assert main(["eval", str(run), "--adapter", str(point), *flags, "--eval.clustering_texts", "4"]) == 0
    assert set(read_json(run / "clustering.json")["models"]) == {"sft", "sft-step2"}
    assert main(["eval", str(run), "--adapter", str(point), *flags, "--eval.clustering_texts", "3"]) == 0
    assert set(read_json(run / "clustering.json")["models"]) == {"sft-step2"}


def test_report_shows_the_curves(run):
    assert main(["report", str(run)]) == 0
    report = (run / "report.md").read_text()
    assert "## Evaluation during training" in report and "| sft | 3 |" in report
    assert (run / "curves.png").stat().st_size > 0


def test_bad_settings(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {eval_strategy: steps}\n")
    assert main(["train", str(cfg), "--train.max_steps", "1"]) == 2
    assert "train.eval_steps: expected at least 1 when eval_strategy is steps" in capsys.readouterr().err
    assert subset_indices(10, 4, 0) == subset_indices(10, 4, 0) and len(set(subset_indices(10, 4, 0))) == 4
    assert subset_indices(10, 4, 0) != subset_indices(10, 4, 1) and subset_indices(10, 40, 0) == list(range(10))
