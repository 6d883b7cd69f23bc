"""`ual ablate`: sft, ls, ual and ppl with the same seed, order and steps, on the demo's data; and the sweep."""

import pytest

from ual.cli import main
from ual.io import read_json, read_jsonl


def _config(tmp_path, model_dir):
    cfg = tmp_path / "abl.yaml"
    cfg.write_text(f"""
name: abl
run_dir: {tmp_path / 'run'}
model: {model_dir}
data:
  max_length: 64
  sources:
    - {{name: sharegpt, max_turns: 1, train: 8, heldout: 2}}
    - {{name: gsm8k, train: 8, heldout: 2}}
score: {{batch_size: 8}}
smoothing: {{target_mean: 0.2}}
train: {{max_steps: 2, batch_size: 4, logging_steps: 1, report_to: none}}
eval: {{max_new_tokens: 4, batch_size: 4, mc_limit: 4, mc_samples: 2, clustering_texts: 4, clustering_top_k: 4,
        pairwise_limit: 2, pairwise_max_new_tokens: 4}}
""")
    return cfg


def test_ablation_four_modes_with_eval(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    assert main(["ablate", str(cfg), "--eval"]) == 0
    run = tmp_path / "run"
    table = read_json(run / "ablation.json")
    rows = {r["mode"]: r for r in table["rows"]}
    assert set(rows) == {"base", "sft", "ls", "ual", "ppl"} and table["same_steps"]
    assert all(rows[m]["steps"] == 2 for m in ("sft", "ls", "ual", "ppl"))
    assert rows["sft"]["mean_eps"] == 0 and rows["ls"]["mean_eps"] == pytest.approx(0.2)
    # ual's mean eps is the mean of its training samples' eps, which the map sets to the target exactly
    train_ids = {r["id"] for r in read_jsonl(run / "samples.jsonl")}
    mapped = [r["eps"] for r in read_jsonl(run / "smoothing.jsonl") if r["id"] in train_ids]
    assert len(mapped) == len(train_ids) == 16
    assert rows["ual"]["mean_eps"] == pytest.approx(sum(mapped) / len(mapped), rel=1e-12)
    assert rows["ual"]["mean_eps"] == pytest.approx(0.2, rel=1e-9)
    assert 0 < rows["ppl"]["mean_eps"] < 0.99
    for m in rows:
        assert "all" in rows[m]["nll"] and "gsm8k_accuracy" in rows[m] and "mc_accuracy" in rows[m]
        assert "silhouette" in rows[m]
    md = (run / "ablation.md").read_text()
    for m in ("| sft |", "| ls |", "| ual |", "| ppl |", "| base |"):
        assert m in md
    # Same data order and initial weights: every mode's first step saw the same batch, so the plain
    # NLL logged at step 1 (before any update) is the same number for all (sft's loss is that NLL);
    # and every mode logged the same steps.
    logs = {m: [h for h in read_json(run / "train" / m / "log.json") if "loss" in h] for m in ("sft", "ls", "ual", "ppl")}
    assert {tuple(h["step"] for h in log) for log in logs.values()} == {(1, 2)}
    first_nll = [log[0]["nll"] for log in logs.values()]
    assert max(first_nll) - min(first_nll) < 1e-5 * max(first_nll), first_nll
    assert logs["sft"][0]["loss"] == pytest.approx(logs["sft"][0]["nll"], rel=1e-5)
    assert (run / "report.md").exists()


def test_ablation_sweep(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    cheap_eval = ["--eval", "--eval.multiple_choice", "false", "--eval.clustering", "false", "--eval.gsm8k", "false"]
    # eval.pairwise stays ual:sft: no run folder holds both with a sweep, so it is dropped, not an error.
    assert main(["ablate", str(cfg), "--sweep", "0.1,0.3", "--modes", "sft,ls,ual"] + cheap_eval) == 0
    run = tmp_path / "run"
    table = read_json(run / "ablation.json")
    assert table["sweep"] == [0.1, 0.3] and table["same_steps"]
    got = [(r["target_mean"], r["mode"]) for r in table["rows"]]
    assert got == [(None, "base"), (None, "sft"), (0.1, "ls"), (0.1, "ual"), (0.3, "ls"), (0.3, "ual")]
    assert all("all" in r["nll"] for r in table["rows"])
    assert not (run / "sweep" / "mean-0.1" / "eval" / "base.json").exists()  # base and sft evaluated once, in RUN
    for mean in (0.1, 0.3):
        sub = run / "sweep" / f"mean-{mean:g}"
        assert read_json(sub / "train" / "ls" / "result.json")["mean_eps"] == pytest.approx(mean)
        assert read_json(sub / "smoothing_stats.json")["target_mean"] == mean
        assert (sub / "samples.jsonl").read_bytes() == (run / "samples.jsonl").read_bytes()
        assert not (sub / "train" / "sft").exists()  # sft does not depend on the mean: trained once
    assert (run / "train" / "sft" / "result.json").exists()
    # Rerun: everything is reused.
    before = (run / "sweep" / "mean-0.3" / "train" / "ual" / "result.json").stat().st_mtime_ns
    assert main(["ablate", str(cfg), "--sweep", "0.1,0.3", "--modes", "sft,ls,ual"] + cheap_eval) == 0
    assert (run / "sweep" / "mean-0.3" / "train" / "ual" / "result.json").stat().st_mtime_ns == before


def test_bad_sweep_is_exit_2(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    assert main(["ablate", str(cfg), "--sweep", "0.1,abc"]) == 2
    assert main(["ablate", str(cfg), "--sweep", "1.5"]) == 2
    assert main(["ablate", str(cfg), "--modes", "sft,xx"]) == 2


def test_ablation_seeds_writes_per_seed_runs_and_an_across_seed_table(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    cheap = ["--eval.clustering", "false", "--eval.gsm8k", "false", "--eval.pairwise", "[]",
             "--eval.mc_samples", "0", "--eval.bootstrap", "200"]
    assert main(["ablate", str(cfg), "--modes", "sft,ls,ual", "--seeds", "2", "--eval"] + cheap) == 0
    run = tmp_path / "run"
    for seed in (0, 1):
        sub = run / "seeds" / f"seed-{seed}"
        for mode in ("sft", "ls", "ual"):
            assert read_json(sub / "train" / mode / "result.json")["steps"] == 2
            assert (sub / "eval" / "items" / f"{mode}.nll.jsonl").exists()
        assert (sub / "smoothing.jsonl").read_bytes() == (run / "smoothing.jsonl").read_bytes()
        assert set(read_json(sub / "comparisons.json")["pairs"]) == {"ual:sft", "ual:ls"}
    # Different seeds train differently (LoRA init and data order)...
    a = read_json(run / "seeds" / "seed-0" / "train" / "ual" / "log.json")
    b = read_json(run / "seeds" / "seed-1" / "train" / "ual" / "log.json")
    assert [h["loss"] for h in a if "loss" in h] != [h["loss"] for h in b if "loss" in h]
    # ... the base model is evaluated once and shared.
    assert not (run / "train").exists() and (run / "eval" / "base.json").exists()
    table = read_json(run / "seeds.json")
    assert table["seeds"] == [0, 1]
    nll = table["metrics"]["ual"]["nll/all"]
    assert len(nll["values"]) == 2 and nll["n"] == 2 and nll["low"] <= nll["estimate"] <= nll["high"]
    row = table["pairs"]["ual:sft"]["nll/all"]
    assert len(row["per_seed"]) == 2 and row["across_seeds"]["estimate"] == pytest.approx(sum(row["per_seed"]) / 2)
    assert row["pooled_items"]["n"] == 4  # held-out items, pooled over the seeds
    md = (run / "seeds.md").read_text()
    assert "| nll/all |" in md and "ual − sft" in md
    report = (run / "report.md").read_text()
    assert report.index("## Verdict") < report.index("## Data")
    # Rerun: every seed and mode is reused.
    before = (run / "seeds" / "seed-1" / "train" / "ls" / "result.json").stat().st_mtime_ns
    assert main(["ablate", str(cfg), "--modes", "sft,ls,ual", "--seeds", "2", "--eval"] + cheap) == 0
    assert (run / "seeds" / "seed-1" / "train" / "ls" / "result.json").stat().st_mtime_ns == before


def test_ablation_five_modes_with_paired_intervals(tmp_path, tiny_model_dir):
    """sft, ls, ual and the token-level rivals dft and eaft in one command, with the same steps, and
    UAL compared with each of them on every metric with a paired interval."""
    cfg = _config(tmp_path, tiny_model_dir)
    cheap = ["--eval.clustering", "false", "--eval.gsm8k", "false", "--eval.pairwise", "[]", "--eval.mc_samples", "0",
             "--eval.bootstrap", "200", "--eval.compare", "[ual:sft, ual:ls, ual:dft, ual:eaft]"]
    assert main(["ablate", str(cfg), "--modes", "sft,ls,ual,dft,eaft", "--eval"] + cheap) == 0
    run = tmp_path / "run"
    table = read_json(run / "ablation.json")
    rows = {r["mode"]: r for r in table["rows"]}
    assert set(rows) == {"base", "sft", "ls", "ual", "dft", "eaft"} and table["same_steps"]
    assert rows["dft"]["mean_eps"] == 0 and rows["eaft"]["mean_eps"] == 0
    assert read_json(run / "train" / "dft" / "result.json")["token_scale"] == "dft"
    assert read_json(run / "train" / "eaft" / "result.json")["token_scale"] == "eaft"
    pairs = read_json(run / "comparisons.json")["pairs"]
    assert set(pairs) == {"ual:sft", "ual:ls", "ual:dft", "ual:eaft"}
    for pair in pairs.values():
        nll = pair["nll/all"]
        assert nll["low"] <= nll["estimate"] <= nll["high"] and isinstance(nll["excludes_zero"], bool)
    report = (run / "report.md").read_text()
    assert "ual − dft" in report and "ual − eaft" in report


def test_ablate_trains_the_token_modes(tmp_path, tiny_model_dir):
    """`ual ablate --modes sft,dft,eaft,ual+dft`: same steps, the token scale recorded, eps 0 for dft / eaft."""
    cfg = _config(tmp_path, tiny_model_dir)
    assert main(["ablate", str(cfg), "--modes", "sft,dft,eaft,ual+dft"]) == 0
    run = tmp_path / "run"
    rows = {r["mode"]: r for r in read_json(run / "ablation.json")["rows"]}
    assert set(rows) == {"sft", "dft", "eaft", "ual+dft"} and all(r["steps"] == 2 for r in rows.values())
    results = {m: read_json(run / "train" / m / "result.json") for m in rows}
    assert {m: r["token_scale"] for m, r in results.items()} == {"sft": "none", "dft": "dft", "eaft": "eaft",
                                                                 "ual+dft": "dft"}
    assert results["dft"]["mean_eps"] == results["eaft"]["mean_eps"] == 0
    assert results["ual+dft"]["mean_eps"] == pytest.approx(0.2, rel=1e-9)  # the map's target mean, exactly
    # Same batches: the logged plain NLL of the first step is the same model on the same data.
    first = {m: next(h for h in read_json(run / "train" / m / "log.json") if "loss" in h) for m in rows}
    assert first["dft"]["nll"] == pytest.approx(first["sft"]["nll"], rel=1e-4)
    assert first["dft"]["loss"] < first["sft"]["loss"]  # scaled by p_y < 1
