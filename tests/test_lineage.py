"""The run folder's contract (ual/lineage.py), through the real CLI on a tiny random model and real files:
one-off flags do not stick, a dry run or a failing command changes nothing, outputs made from older inputs
are redone (or marked in the report), and a misspelt model is an error."""

import json
import logging

import pytest
import yaml

from ual.cli import main
from ual.io import read_json, read_jsonl


def _config(tmp_path, model_dir):
    chat = tmp_path / "chat.jsonl"
    rows = [{"conversations": [{"from": "human", "value": f"Tell me something nice #{i}"},
                               {"from": "gpt", "value": "Sunsets over the sea are lovely. " * (1 + i % 4)}]}
            for i in range(16)]
    chat.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
run_dir: {tmp_path / 'run'}
model: {model_dir}
data:
  max_length: 64
  sources:
    - {{name: {chat}, label: chat, train: 8, heldout: 4}}
    - {{name: gsm8k, train: 8, heldout: 4}}
score: {{scorer: entropy, batch_size: 8}}
smoothing: {{target_mean: 0.1}}
train: {{modes: [sft, ls, ual], max_steps: 2, batch_size: 4, logging_steps: 1}}
eval: {{models: [base, sft, ls, ual], compare: ["ual:sft"], gsm8k: false, multiple_choice: false, clustering: false,
        pairwise: [], batch_size: 4}}
""")
    return cfg


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def changed_files(before: dict, after: dict) -> list[str]:
    return sorted(k for k in {**before, **after} if before.get(k) != after.get(k))


@pytest.fixture(scope="module")
def built_run(tmp_path_factory, tiny_model_dir):
    """A whole run (data, score, map, train, eval, report) to copy: each test changes its own copy."""
    tmp = tmp_path_factory.mktemp("contract")
    cfg = _config(tmp, tiny_model_dir)
    for stage in ("data", "score", "map", "train", "eval", "report"):
        assert main([stage, str(cfg)]) == 0, stage
    return tmp / "run"


@pytest.fixture
def run(built_run, tmp_path):
    import shutil

    dest = tmp_path / "run"
    shutil.copytree(built_run, dest)
    return dest


@pytest.fixture
def caplog(caplog):
    caplog.set_level(logging.INFO)  # the stages say what they redo, and why, at INFO
    return caplog


def ual(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as exc:  # --help
        return exc.code


@pytest.mark.parametrize("command", [
    ["score", "{run}", "--judge", "openai", "--model", "gpt-4o-mini", "--dry-run"],
    ["train", "{run}", "--dry-run", "--train.max_steps", "7", "--train.learning_rate", "1e-3"],
    ["data", "{run}", "--data.sources", "[{name: /no/such/file.jsonl}]"],  # bad input
    ["data", "{run}", "--data.max_length", "0"],  # a value out of range
    ["score", "{run}", "--score.scorer", "judge", "--score.model", "m", "--score.prompt_file", "/no/such/prompt.txt"],
    ["map", "{run}", "--smoothing.target_mean", "0.5", "--smoothing.eps_max", "0.3"],
    ["train", "{run}", "--train.modes", "[sft]", "--force", "--train.lora_target_modules", "[no_such_module]"],
    ["eval", "{run}", "--tasks", "mmlu", "--eval.tasks_source", "packaged"],  # hub-only, no hub asked
    ["eval", "{run}", "--eval.models", "[uall]", "--eval.nll", "false"],  # a misspelt model
    ["report", "{run}", "--help"],
])
def test_a_dry_run_or_a_failing_command_leaves_every_file_as_it_was(run, command, capsys):
    before = snapshot(run)
    code = ual(*[c.replace("{run}", str(run)) for c in command])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if "--dry-run" in command or "--help" in command:
        assert code == 0
    else:
        assert code != 0, err
    assert changed_files(before, snapshot(run)) == []


def test_a_misspelt_model_is_an_error_naming_what_exists(run, capsys):
    assert ual("eval", run, "--eval.models", "[uall]", "--eval.nll", "false") == 2
    err = capsys.readouterr().err
    assert "nothing is trained under 'uall'" in err and "did you mean ual?" in err and "ls, sft, ual" in err
    assert "evaluated already" not in err


def test_one_off_eval_flags_do_not_change_the_next_plain_eval(run, caplog):
    config = (run / "config.yaml").read_bytes()
    nll = read_json(run / "eval" / "sft.json")["nll"]["all"]["nll"]
    assert ual("eval", run, "--eval.nll", "false", "--eval.gsm8k", "true", "--eval.gsm8k_limit", "2",
               "--eval.max_new_tokens", "4", "--eval.models", "[sft]") == 0
    assert (run / "config.yaml").read_bytes() == config
    one_off = read_json(run / "eval" / "sft.json")  # what this command asked for
    assert "nll" not in one_off and one_off["maths"]["n_questions"] == 2
    caplog.clear()
    assert ual("eval", run) == 0  # the folder's settings again: the held-out NLL is back, the same number
    again = read_json(run / "eval" / "sft.json")
    assert again["nll"]["all"]["nll"] == pytest.approx(nll, rel=1e-6) and "maths" not in again
    assert "sft: evaluated with other settings or inputs (" in caplog.text and "eval.nll false -> true" in caplog.text
    assert "base: evaluated already" in caplog.text
    assert (run / "config.yaml").read_bytes() == config


def test_changed_smoothing_retrains_what_it_shaped_and_the_report_says_so_until_then(run, caplog):
    sft = (run / "train" / "sft" / "result.json").read_bytes()
    assert ual("map", run, "--smoothing.target_mean", "0.2") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["smoothing"]["target_mean"] == 0.2  # recorded
    assert ual("report", run) == 0
    report = (run / "report.md").read_text()
    warning = report[:report.index("## Verdict")]
    assert "Made from different inputs" in warning and "train/ls" in warning and "train/ual" in warning
    assert "smoothing.target_mean 0.1 -> 0.2" in warning and "smoothing.jsonl changed" in warning
    assert "train/sft" not in warning
    caplog.clear()
    assert ual("train", run, "--train.modes", "[ual]") == 0
    assert "train/ual was made from other settings or inputs (smoothing.jsonl changed)" in caplog.text
    assert not (run / "train" / ".ual.replaced").exists()
    caplog.clear()
    assert ual("train", run) == 0  # ls is retrained (its eps is the target mean); sft is current
    assert "train/sft already done" in caplog.text and "train/ual already done" in caplog.text
    assert read_json(run / "train" / "ls" / "result.json")["mean_eps"] == pytest.approx(0.2)
    assert (run / "train" / "sft" / "result.json").read_bytes() == sft
    caplog.clear()
    assert ual("eval", run) == 0  # ls and ual were retrained: evaluated again; base and sft are current
    assert "ls: evaluated with other settings or inputs (model changed)" in caplog.text
    assert "ual: evaluated with other settings or inputs (model changed)" in caplog.text
    assert "sft: evaluated already" in caplog.text
    assert ual("report", run) == 0
    report = (run / "report.md").read_text()
    assert "Made from different inputs" not in report and "## Provenance" in report
    assert "| train/ls | current |" in report and "| eval/ual | current |" in report


def test_changed_samples_remove_their_scores_and_retrain_on_the_new_ones(run, caplog):
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    sources = cfg["data"]["sources"]
    sources[0]["train"] = 6
    assert ual("data", run, "--data.sources", json.dumps(sources)) == 0
    assert not (run / "scores.jsonl").exists() and not (run / "smoothing.jsonl").exists()
    caplog.clear()
    assert ual("train", run, "--train.modes", "[sft]") == 0
    assert "train/sft was made from other settings or inputs (samples.jsonl changed)" in caplog.text
    assert ual("train", run, "--train.modes", "[ual]") == 2  # its smoothing went with the old samples


def test_changed_training_settings_are_recorded_and_retrain_on_a_plain_rerun(run, caplog):
    assert ual("train", run, "--train.modes", "[sft]", "--train.max_steps", "3") == 0
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["train"]["max_steps"] == 3 and recorded["train"]["modes"] == ["sft", "ls", "ual"]
    assert read_json(run / "train" / "sft" / "result.json")["steps"] == 3
    caplog.clear()
    assert ual("train", run, "--train.modes", "[ls]") == 0  # the folder says 3 steps now: ls follows
    assert "train.max_steps 2 -> 3" in caplog.text
    assert read_json(run / "train" / "ls" / "result.json")["steps"] == 3


def test_a_command_says_which_settings_differ_before_it_works(run, caplog):
    caplog.clear()
    assert ual("map", run, "--smoothing.target_mean", "0.15", "--eval.nll", "false") == 0
    line = next(r.getMessage() for r in caplog.records if "settings differ from" in r.getMessage())
    assert "recorded if it succeeds: smoothing.target_mean 0.1 -> 0.15" in line
    assert "this command only: eval.nll true -> false" in line


def test_a_setting_newer_than_the_folder_is_not_called_a_difference(run, caplog):
    """A folder written before a setting existed names no value for it: that is its default, not a change."""
    import yaml

    settings = yaml.safe_load((run / "config.yaml").read_text())
    del settings["score"]["via"], settings["train"]["lora_dropout"]
    (run / "config.yaml").write_text(yaml.safe_dump(settings))
    caplog.clear()
    assert ual("map", run, "--train.lora_dropout", "0.2") == 0
    line = next(r.getMessage() for r in caplog.records if "settings differ from" in r.getMessage())
    assert "train.lora_dropout null -> 0.2" not in line and "train.lora_dropout 0.1 -> 0.2" in line
    assert "score.via" not in line


def test_one_off_tasks_do_not_change_the_next_plain_eval(run, caplog):
    config = (run / "config.yaml").read_bytes()
    assert ual("eval", run, "--tasks", "arc_easy:4", "--eval.models", "[base]") == 0
    assert (run / "eval" / "tasks" / "base.json").exists() and (run / "config.yaml").read_bytes() == config
    caplog.clear()
    assert ual("eval", run) == 0  # the folder's evaluation: held-out NLL, no benchmark
    assert "lm-eval tasks" not in caplog.text and "base: evaluated already" in caplog.text


def test_changed_scores_remove_the_smoothing_and_redo_what_used_them(run, caplog):
    assert ual("score", run, "--score.scorer", "perplexity") == 0
    assert not (run / "smoothing.jsonl").exists()  # mapped from the scores just replaced
    assert ual("train", run, "--train.modes", "[ual]") == 2  # refused: no smoothing to train from
    assert ual("map", run) == 0
    caplog.clear()
    assert ual("train", run, "--train.modes", "[ual]") == 0
    assert "train/ual was made from other settings or inputs (smoothing.jsonl changed)" in caplog.text
    caplog.clear()
    assert ual("eval", run, "--eval.models", "[base]") == 0  # its u buckets come from the held-out scores
    assert "base: evaluated with other settings or inputs (heldout_scores.jsonl changed)" in caplog.text


def test_a_changed_adapter_folder_is_evaluated_again(run, tmp_path, caplog):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(run / "train" / "sft" / "adapter", adapter)
    assert ual("eval", run, "--adapter", adapter) == 0
    first = read_json(run / "eval" / "adapter.json")["nll"]["all"]["nll"]
    caplog.clear()
    assert ual("eval", run, "--adapter", adapter) == 0
    assert "adapter: evaluated already" in caplog.text
    shutil.rmtree(adapter)
    shutil.copytree(run / "train" / "ual" / "adapter", adapter)  # other weights under the same name
    caplog.clear()
    assert ual("eval", run, "--adapter", adapter) == 0
    assert "adapter: evaluated with other settings or inputs (model changed)" in caplog.text
    # the tiny model barely moves in 2 steps: sft's and ual's NLL differ in the 9th digit
    assert read_json(run / "eval" / "adapter.json")["nll"]["all"]["nll"] == pytest.approx(
        read_json(run / "eval" / "ual.json")["nll"]["all"]["nll"], abs=1e-12)
    assert first == pytest.approx(read_json(run / "eval" / "sft.json")["nll"]["all"]["nll"], abs=1e-12)


def test_training_refuses_a_smoothing_made_from_other_settings(run, capsys):
    before = snapshot(run)
    assert ual("train", run, "--train.modes", "[ual]", "--smoothing.target_mean", "0.3") == 2
    err = capsys.readouterr().err
    assert "smoothing.jsonl was made from other scores or settings (smoothing.target_mean 0.1 -> 0.3)" in err
    assert "run `ual map`" in err and changed_files(before, snapshot(run)) == []
