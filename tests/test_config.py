import pytest

from ual.cli import build_parser
from ual.config import ConfigError, config_from_args, load_config


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "name: x\nmodel: some/model\ndata:\n  max_length: 128\n  sources:\n    - {name: gsm8k, train: 10, heldout: 2}\n"
        "train:\n  modes: [sft, ual]\n  learning_rate: 1.0e-4\n"
    )
    args = build_parser().parse_args(
        ["train", "--config", str(path), "--train.max_steps", "7", "--train.modes", "[ual]", "--smoothing.target_mean", "0.3"]
    )
    cfg = config_from_args(args)
    assert cfg.name == "x" and cfg.model == "some/model"
    assert cfg.data.max_length == 128 and cfg.data.sources[0].train == 10
    assert cfg.train.max_steps == 7 and cfg.train.modes == ["ual"] and cfg.train.learning_rate == 1e-4
    assert cfg.smoothing.target_mean == 0.3
    assert str(cfg.run_path) == "runs/x"


def test_unknown_and_mistyped_fields_are_clear(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.train: unknown field\(s\) \['learning_rat'\]"):
        load_config(path)
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer"):
        load_config(None, {"train.max_steps": "ten"})
    with pytest.raises(ConfigError, match="train.lora: expected true/false"):
        load_config(None, {"train.lora": "maybe"})


def test_every_demo_config_field_is_valid():
    cfg = load_config("configs/demo.yaml")
    assert cfg.train.modes == ["sft", "ls", "ual"]
    assert {s.name for s in cfg.data.sources} == {"sharegpt", "gsm8k"}


def test_each_stage_help_lists_its_own_sections_and_accepts_every_flag(capsys):
    """`ual eval --help` lists the shared and the eval/data fields, not train's or score's; a flag of
    another section is still accepted (and checked) by every stage."""
    from ual.cli import build_parser

    parser = build_parser()
    helps = {}
    for stage in ("data", "map", "train", "eval", "demo"):
        with pytest.raises(SystemExit):
            parser.parse_args([stage, "--help"])
        helps[stage] = capsys.readouterr().out
    assert "--eval.mc_shuffle" in helps["eval"] and "--data.max_length" in helps["eval"]
    assert "--train.learning_rate" not in helps["eval"] and "--score.scorer" not in helps["eval"]
    assert "--smoothing.normalize" in helps["map"] and "--train.max_steps" not in helps["map"]
    assert "--model" in helps["map"] and "--model" in helps["data"]
    assert all(f"--{s}." in helps["demo"] for s in ("data", "score", "smoothing", "train", "eval"))
    args = parser.parse_args(["map", "--train.max_steps", "3"])
    assert getattr(args, "cfg:train.max_steps") == "3"
