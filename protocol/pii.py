"""Find and scrub personal data and secrets in text before anyone publishes it.

    >>> scrub("mail bob@example.org, key AKIAIOSFODNN7EXAMPLE").text
    'mail [EMAIL], key [AWS_KEY]'

Detection is regex-first with cheap validators (Luhn for cards, `ipaddress` for IPs, Shannon entropy for
generic tokens) because a false "clean" is worse than an over-eager placeholder, yet chat data is full of
numbers, versions and hashes that must survive.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections import Counter
from dataclasses import dataclass, field

PLACEHOLDERS = {
    "private_key": "[PRIVATE_KEY]",
    "aws_key": "[AWS_KEY]",
    "github_token": "[GITHUB_TOKEN]",
    "openai_key": "[OPENAI_KEY]",
    "api_key": "[API_KEY]",
    "jwt": "[JWT]",
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "credit_card": "[CREDIT_CARD]",
    "ipv4": "[IP_ADDRESS]",
    "ipv6": "[IP_ADDRESS]",
    "phone": "[PHONE]",
}


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


@dataclass
class Scrubbed:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


# Order matters only for overlaps: an earlier kind wins over a later one covering the same characters.
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----"
)
_AWS = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])")
_GITHUB = re.compile(r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})")
_OPENAI = re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}")
_OTHER_KEYS = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API
    r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|glpat-[A-Za-z0-9_-]{20,}"  # GitLab
    r")"
)
_JWT = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")
# A value after key=, token:, "password": ... or an Authorization header.
_ASSIGNED = re.compile(
    r"(?i)(?:(?:\b|(?<=_))(?:api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?key(?:[_-]?id)?"
    r"|aws[_-]?secret[_-]?access[_-]?key|auth[_-]?token|access[_-]?token|refresh[_-]?token|token"
    r"|password|passwd|pwd|passphrase|private[_-]?key|credentials?)\b[\"']?\s*(?:[:=]|=>)\s*[\"']?"
    r"|\bauthorization:\s*(?:bearer|token|basic)\s+|\bbearer\s+)"
    r"(?P<value>[A-Za-z0-9_\-+/=.~!@#$%^&*]{6,})"
)
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/\s:@]{1,64}:[^/\s@]{1,128}(?=@)")  # scheme://user:pass@host
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,5}(?:[\s.-]\d{2,6}){1,4}(?![\w])"
    r"|(?<![\w+])\+\d{8,14}(?!\w)"
    r"|(?<!\w)\d{10,11}(?!\w)"
)
_PHONE_CUE = re.compile(r"(?i)(?:phone|call|tel|mobile|cell|whatsapp|text me|sms|fax|dial|reach me)")
_VERSION_CUE = re.compile(r"(?i)(?:\bv|version\s*|release\s*|build\s*)$")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_prefix_ok(digits: str) -> bool:
    """Issuer ranges of the major networks: stops Luhn-valid order numbers from being called cards."""
    n2, n4 = int(digits[:2]), int(digits[:4])
    return (
        digits[0] == "4"
        or 51 <= n2 <= 55
        or 2221 <= n4 <= 2720
        or n2 in (34, 37, 36, 38, 30, 35, 62, 65)
        or digits.startswith("6011")
    )


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    if not value:
        return 0.0
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values())


def _looks_secret(value: str, keyword: str) -> bool:
    if re.fullmatch(r"\[[A-Z_]+\]", value) or value.lower() in {"none", "null", "true", "false", "redacted"}:
        return False
    if re.search(r"(?i)pass|pwd", keyword):
        return len(value) >= 6  # passwords are secret whatever their entropy
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return len(value) >= 12 and entropy(value) >= 3.0 and classes >= 2


def _phone_ok(text: str, m: re.Match[str]) -> bool:
    raw = m.group(0)
    digits = re.sub(r"\D", "", raw)
    if not 7 <= len(digits) <= 15:
        return False
    cue = _PHONE_CUE.search(text[max(0, m.start() - 40):m.start()]) is not None
    if raw.startswith("+") or "(" in raw:
        return len(digits) >= 8
    if re.fullmatch(r"\d+", raw):
        return cue  # a bare run of digits is a phone number only when the text says so
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}", raw):
        return False  # dates
    # Without a +country code, brackets or a cue word, only the unmistakable 3-3-4 layout counts: runs of
    # years, scores or ids separated by spaces are far more common in chat than bare phone numbers.
    return cue or re.fullmatch(r"\d{3}([-. ])\d{3}\1\d{4}", raw) is not None


def find_pii(text: str) -> list[Finding]:
    """Every personal datum or secret in `text`, non-overlapping, in text order."""
    found: list[Finding] = []

    def add(kind: str, start: int, end: int) -> None:
        found.append(Finding(kind, start, end))

    for kind, rx in (("private_key", _PRIVATE_KEY), ("aws_key", _AWS), ("github_token", _GITHUB),
                     ("openai_key", _OPENAI), ("api_key", _OTHER_KEYS), ("jwt", _JWT),
                     ("secret", _URL_CREDENTIALS), ("email", _EMAIL)):
        for m in rx.finditer(text):
            add(kind, m.start(), m.end())
    for m in _ASSIGNED.finditer(text):
        keyword = m.group(0)[: m.start("value") - m.start()]
        value = m.group("value").rstrip(".,;:!)\"'")
        if _looks_secret(value, keyword):
            add("secret", m.start("value"), m.start("value") + len(value))
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group(0))
        if 13 <= len(digits) <= 19 and luhn_ok(digits) and _card_prefix_ok(digits):
            add("credit_card", m.start(), m.end())
    for m in _IPV4.finditer(text):
        if _VERSION_CUE.search(text[max(0, m.start() - 10):m.start()]):
            continue
        try:
            ipaddress.IPv4Address(m.group(0))
        except ValueError:
            continue
        add("ipv4", m.start(), m.end())
    for m in _IPV6.finditer(text):
        candidate = m.group(0)
        if len([g for g in candidate.split(":") if g]) < 3 and candidate != "::1":
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        add("ipv6", m.start(), m.end())
    for m in _PHONE.finditer(text):
        if _phone_ok(text, m):
            add("phone", m.start(), m.end())
    return _without_overlaps(found)


def _without_overlaps(found: list[Finding]) -> list[Finding]:
    """Keep the first-detected finding where two overlap (detectors ran in priority order)."""
    kept: list[Finding] = []
    for f in found:  # `found` is in priority order
        if all(f.end <= k.start or f.start >= k.end for k in kept):
            kept.append(f)
    return sorted(kept, key=lambda f: f.start)


def scrub(text: str) -> Scrubbed:
    """`text` with every finding replaced by its placeholder, and how many of each kind went."""
    out, counts, pos = [], Counter[str](), 0
    for f in find_pii(text):
        out.append(text[pos:f.start])
        out.append(PLACEHOLDERS[f.kind])
        counts[f.kind] += 1
        pos = f.end
    out.append(text[pos:])
    return Scrubbed("".join(out), counts)
