"""Judge throughput against the real llama.cpp server, and the cost of a fully cached rerun.

What is compared: for each parallelism c (1, 4, 8), the rate the server itself
delivers for our exact request bodies (a bare http.client loop in c threads:
no openai client, no parsing, no cache) against JudgeScorer's samples/s at
concurrency c. In each round both send the same fresh samples (the server
keeps only the last prompt's prefix, so neither gets a cache hit the other
lacks, and the answers, hence the generated lengths, are the same; the
scorer's own cache starts empty). Raw and ours alternate in rounds (who goes
first alternates too), because a shared machine drifts. llama-cpp-python's server runs one request at a time, so c
mostly hides client-side latency; what matters is that we keep it busy.
JudgeScorer runs with max_retries=0 here so samples/s = requests/s (a weak
judge's unparseable answers would otherwise add requests: a model property,
not a client one).

Cached rerun: 6,000 samples are answered once through an instant stub
endpoint (same judge name, same prompt), then scored again pointing at the
llama.cpp server behind a counting proxy: the time of that call and the
requests the proxy saw (must be 0).

    python benchmarks/score.py [--rounds 4] [--per-round 4] [--levels 1 4 8] [--cached 6000]
Ends with one JSON line: {"rate_vs_server_c8", "cached_rerun_s", "cached_rerun_requests"}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from judge_server import FaultProxy, LlamaServer, StubJudge, completion  # noqa: E402
from ual.config import ScoreConfig  # noqa: E402
from ual.sample import Sample  # noqa: E402
from ual.scoring.judge import JudgeOptions, JudgeScorer  # noqa: E402
from ual.scoring.prompt import default_prompt  # noqa: E402

MODEL = "smollm2-135m-q4_1"
KINDS = ["Write a short poem about {x}.", "What is {n} * {m}?", "Any tips for a weekend in {x}?",
         "Write a Python function that sorts {x} by length.", "Draft an email about {x}.", "Solve {n}x + {m} = 0."]
WORDS = ["rain", "Lisbon", "tea", "the sea", "trains", "owls", "maps", "jazz", "snow", "bread", "kites", "moss"]


def make_samples(n: int, tag: str) -> list[Sample]:
    out = []
    for i in range(n):
        q = KINDS[i % len(KINDS)].format(x=f"{WORDS[i % len(WORDS)]} {tag}{i}", n=i + 3, m=7 * i + 1)
        out.append(Sample.create("bench", [{"role": "user", "content": q},
                                           {"role": "assistant", "content": f"Here is an answer ({tag}{i})."}]))
    return out


def request_body(sample: Sample, opts: JudgeOptions) -> bytes:
    """Exactly what JudgeScorer sends for a first, greedy attempt."""
    msgs, _ = default_prompt().render(sample.messages)
    return json.dumps({"model": MODEL, "messages": msgs, "temperature": 0.0, "max_tokens": opts.max_tokens,
                       "logprobs": True, "top_logprobs": opts.top_logprobs}).encode()


def raw_rate(base_url: str, samples: list[Sample], c: int, opts: JudgeOptions) -> float:
    """Requests/s the server delivers with c bare clients in parallel."""
    host, port = base_url.split("//")[1].split("/")[0].split(":")
    bodies = [request_body(s, opts) for s in samples]
    lock, nxt = threading.Lock(), [0]

    def work():
        conn = http.client.HTTPConnection(host, int(port), timeout=900)
        while True:
            with lock:
                if nxt[0] >= len(bodies):
                    break
                body = bodies[nxt[0]]
                nxt[0] += 1
            conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
        conn.close()

    t = time.perf_counter()
    threads = [threading.Thread(target=work) for _ in range(c)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(bodies) / (time.perf_counter() - t)


def our_rate(base_url: str, samples: list[Sample], c: int, cache: Path, opts: JudgeOptions) -> tuple[float, int]:
    cfg = ScoreConfig(scorer="judge", model=MODEL, base_url=base_url, concurrency=c, max_retries=0)
    scorer = JudgeScorer(cfg, cache, options=opts)
    t = time.perf_counter()
    res = scorer.score(samples)
    dt = time.perf_counter() - t
    assert scorer.stats["requests"] == len(samples)
    return len(samples) / dt, sum(r.ok for r in res)


def cached_rerun(server_url: str, n: int, work: Path, opts: JudgeOptions) -> dict:
    samples = make_samples(n, "cached")
    cache = work / "cached.sqlite"
    with StubJudge(lambda body: completion("42")) as stub:
        cfg = ScoreConfig(scorer="judge", model=MODEL, base_url=stub.base_url, concurrency=32, max_retries=0)
        t = time.perf_counter()
        filled = JudgeScorer(cfg, cache, options=opts).score(samples)
        fill_s = time.perf_counter() - t
    assert all(r.ok for r in filled)
    with FaultProxy(server_url) as proxy:  # would count (and forward) anything sent
        cfg = ScoreConfig(scorer="judge", model=MODEL, base_url=proxy.base_url, concurrency=8)
        scorer = JudgeScorer(cfg, cache, options=opts)
        t = time.perf_counter()
        res = scorer.score(samples)
        rerun_s = time.perf_counter() - t
        sent = len(proxy.log)
    assert all(r.ok and r.details["cached"] for r in res)
    return {"samples": n, "fill_via_stub_s": round(fill_s, 2), "fill_req_per_s": round(n / fill_s, 1),
            "rerun_s": round(rerun_s, 3), "rerun_requests": sent}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="interleaved raw/ours rounds per parallelism")
    ap.add_argument("--per-round", type=int, default=4, help="samples per round (at least c)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--cached", type=int, default=6000, help="samples in the cached rerun")
    ap.add_argument("--n-threads", type=int, default=1, help="llama.cpp threads (1 is fastest on a busy 2-core box)")
    args = ap.parse_args()
    opts = JudgeOptions(progress=False, timeout_s=900)
    import openai  # noqa: F401  (imported once here, not inside a timed call)

    work = Path(tempfile.mkdtemp(prefix="ual-bench-score-"))
    rows = {}
    with LlamaServer(n_threads=args.n_threads) as srv:
        raw_rate(srv.base_url, make_samples(3, "warm"), 1, opts)  # load pages, fill the prompt cache
        for c in args.levels:
            k, t_raw, t_ours, n_raw, n_ours, ok = max(c, args.per_round), 0.0, 0.0, 0, 0, 0
            trace = []
            for r in range(args.rounds):  # alternate who goes first: drift on a shared box cancels out
                batch = make_samples(k, f"{c}.{r}-")  # the same requests for both: same prompt and answer lengths
                for who in (("raw", "ours") if r % 2 == 0 else ("ours", "raw")):
                    if who == "raw":
                        dt = k / raw_rate(srv.base_url, batch, c, opts)
                        t_raw, n_raw = t_raw + dt, n_raw + k
                    else:
                        rate, good = our_rate(srv.base_url, batch, c, work / f"c{c}.{r}.sqlite", opts)
                        dt = k / rate
                        t_ours, n_ours, ok = t_ours + dt, n_ours + k, ok + good
                    trace.append(f"{who} {dt:.1f}s")
            server, ours = n_raw / t_raw, n_ours / t_ours
            rows[c] = {"server_req_s": round(server, 3), "ours_samples_s": round(ours, 3),
                       "ratio": round(ours / server, 3), "requests_each": n_raw, "parsed_ok": f"{ok}/{n_ours}"}
            print(f"c={c}: server {server:.3f} req/s, JudgeScorer {ours:.3f} samples/s, ratio {ours / server:.2f} "
                  f"({n_raw} requests each, interleaved in {args.rounds} rounds; answers parsed {ok}/{n_ours})", flush=True)
            print(f"  rounds of {k}: " + ", ".join(trace), flush=True)
        single = rows[1]["server_req_s"] if 1 in rows else raw_rate(srv.base_url, make_samples(6, "s"), 1, opts)
        print(f"server single-stream rate: {single:.3f} req/s", flush=True)
        cached = cached_rerun(srv.base_url, args.cached, work, opts)
    print(f"cached rerun of {cached['samples']} samples: {cached['rerun_s']:.3f} s, {cached['rerun_requests']} requests "
          f"sent (cache filled through an instant stub in {cached['fill_via_stub_s']} s, "
          f"{cached['fill_req_per_s']} req/s)", flush=True)
    print(json.dumps({"levels": rows, "server_single_stream_req_s": single, "cached": cached}))
    c8 = rows.get(8, rows[max(rows)])
    print(json.dumps({"rate_vs_server_c8": c8["ratio"], "cached_rerun_s": cached["rerun_s"],
                      "cached_rerun_requests": cached["rerun_requests"]}))


if __name__ == "__main__":
    main()
