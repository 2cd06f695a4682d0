"""On a machine with a usable CUDA device (tools/gpu_check.sh runs these): the maps on CUDA equal
the CPU's, the gradient runs on the GPU, the CLI and exported models run there too. Skipped,
with the probe's reason, everywhere else."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnxcam.cli import app
from onnxcam.explainer import Explainer
from onnxcam.export import export_explained
from onnxcam.runtime import cuda_status

pytestmark = pytest.mark.skipif(not cuda_status()[0], reason=f"no usable CUDA here: {cuda_status()[1]}")

#: cuDNN may pick TF32 convolutions and other summation orders: maps agree to a few 1e-3.
MAP_ATOL = 2e-2


def _batch(size: int = 128, n: int = 2) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def test_gradcam_on_cuda_equals_cpu_and_the_gradient_runs_on_the_gpu(mobilenet_small):
    x = _batch()
    cpu = Explainer(mobilenet_small, provider="cpu").explain(x)
    explainer = Explainer(mobilenet_small, provider="cuda")
    gpu = explainer.explain(x)
    assert gpu.provider == "cuda"
    np.testing.assert_array_equal(gpu.targets, cpu.targets)
    np.testing.assert_allclose(gpu.heatmaps, cpu.heatmaps, atol=MAP_ATOL)
    placement = explainer.prepared()[1].placement
    assert placement is not None and placement.nodes > 0 and placement.gradient_nodes > 0
    print(f"\nmobilenet_v1_0.25_128 on CUDA: {placement.describe()}")
    assert not placement.gradient_mostly_on_cpu, placement.describe()


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "scorecam", "ablationcam", "saliency",
                                    "guided-backprop", "eigencam", "cam"])
def test_methods_on_cuda_equal_cpu(mobilenet_small, method):
    x = _batch(n=1)
    cpu = Explainer(mobilenet_small, provider="cpu").explain(x, method)
    gpu = Explainer(mobilenet_small, provider="cuda").explain(x, method)
    assert gpu.provider == "cuda" and np.isfinite(gpu.heatmaps).all()
    np.testing.assert_allclose(gpu.heatmaps, cpu.heatmaps, atol=MAP_ATOL, err_msg=method)


def test_cli_explain_on_cuda(mobilenet_small, tmp_path):
    import cv2
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["explain", str(mobilenet_small), str(image), "-o", str(out),
                                      "--provider", "cuda", "--preset", "inception"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "results.json").read_text())[0]["provider"] == "cuda"


def test_an_exported_model_runs_on_cuda(mobilenet_small):
    exported = export_explained(mobilenet_small, "gradcam").SerializeToString()
    x = _batch(n=2)
    feeds = {ort.InferenceSession(exported, providers=["CPUExecutionProvider"]).get_inputs()[0].name: x,
             "target": np.array([-1, 3])}
    cpu = ort.InferenceSession(exported, providers=["CPUExecutionProvider"]).run(["heatmap"], feeds)[0]
    session = ort.InferenceSession(exported, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    np.testing.assert_allclose(session.run(["heatmap"], feeds)[0], cpu, atol=MAP_ATOL)
