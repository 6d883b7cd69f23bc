"""`ual score --score.via batch` against a provider that misbehaves (issue 34), through the real CLI and the
loopback Files/Batches server (tests/batch_server.py) whose workers ask the REAL llama.cpp judge.

What is demanded: an output file with lines cut short, junk, duplicate or foreign custom_ids never stops the
run (the good lines are kept, the bad ones named, their requests asked again) and never stops the other
shards; a saved file deleted is downloaded again; a batch is found again after a kill by its input file id
when the provider keeps no metadata, and looked for while the provider's list lags (for score.batch_find_s,
then made anew); samples left unscored end the run with exit 3, their provider's reason stored per sample;
and a second `ual score` on the same folder is refused (exit 4) instead of paying for every batch twice.
"""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from judge_server import chat_run_folder
from test_scoring_batch import (QUESTIONS, batch_args, batches, exit_for, ids_of, make_run,  # noqa: F401
                                scores)  # batches: a fixture
from ual.cli import main
from ual.io import read_jsonl
from ual.runlock import EXIT_LOCKED
from ual.scoring.unscored import EXIT_UNSCORED

pytestmark = pytest.mark.slow


def ual(run, url, *more, kill_at=None, timeout=600) -> subprocess.CompletedProcess:
    """`ual score RUN --score.via batch ...` in its own process (killed with SIGKILL at `kill_at`)."""
    env = {**os.environ, **({"UAL_TEST_KILL_AT": kill_at} if kill_at else {})}
    return subprocess.run([sys.executable, "-m", "ual.cli", "score", str(run), *batch_args(url, *more)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_unreadable_lines_cost_only_their_requests_and_a_deleted_file_is_fetched_again(batches, tmp_path,
                                                                                       tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, 6)
    ids = ids_of(run)
    start, calls = len(batches.created), len(batches.upstream_calls)
    batches.output_faults = {"cut", "junk"}  # the first shard's output file: one line cut short, one of junk
    args = ("--score.max_retries", "0", "--score.batch_max_lines", "3")
    killed = ual(run, batches.url, *args, kill_at="collecting")  # after saving a file, before reading it in
    assert killed.returncode == -9, killed.stderr[-2000:]
    [saved] = (run / "batches").glob("*.output.jsonl")
    saved.unlink()  # what used to end every rerun with "No such file"
    again = ual(run, batches.url, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{saved} is gone; downloading it again" in again.stderr and saved.exists()
    err = killed.stderr + again.stderr
    [note] = {x.split(": ", 2)[2] for x in err.splitlines() if "unreadable line(s)" in x}  # the same, twice
    named = re.findall(r"(\S+\.output\.jsonl), line (\d+): not JSON \('(.)", note)
    assert note.startswith("2 unreadable line(s), their requests asked again: ") and len(named) == 2, note
    spoiled = run / "batches" / f"{batches.created[start]}.output.jsonl"  # the first batch's file: its faults
    assert {c for _, _, c in named} == {"{", "<"} and {f for f, _, _ in named} == {str(spoiled)}  # cut, junk
    made = batches.created[start:]
    assert [len(batches.batches[b].requests) for b in made] == [3, 3, 1]  # the cut line's request, asked again
    sent = Counter(batches.upstream_calls[calls:])
    assert set(sent) == set(ids) and sorted(sent.values()) == [1] * 5 + [2]  # only the lost answer paid twice
    assert all(r["score"] is not None for r in scores(run).values())  # the other shard collected too


def test_duplicate_and_foreign_custom_ids_are_named_in_one_line(batches, tmp_path, tiny_model_dir, caplog):
    run = make_run(tmp_path, tiny_model_dir, 4)
    ids = ids_of(run)
    batches.output_faults = {"duplicate", "foreign"}
    assert main(["score", str(run), *batch_args(batches.url, "--score.max_retries", "0")]) == 0
    [line] = [r.getMessage() for r in caplog.records if "custom_id(s)" in r.getMessage()]
    twice = re.search(r"1 custom_id\(s\) answered more than once \(the first answer kept\): (\S+);", line)
    assert twice and twice.group(1) in ids, line
    assert "1 custom_id(s) never sent in this batch (ignored): " + "f" * 64 + "-0" in line
    sample = read_jsonl(run / "samples.jsonl")[ids.index(twice.group(1))]["id"]
    assert scores(run)[sample]["details"]["answer"] != "Score: 1"  # the first answer, not the second
    assert all(r["score"] is not None for r in scores(run).values())


@pytest.mark.parametrize("fault", ["no_metadata", "list_lags"])
def test_a_batch_created_before_a_kill_is_found_without_metadata_or_while_the_list_lags(batches, tmp_path,
                                                                                        tiny_model_dir, fault):
    run = make_run(tmp_path, tiny_model_dir, 3, fault)
    ids = ids_of(run)
    start, calls = len(batches.created), len(batches.upstream_calls)
    batches.keep_metadata = fault != "no_metadata"
    batches.list_lag_s = 15.0 if fault == "list_lags" else 0.0  # longer than a restart takes
    try:
        killed = ual(run, batches.url, "--score.max_retries", "0", kill_at="created")
        assert killed.returncode == -9, killed.stderr[-2000:]
        again = ual(run, batches.url, "--score.max_retries", "0", "--score.batch_poll_s", "0.5")
    finally:
        batches.keep_metadata, batches.list_lag_s = True, 0.0
    assert again.returncode == 0, again.stderr[-3000:]
    if fault == "list_lags":  # it waited for the list rather than create another
        assert "the provider's list does not show it yet; looking again for up to 600 s" in again.stderr
    assert len(batches.created) - start == 1  # one batch for the one shard
    sent = Counter(batches.upstream_calls[calls:])
    assert set(sent) == set(ids) and max(sent.values()) == 1
    assert len(scores(run)) == 3


def test_a_create_never_seen_is_made_again_after_the_bound(batches, tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, 2)
    start = len(batches.created)
    batches.list_lag_s = 3600.0  # the first batch never shows in the list
    try:
        assert ual(run, batches.url, kill_at="created").returncode == -9
        again = ual(run, batches.url, "--score.batch_find_s", "1", "--score.batch_poll_s", "0.5")
    finally:
        batches.list_lag_s = 0.0
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"the batch create sent \d+ s ago never showed in the provider's list; creating it again "
                     r"\(score\.batch_find_s\)", again.stderr)
    assert len(batches.created) - start == 2 and len(scores(run)) == 2


def test_a_create_the_provider_refused_is_made_again_at_once(batches, tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir, 2)
    start = len(batches.created)
    batches.refuse_create = 400  # an answer: no batch was made, so there is none to look for
    assert main(["score", str(run), *batch_args(batches.url)]) == 1
    assert "Injected 400: this batch was not created" in capsys.readouterr().err
    t0 = time.time()
    assert main(["score", str(run), *batch_args(batches.url)]) == exit_for(run)
    assert time.time() - t0 < 300  # not after score.batch_find_s (600 s) of looking
    assert len(batches.created) - start == 1 and len(scores(run)) == 2


def test_samples_left_unscored_exit_3_with_the_providers_reason_kept(batches, tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir, 3)
    batches.fail_validation, batches.fail_validation_batches = "token_limit_exceeded", 2  # every round fails
    assert main(["score", str(run), *batch_args(batches.url, "--score.batch_rounds", "2")]) == EXIT_UNSCORED
    out, err = capsys.readouterr()
    summary = json.loads(out[out.rindex('{\n  "scorer"'):])
    assert (summary["scored"], summary["failed"], summary["unscored"]) == (0, 3, 3)
    [last] = [x for x in err.splitlines() if x.startswith("ual score: ")]
    assert last.startswith("ual score: 3 sample(s) left without a score (3 training, 0 held-out): "
                           "token_limit_exceeded: Enqueued token limit reached")
    assert "--score.batch_fallback chat" in last and "--smoothing.missing drop" in last
    for row in scores(run).values():  # the provider's own message, stored with each sample
        assert row["score"] is None and row["details"]["error"].startswith("token_limit_exceeded: Enqueued token")
        assert "no answer after 2 batch rounds" in row["details"]["error"]

    # one final 400 on a held-out sample: counted, warned about and an exit 3 as well
    held = chat_run_folder(tmp_path, tiny_model_dir, QUESTIONS[:4], "held", heldout=1)
    [sample] = read_jsonl(held / "heldout.jsonl")
    [cid] = ids_of(held, "heldout.jsonl")
    batches.line_status[cid] = 400
    assert main(["score", str(held), *batch_args(batches.url)]) == EXIT_UNSCORED
    out, err = capsys.readouterr()
    summary = json.loads(out[out.rindex('{\n  "scorer"'):])
    assert (summary["failed"], summary["heldout_scored"], summary["heldout_failed"]) == (0, 0, 1)
    assert "1 sample(s) left without a score (0 training, 1 held-out): HTTP 400" in err
    [row] = read_jsonl(held / "heldout_scores.jsonl")
    assert row["id"] == sample["id"] and "Injected 400" in row["details"]["error"]


def test_a_second_score_on_the_same_folder_is_refused_and_pays_nothing(batches, tmp_path, tiny_model_dir, capsys):
    run = make_run(tmp_path, tiny_model_dir, 3)
    start = len(batches.created)
    batches.hold = True  # the first one's batch stays in progress while the second starts
    first = subprocess.Popen([sys.executable, "-m", "ual.cli", "score", str(run), *batch_args(batches.url)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(batches.created) == start and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = ual(run, batches.url)
        capsys.readouterr()
        assert main(["batch", "status", str(run)]) == 0  # reads only: beside the writer
        assert [b["status"] for b in json.loads(capsys.readouterr().out)["in_flight"]] == ["in_progress"]
        assert main(["batch", "cancel", str(run)]) == EXIT_LOCKED  # writes the cache: not beside it
        assert f"pid {first.pid} on " in capsys.readouterr().err
    finally:
        batches.hold = False
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == EXIT_LOCKED, second.stderr[-3000:]
    [line] = [x for x in second.stderr.splitlines() if x.startswith("ual score: error:")]
    assert f"pid {first.pid} on " in line and "`ual score " in line and "since " in line
    assert len(batches.created) - start == 1 and len(scores(run)) == 3
    assert not (run / ".ual.lock").exists()
