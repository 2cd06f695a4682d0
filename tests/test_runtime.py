"""Provider selection: CUDA only when it really works (else why not), reported as used, quiet
otherwise; where nodes ran; threads for every session."""

from __future__ import annotations

import os

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxcam import runtime
from onnxcam.cli import app
from onnxcam.errors import OnnxcamError, OnnxcamWarning
from onnxcam.explainer import Explainer
from onnxcam.runtime import Placement, Session, cuda_usable, placement_from_profile, resolve_provider
from onnxcam.surgery import RewriteRequest, rewrite
from tests.tiny_models import conv_classifier


def test_auto_resolves_to_what_is_usable():
    assert resolve_provider("auto") == ("cuda" if cuda_usable() else "cpu")
    assert resolve_provider("CPU") == "cpu"


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(OnnxcamError, match="unknown provider 'tpu'"):
        resolve_provider("tpu")


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable CUDA device")
def test_cuda_requested_without_cuda_says_what_to_do():
    with pytest.raises(OnnxcamError, match="CUDA is not usable here.*--provider cpu"):
        resolve_provider("cuda")


def test_results_report_the_provider_actually_used(capfd):
    explainer = Explainer(conv_classifier(), provider="auto")
    result = explainer.explain(np.zeros((1, 3, 16, 16), np.float32))
    assert result.provider == resolve_provider("auto")
    assert Session(conv_classifier(), "cpu").provider == "cpu"
    # probing CUDA on a machine without it must not spill onnxruntime's provider errors
    assert "CUDAExecutionProvider" not in capfd.readouterr().err


def test_onnxruntime_load_failure_is_one_line():
    with pytest.raises(OnnxcamError, match="onnxruntime cannot load the model") as info:
        Session(b"not a model", "cpu")
    assert "\n" not in str(info.value)


# -- the CUDA probe: why it fails, silently ----------------------------------------------------

@pytest.fixture
def fresh_probe():
    """cuda_status() is computed once per process: recompute it inside the test, and forget
    the mocked answer after."""
    runtime.cuda_status.cache_clear()
    yield
    runtime.cuda_status.cache_clear()


class _FakeDriver:
    """libcuda's cuDriverGetVersion, reporting ``version`` (1000 * major + 10 * minor)."""

    def __init__(self, version: int):
        self.version = version

    def cuDriverGetVersion(self, pointer) -> int:  # noqa: N802 - the CUDA driver API's name
        pointer._obj.value = self.version
        return 0


def _sessions_created(monkeypatch) -> list[ort.SessionOptions]:
    created: list[ort.SessionOptions] = []
    real = ort.InferenceSession

    def record(model, options=None, *args, **kwargs):
        created.append(options)
        return real(model, options, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", record)
    return created


def test_no_driver_is_the_reason_given(fresh_probe, monkeypatch):
    monkeypatch.setattr(runtime, "_load_driver", lambda: "no NVIDIA driver: libcuda.so.1 cannot be loaded")
    assert runtime.cuda_status() == (False, "no NVIDIA driver: libcuda.so.1 cannot be loaded")
    with pytest.raises(OnnxcamError, match="CUDA is not usable here: no NVIDIA driver: libcuda.so.1.*--provider cpu"):
        resolve_provider("cuda")


def test_a_build_without_cuda_says_so(fresh_probe, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    usable, why = runtime.cuda_status()
    assert not usable and "no CUDA provider" in why and "onnxruntime-gpu" in why


def test_a_driver_too_old_for_the_build_is_a_cuda_major_mismatch(fresh_probe, monkeypatch):
    monkeypatch.setattr(runtime, "_load_driver", lambda: _FakeDriver(11080))
    monkeypatch.setattr(runtime, "_build_cuda_version", lambda: (12, 4))
    monkeypatch.setattr(runtime, "_probe_conv", lambda: pytest.fail("no probe after a version mismatch"))
    usable, why = runtime.cuda_status()
    assert not usable and "CUDA major version mismatch" in why
    assert "up to 11.8" in why and "built for CUDA 12.4" in why


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable CUDA device")
def test_a_missing_cuda_library_is_named_and_nothing_is_printed(fresh_probe, monkeypatch, capfd):
    """With a driver (faked) but without CUDA's libraries (this machine), the real probe runs:
    onnxruntime cannot create its CUDA provider, the reason names the missing library, and
    neither onnxruntime's logger nor preload_dlls prints anything."""
    build = runtime._build_cuda_version() or (12, 0)
    monkeypatch.setattr(runtime, "_load_driver", lambda: _FakeDriver(1000 * build[0] + 10 * build[1]))
    created = _sessions_created(monkeypatch)
    usable, why = runtime.cuda_status()
    assert not usable
    assert "CUDA provider" in why and ".so" in why and "cannot open shared object file" in why, why
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured
    assert created and all(o.intra_op_num_threads == 1 for o in created)  # the probe: one thread


def test_preload_dlls_is_called_and_its_output_kept(monkeypatch, capfd):
    calls = []

    def preload():
        calls.append(1)
        print("Failed to load libcudnn.so.9: cannot open shared object file")
        print("Please follow https://onnxruntime.ai/docs/install/ to install CUDA.")

    monkeypatch.setattr(ort, "preload_dlls", preload, raising=False)
    assert runtime._preload_dlls() == ["Failed to load libcudnn.so.9: cannot open shared object file"]
    assert calls == [1] and capfd.readouterr().out == ""
    monkeypatch.delattr(ort, "preload_dlls")
    assert runtime._preload_dlls() == []  # older onnxruntime: nothing to call


def test_the_probe_runs_a_conv():
    model = runtime._probe_model()
    assert [n.op_type for n in model.graph.node][0] == "Conv"
    assert Session(model, "cpu").run({"x": np.ones((1, 1, 8, 8), np.float32)})["y"].max() == 9.0


# -- where nodes ran ----------------------------------------------------------------------------

def _event(name: str, provider: str, op: str) -> dict:
    return {"cat": "Node", "name": f"{name}_kernel_time", "args": {"provider": provider, "op_name": op}}


def test_placement_counts_distinct_nodes_per_provider():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    events = [
        {"cat": "Session", "name": "model_run", "args": {}},
        _event("conv1", cuda, "Conv"), _event("conv1", cuda, "Conv"),  # two runs: one node
        {"cat": "Node", "name": "conv1_fence_before", "args": {"provider": cpu}},  # not a kernel
        _event("shape", cpu, "Shape"),
        _event("onnxcam/Mul_3", cuda, "Mul"),
        _event("onnxcam/ScatterElements_7", cpu, "ScatterElements"),
        _event("onnxcam/ScatterElements_9", cpu, "ScatterElements"),
    ]
    placement = placement_from_profile(events)
    assert placement == Placement(5, 3, 3, 2, {"Shape": 1, "ScatterElements": 2})
    assert placement.gradient_mostly_on_cpu
    assert "3 of 5 nodes ran on the CPU (2 of 3 gradient nodes): ScatterElements x2" in placement.describe()
    assert not Placement(5, 1, 3, 1).gradient_mostly_on_cpu and not Placement(2, 2, 0, 0).gradient_mostly_on_cpu


def test_a_profiled_session_counts_its_nodes_once_and_cleans_up(monkeypatch):
    model = rewrite(conv_classifier(), RewriteRequest(("features",), "logits")).model
    session = Session(model, "cpu", placement=True)
    folder = session._profile_folder
    feeds = {"input": np.zeros((1, 3, 16, 16), np.float32), "onnxcam_seed": np.zeros((1, 5), np.float32)}
    session.provider = "cuda"  # as if: every node of a "CUDA" session fell back to the CPU
    with pytest.warns(OnnxcamWarning, match="most of the gradient ran on the CPU"):
        session.run(feeds)
    placement = session.placement
    assert placement.nodes > 5 and placement.cpu == placement.nodes
    assert 0 < placement.gradient_nodes == placement.gradient_cpu
    assert not os.path.exists(folder)
    session.run(feeds)  # later runs are not profiled
    assert session.placement is placement
    assert Session(model, "cpu").placement is None  # CPU sessions are not profiled by default


# -- threads, and the provider checked first ------------------------------------------------------

def test_threads_apply_to_every_session(monkeypatch, tmp_path):
    created = _sessions_created(monkeypatch)
    explainer = Explainer(conv_classifier(), provider="cpu", threads=2, cache=False)
    x = np.zeros((1, 3, 16, 16), np.float32)
    for method in ("gradcam", "scorecam", "ablationcam", "saliency"):
        explainer.explain(x, method)
    explainer.explain(x, "gradcam", topk=2)  # the head
    assert len(created) >= 5 and {o.intra_op_num_threads for o in created} == {2}
    created.clear()
    onnx.save(conv_classifier(), tmp_path / "m.onnx")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((20, 20, 3), np.uint8))
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "m.onnx"), str(tmp_path / "a.png"), "-o",
                                      str(tmp_path / "out"), "--threads", "3", "--no-cache", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert created and {o.intra_op_num_threads for o in created} == {3}


@pytest.mark.skipif(cuda_usable(), reason="this machine has a usable CUDA device")
def test_an_unusable_provider_fails_before_images_and_the_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(cache))
    onnx.save(conv_classifier(), tmp_path / "m.onnx")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    result = CliRunner().invoke(app, ["explain", str(tmp_path / "m.onnx"), str(broken), "-o", str(tmp_path / "out"),
                                      "--provider", "cuda"])
    assert result.exit_code == 2 and "provider 'cuda' requested" in result.output
    assert "broken.jpg" not in result.output and not cache.exists()
    with pytest.raises(OnnxcamError, match="provider 'cuda' requested"):
        Explainer(conv_classifier(), provider="cuda")
