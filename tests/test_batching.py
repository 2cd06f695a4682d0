"""Batches of any size, also for exports whose fixed batch cannot be made dynamic."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcam.explainer import Explainer
from onnxcam.surgery import RewriteRequest, rewrite
from tests.tiny_models import build_model


def _batch_folding_model() -> onnx.ModelProto:
    """Batch pinned to 1 and folded into a Reshape target ([4, 64]): a symbolic batch would
    break it, so the rewrite must notice and keep the batch static."""
    rng = np.random.default_rng(5)
    init = {
        "w": rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32),
        "fold": np.array([4, 64], np.int64),
        "head": rng.normal(0, 0.3, (64, 1)).astype(np.float32),
        "unfold": np.array([1, 4], np.int64),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("Reshape", ["features", "fold"], ["folded"]),
        helper.make_node("MatMul", ["folded", "head"], ["scores"]),
        helper.make_node("Reshape", ["scores", "unfold"], ["logits"]),
    ]
    model = build_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
        init, name="folding")
    return model


def test_unsafe_batch_stays_static_and_batches_are_looped():
    model = _batch_folding_model()
    assert not rewrite(model, RewriteRequest(("features",), "logits")).batch_dynamic
    explainer = Explainer(model, provider="cpu")
    x = np.random.default_rng(6).normal(size=(3, 3, 8, 8)).astype(np.float32)
    batched = explainer.explain(x)
    assert batched.heatmaps.shape == (3, 8, 8)
    for i in range(3):
        single = explainer.explain(x[i:i + 1])
        np.testing.assert_allclose(batched.heatmaps[i], single.heatmaps[0], atol=1e-6)
        np.testing.assert_array_equal(batched.targets[i], single.targets[0])


def test_dynamic_batch_model_keeps_a_dynamic_batch(tmp_path):
    from tests.tiny_models import conv_classifier
    rewritten = rewrite(conv_classifier(), RewriteRequest(("features",), "logits"))
    assert rewritten.batch_dynamic
    dims = rewritten.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"
