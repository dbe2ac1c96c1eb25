"""The port of QEMU iotest 154: its golden is QEMU's own 154.out, byte for
byte, and running the case on real QEMU reproduces that file."""

from __future__ import annotations

from pathlib import Path

from harness.backends import get_backend
from harness.loader import load_case
from harness.runner import run_case

ROOT = Path(__file__).resolve().parents[2]
CASE = ROOT / "cases" / "154-write-zeroes-backing.yaml"


def test_golden_154_is_qemus_own_154_out(qemu_iotests_dir):
    assert (ROOT / "golden" / "154.out").read_bytes() == (qemu_iotests_dir / "154.out").read_bytes()


def test_case_154_on_real_qemu_prints_qemus_154_out(qemu_iotests_dir, qemu_img, qemu_io,
                                                    tmp_path):
    transcript = run_case(load_case(CASE), get_backend("qemu"), tmp_root=str(tmp_path))
    assert transcript.text.encode() == (qemu_iotests_dir / "154.out").read_bytes()
    assert list(tmp_path.iterdir()) == []
