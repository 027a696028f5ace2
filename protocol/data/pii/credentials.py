"""Keys, tokens and passwords.

detect-secrets (Yelp) keeps the provider patterns: AWS, GitHub, GitLab, Slack, Stripe, SendGrid, npm,
Azure storage, Twilio, JWTs, credentials in URLs and more; we run each of its regex plugins over the
text. Its keyword and entropy plugins are made for source files (quoted values, rules picked by file
name): on chat prose they miss `my password is x` and flag `password_min_length = 12`, so prose gets
our keyword rule below instead. We add the few key formats detect-secrets does not know yet, and
remove whole PEM blocks (its plugin sees only the BEGIN line).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterator
from functools import cache

from protocol.data.pii.finding import Finding

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY"
    r"(?: BLOCK)?-----|\Z)"
)
# What detect-secrets' plugins miss: newer formats, test Stripe keys, mixed-case Slack tokens.
_EXTRA_KEYS = (
    ("github_token", re.compile(r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}")),
    ("openai_key", re.compile(r"(?<![A-Za-z0-9_-])sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}")),
    ("api_key", re.compile(
        r"(?<![A-Za-z0-9_-])(?:xox[abposr]-[A-Za-z0-9-]{10,}|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"
        r"|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30,}|npm_[A-Za-z0-9]{36})")),
    # detect-secrets' JWT pattern stops before the signature
    ("jwt", re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    # scheme://user:password@host, user too (detect-secrets' basic-auth plugin takes the password only)
    ("secret", re.compile(r"(?<=://)[^/\s:@]{1,64}:[^/\s@]{1,128}(?=@)")),
)
_SECRET_TYPES = {  # detect-secrets' secret_type → our kind; any other type is an "api_key"
    "AWS Access Key": "aws_key", "GitHub Token": "github_token", "OpenAI Token": "openai_key",
    "JSON Web Token": "jwt", "Basic Auth Credentials": "secret",
}
# contact.py finds IP addresses, including private ones; the PEM block above replaces this plugin.
_SKIPPED_TYPES = {"Public IP (ipv4)", "Private Key"}

_KEYWORD = (r"api[_-]?key|apikey|secret(?:[_-]?key)?|client[_-]?secret|access[_-]?key(?:[_-]?id)?"
            r"|auth[_-]?token|access[_-]?token|refresh[_-]?token|token|password|passwort|kennwort|passwd"
            r"|pwd|passphrase|mot de passe|contraseña|private[_-]?key|credentials?")
_VALUE = r"(?P<value>[A-Za-z0-9_\-+/=.~!@#$%^&*]{6,})"
# `key=value`, `"password": "value"`, `Authorization: Bearer value`.
_ASSIGNED = re.compile(
    rf"(?i)(?:(?:\b|(?<=_))(?:{_KEYWORD})\b[\"']?\s*(?:[:=]|=>)\s*[\"']?"
    r"|\bauthorization:\s*(?:bearer|token|basic)\s+|\bbearer\s+)" + _VALUE
)
# `my password is value`, `auth token value`: only a value that looks random counts.
_SAID = re.compile(rf"(?i)\b(?:{_KEYWORD})\s+(?:(?:is|was|ist|est|es)\s+)?" + _VALUE)


@cache
def _plugins() -> list[tuple[str, re.Pattern[str]]]:
    """(kind, regex) for every regex plugin detect-secrets ships."""
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class
    from detect_secrets.plugins.base import RegexBasedDetector

    out = []
    for secret_type, cls in sorted(get_mapping_from_secret_type_to_class().items()):
        if issubclass(cls, RegexBasedDetector) and secret_type not in _SKIPPED_TYPES:
            kind = _SECRET_TYPES.get(secret_type, "api_key")
            out.extend((kind, rx) for rx in cls().denylist)
    return out


def _secret_span(m: re.Match[str]) -> tuple[int, int]:
    """The secret inside a plugin's match: its last long group (the value after `key=`), else all of it,
    without the separators some patterns take in."""
    groups = [i for i in range(1, (m.re.groups or 0) + 1) if m.group(i) and len(m.group(i)) >= 8]
    start, end = m.span(groups[-1]) if groups else m.span()
    text = m.string
    while start < end and text[start] in " \t\n=:\"'":
        start += 1
    while end > start and text[end - 1] in " \t\n\"'":
        end -= 1
    return start, end


def entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(value)
    return -sum(c / len(value) * math.log2(c / len(value)) for c in counts.values()) if value else 0.0


def _looks_random(value: str) -> bool:
    classes = sum(bool(re.search(p, value)) for p in (r"[a-z]", r"[A-Z]", r"\d", r"[^A-Za-z0-9]"))
    return len(value) >= 12 and entropy(value) >= 3.0 and classes >= 2


def _looks_secret(value: str, keyword: str) -> bool:
    if re.fullmatch(r"\[[A-Z_]+\]", value) or value.lower() in {"none", "null", "true", "false", "redacted"}:
        return False
    if re.search(r"(?i)pass|pwd|wort", keyword):
        return len(value) >= 6  # passwords are secret whatever their entropy
    return _looks_random(value)


def _keyword_values(text: str) -> Iterator[Finding]:
    for m in _ASSIGNED.finditer(text):
        keyword = m.group(0)[: m.start("value") - m.start()]
        value = m.group("value").rstrip(".,;:!)\"'")
        if _looks_secret(value, keyword):
            yield Finding("secret", m.start("value"), m.start("value") + len(value))
    for m in _SAID.finditer(text):
        value = m.group("value").rstrip(".,;:!)\"'")
        mixed = sum(bool(re.search(p, value)) for p in (r"[A-Za-z]", r"\d", r"[^A-Za-z0-9]")) >= 2
        if mixed and (_looks_random(value) or re.search(r"(?i)pass|pwd|wort", m.group(0))):
            yield Finding("secret", m.start("value"), m.start("value") + len(value))


def find(text: str) -> Iterator[Finding]:
    """Private keys, provider keys and tokens, and values given to a password or key."""
    for m in _PRIVATE_KEY.finditer(text):
        yield Finding("private_key", m.start(), m.end())
    for kind, rx in _plugins():
        for m in rx.finditer(text):
            start, end = _secret_span(m)
            if end - start >= 8:
                yield Finding(kind, start, end)
    for kind, rx in _EXTRA_KEYS:
        for m in rx.finditer(text):
            yield Finding(kind, m.start(), m.end())
    yield from _keyword_values(text)
