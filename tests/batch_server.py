"""A loopback stand-in for OpenAI's Files and Batches API, for testing a batch client with the real `openai` package.

    with StubJudge() as up, BatchServer(upstream=up.base_url) as srv:
        client = openai.OpenAI(base_url=srv.url, api_key="x")

It serves POST /v1/files (multipart), GET /v1/files/{id}, GET /v1/files/{id}/content, DELETE /v1/files/{id},
POST /v1/batches, GET /v1/batches (newest first; `limit`, `after`), GET /v1/batches/{id} and
POST /v1/batches/{id}/cancel. A worker thread per batch walks it through OpenAI's statuses on the server's own
clock (validating -> in_progress -> finalizing -> completed, each step at least `step_s` after the previous),
answering its lines one at a time by POSTing each line's body to the `upstream` OpenAI-compatible server.
Output and error files are written the way OpenAI writes them.

Faults, plain attributes a test may set at any time (one-shot ones are taken by the next batch created):
  shuffle          output (and error) lines in a random order (default True)
  fail_validation  a code, e.g. "token_limit_exceeded": the next batch fails validation with it (one-shot;
                   fail_validation_batches: how many batches in a row, default 1)
  expire_after     N: the next batch runs N lines, then expires; the rest go to the error file (one-shot)
  line_status      {custom_id: HTTP status}: that line gets that error instead of asking upstream (used once)
  hold             while True, in-progress batches run no lines (cancel them, kill a client mid-batch)
  output_faults    a set of what is wrong with the next batch's output file (one-shot): "cut" (a line cut short
                   mid-JSON), "junk" (a non-JSON line, a proxy's error page, between two lines), "duplicate"
                   (one custom_id answered twice, the second answer a different score), "foreign" (a line for
                   a custom_id never submitted)
  keep_metadata    False: batches keep no metadata (served as null), as some OpenAI-shaped servers do
  list_lag_s       a batch shows in GET /v1/batches only this long after its create (a lagging list)
  refuse_create    an HTTP status: the next POST /v1/batches is answered with it and makes no batch (one-shot)
Accounting: batches (id -> BatchState), files (id -> file object, its bytes under "content"), created (batch ids
in creation order), upstream_calls (custom_ids sent upstream, i.e. paid for), uploads (files uploaded), chat_calls
(requests to POST /v1/chat/completions, which it also serves, as OpenAI does, by asking upstream).
In request_counts, `failed` counts every line that ends in the error file (an error answer, expired, cancelled).
"""

from __future__ import annotations

import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from email.parser import BytesHeaderParser
from urllib.parse import parse_qs, urlsplit

from judge_server import _Base

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations")
FINISHED = ("completed", "failed", "expired", "cancelled")
VALIDATION_MESSAGES = {
    "token_limit_exceeded": "Enqueued token limit reached for this model in organization org-stub. "
                            "Please try again once some in_progress batches have been completed.",
}
LINE_ERRORS = {400: ("invalid_request_error", None), 401: ("invalid_request_error", "invalid_api_key"),
               429: ("rate_limit_exceeded", "rate_limit_exceeded"), 500: ("server_error", None)}


def _id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:24]


def _error(message: str, type_: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body as {field name: (file name or None, bytes)}."""
    boundary = content_type.split("boundary=", 1)[1].split(";")[0].strip().strip('"').encode()
    out = {}
    for part in body.split(b"--" + boundary)[1:-1]:  # before the first boundary: preamble; after the last: "--"
        head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        headers = BytesHeaderParser().parsebytes(head + b"\r\n\r\n")
        name = headers.get_param("name", header="content-disposition")
        out[name] = (headers.get_filename(), data.removesuffix(b"\r\n"))
    return out


@dataclass
class BatchState:
    """One batch: `obj` is the Batch object served (metadata included); `lines` the input file's lines."""

    obj: dict
    lines: list[str]
    shuffle: bool
    fail_validation: str | None
    expire_after: int | None
    output_faults: set[str]
    born: float  # time.monotonic() at its create
    requests: list[dict] = field(default_factory=list)  # the parsed lines, once validated
    output: list[dict] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)
    thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        return self.obj["status"]

    @property
    def metadata(self) -> dict | None:
        return self.obj["metadata"]


class BatchServer(_Base):
    """OpenAI's Files and Batches API on loopback, answering batch lines from `upstream` (an http://.../v1 URL)."""

    def __init__(self, upstream: str, step_s: float = 0.2, timeout_s: float = 600.0):
        super().__init__()
        self.url = self.base_url
        self.upstream = upstream.rstrip("/")
        self.step_s, self.timeout_s = step_s, timeout_s
        self.shuffle, self.hold = True, False
        self.fail_validation: str | None = None
        self.fail_validation_batches = 1
        self.output_faults: set[str] = set()
        self.keep_metadata, self.list_lag_s = True, 0.0
        self.refuse_create: int | None = None
        self.expire_after: int | None = None
        self.line_status: dict[str, int] = {}
        self.batches: dict[str, BatchState] = {}
        self.files: dict[str, dict] = {}
        self.created: list[str] = []
        self.upstream_calls: list[str] = []
        self.uploads = 0
        self.chat_calls = 0  # requests through the chat path (POST /v1/chat/completions), at the chat price
        owner = self

        class Handler(self.httpd.RequestHandlerClass):  # _Base's, for its quiet log, reply() and drop()
            def do_GET(self):
                owner.route(self, "GET", b"")

            def do_DELETE(self):
                owner.route(self, "DELETE", b"")

            def do_POST(self):
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b"".join(iter(self.read_chunk, b""))
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.route(self, "POST", body)

            def read_chunk(self) -> bytes:
                size = int(self.rfile.readline().split(b";")[0], 16)
                data = self.rfile.read(size)
                self.rfile.readline()  # the CRLF after the chunk (or after the empty trailer)
                return data

        self.httpd.RequestHandlerClass = Handler

    def __exit__(self, *exc):
        super().__exit__(*exc)  # sets `stopping`: the workers end at their next step
        for b in list(self.batches.values()):
            if b.thread:
                b.thread.join(timeout=2)

    # ------------------------------------------------------------------ HTTP

    def route(self, h, method: str, body: bytes) -> None:
        url = urlsplit(h.path)
        parts = url.path.strip("/").split("/")[1:] if url.path.startswith("/v1/") else []
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        if method == "POST" and parts == ["chat", "completions"]:  # the chat path, as OpenAI serves it beside batches
            self.chat_calls += 1
            return h.reply(*self.call_upstream("/v1/chat/completions", json.loads(body)))
        with self.lock:
            if method == "POST" and parts == ["files"]:
                return h.reply(*self.upload(h.headers.get("Content-Type", ""), body))
            if parts[:1] == ["files"] and len(parts) in (2, 3) and parts[1] in self.files:
                f = self.files[parts[1]]
                if method == "GET" and len(parts) == 3 and parts[2] == "content":
                    return h.reply(200, raw=f["content"])
                if method == "GET" and len(parts) == 2:
                    return h.reply(200, self.file_object(parts[1]))
                if method == "DELETE" and len(parts) == 2:
                    del self.files[parts[1]]
                    return h.reply(200, {"id": parts[1], "object": "file", "deleted": True})
            if parts == ["batches"] and method == "POST":
                return h.reply(*self.create(body))
            if parts == ["batches"] and method == "GET":
                return h.reply(200, self.listing(int(query.get("limit", 20)), query.get("after")))
            if parts[:1] == ["batches"] and len(parts) in (2, 3) and parts[1] in self.batches:
                b = self.batches[parts[1]]
                if method == "GET" and len(parts) == 2:
                    return h.reply(200, b.obj)
                if method == "POST" and parts[2:] == ["cancel"]:
                    return h.reply(*self.cancel(b))
        h.reply(404, _error(f"No such {method} {url.path}", code="not_found"))

    def add_file(self, name: str, purpose: str, content: bytes) -> str:
        fid = _id("file-")
        self.files[fid] = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                           "filename": name, "purpose": purpose, "status": "processed", "expires_at": None,
                           "status_details": None, "content": content}
        return fid

    def file_object(self, fid: str) -> dict:
        return {k: v for k, v in self.files[fid].items() if k != "content"}

    def upload(self, content_type: str, body: bytes):
        if not content_type.startswith("multipart/form-data"):
            return 400, _error("Expected a multipart/form-data upload")
        form = parse_multipart(content_type, body)
        if "file" not in form or "purpose" not in form:
            return 400, _error("Missing required parameter: 'file' and 'purpose'.")
        self.uploads += 1
        fid = self.add_file(form["file"][0] or "upload.jsonl", form["purpose"][1].decode(), form["file"][1])
        return 200, self.file_object(fid)

    def create(self, body: bytes):
        req = json.loads(body or b"{}")
        if self.refuse_create:
            status, self.refuse_create = self.refuse_create, None
            return status, _error(f"Injected {status}: this batch was not created.")
        if req.get("input_file_id") not in self.files:
            return 404, _error(f"No such File object: {req.get('input_file_id')}", code="not_found")
        if req.get("endpoint") not in ENDPOINTS or req.get("completion_window") != "24h":
            return 400, _error("Unsupported endpoint or completion_window")
        now, bid = int(time.time()), _id("batch_")
        obj = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "errors": None,
               "input_file_id": req["input_file_id"], "completion_window": "24h", "status": "validating",
               "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
               "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
               "expired_at": None, "cancelling_at": None, "cancelled_at": None,
               "request_counts": {"total": 0, "completed": 0, "failed": 0},
               "metadata": req.get("metadata") if self.keep_metadata else None}
        lines = self.files[req["input_file_id"]]["content"].decode(errors="replace").splitlines()
        b = BatchState(obj, lines, self.shuffle, self.fail_validation, self.expire_after, set(self.output_faults),
                       time.monotonic())
        self.fail_validation_batches -= 1
        if self.fail_validation_batches <= 0:
            self.fail_validation, self.fail_validation_batches = None, 1
        self.expire_after, self.output_faults = None, set()  # one-shot
        self.batches[bid] = b
        self.created.append(bid)
        b.thread = threading.Thread(target=self.work, args=(b,), daemon=True, name=f"batch-{bid}")
        b.thread.start()
        return 200, b.obj

    def listing(self, limit: int, after: str | None) -> dict:
        now = time.monotonic()
        ids = [i for i in self.created[::-1] if now - self.batches[i].born >= self.list_lag_s]  # newest first
        start = ids.index(after) + 1 if after in ids else 0
        page = [self.batches[i].obj for i in ids[start:start + max(1, min(limit, 100))]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": start + len(page) < len(ids)}

    def cancel(self, b: BatchState):
        if b.status not in ("validating", "in_progress", "cancelling"):
            return 400, _error(f"Cannot cancel a batch with status '{b.status}'.")
        if b.status != "cancelling":
            b.obj.update(status="cancelling", cancelling_at=int(time.time()))
        return 200, b.obj

    # ------------------------------------------------------------------ the worker

    def work(self, b: BatchState) -> None:
        """A batch's life: each change of status at least `step_s` after the previous one."""
        if self.stopping.wait(self.step_s):
            return
        with self.lock:
            problems = self.validate(b)
            if problems and b.status != "cancelling":
                return b.obj.update(status="failed", failed_at=int(time.time()),
                                    errors={"object": "list", "data": problems})
            b.obj["request_counts"]["total"] = len(b.requests)
            if b.status != "cancelling":
                b.obj.update(status="in_progress", in_progress_at=int(time.time()))
        done = 0
        for line in b.requests:
            while self.hold and b.status == "in_progress" and not self.stopping.wait(0.02):
                pass
            if self.stopping.is_set() or b.status != "in_progress" or done == b.expire_after:
                break
            self.answer(b, line)
            done += 1
        if self.stopping.wait(self.step_s):
            return
        with self.lock:  # cancel() takes the same lock: the batch cannot start cancelling while this decides
            if b.status == "cancelling":
                end = ("cancelled", "batch_cancelled", "This request was not executed: the batch was cancelled.")
            elif done < len(b.requests):
                end = ("expired", "batch_expired", "This request could not be executed before the "
                                                   "completion window expired.")
            else:
                end = ("completed", None, None)
                b.obj.update(status="finalizing", finalizing_at=int(time.time()))
        if end[0] == "completed" and self.stopping.wait(self.step_s):
            return
        self.finish(b, b.requests[done:], *end)

    def validate(self, b: BatchState) -> list[dict]:
        """What is wrong with the input file (OpenAI's validation errors); fills `b.requests`."""
        problems, seen, models = [], set(), set()

        def problem(code: str, message: str, line: int | None = None):
            problems.append({"code": code, "message": message, "param": None, "line": line})

        if b.fail_validation:
            problem(b.fail_validation, VALIDATION_MESSAGES.get(b.fail_validation, f"Batch failed: {b.fail_validation}"))
        for n, text in enumerate(b.lines, 1):
            if not text.strip():
                continue
            try:
                req = json.loads(text)
            except ValueError:
                req = None
            if not isinstance(req, dict):
                problem("invalid_json_line", "This line is not parseable as valid JSON.", n)
                continue
            missing = [k for k in ("custom_id", "method", "url", "body") if k not in req]
            if missing or not isinstance(req["body"], dict) or "model" not in req["body"]:
                problem("missing_required_parameter", f"Missing required parameter: {(missing or ['model'])[0]}", n)
            elif req["method"] != "POST" or req["url"] != b.obj["endpoint"]:
                problem("mismatched_endpoint", f"The line's {req['method']} {req['url']} does not match the "
                                               f"batch's endpoint {b.obj['endpoint']}.", n)
            elif req["custom_id"] in seen:
                problem("duplicate_custom_id", f"The custom_id '{req['custom_id']}' is used more than once.", n)
            elif models and req["body"]["model"] not in models:
                problem("mismatched_model", "All requests in a batch must use the same model.", n)
            else:
                seen.add(req["custom_id"])
                models.add(req["body"]["model"])
                b.requests.append(req)
        if not b.requests and not problems:
            problem("empty_file", "The input file has no requests.")
        return problems

    def answer(self, b: BatchState, req: dict) -> None:
        """Runs one line (upstream, or the `line_status` fault) and records the result in `b`."""
        cid = req["custom_id"]
        with self.lock:
            forced = self.line_status.pop(cid, None)
            if forced is None:
                self.upstream_calls.append(cid)
        if forced is not None:
            type_, code = LINE_ERRORS.get(forced, ("api_error", None))
            status, body = forced, _error(f"Injected {forced} for {cid}", type_, code)
        else:
            status, body = self.call_upstream(b.obj["endpoint"], req["body"])
        row = {"id": _id("batch_req_"), "custom_id": cid, "error": None,
               "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body}}
        with self.lock:
            (b.output if status == 200 else b.errors).append(row)
            b.obj["request_counts"]["completed" if status == 200 else "failed"] += 1

    def call_upstream(self, endpoint: str, body: dict) -> tuple[int, dict]:
        req = urllib.request.Request(self.upstream + endpoint.removeprefix("/v1"), data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                status, data = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, data = e.code, e.read()
        except OSError as e:  # upstream unreachable or too slow
            return 500, _error(f"upstream failed: {e}", "server_error")
        try:
            return status, json.loads(data)
        except ValueError:
            return (500 if status == 200 else status), _error(data.decode(errors="replace")[:500], "server_error")

    def finish(self, b: BatchState, unrun: list[dict], status: str, code: str | None, message: str | None) -> None:
        """Writes the output and error files (the `unrun` lines as `code` errors) and sets the final status."""
        with self.lock:
            b.errors += [{"id": _id("batch_req_"), "custom_id": r["custom_id"], "response": None,
                          "error": {"code": code, "message": message}} for r in unrun]
            b.obj["request_counts"]["failed"] += len(unrun)
            for rows, key, suffix in ((b.output, "output_file_id", "output"), (b.errors, "error_file_id", "error")):
                if b.shuffle:
                    random.shuffle(rows)
                texts = [json.dumps(r) for r in rows]
                if suffix == "output" and b.output_faults:
                    texts = _spoil(texts, b.output_faults)
                if texts:
                    data = "".join(t + "\n" for t in texts).encode()
                    b.obj[key] = self.add_file(f"{b.obj['id']}_{suffix}.jsonl", "batch_output", data)
            b.obj.update({"status": status, f"{status}_at": int(time.time())})


def _spoil(lines: list[str], faults: set[str]) -> list[str]:
    """An output file's lines with `faults` (BatchServer.output_faults) worked in; the first line is left whole,
    so each fault hits a different request."""
    lines, rows = list(lines), [json.loads(x) for x in lines]
    if "cut" in faults and len(lines) > 1:
        lines[1] = lines[1][:len(lines[1]) // 2]  # cut mid-JSON: that request's answer is lost
    if "duplicate" in faults and rows:
        again = json.loads(json.dumps(rows[0]))
        again["id"] = _id("batch_req_")
        choice = again["response"]["body"]["choices"][0]
        choice["message"]["content"], choice["logprobs"] = "Score: 1", None  # another answer, another score
        lines.append(json.dumps(again))
    if "foreign" in faults and rows:
        lines.append(json.dumps({**rows[0], "id": _id("batch_req_"), "custom_id": "f" * 64 + "-0"}))
    if "junk" in faults:
        lines.insert(len(lines) // 2, "<html><body><h1>502 Bad Gateway</h1></body></html>")
    return lines
