"""Atomic file writes: a reader never sees a partial file, a failure leaves none behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda stream: stream.write(data))


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial
    file, and a failure leaves no file behind."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temporary, _mode_for_new_files())  # mkstemp's 0600 would hide the file from others
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def _mode_for_new_files() -> int:
    """What ``open()`` would give a new file: 0666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
