"""The CLI and its config under malformed input, a missing optional package, and position-biased
multiple choice. Every case runs the real `ual` in a subprocess.

A malformed flag, config file or run folder must end with a non-zero exit and one line on stderr that
names the file or flag and the field, with no traceback; the inputs stay as they were and nothing is
written. Numeric strings (`3e-4`, which PyYAML reads as a string) are numbers. A missing optional
package stops the stage at once with the extra to install. Multiple choice reports accuracy by gold
position and the positions answered, with the choices shuffled per question or (flag) in the order given.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Runs `ual` with some packages unimportable, as if they were not installed: argv[1] lists them.
BLOCKER = """
import sys
blocked = set(sys.argv[1].split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Blocker())
from ual.cli import main
sys.exit(main(sys.argv[2:]))
"""


def ual(cwd: Path, *args: str, block: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", BLOCKER, ",".join(block), *args] if block else [sys.executable, "-m", "ual.cli", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def assert_one_line_error(proc, *needles: str) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """A folder with a small chat file, a valid config over it, a plain file and an empty folder."""
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say hi #{i}"},
                                                     {"role": "assistant", "content": "Hi there. " * (1 + i % 3)}]})
                            + "\n" for i in range(8)))
    (tmp_path / "afile.txt").write_text("not a folder\n")
    (tmp_path / "adir").mkdir()
    base = {"name": "rel", "run_dir": str(tmp_path / "run"), "model": str(tiny_model_dir),
            "data": {"max_length": 64, "sources": [{"name": str(chat), "label": "chat", "train": 6, "heldout": 2}]}}
    return tmp_path, base


def write_config(tmp: Path, config: dict) -> Path:
    path = tmp / "exp.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- malformed flags and configs

# (id, changes to the valid config, arguments ({cfg}: its path, {tmp}: the folder), what the line names)
CASES = [
    # flags: whole names only, unknown ones named with what they are close to
    ("prefix-flag", {}, ["data", "{cfg}", "--train.lr", "0.01"], ["--train.lr", "--train.lr_scheduler"]),
    ("prefix-flag-equals", {}, ["data", "{cfg}", "--score.conc=8"], ["--score.conc", "--score.concurrency"]),
    ("unknown-flag", {}, ["data", "{cfg}", "--train.max_stepz", "5"], ["--train.max_stepz", "--train.max_steps"]),
    ("misspelled-section-flag", {}, ["data", "{cfg}", "--trian.max_steps", "5"], ["--trian.max_steps", "--train.max_steps"]),
    ("unknown-command-flag", {}, ["ablate", "{cfg}", "--sweeps", "0.1"], ["--sweeps", "--sweep"]),
    ("bad-flag-choice", {}, ["score", "{cfg}", "--judge", "gpt"], ["--judge", "'gpt'"]),
    # flag values: named by the flag, whatever the config file says
    ("flag-int-gets-string", {}, ["data", "{cfg}", "--train.max_steps", "ten"], ["--train.max_steps", "integer", "'ten'"]),
    ("flag-float-gets-list", {}, ["data", "{cfg}", "--train.learning_rate", "[0.1, 0.2]"],
     ["--train.learning_rate", "number", "[0.1, 0.2]"]),
    ("flag-float-gets-bool", {}, ["data", "{cfg}", "--smoothing.target_mean", "true"],
     ["--smoothing.target_mean", "number", "True"]),
    ("flag-bool-gets-word", {}, ["data", "{cfg}", "--eval.mc_shuffle", "maybe"], ["--eval.mc_shuffle", "true/false"]),
    ("flag-bad-choice", {}, ["data", "{cfg}", "--train.loss", "fast"], ["--train.loss", "chunked", "'fast'"]),
    ("flag-bad-choice-near-miss", {}, ["data", "{cfg}", "--score.scorer", "entropi"], ["--score.scorer", "'entropy'"]),
    ("flag-not-yaml", {}, ["data", "{cfg}", "--train.modes", "[sft,"], ["--train.modes", "[sft,"]),
    ("flag-run-dir-is-file", {}, ["data", "{cfg}", "--run_dir", "{tmp}/afile.txt"], ["--run_dir", "afile.txt", "is a file"]),
    ("flag-into-non-mapping-section", {"train": 5}, ["data", "{cfg}", "--train.max_steps", "3"], ["exp.yaml:train", "5"]),
    # config file values: named by file and field path
    ("yaml-int-gets-string", {"train": {"max_steps": "ten"}}, ["data", "{cfg}"], ["exp.yaml:train.max_steps", "'ten'"]),
    ("yaml-float-gets-list", {"train": {"learning_rate": [0.1]}}, ["data", "{cfg}"],
     ["exp.yaml:train.learning_rate", "number", "[0.1]"]),
    ("yaml-float-gets-bool", {"smoothing": {"target_mean": True}}, ["data", "{cfg}"],
     ["exp.yaml:smoothing.target_mean", "True"]),
    ("yaml-bad-choice", {"smoothing": {"normalize": "maxx"}}, ["data", "{cfg}"],
     ["exp.yaml:smoothing.normalize", "'maxx'", "rank"]),
    ("yaml-bad-choice-used-later", {"data": {"on_error": "ignore"}}, ["data", "{cfg}"], ["exp.yaml:data.on_error", "'ignore'"]),
    ("yaml-bad-source-field", {"data": {"sources": [{"name": "gsm8k", "train": "many"}]}}, ["data", "{cfg}"],
     ["exp.yaml:data.sources[0].train", "'many'"]),
    ("yaml-unknown-key", {"train": {"learning_rat": 0.1}}, ["data", "{cfg}"], ["exp.yaml:train", "'learning_rat'",
                                                                             "train.learning_rate"]),
    ("yaml-misspelled-section", {"trian": {"max_steps": 1}}, ["data", "{cfg}"], ["exp.yaml", "'trian'", "did you mean 'train'"]),
    # ranges, choices of list entries and rules between fields: checked as each section is built, named the same way
    ("yaml-out-of-range", {"train": {"learning_rate": 0}}, ["data", "{cfg}"],
     ["exp.yaml:train.learning_rate", "more than 0", "got 0"]),
    ("yaml-out-of-range-in-source", {"data": {"sources": [{"name": "gsm8k", "heldout": -2}]}}, ["data", "{cfg}"],
     ["exp.yaml:data.sources[0].heldout", "at least 0", "-2"]),
    ("yaml-out-of-range-in-mapping", {"score": {"prior": {"chat": 1.5}}}, ["data", "{cfg}"],
     ["exp.yaml:score.prior.chat", "[0, 1]", "1.5"]),
    ("yaml-bad-mode", {"train": {"modes": ["sft", "ual+dpo"]}}, ["data", "{cfg}"],
     ["exp.yaml:train.modes[1]", "'ual+dpo'", "sft, ls, ual, ppl, dft, eaft, ual+dft, ual+eaft", "'ual+dft'"]),
    ("yaml-fields-disagree", {"smoothing": {"target_mean": 0.5, "eps_max": 0.4}}, ["data", "{cfg}"],
     ["exp.yaml:smoothing.target_mean", "less than eps_max (0.4)", "0.5"]),
    ("flag-out-of-range", {}, ["data", "{cfg}", "--smoothing.target_mean", "1.5"],
     ["--smoothing.target_mean", "[0, 1)", "1.5"]),
    ("flag-bad-mode", {}, ["data", "{cfg}", "--train.modes", "sft,nope"], ["--train.modes", "'nope'", "ual+eaft"]),
    ("yaml-run-dir-is-file", {"run_dir": "{tmp}/afile.txt"}, ["data", "{cfg}"], ["exp.yaml:run_dir", "is a file"]),
    ("yaml-run-dir-under-file", {"run_dir": "{tmp}/afile.txt/run"}, ["data", "{cfg}"], ["exp.yaml:run_dir", "afile.txt"]),
    # the config file itself
    ("config-missing", None, ["data", "--config", "{tmp}/nope.yaml"], ["nope.yaml", "no such config file"]),
    ("config-is-a-folder", None, ["data", "--config", "{tmp}/adir"], ["adir", "folder"]),
    ("config-invalid-yaml", b"name: x\ntrain: [1,\n", ["data", "{cfg}"], ["exp.yaml:3", "not valid YAML"]),
    ("config-not-a-mapping", b"- name\n- x\n", ["data", "{cfg}"], ["exp.yaml", "mapping"]),
    ("config-not-utf8", b"name: caf\xe9\n", ["data", "{cfg}"], ["exp.yaml", "UTF-8"]),
]


def fill(text: str, tmp: Path, cfg: Path) -> str:
    return text.replace("{cfg}", str(cfg)).replace("{tmp}", str(tmp))


@pytest.mark.parametrize("changes, args, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_input_is_one_clear_line_and_writes_nothing(workspace, changes, args, needles):
    tmp, base = workspace
    cfg = tmp / "exp.yaml"
    if isinstance(changes, bytes):
        cfg.write_bytes(changes)
    elif changes is not None:
        filled = json.loads(fill(json.dumps(changes), tmp, cfg))
        write_config(tmp, merge(base, filled))
    before = snapshot(tmp)
    proc = ual(tmp, *[fill(a, tmp, cfg) for a in args])
    assert_one_line_error(proc, *[fill(n, tmp, cfg) for n in needles])
    assert snapshot(tmp) == before


def unwritable_run_dir(tmp: Path) -> Path:
    """A run folder that cannot be created: below a read-only folder, or (as root, whom permissions do
    not stop) in a kernel file system that refuses new folders."""
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").mkdir()
    except OSError:
        return locked / "run"
    (locked / "probe").rmdir()
    locked.chmod(0o700)
    locked.rmdir()
    for candidate in (Path("/sys/ual-reliability-run"), Path("/proc/ual-reliability-run")):
        try:
            candidate.mkdir()
        except OSError:
            return candidate
        candidate.rmdir()
    pytest.skip("no folder here refuses to be created")


def test_unwritable_run_dir_is_one_clear_line(workspace):
    tmp, base = workspace
    run = unwritable_run_dir(tmp)
    cfg = write_config(tmp, merge(base, {"run_dir": str(run)}))
    before = snapshot(tmp)
    proc = ual(tmp, "data", str(cfg))
    assert_one_line_error(proc, f"{cfg}:run_dir", "cannot write", str(run))
    assert snapshot(tmp) == before and not run.exists()


@pytest.mark.parametrize("changes, flags", [
    ({"train": {"learning_rate": "3e-4", "max_steps": "10", "epochs": "2"}, "smoothing": {"target_mean": ".25"}}, []),
    ({}, ["--train.learning_rate", "3e-4", "--train.max_steps", "10", "--train.epochs", "2", "--smoothing.target_mean",
          "2.5e-1"]),
], ids=["yaml", "flags"])
def test_numeric_strings_are_numbers(workspace, changes, flags):
    tmp, base = workspace
    cfg = write_config(tmp, merge(base, changes))
    proc = ual(tmp, "data", str(cfg), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((tmp / "run" / "config.yaml").read_text())
    assert saved["train"]["learning_rate"] == 3e-4 and saved["train"]["max_steps"] == 10
    assert isinstance(saved["train"]["max_steps"], int) and saved["train"]["epochs"] == 2.0
    assert saved["smoothing"]["target_mean"] == 0.25


STAGES = ["data", "score", "map", "train", "eval", "report", "demo", "ablate", "select", "export", "analyze"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_help(tmp_path, stage):
    """`ual STAGE --help` lists every config flag (a `%` in a field's help once crashed it)."""
    proc = ual(tmp_path, stage, "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if stage == "eval":
        assert "--eval.mc_shuffle" in proc.stdout and "seeded order" in proc.stdout


# --------------------------------------------------------------------------- a missing optional package

@pytest.mark.parametrize("how", ["packaged", "file", "config"])
def test_missing_lm_eval_names_the_extra(workspace, how):
    tmp, base = workspace
    quiz = write_quiz(tmp / "quiz.jsonl", 4)
    tasks = {"packaged": "mmlu_packaged", "file": f"mc:{quiz}", "config": None}[how]
    cfg = write_config(tmp, merge(base, {"eval": {"tasks": ["mmlu_packaged"]}} if tasks is None else base))
    before = snapshot(tmp)
    proc = ual(tmp, "eval", str(cfg), *(["--tasks", tasks] if tasks else []), block=("lm_eval",))
    assert_one_line_error(proc, "lm_eval", "pip install 'ual[eval]'")
    assert snapshot(tmp) == before


def test_deepspeed_launch_without_deepspeed_names_the_extra(workspace):
    """Under `accelerate launch` with a DeepSpeed config (the environment it sets), training without
    DeepSpeed installed stops before anything is written, naming the extra."""
    tmp, base = workspace
    cfg = write_config(tmp, base)
    before = snapshot(tmp)
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "deepspeed", "train", str(cfg)], cwd=tmp,
                          capture_output=True, text=True, timeout=900, env=env)
    assert_one_line_error(proc, "deepspeed", "pip install 'ual[deepspeed]'")
    assert snapshot(tmp) == before


# --------------------------------------------------------------------------- multiple choice and position bias

def write_quiz(path: Path, n: int) -> Path:
    """n four-choice questions whose right answer is always the first choice (position A)."""
    rows = [{"question": f"Which number is {i} + 1?", "choices": [str(i + 1), str(i + 2), str(i + 3), str(i + 7)],
             "answer": "A"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_positions(pos: dict, n: int, shuffled: bool, accuracy: float) -> None:
    assert sum(pos["gold"].values()) == sum(pos["pred"].values()) == n
    hit = sum((pos["accuracy_by_gold"][x] or 0) * k for x, k in pos["gold"].items())
    assert hit / n == pytest.approx(accuracy)
    if shuffled:  # the right answers moved off A, to at least two positions
        assert pos["gold"]["A"] < n and sum(k > 0 for k in pos["gold"].values()) >= 2
        assert sum(v is not None for v in pos["accuracy_by_gold"].values()) >= 2
    else:  # the order given: every right answer at A
        assert pos["gold"] == {"A": n, "B": 0, "C": 0, "D": 0}
        assert [pos["accuracy_by_gold"][x] for x in "BCD"] == [None, None, None]


@pytest.mark.parametrize("shuffled", [True, False], ids=["shuffled", "order-given"])
def test_mc_positions_builtin_and_lm_eval(workspace, shuffled):
    pytest.importorskip("lm_eval")
    tmp, base = workspace
    n = 16
    quiz = write_quiz(tmp / "quiz.jsonl", n)
    cfg = write_config(tmp, merge(base, {"eval": {
        "models": ["base"], "nll": False, "gsm8k": False, "clustering": False, "pairwise": [], "compare": [],
        "mc_file": str(quiz), "mc_limit": None, "mc_samples": 0, "mc_acc_norm": False, "batch_size": 8}}))
    flags = [] if shuffled else ["--eval.mc_shuffle", "false"]
    quiz_text = quiz.read_text()
    run = tmp / "run"

    proc = ual(tmp, "eval", str(cfg), *flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mc = json.loads((run / "eval" / "base.json").read_text())["multiple_choice"]
    assert mc["shuffled"] is shuffled
    check_positions(mc["positions"], n, shuffled, mc["accuracy"])
    items = [json.loads(x) for x in (run / "eval" / "items" / "base.mc.jsonl").read_text().splitlines()]
    assert {x: sum(r["answer"] == x for r in items) for x in "ABCD"} == mc["positions"]["gold"]

    proc = ual(tmp, "eval", str(cfg), *flags, "--tasks", f"mc:{quiz}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads((run / "eval" / "tasks" / "base.json").read_text())
    assert bench["config"]["mc_shuffle"] is shuffled
    check_positions(bench["positions"]["mc_quiz"], n, shuffled, bench["results"]["mc_quiz"]["acc"])
    assert bench["positions"]["mc_quiz"]["gold"] == mc["positions"]["gold"]  # the same shuffle on both paths

    proc = ual(tmp, "report", str(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (run / "report.md").read_text()
    order = "shuffled" if shuffled else "order given"
    assert "## Multiple choice by answer position" in report
    assert f"| base | {order} |" in report and f"| base, mc_quiz (lm-eval) | {order} |" in report
    assert quiz.read_text() == quiz_text
