"""Judge scoring at data-set scale: OpenAI's Batch API (or an OpenAI-shaped one), or `vllm run-batch` files.

`ual score --score.via batch` asks the same judge the same questions as the chat path (judge.py), at
half the price, through batch files: every sample still missing from the answer cache becomes one
request line, built by the chat path's own code (same prompt, same log-probabilities), whose custom_id
is its cache key (batch_files.py). Answers land in the same cache, so the scores that follow are the
chat path's, whichever way they were asked.

Never paid twice. Shards and their items live in the answer cache's SQLite file (batch_store.py), and
every remote step is committed the moment it returns: a shard is recorded before its file is uploaded,
the file's id and the time of the create before its batch is created, the batch's id before it is
polled. A process killed between "create" and "commit" finds its batch on restart, by its shard's name in
the batch's metadata or by its input file id (some providers keep no metadata), in the provider's list,
read before any batch is created; a create that was sent but whose batch the list does not show (a list
may lag behind its creates) is looked for again for score.batch_find_s before another is made. One
process at a time: the cache's folder is locked (ual/runlock.py). Collecting saves the raw output and
error files first, then moves the answers into the cache, the items' outcomes and the shard's state in
one transaction: a kill at any point leaves either all of it or none, and the rerun picks up from there.
A saved file deleted meanwhile is downloaded again; a line that cannot be read (cut short, not JSON, no
custom_id) is named and its request asked in the next round; custom_ids answered twice (the first answer
is kept) or never sent are named: a provider's odd file never stops the run or the other shards.

Every outcome has a place: a completed batch; one failed at validation (the queued-token limit, say:
its reason is shown and its requests go in the next round); an expired or cancelled one (its partial
output kept, only what is missing asked again); per line, a 429 or 5xx (next round), another 4xx (a
final failure with its reason), an answer with no score (asked again at a small temperature, as on the
chat path). After score.batch_rounds rounds what is left is listed as failed, with the provider's last
reason, or sent through the chat path (score.batch_fallback chat).

`--score.via vllm` writes the same request files for `vllm run-batch` and, on the next run, reads the
output files it wrote (same line format) into the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from ual.io import write_bytes
from ual.runlock import run_folder_lock
from ual.scoring.batch_files import (BATCH_DISCOUNT, BATCH_ENDPOINT, TERMINAL, ShardCutter, cache_key, custom_id,
                                     line_outcome, pick_answers, request_line)
from ual.scoring.batch_store import BatchStore
from ual.scoring.cache import UPSERT_ANSWER
from ual.scoring.judge_calls import estimate_tokens

log = logging.getLogger(__name__)
EXIT_PENDING = 75  # EX_TEMPFAIL: nothing is wrong, the answers are not in yet; run the same command again


class BatchesPending(RuntimeError):
    """Batches are still running (or, for vLLM, waiting for `vllm run-batch`): run the command again."""


class BatchRun:
    """One `ual score --score.via batch|vllm` over a JudgeScorer: submit, watch, collect, in rounds."""

    def __init__(self, scorer, cache_path: str | Path):
        self.scorer, self.cfg, self.opts = scorer, scorer.cfg, scorer.opts
        self.judge, self.version = scorer.model, scorer.prompt.version
        self.store = BatchStore(cache_path)
        self.dir = Path(cache_path).parent / "batches"
        self.vllm = self.cfg.via == "vllm"
        self._client = None
        self._shown: dict[str, tuple[str, float]] = {}  # the status line last printed per shard, and when
        self._looking: set[str] = set()  # shards whose batch is looked for in a lagging list

    # ------------------------------------------------------------------ the rounds

    def run(self, todo: list[tuple[int, int]], rendered, hashes) -> list[tuple[int, int]]:
        """Ask every (sample index, draw) of todo through batches; returns those still unanswered after the
        last round when score.batch_fallback is chat (listed as failures otherwise). BatchesPending when
        batches are still running and score.batch_wait is off (always, for vLLM files not yet answered)."""
        wanted = {custom_id(hashes[i], d): (i, d) for i, d in todo}
        final: set[str] = set()
        try:
            # the cache may be shared by run folders ($UAL_JUDGE_CACHE): one batch writer per cache folder too
            with run_folder_lock(self.dir.parent):
                for round_no in range(self.cfg.batch_rounds):
                    queued = {it["custom_id"] for s in self.store.shards(self.judge, self.version)
                              for it in self.store.items(s["shard"])}
                    answered = self._answered(wanted)
                    new = [cid for cid in wanted if cid not in queued and cid not in final and cid not in answered]
                    if new:
                        self._build(new, wanted, rendered, round_no)
                    if not self.store.shards(self.judge, self.version):
                        break
                    final |= self._watch()
                answered = self._answered(wanted)
                left = [cid for cid in wanted if cid not in final and cid not in answered]
                why = self.store.last_reasons(left)
        finally:
            self.store.close()
        if left and self.cfg.batch_fallback == "chat":
            log.info("%d requests still unanswered after %d batch rounds: sending them through the chat path",
                     len(left), self.cfg.batch_rounds)
            return [wanted[c] for c in left]
        for cid in left:  # the provider's last word on it first: that is what a user can act on
            h, d = cache_key(cid)
            reason = (f"{why[cid]}; " if cid in why else "") + (f"no answer after {self.cfg.batch_rounds} batch "
                                                                "rounds (score.batch_rounds)")
            self.scorer.cache.put(self.judge, self.version, h, d, False, None,
                                  {"ok": False, "error": reason, "reasons": [reason], "attempts": 0})
        return []

    def _answered(self, cids) -> set[str]:
        rows = self.scorer.cache.lookup(self.judge, self.version, [cache_key(c)[0] for c in cids])
        return {custom_id(h, d) for (h, d), row in rows.items() if row["ok"]}

    def _build(self, cids: list[str], wanted: dict, rendered, round_no: int) -> None:
        """Request lines for cids, cut into shards within the provider's limits; each shard and its items are
        committed (and its file written) before anything is sent."""
        unusable = self.store.unusable_counts(cids)
        cutter = ShardCutter(self.cfg.batch_max_lines, self.cfg.batch_max_bytes, self.cfg.batch_max_queued_tokens)
        lines, items, shards = [], [], 0
        for cid in cids:
            i, draw = wanted[cid]
            temperature = 0.0 if draw == 0 and unusable.get(cid, 0) == 0 else self.opts.extra_temperature
            body = self.scorer.request_body(rendered[i][0], temperature)
            line = request_line(cid, body)
            tokens = estimate_tokens(rendered[i][0], self.opts.max_tokens, self.opts.chars_per_token)
            if cutter.starts_shard(len(line), tokens):
                self._add_shard(lines, items)
                lines, items, shards = [], [], shards + 1
            lines.append(line)
            items.append((cid, body.get("temperature"), json.dumps(sorted(body)), tokens))
        if lines:
            self._add_shard(lines, items)
            shards += 1
        log.info("batch round %d: %d requests in %d shard(s) under %s", round_no + 1, len(cids), shards, self.dir)

    def _add_shard(self, lines: list[bytes], items: list[tuple]) -> None:
        """A shard's file, then its record and items in one transaction (before anything is sent)."""
        name = "ual-" + hashlib.sha256(f"{self.judge}|{self.version}|{time.time_ns()}|{items[0][0]}|{len(items)}"
                                       .encode()).hexdigest()[:20]
        path = write_bytes(self.dir / f"{name}.input.jsonl", b"".join(lines))
        self.store.add_shard({"shard": name, "judge": self.judge, "prompt_version": self.version, "via": self.cfg.via,
                              "base_url": self.cfg.base_url, "state": "built", "n_lines": len(items),
                              "est_tokens": sum(it[3] for it in items), "input_path": str(path)},
                             [it[:3] for it in items])

    def _watch(self) -> set[str]:
        """Submit, poll and collect until no shard is active (or once, without score.batch_wait); returns the
        requests that failed for good."""
        final: set[str] = set()
        while True:
            for shard in self.store.shards(self.judge, self.version):
                final |= self._advance(shard)
            active = self.store.shards(self.judge, self.version)
            if not active:
                return final
            self._print_status(active)
            if self.vllm:
                raise BatchesPending(self._vllm_commands(active))
            if not self.cfg.batch_wait:
                raise BatchesPending(f"{len(active)} batch(es) still running; run the same `ual score` command "
                                     "again to collect them (nothing is sent twice)")
            time.sleep(self.cfg.batch_poll_s)

    def _advance(self, shard) -> set[str]:
        """One step of one shard, as far as it can go now."""
        name, state = shard["shard"], shard["state"]
        if state == "downloaded" and self._lost_files(shard):
            state = "submitted" if shard["batch_id"] else "built"  # fetched again, or read again from vLLM's
        if state == "built" and self.vllm:
            out = Path(shard["input_path"].replace(".input.jsonl", ".output.jsonl"))
            if not out.exists():  # `vllm run-batch` has not written it (yet)
                return set()
            self.store.update(name, state="downloaded", status="completed", output_path=str(out))
        elif state == "built":
            if self._room_for(shard):
                self._submit(shard)
            return set()
        elif state == "submitted":
            batch = self._remote(lambda c: c.batches.retrieve(shard["batch_id"]))
            counts = batch.request_counts
            self.store.update(name, status=batch.status, counts=json.dumps(
                counts.model_dump() if counts else {}), reason=_errors(batch))
            if batch.status not in TERMINAL:
                return set()
            self._download(name, batch)
        return self._collect(self.store.conn.execute("SELECT * FROM batch_shards WHERE shard = ?",
                                                     (name,)).fetchone())

    def _room_for(self, shard) -> bool:
        cap = self.cfg.batch_max_queued_tokens
        queued = sum(s["est_tokens"] for s in self.store.shards(self.judge, self.version) if s["state"] == "submitted")
        return cap is None or queued == 0 or queued + shard["est_tokens"] <= cap

    # ------------------------------------------------------------------ remote steps

    def _lost_files(self, shard) -> bool:
        """True when a saved output or error file of a downloaded shard is gone (deleted by hand, say): the
        provider still has it, so it is downloaded again rather than read."""
        lost = [shard[k] for k in ("output_path", "error_path") if shard[k] and not Path(shard[k]).exists()]
        if lost:
            log.warning("batch %s: %s is gone; %s", shard["batch_id"] or shard["shard"], ", ".join(lost),
                        "downloading it again" if shard["batch_id"] else "waiting for `vllm run-batch` to write it")
        return bool(lost)

    def _submit(self, shard) -> None:
        name = shard["shard"]
        existing = self._find_batch(shard)  # a kill after "create", before its commit
        if existing is None and shard["create_sent"]:  # sent, and perhaps made: a list may lag behind its creates
            waited = time.time() - shard["create_sent"]
            if waited < self.cfg.batch_find_s:
                if name not in self._looking:  # said once; looked for at every poll
                    self._looking.add(name)
                    log.info("shard %s: a batch create was sent %.0f s ago and the provider's list does not show "
                             "it yet; looking again for up to %.0f s before creating another (score.batch_find_s)",
                             name, waited, self.cfg.batch_find_s)
                return
            log.warning("shard %s: the batch create sent %.0f s ago never showed in the provider's list; creating "
                        "it again (score.batch_find_s)", name, waited)
        if existing is None:
            file_id = shard["input_file_id"]
            if not file_id:
                with open(shard["input_path"], "rb") as fh:
                    uploaded = self._remote(lambda c: c.files.create(file=(f"{name}.jsonl", fh), purpose="batch"))
                file_id = uploaded.id
                _kill_point("uploaded")
                self.store.update(name, input_file_id=file_id)
            self.store.update(name, create_sent=time.time())
            existing = self._remote(lambda c: self._create(c, name, file_id))
            _kill_point("created")
        self.store.update(name, state="submitted", batch_id=existing.id, status=existing.status)
        log.info("batch %s: shard %s submitted (%d requests)", existing.id, name, shard["n_lines"])

    def _create(self, client, name: str, file_id: str):
        import openai

        try:
            return client.with_options(max_retries=0).batches.create(
                input_file_id=file_id, endpoint=BATCH_ENDPOINT, completion_window="24h",
                metadata={"ual_shard": name, "ual_judge": self.judge[:500]})
        except openai.APIStatusError as exc:
            if 400 <= exc.status_code < 500:  # refused: no batch was made, so none is to be looked for
                self.store.update(name, create_sent=None)
            raise

    def _find_batch(self, shard):
        """The batch already created for this shard, if any: by the shard's name in its metadata, or by its
        input file (a provider that keeps no metadata); the provider's list, newest first, back to a day
        before the shard was made."""
        name, file_id = shard["shard"], shard["input_file_id"]
        for batch in self._remote(lambda c: c.batches.list(limit=100)):
            if (batch.metadata or {}).get("ual_shard") == name or (file_id and batch.input_file_id == file_id):
                return batch
            if batch.created_at < shard["created"] - 86_400:  # a day before the shard: well past any clock skew
                return None
        return None

    def _download(self, name: str, batch) -> None:
        """The raw output and error files, saved before anything is read from them."""
        paths = {}
        for kind, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
            if file_id:
                raw = self._remote(lambda c: c.files.content(file_id).content)
                paths[f"{kind}_path"] = str(write_bytes(self.dir / f"{batch.id}.{kind}.jsonl", raw))
        _kill_point("downloaded")
        self.store.update(name, state="downloaded", **paths)

    def _remote(self, call):
        """call(client), with a wrong key, no access or an unknown endpoint as one fatal line."""
        from ual.scoring.judge_http import judge_failure, open_sync_client

        if self._client is None:
            self._client = open_sync_client(self.scorer.key, self.cfg.base_url, self.opts.timeout_s)
        try:
            return call(self._client)
        except Exception as exc:
            reason, _ = judge_failure(exc, self.scorer.key, self.cfg.base_url, self.judge)  # raises if fatal
            raise OSError(f"batch endpoint: {reason}; run the same command again to go on") from None

    # ------------------------------------------------------------------ answers

    def _collect(self, shard) -> set[str]:
        """Every item of a shard from its saved output and error files, in one transaction with the answers."""
        items = self.store.items(shard["shard"])
        files = [(shard[k], Path(shard[k]).read_bytes()) for k in ("output_path", "error_path") if shard[k]]
        lines, notes, unreadable = pick_answers(files, {it["custom_id"] for it in items})
        if notes:  # said once: the shard is collected in this same step
            log.warning("batch %s: %s", shard["batch_id"] or shard["shard"], "; ".join(notes))
        if shard["status"] == "failed" and shard["reason"]:
            log.warning("batch %s failed: %s; its requests go in the next round", shard["batch_id"], shard["reason"])
        unusable = self.store.unusable_counts([it["custom_id"] for it in items])
        final, answers, updates, usage = set(), [], [], [0, 0]
        for it in items:
            cid = it["custom_id"]
            h, draw = cache_key(cid)
            line = lines.get(cid)
            if line is None:
                why = shard["reason"] or f"no answer in the batch (status {shard['status']}" + (
                    f"; {unreadable} of its lines unreadable)" if unreadable else ")")
                updates.append(("retry", why, shard["shard"], cid))
                continue
            got = line_outcome(line, it["temperature"], json.loads(it["sent"]), self.scorer.scrub)
            usage = [usage[0] + got.usage[0], usage[1] + got.usage[1]]
            kind = got.kind
            if kind.startswith("refused:"):
                self.scorer.drop_field(kind.split(":", 1)[1], got.reason)
                kind = "retry"
            if kind == "unusable" and unusable.get(cid, 0) + 1 > self.cfg.max_retries:
                kind = "final"
            updates.append((kind, got.reason, shard["shard"], cid))
            if kind == "ok":
                answers.append((h, draw, True, got.record["score"], {**got.record, "attempts": unusable.get(cid, 0) + 1,
                                                                     "reasons": [], "batch": shard["batch_id"]}))
            elif kind == "final":
                final.add(cid)
                answers.append((h, draw, False, None, {"ok": False, "error": got.reason, "reasons": [got.reason],
                                                       "attempts": unusable.get(cid, 0) + 1}))
        now = time.time()
        with self.store.transaction():
            self.store.conn.executemany("UPDATE batch_items SET outcome = ?, reason = ? WHERE shard = ? AND "
                                        "custom_id = ?", updates)
            self.store.conn.executemany(UPSERT_ANSWER, [(self.judge, self.version, h, d, int(ok), score,
                                                         json.dumps(rec, ensure_ascii=False), now)
                                                        for h, d, ok, score, rec in answers])
            self.store.conn.execute("UPDATE batch_shards SET state = 'collected', prompt_tokens = ?, "
                                    "completion_tokens = ?, updated = ? WHERE shard = ?",
                                    (usage[0], usage[1], now, shard["shard"]))
            _kill_point("collecting")  # inside the transaction: a kill here must leave none of it
        got_ok = sum(u[0] == "ok" for u in updates)
        log.info("batch %s (%s): %d answered, %d to ask again, %d failed", shard["batch_id"] or shard["shard"],
                 shard["status"], got_ok, sum(u[0] in ("retry", "unusable") for u in updates), len(final))
        return final

    # ------------------------------------------------------------------ progress

    def _print_status(self, active) -> None:
        price = self.scorer.price
        done = self.store.shards(self.judge, self.version, active=False)
        tin, tout = sum(s["prompt_tokens"] for s in done), sum(s["completion_tokens"] for s in done)
        cost = (f"${(tin * price[0] + tout * price[1]) * BATCH_DISCOUNT / 1e6:.4f} at the batch price" if price
                else "cost n/a")
        for s in active:
            line = f"{s['status'] or s['state']}, {_progress(s)}"
            if self._shown.get(s["shard"], ("", 0.0))[0] == line and time.time() - self._shown[s["shard"]][1] < 300:
                continue  # a line when something changed, or every 5 minutes
            self._shown[s["shard"]] = (line, time.time())
            print(f"batch {s['batch_id'] or '-'} [{s['shard']}]: {line}; so far {tin} + {tout} tokens, {cost}",
                  file=sys.stderr)

    def _vllm_commands(self, active) -> str:
        runs = [f"  vllm run-batch -i {s['input_path']} -o {s['input_path'].replace('.input.jsonl', '.output.jsonl')}"
                f" --model {self.judge}" for s in active]
        return ("request files written for vLLM; run these (on the GPU machine), then this same `ual score` "
                "command again to read the answers:\n" + "\n".join(runs))


def _kill_point(name: str) -> None:
    """Fault injection for the crash tests: SIGKILL this process at `name` when $UAL_TEST_KILL_AT says so."""
    if os.environ.get("UAL_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _errors(batch) -> str | None:
    errors = getattr(batch, "errors", None)
    data = getattr(errors, "data", None) or []
    return "; ".join(f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "") for e in data) or None


def _progress(shard) -> str:
    counts = json.loads(shard["counts"] or "{}")
    total, done, failed = counts.get("total") or shard["n_lines"], counts.get("completed", 0), counts.get("failed", 0)
    eta = ""
    if done and shard["status"] == "in_progress":
        rate = done / max(time.time() - shard["created"], 1e-6)
        eta = f", ETA {max(total - done - failed, 0) / rate / 60:.0f} min"
    return f"{done}/{total} done, {failed} failed{eta}"
