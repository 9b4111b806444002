"""The filter language's grammar: tokens to a checked syntax tree.

Grammar (keywords in any case; ``&&`` ``||`` ``!`` are ``and`` ``or`` ``not``)::

    filter   := or END
    or       := and ("or" and)*
    and      := unary ("and" unary)*
    unary    := "not" unary | "(" or ")" | test
    test     := PROTOCOL [NUMBER]            tcp, dns …; "tcp 80" = tcp and port 80
              | FIELD                        present (a boolean field: true)
              | FIELD CMP literal            == != < <= > >=
              | FIELD "contains" STRING | FIELD "matches" STRING
              | FIELD "in" "{" literal ("," | literal | LOW..HIGH)* "}"
              | ("src" | "dst") ("port" | "host") literal
              | ("port" | "host") literal    port 53 = port == 53; host A = ip.addr == A
              | "contains" STRING            the payload contains these bytes
              | STRING | WORD                the summary line contains it (any case)

Everything is checked here, before any packet is seen: unknown names (with a
suggestion), operators a field's type does not take, literals of the wrong type,
regular expressions that do not compile or are too long. Input is bounded: at most
:data:`MAX_FILTER_CHARS` characters and :data:`MAX_DEPTH` levels of parentheses and
``not``, so neither a huge nor a deeply nested filter can exhaust memory or the stack.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from typing import NoReturn

from secvf.errors import InvalidFilter
from secvf.net.filters.fields import ALIASES, FIELDS, OPERATORS, PROTOCOLS, Field, FieldType
from secvf.net.filters.fields import lookup as lookup_field
from secvf.net.filters.lexer import Kind, Token, tokenize

#: The longest filter accepted, in characters.
MAX_FILTER_CHARS = 64 * 1024
#: How deep parentheses and ``not`` may nest.
MAX_DEPTH = 64
#: The longest regular expression ``matches`` takes, in characters.
MAX_REGEX_CHARS = 256

#: How similar (difflib ratio) a dotted word must be to a field name to be taken for a
#: misspelling of it rather than a word to search for.
TYPO_SIMILARITY = 0.75

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class AnyOf:
    """``a or b or …``"""

    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class AllOf:
    """``a and b and …``"""

    terms: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    """``not a``"""

    term: Node


@dataclass(frozen=True, slots=True)
class Protocol:
    """A protocol word: the packet has this layer (``malformed``: some layer failed)."""

    name: str


@dataclass(frozen=True, slots=True)
class Search:
    """A bare word or string: the summary line contains it, ignoring case."""

    text: str  # lowercase


@dataclass(frozen=True, slots=True)
class Present:
    """A bare field: it is in the packet (a boolean field: it is true)."""

    field: Field


#: A checked literal: int, str, bytes, bool, an IP network (an address is a /32 or
#: /128), a compiled regex, or for ``in`` a tuple of those (INT: ``(low, high)`` pairs).
Literal = object


@dataclass(frozen=True, slots=True)
class Compare:
    """``field op value``, with ``value`` already of the field's type."""

    field: Field
    op: str  # ==, !=, <, <=, >, >=, contains, matches, in
    value: Literal


Node = AnyOf | AllOf | Not | Protocol | Search | Present | Compare

#: Sugar: keyword(s) then a literal means "field == literal".
_SUGAR = {("port",): "port", ("src", "port"): "srcport", ("dst", "port"): "dstport",
          ("host",): "ip.addr", ("src", "host"): "ip.src", ("dst", "host"): "ip.dst"}

#: A dotted word starting with one of these names a field (so a typo is an error,
#: not a search for the text "dns.qry.nmae").
_FIELD_PREFIXES = frozenset(name.split(".", 1)[0] for name in FIELDS if "." in name) \
    | frozenset(PROTOCOLS)

_VALUE_KINDS = (Kind.WORD, Kind.STRING)


def parse(text: str) -> Node:
    """The checked syntax tree of filter ``text``.

    Raises:
        InvalidFilter: the filter is empty, too long, nested too deep, or wrong at
            ``position`` (the message says what was expected there).
    """
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidFilter(f"the filter is {len(text)} characters long; at most "
                            f"{MAX_FILTER_CHARS} are accepted")
    if not text.strip():
        raise InvalidFilter("the filter is empty: expected an expression such as 'tcp "
                            "and port 80'", 0)
    return _Parser(tokenize(text)).parse()


def field_names() -> list[str]:
    """Every name a filter can use: protocol words, fields and their aliases."""
    return sorted({*PROTOCOLS, *FIELDS, *ALIASES})


class _Parser:
    """Recursive descent over the tokens; ``_depth`` bounds the recursion."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens
        self._at = 0
        self._depth = 0

    # ---- helpers ------------------------------------------------------------------------

    @property
    def _peek(self) -> Token:
        return self._tokens[self._at]

    def _next(self) -> Token:
        token = self._tokens[self._at]
        if token.kind is not Kind.END:
            self._at += 1
        return token

    def _expect(self, kind: Kind, what: str) -> Token:
        if self._peek.kind is not kind:
            self._fail(f"expected {what}")
        return self._next()

    def _fail(self, message: str, token: Token | None = None) -> NoReturn:
        token = token or self._peek
        found = "the end of the filter" if token.kind is Kind.END else repr(token.text) \
            if token.kind is not Kind.STRING else "a string"
        raise InvalidFilter(f"{message}, found {found}", token.pos)

    def _word_is(self, *words: str) -> bool:
        return self._peek.kind is Kind.WORD and self._peek.text.lower() in words

    # ---- the grammar --------------------------------------------------------------------

    def parse(self) -> Node:
        node = self._or()
        if self._peek.kind is not Kind.END:
            self._fail("expected 'and', 'or', ')' or the end of the filter")
        return node

    def _or(self) -> Node:
        terms = [self._and()]
        while self._peek.kind is Kind.OR:
            self._next()
            terms.append(self._and())
        return terms[0] if len(terms) == 1 else AnyOf(tuple(terms))

    def _and(self) -> Node:
        terms = [self._unary()]
        while self._peek.kind is Kind.AND:
            self._next()
            terms.append(self._unary())
        return terms[0] if len(terms) == 1 else AllOf(tuple(terms))

    def _unary(self) -> Node:
        token = self._peek
        if token.kind in (Kind.NOT, Kind.LPAREN):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                raise InvalidFilter(f"the filter nests parentheses and 'not' more than "
                                    f"{MAX_DEPTH} deep", token.pos)
            self._next()
            if token.kind is Kind.NOT:
                node: Node = Not(self._unary())
            else:
                node = self._or()
                self._expect(Kind.RPAREN, "')' to close the '(' at character "
                             f"{token.pos + 1}")
            self._depth -= 1
            return node
        return self._test()

    def _test(self) -> Node:
        token = self._peek
        if token.kind is Kind.STRING:
            self._next()
            return Search(token.text.lower())
        if token.kind is Kind.CONTAINS:
            self._next()
            return self._compare(FIELDS["payload"], "contains", token)
        if token.kind is not Kind.WORD:
            self._fail("expected a protocol, a field, a word to search for, 'not' or '('")
        key = tuple(t.text.lower() for t in self._tokens[self._at:self._at + 2]
                    if t.kind is Kind.WORD)
        for words, name in _SUGAR.items():
            if key[:len(words)] == words:
                return self._sugar(len(words), FIELDS[name])
        if token.text.lower() in ("src", "dst"):
            self._next()
            self._fail(f"expected 'port' or 'host' after {token.text!r}")
        word = token.text.lower()
        if word in PROTOCOLS:
            return self._protocol(word)
        found = lookup_field(word)
        if found is not None:
            self._next()
            return self._field_test(found)
        return self._unknown(token)

    def _protocol(self, word: str) -> Node:
        self._next()
        after = self._peek
        if after.kind is Kind.WORD and after.text.isdigit():  # "tcp 80"
            self._next()
            port = Compare(FIELDS["port"], "==", self._int(FIELDS["port"], after))
            return AllOf((Protocol(word), port))
        if after.kind in (Kind.CMP, Kind.CONTAINS, Kind.MATCHES, Kind.IN):
            self._fail(f"{word!r} is a protocol, not a field: expected 'and', 'or' or the "
                       f"end of the filter (fields look like '{word}.…')", after)
        return Protocol(word)

    def _sugar(self, count: int, target: Field) -> Node:
        for _ in range(count):
            self._next()
        if self._peek.kind in _VALUE_KINDS:  # "port 53": "port == 53"
            return self._compare(target, "==", self._tokens[self._at - 1])
        return self._field_test(target)

    def _field_test(self, field: Field) -> Node:
        op_token = self._peek
        if op_token.kind not in (Kind.CMP, Kind.CONTAINS, Kind.MATCHES, Kind.IN):
            if op_token.kind in _VALUE_KINDS:
                self._fail(f"expected a comparison ('==', 'contains' …) after {field.name}")
            return Present(field)
        self._next()
        if op_token.text not in OPERATORS[field.type]:
            allowed = ", ".join(sorted(OPERATORS[field.type]))
            raise InvalidFilter(f"{field.name} is {_article(field.type)} field: "
                                f"{op_token.text!r} does not apply (expected one of "
                                f"{allowed})", op_token.pos)
        return self._compare(field, op_token.text, op_token)

    def _unknown(self, token: Token) -> Node:
        self._next()
        word = token.text
        follows_op = self._peek.kind in (Kind.CMP, Kind.CONTAINS, Kind.MATCHES, Kind.IN)
        close = difflib.get_close_matches(word.lower(), field_names(), n=1, cutoff=0.6)
        if follows_op or "." in word and (word.split(".", 1)[0].lower() in _FIELD_PREFIXES
                                          or _similar(word, close)):
            hint = f"; did you mean {close[0]!r}?" if close else \
                " (docs/packets.md lists the fields)"
            raise InvalidFilter(f"unknown field {word!r}{hint}", token.pos)
        return Search(word.lower())

    # ---- literals -----------------------------------------------------------------------

    def _compare(self, field: Field, op: str, op_token: Token) -> Compare:
        if op == "in":
            return Compare(field, op, self._set(field))
        token = self._next()
        if token.kind not in _VALUE_KINDS:
            self._fail(f"expected {_expected(field, op)} after {op_token.text!r}", token)
        if op == "matches":
            return Compare(field, op, self._regex(field, token))
        if op == "contains" and field.type is FieldType.BYTES and token.kind is Kind.WORD:
            self._fail("expected a quoted string after 'contains'", token)
        return Compare(field, op, self._literal(field, token))

    def _set(self, field: Field) -> tuple[Literal, ...]:
        self._expect(Kind.LBRACE, "'{' to start the set after 'in'")
        members: list[Literal] = []
        while self._peek.kind is not Kind.RBRACE:
            if self._peek.kind is Kind.COMMA:
                self._next()
                continue
            token = self._next()
            if token.kind not in _VALUE_KINDS:
                self._fail(f"expected {_expected(field, '==')} or '}}'", token)
            if field.type is FieldType.INT and ".." in token.text:
                low, _, high = token.text.partition("..")
                bounds = (self._int(field, Token(Kind.WORD, low, token.pos)),
                          self._int(field, Token(Kind.WORD, high, token.pos)))
                if bounds[0] > bounds[1]:
                    raise InvalidFilter(f"the range {token.text} is empty: expected "
                                        "LOW..HIGH with LOW <= HIGH", token.pos)
                members.append(bounds)
            else:
                value = self._literal(field, token)
                members.append((value, value) if field.type is FieldType.INT else value)
        self._next()
        if not members:
            self._fail("expected at least one value in the set", self._tokens[self._at - 1])
        return tuple(members)

    def _literal(self, field: Field, token: Token) -> Literal:
        kind = field.type
        if kind is FieldType.INT:
            return self._int(field, token)
        if kind is FieldType.STR:
            return token.text.lower() if field.fold else token.text
        if kind is FieldType.BYTES:
            return token.data if token.kind is Kind.STRING else token.text.encode()
        if kind is FieldType.BOOL:
            value = {"1": True, "0": False, "true": True, "false": False}.get(
                token.text.lower())
            if value is None or token.kind is Kind.STRING:
                self._fail(f"expected 1, 0, true or false for {field.name}", token)
            return value
        if kind is FieldType.ADDR:
            return self._network(field, token)
        return self._mac(field, token)

    def _int(self, field: Field, token: Token) -> int:
        text = token.text.lower()
        if token.kind is Kind.WORD and text in field.names:
            return field.names[text]
        if token.kind is Kind.WORD and text.upper() in field.names:
            return field.names[text.upper()]
        try:
            value = int(text, 0) if token.kind is Kind.WORD else None
        except ValueError:
            value = None
        if value is None or value < 0:
            names = f" or one of {', '.join(sorted(field.names))}" if field.names else ""
            self._fail(f"expected a number for {field.name}{names}", token)
        return value

    def _network(self, field: Field, token: Token) -> IPNetwork:
        try:
            if token.kind is Kind.STRING:
                raise ValueError
            return ipaddress.ip_network(token.text, strict=False)
        except ValueError:
            self._fail(f"expected an IPv4 or IPv6 address or CIDR block (10.0.0.0/24) for "
                       f"{field.name}", token)

    def _mac(self, field: Field, token: Token) -> str:
        parts = re.split(r"[:\-]", token.text.lower())
        if token.kind is Kind.STRING or len(parts) != 6 or not all(
                len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts):
            self._fail(f"expected a MAC address (52:54:00:12:34:56) for {field.name}", token)
        return ":".join(parts)

    def _regex(self, field: Field, token: Token) -> re.Pattern[str] | re.Pattern[bytes]:
        if token.kind is not Kind.STRING:
            self._fail("expected a regular expression in double quotes after 'matches'",
                       token)
        if len(token.text) > MAX_REGEX_CHARS:
            raise InvalidFilter(f"the regular expression is {len(token.text)} characters; "
                                f"at most {MAX_REGEX_CHARS} are accepted", token.pos)
        flags = re.IGNORECASE if field.fold else 0
        try:
            if field.type is FieldType.BYTES:
                return re.compile(token.data, flags | re.DOTALL)
            return re.compile(token.text, flags)
        except (re.error, RecursionError, OverflowError, ValueError) as exc:
            raise InvalidFilter(f"invalid regular expression: {exc}", token.pos) from None


def _similar(word: str, close: list[str]) -> bool:
    """A dotted word this close to a field name is a misspelt field (``tpc.port``),
    not text to search for (``example.com``)."""
    return bool(close) and difflib.SequenceMatcher(None, word.lower(), close[0]).ratio() \
        >= TYPO_SIMILARITY


def _article(kind: FieldType) -> str:
    return ("an " if kind.value[0] in "aeiouIM" else "a ") + kind.value


def _expected(field: Field, op: str) -> str:
    if op in ("contains", "matches"):
        return "a quoted string"
    return {FieldType.INT: "a number", FieldType.STR: "a string",
            FieldType.BYTES: "a quoted string", FieldType.ADDR: "an IP address",
            FieldType.MAC: "a MAC address", FieldType.BOOL: "1 or 0"}[field.type] \
        + f" for {field.name}"
