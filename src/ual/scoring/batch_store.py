"""Where batch scoring keeps its state: shards and their items, in the answer cache's SQLite file.

Every remote step of batch.py is committed here the moment it returns (the shard before its upload, the
file id before its batch is created, the time a create was sent, the batch id before it is polled), so a
process killed anywhere resumes from here and never pays for a request twice.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_shards (
    shard TEXT PRIMARY KEY, judge TEXT NOT NULL, prompt_version TEXT NOT NULL, via TEXT NOT NULL,
    base_url TEXT,                  -- where its batch lives (null: the OpenAI API)
    state TEXT NOT NULL,            -- built, submitted, downloaded, collected
    n_lines INTEGER NOT NULL, est_tokens REAL NOT NULL, input_path TEXT NOT NULL,
    input_file_id TEXT, batch_id TEXT, status TEXT, counts TEXT, reason TEXT,
    output_path TEXT, error_path TEXT, prompt_tokens INTEGER DEFAULT 0, completion_tokens INTEGER DEFAULT 0,
    created REAL NOT NULL, updated REAL NOT NULL,
    create_sent REAL);              -- when a batch create was last sent for it (its answer may never have come)
CREATE TABLE IF NOT EXISTS batch_items (
    shard TEXT NOT NULL, custom_id TEXT NOT NULL, temperature REAL, sent TEXT NOT NULL,
    outcome TEXT, reason TEXT, PRIMARY KEY (shard, custom_id)) WITHOUT ROWID;
"""


class BatchStore:
    """The shards of batch scoring and their items, in the answer cache's SQLite file (WAL)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=60000")
        self.conn.executescript(_SCHEMA)
        columns = {row[1] for row in self.conn.execute("PRAGMA table_info(batch_shards)")}
        if "create_sent" not in columns:  # a cache from before the column: its shards have none
            try:
                self.conn.execute("ALTER TABLE batch_shards ADD COLUMN create_sent REAL")
            except sqlite3.OperationalError as exc:  # added by `ual batch status` at the same moment
                if "duplicate column" not in str(exc):
                    raise

    def shards(self, judge: str, prompt_version: str, active: bool = True) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM batch_shards WHERE judge = ? AND prompt_version = ? AND "
                                 f"state {'!=' if active else '='} 'collected' ORDER BY created, shard",
                                 (judge, prompt_version)).fetchall()

    def items(self, shard: str) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM batch_items WHERE shard = ?", (shard,)).fetchall()

    def unusable_counts(self, cids: list[str]) -> dict[str, int]:
        """Answers with no score each request has had so far (attempts, as the chat path counts them)."""
        out: dict[str, int] = {}
        for i in range(0, len(cids), 500):
            chunk = cids[i:i + 500]
            for cid, n in self.conn.execute(
                    f"SELECT custom_id, COUNT(*) FROM batch_items WHERE outcome = 'unusable' AND custom_id IN "
                    f"({','.join('?' * len(chunk))}) GROUP BY custom_id", chunk):
                out[cid] = n
        return out

    def last_reasons(self, cids: list[str]) -> dict[str, str]:
        """The reason each request's latest shard gave for it (the provider's own message), where one did."""
        out: dict[str, str] = {}
        for i in range(0, len(cids), 500):
            chunk = cids[i:i + 500]
            for cid, reason in self.conn.execute(
                    "SELECT i.custom_id, i.reason FROM batch_items i JOIN batch_shards s ON s.shard = i.shard "
                    f"WHERE i.reason IS NOT NULL AND i.custom_id IN ({','.join('?' * len(chunk))}) ORDER BY s.created",
                    chunk):
                out[cid] = reason  # the later shard's wins
        return out

    def add_shard(self, row: dict, items: list[tuple[str, float | None, str]]) -> None:
        now = time.time()
        with self.transaction():
            self.conn.execute(f"INSERT INTO batch_shards ({', '.join(row)}, created, updated) VALUES "
                              f"({', '.join('?' * len(row))}, ?, ?)", (*row.values(), now, now))
            self.conn.executemany("INSERT INTO batch_items (shard, custom_id, temperature, sent) VALUES (?, ?, ?, ?)",
                                  [(row["shard"], *item) for item in items])

    def update(self, shard: str, **fields) -> None:
        """Commit now: a remote step's result must survive a kill right after it."""
        sets = ", ".join(f"{k} = ?" for k in fields)
        self.conn.execute(f"UPDATE batch_shards SET {sets}, updated = ? WHERE shard = ?",
                          (*fields.values(), time.time(), shard))

    def transaction(self):
        return _Transaction(self.conn)

    def close(self) -> None:
        self.conn.close()


class _Transaction:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *exc):
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")


def in_flight(cache_path: str | Path, judge: str, prompt_version: str) -> int:
    """Shards of this judge and prompt not yet collected (0 when the cache has none), read without writing."""
    path = Path(cache_path)
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM batch_shards WHERE judge = ? AND prompt_version = ? AND "
                            "state != 'collected'", (judge, prompt_version)).fetchone()[0]
    except sqlite3.OperationalError:  # no batch tables: never scored through batches
        return 0
    finally:
        conn.close()
