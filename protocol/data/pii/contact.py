"""Emails, IP addresses and phone numbers.

Phone numbers are Google's libphonenumber's job (the `phonenumbers` port): it knows every country's
numbering plan and how each writes its numbers. Chat is full of digit groups that some plan accepts
(dates, scores, product codes), so a number counts when one of these holds:

    written with a plus (+49 …)                   possible (the right length) in its country's plan
    after a word like "call", "Tel.", "Handy"    possible in one of `REGIONS`' plans
    written with 00 (0049 …)                     valid in its country's plan
    otherwise                                    grouped as one of `REGIONS` groups it, and not bare digits

Emails and IPs are regexes with `ipaddress` as the judge; email addresses spelled out to dodge
harvesters ("jdoe at example dot com") count when they end in a common top-level domain.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator

from protocol.data.pii.finding import Finding, cued

# National formats we meet most in chat; a number written with +CC or 00CC is found for any country.
REGIONS = ("US", "GB", "DE", "FR", "JP", "IN", "NL", "ES", "IT", "AU", "CH", "BR")

# Quantifiers are bounded (RFC 5321's lengths) so a long run without an @ costs linear time.
_EMAIL = re.compile(
    r"(?<![\w.%+'-])[\w.%+-][\w.%+'-]{0,63}@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.){1,8}[^\W\d_]{2,24}"
    r"(?![\w-])"
)
# `scheme://user:password@host`: credentials.py takes the user:password, the host is no email.
_URL_USERINFO = re.compile(r"://[^\s/@]*$")
_TLD = r"(?:com|org|net|edu|gov|info|io|dev|app|me|biz|[a-z]{2})"
_AT = r"\s*(?:\[at\]|\(at\)|\{at\})\s*|\s+at\s+"
_DOT = r"\s*(?:\[dot\]|\(dot\)|\{dot\})\s*|\s+dot\s+"
_SPELLED_EMAIL = re.compile(
    rf"(?i)(?<![\w.])\w[\w+-]{{0,63}}(?:(?:{_DOT}|\.)\w[\w+-]{{0,63}}){{0,4}}(?:{_AT})"
    rf"\w[\w-]{{0,62}}(?:(?:{_DOT})\w[\w-]{{0,62}}){{0,4}}"
    rf"(?:{_DOT}){_TLD}(?![\w])"
)
_SPELLED_HINT = re.compile(rf"(?i){_DOT}")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d]|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:]|\.\d)"
)
# Words that precede a version, not an address.
_NOT_AN_IP = re.compile(r"(?i)(?:\bv|version\s*|release\s*|build\s*)$")
# Where a phone number may be: digits with the separators people write, at most as long as the longest
# formatted number. The matcher sees each run with a little text either side (its own checks look there);
# a longer run (a table of numbers, a long id) is no phone number and costs nothing.
_DIGIT_RUN = re.compile(
    r"(?<![\d+])(?<!\d[\s().\-/])[+(]?\d[\d\s().\-/]{5,38}\d(?!\d|[\s().\-/]+\d)"
)
_CONTEXT = 20
# Words that say a phone number follows (not "Bestellnummer" or "numéro de commande": order numbers).
_PHONE_CUE = re.compile(
    r"(?i)phone|\bcall|\bring\b|\btel\b|tel\.|mobile|\bcell|landline|whatsapp|text me|\btext\b|\bsms\b|\bfax"
    r"|\bdial|\breach (?:me|us|\w+ at|\w+ on)|contact|hotline|helpline|\bgsm\b|handy|telefon|rufnummer"
    r"|anruf|rufen|durchwahl|portable|appel|téléphone|\btél|llám|móvil|teléfono|cellulare|telefono"
    r"|\bbel\b|mobiel"
    r"|電話|携帯|ＴＥＬ|फ़ोन|मोबाइल"
)


def _emails(text: str) -> Iterator[Finding]:
    for m in _email_matches(text):
        if not _URL_USERINFO.search(text, max(0, m.start() - 80), m.start()):
            yield Finding("email", m.start(), m.end())


def _email_matches(text: str) -> Iterator[re.Match[str]]:
    if "@" in text:
        yield from _EMAIL.finditer(text)
    if _SPELLED_HINT.search(text):
        yield from _SPELLED_EMAIL.finditer(text)


def _ips(text: str) -> Iterator[Finding]:
    for m in _IPV4.finditer(text):
        if _NOT_AN_IP.search(text[max(0, m.start() - 10):m.start()]):
            continue
        if all(len(octet) == 1 for octet in m.group(0).split(".")):
            continue  # "3.2.1.4" is a section or a version; 1.1.1.1 and 8.8.8.8 are nobody's address
        try:
            ipaddress.IPv4Address(m.group(0))
        except ValueError:
            continue
        yield Finding("ipv4", m.start(), m.end())
    for m in _IPV6.finditer(text):
        candidate = m.group(0)
        if len([g for g in candidate.split(":") if g]) < 3 and candidate != "::1" and "." not in candidate:
            continue  # C++'s std::vector, times like 12:30:45 (but ::ffff:192.0.2.1 is an address)
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield Finding("ipv6", m.start(), m.end())


def _phones(text: str) -> Iterator[Finding]:
    import phonenumbers

    lenient = phonenumbers.Leniency
    seen: set[tuple[int, int]] = set()
    for run in _DIGIT_RUN.finditer(text):
        raw = run.group(0)
        if sum(c.isdigit() for c in raw) < 7:
            continue  # no plan has shorter subscriber numbers: most chat numbers stop here
        plus = raw.lstrip("(").startswith("+")
        international = plus or raw.lstrip("(").startswith("00")
        cue = cued(text, run.start(), _PHONE_CUE, window=30)
        if not (international or cue) and raw.isdigit():
            continue  # a bare run of digits is an order number until a word says otherwise
        # +CC and 00CC name their country (any region whose exit code is 00 reads them)
        regions = ("GB",) if international else REGIONS
        if cue or plus:
            leniency = lenient.POSSIBLE
        elif international:
            leniency = lenient.VALID
        else:
            leniency = lenient.STRICT_GROUPING
        lo = max(0, run.start() - _CONTEXT)
        window = text[lo:run.end() + _CONTEXT]
        best: set[tuple[int, int]] = set()
        for region in regions:
            spans = _read(window, lo, run, region, leniency)
            if _covered(spans) > _covered(best):
                best = spans
            if _covered(best) >= len(raw.strip("()")):
                break  # a plan read the whole run: the others need not try
        yield from (Finding("phone", *span) for span in sorted(best - seen))
        seen |= best


def _covered(spans: set[tuple[int, int]]) -> int:
    return sum(end - start for start, end in spans)


def _read(window: str, lo: int, run: re.Match[str], region: str, leniency) -> set[tuple[int, int]]:
    """Spans (in the whole text) of the numbers `region`'s plan finds on `run`."""
    import phonenumbers

    spans = set()
    for m in phonenumbers.PhoneNumberMatcher(window, region, leniency):
        start = lo + m.start
        end = lo + m.end
        if start < run.end() and end > run.start() and sum(c.isdigit() for c in m.raw_string) >= 7:
            spans.add((start, end))
    return spans


def find(text: str) -> Iterator[Finding]:
    yield from _emails(text)
    yield from _ips(text)
    yield from _phones(text)
