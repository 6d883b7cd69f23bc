"""The unit every stage passes along: one conversation with a stable id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    """A normalised training or evaluation sample.

    messages: chat turns [{"role": "system"|"user"|"assistant", "content": str}], at
    least one assistant turn. meta: anything a later stage needs (e.g. GSM8K's gold
    answer) and where the row came from ("origin": "file.jsonl:12").
    """

    id: str
    source: str
    messages: list[dict]
    meta: dict = field(default_factory=dict)

    @classmethod
    def create(cls, source: str, messages: list[dict], meta: dict | None = None) -> "Sample":
        return cls(id=content_id(source, messages), source=source, messages=messages, meta=dict(meta or {}))

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "messages": self.messages, "meta": self.meta}

    @classmethod
    def from_dict(cls, row: dict) -> "Sample":
        return cls(id=row["id"], source=row["source"], messages=row["messages"], meta=row.get("meta", {}))

    @property
    def prompt_messages(self) -> list[dict]:
        """The turns before the last assistant turn (what a model is asked to answer)."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return self.messages[:last]

    @property
    def final_response(self) -> str:
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")


def content_id(source: str, messages: list[dict]) -> str:
    """A stable id from the content, so caches survive reordering and reruns."""
    blob = json.dumps([source, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]
