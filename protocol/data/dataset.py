"""Chat datasets for the commons: validate `messages` JSONL, import ShareGPT, scrub PII, dedupe.

    >>> records, report = prepare(Path("chats.jsonl"), license="CC-BY-4.0", source="my notes",
    ...                           contributor=identity.public_hex)
    >>> Path("out/data.jsonl").write_bytes(encode_records(records))

A record on disk is one JSON line: {"messages": [{"role", "content"}...], "license", "source",
"contributor"} - the format TRL's SFTTrainer and `tokenizer.apply_chat_template` take as-is.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from protocol.data.pii import describe, scrub
from protocol.errors import CommonsError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
    "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system", "tool": "tool",
    "function_call": "assistant", "observation": "tool", "function_response": "tool",
}
# SPDX ids seen on data and model hubs; anything else must be a LicenseRef- so typos fail loudly.
KNOWN_LICENSES = {
    "CC0-1.0", "CC-BY-4.0", "CC-BY-3.0", "CC-BY-SA-4.0", "CC-BY-SA-3.0", "CC-BY-NC-4.0", "CC-BY-NC-SA-4.0",
    "CC-BY-NC-ND-4.0", "CC-BY-ND-4.0", "CC-BY-NC-3.0", "CC-BY-NC-SA-3.0", "ODC-By-1.0", "ODbL-1.0",
    "PDDL-1.0", "CDLA-Permissive-2.0", "CDLA-Sharing-1.0", "MIT", "Apache-2.0", "BSD-2-Clause",
    "BSD-3-Clause", "GPL-3.0-only", "GPL-3.0-or-later", "LGPL-3.0-only", "AGPL-3.0-only", "MPL-2.0",
    "Unlicense", "OpenRAIL", "OpenRAIL-M", "llama3", "llama3.1", "gemma",
}


@dataclass
class Report:
    """What happened to the input: shown to the volunteer before anything is published."""

    lines: int = 0
    records: int = 0
    duplicates: int = 0
    sharegpt: int = 0
    pii: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {"lines": self.lines, "records": self.records, "duplicates": self.duplicates,
                "sharegpt_converted": self.sharegpt, "pii_removed": dict(sorted(self.pii.items()))}


def check_license(spdx: str) -> str:
    """A known SPDX id, or an expression of them (`MIT AND CC-BY-4.0`, `… WITH …`), in canonical form."""
    from protocol.data.spdx import canonical

    return canonical(spdx.strip(), _known_license)


def _known_license(spdx: str) -> str:
    canonical = {lic.lower(): lic for lic in KNOWN_LICENSES}.get(spdx.strip().lower())
    if canonical:
        return canonical
    if spdx.startswith("LicenseRef-") and len(spdx) > len("LicenseRef-"):
        return spdx
    raise CommonsError(f"unknown licence {spdx!r}; use an SPDX id such as CC-BY-4.0, CC0-1.0, MIT or "
                       "Apache-2.0 (or LicenseRef-<name> for a custom one)")


def normalize(obj: object, where: str) -> tuple[list[dict], bool]:
    """The `messages` of one input record (native or ShareGPT), and whether it was ShareGPT."""
    if not isinstance(obj, dict):
        raise CommonsError(f"{where}: expected a JSON object with a 'messages' list; "
                           'write each line as {"messages": [{"role": "user", "content": "..."}]}')
    if "messages" in obj:
        return _check_messages(obj["messages"], where, "messages"), False
    if "conversations" in obj:
        return _from_sharegpt(obj["conversations"], where), True
    raise CommonsError(f"{where}: no 'messages' (chat) or 'conversations' (ShareGPT) key; "
                       'write each line as {"messages": [{"role": "user", "content": "..."}]}')


def _check_messages(messages: object, where: str, key: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise CommonsError(f"{where}: '{key}' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, msg in enumerate(messages):
        at = f"{where}: {key}[{i}]"
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise CommonsError(f"{at} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise CommonsError(f"{at}.role is {msg['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str) or not msg["content"].strip():
            raise CommonsError(f"{at}.content must be a non-empty string")
        out.append({"role": msg["role"], "content": msg["content"]})
    roles = {m["role"] for m in out}
    if "user" not in roles or "assistant" not in roles:
        raise CommonsError(f"{where}: a conversation needs at least one 'user' and one 'assistant' message")
    return out


def _from_sharegpt(turns: object, where: str) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise CommonsError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}: conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise CommonsError(f"{at} must be an object with 'from' and 'value' (ShareGPT format)")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise CommonsError(f"{at}.from is {turn['from']!r}; use one of human, gpt, system, tool")
        messages.append({"role": role, "content": turn["value"]})
    return _check_messages(messages, where, "conversations")


def read_input(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) per record of a JSONL file, or of a ShareGPT JSON array file."""
    if not path.is_file():
        raise CommonsError(f"{path} not found; pass a .jsonl file of chat records")
    with path.open("r", encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    if head.startswith("["):  # ShareGPT dumps are often one JSON array
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CommonsError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
        for i, item in enumerate(items):
            yield f"{path} record {i + 1}", item
        return
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise CommonsError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                                   "each line must be one JSON object") from None


def scrub_messages(messages: list[dict], counts: Counter[str]) -> list[dict]:
    out = []
    for msg in messages:
        result = scrub(msg["content"])
        counts.update(result.counts)
        out.append({"role": msg["role"], "content": result.text})
    return out


def fingerprint(messages: list[dict]) -> str:
    """Same conversation up to case and whitespace → same fingerprint."""
    canon = [[m["role"], " ".join(m["content"].lower().split())] for m in messages]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()


def prepare(path: Path, license: str, source: str, contributor: str,
            progress: Iterable | None = None) -> tuple[list[dict], Report]:
    """Validated, scrubbed, deduplicated records ready to sign; raises on the first bad line."""
    license = check_license(license)
    if not source.strip():
        raise CommonsError("--source is empty; say where the data comes from (a URL or a sentence)")
    report, seen, records = Report(), set(), []
    items = read_input(path)
    for where, obj in progress(items) if progress else items:
        report.lines += 1
        messages, was_sharegpt = normalize(obj, where)
        report.sharegpt += was_sharegpt
        messages = scrub_messages(messages, report.pii)
        key = fingerprint(messages)
        if key in seen:
            report.duplicates += 1
            continue
        seen.add(key)
        records.append({"messages": messages, "license": license, "source": source,
                        "contributor": contributor})
    if not records:
        raise CommonsError(f"{path} holds no records; add one chat per line")
    report.records = len(records)
    return records, report


def encode_records(records: list[dict]) -> bytes:
    """The JSONL bytes of `records`: one stable encoding, so the same records give the same CID."""
    return "".join(json.dumps(rec, ensure_ascii=False, sort_keys=True) + "\n" for rec in records).encode()


def dataset_card(name: str, license: str, source: str, report: Report) -> str:
    pii = describe(report.pii)
    return (f"# {name}\n\nChat records in `data.jsonl` (one `messages` conversation per line).\n\n"
            f"- Licence: {license}\n- Source: {source}\n- Records: {report.records} "
            f"({report.duplicates} duplicates removed)\n- PII scrubbed: {pii}\n")
