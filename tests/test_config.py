from pathlib import Path

import pytest

from ual.cli import build_parser
from ual.config import (ConfigError, DataConfig, EvalConfig, ExperimentConfig, ScoreConfig, SmoothingConfig,
                        SourceConfig, TrainConfig, load_config)
from ual.config_flags import config_from_args
from ual.modes import MODES


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


# --------------------------------------------------------------------------- checked where declared

# (config class, section in a file, bad field values, the field the error names, words of the problem)
BAD = [
    (SourceConfig, "data.sources[0]", {"heldout": -1}, "heldout", "at least 0"),
    (SourceConfig, "data.sources[0]", {"format": "csv"}, "format", "one of auto, messages"),
    (DataConfig, "data", {"max_length": 0}, "max_length", "at least 1"),
    (DataConfig, "data", {"on_error": "ignore"}, "on_error", "one of raise, skip"),
    (ScoreConfig, "score", {"scorer": "entropi"}, "scorer", "did you mean 'entropy'"),
    (ScoreConfig, "score", {"concurrency": 0}, "concurrency", "at least 1"),
    (ScoreConfig, "score", {"timeout_s": 0}, "timeout_s", "more than 0"),
    (ScoreConfig, "score", {"prior": {"gsm8k": 1.5}}, "prior.gsm8k", "a number in [0, 1]"),
    (SmoothingConfig, "smoothing", {"target_mean": 1.0}, "target_mean", "a number in [0, 1)"),
    (SmoothingConfig, "smoothing", {"eps_max": 0}, "eps_max", "a number in (0, 1]"),
    (SmoothingConfig, "smoothing", {"target_mean": 0.5, "eps_max": 0.4}, "target_mean", "less than eps_max (0.4)"),
    (SmoothingConfig, "smoothing", {"normalize": "zscore"}, "normalize", "one of max, minmax, rank"),
    (TrainConfig, "train", {"modes": ["sft", "nope"]}, "modes[1]", "one of " + ", ".join(MODES)),
    (TrainConfig, "train", {"loss": "fast"}, "loss", "one of auto, chunked, naive"),
    (TrainConfig, "train", {"learning_rate": 0}, "learning_rate", "more than 0"),
    (TrainConfig, "train", {"lora_dropout": 1.0}, "lora_dropout", "a number in [0, 1)"),
    (TrainConfig, "train", {"warmup_ratio": 1.5}, "warmup_ratio", "a number in [0, 1]"),
    (TrainConfig, "train", {"batch_size": 0}, "batch_size", "at least 1"),
    (TrainConfig, "train", {"global_batch_size": 0}, "global_batch_size", "at least 1"),
    (TrainConfig, "train", {"eaft_topk": 1}, "eaft_topk", "at least 2"),
    (TrainConfig, "train", {"report_to": "mlflow"}, "report_to", "one of auto, none"),
    (TrainConfig, "train", {"epochs": 0}, "epochs", "more than 0 when max_steps is not set"),
    (TrainConfig, "train", {"lora_target_modules": []}, "lora_target_modules", "at least one module"),
    (EvalConfig, "eval", {"batch_size": 0}, "batch_size", "at least 1"),
    (EvalConfig, "eval", {"clustering_top_k": 1}, "clustering_top_k", "at least 2"),
    (EvalConfig, "eval", {"compare": ["ual:sft", "ualsft"]}, "compare[1]", "model pairs look like 'ual:sft'"),
    (ExperimentConfig, "", {"seed": -1}, "seed", "at least 0"),
]
IDS = [f"{cls.__name__}.{field}" for cls, _, _, field, _ in BAD]


def _in_file(section: str, values: dict) -> dict:
    """The YAML mapping that puts `values` at `section` (a valid source around a source's fields)."""
    if section == "data.sources[0]":
        return {"data": {"sources": [{"name": "gsm8k", **values}]}}
    return {section: values} if section else values


@pytest.mark.parametrize("cls, section, values, field, problem", BAD, ids=IDS)
def test_a_config_built_in_python_checks_itself(cls, section, values, field, problem):
    """A library user's TrainConfig(learning_rate=0) fails as it is built, naming the class and field."""
    with pytest.raises(ConfigError) as info:
        cls(**values)
    message = str(info.value)
    assert message.startswith(f"{cls.__name__}.{field}: ") and problem in message, message
    assert "\n" not in message


@pytest.mark.parametrize("cls, section, values, field, problem", BAD, ids=IDS)
def test_a_bad_value_in_a_file_is_one_line_naming_file_and_field(tmp_path, cls, section, values, field, problem):
    import yaml

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_in_file(section, values)))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    dotted = f"{section}.{field}" if section else field
    assert message.startswith(f"{path}:{dotted}: ") and problem in message, message
    assert "\n" not in message


def test_a_bad_value_in_a_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"^--smoothing.target_mean: expected a number in \[0, 1\), got 1.5$"):
        load_config(None, {"smoothing.target_mean": 1.5})
    with pytest.raises(ConfigError, match=r"^--train.learning_rate: expected more than 0, got 0.0$"):
        config_from_args(build_parser().parse_args(["train", "--train.learning_rate", "0"]))


def test_a_bad_mode_fails_at_load_listing_the_modes(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  modes: [sft, ual+dpo]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}:train.modes[1]: expected one of {', '.join(MODES)}, got 'ual+dpo'; "
                               "did you mean 'ual+dft'?")
    with pytest.raises(ConfigError, match=r"^--train.modes \(train.modes\[0\]\): expected one of sft, ls, ual, ppl"):
        config_from_args(build_parser().parse_args(["train", "--train.modes", "[nope]"]))
    assert load_config(None, {"train.modes": ",".join(MODES)}).train.modes == list(MODES)


def test_values_on_the_edges_of_their_ranges_are_valid():
    """The ranges are the config's contract; their closed ends are accepted, valid configs unchanged."""
    SmoothingConfig(target_mean=0.0, eps_max=1.0)
    TrainConfig(warmup_ratio=1.0, lora_dropout=0.0, max_steps=5, epochs=0, lora=False, lora_target_modules=[])
    TrainConfig(max_steps=-1, epochs=0.5, save_steps=0, weight_decay=0.0, eaft_topk=2)
    ScoreConfig(scorer="prior", prior={"a": 0, "b": 1}, max_retries=0)
    EvalConfig(mc_samples=0, mc_limit=None, compare=[], pairwise=[])
    SourceConfig(name="gsm8k", train=0, heldout=0)
    cfg = ExperimentConfig()
    assert cfg.train.modes == ["sft", "ls", "ual"] and cfg.smoothing.eps_max == 0.99


def test_the_modes_are_declared_once():
    """ual.modes is the one list: the config's choices, the training plan's MODES, the report's order."""
    import ast
    import typing

    import ual.modes
    from ual.report.stage import MODEL_ORDER
    from ual.training import plan

    assert plan.MODES is ual.modes.MODES and plan.mode_parts is ual.modes.mode_parts
    assert MODEL_ORDER == ("base", *MODES)
    (mode_t,) = typing.get_args(typing.get_type_hints(TrainConfig)["modes"])
    assert typing.get_args(mode_t) == MODES
    tree = ast.parse(Path(ual.modes.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[0] == "ual"], imported


def test_the_trainer_takes_its_loss_choices_from_the_same_list():
    from ual.modes import LOSS_IMPLS, LOSSES
    from ual.training.trainer import UALLoss

    assert LOSSES == ("auto", *LOSS_IMPLS)
    for impl in LOSS_IMPLS:
        UALLoss.check_loss_options(impl, "none")
    with pytest.raises(ValueError, match="train.loss must be one of chunked, naive, got 'auto'"):
        UALLoss.check_loss_options("auto", "none")  # auto is resolved before a trainer is built
