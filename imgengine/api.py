"""The engine's entry points: open images, create them, describe options.

``open_image`` does what QEMU's bdrv_open does for the file protocol: open
the file, probe or check its format, open the backing chain (a relative
backing name resolves against the overlay's own folder; a loop is refused),
honour ``"backing": None`` and backing overrides.  ``create_image`` does
what ``qemu-img create`` does, including its validation and messages, and
``create_options`` describes the options QEMU lists.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from .errors import CorruptImageError, ImageError, OpenError, UnsupportedImageError
from .hostfile import HostFile
from .node import BlockNode
from .record import Record
from .sizes import parse_bool, parse_number, parse_size

SECTOR_SIZE = 512


# -- records -----------------------------------------------------------------------------


class ImageInfo(Record):
    """What qemu-img info / qemu-io info report about one image."""

    _fields = ("filename", "format_name", "virtual_size", "actual_size", "cluster_size",
               "vm_state_offset", "dirty_flag", "backing_filename", "full_backing_filename",
               "backing_format", "format_specific")

    def __init__(self, filename: str, format_name: str, virtual_size: int,
                 actual_size: int | None, cluster_size: int | None,
                 vm_state_offset: int | None, dirty_flag: bool | None,
                 backing_filename: str | None, full_backing_filename: str | None,
                 backing_format: str | None,
                 format_specific: dict[str, object] | None) -> None:
        self.filename = filename
        self.format_name = format_name
        self.virtual_size = virtual_size
        self.actual_size = actual_size
        self.cluster_size = cluster_size
        self.vm_state_offset = vm_state_offset
        self.dirty_flag = dirty_flag
        self.backing_filename = backing_filename
        self.full_backing_filename = full_backing_filename
        self.backing_format = backing_format
        self.format_specific = format_specific


class MapEntry(Record):
    """One entry of ``qemu-img map --output=json``."""

    __slots__ = _fields = ("start", "length", "depth", "present", "zero", "data", "offset",
                           "filename")

    def __init__(self, start: int, length: int, depth: int, present: bool, zero: bool,
                 data: bool, offset: int | None, filename: str | None = None) -> None:
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename


class CreateOption(Record):
    """One creation option as QEMU lists it.

    ``type`` is 'size', 'number', 'bool' or 'string'; ``default`` is the
    text QEMU prints when the option is not given (None: not printed);
    ``origin`` is where the option comes from: "format" (the format driver)
    or "protocol" (the file protocol).
    """

    _fields = ("name", "type", "help", "default", "origin")

    def __init__(self, name: str, type: str, help: str, default: str | None = None,
                 origin: str = "format") -> None:
        self.name = name
        self.type = type
        self.help = help
        self.default = default
        self.origin = origin

    @property
    def printed_when_unset(self) -> bool:
        """Whether ``Formatting ...`` lists the option when it was not given."""
        return self.default is not None


# -- option tables ------------------------------------------------------------------------

_SIZE_OPTION = CreateOption("size", "size", "Virtual disk size")

_QCOW2_OPTIONS = [
    CreateOption("encryption", "bool",
                 "Encrypt the image with format 'aes'. (Deprecated in favor of "
                 "encrypt.format=aes)"),
    CreateOption("encrypt.format", "string",
                 "Encrypt the image, format choices: 'aes', 'luks'"),
    CreateOption("encrypt.key-secret", "string",
                 "ID of secret providing qcow AES key or LUKS passphrase"),
    CreateOption("encrypt.cipher-alg", "string", "Name of encryption cipher algorithm"),
    CreateOption("encrypt.cipher-mode", "string", "Name of encryption cipher mode"),
    CreateOption("encrypt.ivgen-alg", "string", "Name of IV generator algorithm"),
    CreateOption("encrypt.ivgen-hash-alg", "string", "Name of IV generator hash algorithm"),
    CreateOption("encrypt.hash-alg", "string", "Name of encryption hash algorithm"),
    CreateOption("encrypt.iter-time", "number", "Time to spend in PBKDF in milliseconds"),
    CreateOption("cluster_size", "size", "qcow2 cluster size", "65536"),
    CreateOption("extended_l2", "bool", "Extended L2 tables", "off"),
    CreateOption("preallocation", "string",
                 "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    CreateOption("compression_type", "string",
                 "Compression method used for image cluster compression", "zlib"),
    _SIZE_OPTION,
    CreateOption("compat", "string", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    CreateOption("backing_file", "string", "File name of a base image"),
    CreateOption("backing_fmt", "string", "Image format of the base image"),
    CreateOption("data_file", "string", "File name of an external data file"),
    CreateOption("data_file_raw", "bool",
                 "The external data file must stay valid as a raw image"),
    CreateOption("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    CreateOption("refcount_bits", "number", "Width of a reference count entry in bits", "16"),
]

_FILE_OPTIONS = [
    CreateOption("size", "size", "Virtual disk size", origin="protocol"),
    CreateOption("nocow", "bool", "Turn off copy-on-write (valid only on btrfs)",
                 origin="protocol"),
    CreateOption("preallocation", "string",
                 "Preallocation mode (allowed values: off, falloc, full)", origin="protocol"),
    CreateOption("extent_size_hint", "size",
                 "Extent size hint for the image file, 0 to disable", origin="protocol"),
]

FORMATS = ("qcow2", "raw")


def create_options(fmt: str, *, with_protocol: bool = True) -> list[CreateOption]:
    """QEMU's creation options for ``fmt``, in QEMU's order.

    With ``with_protocol`` the file protocol's own options follow (those a
    format does not already have), as qemu-img merges them when a file name
    is known.
    """
    if fmt == "qcow2":
        table = list(_QCOW2_OPTIONS)
    elif fmt == "raw":
        table = [_SIZE_OPTION]
    elif fmt == "file":
        return list(_FILE_OPTIONS)
    else:
        raise OpenError(f"Unknown file format '{fmt}'", errno=errno.EINVAL)
    if with_protocol:
        names = {option.name for option in table}
        table += [option for option in _FILE_OPTIONS if option.name not in names]
    return table


def _parse_option_value(option: CreateOption, value: str) -> object:
    """Parse one -o value as QEMU's option parser does."""
    if option.type == "size":
        try:
            return parse_size(value)
        except OverflowError:
            raise ImageError(f"Value '{value}' is out of range for parameter '{option.name}'",
                             errno=errno.EINVAL) from None
        except ValueError:
            raise ImageError(
                f"Parameter '{option.name}' expects a non-negative number below 2^64",
                errno=errno.EINVAL,
                hint="Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, "
                     "peta-\nand exabytes, respectively.\n") from None
    if option.type == "number":
        try:
            return parse_number(value)
        except OverflowError:
            raise ImageError(f"Value '{value}' is too large for parameter '{option.name}'",
                             errno=errno.EINVAL) from None
        except ValueError:
            raise ImageError(f"Parameter '{option.name}' expects a number",
                             errno=errno.EINVAL) from None
    if option.type == "bool":
        try:
            return parse_bool(value)
        except ValueError:
            raise ImageError(f"Parameter '{option.name}' expects 'on' or 'off'",
                             errno=errno.EINVAL) from None
    return value


def _parsed_options(fmt: str, options: Mapping[str, str]) -> dict[str, object]:
    table = {option.name: option for option in create_options(fmt)}
    parsed: dict[str, object] = {}
    for name, value in options.items():
        option = table.get(name)
        if option is None:
            raise ImageError(f"Invalid parameter '{name}'", errno=errno.EINVAL)
        parsed[name] = _parse_option_value(option, str(value))
    return parsed


def formatting_options(fmt: str, options: Mapping[str, str]) -> list[tuple[str, str]]:
    """The ``name=value`` pairs qemu-img prints after ``Formatting '...', fmt=...``.

    Options given are printed (numbers and sizes as parsed, strings with
    commas doubled); options not given are printed with their default when
    they have one.
    """
    parsed = _parsed_options(fmt, options)
    pairs = []
    for option in create_options(fmt):
        if option.name in options:
            raw = str(options[option.name])
            if option.type in ("size", "number"):
                text = str(parsed[option.name])
            elif option.type == "string":
                text = raw.replace(",", ",,")
            else:
                text = raw
        elif option.default is not None:
            text = option.default
        else:
            continue
        pairs.append((option.name, text))
    return pairs


# -- paths ------------------------------------------------------------------------------------


# qcow2's overlap-check options: a new template replaces every old one
_OVERLAP_KEYS = ("overlap-check", "overlap-check.template", "overlap-check.main-header",
                 "overlap-check.active-l1", "overlap-check.active-l2",
                 "overlap-check.refcount-table", "overlap-check.refcount-block",
                 "overlap-check.snapshot-table", "overlap-check.inactive-l1",
                 "overlap-check.inactive-l2")
_CACHE_KEYS = ("cache-size", "l2-cache-size", "refcount-cache-size")


def join_reopen_options(format_name: str, new: Mapping[str, object],
                        old: Mapping[str, object]) -> dict[str, object]:
    """The options a reopen applies: ``new`` on top of the ``old`` ones kept.

    Both are flat, with dotted keys.  qcow2 first drops old options a new one
    supersedes, as QEMU's qcow2_join_options does: a new overlap-check template
    drops the old overlap options; a new cache-size drops the old l2 and
    refcount cache sizes; and an old cache-size goes once any cache size is
    set after the merge unless cache-size itself is new.
    """
    kept = dict(old)
    if format_name == "qcow2":
        if "overlap-check" in new or "overlap-check.template" in new:
            for key in _OVERLAP_KEYS:
                kept.pop(key, None)
        if "cache-size" in new:
            kept.pop("l2-cache-size", None)
            kept.pop("refcount-cache-size", None)
    joined = dict(new)
    for key, value in kept.items():
        joined.setdefault(key, value)
    if format_name == "qcow2" and "cache-size" not in new \
            and any(key in joined for key in _CACHE_KEYS):
        joined.pop("cache-size", None)
    return joined


def _without_protocol(filename: str) -> str:
    """The host file a file name given to the file protocol stands for.

    A "file:" prefix is dropped (and "./" put in front when a colon before any
    slash would read as a protocol again: bdrv_parse_filename_strip_prefix);
    any other "protocol:" prefix is refused, as bdrv_find_protocol refuses one
    it does not know.
    """
    if filename.startswith("file:"):
        filename = filename[len("file:"):]
        return "./" + filename if _path_has_protocol(filename) else filename
    if _path_has_protocol(filename) and not filename.startswith("json:"):
        protocol = filename.split(":", 1)[0]
        raise OpenError(f"Unknown protocol '{protocol}'", errno=errno.EINVAL)
    return filename


def _path_has_protocol(name: str) -> bool:
    """path_has_protocol: a colon before the first slash."""
    stop = len(name)
    for mark in (":", "/"):
        found = name.find(mark)
        if 0 <= found < stop:
            stop = found
    return name[stop:stop + 1] == ":"


def resolve_backing_filename(overlay: str, backing: str) -> str:
    """A backing file name as QEMU resolves it: relative to the overlay's folder."""
    if not backing or os.path.isabs(backing) or _path_has_protocol(backing):
        return backing
    if backing.startswith("file:"):
        return backing
    slash = overlay.rfind("/")
    if slash < 0:
        return backing
    return overlay[:slash + 1] + backing


# -- opening ---------------------------------------------------------------------------------


def _flatten(options: Mapping[str, object]) -> dict[str, object]:
    """Nested and dotted QEMU option keys, both turned into nested dicts."""
    out: dict[str, object] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            value = _flatten(value)
        parts = key.split(".")
        target = out
        for part in parts[:-1]:
            existing = target.get(part)
            if not isinstance(existing, dict):
                existing = {} if existing is None else {"filename": existing}
                target[part] = existing
            target = existing
        last = parts[-1]
        existing = target.get(last)
        if isinstance(value, dict) and isinstance(existing, dict):
            existing.update(value)
        elif isinstance(existing, dict) and not isinstance(value, dict):
            # "x=v" after "x.y=w": the plain value sits with the keys, as above
            existing["filename"] = value
        else:
            target[last] = value
    return out


def _bool_value(value: object, name: str) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return parse_bool(str(value))
    except ValueError:
        raise OpenError(f"Parameter '{name}' expects 'on' or 'off'",
                        errno=errno.EINVAL) from None


def _probe_format(file: HostFile) -> str:
    from .qcow2.format import probe

    if file.length() == 0:
        return "raw"
    head = file.pread(0, 512)
    return "qcow2" if probe(head) else "raw"


def _file_identity(file: HostFile) -> tuple[int, int]:
    st = os.fstat(file.fd)
    return st.st_dev, st.st_ino


def open_image(filename: str | None = None, *, fmt: str | None = None,
               options: Mapping[str, object] | None = None,
               read_only: bool = False, check: bool = False,
               no_backing: bool = False) -> BlockNode:
    """Open an image and its backing chain.

    ``options`` are QEMU blockdev options as a (possibly nested or dotted)
    dict: ``driver``, ``file`` (``{"driver": "file", "filename": ...}``;
    a plain string is a node reference, as in QEMU, which the engine cannot
    resolve), ``backing`` (None or "" cuts the chain; a dict of options
    replaces it; a string is again a node reference),
    ``read-only``, ``discard`` ("unmap"/"ignore"), ``cache.no-flush`` and
    the qcow2 runtime options.  ``check`` opens the image as ``qemu-img
    check`` does (QEMU's BDRV_O_CHECK): a corrupt image may be opened
    read/write to be repaired, a missing refcount table or broken snapshot
    table does not stop the open, and a dirty image is not repaired first.
    ``no_backing`` opens the image alone, as qemu-img info does (QEMU's
    BDRV_O_NO_BACKING): a ``backing`` option other than None or "" is then
    left unused, which is an error.
    """
    return _open(filename, fmt, _flatten(options or {}), read_only, [], check=check,
                 no_backing=no_backing)


def _open(filename: str | None, fmt: str | None, options: dict[str, object],
          read_only: bool, chain: list[tuple[int, int]], *,
          check: bool = False, no_backing: bool = False) -> BlockNode:
    options = dict(options)
    # only a plain file name is looked at for a "protocol:" prefix, as QEMU's
    # bdrv_find_protocol does for the filename argument alone
    parse_protocol = filename is not None
    driver_name = options.pop("driver", None)
    if driver_name is not None and fmt is not None and driver_name != fmt:
        raise OpenError(f"Cannot use image format '{fmt}' with driver '{driver_name}'",
                        errno=errno.EINVAL)
    fmt = fmt or (str(driver_name) if driver_name is not None else None)
    file_option = options.pop("file", None)
    if isinstance(file_option, Mapping):
        file_opts = dict(file_option)
        file_driver = file_opts.pop("driver", "file")
        if file_driver != "file":
            raise OpenError(f"Unknown protocol '{file_driver}'", errno=errno.EINVAL)
        name = file_opts.pop("filename", None)
        if name is not None:
            filename = str(name)
    elif file_option is not None:
        # A string names another node (QEMU's node reference); the engine
        # opens no nodes by name.
        raise _no_such_node(str(file_option))
    if "filename" in options:
        filename = str(options.pop("filename"))
    if filename is None:
        if isinstance(file_option, Mapping):
            raise OpenError("The 'file' block driver requires a file name",
                            errno=errno.EINVAL)
        if driver_name is not None or fmt is not None:
            raise OpenError('A block device must be specified for "file"',
                            errno=errno.EINVAL)
        raise OpenError("Must specify either driver or file", errno=errno.EINVAL)
    if parse_protocol:
        filename = _without_protocol(filename)
    forced_read_only = False
    if isinstance(file_option, Mapping) and "read-only" in file_opts:
        forced_read_only = _bool_value(file_opts.pop("read-only"), "read-only")
    if "read-only" in options:
        node_read_only = _bool_value(options.pop("read-only"), "read-only")
        forced_read_only = forced_read_only or node_read_only
        if not node_read_only:
            read_only = False
    if forced_read_only and not read_only:
        # The opener asked for write access (qemu-img resize, qemu-io without
        # -r): QEMU opens the node read-only and then refuses the permission.
        raise OpenError("Block node is read-only", errno=errno.EPERM)
    unmap = True
    if "discard" in options:
        mode = str(options.pop("discard"))
        if mode in ("off", "ignore"):
            unmap = False
        elif mode not in ("on", "unmap"):
            raise OpenError(f"Invalid discard option: {mode}", errno=errno.EINVAL)
    cache = options.pop("cache", None)
    if isinstance(cache, Mapping):
        # checked as QEMU checks them; the engine's file access does not change
        for name in ("direct", "no-flush"):
            if name in cache:
                _bool_value(cache[name], f"cache.{name}")
    if "auto-read-only" in options:
        _bool_value(options.pop("auto-read-only"), "auto-read-only")
    has_backing_option = "backing" in options
    backing_option = options.pop("backing", None)
    for ignored in ("node-name", "force-share", "detect-zeroes"):
        options.pop(ignored, None)

    file = HostFile(filename, writable=not read_only)
    try:
        probed = fmt is None
        if fmt is None:
            fmt = _probe_format(file)
        identity = _file_identity(file)
        if identity in chain:
            raise CorruptImageError(f"Backing file '{filename}' creates an infinite loop",
                                    errno=errno.ELOOP)
        if fmt == "raw":
            from .raw import RawDriver

            if _names_backing(backing_option):
                # bdrv_open_backing_file: raw has no backing, named or not
                if no_backing:
                    raise _unused_backing_option("raw", backing_option)
                raise OpenError("Driver doesn't support backing files", errno=errno.EINVAL)
            if options:
                name = sorted(options)[0]
                raise OpenError(f"Block format 'raw' does not support the option '{name}'",
                                errno=errno.EINVAL)
            driver = RawDriver(file, probed=probed)
            raw_node = BlockNode(driver, filename, read_only=read_only, unmap=unmap)
            if probed and not read_only:
                # raw_open's warning, printed whenever a probed raw image is writable
                raw_node.open_messages.append(
                    f"WARNING: Image format was not specified for '{filename}' and probing "
                    "guessed raw.\n"
                    "         Automatically detecting the format is dangerous for raw images, "
                    "write operations on block 0 will be restricted.\n"
                    "         Specify the 'raw' format explicitly to remove the "
                    "restrictions.\n")
            return raw_node
        if fmt != "qcow2":
            if fmt in ("qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "luks", "parallels",
                       "cloop", "dmg", "bochs"):
                raise UnsupportedImageError(f"Image format '{fmt}' is not supported by this "
                                            f"engine", errno=errno.ENOTSUP)
            raise OpenError(f"Unknown driver '{fmt}'", errno=errno.EINVAL)
        from .qcow2.driver import Qcow2Driver

        qcow2_options = dict(options)
        qcow2_options["_unmap"] = unmap
        qdriver = Qcow2Driver.open(file, read_only=read_only, options=qcow2_options,
                                   check_mode=check)
    except BaseException:
        file.close()
        raise

    node = BlockNode(qdriver, filename, read_only=read_only, unmap=unmap)
    try:
        backing = None
        if no_backing:
            if _names_backing(backing_option):
                raise _unused_backing_option("qcow2", backing_option)
        elif has_backing_option:
            if isinstance(backing_option, Mapping):
                backing = _open_backing_with_options(qdriver, filename, dict(backing_option),
                                                     chain + [identity])
            elif backing_option is not None and str(backing_option) != "":
                # As with "file": a string names another node ("" means none).
                raise _no_such_node(str(backing_option)).prefixed(
                    "Could not open backing file: ")
        elif qdriver.image_backing_file:
            backing = _open_backing(qdriver, filename, chain + [identity])
        node.backing = backing
    except BaseException:
        node.close()
        raise
    return node


def _names_backing(option: object) -> bool:
    """Whether a "backing" option asks for a backing node: None and "" cut the
    chain (bdrv_open_inherit drops them), and so does the {"filename": None}
    a front end leaves when it opens an image without its backing file."""
    if option is None or option == "":
        return False
    if isinstance(option, Mapping):
        return any(key != "filename" or value is not None for key, value in option.items())
    return True


def _unused_backing_option(format_name: str, option: object) -> OpenError:
    """Opened without a backing file, a "backing" option is left over, and QEMU
    names the first leftover key (bdrv_open_inherit's unknown-option check)."""
    key = "backing"
    value = option
    while isinstance(value, Mapping):
        rest = {k: v for k, v in value.items() if not (k == "filename" and v is None)}
        if not rest:
            break
        name = next(iter(rest))
        key, value = f"{key}.{name}", rest[name]
    return OpenError(f"Block format '{format_name}' does not support the option '{key}'",
                     errno=errno.EINVAL)


def _no_such_node(reference: str) -> OpenError:
    return OpenError(f"Cannot find device='{reference}' nor node-name='{reference}'",
                     errno=errno.ENODEV)


def _open_backing_with_options(driver: object, overlay: str, options: dict[str, object],
                               chain: list[tuple[int, int]]) -> BlockNode:
    """A "backing" given as options: they add to the image's own backing file
    (bdrv_open_backing_file), unless they name a file themselves."""
    if "filename" in options and options["filename"] is None:
        # "backing": null next to "backing.x" keys: the chain is cut and the
        # keys are left over, as with QEMU's BDRV_O_NO_BACKING
        key = "backing"
        value: object = {k: v for k, v in options.items() if k != "filename"}
        while isinstance(value, Mapping) and value:
            name = next(iter(value))
            key, value = f"{key}.{name}", value[name]
        raise OpenError(f"Block format 'qcow2' does not support the option '{key}'",
                        errno=errno.EINVAL)
    backing_file = driver.image_backing_file  # type: ignore[attr-defined]
    if "file" in options or "filename" in options or not backing_file:
        return _open(None, None, options, True, chain)
    backing_format = driver.image_backing_format  # type: ignore[attr-defined]
    if backing_format and "driver" not in options:
        options["driver"] = backing_format
    path = resolve_backing_filename(overlay, backing_file)
    try:
        return _open(path, None, options, True, chain)
    except ImageError as exc:
        raise exc.prefixed("Could not open backing file: ") from None


def _open_backing(driver: object, overlay: str, chain: list[tuple[int, int]]) -> BlockNode:
    backing_file = driver.image_backing_file
    backing_format = driver.image_backing_format
    path = resolve_backing_filename(overlay, backing_file)
    try:
        return _open(path, backing_format or None, {}, True, chain)
    except ImageError as exc:
        raise exc.prefixed("Could not open backing file: ") from None


# -- creating ----------------------------------------------------------------------------------


def resolve_create_options(filename: str, fmt: str, options: Mapping[str, str], *,
                           unsafe: bool = False) -> dict[str, str]:
    """What qemu-img create settles before it prints ``Formatting ...``.

    Validates the option values, the backing file (opening it unless
    ``unsafe``, QEMU's -u) and takes the size from the backing file when
    none is given.  Returns the options with ``size`` filled in.
    """
    if fmt not in FORMATS:
        if fmt in ("qcow", "vmdk", "vdi", "vpc", "vhdx", "qed", "luks", "parallels"):
            raise UnsupportedImageError(f"Image format '{fmt}' is not supported by this "
                                        f"engine", errno=errno.ENOTSUP)
        raise OpenError(f"Unknown file format '{fmt}'", errno=errno.EINVAL)
    resolved = {name: str(value) for name, value in options.items()}
    parsed = _parsed_options(fmt, resolved)
    backing_file = resolved.get("backing_file")
    backing_fmt = resolved.get("backing_fmt")
    if backing_file is not None:
        if backing_file == filename:
            raise ImageError("Error: Trying to create an image with the same filename as "
                             "the backing file", errno=errno.EINVAL)
        if backing_file == "":
            raise ImageError("Expected backing file name, got empty string",
                             errno=errno.EINVAL)
    size = parsed.get("size")
    if backing_file is not None and not unsafe:
        full = resolve_backing_filename(filename, backing_file)
        try:
            # the whole chain, as bdrv_img_create opens it
            backing = _open(full, backing_fmt, {}, True, [])
        except ImageError as exc:
            exc.hint = (exc.hint or "") + "Could not open backing image.\n"
            raise
        try:
            if backing_fmt is None:
                raise ImageError("Backing file specified without backing format",
                                 errno=errno.EINVAL,
                                 hint=f"Detected format of {backing.format_name}.")
            if size is None:
                resolved["size"] = str(backing.length())
        finally:
            backing.close()
    elif backing_file is not None and backing_fmt is None:
        raise ImageError("Backing file specified without backing format", errno=errno.EINVAL)
    if "size" not in resolved:
        raise ImageError("Image creation needs a size parameter", errno=errno.EINVAL)
    return resolved


def create_image(filename: str, fmt: str, options: Mapping[str, str], *,
                 unsafe: bool = False) -> None:
    """Create an image as ``qemu-img create -f fmt -o ...`` does.

    ``options`` use QEMU's option names and command-line string values;
    ``size`` is in bytes.  Raises ImageError with QEMU's message.
    """
    resolved = resolve_create_options(filename, fmt, options, unsafe=unsafe)
    parsed = _parsed_options(fmt, resolved)
    size = int(parsed["size"])  # type: ignore[call-overload]
    size = -(-size // SECTOR_SIZE) * SECTOR_SIZE
    if fmt == "raw":
        _create_raw(filename, size, parsed)
        return
    from .qcow2.driver import create_qcow2

    create_qcow2(filename, size, parsed)


def _create_raw(filename: str, size: int, parsed: Mapping[str, object]) -> None:
    prealloc = str(parsed.get("preallocation", "off"))
    if prealloc not in ("off", "falloc", "full"):
        raise ImageError(f"Parameter 'preallocation' does not accept value '{prealloc}'",
                         errno=errno.EINVAL)
    file = create_file(filename)
    try:
        if prealloc == "off":
            file.truncate(size)
        elif prealloc == "falloc":
            if size:
                os.posix_fallocate(file.fd, 0, size)
                file.write_first_block(size)
        else:
            os.ftruncate(file.fd, size)
            file.write_zeroes_or_fill(0, size)
            os.fsync(file.fd)
    except OSError as exc:
        raise ImageError(f"Could not preallocate data for the new file: {exc.strerror}",
                         errno=exc.errno) from None
    finally:
        file.close()


def create_file(filename: str) -> HostFile:
    """Create (or empty) ``filename`` as file-posix does, and open it."""
    filename = _without_protocol(filename)
    try:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        from .errors import errno_message

        raise ImageError(errno_message(f"Could not create '{filename}'", exc.errno),
                         errno=exc.errno) from None
    os.close(fd)
    file = HostFile(filename, writable=True)
    try:
        os.ftruncate(file.fd, 0)
    except OSError as exc:
        file.close()
        raise ImageError(f"Could not resize file: {exc.strerror}", errno=exc.errno) from None
    return file
