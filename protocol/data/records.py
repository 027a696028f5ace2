"""Reading chat `messages` JSONL files (training and eval data) with line-numbered one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

from protocol.errors import CommonsError


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        raise CommonsError(f"no training data at {path}: pass --data FILE.jsonl (chat `messages` records)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CommonsError(f"{path}:{number}: not JSON ({exc.msg}); fix or remove the line") from None
        messages = rec.get("messages") if isinstance(rec, dict) else None
        if not (isinstance(messages, list) and messages and messages[-1].get("role") == "assistant"):
            raise CommonsError(f"{path}:{number}: needs `messages` ending with an assistant turn")
        records.append(rec)
    if not records:
        raise CommonsError(f"{path} holds no records: add chat `messages` JSONL lines")
    return records
