"""Atomic file writes: a reader never sees a partial file, a failure leaves none behind.

A write goes to a temporary file in the destination's folder, named
``.<name>.onnxcam-<random>.tmp``, then is renamed over the destination. The temporary file
is removed on any exception, including ``KeyboardInterrupt`` (SIGINT); its name is known
*before* it is created, so no interrupt can land between its creation and the cleanup that
covers it. SIGTERM kills a Python process without running any cleanup, so the CLI calls
:func:`remove_temporaries_on_signal`, which removes the live temporary files and exits. A
process killed outright (SIGKILL, power loss) still leaves its temporary file: every folder
written to is swept once per process of our own temporary files older than
:data:`STALE_SECONDS` (only names of our own pattern, never anything else).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: A temporary file older than this (by its last write) belongs to a dead writer.
STALE_SECONDS = 600
#: Our temporary files, ``.<name>.onnxcam-<16 hex>.tmp``, and nothing else.
TEMP_PATTERN = re.compile(r"^\..+\.onnxcam-[0-9a-f]{16}\.tmp$")

#: Temporary files being written now, removed by the signal handler.
_LIVE: set[str] = set()
#: Folders already swept by this process.
_SWEPT: set[str] = set()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda stream: stream.write(data), mode)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any], mode: int | None = None) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial
    file, and a failure (or an interrupt) leaves no file behind. ``mode``: the new file's
    permissions (default: what ``open()`` gives, 0666 less the umask)."""
    path = Path(path)
    sweep_stale_temporaries(path.parent)
    temporary = None
    try:
        while True:
            # The name is recorded before the file exists: an interrupt at any point after
            # this line is cleaned up below.
            temporary = str(path.parent / f".{path.name}.onnxcam-{secrets.token_hex(8)}.tmp")
            _LIVE.add(temporary)
            try:
                handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
                break
            except FileExistsError:  # someone else's file: never ours to remove
                _LIVE.discard(temporary)
                temporary = None
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temporary, _mode_for_new_files() if mode is None else mode)
        os.replace(temporary, path)
    except BaseException:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        raise
    finally:
        if temporary is not None:
            _LIVE.discard(temporary)


def sweep_stale_temporaries(folder: str | os.PathLike, older_than: float = STALE_SECONDS,
                            force: bool = False) -> list[str]:
    """Remove our own temporary files (:data:`TEMP_PATTERN`) in ``folder`` whose last write
    is older than ``older_than`` seconds: left by a killed writer, since a live one keeps
    writing (and renames within seconds). Once per folder per process unless ``force``.
    Returns the names removed; errors (a vanished file, no permission) are ignored."""
    key = os.path.abspath(folder)
    if key in _SWEPT and not force:
        return []
    _SWEPT.add(key)
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if not TEMP_PATTERN.match(entry.name) or entry.path in _LIVE:
            continue
        try:
            if entry.is_file(follow_symlinks=False) and now - entry.stat(follow_symlinks=False).st_mtime > older_than:
                os.unlink(entry.path)
                removed.append(entry.name)
        except OSError:
            pass
    return removed


#: Signals whose default action ends the process without any cleanup.
TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def remove_temporaries_on_signal(signals: tuple[int, ...] = TERMINATING) -> None:
    """Install a handler for ``signals`` (default SIGTERM and SIGHUP, whose default actions
    end the process without any cleanup) that removes the temporary files being written and exits
    with status 128 + signal, as the default action reports. Only where the signal still has
    its default action (an application's own handler is left alone), from the main thread."""
    for number in signals:
        try:
            if signal.getsignal(number) is signal.SIG_DFL:
                signal.signal(number, _on_signal)
        except (ValueError, OSError):  # not the main thread, or not a signal on this platform
            pass


def _on_signal(number: int, frame) -> None:
    remove_live_temporaries()
    signal.signal(number, signal.SIG_DFL)  # a second signal kills at once
    raise SystemExit(128 + number)  # unwinds the writers' own cleanup too


def remove_live_temporaries() -> None:
    """Remove every temporary file this process is writing (the signal handler's part)."""
    for temporary in list(_LIVE):  # list(): one C call, safe while another thread adds
        try:
            os.unlink(temporary)
        except OSError:
            pass


def _mode_for_new_files() -> int:
    """What ``open()`` would give a new file: 0666 less the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read from /proc where it can be: setting it to read it (the only
    portable way) races with files other threads create meanwhile."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask
