"""Splitting a filter expression into tokens, each with its 0-based position.

Token kinds: ``(`` ``)`` ``{`` ``}`` ``,``; ``and`` (also ``&&``), ``or`` (``||``),
``not`` (``!``); comparison operators ``== != < <= > >=`` (and Wireshark's ``eq ne lt
le gt ge``); ``contains``, ``matches``, ``in``; quoted strings; and words: everything
made of letters, digits and ``_ . : / -`` (field names, numbers, addresses, CIDR
blocks, MACs, ranges such as ``20..25``). Keywords are matched without regard to case.

A string is in double quotes with the escapes ``\\" \\\\ \\n \\r \\t \\xHH``. Its
:attr:`Token.data` holds its bytes, where ``\\xHH`` is that byte and any other character
is its UTF-8 encoding (what ``contains`` on a payload searches for).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from secvf.errors import InvalidFilter


class Kind(enum.Enum):
    """What a token is."""

    LPAREN = "'('"
    RPAREN = "')'"
    LBRACE = "'{'"
    RBRACE = "'}'"
    COMMA = "','"
    AND = "'and'"
    OR = "'or'"
    NOT = "'not'"
    CMP = "a comparison"
    CONTAINS = "'contains'"
    MATCHES = "'matches'"
    IN = "'in'"
    STRING = "a quoted string"
    WORD = "a word"
    END = "the end of the filter"


@dataclass(frozen=True, slots=True)
class Token:
    """One token: its kind, its text (a string's value; an operator in its ``==``
    form), its bytes (strings only) and where it starts."""

    kind: Kind
    text: str
    pos: int
    data: bytes = b""


WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:/-")

_KEYWORDS = {"and": (Kind.AND, "and"), "or": (Kind.OR, "or"), "not": (Kind.NOT, "not"),
             "contains": (Kind.CONTAINS, "contains"), "matches": (Kind.MATCHES, "matches"),
             "in": (Kind.IN, "in"), "eq": (Kind.CMP, "=="), "ne": (Kind.CMP, "!="),
             "lt": (Kind.CMP, "<"), "le": (Kind.CMP, "<="), "gt": (Kind.CMP, ">"),
             "ge": (Kind.CMP, ">=")}

# Longest first: "!=" before "!", "<=" before "<".
_SYMBOLS = (("&&", Kind.AND, "and"), ("||", Kind.OR, "or"), ("==", Kind.CMP, "=="),
            ("!=", Kind.CMP, "!="), ("<=", Kind.CMP, "<="), (">=", Kind.CMP, ">="),
            ("<", Kind.CMP, "<"), (">", Kind.CMP, ">"), ("!", Kind.NOT, "not"),
            ("(", Kind.LPAREN, "("), (")", Kind.RPAREN, ")"), ("{", Kind.LBRACE, "{"),
            ("}", Kind.RBRACE, "}"), (",", Kind.COMMA, ","))

_MISTAKES = {"=": "expected '==' (a single '=' is not a comparison)",
             "&": "expected '&&' or 'and'", "|": "expected '||' or 'or'",
             "'": "expected a string in double quotes"}

_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an END token.

    Raises:
        InvalidFilter: a character that starts no token, or an unterminated string
            or bad escape (with its position).
    """
    tokens: list[Token] = []
    pos, size = 0, len(text)
    while pos < size:
        char = text[pos]
        if char.isspace():
            pos += 1
        elif char == '"':
            token, pos = _string(text, pos)
            tokens.append(token)
        elif char in WORD_CHARS:
            end = pos
            while end < size and text[end] in WORD_CHARS:
                end += 1
            word = text[pos:end]
            kind, value = _KEYWORDS.get(word.lower(), (Kind.WORD, word))
            tokens.append(Token(kind, value, pos))
            pos = end
        else:
            for symbol, kind, value in _SYMBOLS:
                if text.startswith(symbol, pos):
                    tokens.append(Token(kind, value, pos))
                    pos += len(symbol)
                    break
            else:
                raise InvalidFilter(_MISTAKES.get(char, f"unexpected character {char!r}"),
                                    pos)
    tokens.append(Token(Kind.END, "", size))
    return tokens


def _string(text: str, start: int) -> tuple[Token, int]:
    """The string token starting at the quote at ``start``, and the position after it."""
    chars: list[str] = []
    data = bytearray()
    pos = start + 1
    while pos < len(text):
        char = text[pos]
        if char == '"':
            return Token(Kind.STRING, "".join(chars), start, bytes(data)), pos + 1
        if char == "\\":
            escape = text[pos + 1:pos + 2]
            if escape == "x" and _is_hex(text[pos + 2:pos + 4]):
                byte = int(text[pos + 2:pos + 4], 16)
                chars.append(chr(byte))
                data.append(byte)
                pos += 4
                continue
            if escape not in _ESCAPES:
                raise InvalidFilter("unknown escape in string: expected one of "
                                    "\\\" \\\\ \\n \\r \\t \\xHH", pos)
            char = _ESCAPES[escape]
            pos += 1
        chars.append(char)
        data += char.encode("utf-8", "surrogatepass")
        pos += 1
    raise InvalidFilter("unterminated string: expected a closing '\"'", start)


def _is_hex(digits: str) -> bool:
    return len(digits) == 2 and all(c in "0123456789abcdefABCDEF" for c in digits)
