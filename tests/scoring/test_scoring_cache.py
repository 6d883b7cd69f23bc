"""The judge cache: WAL mode, keys, failures retried, successes never overwritten, commits survive SIGKILL."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

from ual.scoring.cache import JudgeCache


def test_roundtrip_and_keys(tmp_path):
    c = JudgeCache(tmp_path / "c.sqlite")
    c.put("gpt-4o", "v1", "h1", 0, True, 70.0, {"ok": True, "score": 70.0})
    c.put("gpt-4o", "v1", "h1", 1, True, 60.0, {"ok": True, "score": 60.0})
    c.put("gpt-4o", "v2", "h1", 0, True, 10.0, {"ok": True})
    c.put("other", "v1", "h1", 0, True, 20.0, {"ok": True})
    rows = c.lookup("gpt-4o", "v1", ["h1", "h2"])
    assert set(rows) == {("h1", 0), ("h1", 1)} and rows[("h1", 0)]["score"] == 70.0
    assert rows[("h1", 0)]["record"] == {"ok": True, "score": 70.0}
    assert c.lookup("gpt-4o", "v2", ["h1"])[("h1", 0)]["score"] == 10.0
    assert c.count() == 4 and c.count(judge="other") == 1
    mode = sqlite3.connect(tmp_path / "c.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_failure_is_replaced_by_success_never_the_reverse(tmp_path):
    c = JudgeCache(tmp_path / "c.sqlite")
    c.put("m", "v", "h", 0, False, None, {"error": "refusal"})
    assert c.lookup("m", "v", ["h"])[("h", 0)]["ok"] is False
    c.put("m", "v", "h", 0, True, 55.0, {"score": 55.0})
    c.put("m", "v", "h", 0, False, None, {"error": "late failure"})
    row = c.lookup("m", "v", ["h"])[("h", 0)]
    assert row["ok"] is True and row["score"] == 55.0


def test_lookup_of_thousands_is_fast(tmp_path):
    c = JudgeCache(tmp_path / "c.sqlite")
    hashes = [f"{i:064x}" for i in range(6000)]
    with c._lock:  # bulk fill in one transaction (the scorer commits one by one)
        c._conn.execute("BEGIN")
        c._conn.executemany("INSERT INTO answers VALUES ('m','v',?,0,1,42.0,'{}',0)", [(h,) for h in hashes])
        c._conn.execute("COMMIT")
    t = time.perf_counter()
    rows = c.lookup("m", "v", hashes)
    assert len(rows) == 6000 and time.perf_counter() - t < 1.0


_WRITER = """
import os, signal, sys
from ual.scoring.cache import JudgeCache
c = JudgeCache(sys.argv[1])
for i in range(int(sys.argv[2])):
    c.put("m", "v", f"h{i}", 0, True, float(i), {"i": i})
print("committed", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint, no atexit
"""


def test_commits_survive_sigkill(tmp_path):
    path = tmp_path / "c.sqlite"
    proc = subprocess.run([sys.executable, "-c", _WRITER, str(path), "50"], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and "committed" in proc.stdout
    assert os.path.exists(str(path) + "-wal")  # the data lives in the WAL, not yet checkpointed
    rows = JudgeCache(path).lookup("m", "v", [f"h{i}" for i in range(50)])
    assert len(rows) == 50 and rows[("h49", 0)]["score"] == 49.0
