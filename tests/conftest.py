"""Shared test fixtures: the ../shared material (skipped cleanly when absent) and an isolated
rewrite cache per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MOBILENET = SHARED / "models" / "mobilenet"


def shared_file(relative: str) -> Path:
    """A file from ../shared, or a skip naming what is missing (CI always has it)."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"../shared is absent here ({path} missing)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Rewrites go to a fresh cache, so tests never depend on (or pollute) the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ONNXCAM_CACHE_DIR", str(tmp_path_factory.mktemp("onnxcam-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def mobilenet_v2() -> Path:
    return shared_file("models/mobilenet/mobilenet_v2_1.0_224.onnx")


@pytest.fixture(scope="session")
def mobilenet_small() -> Path:
    return shared_file("models/mobilenet/mobilenet_v1_0.25_128.onnx")


@pytest.fixture(scope="session")
def imagenet_labels() -> list[str]:
    return shared_file("models/mobilenet/imagenet_labels.txt").read_text().splitlines()
