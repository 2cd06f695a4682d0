"""Provider selection: CUDA only when it really works, reported as used, quiet otherwise."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcam.errors import OnnxcamError
from onnxcam.explainer import Explainer
from onnxcam.runtime import Session, cuda_usable, resolve_provider
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
