"""GNU getopt_long as QEMU's tools see it through glibc.

QEMU parses every command line (and every qemu-io command) with glibc's
getopt/getopt_long, and its messages quote argv elements by position after
glibc has permuted them, so the parser here reproduces glibc's scanning: option
clusters, permutation of non-options to the end ('+' stops at the first one),
unique-prefix long options with ambiguity reports, and the silent ':' mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

NO_ARGUMENT = 0
REQUIRED_ARGUMENT = 1


class LongOption:
    """One entry of getopt_long's option table; val is what the scan returns."""

    __slots__ = ("name", "has_arg", "val")

    def __init__(self, name: str, has_arg: int, val: str) -> None:
        self.name = name
        self.has_arg = has_arg
        self.val = val


class GetOpt:
    """One getopt_long scan over argv (argv[0] is the program or command name).

    Iterate to get (option, optarg) pairs; '?' and ':' report errors as glibc
    does.  After the scan, `argv` is permuted and `optind` indexes the first
    operand.  `report` receives glibc's own diagnostics (unless the option
    string starts with ':').
    """

    def __init__(self, argv: Sequence[str], optstring: str,
                 longopts: Sequence[LongOption] = (),
                 report: Callable[[str], None] | None = None) -> None:
        self.argv = list(argv)
        self.longopts = list(longopts)
        self.report = report
        self.permute = True
        if optstring[:1] in ("+", "-"):
            self.permute = optstring[0] != "+"
            optstring = optstring[1:]
        self.print_errors = not optstring.startswith(":")
        self.optstring = optstring
        self.optind = 1
        self.optarg: str | None = None
        self.optopt = ""
        self._nextchar = ""
        self._first_nonopt = 1
        self._last_nonopt = 1

    def _say(self, text: str) -> None:
        if self.print_errors and self.report is not None:
            self.report(text)

    def _exchange(self) -> None:
        bottom, middle, top = self._first_nonopt, self._last_nonopt, self.optind
        argv = self.argv
        argv[bottom:top] = argv[middle:top] + argv[bottom:middle]
        self._first_nonopt += self.optind - self._last_nonopt
        self._last_nonopt = self.optind

    def _is_operand(self, index: int) -> bool:
        arg = self.argv[index]
        return not arg.startswith("-") or arg == "-"

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        while True:
            option = self._next()
            if option is None:
                return
            yield option, self.optarg

    def _next(self) -> str | None:
        self.optarg = None
        argv = self.argv
        argc = len(argv)
        if not self._nextchar:
            self._last_nonopt = min(self._last_nonopt, self.optind)
            self._first_nonopt = min(self._first_nonopt, self.optind)
            if self.permute:
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._last_nonopt != self.optind:
                    self._first_nonopt = self.optind
                while self.optind < argc and self._is_operand(self.optind):
                    self.optind += 1
                self._last_nonopt = self.optind
            if self.optind != argc and argv[self.optind] == "--":
                self.optind += 1
                if self._first_nonopt != self._last_nonopt and self._last_nonopt != self.optind:
                    self._exchange()
                elif self._first_nonopt == self._last_nonopt:
                    self._first_nonopt = self.optind
                self._last_nonopt = argc
                self.optind = argc
            if self.optind == argc:
                if self._first_nonopt != self._last_nonopt:
                    self.optind = self._first_nonopt
                return None
            if self._is_operand(self.optind):
                # only reached without permutation ('+'): stop at the operand
                return None
            if self.longopts and argv[self.optind].startswith("--"):
                self._nextchar = argv[self.optind][2:]
                return self._long_option()
            self._nextchar = argv[self.optind][1:]
        return self._short_option()

    def _short_option(self) -> str:
        argv = self.argv
        c = self._nextchar[0]
        self._nextchar = self._nextchar[1:]
        where = self.optstring.find(c)
        if not self._nextchar:
            self.optind += 1
        if where < 0 or c in ":;":
            self._say(f"{argv[0]}: invalid option -- '{c}'\n")
            self.optopt = c
            return "?"
        if self.optstring[where + 1:where + 2] == ":":
            if self._nextchar:
                self.optarg = self._nextchar
                self.optind += 1
            elif self.optind == len(argv):
                self._say(f"{argv[0]}: option requires an argument -- '{c}'\n")
                self.optopt = c
                c = ":" if self.optstring.startswith(":") else "?"
            else:
                self.optarg = argv[self.optind]
                self.optind += 1
            self._nextchar = ""
        return c

    def _long_option(self) -> str:
        argv = self.argv
        text = self._nextchar
        name, has_value, value = text.partition("=")
        found = None
        for option in self.longopts:
            if option.name == name:
                found = option
                break
        if found is None:
            ambiguous: list[LongOption] = []
            for option in self.longopts:
                if option.name.startswith(name):
                    if found is None:
                        found = option
                    elif (option.has_arg, option.val) != (found.has_arg, found.val):
                        if not ambiguous:
                            ambiguous.append(found)
                        ambiguous.append(option)
            if ambiguous:
                listed = "".join(f" '--{option.name}'" for option in self.longopts
                                 if any(option is candidate for candidate in ambiguous))
                self._say(f"{argv[0]}: option '--{text}' is ambiguous; possibilities:{listed}\n")
                self._nextchar = ""
                self.optind += 1
                self.optopt = ""
                return "?"
        if found is None:
            self._say(f"{argv[0]}: unrecognized option '--{text}'\n")
            self._nextchar = ""
            self.optind += 1
            self.optopt = ""
            return "?"
        self.optind += 1
        self._nextchar = ""
        if has_value:
            if found.has_arg:
                self.optarg = value
            else:
                self._say(f"{argv[0]}: option '--{found.name}' doesn't allow an argument\n")
                self.optopt = found.val
                return "?"
        elif found.has_arg == REQUIRED_ARGUMENT:
            if self.optind < len(argv):
                self.optarg = argv[self.optind]
                self.optind += 1
            else:
                self._say(f"{argv[0]}: option '--{found.name}' requires an argument\n")
                self.optopt = found.val
                return ":" if self.optstring.startswith(":") else "?"
        return found.val
