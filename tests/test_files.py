"""Atomic writes under interrupts and signals: never a partial file, never a temporary left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from onnxcam import files
from onnxcam.files import TEMP_PATTERN, atomic_write, atomic_write_bytes, sweep_stale_temporaries

ROOT = Path(__file__).resolve().parents[1]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_interrupt_right_after_the_temporary_is_created_leaves_nothing(tmp_path, monkeypatch):
    """The race of mkstemp-then-try: the signal lands once the file exists but before the
    writer could know its name. The name is now known before the file is created."""
    real_open = os.open

    def open_then_interrupt(path, flags, mode=0o777):
        real_open(path, flags, mode)  # the file now exists
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "open", open_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "out.png", b"data")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_the_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"old")

    def write(stream):
        stream.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write)
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"] and target.read_bytes() == b"old"


def test_mode_is_applied_and_temporaries_match_our_pattern(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (seen.append(Path(a).name), real_replace(a, b)))
    atomic_write_bytes(tmp_path / "x.onnx", b"1", mode=0o600)
    assert (tmp_path / "x.onnx").stat().st_mode & 0o777 == 0o600
    assert len(seen) == 1 and TEMP_PATTERN.match(seen[0]), seen


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from onnxcam import files
    if sys.argv[2] == "handler":
        files.remove_temporaries_on_signal()
    folder = Path(sys.argv[1])
    def write(stream):
        stream.write(b"x" * (1 << 20))
        stream.flush()
        (folder / "started").write_text("1")
        time.sleep(60)
    files.atomic_write(folder / "big.bin", write)
""")


def _start_slow_writer(folder: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(folder), mode], env=env)
    deadline = time.time() + 60
    while not (folder / "started").exists():
        assert process.poll() is None and time.time() < deadline, "the writer did not start"
        time.sleep(0.05)
    (folder / "started").unlink()
    return process


def test_sigterm_during_a_write_removes_the_temporary(tmp_path):
    process = _start_slow_writer(tmp_path, "handler")
    assert len(_leftovers(tmp_path)) == 1  # mid-write: the temporary exists
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temporary_is_swept_once_stale(tmp_path):
    process = _start_slow_writer(tmp_path, "plain")
    process.send_signal(signal.SIGKILL)  # nothing runs: the temporary stays
    process.wait(timeout=60)
    left = _leftovers(tmp_path)
    assert len(left) == 1
    other = tmp_path / ".notes.txt.abc.tmp"  # not our pattern: never touched
    other.write_text("keep")
    assert sweep_stale_temporaries(tmp_path, force=True) == []  # fresh: may be a live writer
    old = time.time() - files.STALE_SECONDS - 60
    for name in (left[0], other.name):
        os.utime(tmp_path / name, (old, old))
    # The next write into the folder (a new process: force stands for it) sweeps it.
    assert sweep_stale_temporaries(tmp_path, force=True) == left
    assert _leftovers(tmp_path) == [other.name]


def test_a_handler_the_application_installed_is_left_alone():
    previous = signal.getsignal(signal.SIGTERM)
    marker = lambda *_: None  # noqa: E731
    signal.signal(signal.SIGTERM, marker)
    try:
        files.remove_temporaries_on_signal()
        assert signal.getsignal(signal.SIGTERM) is marker
    finally:
        signal.signal(signal.SIGTERM, previous)
