"""The run folder directly: what `discard` removes (a stage's outputs and what derives from them,
never train/, eval/ or the per-scorer cache), `require`'s message, the per-scorer file names,
and `read_scores` keeping each checked row."""

import pytest

from ual.io import write_jsonl
from ual.runfolder import DERIVED, STAGE_OUTPUTS, RunFolder, model_key, read_scores

EVERYTHING = [name for names in STAGE_OUTPUTS.values() for name in names]


def _full_run(tmp_path) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    for name in EVERYTHING:
        path = run.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if "." in name:
            path.write_text("x\n")
        else:
            path.mkdir()
            (path / "inside.txt").write_text("x\n")
    for kept in ("config.yaml", "train/ual/result.json", "eval/ual.json", "scores/entropy.jsonl"):
        (run.root / kept).parent.mkdir(parents=True, exist_ok=True)
        (run.root / kept).write_text("kept\n")
    return run


@pytest.mark.parametrize("stage", ["data", "score", "map"])
def test_discard_removes_the_stage_and_what_derives_from_it(tmp_path, stage):
    run = _full_run(tmp_path)
    removed = run.discard(stage)
    gone = {name for s in (stage, *DERIVED[stage]) for name in STAGE_OUTPUTS[s]}
    assert {p.name for p in removed} == gone
    for name in EVERYTHING:
        assert (run.root / name).exists() == (name not in gone), name
    for kept in ("config.yaml", "train/ual/result.json", "eval/ual.json", "scores/entropy.jsonl"):
        assert (run.root / kept).read_text() == "kept\n"  # hours of work and the scorer cache stay
    assert run.discard(stage) == []  # nothing left to remove: no error


def test_discard_keeps_a_user_file_that_sits_where_an_output_would(tmp_path):
    run = _full_run(tmp_path)
    mine = run.root / "samples.jsonl"
    mine.write_text("my data\n")
    run.discard("data", keep=(mine,))
    assert mine.read_text() == "my data\n" and not run.heldout.exists() and not run.smoothing.exists()


def test_require_names_the_stage_to_run(tmp_path):
    run = RunFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"smoothing.jsonl not found: run `ual map` on this run folder first"):
        run.require(run.smoothing, "map")
    run.smoothing.write_text("{}\n")
    assert run.require(run.smoothing, "map") == run.smoothing


def test_names_of_per_scorer_and_per_model_files(tmp_path):
    run = RunFolder(tmp_path)
    assert run.scorer_scores("judge:gpt-4o-mini:uncertainty-v1").name == "judge_gpt-4o-mini_uncertainty-v1.jsonl"
    assert run.scorer_scores("entropy:smollm2-135m", "heldout") == tmp_path / "scores" / "heldout" / "entropy_smollm2-135m.jsonl"
    assert run.items_file("ual", "mc") == tmp_path / "eval" / "items" / "ual.mc.jsonl"
    assert model_key("runs/x/train/ual/adapter") == "adapter" and model_key("ual") == "ual"


def test_read_scores_keeps_each_checked_row(tmp_path):
    path = tmp_path / "scores.jsonl"
    rows = [{"id": "a", "score": 0.2, "scorer": "entropy", "details": {"mean_entropy": 1.5}},
            {"id": "b", "score": None, "scorer": "entropy", "details": {"error": "empty response"}},
            {"id": "a", "score": 0.2, "scorer": "entropy", "details": {"mean_entropy": 1.5}}]
    write_jsonl(path, rows)
    scores = read_scores(path)
    assert scores.score == {"a": 0.2, "b": None} and scores.line == {"a": 1, "b": 2} and scores.repeated == 1
    assert scores.row["b"]["details"] == {"error": "empty response"} and scores.row["a"] == rows[0]
