"""The command line's side of the config: one dotted flag per config field (`--train.max_steps 20`),
parsed as YAML scalars and lists and applied over the YAML file (ual.config.load_config)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

import yaml

from ual.config import ConfigError, ExperimentConfig, is_text_type, load_config


def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """Add `--config` and one dotted flag per (non-list-of-dataclass) config field.

    sections: the config sections whose flags this command's --help lists, beside the shared
    top-level ones (None: all). Every flag is accepted whatever the command (a stage may read
    another section, e.g. eval reads data.max_length); only the help is focused.
    """
    parser.add_argument("--config", help="YAML experiment config (flags below override it)")
    for dotted, f, _ in _leaf_fields(ExperimentConfig):
        section = dotted.split(".")[0] if "." in dotted else None
        shown = sections is None or section is None or section in sections
        help_text = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        parser.add_argument(f"--{dotted}", dest=f"cfg:{dotted}", default=argparse.SUPPRESS,
                            metavar="VALUE", help=help_text if shown else argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    overrides = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            overrides[key[4:]] = flag_value(key[4:], value) if isinstance(value, str) else value
    return load_config(getattr(args, "config", None), overrides)


def flag_value(dotted: str, text: str):
    """A flag's text as YAML (`[sft,ual]`, `3e-4`, `false`, `null`); a text field's flag as written
    (`--name yes` is the name "yes"), `null` or `~` clearing an optional one."""
    tp = {name: t for name, _, t in _leaf_fields(ExperimentConfig)}.get(dotted)
    if tp is not None and is_text_type(tp):
        optional = type(None) in typing.get_args(tp)
        return None if optional and text.strip() in ("null", "~") else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--{dotted}: {text!r} is not a value ({getattr(exc, 'problem', None) or 'YAML error'})") from None


def _leaf_fields(cls, prefix: str = ""):
    """(dotted name, field, type) of every field that is not a section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, tp
