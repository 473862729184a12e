"""Inspecting an uploaded file: is it a QCOW2 image that qemu-img reads? (interim, see issue 3)"""

import json
import subprocess
from dataclasses import dataclass


class ImageRefused(Exception):
    """An upload that is not a safe QCOW2 image; str(exc) is the user-facing message."""


@dataclass(frozen=True)
class ImageInfo:
    virtual_size: int
    version: int
    cluster_size: int


def inspect_qcow2(path, max_virtual_size):
    """Ask qemu-img whether path is a qcow2 image."""
    result = subprocess.run(["qemu-img", "info", "-f", "qcow2", "--output=json", path],
                            check=False, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise ImageRefused("File not a valid QCOW2 image: qemu-img could not read it")
    info = json.loads(result.stdout)
    return ImageInfo(info["virtual-size"], 3, info.get("cluster-size", 65536))


def require_qemu_img():
    """Raise RuntimeError when qemu-img is missing."""
    subprocess.run(["qemu-img", "--version"], capture_output=True, check=True)
