"""SPDX licence expressions: `MIT`, `MIT AND CC-BY-4.0`, `(MIT OR Apache-2.0)`, `GPL-2.0-only WITH
Classpath-exception-2.0`, read as the alternatives a user may pick from, each the licences that all apply.

    >>> alternatives("MIT OR (CC-BY-4.0 AND CC-BY-NC-4.0)")
    [frozenset({'MIT'}), frozenset({'CC-BY-4.0', 'CC-BY-NC-4.0'})]
    >>> canonical("mit and cc-by-4.0", lambda i: {"mit": "MIT", "cc-by-4.0": "CC-BY-4.0"}[i.lower()])
    'MIT AND CC-BY-4.0'

AND binds tighter than OR (SPDX annex D); operators are read in any case and written in upper case. A
WITH exception adds permissions, so for what the licence forbids only the licence before it counts.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from protocol.errors import CommonsError

MAX_LENGTH = 200
MAX_ALTERNATIVES = 64
OPERATORS = ("AND", "OR", "WITH")
_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")

Alternatives = list[frozenset[str]]


class _Parser:
    """Recursive descent over the tokens; each rule returns (canonical text, alternatives)."""

    def __init__(self, text: str, name: Callable[[str], str]) -> None:
        self.text, self.name = text, name
        self.tokens = _TOKEN.findall(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        token = self.peek()
        if token is None:
            raise self.error("it ends too early")
        self.pos += 1
        return token

    def error(self, why: str) -> CommonsError:
        return CommonsError(f"licence {self.text[:MAX_LENGTH]!r} is not an SPDX expression ({why}); write "
                            "e.g. MIT, MIT AND CC-BY-4.0 or (MIT OR Apache-2.0)")

    def expression(self) -> tuple[str, Alternatives]:
        text, alts = self.conjunction()
        while (self.peek() or "").upper() == "OR":
            self.take()
            more_text, more = self.conjunction()
            text, alts = f"{text} OR {more_text}", alts + more
        return text, self.bounded(alts)

    def conjunction(self) -> tuple[str, Alternatives]:
        text, alts = self.term()
        while (self.peek() or "").upper() == "AND":
            self.take()
            more_text, more = self.term()
            text, alts = f"{text} AND {more_text}", self.bounded([a | b for a in alts for b in more])
        return text, alts

    def term(self) -> tuple[str, Alternatives]:
        token = self.take()
        if token == "(":
            text, alts = self.expression()
            if self.take() != ")":
                raise self.error("a parenthesis is not closed")
            return f"({text})", alts
        if token == ")" or token.upper() in OPERATORS or not _ID.match(token):
            raise self.error(f"{token[:40]!r} is not a licence id")
        licence = self.name(token)
        if (self.peek() or "").upper() != "WITH":
            return licence, [frozenset({licence})]
        self.take()
        exception = self.take()
        if not _ID.match(exception) or exception.upper() in OPERATORS:
            raise self.error(f"{exception[:40]!r} is not an exception id")
        return f"{licence} WITH {exception}", [frozenset({licence})]

    def bounded(self, alts: Alternatives) -> Alternatives:
        if len(alts) > MAX_ALTERNATIVES:
            raise self.error(f"it expands to over {MAX_ALTERNATIVES} alternatives")
        return alts


def parse(text: str, name: Callable[[str], str] = str) -> tuple[str, Alternatives]:
    """(canonical text, alternatives); `name` maps each licence id to its canonical form or raises."""
    if not text.strip() or len(text) > MAX_LENGTH:
        raise CommonsError(f"a licence must be 1-{MAX_LENGTH} characters; write e.g. "
                           "MIT or MIT AND CC-BY-4.0")
    parser = _Parser(text, name)
    result = parser.expression()
    if parser.peek() is not None:
        raise parser.error(f"{parser.peek()!r} is left over")
    return result


def canonical(text: str, name: Callable[[str], str] = str) -> str:
    return parse(text, name)[0]


def alternatives(text: str) -> Alternatives:
    """The choices an expression offers; a text that does not parse is one licence named by its whole text."""
    try:
        return parse(text)[1]
    except CommonsError:
        return [frozenset({text.strip()})]
