"""Backends by name, and the `--backend` option's parsing.

`engine` (the default) calls the front ends in-process, `cli` runs them as
processes, `qemu` runs real QEMU. One instance per name and process.
"""

from __future__ import annotations

from harness.backends.base import Backend, BackendError, Result
from harness.backends.cli import CliBackend
from harness.backends.engine import EngineBackend
from harness.backends.qemu import QemuBackend

BACKENDS: dict[str, type[Backend]] = {
    "engine": EngineBackend,
    "cli": CliBackend,
    "qemu": QemuBackend,
}
DEFAULT = "engine"

_instances: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    backend = _instances.get(name)
    if backend is None:
        backend = _instances[name] = BACKENDS[name]()
    return backend


def parse_backends(text: str) -> list[str]:
    """`engine`, `qemu,cli` or `all` -> backend names; ValueError if unknown."""
    if text.strip() == "all":
        return list(BACKENDS)
    names = []
    for part in text.split(","):
        name = part.strip()
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r} "
                             f"(choose from {', '.join(BACKENDS)}, or all)")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("no backend given")
    return names


__all__ = ["BACKENDS", "DEFAULT", "Backend", "BackendError", "Result", "get_backend",
           "parse_backends"]
