"""`${...}` placeholders in case text: variables and integer arithmetic.

A case writes `${size}`, `${size + 1536}` or `${2 * 64k}` where the test
script would write `$size` or `$((size + 1536))`; `${path:base}` is the full
path of image `base`, for arguments such as `json:{...}` filenames. `$$` is
a literal `$`. Numbers may carry QEMU's binary size suffixes (k, M, G, T,
P, E). Division truncates like the shell's.

A text that is exactly one placeholder takes the value's own type (so a
variable bound to null or to a number stays one); anything else renders to
a string. Errors are plain ValueError messages; the caller adds file:line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Value = str | int | bool | None

_SUFFIXES = {"": 0, "k": 10, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}

# Longer than any offset or size a case needs, and far below Python's limit
# on converting digits to an integer.
MAX_NUMBER_TEXT = 40
# no size or offset in a case comes near this; it keeps results printable
LARGEST_RESULT = 2**64
_SIZE_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)([kKMGTPE]?)")
_TOKEN = re.compile(
    r"\s*(?:(?P<number>0[xX][0-9a-fA-F]+|[0-9]+)(?P<suffix>[kKMGTPE](?![A-Za-z0-9_]))?"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[-+*/%()]))"
)
_PLACEHOLDER = re.compile(r"\$(?:(\$)|\{([^{}]*)\}|)")


@dataclass(frozen=True)
class PathRef:
    """`${path:NAME}`: the path of an image, resolved by the caller."""

    image: str

    def deferred(self) -> str:
        """A stand-in for the path inside a text, for `resolve_deferred` to
        replace once the images are known (variables come before images)."""
        return f"\0PATH:{self.image}\0"


_DEFERRED = re.compile("\0PATH:([^\0]*)\0")


def deferred_images(text: str) -> list[str]:
    """The image names of the deferred paths in `text`."""
    return _DEFERRED.findall(text)


def resolve_deferred(text: str, render_path: Callable[[PathRef], str]) -> str:
    if "\0PATH:" not in text:
        return text
    return _DEFERRED.sub(lambda match: render_path(PathRef(match.group(1))), text)


def parse_size_literal(text: str) -> int | None:
    """`4096`, `0x1000`, `4k` -> bytes; None when the text is not such a number."""
    match = _SIZE_LITERAL.fullmatch(text.strip())
    if match is None or len(match.group(1)) > MAX_NUMBER_TEXT:
        return None
    return int(match.group(1), 0) << _SUFFIXES[match.group(2)]


class _Parser:
    """Recursive descent over + - * / % and parentheses, integers only."""

    def __init__(self, text: str, lookup: Callable[[str], Value]) -> None:
        self.text = text
        self.lookup = lookup
        self.tokens = self._tokenize(text)
        self.pos = 0

    def _tokenize(self, text: str) -> list[tuple[str, str]]:
        tokens: list[tuple[str, str]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                bad = text[pos:].strip()[:1]
                raise ValueError(f"bad arithmetic in '${{{text}}}': unexpected {bad!r}")
            if match.group("number") is not None:
                if len(match.group("number")) > MAX_NUMBER_TEXT:
                    raise ValueError(f"number {match.group('number')[:20]}... is too large")
                value = int(match.group("number"), 0) << _SUFFIXES[match.group("suffix") or ""]
                tokens.append(("number", str(value)))
            elif match.group("name") is not None:
                tokens.append(("name", match.group("name")))
            else:
                tokens.append(("op", match.group("op")))
            pos = match.end()
        return tokens

    def _peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _fail(self, what: str) -> ValueError:
        return ValueError(f"bad arithmetic in '${{{self.text}}}': {what}")

    def parse(self) -> Value:
        if not self.tokens:
            raise ValueError("empty placeholder '${}'")
        if len(self.tokens) == 1 and self.tokens[0][0] == "name":
            return self._name(self.tokens[0][1], arithmetic=False)
        value = self._sum()
        if self._peek() is not None:
            raise self._fail(f"unexpected {self._peek()[1]!r}")
        if abs(value) >= LARGEST_RESULT:
            raise self._fail("the result is 2**64 or more")
        return value

    def _sum(self) -> int:
        value = self._product()
        while (token := self._peek()) is not None and token[1] in ("+", "-"):
            self.pos += 1
            right = self._product()
            value = value + right if token[1] == "+" else value - right
        return value

    def _product(self) -> int:
        value = self._unary()
        while (token := self._peek()) is not None and token[1] in ("*", "/", "%"):
            self.pos += 1
            right = self._unary()
            if token[1] == "*":
                value *= right
            elif right == 0:
                raise self._fail("division by zero")
            else:
                quotient = abs(value) // abs(right)
                if token[1] == "/":
                    value = quotient if (value >= 0) == (right >= 0) else -quotient
                else:
                    value = value - right * (quotient if (value >= 0) == (right >= 0) else -quotient)
        return value

    def _unary(self) -> int:
        token = self._peek()
        if token is None:
            raise self._fail("expression ends too early")
        if token == ("op", "-"):
            self.pos += 1
            return -self._unary()
        if token == ("op", "+"):
            self.pos += 1
            return self._unary()
        if token == ("op", "("):
            self.pos += 1
            value = self._sum()
            if self._peek() != ("op", ")"):
                raise self._fail("missing ')'")
            self.pos += 1
            return value
        self.pos += 1
        if token[0] == "number":
            return int(token[1])
        if token[0] == "name":
            value = self._name(token[1], arithmetic=True)
            assert isinstance(value, int)
            return value
        raise self._fail(f"unexpected {token[1]!r}")

    def _name(self, name: str, *, arithmetic: bool) -> Value:
        value = self.lookup(name)
        if not arithmetic:
            return value
        if isinstance(value, bool) or value is None:
            raise ValueError(f"variable {name!r} is {describe_value(value)}, not a number")
        if isinstance(value, int):
            return value
        number = parse_size_literal(value)
        if number is None:
            raise ValueError(f"variable {name!r} is {value!r}, not a number")
        return number


def describe_value(value: Value) -> str:
    """How a case value is named in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return repr(value)


def evaluate(expression: str, variables: Mapping[str, Value]) -> Value | PathRef:
    """The value of the text between `${` and `}`."""
    stripped = expression.strip()
    if stripped.startswith("path:"):
        image = stripped[len("path:"):].strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", image):
            raise ValueError(f"'${{{expression}}}' needs an image name after 'path:'")
        return PathRef(image)

    def lookup(name: str) -> Value:
        if name not in variables:
            known = ", ".join(sorted(variables)) or "none"
            raise ValueError(f"undefined variable {name!r} (defined here: {known})")
        return variables[name]

    return _Parser(expression, lookup).parse()


def interpolate(text: str, variables: Mapping[str, Value],
                render_path: Callable[[PathRef], str]) -> Value:
    """Substitute every placeholder in `text` (see the module docstring)."""
    if "$" not in text:
        return text
    whole = _PLACEHOLDER.fullmatch(text)
    if whole is not None and whole.group(2) is not None:
        value = evaluate(whole.group(2), variables)
        if isinstance(value, PathRef):
            return render_path(value)
        return resolve_deferred(value, render_path) if isinstance(value, str) else value

    def substitute(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return "$"
        if match.group(2) is None:
            raise ValueError("a '$' must start a '${...}' placeholder (write '$$' for a '$')")
        value = evaluate(match.group(2), variables)
        if isinstance(value, PathRef):
            return render_path(value)
        if value is None or isinstance(value, bool):
            raise ValueError(f"'${{{match.group(2)}}}' is {describe_value(value)} "
                             "and cannot be part of a text")
        return resolve_deferred(str(value), render_path)

    return _PLACEHOLDER.sub(substitute, text)
