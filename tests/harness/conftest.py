"""Fixtures for the harness tests: QEMU's own bash filters, ready to compare with."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

# Sourced before each filter: GNU sed under the name common.filter uses, the
# two common.rc functions the filters call or the tests exercise (taken from
# the real file at run time), and a stand-in for qemu-img that replays the
# captured output so `_img_info` filters it exactly as it would live output.
_PRELUDE = r"""
gsed() { sed "$@"; }
. "$IOTESTS/common.filter"
eval "$(sed -n '/^_get_data_file()/,/^}/p' "$IOTESTS/common.rc")"
eval "$(sed -n '/^_img_info()/,/^}/p' "$IOTESTS/common.rc")"
replay() { cat "$REPLAY"; }
QEMU_IMG=replay
"""


@pytest.fixture(scope="session")
def bash_filter(qemu_iotests_dir: Path) -> Callable[..., str]:
    """bash_filter(pipeline, text, test_dir, imgfmt="qcow2") -> what QEMU's
    bash filter pipeline prints for `text` on stdin."""
    if shutil.which("bash") is None or shutil.which("sed") is None:
        pytest.skip("bash and sed are needed to run QEMU's filters")

    def run(pipeline: str, text: str, test_dir: str | Path, imgfmt: str = "qcow2") -> str:
        replay = Path(test_dir) / ".replay"
        replay.write_text(text)
        env = dict(os.environ, IOTESTS=str(qemu_iotests_dir), TEST_DIR=str(test_dir),
                   REMOTE_TEST_DIR=str(test_dir), SOCK_DIR="/nonexistent-sock-dir",
                   IMGFMT=imgfmt, IMGPROTO="file", IMGOPTS="", REPLAY=str(replay),
                   TEST_IMG=str(Path(test_dir) / f"t.{imgfmt}"), LC_ALL="C")
        done = subprocess.run(["bash", "-c", _PRELUDE + pipeline], input=text, env=env,
                              capture_output=True, text=True, check=False)
        replay.unlink()
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run
