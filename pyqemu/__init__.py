"""Front ends pyqemu-img and pyqemu-io: QEMU 7.2 command lines over imgengine."""
