"""`ual export-data`: a real run folder (data, perplexity scores on the tiny model, map) exported as
jsonl, parquet and a datasets folder; read back with `datasets`; trained on with `UALSFTTrainer`, whose
loss is checked to receive exactly the run's eps (smoothing.jsonl) and weights (samples.jsonl meta)."""

import json
import shutil

import pytest
import torch

from ual.cli import main
from ual.io import read_jsonl

datasets = pytest.importorskip("datasets")
COLUMNS = {"messages", "source", "id", "score", "u", "eps", "weight"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("export")
    src = tmp / "chat.jsonl"
    src.write_text("".join(json.dumps({
        "conversations": [{"from": "human", "value": f"Tell me about number {i}"},
                          {"from": "gpt", "value": f"{i} is a number. " * (1 + i % 3)}],
        "quality": [0.0, 0.5, 1.0, 2.0][i % 4]}) + "\n" for i in range(8)))
    cfg = tmp / "exp.yaml"
    cfg.write_text(f"""
name: export
run_dir: {tmp / 'run'}
model: {tiny_model_dir}
data: {{max_length: 64, sources: [{{name: {src}, label: chat}}]}}
score: {{heldout: false}}
train: {{weight_column: quality}}
""")
    for stage in ("data", "score", "map"):
        assert main([stage, str(cfg)]) == 0, stage
    return tmp / "run"


def _expected(run):
    """What every export must hold: samples.jsonl order, smoothing.jsonl values, the meta weight."""
    smoothing = {r["id"]: r for r in read_jsonl(run / "smoothing.jsonl")}
    return [{"messages": s["messages"], "source": s["source"], "id": s["id"], "score": smoothing[s["id"]]["score"],
             "u": smoothing[s["id"]]["u"], "eps": smoothing[s["id"]]["eps"], "weight": s["meta"]["quality"]}
            for s in read_jsonl(run / "samples.jsonl")]


def _load(fmt, path):
    if fmt == "jsonl":
        return datasets.Dataset.from_json(str(path))
    if fmt == "parquet":
        return datasets.Dataset.from_parquet(str(path))
    return datasets.load_from_disk(str(path))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_every_format_round_trips_through_datasets(run, tmp_path, fmt):
    out = tmp_path / f"export.{fmt}"
    assert main(["export-data", str(run), "--format", fmt, "--out", str(out)]) == 0
    ds = _load(fmt, out)
    assert set(ds.column_names) == COLUMNS
    expected = _expected(run)
    assert len(expected) == 8 and len({r["eps"] for r in expected}) > 2  # per-sample eps from real scores
    for got, want in zip(ds, expected, strict=True):
        assert got["messages"] == want["messages"] and (got["id"], got["source"]) == (want["id"], want["source"])
        for k in ("score", "u", "eps", "weight"):
            assert got[k] == pytest.approx(want[k], rel=1e-12), k
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind


def test_never_overwrites_without_force(run, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["export-data", str(run), "--format", "hf", "--out", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["export-data", str(run), "--format", "hf", "--out", str(out), "--weight-column", "nothing"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["export-data", str(run), "--format", "hf", "--out", str(out), "--force",
                 "--weight-column", "nothing"]) == 2  # a bad column fails before the old export is touched
    assert "meta field 'nothing': missing" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    for fmt in ("hf", "jsonl"):  # --force replaces a folder or a file, whichever is there
        assert main(["export-data", str(run), "--format", fmt, "--out", str(out), "--force"]) == 0
        assert _load(fmt, out)["weight"] == [r["weight"] for r in _expected(run)]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_a_run_without_smoothing_says_which_stage_to_run(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "smoothing.jsonl").unlink()
    assert main(["export-data", str(copy), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "smoothing.jsonl not found: run `ual map` on this run folder first" in capsys.readouterr().err
    (copy / "scores.jsonl").unlink()
    assert main(["export-data", str(copy), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "run `ual score` then `ual map`" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_export_trains_in_ual_sft_trainer_with_the_runs_eps_and_weights(run, tmp_path, tiny_model_dir, tokenizer):
    pytest.importorskip("trl")
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    from ual.loss import shift_labels, smoothed_cross_entropy
    from ual.training.trl import UALSFTTrainer

    out = tmp_path / "hf"
    assert main(["export-data", str(run), "--format", "hf", "--out", str(out)]) == 0
    ds = datasets.load_from_disk(str(out))
    torch.manual_seed(0)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ds), max_steps=2,
                     learning_rate=0.0, optim="sgd", lr_scheduler_type="constant", report_to="none", use_cpu=True,
                     save_strategy="no", seed=0, disable_tqdm=True, max_length=None, bf16=False,
                     gradient_checkpointing=False, logging_steps=1)
    trainer = UALSFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=args, train_dataset=ds,
                            processing_class=tokenizer)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)

    # The run's own values, by the ids of the rows the trainer batches (one batch: every sample, in order).
    want = {r["id"]: r for r in _expected(run)}
    ids = trainer.train_dataset["id"]
    eps = torch.tensor([want[i]["eps"] for i in ids], dtype=torch.float32)
    weight = torch.tensor([want[i]["weight"] for i in ids], dtype=torch.float32)
    batch = next(iter(trainer.get_train_dataloader()))
    assert torch.equal(batch["eps"], eps) and torch.equal(batch["weight"], weight)
    assert weight.min() == 0 and len(set(eps.tolist())) > 2

    # The loss those values give, computed here through ual.loss, is the loss the trainer logs
    # (learning rate 0: both steps see the initial model); without them it would differ.
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "eps", "weight")}
    with torch.no_grad():
        logits = trainer.model(**inputs, use_cache=False).logits
    targets = shift_labels(batch["labels"])
    expected = float(smoothed_cross_entropy(logits, targets, eps, sample_weights=weight))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert logged == pytest.approx([expected, expected], rel=1e-6)
    # Without the weights the loss is 16% off; without eps 2e-4 (a random model's logits are near
    # uniform, where smoothing costs little): 200 times the tolerance above.
    assert expected != pytest.approx(float(smoothed_cross_entropy(logits, targets, eps)), rel=1e-2)
    assert expected != pytest.approx(float(smoothed_cross_entropy(logits, targets, 0.0, sample_weights=weight)),
                                     rel=1e-4)
