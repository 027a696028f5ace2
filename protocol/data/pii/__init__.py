"""Find and scrub personal data and secrets in text before anyone publishes it.

    >>> result = scrub("mail bob@example.org, IBAN DE89 3704 0044 0532 0130 00")
    >>> result.text
    'mail [EMAIL], IBAN [IBAN]'
    >>> describe(result.counts)
    '1 email, 1 IBAN'

Four detectors, each a file, asked in this order (`DETECTORS`):

    credentials.py   keys, tokens, passwords, private keys      detect-secrets' provider patterns
    identifiers.py   IBAN, VAT, cards, SSN, NHS, BSN, passports  python-stdnum's checksums
    contact.py       emails, IP addresses, phone numbers         phonenumbers (every country's plan)
    people.py        names after a title, street addresses      pyap2 (US/CA/UK) + street words

Where two findings overlap they become one span, named by the earlier detector: a false "clean" is
worse than an over-eager placeholder, so a partial match never leaves the rest of a secret behind.
Maintained libraries do the detecting wherever one exists; the regexes left here find candidates or
cover what no offline library does (names, addresses outside the US/UK). The detectors import their
libraries on first use, so importing this package stays cheap.

Recall and false positives are measured on `tests/data/pii_corpus.jsonl`, a corpus written apart from
these rules (tests/test_pii.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from protocol.data.pii import contact, credentials, identifiers, people
from protocol.data.pii.finding import Finding

__all__ = ["DETECTORS", "KINDS", "Finding", "Scrubbed", "describe", "find_pii", "scrub"]

DETECTORS: tuple[Callable[[str], Iterable[Finding]], ...] = (
    credentials.find, identifiers.find, contact.find, people.find,
)


@dataclass(frozen=True)
class Kind:
    placeholder: str
    one: str
    many: str


# Every kind a detector may report, in the order `describe` lists them.
KINDS = {
    "private_key": Kind("[PRIVATE_KEY]", "private key", "private keys"),
    "aws_key": Kind("[AWS_KEY]", "AWS key", "AWS keys"),
    "github_token": Kind("[GITHUB_TOKEN]", "GitHub token", "GitHub tokens"),
    "openai_key": Kind("[OPENAI_KEY]", "OpenAI key", "OpenAI keys"),
    "api_key": Kind("[API_KEY]", "API key", "API keys"),
    "jwt": Kind("[JWT]", "JWT", "JWTs"),
    "secret": Kind("[SECRET]", "password or secret", "passwords or secrets"),
    "email": Kind("[EMAIL]", "email", "emails"),
    "iban": Kind("[IBAN]", "IBAN", "IBANs"),
    "vat": Kind("[VAT_ID]", "VAT number", "VAT numbers"),
    "credit_card": Kind("[CREDIT_CARD]", "card number", "card numbers"),
    "ssn": Kind("[SSN]", "SSN", "SSNs"),
    "nhs": Kind("[NHS_NUMBER]", "NHS number", "NHS numbers"),
    "bsn": Kind("[BSN]", "BSN", "BSNs"),
    "national_id": Kind("[NATIONAL_ID]", "national ID", "national IDs"),
    "passport": Kind("[PASSPORT]", "passport number", "passport numbers"),
    "ipv4": Kind("[IP_ADDRESS]", "IP address", "IP addresses"),
    "ipv6": Kind("[IP_ADDRESS]", "IP address", "IP addresses"),
    "phone": Kind("[PHONE]", "phone number", "phone numbers"),
    "name": Kind("[NAME]", "name", "names"),
    "address": Kind("[ADDRESS]", "street address", "street addresses"),
}


@dataclass
class Scrubbed:
    text: str
    counts: Counter[str] = field(default_factory=Counter)


def find_pii(text: str) -> list[Finding]:
    """Every personal datum or secret in `text`, non-overlapping, in text order."""
    found = [f for detect in DETECTORS for f in detect(text)]
    return _merged(found)


def _merged(found: list[Finding]) -> list[Finding]:
    """Overlapping findings become one span; the kind of the earliest-listed finding names it."""
    rank = {id(f): i for i, f in enumerate(found)}
    merged: list[tuple[Finding, int]] = []
    for f in sorted(found, key=lambda f: (f.start, -f.end)):
        if merged and f.start < merged[-1][0].end:
            last, last_rank = merged[-1]
            kind = f.kind if rank[id(f)] < last_rank else last.kind
            merged[-1] = (Finding(kind, last.start, max(last.end, f.end)), min(last_rank, rank[id(f)]))
        else:
            merged.append((f, rank[id(f)]))
    return [f for f, _ in merged]


def scrub(text: str) -> Scrubbed:
    """`text` with every finding replaced by its placeholder, and how many of each kind went."""
    out: list[str] = []
    counts: Counter[str] = Counter()
    pos = 0
    for f in find_pii(text):
        out.append(text[pos:f.start])
        out.append(KINDS[f.kind].placeholder)
        counts[f.kind] += 1
        pos = f.end
    out.append(text[pos:])
    return Scrubbed("".join(out), counts)


def describe(counts: Counter[str] | dict[str, int]) -> str:
    """What was removed, for people: '2 emails, 1 IBAN', or 'nothing found'."""
    by_label: Counter[str] = Counter()
    plural: dict[str, str] = {}
    for kind, spec in KINDS.items():
        if counts.get(kind):
            by_label[spec.one] += counts[kind]
            plural[spec.one] = spec.many
    if not by_label:
        return "nothing found"
    return ", ".join(f"{n} {label if n == 1 else plural[label]}" for label, n in by_label.items())
