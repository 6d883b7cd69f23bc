"""One writer per run folder (src/ual/runlock.py), with real processes on a tiny-model run folder.

For `ual score`, `ual train` and `ual eval`: while a first process holds the folder (frozen with SIGSTOP
once its lock file names it, so the race is decided, not timed), a second one of the same command exits
at once with exit 4 and one line naming the holder; commands that only read (a dry run, --help) run
beside it; and the first one, thawed, finishes as if alone. A holder killed with SIGKILL leaves nothing
the next command must clean: it takes the folder at once.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ual.runlock import EXIT_LOCKED, LOCK_NAME, RunFolderLocked, run_folder_lock

HELD_BY_CHILD = """
import sys, time
from ual.runlock import run_folder_lock
with run_folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def ual(*args: str) -> list[str]:
    return [sys.executable, "-m", "ual.cli", *args]


def hold_then_freeze(cmd: list[str], run: Path) -> subprocess.Popen:
    """Start cmd; once the run folder's lock file names it, stop it (SIGSTOP) with the lock held."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if f'"pid": {proc.pid},' in (run / LOCK_NAME).read_text():
                proc.send_signal(signal.SIGSTOP)
                return proc
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise AssertionError(f"{cmd} never held the lock: {proc.communicate()}")


def refused(cmd: list[str], holder: subprocess.Popen, stage: str) -> None:
    """cmd exits with 4 and one line: the folder, the holder's pid, command and start time."""
    t0 = time.time()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == EXIT_LOCKED, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ual {stage}: error: "), second.stderr
    assert f"pid {holder.pid} on " in lines[0] and f"`ual {stage} " in lines[0] and ", since 20" in lines[0]
    assert time.time() - t0 < 120  # at once: no waiting for the holder


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, tiny_model_dir):
    """A tiny-model run folder with samples, scores and smoothing: ready for score, train and eval."""
    from ual.cli import main

    root = tmp_path_factory.mktemp("locked")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something nice #{i}"},
                                                     {"role": "assistant", "content": "Sunsets are lovely. " * (1 + i % 3)}]})
                            + "\n" for i in range(12)))
    cfg = root / "exp.yaml"
    cfg.write_text(f"""
run_dir: {root / 'run'}
model: {tiny_model_dir}
data: {{max_length: 64, sources: [{{name: {chat}, label: chat, train: 8, heldout: 4}}]}}
score: {{batch_size: 4}}
train: {{modes: [sft], max_steps: 2, batch_size: 4}}
eval: {{models: [base], gsm8k: false, multiple_choice: false, clustering: false, pairwise: [], batch_size: 4}}
""")
    for stage in ("data", "score", "map"):
        assert main([stage, str(cfg)]) == 0, stage
    return cfg, root / "run"


@pytest.mark.parametrize("stage", ["score", "train", "eval"])
def test_a_second_writer_is_refused_naming_the_first_which_finishes_alone(scored_run, stage):
    cfg, run = scored_run
    first = hold_then_freeze(ual(stage, str(cfg), "--force"), run)
    try:
        refused(ual(stage, str(cfg), "--force"), first, stage)
        if stage == "train":  # reading commands run beside a writer
            dry = subprocess.run(ual("train", str(cfg), "--dry-run"), capture_output=True, text=True, timeout=300)
            assert dry.returncode == 0, dry.stderr[-2000:]
            assert subprocess.run(ual("score", "--help"), capture_output=True, timeout=300).returncode == 0
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert not (run / LOCK_NAME).exists()  # the folder as the holder found it


def test_a_killed_holder_is_taken_over_at_once(scored_run):
    cfg, run = scored_run
    first = hold_then_freeze(ual("score", str(cfg), "--force"), run)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == first.pid  # what it left: nothing to clean
    after = subprocess.run(ual("score", str(cfg), "--force"), capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-3000:]
    assert not (run / LOCK_NAME).exists()


def test_the_lock_is_reentrant_within_a_process_and_exclusive_between_processes(tmp_path):
    with run_folder_lock(tmp_path):
        with run_folder_lock(tmp_path):  # a recipe running its stages
            held = json.loads((tmp_path / LOCK_NAME).read_text())
        assert (tmp_path / LOCK_NAME).exists()  # still held by the outer block
    assert held["pid"] == os.getpid() and not (tmp_path / LOCK_NAME).exists()

    child = subprocess.Popen([sys.executable, "-c", HELD_BY_CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "held\n"
        with pytest.raises(RunFolderLocked, match=rf"{tmp_path} is being written by another process \(pid "
                                                  rf"{child.pid} on "):
            with run_folder_lock(tmp_path):
                pass
    finally:
        child.kill()
        child.wait()
    with run_folder_lock(tmp_path):  # the dead child's lock went with it
        pass
    assert list(tmp_path.iterdir()) == []
