"""pyqemu-img: QEMU 7.2's qemu-img command line over imgengine.

run() parses the global options the way qemu-img does and hands the rest to
the subcommand's module (img_create, img_info, img_map, img_check,
img_compare), imported only when that subcommand runs so start-up stays small.
"""

from __future__ import annotations

import sys

from pyqemu.console import Console, program_name, release_stdout
from pyqemu.getopt import NO_ARGUMENT, REQUIRED_ARGUMENT, GetOpt, LongOption

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import TextIO

VERSION = "7.2.0 (pyqemu 0.1.0)"
COPYRIGHT = "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers"
# the drivers imgengine provides, named as QEMU names them
SUPPORTED_FORMATS = ("file", "qcow2", "raw")

# subcommand -> module that implements it (each exposes main(tool, argv))
_COMMANDS = {
    "check": "pyqemu.img_check",
    "compare": "pyqemu.img_compare",
    "convert": "pyqemu.img_convert",
    "create": "pyqemu.img_create",
    "dd": "pyqemu.img_dd",
    "info": "pyqemu.img_info",
    "map": "pyqemu.img_map",
    "rebase": "pyqemu.img_rebase",
    "resize": "pyqemu.img_resize",
}
# subcommands QEMU 7.2 has that these front ends do not offer
_NOT_OFFERED = ("amend", "bench", "bitmap", "commit", "measure", "snapshot")


class Exit(Exception):
    """Unwinds a subcommand with qemu-img's exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class ImgTool:
    """What every subcommand shares: the console and qemu-img's error exits."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def out(self, text: str) -> None:
        self.console.out(text)

    def error(self, message: str) -> None:
        self.console.error_report(message)

    def notice(self, error: BaseException) -> None:
        """What QEMU prints on stderr while an engine call fails (see opening)."""
        from pyqemu.opening import print_notice
        print_notice(self.console, error)

    def error_exit(self, message: str) -> Exit:
        """error_exit(): the message, the --help hint, status 1."""
        self.console.error_report(message)
        self.console.err("Try 'qemu-img --help' for more information\n")
        return Exit(1)

    def getopt(self, argv: list[str], optstring: str,
               longopts: tuple[LongOption, ...] = ()) -> GetOpt:
        return GetOpt(argv, optstring, longopts, self.console.err)

    def bad_option(self, parser: GetOpt, option: str) -> Exit:
        """The ':' and '?' results of a silent getopt scan, as qemu-img words them."""
        culprit = parser.argv[parser.optind - 1]
        if option == ":":
            return self.error_exit(f"missing argument for option '{culprit}'")
        return self.error_exit(f"unrecognized option '{culprit}'")

    def options(self, parser: GetOpt, *, failure_status: int = 1
                ) -> Iterator[tuple[str, str | None]]:
        """A subcommand's options, with what every subcommand answers alike
        done here: a bad or missing argument, -h, and --object (which these
        front ends do not offer; failure_status is the subcommand's exit)."""
        for option, value in parser:
            if option in (":", "?"):
                raise self.bad_option(parser, option)
            if option == "h":
                raise self.help()
            if option == "object":
                self.error("--object is not supported by this qemu-img (pyqemu)")
                raise Exit(failure_status)
            yield option, value

    def one_filename(self, parser: GetOpt) -> str:
        """The single image file name after the options (info, map, check)."""
        if parser.optind != len(parser.argv) - 1:
            raise self.error_exit("Expecting one image file name")
        return parser.argv[parser.optind]

    def output_is_json(self, output: str | None) -> bool:
        """--output: human (the default) or json; anything else ends with status 1."""
        if output is not None and output not in ("json", "human"):
            self.error("--output must be used with human or json as argument.")
            raise Exit(1)
        return output == "json"

    def help(self) -> Exit:
        from pyqemu.helptext import HELP_BOTTOM, IMG_HELP_BODY
        self.out(f"qemu-img version {VERSION}\n{COPYRIGHT}\n")
        self.out(IMG_HELP_BODY + "\nSupported formats: " + " ".join(SUPPORTED_FORMATS)
                 + "\n\n" + HELP_BOTTOM)
        return Exit(0)


HELP = LongOption("help", NO_ARGUMENT, "h")
OBJECT = LongOption("object", REQUIRED_ARGUMENT, "object")
IMAGE_OPTS = LongOption("image-opts", NO_ARGUMENT, "image-opts")
FORCE_SHARE = LongOption("force-share", NO_ARGUMENT, "U")
OUTPUT = LongOption("output", REQUIRED_ARGUMENT, "output")
FORMAT = LongOption("format", REQUIRED_ARGUMENT, "f")


def run(argv: list[str], stdin: TextIO, stdout: TextIO, stderr: TextIO,
        *, prog: str = "qemu-img") -> int:
    """Run one qemu-img command line (argv without the program name)."""
    console = Console(stdout, stderr, prog)
    tool = ImgTool(console)
    try:
        return _dispatch(tool, [prog, *argv])
    except Exit as done:
        return done.status
    finally:
        console.flush()


def _dispatch(tool: ImgTool, argv: list[str]) -> int:
    if len(argv) < 2:
        raise tool.error_exit("Not enough arguments")
    parser = tool.getopt(argv, "+:hVT:", (
        LongOption("help", NO_ARGUMENT, "h"),
        LongOption("version", NO_ARGUMENT, "V"),
        LongOption("trace", REQUIRED_ARGUMENT, "T"),
    ))
    # the global options have no --object, so options() answers only -h and errors
    for option, _value in tool.options(parser):
        if option == "V":
            tool.out(f"qemu-img version {VERSION}\n{COPYRIGHT}\n")
            return 0
        if option == "T":
            from pyqemu.tracing import trace_option
            status = trace_option(tool.console, _value or "")
            if status is not None:
                return status
    rest = parser.argv[parser.optind:]
    if not rest:
        return 0
    name = rest[0]
    module_name = _COMMANDS.get(name)
    if module_name is None:
        if name in _NOT_OFFERED:
            tool.error(f"'{name}' is not offered by this qemu-img (pyqemu)")
            return 1
        raise tool.error_exit(f"Command not found: {name}")
    import importlib
    module = importlib.import_module(module_name)
    return module.main(tool, rest)


def main() -> None:
    """Console script entry point."""
    # Ctrl-C ends the process the way it ends QEMU's tools: by the signal
    # (the C module: the signal package's enums cost start-up time)
    import _signal
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    argv0 = sys.argv[0] if sys.argv else "qemu-img"
    prog = program_name(argv0, "qemu-img")
    status = run(sys.argv[1:], sys.stdin, sys.stdout, sys.stderr, prog=prog)
    release_stdout()
    sys.exit(status)
