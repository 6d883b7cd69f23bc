"""Batch request files (ual.scoring.batch_files): shards within every limit, each kind of output line judged as
the chat path judges it, and the batch dry run through the real CLI (fast: nothing is sent)."""

import json

import pytest

from judge_server import chat_run_folder, completion
from ual.scoring.batch_files import (cache_key, custom_id, cut_shards, line_outcome, pick_answers, read_lines,
                                     request_line)


def test_custom_id_is_the_cache_key_and_lines_are_the_chat_request():
    cid = custom_id("ab" * 32, 3)
    assert cache_key(cid) == ("ab" * 32, 3)
    line = json.loads(request_line(cid, {"model": "m", "messages": [{"role": "user", "content": "é"}]}))
    assert line == {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "é"}]}}


@pytest.mark.parametrize("limits, expected", [
    ((2, 10_000, None), [(0, 2), (2, 4), (4, 5)]),          # lines per file
    ((50, 250, None), [(0, 2), (2, 4), (4, 5)]),             # bytes per file: 100 each, 250 at most
    ((50, 10_000, 25.0), [(0, 2), (2, 4), (4, 5)]),          # queued tokens: 10 each, 25 at most
    ((50, 10_000, None), [(0, 5)]),
])
def test_shards_respect_every_limit(limits, expected):
    assert cut_shards([(100, 10.0)] * 5, *limits) == expected


def test_a_request_over_a_limit_on_its_own_is_named():
    with pytest.raises(ValueError, match="request 2 alone is over a batch limit"):
        cut_shards([(10, 1.0), (500, 1.0)], 10, 100)
    assert cut_shards([], 10, 100) == []


def ok_line(text="Score: 80", logprobs=None):
    return {"custom_id": "x-0", "response": {"status_code": 200, "body": completion(text, logprobs)}, "error": None}


def err_line(status, message, param=None):
    return {"custom_id": "x-0", "error": None, "response": {"status_code": status, "body": {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}}}


SENT = ("model", "messages", "max_tokens", "temperature", "logprobs", "top_logprobs")


@pytest.mark.parametrize("line, kind, reason", [
    (ok_line(), "ok", None),
    (ok_line("I cannot rate this."), "unusable", "unparseable answer"),
    (err_line(429, "Rate limit reached"), "retry", "HTTP 429"),
    (err_line(500, "The server had an error"), "retry", "HTTP 500"),
    (err_line(400, "Invalid 'messages'"), "final", "HTTP 400"),
    (err_line(400, "logprobs are not supported with this model", "logprobs"), "refused:logprobs", "logprobs"),
    (err_line(404, "The model `x` does not exist"), "final", "HTTP 404"),
    ({"custom_id": "x-0", "response": None, "error": {"code": "batch_expired", "message": "not run in time"}},
     "retry", "batch_expired"),
    ({"custom_id": "x-0", "response": {"status_code": 200, "body": {"choices": []}}, "error": None},
     "unusable", "empty choices"),
])
def test_each_kind_of_line_is_judged_as_the_chat_path_judges_it(line, kind, reason):
    got = line_outcome(line, 0.0, SENT, lambda text: text)
    assert got.kind == kind
    if reason:
        assert reason in got.reason
    else:
        assert got.record["score"] == 80 and got.record["temperature"] == 0.0 and got.usage == (100, 2)


def test_unreadable_lines_are_named_with_their_line_and_cost_only_themselves():
    good, bad = read_lines(b'{"custom_id": "a-0"}\n{oops\n\n{"id": 1}\n[1]\n{"custom_id": "b-0", "x": \xff1}\n'
                           b'{"custom_id": "c-0"}', "out.jsonl")
    assert [g["custom_id"] for g in good] == ["a-0", "c-0"]
    assert bad == ["out.jsonl, line 2: not JSON ('{oops')", "out.jsonl, line 4: no custom_id",
                   "out.jsonl, line 5: no custom_id", "out.jsonl, line 6: not JSON ('{\"custom_id\": \"b-0\", \"x\": \ufffd1}')"]


def test_answers_are_picked_output_first_and_odd_ids_are_counted_and_named():
    def lines(*pairs):
        return "".join(json.dumps({"custom_id": c, "response": {"status_code": s}}) + "\n" for c, s in pairs).encode()

    sent = {f"s{i}-0" for i in range(8)}
    output = lines(("s0-0", 200), ("s1-0", 200), ("s0-0", 201), ("zz-0", 200), ("s2-0", 200), ("s2-0", 202),
                   *[(f"x{i}-0", 200) for i in range(4)]) + b"{cut\n"
    errors = lines(("s1-0", 500), ("s3-0", 429), ("s3-0", 500))
    chosen, notes, unreadable = pick_answers([("out.jsonl", output), ("err.jsonl", errors)], sent)
    assert {c: line["response"]["status_code"] for c, line in chosen.items()} == {
        "s0-0": 200, "s1-0": 200, "s2-0": 200, "s3-0": 429}  # the first line wins; the output file first
    assert unreadable == 1 and notes == [
        "1 unreadable line(s), their requests asked again: out.jsonl, line 11: not JSON ('{cut')",
        "4 custom_id(s) answered more than once (the first answer kept): s0-0, s2-0, s1-0, ...",
        "5 custom_id(s) never sent in this batch (ignored): zz-0, x0-0, x1-0, ..."]
    assert pick_answers([("out.jsonl", lines(("s0-0", 200)))], sent)[1:] == ([], 0)  # a clean file: nothing said


def test_the_batch_dry_run_prints_files_and_the_batch_price_and_changes_nothing(tmp_path, tiny_model_dir, capsys):
    from ual.cli import main

    run = chat_run_folder(tmp_path, tiny_model_dir, [f"Name a colour #{i}" for i in range(5)])
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    judge = ["--judge", "openai", "--model", "gpt-4o-mini", "--base-url", "http://127.0.0.1:9/v1"]
    assert main(["score", str(run), *judge, "--dry-run", "--score.via", "batch", "--score.batch_max_lines", "2"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.rindex('{\n  "dry_run"'):])["dry_run"]
    assert plan["via"] == "batch" and plan["requests"] == 5 and [s["requests"] for s in plan["shards"]] == [2, 2, 1]
    assert main(["score", str(run), *judge, "--dry-run"]) == 0
    out = capsys.readouterr().out
    chat_plan = json.loads(out[out.rindex('{\n  "dry_run"'):])["dry_run"]
    assert plan["est_cost_usd"] == pytest.approx(chat_plan["est_cost_usd"] / 2)
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # a scorer that asks no endpoint has nothing to batch: one line, not a silent chat run
    assert main(["score", str(run), "--score.scorer", "entropy", "--score.via", "batch"]) == 2
    assert "score.via: batch files are for a judge endpoint" in capsys.readouterr().err
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
