"""Fixtures shared by every test folder: where real QEMU is, or why it is not.

Tests that compare with QEMU 7.2 ask for these fixtures; where QEMU (or its
source tree) cannot be had they are skipped with the reason, never failed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

QEMU_SRC_DEFAULT = Path.home() / ".cache" / "qemu-7.2-src" / "qemu-7.2.0"


def _program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install -y qemu-utils)")
    return path


@pytest.fixture(scope="session")
def qemu_img() -> str:
    """Path of the real qemu-img."""
    return _program("qemu-img")


@pytest.fixture(scope="session")
def qemu_io() -> str:
    """Path of the real qemu-io."""
    return _program("qemu-io")


@pytest.fixture(scope="session")
def qemu_iotests_dir() -> Path:
    """QEMU 7.2's tests/qemu-iotests folder ($QEMU_SRC, or the shared cache)."""
    root = Path(os.environ.get("QEMU_SRC", QEMU_SRC_DEFAULT))
    iotests = root / "tests" / "qemu-iotests"
    if not (iotests / "check").exists():
        pytest.skip(f"QEMU 7.2 source not found at {root} (set QEMU_SRC; .ci/run fetches it)")
    return iotests
