"""Bank, card, tax and national identity numbers: a loose shape finds candidates, python-stdnum decides.

python-stdnum knows each number's checksum and structure (IBAN mod 97 per country, VAT per EU state,
the US SSN's never-issued ranges, the NHS mod 11, the Dutch 11-proof, Verhoeff for Aadhaar...). A
checksum that a tenth or an eleventh of random numbers pass is not proof on its own: those numbers count
only after a word that names them ("SSN", "NHS", "BSN", "Aadhaar", "Steuer-ID", "passport"...). The
self-describing ones (IBAN and VAT with their country prefix, cards with issuer and Luhn, the French NIR,
Spanish DNI, Italian codice fiscale, and the dashed SSN layout) count anywhere.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from functools import cache

from protocol.data.pii.finding import Finding, cued

# Letters/digits in groups, as people write account numbers: "DE89 3704 0044 0532 0130 00".
_IBAN = re.compile(r"(?i)(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{1,4}){3,8}")
_CARD = re.compile(r"(?<![\d.-])(?:\d[ .-]?){12,18}\d(?![\d-]|\.\d)")
_DIGIT_IDS = re.compile(r"(?<![\w.-])\d(?:[ .\-/]?\d){8,14}(?![\w-]|\.\d)")
_NIR = re.compile(r"(?<![\w-])[12] ?\d{2} ?\d{2} ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w-])")
_DNI = re.compile(r"(?<![\w-])(?:\d{8}|[XYZ]-?\d{7})[ -]?[A-Z](?![\w-])")
_CODICE_FISCALE = re.compile(r"(?<![\w-])[A-Z]{6}\d{2}[A-Z]\d{2}[A-Z]\d{3}[A-Z](?![\w-])")
_PASSPORT_NO = re.compile(r"(?<![\w-])(?=[A-Z0-9]*\d)[A-Z0-9]{6,10}(?![\w-])")

# Numbers whose checksum is weak count only after a word naming them (module, kind, cue).
_CUED = tuple((module, kind, re.compile(cue)) for module, kind, cue in (
    ("us.ssn", "ssn", r"(?i)\bss[n#]|social security|\bitin\b|tax id"),
    ("gb.nhs", "nhs", r"(?i)\bnhs\b"),
    ("nl.bsn", "bsn", r"(?i)\bbsn\b|burgerservice|sofi-?nummer|citizen service"),
    ("in_.aadhaar", "national_id", r"(?i)aadhaa?r|आधार|\buid\b"),
    ("de.idnr", "national_id", r"(?i)steuer-?id|identifikationsnummer|\bidnr|\btin\b"),
    ("ca.sin", "national_id", r"(?i)\bsin\b|social insurance|\bnas\b"),
    ("se.personnummer", "national_id", r"(?i)personnummer|personal identity number"),
    ("pl.pesel", "national_id", r"(?i)\bpesel\b"),
    ("be.nn", "national_id", r"(?i)rijksregister|registre national|numéro national|national number"),
))
_PASSPORT_CUE = re.compile(r"(?i)passport|reisepass|pass-?nr|passeport|pasaporte|passaporto|paspoort"
                           r"|旅券|パスポート|पासपोर्ट")


@cache
def _vat_candidates() -> re.Pattern[str]:
    """A VAT number starts with its EU state's code (Greece writes EL), as python-stdnum lists them."""
    states = {cc.upper() for cc in _stdnum("eu.vat").MEMBER_STATES} - {"GR"} | {"EL"}
    return re.compile(rf"(?<![A-Za-z0-9])(?:{'|'.join(sorted(states))})[ -]?[A-Z0-9]"
                      r"(?:[ .-]?[A-Z0-9]){7,13}")


def _stdnum(name: str):
    return importlib.import_module(f"stdnum.{name}")


def _valid(name: str, value: str) -> bool:
    return bool(_stdnum(name).is_valid(value))


def _longest_valid(m: re.Match[str], valid) -> tuple[int, int] | None:
    """The longest prefix of `m`, cut at a separator, that `valid` accepts (a greedy match may have
    swallowed the next word)."""
    raw = m.group(0)
    cuts = [len(raw)] + [i for i in range(len(raw) - 1, 0, -1) if not raw[i].isalnum()]
    for cut in cuts:
        candidate = raw[:cut].rstrip(" .-/")
        if valid(candidate):
            return m.start(), m.start() + len(candidate)
    return None


def _card_ok(digits: str) -> bool:
    """Luhn plus the issuer ranges of the major networks: stops Luhn-valid order numbers from being
    called cards."""
    if not 13 <= len(digits) <= 19 or not _valid("luhn", digits):
        return False
    n2 = int(digits[:2])
    n4 = int(digits[:4])
    return (digits[0] == "4" or 51 <= n2 <= 55 or 2221 <= n4 <= 2720
            or n2 in (34, 37, 36, 38, 30, 35, 62, 65) or digits.startswith("6011"))


def _card_grouped(raw: str) -> bool:
    """Written whole, or in three or more groups with one separator: not 2.718281828459045."""
    separators = set(re.findall(r"\D", raw))
    return not separators or (len(separators) == 1 and len(re.split(r"\D", raw)) >= 3)


def _shaped(text: str) -> Iterator[Finding]:
    """The numbers that say what they are by their shape and checksum."""
    for m in _IBAN.finditer(text):
        span = _longest_valid(m, lambda v: _valid("iban", v.upper()))
        if span:
            yield Finding("iban", *span)
    for m in _vat_candidates().finditer(text):
        span = _longest_valid(m, lambda v: len(re.sub(r"\W", "", v)) >= 9 and _valid("eu.vat", v))
        if span:
            yield Finding("vat", *span)
    for m in _CARD.finditer(text):
        if _card_ok(re.sub(r"\D", "", m.group(0))) and _card_grouped(m.group(0)):
            yield Finding("credit_card", m.start(), m.end())
    for rx, module in ((_NIR, "fr.nir"), (_DNI, "es.dni"), (_DNI, "es.nie"),
                       (_CODICE_FISCALE, "it.codicefiscale")):
        for m in rx.finditer(text):
            if _valid(module, m.group(0)):
                yield Finding("national_id", m.start(), m.end())
    for m in re.finditer(r"(?<![\w-])\d{3}-\d{2}-\d{4}(?![\w-])", text):
        if _valid("us.ssn", m.group(0)):
            yield Finding("ssn", m.start(), m.end())


def _named(text: str) -> Iterator[Finding]:
    """Numbers with a weak checksum, or none, after a word that names them."""
    for m in _DIGIT_IDS.finditer(text):
        for module, kind, cue in _CUED:
            if cued(text, m.start(), cue) and _valid(module, re.sub(r"\D", "", m.group(0))):
                yield Finding(kind, m.start(), m.end())
                break
    for cue in _PASSPORT_CUE.finditer(text):
        m = _PASSPORT_NO.search(text, cue.end(), cue.end() + 30)
        if m and "\n" not in text[cue.end():m.start()]:
            yield Finding("passport", m.start(), m.end())


def find(text: str) -> Iterator[Finding]:
    yield from _shaped(text)
    yield from _named(text)
