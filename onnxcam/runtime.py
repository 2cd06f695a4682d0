"""Stage 3: run rewritten models with onnxruntime, on CUDA where it really works.

``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU, and creating a
session with it there logs a loud error before falling back to CPU. So CUDA is probed once,
quietly: only when the CUDA driver library loads at all is a tiny session tried, with
onnxruntime's logging silenced, and the providers that session really got decide.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from . import large_models
from .errors import OnnxcamError
from .model import first_line

Provider = Literal["auto", "cpu", "cuda"]
_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when onnxruntime can really run a node on a CUDA device here."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False  # no driver: onnxruntime would only log an error and fall back
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["x"], ["y"])], "probe",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]),
        opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options,
                                       providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        session.run(None, {"x": np.ones(1, np.float32)})
    except Exception:  # noqa: BLE001 - any failure means CUDA is not usable
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def resolve_provider(provider: str) -> str:
    """'auto' -> 'cuda' when usable else 'cpu'; 'cuda' without CUDA is an error."""
    provider = provider.lower()
    if provider not in ("auto", "cpu", "cuda"):
        raise OnnxcamError(f"unknown provider '{provider}': use auto, cpu or cuda")
    if provider == "auto":
        return "cuda" if cuda_usable() else "cpu"
    if provider == "cuda" and not cuda_usable():
        raise OnnxcamError("provider 'cuda' requested but CUDA is not usable here (no GPU, driver "
                           "or onnxruntime-gpu); use --provider cpu or auto")
    return provider


class Session:
    """An onnxruntime session plus the provider it actually runs on."""

    def __init__(self, model: onnx.ModelProto | bytes | str, provider: str = "auto",
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 threads: int = 0, prepack: bool = True):
        wanted = resolve_provider(provider)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = optimization
        if threads:
            options.intra_op_num_threads = threads
        if not prepack:
            # Each Gemm/MatMul kernel keeps its own packed copy of its weight; in a gradient
            # graph the forward and the backward node read the same one, so it was packed
            # twice (vgg16: +500 MiB); at batch 1 unpacked was no slower, at batch 5 up to 2x slower
            options.add_session_config_entry("session.disable_prepacking", "1")
        providers = [_NAMES[wanted]] + (["CPUExecutionProvider"] if wanted != "cpu" else [])
        try:
            self.session = (large_models.session(model, options, providers)
                            if isinstance(model, onnx.ModelProto)
                            else ort.InferenceSession(model, options, providers=providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise OnnxcamError(f"onnxruntime cannot load the model: {first_line(exc)}") from None
        used = self.session.get_providers()[0]
        self.provider = {v: k for k, v in _NAMES.items()}.get(used, used)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run and return the requested outputs by name; errors come back as one line."""
        names = outputs or self.output_names
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001
            raise OnnxcamError(f"onnxruntime failed to run the model: {first_line(exc)}") from None
        return dict(zip(names, values))
