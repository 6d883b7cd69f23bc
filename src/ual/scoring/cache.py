"""A SQLite (WAL) store of judge answers: never pay twice for the same answer.

Key: (judge model, prompt version, content hash, draw). The content hash is
taken over the exact messages sent to the judge, so anything that changes what
the judge sees (sample text, prompt, truncation) changes the key. `draw` is 0
for the greedy answer and 1..n-1 for the extra sampled answers of n-sample
averaging, each cached on its own.

Every answer is committed the moment it arrives (autocommit, one INSERT). In
WAL mode with synchronous=NORMAL a commit survives the process being killed
(SIGKILL) at any point: the WAL write has reached the OS before `put` returns;
only a power cut can lose the last commits. So a killed run loses at most the
requests in flight, and a rerun never re-sends an answered request.

Failures are stored too (ok = 0, with their reasons) so a run can list them,
but a lookup for "what is left to send" treats them as not answered: a rerun
retries them. A success is never overwritten by a later failure.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterable

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    judge TEXT NOT NULL,
    prompt_version TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    draw INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    score REAL,
    record TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (judge, prompt_version, content_hash, draw)
) WITHOUT ROWID
"""

UPSERT_ANSWER = """
INSERT INTO answers (judge, prompt_version, content_hash, draw, ok, score, record, updated)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (judge, prompt_version, content_hash, draw) DO UPDATE SET
    ok = excluded.ok, score = excluded.score, record = excluded.record, updated = excluded.updated
WHERE answers.ok = 0
"""

_CHUNK = 500  # ids per IN (...) query, well under SQLite's variable limit


class JudgeCache:
    def __init__(self, path: str | Path, read_only: bool = False):
        """read_only (a dry run): look answers up without creating or changing a file; a cache that does not
        exist yet reads as empty."""
        self.path = Path(path)
        self._lock = threading.Lock()  # one connection, possibly shared by threads
        if read_only:
            # immutable: no lock, journal or -shm file is written beside the database
            target = f"{self.path.resolve().as_uri()}?immutable=1" if self.path.exists() else "file::memory:"
            self._conn = sqlite3.connect(target, uri=True, isolation_level=None, check_same_thread=False)
            if not self.path.exists():
                self._conn.execute(_SCHEMA)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: autocommit, each put is its own committed transaction.
        self._conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None, check_same_thread=False)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=60000")
            self._conn.execute(_SCHEMA)

    def lookup(self, judge: str, prompt_version: str, hashes: Iterable[str]) -> dict[tuple[str, int], dict]:
        """All stored rows (ok and failed) for these hashes: {(hash, draw): row}."""
        wanted = list(dict.fromkeys(hashes))
        out: dict[tuple[str, int], dict] = {}
        with self._lock:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i:i + _CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(
                    f"SELECT content_hash, draw, ok, score, record FROM answers "
                    f"WHERE judge = ? AND prompt_version = ? AND content_hash IN ({marks})",
                    [judge, prompt_version, *chunk],
                ).fetchall()
                for h, draw, ok, score, record in rows:
                    out[(h, draw)] = {"ok": bool(ok), "score": score, "record": json.loads(record)}
        return out

    def put(self, judge: str, prompt_version: str, content_hash: str, draw: int,
            ok: bool, score: float | None, record: dict) -> None:
        """Commit one answer now (a success is never replaced by a failure)."""
        with self._lock:
            self._conn.execute(UPSERT_ANSWER, (judge, prompt_version, content_hash, draw, int(ok), score,
                                         json.dumps(record, ensure_ascii=False), time.time()))

    def count(self, judge: str | None = None, ok: bool | None = None) -> int:
        sql, args = "SELECT COUNT(*) FROM answers WHERE 1=1", []
        if judge is not None:
            sql, args = sql + " AND judge = ?", args + [judge]
        if ok is not None:
            sql, args = sql + " AND ok = ?", args + [int(ok)]
        with self._lock:
            return self._conn.execute(sql, args).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "JudgeCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
