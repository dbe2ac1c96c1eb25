"""Pure-Python qcow2 and raw image engine with QEMU 7.2 block-layer semantics."""
