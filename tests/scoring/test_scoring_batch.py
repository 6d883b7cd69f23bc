"""`ual score --score.via batch|vllm` through the real CLI, against a loopback Files/Batches server
(tests/batch_server.py) whose workers ask the REAL llama.cpp server: real answers, real log-probabilities.

What is demanded: the batch path gives the chat path's scores; every fault (validation failure, expiry with
partial output, per-line 429 / 400, cancel, no-wait runs, rounds running out) ends with every sample scored
or listed with its reason; and a client killed with SIGKILL at every step (after upload, after create,
after download, inside the collect transaction) creates exactly one batch per shard on rerun and never
sends a request upstream twice (with score.max_retries 0, each request is asked exactly once).
"""

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from batch_server import BatchServer
from judge_server import chat_run_folder
from ual.cli import main
from ual.io import read_jsonl
from ual.scoring.batch_files import custom_id
from ual.scoring.cache import JudgeCache
from ual.scoring.judge import _content_hash
from ual.scoring.prompt import default_prompt
from ual.scoring.unscored import EXIT_UNSCORED

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m-q4_1"
QUESTIONS = ["Name a primary colour.", "What is 7 times 8?", "Write a haiku about rain.", "Capital of France?",
             "Suggest a name for a cat.", "Is 17 prime?", "Translate 'thank you' into Spanish.", "Tell me a joke."]


@pytest.fixture(scope="module")
def batches(server):
    with BatchServer(upstream=server.base_url, step_s=0.05) as srv:
        yield srv


def make_run(tmp_path: Path, tiny_model_dir, n: int, name: str = "run") -> Path:
    return chat_run_folder(tmp_path, tiny_model_dir, QUESTIONS[:n], name)


def judge_args(url: str) -> list[str]:
    return ["--judge", "openai", "--model", MODEL, "--base-url", url]


def batch_args(url: str, *more: str) -> list[str]:
    return [*judge_args(url), "--score.via", "batch", "--score.batch_poll_s", "0.05", *more]


def ids_of(run: Path, file: str = "samples.jsonl") -> list[str]:
    """The custom_id of each training (or held-out) sample's greedy request, in the file's order."""
    return [custom_id(_content_hash(default_prompt().render(s["messages"])[0]), 0) for s in read_jsonl(run / file)]


def scores(run: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(run / "scores.jsonl")}


def exit_for(run: Path) -> int:
    """What `ual score` must exit with for run's scores.jsonl: 0 when every sample has a score, else 3 (the
    small judge sometimes answers with no number at all)."""
    return EXIT_UNSCORED if any(r["score"] is None for r in scores(run).values()) else 0


def test_batch_and_vllm_files_give_the_chat_paths_scores(server, batches, tmp_path, tiny_model_dir):
    by_chat = make_run(tmp_path, tiny_model_dir, 6, "chat")
    by_batch = make_run(tmp_path, tiny_model_dir, 6, "batch")
    by_vllm = make_run(tmp_path, tiny_model_dir, 6, "vllm")
    assert main(["score", str(by_chat), *judge_args(server.base_url)]) == exit_for(by_chat)
    created = len(batches.created)
    # two shards (4 + 2 requests) in flight at once; output lines come back shuffled
    code = main(["score", str(by_batch), *batch_args(batches.url, "--score.batch_max_lines", "4")])
    assert code == exit_for(by_batch)
    assert [len(batches.batches[b].requests) for b in batches.created[created:created + 2]] == [4, 2]
    # vLLM: the first run writes the request files and exits 75 with the commands; `vllm run-batch` is played
    # by answering each line through the same llama.cpp server, in vLLM's output layout, in random order
    assert main(["score", str(by_vllm), *judge_args(server.base_url), "--score.via", "vllm"]) == 75
    for _ in range(3):  # rounds: answers with no score are asked again, as on the chat path
        inputs = [p for p in (by_vllm / "batches").glob("*.input.jsonl")
                  if not Path(str(p).replace(".input.", ".output.")).exists()]
        if not inputs:
            break
        for path in inputs:
            out = []
            for line in path.read_text().splitlines():
                req = json.loads(line)
                status, body = batches.call_upstream(req["url"], req["body"])
                out.append({"id": "vllm-" + req["custom_id"][:8], "custom_id": req["custom_id"], "error": None,
                            "response": {"status_code": status, "request_id": "r", "body": body}})
            random.shuffle(out)
            Path(str(path).replace(".input.", ".output.")).write_text("".join(json.dumps(o) + "\n" for o in out))
        code = main(["score", str(by_vllm), *judge_args(server.base_url), "--score.via", "vllm"])
        assert code in (0, 75, EXIT_UNSCORED)
    assert code == exit_for(by_vllm)
    chat, batch, vllm = scores(by_chat), scores(by_batch), scores(by_vllm)
    assert chat.keys() == batch.keys() == vllm.keys()
    first_try = 0
    for sid, row in chat.items():
        for other in (batch[sid], vllm[sid]):
            assert (row["score"] is None) == (other["score"] is None) or row["details"].get("attempts", 1) > 1
            if row["score"] is not None and row["details"]["attempts"] == 1 and other["details"]["attempts"] == 1:
                # the same greedy request to the same server: the same answer and log-probabilities
                assert other["score"] == pytest.approx(row["score"], abs=1e-9)
                assert other["details"]["answer"] == row["details"]["answer"]
                first_try += 1
    assert first_try >= 2, "too few samples answered at the first try to compare the two paths"


def test_expired_and_failed_batches_keep_their_answers_and_resubmit_only_the_rest(batches, tmp_path, tiny_model_dir,
                                                                                  caplog):
    for fault, value, sizes, status in (("fail_validation", "token_limit_exceeded", [4, 4], "failed"),
                                        ("expire_after", 1, [4, 3], "expired")):  # one answer, three expired
        run = make_run(tmp_path, tiny_model_dir, 4, fault)
        ids = ids_of(run)
        start, calls = len(batches.created), len(batches.upstream_calls)
        setattr(batches, fault, value)  # taken by the next batch created
        assert main(["score", str(run), *batch_args(batches.url, "--score.max_retries", "0")]) == exit_for(run)
        made = batches.created[start:]
        assert [len(batches.batches[b].requests) for b in made] == sizes  # then only what is missing
        assert batches.batches[made[0]].status == status
        sent = Counter(batches.upstream_calls[calls:])
        assert set(sent) == set(ids) and max(sent.values()) == 1  # nothing paid twice
        rows = scores(run)
        assert len(rows) == 4 and all(r["score"] is not None or r["details"]["error"] for r in rows.values())
    assert "token_limit_exceeded" in caplog.text and "Enqueued token limit" in caplog.text  # the reason, shown


def test_line_errors_are_retried_or_final_and_rounds_run_out(server, batches, tmp_path, tiny_model_dir):
    run = make_run(tmp_path, tiny_model_dir, 4)
    ids = ids_of(run)
    start = len(batches.created)
    batches.line_status.update({ids[0]: 429, ids[1]: 400, ids[2]: 500})
    assert main(["score", str(run), *batch_args(batches.url, "--score.max_retries", "0")]) == EXIT_UNSCORED
    assert len(batches.created) - start == 2  # the 429 and the 500 in a second round; the 400 is final
    rows = list(scores(run).values())
    assert rows[1]["score"] is None and "HTTP 400" in rows[1]["details"]["error"]
    with JudgeCache(run / "judge_cache.sqlite") as cache:
        got = cache.lookup(MODEL, default_prompt().version, [i.rsplit("-", 1)[0] for i in ids])
    assert all(got[(i.rsplit("-", 1)[0], 0)]["record"].get("batch") for i in (ids[0], ids[2]))

    # one round only: a 429 is left unanswered and listed as such; with the chat fallback it is answered
    other = make_run(tmp_path, tiny_model_dir, 3, "fallback")
    oid = ids_of(other)
    batches.line_status[oid[0]] = 429
    assert main(["score", str(other), *batch_args(batches.url, "--score.batch_rounds", "1")]) == EXIT_UNSCORED
    assert "no answer after 1 batch rounds" in scores(other)[read_jsonl(other / "samples.jsonl")[0]["id"]][
        "details"]["error"]
    batches.line_status[oid[0]] = 429
    chat_calls = batches.chat_calls
    assert main(["score", str(other), *batch_args(batches.url, "--score.batch_rounds", "1", "--score.batch_fallback",
                                                  "chat")]) == exit_for(other)
    assert batches.chat_calls > chat_calls
    row = scores(other)[read_jsonl(other / "samples.jsonl")[0]["id"]]
    assert "batch rounds" not in str(row["details"].get("error"))  # asked through the chat path this time


def test_no_wait_status_cancel_and_the_chat_path_refusing_beside_batches(server, batches, tmp_path, tiny_model_dir,
                                                                         capsys):
    run = make_run(tmp_path, tiny_model_dir, 3)
    config = (run / "config.yaml").read_bytes()
    start = len(batches.created)
    batches.hold = True
    try:
        assert main(["score", str(run), *batch_args(batches.url, "--score.batch_wait", "false")]) == 75
        assert "still running" in capsys.readouterr().err
        assert (run / "config.yaml").read_bytes() == config and not (run / "scores.jsonl").exists()
        assert main(["batch", "status", str(run)]) == 0
        status = json.loads(capsys.readouterr().out)
        assert len(status["in_flight"]) == 1 and status["in_flight"][0]["status"] == "in_progress"
        # the chat path would pay again for what the batch is asking: refused, saying how to collect
        assert main(["score", str(run), *judge_args(server.base_url)]) == 2
        assert "still in flight" in capsys.readouterr().err
        assert main(["batch", "cancel", str(run)]) == 0
    finally:
        batches.hold = False
    assert main(["score", str(run), *batch_args(batches.url)]) == exit_for(run)  # collects the cancelled one
    assert batches.batches[batches.created[start]].status == "cancelled"
    assert len(batches.created) - start >= 2
    assert len(scores(run)) == 3
    assert main(["batch", "status", str(run)]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.rindex('{\n  "action"'):])["in_flight"] == []


@pytest.mark.parametrize("point", ["uploaded", "created", "downloaded", "collecting"])
def test_a_client_killed_at_every_step_never_pays_twice(batches, tmp_path, tiny_model_dir, point):
    run = make_run(tmp_path, tiny_model_dir, 3)
    ids = ids_of(run)
    start, calls = len(batches.created), len(batches.upstream_calls)
    cmd = [sys.executable, "-m", "ual.cli", "score", str(run), *batch_args(batches.url, "--score.max_retries", "0")]
    killed = subprocess.run(cmd, env={**os.environ, "UAL_TEST_KILL_AT": point}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (run / "scores.jsonl").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == exit_for(run), again.stderr[-2000:]
    assert len(batches.created) - start == 1  # exactly one batch for the one shard, whatever the kill point
    sent = Counter(batches.upstream_calls[calls:])
    assert set(sent) == set(ids) and max(sent.values()) == 1  # each request answered (and paid for) once
    with JudgeCache(run / "judge_cache.sqlite") as cache:
        assert cache.count(judge=MODEL) == 3
    assert len(scores(run)) == 3
