"""`ual` command line: one subcommand per stage, each reading and writing a run folder.

    ual data    --config configs/demo.yaml     build samples.jsonl / heldout.jsonl
    ual score   --config ...                    uncertainty scores -> scores.jsonl
    ual map     --config ...                    scores -> per-sample eps -> smoothing.jsonl
    ual train   --config ...                    train sft / ls / ual side by side
    ual eval    --config ...                    held-out NLL, maths, multiple choice, clustering, win rate
    ual eval    CONFIG --tasks mmlu_packaged [--adapter DIR]   benchmarks through lm-evaluation-harness
    ual report  --config ...                    report.md, metrics.json, plots
    ual demo    [--config ...]                  all of the above on the built-in default
    ual ablate  CONFIG [--sweep 0.1,0.2] [--eval]  sft, ls, ual and ppl side by side, one comparison table
    ual score   RUN --judge openai --model M --score.via batch   the same judge through the Batch API (half price)
    ual batch   status|cancel RUN               the judge batches still in flight
    ual select  --source ... --n 6000 --out F   DEITA-style selection (complexity x quality, then diversity)
    ual export  CONFIG --mode ual --out DIR     merge a LoRA adapter into a standalone model folder
    ual export-data RUN --format parquet --out F  samples with score, u, eps, weight as dataset columns
    ual analyze clustering CONFIG_OR_RUN         feature clustering of base, sft, ls, ual (clustering.json)
    ual analyze scores CONFIG_OR_RUN             scores report; Spearman between scorers run on the same data

Every config field is also a flag (`ual train --help` lists them): `--train.max_steps 5`.
The config file may also be given as the first argument: `ual train configs/demo.yaml`, or a run
folder, whose config.yaml is used: `ual report runs/demo`.
`ual train CONFIG --dry-run` checks a config and prints a memory/time estimate; `--resume`
continues each unfinished mode from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import logging
import sys
from pathlib import Path

from ual.config import ConfigError, close_matches, split_commas
from ual.config_flags import add_config_flags, config_from_args
from ual.optional import MissingExtra
from ual.pipeline import STAGES, run_ablation, run_seeds, run_stage
from ual.runfolder import RunFolder
from ual.runlock import EXIT_LOCKED, RunFolderLocked, run_folder_lock
from ual.scoring.batch import EXIT_PENDING, BatchesPending
from ual.scoring.unscored import EXIT_UNSCORED, unscored_message



# Commands beyond the stages: (module, help). Each module has add_arguments(parser) and run(args) -> result.
COMMANDS = {
    "ablate": ("ual.training.ablate", "train sft, ls, ual and ppl with the same seed, order and steps; one comparison "
                                      "table (and evaluation with --eval); --sweep for the target mean"),
    "select": ("ual.scoring.deita", "DEITA-style selection: complexity x quality from a judge, then an embedding diversity filter"),
    "batch": ("ual.scoring.batch_command", "the judge batches of `ual score --score.via batch` still in flight: "
                                           "`ual batch status RUN`, `ual batch cancel RUN`"),
    "export": ("ual.training.export", "merge a trained LoRA adapter into a standalone model folder"),
    "export-data": ("ual.training.export_data", "the run's training samples with their score, u, eps and loss "
                                                "weight as dataset columns (jsonl, parquet or a datasets folder), "
                                                "for TRL, axolotl or LLaMA-Factory"),
    "analyze": ("ual.evaluation.analyze", "analyses on their own: `ual analyze clustering RUN` (feature-clustering "
                                          "silhouette over all token pairs, base and each mode); `ual analyze scores "
                                          "RUN` (scores report, rank correlation between scorers)"),
}


# Config sections whose flags each stage's --help lists (beside the shared top-level ones); every
# flag is accepted by every stage. The demo runs them all.
STAGE_SECTIONS = {"data": ("data",), "score": ("data", "score"), "map": ("smoothing",),
                  "train": ("data", "smoothing", "train"), "eval": ("data", "eval"), "report": ("eval",)}


def default_demo_config() -> Path:
    for candidate in (Path("configs/demo.yaml"), Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError("configs/demo.yaml not found: pass --config")


class Parser(argparse.ArgumentParser):
    """Whole flag names only (`--train.lr` is not `--train.lr_scheduler`); an error is one line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def unknown_flags_error(parser: argparse.ArgumentParser, extras: list[str]):
    """Fail on the first unrecognised argument, naming it and the flags it is close to."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    for item in extras:
        if item.startswith("-") and len(item) > 1 and not item[1:2].isdigit():
            name = item.split("=", 1)[0]
            close = close_matches(name, flags)
            parser.error(f"unknown flag {name}" + (f"; did you mean {' or '.join(close)}?" if close else "")
                         + f" (`{parser.prog} --help` lists its flags)")
    parser.error(f"unexpected argument(s): {' '.join(extras)}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ual", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parser.stage_parsers = {}
    for name, help_text in STAGES.items():
        p = parser.stage_parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML experiment config (same as --config) or a run folder")
        add_config_flags(p, STAGE_SECTIONS.get(name))
        p.add_argument("--force", action="store_true", help="redo work whose outputs already exist (train, eval)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        if name == "train":
            p.add_argument("--dry-run", action="store_true", help="validate the config, resolve data and model "
                           "(config only, no weights) and print a memory/time estimate; train nothing")
            p.add_argument("--resume", action="store_true", help="resume unfinished modes from their newest checkpoint")
        if name == "score":
            p.add_argument("--judge", choices=("openai", "local"), help="score with a judge LLM: 'openai' (any "
                           "OpenAI-compatible endpoint, = --score.scorer judge) or 'local' (a transformers model, "
                           "= --score.scorer local_judge); with --judge, --model names the judge model, e.g. "
                           "`ual score RUN --judge openai --model gpt-4o-mini`")
            p.add_argument("--base-url", dest="cfg:score.base_url", default=argparse.SUPPRESS, metavar="URL",
                           help="the judge's OpenAI-compatible endpoint (= --score.base_url)")
            p.add_argument("--dry-run", action="store_true", help="print the requests, estimated tokens and cost "
                           "the judge would take; send nothing (= --score.dry_run true)")
        if name == "eval":
            from ual.evaluation.harness import TASK_SPEC_HELP

            p.add_argument("--tasks", help="run only these benchmarks through lm-evaluation-harness (comma-separated): "
                           + TASK_SPEC_HELP)
            p.add_argument("--adapter", help="evaluate the config's model with this LoRA adapter (or this model "
                           "folder) instead of eval.models")
    for name, (module, help_text) in COMMANDS.items():
        p = parser.stage_parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        unknown_flags_error(parser.stage_parsers[args.stage], extras)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "config_file", None):
        if getattr(args, "config", None) not in (None, args.config_file):
            print(f"ual {args.stage}: error: two configs given ({args.config_file} and --config {args.config})", file=sys.stderr)
            return 2
        args.config = args.config_file
    try:
        if getattr(args, "config_file", None) and Path(args.config_file).is_dir():  # a run folder: its config
            run = RunFolder(Path(args.config_file))
            args.config = str(run.require(run.config, "data"))
            setattr(args, "cfg:run_dir", args.config_file)
        if args.stage == "demo" and args.config is None:
            args.config = str(default_demo_config())
        if args.stage == "score":
            _score_shortcuts(args)
        if args.stage == "ablate":
            result = _ablate(args)
        elif args.stage in COMMANDS:
            result = importlib.import_module(COMMANDS[args.stage][0]).run(args)
        else:
            cfg = config_from_args(args)
            settings = copy.deepcopy(cfg)  # what a successful stage may record: not this command's --tasks, --adapter
            if getattr(args, "resume", False):
                cfg.train.resume = True
            if getattr(args, "tasks", None):  # the benchmarks alone, not the built-in evaluations
                cfg.eval.tasks = split_commas(args.tasks)
                cfg.eval.nll = cfg.eval.gsm8k = cfg.eval.multiple_choice = cfg.eval.clustering = False
                cfg.eval.pairwise, cfg.eval.answers_per_source = [], 0
            if getattr(args, "adapter", None):
                cfg.eval.models, cfg.eval.pairwise = [args.adapter], []
            if getattr(args, "dry_run", False) and args.stage == "train":
                from ual.training.estimate import dry_run

                result = dry_run(cfg)
            else:
                result = run_stage(args.stage, cfg, force=args.force, settings=settings)
    except (ConfigError, MissingExtra, FileNotFoundError, ValueError) as exc:
        print(f"ual {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except BatchesPending as exc:  # not an error: the answers are not in yet
        print(f"ual {args.stage}: {exc}", file=sys.stderr)
        return EXIT_PENDING
    except RunFolderLocked as exc:  # another writer: nothing was changed, the same command works once it is done
        print(f"ual {args.stage}: error: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as exc:  # the machine, not the input: a full disk, an I/O error, a permission
        logging.getLogger("ual").debug("%s failed", args.stage, exc_info=True)  # the traceback with -v
        print(f"ual {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    if args.stage == "score" and result and result.get("unscored"):  # every score got is kept; some are missing
        print(f"ual score: {unscored_message(result)}", file=sys.stderr)
        return EXIT_UNSCORED
    return 0


def _ablate(args) -> dict:
    from ual.training.ablate import parse_modes, parse_sweep

    cfg = config_from_args(args)
    modes = parse_modes(args.modes)
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if args.seeds is not None:
        if sweep is not None:
            raise ValueError("--seeds and --sweep together are not supported: run the sweep per seed with --seed")
        if args.seeds < 1:
            raise ValueError(f"--seeds: expected a positive number of seeds, got {args.seeds}")
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(cfg.run_path):  # the recipe's stages, sub-runs and tables: one writer throughout
        if args.seeds is not None:
            return run_seeds(cfg, modes, args.seeds, evaluate=args.eval, force=args.force)
        return run_ablation(cfg, modes, sweep, evaluate=args.eval, force=args.force)


def _score_shortcuts(args) -> None:
    """`ual score --judge openai --model NAME [--base-url URL] [--dry-run]` as dotted config flags. With
    --judge, --model is the judge (the scoring stage trains nothing), so the run's own model is left alone."""
    if args.judge:
        setattr(args, "cfg:score.scorer", {"openai": "judge", "local": "local_judge"}[args.judge])
        if hasattr(args, "cfg:model"):
            setattr(args, "cfg:score.model", getattr(args, "cfg:model"))
            delattr(args, "cfg:model")
    if args.dry_run:
        setattr(args, "cfg:score.dry_run", True)


if __name__ == "__main__":
    sys.exit(main())
