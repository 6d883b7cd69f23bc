"""Training curves across seeds (report/training_curves.py, plots.plot_seed_curves): the means over seeds, the
t intervals of the differences between modes, the count of seeds that turned up, and the report's section."""

import pytest

from ual.config import load_config
from ual.io import write_json, write_jsonl
from ual.report.plots import plot_seed_curves
from ual.report.stage import run_report
from ual.report.training_curves import seed_curve_summary, seed_curves_section

T_975_2 = 4.302652729911  # Student t quantile, 2 degrees of freedom (3 seeds)


def _rows(alls: list[float], extra_step: bool = False) -> list[dict]:
    rows = [{"step": 10 * i, "epoch": i / 3, "heldout": {"chat": a + 0.5, "maths": a - 0.5, "all": a},
             "train": a - 0.1 * i, "point": None} for i, a in enumerate(alls)]
    if extra_step:  # a step only this seed evaluated: left out of the means over seeds
        rows.insert(1, {"step": 5, "epoch": 0.1, "heldout": {"all": 9.0}, "train": 9.0, "point": None})
    return rows


def _curves(ual_final_shift=(0.0, 0.01, 0.02)) -> dict:
    # sft: best at step 20, then held-out NLL turns up in every seed; ual: falls to the end in every seed.
    return {"sft": {s: _rows([3.0, 2.5 + 0.01 * s, 2.2 + 0.01 * s, 2.3 + 0.01 * s], extra_step=s == 0)
                    for s in range(3)},
            "ual": {s: _rows([3.0, 2.4, 2.1, 2.0 + ual_final_shift[s] + 0.01 * s]) for s in range(3)}}


def test_means_intervals_and_turned_up():
    summary = seed_curve_summary(_curves())
    sft, ual = summary["modes"]["sft"], summary["modes"]["ual"]
    assert sft["seeds"] == [0, 1, 2] and [p["step"] for p in sft["points"]] == [0, 10, 20, 30]
    at10 = sft["points"][1]
    assert at10["heldout"]["all"]["estimate"] == pytest.approx(2.51)
    assert at10["heldout"]["chat"]["estimate"] == pytest.approx(3.01)
    assert at10["heldout"]["maths"]["estimate"] == pytest.approx(2.01)
    assert at10["train"]["estimate"] == pytest.approx(2.41) and at10["epoch"] == pytest.approx(1 / 3)
    assert sft["best"]["nll"]["estimate"] == pytest.approx(2.21) and sft["best"]["step"] == 20
    assert sft["final"]["nll"]["estimate"] == pytest.approx(2.31) and sft["final"]["step"] == 30
    assert sft["gap"]["estimate"] == pytest.approx(0.3)
    assert sft["turned_up"] == 3 and ual["turned_up"] == 0
    assert ual["best"]["per_seed"][1] == {"step": 30, "epoch": 1.0, "nll": pytest.approx(2.02), "point": None}

    assert list(summary["pairs"]) == ["ual − sft"]
    final = summary["pairs"]["ual − sft"]["final"]  # per seed -0.30, -0.29, -0.28: sd 0.01
    half = T_975_2 * 0.01 / 3 ** 0.5
    assert final["estimate"] == pytest.approx(-0.29)
    assert (final["low"], final["high"]) == (pytest.approx(-0.29 - half), pytest.approx(-0.29 + half))
    assert final["excludes_zero"] and final["n"] == 3
    best = summary["pairs"]["ual − sft"]["best"]  # each seed at its own best: -0.20, -0.19, -0.18
    assert best["estimate"] == pytest.approx(-0.19) and best["excludes_zero"]


def test_difference_that_flips_sign_is_not_excluded():
    # ual's final NLL minus sft's: +0.30, -0.50, -0.40 (seed 0 above, the others below).
    summary = seed_curve_summary(_curves(ual_final_shift=(0.6, -0.2, -0.1)))
    final = summary["pairs"]["ual − sft"]["final"]
    assert final["low"] < 0 < final["high"] and not final["excludes_zero"]
    assert summary["modes"]["ual"]["turned_up"] == 1  # seed 0 ends at 2.6, above its 2.1 at step 20


def test_section_and_plot(tmp_path):
    text = "\n".join(seed_curves_section(_curves()))
    assert "## Evaluation during training, across seeds" in text and "selection on held-out data" in text
    assert "| sft | 3 | 3.0000 | 2.2100 [" in text and "| 3 of 3 |" in text and "| 0 of 3 |" in text
    assert f"| ual − sft | 3 | -0.2900 [{-0.29 - T_975_2 * 0.01 / 3 ** 0.5:+.4f}, " in text
    assert seed_curves_section({}) == []
    png = plot_seed_curves(seed_curve_summary(_curves())["modes"], tmp_path / "seed_curves.png")
    assert png.stat().st_size > 1000


def test_root_report_reads_the_seed_folders(tmp_path):
    run = tmp_path / "run"
    write_json(run / "seeds.json", {"seeds": [0, 1, 2]})
    (run / "seeds.md").write_text("# Seeds\n\n## Across seeds\n\nper-seed results\n")
    for mode, by_seed in _curves().items():
        for seed, rows in by_seed.items():
            write_jsonl(run / "seeds" / f"seed-{seed}" / "train" / mode / "curve.jsonl", rows)
    text = run_report(load_config(None, {"run_dir": str(run), "name": "r"}))
    assert "## Evaluation during training, across seeds" in text and "| ual − sft | 3 |" in text
    assert "](seed_curves.png)" in text and (run / "seed_curves.png").stat().st_size > 1000
