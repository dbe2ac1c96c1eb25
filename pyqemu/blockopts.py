"""Block-layer option syntax shared by the front ends.

QEMU's key=value lists (QemuOpts: `-o` for qemu-img create, `--image-opts`,
qemu-io's `open -o`), with ",," escaping, flag shorthand and help requests;
`json:{...}` pseudo-filenames parsed by a reader that accepts what QEMU's JSON
parser accepts; dotted keys turned into the nested dict imgengine.open_image
takes; and the backing-file path rules of block.c.
"""

from __future__ import annotations

from pyqemu.units import ERANGE, SizeError, strtosz

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class OptionError(Exception):
    """A malformed option; str() is QEMU's message, hint its appended hint."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.hint = hint


class OptionDesc:
    """One entry of a QemuOptsList description (name, type, help, default)."""

    __slots__ = ("name", "type", "help", "default")

    def __init__(self, name: str, type: str, help: str = "",
                 default: str | None = None) -> None:
        self.name = name
        self.type = type            # 'string' | 'bool' | 'number' | 'size'
        self.help = help
        self.default = default


class ParsedOption:
    """One name=value setting: the text as written (after ",," unescaping) and
    its value (int for size/number, bool for bool, else the text)."""

    __slots__ = ("name", "text", "value")

    def __init__(self, name: str, text: str, value: object = None) -> None:
        self.name = name
        self.text = text
        self.value = value


class QemuOpts:
    """Options parsed against a description list (None: accept any name)."""

    def __init__(self, descs: Sequence[OptionDesc] | None) -> None:
        self.descs = descs
        self.items: list[ParsedOption] = []

    def find(self, name: str) -> ParsedOption | None:
        for item in reversed(self.items):
            if item.name == name:
                return item
        return None

    def get(self, name: str) -> str | None:
        """qemu_opt_get: the last setting's text, else the default text."""
        item = self.find(name)
        if item is not None:
            return item.text
        desc = self._desc(name)
        return desc.default if desc is not None else None

    def _desc(self, name: str) -> OptionDesc | None:
        for desc in self.descs or ():
            if desc.name == name:
                return desc
        return None

    def set(self, name: str, text: str) -> None:
        """qemu_opt_set: validate against the description and append."""
        desc = self._desc(name)
        if desc is None and self.descs is not None:
            raise OptionError(f"Invalid parameter '{name}'")
        self.items.append(ParsedOption(name, text, _parse_value(desc, name, text)))

    def set_number(self, name: str, value: int) -> None:
        """qemu_opt_set_number: stores the number and its signed decimal text."""
        signed = value - (1 << 64) if value >= 1 << 63 else value
        self.items.append(ParsedOption(name, str(signed), value & ((1 << 64) - 1)))

    def command_line_values(self) -> dict[str, str]:
        """Each option as a command-line string (on/off, decimal numbers),
        the form imgengine.create_image takes."""
        values: dict[str, str] = {}
        for item in self.items:
            if isinstance(item.value, bool):
                values[item.name] = "on" if item.value else "off"
            elif isinstance(item.value, int):
                values[item.name] = str(item.value)
            else:
                values[item.name] = item.text
        return values

    def has(self, name: str) -> bool:
        return self.find(name) is not None

    def print_line(self) -> str:
        """qemu_opts_print with a space separator (qemu-img create's line)."""
        parts = []
        if self.descs is None:
            for item in self.items:
                parts.append(f"{item.name}={escape(item.text)}")
            return " ".join(parts)
        for desc in self.descs:
            item = self.find(desc.name)
            text = item.text if item is not None else desc.default
            if text is None:
                continue
            if desc.type == "string":
                parts.append(f"{desc.name}={escape(text)}")
            elif desc.type in ("size", "number") and item is not None:
                number = int(item.value)  # type: ignore[call-overload]
                if number >= 1 << 63:
                    number -= 1 << 64
                parts.append(f"{desc.name}={number}")
            else:
                parts.append(f"{desc.name}={text}")
        return " ".join(parts)

    def to_flat_dict(self) -> dict[str, str]:
        """qemu_opts_to_qdict: last setting of each name wins, in first-seen order."""
        result: dict[str, str] = {}
        for item in self.items:
            result[item.name] = item.text
        return result


def escape(text: str) -> str:
    """Print a value the way QemuOpts prints it: commas doubled."""
    return text.replace(",", ",,")


def is_help_option(name: str) -> bool:
    return name in ("help", "?")


def _parse_value(desc: OptionDesc | None, name: str, text: str) -> object:
    if desc is None or desc.type == "string":
        return text
    if desc.type == "bool":
        if text in ("on", "yes", "true", "y"):
            return True
        if text in ("off", "no", "false", "n"):
            return False
        raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")
    if desc.type == "number":
        return parse_number(name, text)
    try:
        return strtosz(text)
    except SizeError as error:
        if error.errno == ERANGE:
            raise OptionError(f"Value '{text}' is out of range for parameter '{name}'") from None
        raise OptionError(
            f"Parameter '{name}' expects a non-negative number below 2^64",
            "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
            "and exabytes, respectively.\n") from None


def parse_number(name: str, text: str) -> int:
    """parse_option_number: C strtoull with base 0, whole string."""
    from pyqemu.units import c_strtoull_base0
    value, consumed, overflow = c_strtoull_base0(text)
    if overflow and consumed == len(text):
        raise OptionError(f"Value '{text}' is too large for parameter '{name}'")
    if consumed == 0 or consumed != len(text) or overflow:
        raise OptionError(f"Parameter '{name}' expects a number")
    return value


def _read_value(text: str, pos: int) -> tuple[str, int]:
    """get_opt_value: read up to an unescaped comma, turning ',,' into ','."""
    pieces = []
    while True:
        comma = text.find(",", pos)
        if comma < 0:
            pieces.append(text[pos:])
            return "".join(pieces), len(text)
        if text[comma + 1:comma + 2] == ",":
            pieces.append(text[pos:comma + 1])
            pos = comma + 2
            continue
        pieces.append(text[pos:comma])
        return "".join(pieces), comma


def split_options(text: str, implied_name: str | None = None,
                  warn: Callable[[str, str], None] | None = None
                  ) -> list[tuple[str, str, bool]]:
    """Split a key=value list into (name, value, asked_for_help) triples.

    A bare word is a flag ("foo" -> foo=on, "nofoo" -> foo=off) unless
    implied_name is given, in which case the first bare word is its value.
    warn(message, follow_up) reports QEMU's deprecation of flag shorthand.
    """
    result = []
    pos = 0
    first = implied_name
    while pos < len(text):
        stop = pos
        while stop < len(text) and text[stop] not in "=,":
            stop += 1
        wants_help = False
        if stop >= len(text) or text[stop] != "=":
            if first is not None:
                name = first
                value, pos = _read_value(text, pos)
            else:
                name = text[pos:stop]
                pos = stop
                prefix = ""
                if name.startswith("no"):
                    name = name[2:]
                    value = "off"
                    prefix = "no"
                else:
                    value = "on"
                    wants_help = is_help_option(name)
                if not wants_help and warn is not None:
                    follow = ("Please use nodelay=%s instead\n" % ("on" if prefix else "off")
                              if name == "delay" else f"Please use {name}={value} instead\n")
                    warn(f"short-form boolean option '{prefix}{name}' deprecated", follow)
        else:
            name = text[pos:stop]
            value, pos = _read_value(text, stop + 1)
        if pos < len(text):
            pos += 1  # the separating comma
        first = None
        result.append((name, value, wants_help))
    return result


def has_help_option(text: str) -> bool:
    return any(wants for _name, _value, wants in split_options(text))


def parse_into(opts: QemuOpts, text: str, implied_name: str | None = None,
               warn: Callable[[str, str], None] | None = None) -> bool:
    """opts_do_parse: add text's options to opts; True if help was asked for.

    Raises OptionError for an unknown name or a malformed value.
    """
    for name, value, wants_help in split_options(text, implied_name, warn):
        if wants_help and opts.descs is not None:
            return True
        if name == "id":
            continue
        opts.set(name, value)
    return False


def is_valid_option_list(text: str) -> bool:
    """qemu-img's check that -o values can be joined with ','."""
    if not text or text.startswith(","):
        return False
    trailing = len(text) - len(text.rstrip(","))
    return trailing % 2 == 0


def help_text(descs: Sequence[OptionDesc]) -> list[str]:
    """qemu_opts_print_help's lines (sorted, 24-column alignment)."""
    type_names = {"string": "str", "bool": "bool (on/off)", "number": "num", "size": "size"}
    lines = []
    for desc in descs:
        line = f"  {desc.name}=<{type_names[desc.type]}>"
        if desc.help:
            line = line.ljust(24) + f" - {desc.help}"
        lines.append(line)
    return sorted(lines)


# -- json: pseudo-filenames ----------------------------------------------------

class JSONError(ValueError):
    """What QEMU's JSON parser says about bad input."""


class _JSONReader:
    """A JSON reader with QEMU's extensions (single-quoted strings)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _skip(self) -> None:
        text = self.text
        while self.pos < len(text) and text[self.pos] in " \t\n\r":
            self.pos += 1

    def _peek(self) -> str:
        self._skip()
        return self.text[self.pos:self.pos + 1]

    def document(self) -> object:
        if not self._peek():
            raise JSONError("Expecting a JSON value")
        value = self.value()
        if self._peek():
            raise JSONError("Expecting at most one JSON value")
        return value

    def value(self) -> object:
        c = self._peek()
        if not c:
            raise JSONError("JSON parse error, premature EOI")
        if c == "{":
            return self._object()
        if c == "[":
            return self._array()
        if c in "\"'":
            return self._string()
        if c in "-0123456789":
            return self._number()
        if c.isalpha():
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos].isalpha():
                self.pos += 1
            word = self.text[start:self.pos]
            if word == "true":
                return True
            if word == "false":
                return False
            if word == "null":
                return None
            raise JSONError(f"JSON parse error, invalid keyword '{word}'")
        if c in "}],:":
            raise JSONError("JSON parse error, expecting value")
        raise JSONError(f"JSON parse error, stray '{c}'")

    def _object(self) -> dict[str, object]:
        self.pos += 1
        result: dict[str, object] = {}
        if self._peek() == "}":
            self.pos += 1
            return result
        while True:
            c = self._peek()
            if not c:
                raise JSONError("JSON parse error, premature EOI")
            if c not in "\"'":
                raise JSONError("JSON parse error, key is not a string in object")
            key = self._string()
            c = self._peek()
            if not c:
                raise JSONError("JSON parse error, premature EOI")
            if c != ":":
                raise JSONError("JSON parse error, missing : in object pair")
            self.pos += 1
            if self._peek() in ("}", ",", ""):
                if not self._peek():
                    raise JSONError("JSON parse error, premature EOI")
                raise JSONError("JSON parse error, Missing value in dict")
            value = self.value()
            if key in result:
                raise JSONError("JSON parse error, duplicate key")
            result[key] = value
            c = self._peek()
            if not c:
                raise JSONError("JSON parse error, premature EOI")
            self.pos += 1
            if c == "}":
                return result
            if c != ",":
                raise JSONError("JSON parse error, expected separator in dict")
            if self._peek() == "}":
                raise JSONError("JSON parse error, expecting value")

    def _array(self) -> list[object]:
        self.pos += 1
        result: list[object] = []
        if self._peek() == "]":
            self.pos += 1
            return result
        while True:
            result.append(self.value())
            c = self._peek()
            if not c:
                raise JSONError("JSON parse error, premature EOI")
            self.pos += 1
            if c == "]":
                return result
            if c != ",":
                raise JSONError("JSON parse error, expected separator in list")
            if self._peek() == "]":
                raise JSONError("JSON parse error, expecting value")

    def _string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        pieces = []
        text = self.text
        escapes = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f",
                   "n": "\n", "r": "\r", "t": "\t"}
        while True:
            if self.pos >= len(text):
                raise JSONError("JSON parse error, premature EOI")
            c = text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(pieces)
            if c == "\\":
                e = text[self.pos:self.pos + 1]
                self.pos += 1
                if e in escapes:
                    pieces.append(escapes[e])
                elif e == "u":
                    digits = text[self.pos:self.pos + 4]
                    if len(digits) != 4 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                        raise JSONError("JSON parse error, invalid escape sequence in string")
                    pieces.append(chr(int(digits, 16)))
                    self.pos += 4
                else:
                    raise JSONError("JSON parse error, invalid escape sequence in string")
            elif ord(c) < 0x20:
                raise JSONError(f"JSON parse error, stray '{quote}'")
            else:
                pieces.append(c)

    def _number(self) -> int | float:
        text = self.text
        start = self.pos
        if text[self.pos] == "-":
            self.pos += 1
        while self.pos < len(text) and text[self.pos].isdigit():
            self.pos += 1
        is_float = False
        if text[self.pos:self.pos + 1] == ".":
            is_float = True
            self.pos += 1
            while self.pos < len(text) and text[self.pos].isdigit():
                self.pos += 1
        if text[self.pos:self.pos + 1] in ("e", "E"):
            is_float = True
            self.pos += 1
            if text[self.pos:self.pos + 1] in ("+", "-"):
                self.pos += 1
            while self.pos < len(text) and text[self.pos].isdigit():
                self.pos += 1
        literal = text[start:self.pos]
        if literal in ("-", ""):
            raise JSONError(f"JSON parse error, stray '{literal or text[start]}'")
        if is_float:
            return float(literal)
        number = int(literal)
        if number >= 1 << 64 or number < -(1 << 63):
            return float(literal)
        return number


def parse_json_filename(filename: str) -> dict[str, object]:
    """The options of a `json:{...}` filename, or OptionError with QEMU's words."""
    try:
        value = _JSONReader(filename[len("json:"):]).document()
    except JSONError as error:
        raise OptionError(f"Could not parse the JSON options: {error}") from None
    if not isinstance(value, dict):
        raise OptionError("Invalid JSON object given")
    return value


def flatten(options: dict[str, object], prefix: str = "") -> dict[str, object]:
    """qdict_flatten: nested dicts become dotted keys (lists are kept)."""
    flat: dict[str, object] = {}
    for key, value in options.items():
        name = prefix + key
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        elif isinstance(value, dict):
            continue
        else:
            flat[name] = value
    return flat


def nest(flat: dict[str, object]) -> dict[str, object]:
    """Dotted keys back into nested dicts, the shape open_image takes."""
    result: dict[str, object] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


# -- backing-file names (block.c) ----------------------------------------------

def path_has_protocol(path: str) -> bool:
    stop = 0
    while stop < len(path) and path[stop] not in ":/":
        stop += 1
    return path[stop:stop + 1] == ":"


def path_combine(base: str, name: str) -> str:
    """A relative name resolved against the folder of base (path_combine)."""
    if name.startswith("/"):
        return name
    start = 0
    if path_has_protocol(base):
        start = base.index(":") + 1
    slash = base.rfind("/")
    cut = slash + 1 if slash >= 0 else 0
    cut = max(cut, start)
    return base[:cut] + name


def full_backing_filename(backed: str, backing: str) -> str | None:
    """bdrv_get_full_backing_filename_from_filename; OptionError if impossible."""
    if not backing:
        return None
    if path_has_protocol(backing) or backing.startswith("/"):
        return backing
    if not backed or backed.startswith("json:"):
        raise OptionError(f"Cannot use relative backing file names for '{backed}'")
    return path_combine(backed, backing)
