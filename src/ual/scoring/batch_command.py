"""`ual batch status RUN` and `ual batch cancel RUN`: the judge batches a run folder has in flight.

Submitting and collecting is `ual score RUN --score.via batch` (batch.py); these two look at what it left
running, or stop it. A cancelled batch keeps what it answered: the next `ual score --score.via batch`
collects that and asks only for the rest.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

from ual.runlock import run_folder_lock


def add_arguments(p) -> None:
    p.add_argument("action", choices=("status", "cancel"), help="status: each batch in flight, as the provider "
                   "reports it; cancel: stop them all (what they answered is kept)")
    p.add_argument("run", metavar="RUN", help="the run folder scored with --score.via batch")


def run(args) -> dict:
    from ual.config import load_config
    from ual.runfolder import RunFolder
    from ual.scoring.batch_store import BatchStore

    folder = RunFolder(Path(args.run))
    cfg = load_config(folder.require(folder.config, "data"))
    cache = Path(os.environ.get("UAL_JUDGE_CACHE") or folder.root / "judge_cache.sqlite")
    if not cache.exists():
        raise FileNotFoundError(f"{cache}: no judge answers here (nothing was scored with a judge)")
    with nullcontext() if args.action == "status" else run_folder_lock(folder.root):  # status only reads
        return _each_shard(args, cfg, BatchStore(cache))


def _each_shard(args, cfg, store) -> dict:
    from ual.scoring.judge_http import judge_failure, open_sync_client, read_api_key

    try:
        rows = store.conn.execute("SELECT * FROM batch_shards WHERE state != 'collected' ORDER BY created").fetchall()
        key, clients, out = read_api_key(), {}, []
        for row in rows:
            entry = {"shard": row["shard"], "batch": row["batch_id"], "judge": row["judge"], "state": row["state"],
                     "requests": row["n_lines"], "status": row["status"]}
            if row["state"] == "submitted":
                url = row["base_url"]  # where this batch was created
                client = clients.get(url) or clients.setdefault(url, open_sync_client(key, url, cfg.score.timeout_s))
                try:
                    batch = (client.batches.cancel if args.action == "cancel" else client.batches.retrieve)(
                        row["batch_id"])
                except Exception as exc:
                    reason, _ = judge_failure(exc, key, url, row["judge"])  # raises if fatal
                    entry["error"] = reason
                else:
                    entry["status"] = batch.status
                    entry["counts"] = batch.request_counts.model_dump() if batch.request_counts else None
                    store.update(row["shard"], status=batch.status, counts=json.dumps(entry["counts"] or {}))
            elif row["state"] == "built" and args.action == "cancel":  # never sent: its requests go back
                store.update(row["shard"], state="downloaded", status="cancelled", reason="cancelled before it was sent")
                entry["status"] = "cancelled"
            elif row["via"] == "vllm":
                entry["status"] = "waiting for `vllm run-batch` (the command `ual score` printed)"
            out.append(entry)
    finally:
        store.close()
    return {"action": args.action, "in_flight": out,
            "next": "collect with `ual score RUN --score.via batch`" if out else "nothing in flight"}
