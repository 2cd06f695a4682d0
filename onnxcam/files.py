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
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
