"""Mistaken and informational command lines, compared with real QEMU.

None of these reaches an image: they exercise option parsing (glibc getopt's
permutation, clusters, long-option prefixes and its messages), usage and help
texts, size and option-list syntax, and the exit statuses that go with them.
"""

from __future__ import annotations

import pytest

IMG_CASES = [
    [],
    ["-V"],
    ["--version"],
    ["-h"],
    ["--help"],
    ["--hel"],
    ["-x"],
    ["--nope"],
    ["-T"],
    ["-T", "foo"],
    ["nope"],
    ["info"],
    ["info", "-x", "a.img"],
    ["info", "-xU", "a.img"],
    ["info", "a.img", "-Ux"],
    ["info", "--outp=json"],
    ["info", "--output"],
    ["info", "--output=xml", "a.img"],
    ["info", "--help=x", "a.img"],
    ["info", "--backing-chain=yes", "a.img"],
    ["info", "-f"],
    ["info", "a.img", "b.img"],
    ["info", "--image-opts", "-f", "raw", "a.img"],
    ["map"],
    ["map", "--output=xml", "a.img"],
    ["map", "--start-offset=-1", "a.img"],
    ["map", "--start-offset=1Q", "a.img"],
    ["map", "-s", "99999999999999999999", "a.img"],
    ["map", "--max-length", "8E", "a.img"],
    ["map", "-l"],
    ["check"],
    ["check", "-r", "some", "a.img"],
    ["check", "--repair"],
    ["check", "--output=xml", "a.img"],
    ["check", "-T", "bogus", "a.img"],
    ["compare", "a.img"],
    ["compare", "a.img", "b.img", "c.img"],
    ["compare", "-T", "bogus", "a.img", "b.img"],
    ["compare", "-x", "a.img", "b.img"],
    ["create"],
    ["create", "-f"],
    ["create", "-f", "qcow2"],
    ["create", "-f", "qcow2", "x.img", "1M", "extra"],
    ["create", "-f", "qcow2", "x.img", "1Q"],
    ["create", "-f", "qcow2", "x.img", "1.5"],
    ["create", "-f", "qcow2", "x.img", "16E"],
    ["create", "-f", "qcow2", "x.img", "8E"],
    ["create", "-f", "qcow2", "x.img", "-1"],
    ["create", "-f", "qcow2", "x.img", "--", "-1"],
    ["create", "-f", "qcow2", "-o", "", "x.img", "1M"],
    ["create", "-f", "qcow2", "-o", ",size=1M", "x.img"],
    ["create", "-f", "qcow2", "-o", "size=1M,", "x.img"],
    ["create", "-f", "qcow2", "-o", "size=1M,,,", "x.img"],
    ["create", "-f", "qcow2", "-Z", "x.img"],
    ["create", "--object"],
]

IO_CASES = [
    ["-h"],
    ["--help"],
    ["-V"],
    ["-x"],
    ["--nope"],
    ["--c=none"],
    ["--read-only=yes"],
    ["-t", "bogus"],
    ["--cache=bogus"],
    ["-i", "bogus"],
    ["--aio=bogus"],
    ["-d", "bogus"],
    ["a.img", "b.img"],
    ["--image-opts", "-f", "raw", "a.img"],
    ["-c"],
    ["-c", "help"],
    ["-c", "?"],
    ["-c", "help read"],
    ["-c", "help r"],
    ["-c", "help open"],
    ["-c", "help sigraise"],
    ["-c", "help map"],
    ["-c", "help help"],
    ["-c", "help write", "-c", "help writev", "-c", "help readv"],
    ["-c", "help aio_read", "-c", "help aio_write", "-c", "help discard"],
    ["-c", "help reopen", "-c", "help truncate", "-c", "help length"],
    ["-c", "help nope"],
    ["-c", "help a b"],
    ["-c", "nope"],
    ["-c", ""],
    ["-c", "   "],
    ["-c", "read"],
    ["-c", "read 0 512"],
    ["-c", "length"],
    ["-c", "alloc 0 1 2"],
    ["-c", "quit", "-c", "length"],
    ["-c", "q extra words"],
    ["-c", "open"],
    ["-c", "open -x"],
    ["-c", "open -t bogus x"],
    ["-c", "open -d bogus x"],
    ["-c", "open -i bogus x"],
    ["-c", "sleep 1x"],
    ["-c", "sleep -1"],
    ["-c", "sleep 0x5"],
    ["-c", "sigraise 999"],
    ["-c", "sigraise 1Q"],
    ["-c", "sigraise 0", "-c", "help quit"],
]


def _id(args: list[str]) -> str:
    return " ".join(args) or "(none)"


@pytest.mark.parametrize("args", IMG_CASES, ids=_id)
def test_qemu_img_command_line(twins, args):
    twins.compare("img", *args)


@pytest.mark.parametrize("args", IO_CASES, ids=_id)
def test_qemu_io_command_line(twins, args):
    twins.compare("io", *args)


@pytest.mark.parametrize("args", [["-c", "nope", "-c", "help quit"],
                                  ["-c", "read", "-c", "help length", "-c", "sleep x"]],
                         ids=_id)
def test_qemu_io_merged_streams(twins, args):
    """With 2>&1, unbuffered errors overtake buffered results exactly as in QEMU."""
    twins.compare("io", *args, merged=True)


@pytest.mark.parametrize("script", ["help quit\n", "nope\nhelp length\n",
                                    "help quit\nquit\nhelp length\n", "   \n\nlength\n",
                                    "help q", ""], ids=repr)
def test_qemu_io_commands_from_stdin(twins, script):
    """Without -c, qemu-io prompts and reads commands from a pipe."""
    twins.compare("io", stdin=script)
    twins.compare("io", stdin=script, merged=True)


@pytest.mark.parametrize("tool, args", [
    ("io", ["-x"]),
    ("io", ["-c", "nope", "nofile"]),
    ("io", ["-h"]),
    ("img", ["info", "nofile"]),
    ("img", ["nope"]),
], ids=lambda value: " ".join(value) if isinstance(value, list) else value)
def test_program_name_follows_argv0(tmp_path, qemu_img, qemu_io, pyqemu_img, pyqemu_io,
                                    child_env, normalise, tool, args):
    """Under any other name the tools call themselves what QEMU's would."""
    import subprocess

    outcomes = []
    for side, program in (("qemu", qemu_io if tool == "io" else qemu_img),
                          ("pyqemu", pyqemu_io if tool == "io" else pyqemu_img)):
        folder = tmp_path / side
        folder.mkdir()
        (folder / "renamed-tool").symlink_to(program)
        completed = subprocess.run(["./renamed-tool", *args], cwd=folder, capture_output=True,
                                   text=True, env=child_env, stdin=subprocess.DEVNULL)
        outcomes.append((completed.returncode, normalise(completed.stdout),
                         normalise(completed.stderr)))
    assert outcomes[1] == outcomes[0]
