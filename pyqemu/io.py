"""pyqemu-io: QEMU 7.2's qemu-io command line over imgengine.

run() parses qemu-io's options, opens the image, then runs the -c commands or,
without any, reads commands from standard input behind the "qemu-io> " prompt
until quit or end of input.  The commands themselves live in io_cmds.
"""

from __future__ import annotations

import sys

from pyqemu.console import Console, program_name, release_stdout
from pyqemu.getopt import NO_ARGUMENT, REQUIRED_ARGUMENT, GetOpt, LongOption

TYPE_CHECKING = False  # typing itself costs start-up time
if TYPE_CHECKING:
    from typing import Any, TextIO

VERSION = "7.2.0 (pyqemu 0.1.0)"
COPYRIGHT = "Copyright (c) 2003-2022 Fabrice Bellard and the QEMU Project developers"
# fgets() into qemu-io's 1024-byte line buffer: longer lines arrive in pieces
LINE_BUFFER = 1024

_LONG_OPTIONS = (
    LongOption("help", NO_ARGUMENT, "h"),
    LongOption("version", NO_ARGUMENT, "V"),
    LongOption("cmd", REQUIRED_ARGUMENT, "c"),
    LongOption("format", REQUIRED_ARGUMENT, "f"),
    LongOption("read-only", NO_ARGUMENT, "r"),
    LongOption("snapshot", NO_ARGUMENT, "s"),
    LongOption("nocache", NO_ARGUMENT, "n"),
    LongOption("copy-on-read", NO_ARGUMENT, "C"),
    LongOption("misalign", NO_ARGUMENT, "m"),
    LongOption("native-aio", NO_ARGUMENT, "k"),
    LongOption("aio", REQUIRED_ARGUMENT, "i"),
    LongOption("discard", REQUIRED_ARGUMENT, "d"),
    LongOption("cache", REQUIRED_ARGUMENT, "t"),
    LongOption("trace", REQUIRED_ARGUMENT, "T"),
    LongOption("object", REQUIRED_ARGUMENT, "object"),
    LongOption("image-opts", NO_ARGUMENT, "image-opts"),
    LongOption("force-share", NO_ARGUMENT, "U"),
)

CACHE_MODES = {
    # mode: (host cache bypassed, write-through)
    "none": (True, False), "off": (True, False), "directsync": (True, True),
    "writeback": (False, False), "unsafe": (False, False), "writethrough": (False, True),
}
AIO_MODES = ("threads", "native", "io_uring")
DISCARD_MODES = ("off", "ignore", "on", "unmap")


class OpenFlags:
    """How an image is to be opened (qemu-io's BDRV_O_* flags that matter here)."""

    def __init__(self) -> None:
        self.read_only = False
        self.nocache = False
        self.writethrough = True      # qemu-io's default: every write is flushed
        self.native_aio = False
        self.snapshot = False
        self.copy_on_read = False

    def cache(self, mode: str) -> bool:
        if mode not in CACHE_MODES:
            return False
        self.nocache, self.writethrough = CACHE_MODES[mode]
        return True

    def no_cache(self) -> None:
        """-n: bypass the host cache, short for -t none."""
        self.nocache = True
        self.writethrough = False

    def aio(self, mode: str) -> bool:
        if mode not in AIO_MODES:
            return False
        self.native_aio = mode == "native"
        return True


class IoSession:
    """One qemu-io process: its console, the open image and the quit flag."""

    def __init__(self, console: Console, image_opts: bool, allow_signals: bool) -> None:
        self.console = console
        self.image_opts = image_opts
        self.allow_signals = allow_signals
        self.node: Any = None
        self.writethrough = True
        self.quit = False
        self._request: Any = None
        self._flags: OpenFlags | None = None

    def out(self, text: str) -> None:
        self.console.out(text)

    def failed(self, error: BaseException) -> int:
        """An engine error inside a command: print what QEMU would have printed on
        stderr while failing (e.g. marking the image corrupt); its errno."""
        from pyqemu.io_cmds import engine_errno
        from pyqemu.opening import print_notice

        print_notice(self.console, error)
        return engine_errno(error)

    def report_engine_error(self, error: BaseException) -> None:
        from pyqemu.opening import error_text
        self.console.error_report(error_text(error))
        hint = getattr(error, "hint", None)
        if hint:
            self.console.err(hint)

    def raise_signal(self, signal_number: int, *, flush_first: bool = True) -> int:
        """raise(): a process really gets the signal; an in-process run ends as if
        killed (unless the signal is one whose default action is to ignore it).
        Without `flush_first` (abort()) buffered stdout dies with the process."""
        import os
        import signal

        from pyqemu.io_cmds import Crash

        if flush_first:
            self.console.flush()
        else:
            self.console.discard()
        if self.allow_signals:
            if signal_number in (signal.SIGINT, signal.SIGTERM, signal.SIGABRT):
                signal.signal(signal_number, signal.SIG_DFL)
            os.kill(os.getpid(), signal_number)
            return 0
        if signal_number in (0, signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH, signal.SIGCONT):
            return 0
        raise Crash(signal_number)

    # -- opening and closing ---------------------------------------------------

    def open_file(self, name: str | None, flags: OpenFlags, force_share: bool,
                  flat: dict[str, object] | None) -> int:
        """openfile(): 0 when the image is open, 1 after reporting why not."""
        import imgengine
        from pyqemu.blockopts import OptionError, nest
        from pyqemu.opening import OpenRequest, error_text, from_filename, open_node

        console = self.console
        if self.node is not None:
            console.error_report("file open already, try 'help close'")
            return 1
        flat = dict(flat or {})
        if force_share:
            value = flat.get("force-share")
            if value is not None and value not in ("on", True):
                console.error_report("-U conflicts with image options")
                return 1
        prefix = f"can't open device {name}: " if name is not None else "can't open: "
        try:
            if name is not None:
                request = from_filename(name, None, console.warn_report, flat)
            else:
                if "backing" in flat and flat["backing"] == "":
                    console.warn_report(
                        'Use of "backing": "" is deprecated; use "backing": null instead')
                    flat["backing"] = None
                request = OpenRequest(None, None, nest(flat) if flat else None, flat)
        except OptionError as error:
            console.error_report(prefix + str(error))
            return 1
        refusal = self._refusal(request, flags, force_share)
        if refusal:
            console.error_report(prefix + refusal)
            return 1
        try:
            if flags.snapshot:
                self.node = _open_with_temporary_overlay(request, flags.read_only)
            else:
                self.node = open_node(request, flags.read_only)
        except (imgengine.ImageError, OSError) as error:
            from pyqemu.opening import print_notice
            print_notice(console, error)
            console.error_report(prefix + error_text(error))
            hint = getattr(error, "hint", None)
            if hint:
                console.err(hint)
            return 1
        from pyqemu.opening import print_open_messages
        print_open_messages(console, self.node)
        self._request, self._flags = request, flags
        self.writethrough = flags.writethrough
        return 0

    @staticmethod
    def _refusal(request: Any, flags: OpenFlags, force_share: bool) -> str | None:
        """Open options the block layer itself refuses (before any format driver)."""
        if force_share and not flags.read_only:
            return "force-share=on can only be used with read-only images"
        if flags.native_aio and not flags.nocache:
            return ("aio=native was specified, but it requires cache.direct=on, "
                    "which was not specified.")
        if flags.copy_on_read:
            return "-C (copy-on-read) is not supported by this qemu-io (pyqemu)"
        return None

    def close(self) -> None:
        if self.node is not None:
            node, self.node = self.node, None
            node.close()

    def _flag_warning(self, message: str, follow_up: str) -> None:
        """QEMU's deprecation of "flag" and "noflag" shorthand in option lists."""
        self.console.warn_report(message)
        self.console.err(follow_up)

    def open_command(self, argv: list[str]) -> int:
        """The `open` command."""
        from pyqemu.blockopts import OptionError, QemuOpts, parse_into

        flags = OpenFlags()
        force_share = False
        opts = QemuOpts(None)
        parser = GetOpt(argv, "snCro:ki:t:d:U", (), self.console.err)

        def flag_warning(message: str, follow_up: str) -> None:
            self.console.warn_report(message)
            self.console.err(follow_up)

        for option, value in parser:
            text = value or ""
            if option == "s":
                flags.snapshot = True
            elif option == "n":
                flags.no_cache()
            elif option == "C":
                flags.copy_on_read = True
            elif option == "r":
                flags.read_only = True
            elif option == "k":
                flags.native_aio = True
            elif option == "t":
                if not flags.cache(text):
                    self.console.error_report(f"Invalid cache option: {text}")
                    return -22
            elif option == "d":
                if text not in DISCARD_MODES:
                    self.console.error_report(f"Invalid discard option: {text}")
                    return -22
            elif option == "i":
                if not flags.aio(text):
                    self.console.error_report(f"Invalid aio option: {text}")
                    return -22
            elif option == "o":
                if self.image_opts:
                    self.out("--image-opts and 'open -o' are mutually exclusive\n")
                    return -22
                try:
                    parse_into(opts, text, warn=flag_warning)
                except OptionError as error:
                    self.console.error_report(str(error))
                    return -22
            elif option == "U":
                force_share = True
            else:
                from pyqemu.io_cmds import COMMANDS_BY_NAME
                self.out(COMMANDS_BY_NAME["open"].usage())
                return -22
        args = parser.argv[parser.optind:]
        if self.image_opts and len(args) == 1:
            try:
                parse_into(opts, args[0], warn=flag_warning)
            except OptionError as error:
                self.console.error_report(str(error))
                return -22
            args = []
        flat = opts.to_flat_dict() if opts.items else None
        if len(args) > 1:
            from pyqemu.io_cmds import COMMANDS_BY_NAME
            self.out(COMMANDS_BY_NAME["open"].usage())
            return -22
        name = args[0] if args else None
        if self.open_file(name, flags, force_share, dict(flat) if flat else None):
            return -22
        return 0

    def reopen_command(self, argv: list[str]) -> int:
        """The `reopen` command: the image again, with changed options.

        The engine keeps no state between opens, so a reopen is a close and an
        open with the merged options; when the new options are refused the image
        is opened again as it was, as QEMU's reopen transaction leaves it.
        """
        import re

        import imgengine
        from pyqemu.blockopts import OptionError, QemuOpts, flatten, nest, parse_into

        assert self._flags is not None and self._request is not None
        flags = OpenFlags()
        flags.__dict__.update(self._flags.__dict__)
        changed_rw = changed_cache = False
        opts = QemuOpts(None)
        parser = GetOpt(argv, "c:o:rw", (), self.console.err)
        for option, value in parser:
            text = value or ""
            if option == "c":
                if not flags.cache(text):
                    self.console.error_report(f"Invalid cache option: {text}")
                    return -22
                changed_cache = True
            elif option == "o":
                try:
                    parse_into(opts, text, warn=self._flag_warning)
                except OptionError as error:
                    self.console.error_report(str(error))
                    return -22
            elif option in ("r", "w"):
                if changed_rw:
                    self.console.error_report("Only one -r/-w option may be given")
                    return -22
                flags.read_only = option == "r"
                changed_rw = True
            else:
                from pyqemu.io_cmds import COMMANDS_BY_NAME
                self.out(COMMANDS_BY_NAME["reopen"].usage())
                return -22
        if parser.optind != len(parser.argv):
            from pyqemu.io_cmds import COMMANDS_BY_NAME
            self.out(COMMANDS_BY_NAME["reopen"].usage())
            return -22
        extra: dict[str, object] = dict(opts.to_flat_dict())
        if "read-only" in extra and changed_rw:
            self.console.error_report("Cannot set both -r/-w and 'read-only'")
            return -22
        if ("cache.direct" in extra or "cache.no-flush" in extra) and changed_cache:
            self.console.error_report("Cannot set both -c and the cache options")
            return -22
        old = self._request
        current = flatten(old.options or {})
        fixed = {"node-name": None, "driver": self.node.format_name}
        for key, value in extra.items():
            leaf = key.rsplit(".", 1)[-1]
            if leaf in fixed:
                before = current.get(key, fixed[leaf] if "." not in key else None)
                if key == "file.driver":
                    before = "file"
                elif key == "backing.driver" and self.node.backing is not None:
                    before = self.node.backing.format_name
                if before is None or str(before) != str(value):
                    self.console.error_report(f"Cannot change the option '{leaf}'")
                    return -22
        read_only = flags.read_only
        merged = imgengine.join_reopen_options(self.node.format_name, extra, current)
        if "read-only" in merged:
            text = merged.pop("read-only")
            if text not in ("on", "off", True, False, "yes", "no", "true", "false", "y", "n"):
                self.console.error_report("Parameter 'read-only' expects 'on' or 'off'")
                return -22
            read_only = text in ("on", True, "yes", "true", "y")
        new_request = type(old)(old.filename, old.fmt, nest(merged) if merged else None, merged)
        self.close()
        try:
            self.node = _open_again(new_request, read_only)
        except (imgengine.ImageError, OSError) as error:
            from pyqemu.opening import error_text, print_notice
            print_notice(self.console, error)
            message = error_text(error)
            # an option no driver takes: at open "does not support the
            # option", at reopen QEMU calls it an option that cannot change
            unknown = re.fullmatch(r"Block format '[^']*' does not support the option '(.*)'",
                                   message)
            if unknown and unknown.group(1) in extra:
                message = f"Cannot change the option '{unknown.group(1)}'"
            self.console.error_report(message)
            self.node = _open_again(old, self._flags.read_only)
            return -22
        self._request = new_request
        flags.read_only = read_only
        self._flags = flags
        self.writethrough = flags.writethrough
        return 0


def _open_again(request: Any, read_only: bool) -> Any:
    from pyqemu.opening import open_node
    return open_node(request, read_only)


def _open_with_temporary_overlay(request: Any, read_only: bool) -> Any:
    """-s: open the image under a temporary qcow2 overlay that takes all writes.

    As QEMU does, the overlay is a new file in $TMPDIR (else /var/tmp), as large
    as the image, with the image as its backing node; it is unlinked once open,
    so it disappears with the process.
    """
    import os
    import tempfile

    import imgengine
    from pyqemu.opening import open_node

    image = open_node(request, True)
    try:
        size = image.length()
        driver = image.format_name
    finally:
        image.close()
    backing: dict[str, object] = dict(request.options or {})
    backing.setdefault("driver", request.fmt or driver)
    if request.filename is not None:
        backing["file"] = {"driver": "file", "filename": request.filename}
    folder = os.environ.get("TMPDIR") or "/var/tmp"
    handle, overlay = tempfile.mkstemp(prefix="vl.", dir=folder)
    os.close(handle)
    try:
        imgengine.create_image(overlay, "qcow2", {"size": str(size)}, unsafe=True)
        return imgengine.open_image(options={
            "driver": "qcow2", "file": {"driver": "file", "filename": overlay},
            "backing": backing}, read_only=read_only)
    finally:
        os.unlink(overlay)


def _usage(session_console: Console, prog: str) -> None:
    from pyqemu.helptext import HELP_BOTTOM, IO_USAGE
    session_console.out(IO_USAGE.split("\nSee <", 1)[0].replace("%(prog)s", prog) + "\n"
                        + HELP_BOTTOM)


def run(argv: list[str], stdin: TextIO, stdout: TextIO, stderr: TextIO,
        *, prog: str = "qemu-io", argv0: str | None = None,
        allow_signals: bool = False) -> int:
    """Run one qemu-io command line (argv without the program name)."""
    console = Console(stdout, stderr, prog)
    session: IoSession | None = None
    try:
        status, session = _main(console, [argv0 or prog, *argv], stdin, prog, allow_signals)
        return status
    finally:
        if session is not None:
            session.close()
        console.flush()


def _main(console: Console, argv: list[str], stdin: TextIO, prog: str,
          allow_signals: bool) -> tuple[int, IoSession | None]:
    flags = OpenFlags()
    commands: list[str] = []
    fmt: str | None = None
    force_share = False
    image_opts = False
    parser = GetOpt(argv, "hVc:d:f:rsnCmki:t:T:U", _LONG_OPTIONS, console.err)
    for option, value in parser:
        text = value or ""
        if option == "s":
            flags.snapshot = True
        elif option == "n":
            flags.no_cache()
        elif option == "C":
            flags.copy_on_read = True
        elif option == "d":
            if text not in DISCARD_MODES:
                console.error_report(f"Invalid discard option: {text}")
                return 1, None
        elif option == "f":
            fmt = text
        elif option == "c":
            commands.append(text)
        elif option == "r":
            flags.read_only = True
        elif option == "m":
            pass            # misaligned buffers change nothing here
        elif option == "T":
            from pyqemu.tracing import trace_option
            status = trace_option(console, text)
            if status is not None:
                return status, None
        elif option == "k":
            flags.native_aio = True
        elif option == "i":
            if not flags.aio(text):
                console.error_report(f"Invalid aio option: {text}")
                return 1, None
        elif option == "t":
            if not flags.cache(text):
                console.error_report(f"Invalid cache option: {text}")
                return 1, None
        elif option == "V":
            console.out(f"{prog} version {VERSION}\n{COPYRIGHT}\n")
            return 0, None
        elif option == "h":
            _usage(console, prog)
            return 0, None
        elif option == "U":
            force_share = True
        elif option == "object":
            console.error_report("--object is not supported by this qemu-io (pyqemu)")
            return 1, None
        elif option == "image-opts":
            image_opts = True
        else:
            _usage(console, prog)
            return 1, None
    operands = parser.argv[parser.optind:]
    if len(operands) > 1:
        _usage(console, prog)
        return 1, None
    if fmt is not None and image_opts:
        console.error_report("--image-opts and -f are mutually exclusive")
        return 1, None

    session = IoSession(console, image_opts, allow_signals)
    if operands:
        if image_opts:
            from pyqemu.blockopts import OptionError, QemuOpts, parse_into

            def flag_warning(message: str, follow_up: str) -> None:
                console.warn_report(message)
                console.err(follow_up)

            opts = QemuOpts(None)
            try:
                parse_into(opts, operands[0], warn=flag_warning)
            except OptionError as error:
                console.error_report(str(error))
                return 1, session
            if session.open_file(None, flags, force_share, dict(opts.to_flat_dict())):
                return 1, session
        else:
            extra = {"driver": fmt} if fmt is not None else None
            if session.open_file(operands[0], flags, force_share, extra):
                return 1, session
    return _command_loop(session, commands, stdin, prog), session


def _command_loop(session: IoSession, commands: list[str], stdin: TextIO, prog: str) -> int:
    from pyqemu.io_cmds import Crash, execute

    last_error = 0
    try:
        if commands:
            for line in commands:
                if session.quit:
                    break
                status = execute(session, line)
                if status < 0:
                    last_error = status
            return 1 if last_error < 0 else 0
        interactive = _is_tty(stdin)
        while not session.quit:
            session.out(f"{prog}> ")
            session.console.flush()
            line = stdin.readline(LINE_BUFFER - 1)
            if not line:
                if interactive:
                    session.out("\n")
                break
            if line.endswith("\n"):
                line = line[:-1]
            status = execute(session, line)
            if status < 0:
                last_error = status
    except Crash as crash:
        return _crash(session, crash.signal_number)
    return 1 if last_error < 0 else 0


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _crash(session: IoSession, signal_number: int) -> int:
    """An in-process run "killed" by a signal: the image is abandoned, not closed,
    and stdout not flushed by then is lost."""
    session.node = None
    session.console.discard()
    return 128 + signal_number


def main() -> None:
    """Console script entry point."""
    # Ctrl-C ends the process the way it ends QEMU's tools: by the signal
    # (the C module: the signal package's enums cost start-up time)
    import _signal
    _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
    argv0 = sys.argv[0] if sys.argv else "qemu-io"
    prog = program_name(argv0, "qemu-io")
    if argv0.rsplit("/", 1)[-1].startswith("pyqemu-"):
        # glibc's option errors quote argv[0]; under its install name the tool
        # speaks as the qemu-io it stands in for
        argv0 = prog
    status = run(sys.argv[1:], sys.stdin, sys.stdout, sys.stderr, prog=prog, argv0=argv0,
                 allow_signals=True)
    release_stdout()
    sys.exit(status)
