"""tests/batch_server.py checked against the real `openai` client, with StubJudge as the upstream model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import openai
import pytest
from batch_server import BatchServer
from judge_server import StubJudge

STEP_S = 0.05


@pytest.fixture(scope="module")
def upstream():
    with StubJudge() as stub:
        yield stub


@pytest.fixture
def srv(upstream):
    with BatchServer(upstream=upstream.base_url, step_s=STEP_S) as server:
        yield server


@pytest.fixture
def client(srv):
    return openai.OpenAI(base_url=srv.url, api_key="x", max_retries=0)


def line(cid: str, model: str = "stub", url: str = "/v1/chat/completions") -> dict:
    return {"custom_id": cid, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": f"question {cid}"}]}}


def submit(client, rows: list[dict], **meta):
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    f = client.files.create(file=("input.jsonl", data), purpose="batch")
    assert client.files.content(f.id).content == data
    return client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata=meta or None)


def wait(client, batch_id: str, until=("completed", "failed", "expired", "cancelled"), timeout_s: float = 10):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in until:
            return b
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} still {b.status}")


def rows(client, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []


def test_a_batch_runs_to_completion(srv, client):
    ids = [f"s{i}" for i in range(5)]
    created = submit(client, [line(c) for c in ids], run="r1")
    assert created.status == "validating" and created.metadata == {"run": "r1"}
    b = wait(client, created.id)
    assert b.status == "completed" and b.error_file_id is None
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (5, 5, 0)
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    out = rows(client, b.output_file_id)
    assert sorted(r["custom_id"] for r in out) == ids
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
    assert {r["response"]["body"]["choices"][0]["message"]["content"] for r in out} == {"42"}
    assert client.files.retrieve(b.output_file_id).purpose == "batch_output"
    assert sorted(srv.upstream_calls) == ids and srv.uploads == 1 and srv.created == [b.id]
    assert srv.batches[b.id].metadata == {"run": "r1"} and len(srv.batches[b.id].lines) == 5


@pytest.mark.parametrize("bad, code", [
    ([line("a"), line("a")], "duplicate_custom_id"),
    ([line("a"), line("b", model="other")], "mismatched_model"),
    ([line("a"), line("b", url="/v1/embeddings")], "mismatched_endpoint"),
    (["{not json"], "invalid_json_line"),
])
def test_validation_fails_the_batch(srv, client, bad, code):
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in bad).encode()
    f = client.files.create(file=("bad.jsonl", data), purpose="batch")
    b = wait(client, client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h").id)
    assert b.status == "failed" and b.failed_at and b.output_file_id is None
    assert [(e.code, e.line) for e in b.errors.data] == [(code, len(bad))]
    assert srv.upstream_calls == []


def test_injected_validation_failure_is_one_shot(srv, client):
    srv.fail_validation = "token_limit_exceeded"
    b = wait(client, submit(client, [line("a")]).id)
    assert b.status == "failed" and b.errors.data[0].code == "token_limit_exceeded"
    assert srv.fail_validation is None
    assert wait(client, submit(client, [line("a")]).id).status == "completed"


def test_expiry_runs_some_lines_and_reports_the_rest(srv, client):
    srv.expire_after = 2
    b = wait(client, submit(client, [line(f"s{i}") for i in range(5)]).id)
    assert b.status == "expired" and b.expired_at and b.completed_at is None
    assert len(rows(client, b.output_file_id)) == 2 and len(srv.upstream_calls) == 2
    errors = rows(client, b.error_file_id)
    assert len(errors) == 3 and all(r["error"]["code"] == "batch_expired" and r["response"] is None for r in errors)
    assert (b.request_counts.completed, b.request_counts.failed) == (2, 3)


def test_a_line_status_fault_goes_to_the_error_file_once(srv, client):
    srv.line_status = {"s1": 429}
    b = wait(client, submit(client, [line(f"s{i}") for i in range(3)]).id)
    assert b.status == "completed" and (b.request_counts.completed, b.request_counts.failed) == (2, 1)
    [err] = rows(client, b.error_file_id)
    assert err["custom_id"] == "s1" and err["response"]["status_code"] == 429
    assert "message" in err["response"]["body"]["error"] and "s1" not in srv.upstream_calls
    retry = wait(client, submit(client, [line("s1")]).id)
    assert retry.error_file_id is None and srv.upstream_calls.count("s1") == 1


def test_cancel_a_held_batch(srv, client):
    srv.hold = True
    created = submit(client, [line(f"s{i}") for i in range(5)])
    wait(client, created.id, until=("in_progress",))
    assert client.batches.cancel(created.id).status == "cancelling"
    b = wait(client, created.id)
    assert b.status == "cancelled" and b.cancelled_at and b.output_file_id is None
    assert {r["error"]["code"] for r in rows(client, b.error_file_id)} == {"batch_cancelled"}
    assert srv.upstream_calls == []
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(created.id)


def test_list_paginates_newest_first(srv, client):
    f = client.files.create(file=("in.jsonl", (json.dumps(line("a")) + "\n").encode()), purpose="batch")
    for _ in range(5):
        client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == srv.created[::-1][:2] and first.has_more
    assert [b.id for b in client.batches.list(limit=2, after=first.data[-1].id).data] == srv.created[::-1][2:4]
    assert [b.id for b in client.batches.list(limit=2)] == srv.created[::-1]  # auto-pagination


def test_unknown_ids_and_paths_are_404(srv, client):
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(srv.url + "/nothing", timeout=5)
    assert e.value.code == 404 and "error" in json.loads(e.value.read())


def test_output_faults_spoil_the_next_output_file_once(srv, client):
    srv.shuffle = False
    srv.output_faults = {"cut", "junk", "duplicate", "foreign"}
    b = wait(client, submit(client, [line(f"s{i}") for i in range(4)]).id)
    text = client.files.content(b.output_file_id).text.splitlines()
    assert len(text) == 7  # 4 answers (one cut short), a junk line, a second answer for s0, a foreign id
    readable = []
    for x in text:
        try:
            readable.append(json.loads(x))
        except ValueError:
            pass
    assert len(readable) == 5 and sum(x.startswith("<html>") for x in text) == 1
    ids = [r["custom_id"] for r in readable]
    assert ids.count("s0") == 2 and "s1" not in ids and "f" * 64 + "-0" in ids
    answers = [r["response"]["body"]["choices"][0]["message"]["content"] for r in readable if r["custom_id"] == "s0"]
    assert answers == ["42", "Score: 1"]
    assert srv.output_faults == set()
    clean = wait(client, submit(client, [line("a")]).id)
    assert [r["custom_id"] for r in rows(client, clean.output_file_id)] == ["a"]


def test_no_metadata_a_lagging_list_and_repeated_validation_failures(srv, client):
    srv.keep_metadata, srv.list_lag_s = False, 0.5
    created = submit(client, [line("a")], run="r1")
    assert created.metadata is None and client.batches.retrieve(created.id).metadata is None
    assert [b.id for b in client.batches.list()] == []  # not listed yet
    time.sleep(0.6)
    assert [b.id for b in client.batches.list()] == [created.id]
    srv.list_lag_s = 0
    srv.fail_validation, srv.fail_validation_batches = "token_limit_exceeded", 2
    assert [wait(client, submit(client, [line("a")]).id).status for _ in range(3)] == ["failed", "failed", "completed"]
