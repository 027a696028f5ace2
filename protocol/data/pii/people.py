"""Names after a title, and street addresses.

No offline library finds names in free text without a language model, so we take the cue people give:
a title ("Dr. Anna Schmidt", "Herr Klaus Weber", "Mme Isabelle Martin", "山田太郎様"). A title with a
single word after it counts only when someone is addressed ("Dear Mr. O'Connor", "Mrs Nguyen, ..."): on
its own "Dr. Pepper" or "Mr. Robot" is as likely a brand or a show. The title goes with the name.

Addresses: pyap2 parses whole US, Canadian and UK addresses (street, unit, city, state, postcode). For
a street line on its own, and for countries it does not cover, a house number next to a street-type word
("742 Evergreen Terrace", "Hauptstr. 5a", "12 rue de la Paix", "Keizersgracht 123") starts an address,
and what follows it (unit, postcode, city) joins it. libpostal would do this for every country but needs
a 2 GB model fetched at run time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache

from protocol.data.pii.finding import Finding

_UPPER = "A-ZÀ-ÖØ-ÞĀ-Ž"
_WORD = rf"[{_UPPER}][\w'’]{{0,30}}(?:-[{_UPPER}][\w'’]{{0,30}}){{0,3}}"  # Anna, O'Connor, Jean-Pierre
_PARTICLE = r"(?:van|von|der|den|de|du|la|le|di|da|dos|del|ter|bin|al)"
_LINK = r"(?:de la|de l'|della|del|dei|de|des|du|da|do|dos|das|di|den|der|van|von)"  # Calle de Alcalá
_TITLE = (r"(?:Mr|Mrs|Ms|Mx|Dr|Prof|Dott|Sig|Sr|Sra|Srta|Dhr|Mevr|Hr|Mme|Mlle)\.?"
          r"|Miss|Professor|Doctor|Sir|Dame|Herr|Frau|Madame|Monsieur|Mademoiselle|Signora?|Señora?"
          r"|Dr\.-Ing\.|M\.")
_NAME = re.compile(
    rf"(?<![\w.])(?P<title>(?:{_TITLE})(?:\s+(?:{_TITLE}))*)\s+"
    rf"(?P<name>{_WORD}(?:\s+(?:{_PARTICLE}\s+)*{_WORD}){{0,3}})"
)
_ADDRESSED = re.compile(r"(?i)(?:dear|hi|hello|hey|morning|sehr geehrter?|liebe[rs]?|hallo|bonjour|cher"
                        r"|chère|estimad[oa]|querid[oa]|gentile|car[oa]|beste|geachte)\W*$")
_JAPANESE_NAME = re.compile(r"[\u4e00-\u9fff]{2,5}(?:様|さま|さん|氏|先生|殿)")

_STREET_TYPE = (r"Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Boulevard|Blvd|Drive|Dr|Court|Ct|Place|Pl|Terrace"
                r"|Way|Parkway|Pkwy|Square|Sq|Close|Crescent|Highway|Hwy|Row|Gardens|Grove|Mews")
_STREET_SUFFIX = (r"straße|strasse|str\.|weg|gasse|platz|allee|ring|damm|ufer|chaussee|gracht|straat|laan"
                  r"|plein|kade|singel|dijk")
_STREET_LINE = re.compile(
    # number first: 742 Evergreen Terrace, 12 W 31st St
    rf"(?<![\w.,-])\d{{1,5}}[A-Za-z]?(?:-\d+)?\s+(?:[NSEW]\.?\s+)?(?:(?:{_WORD}|\d+(?:st|nd|rd|th))\s+){{1,3}}"
    rf"(?:{_STREET_TYPE})\b\.?"
    # French, Spanish, Italian, Portuguese: 12 rue de la Paix, 45 bd Haussmann, Via Roma 12
    rf"|(?<![\w.,-])\d{{1,4}}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|av\.|boulevard|bd|place|allée|impasse"
    rf"|chemin|quai|cours|route)\s+(?:(?:de la|de l'|du|des|de|d')\s*)?{_WORD}(?:[\s-]+{_WORD}){{0,3}}"
    rf"|(?<![\w-])(?:Calle|Via|Viale|Piazza|Plaza|Avenida|Rua|Carrer)\s+(?:{_LINK}\s+)?{_WORD}"
    rf"(?:\s+(?:{_LINK}\s+)?{_WORD}){{0,3}},?\s+\d{{1,4}}"
    # German, Dutch: Musterstraße 12, Am Lindenweg 3, Friedrich-Ebert-Platz 17, Keizersgracht 123
    rf"|(?<![\w-])(?:(?:Am|An der|Im|In der|Auf der|Zum|Zur)\s+)?[{_UPPER}][\w-]{{0,40}}?"
    rf"(?i:{_STREET_SUFFIX})\s+\d{{1,4}}(?:\s?[a-z])?(?![\w-])"
    # India: Flat 402, House No. 27 (the rest joins as the tail)
    rf"|\b(?:Flat|House No\.?|H\.\s?No\.?|Plot No\.?|Door No\.?)\s*\d{{1,5}}[A-Z]?"
    # Japan: 東京都千代田区丸の内1-9-1, 1-2-3 Shibuya
    r"|(?:東京都|北海道|大阪府|京都府|[\u4e00-\u9fff]{2,3}県)[\u4e00-\u9fff\u3040-\u30ff]{1,20}?\d+(?:[-－]\d+){1,2}"
    rf"|(?<![\w-])\d{{1,2}}-\d{{1,2}}-\d{{1,3}}\s+{_WORD}"
)
# Any continental street before ", postcode town" (Unter den Linden 77, 10117 Berlin), where no rule above
# found one: German capitalizes every noun, so "Ihre Adresse Musterstraße 12" must not all count.
_CONTINENTAL = re.compile(
    rf"(?<![\w-]){_WORD}(?:\s+(?:{_LINK}\s+)?{_WORD}){{0,3}}\s+\d{{1,4}}[a-z]?"
    rf"(?=,\s*(?:\d{{5}}|(?!19|20)\d{{4}})\s*[A-Z]{{0,2}}\s+{_WORD})"
)
_UK_POSTCODE = r"[A-Z]{1,2}\d[A-Z\d]?\s*\d[A-Z]{2}"
# What may follow a street line, each after a comma or space: a unit, a named place, a postcode + city.
_TAIL = re.compile(
    rf",?\s+(?:(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Sector|#)\.?\s*\w{{1,5}}"
    rf"|[A-Z]{{2}}\s+\d{{5}}(?:-\d{{4}})?"  # US state + ZIP
    rf"|{_UK_POSTCODE}"
    rf"|\d{{4}}\s?[A-Z]{{2}}\s+{_WORD}"  # Dutch postcode + city
    rf"|\d{{3}}-\d{{4}}|\d{{4,6}}(?:\s+{_WORD})?"  # Japanese, then German/French/Indian postcodes
    # a place (Shibuya-ku, New York) before a comma or a postcode
    rf"|{_WORD}(?:[\s-]+{_WORD}){{0,2}}(?:-(?:ku|shi|cho|machi|gun))?"
    rf"(?=,|\s+(?:[A-Z]{{2}}\s+)?(?:\d{{4,6}}|\d{{3}}-\d{{4}})\b|\s+{_UK_POSTCODE}\b))"
)


def _names(text: str) -> Iterator[Finding]:
    for m in _NAME.finditer(text):
        words = m.group("name").split()
        addressed = _ADDRESSED.search(text[max(0, m.start() - 25):m.start()])
        followed = text[m.end():m.end() + 1] in (",", ":")
        if len(words) >= 2 or addressed or followed:
            yield Finding("name", m.start(), m.end("name"))
    for m in _JAPANESE_NAME.finditer(text):
        yield Finding("name", m.start(), m.end())


def _with_tail(text: str, end: int) -> int:
    while m := _TAIL.match(text, end):
        end = m.end()
    return end


_HOUSE_NUMBER = re.compile(r"\d[\dA-Za-z-]*\s+(?:[^\s\d]\S*\s+){0,4}$")  # "1600 Amphitheatre "


@cache
def _pyap_street_types() -> frozenset[str]:
    from pyap.source_US.data import street_type_list

    # USPS abbreviates Island "Is": in chat it is the verb, in nearly every sentence
    return frozenset(t.lower() for t in street_type_list) - {"is"} | {"box"}


def _pyap_windows(text: str) -> list[tuple[int, int]]:
    """The stretches around pyap's own street-type words (USPS's list, and PO Box) that have a house or
    box number near: its rules are slow on long text, and an address it can find always has both."""
    types = _pyap_street_types()
    windows: list[tuple[int, int]] = []
    for m in re.finditer(r"[A-Za-z]+", text):
        word = m.group(0).lower()
        if word not in types:
            continue
        if word != "box" and not _HOUSE_NUMBER.search(text, max(0, m.start() - 60), m.start()):
            continue
        start = max(0, m.start() - 80)
        end = m.end() + 120
        if windows and start <= windows[-1][1]:
            windows[-1] = (windows[-1][0], end)
        else:
            windows.append((start, end))
    return windows


def _typed(street: str) -> bool:
    return any(word.lower() in _pyap_street_types() for word in re.findall(r"[A-Za-z]+", street))


def _addresses(text: str) -> Iterator[Finding]:
    import pyap

    for lo, hi in _pyap_windows(text):
        for country in ("US", "GB", "CA"):
            for address in pyap.parse(text[lo:hi], country=country):
                # its UK rules also take "256 of the file is e3b0c4…" (a number, words, a postcode-like
                # run): a real street names its type, and a postcode ends where a word ends
                start = lo + address.match_start
                end = lo + address.match_end
                typed = address.po_box or _typed(address.full_street or "")
                if typed and not text[end:end + 1].isalnum():
                    yield Finding("address", start, end)
    lines = [(m.start(), m.end()) for m in _STREET_LINE.finditer(text)]
    for m in _CONTINENTAL.finditer(text):
        if not any(start < m.end() and end > m.start() for start, end in lines):
            lines.append((m.start(), m.end()))
    for start, end in lines:
        yield Finding("address", start, _with_tail(text, end))


def find(text: str) -> Iterator[Finding]:
    yield from _names(text)
    yield from _addresses(text)
