from pathlib import Path

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


def _leaves(node, prefix=""):
    """(path, value) for every value written in a YAML mapping; list items as path[i]."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else k)
    elif isinstance(node, list) and node and all(isinstance(x, dict) for x in node):
        for i, x in enumerate(node):
            yield from _leaves(x, f"{prefix}[{i}]")
    else:
        yield prefix, node


def _get(cfg, path):
    import re

    for part in path.split("."):
        m = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        cfg = getattr(cfg, m.group(1))[int(m.group(2))] if m else getattr(cfg, part)
    return cfg


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# ual's experiment configs (configs/accelerate/ holds accelerate's own launch configs)
@pytest.mark.parametrize("path", sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                                        if p.parent.name != "accelerate"))
def test_every_field_of_every_shipped_config_is_loaded_as_written(path):
    """Each value written in configs/*.yaml reaches the loaded config unchanged (numbers as numbers,
    so `3e-4` is 0.0003, never the string), and the file loads without error."""
    import yaml

    path = CONFIGS / path
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(path)
    leaves = list(_leaves(raw))
    assert leaves
    for dotted, value in leaves:
        got = _get(cfg, dotted)
        if isinstance(value, str) and isinstance(got, (int, float)) and not isinstance(got, bool):
            value = float(value)  # PyYAML reads 3e-4 as a string; the config takes it as the number it is
        assert got == (pytest.approx(value) if isinstance(value, float) else value), dotted


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
