"""The classifier's VJP as a row gather (onnxcam.autodiff.classifier): recognised on the heads
exporters write, refused elsewhere, and exact: the gradients equal ``seed @ W`` computed in
numpy and the general VJPs' (the engine run from the logits) for one-hot, top-1, several-class
and dense seeds."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from onnxcam import surgery
from onnxcam.autodiff.classifier import find_classifier
from onnxcam.model import with_shapes
from onnxcam.surgery import GRAD_PREFIX, SEED, RewriteRequest, rewrite
from tests.tiny_models import build_model

CLASSES, FEATURES = 7, 6


def _head_model(tail: str, batch: int | str = "N") -> tuple[onnx.ModelProto, np.ndarray, float]:
    """input [N,3,8,8] -> Conv3x3 -> Relu ['features'] -> GlobalAveragePool ['pooled'] -> the
    ``tail`` classifier -> 'logits'. Returns the model, W as [C, F] and the scale alpha."""
    rng = np.random.default_rng(3)
    weight = rng.normal(0, 0.5, (CLASSES, FEATURES)).astype(np.float32)
    init = {"w1": rng.normal(0, 0.4, (FEATURES, 3, 3, 3)).astype(np.float32),
            "bias": rng.normal(0, 0.1, CLASSES).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["features"]),
             helper.make_node("GlobalAveragePool", ["features"], ["pooled"])]
    flatten = helper.make_node("Flatten", ["pooled"], ["flat"])
    alpha = 1.0
    if tail == "gemm_transB":  # torch's nn.Linear
        alpha = 0.7
        init["fc"] = weight
        nodes += [flatten, helper.make_node("Gemm", ["flat", "fc", "bias"], ["logits"], transB=1, alpha=alpha)]
    elif tail == "gemm":
        init["fc"] = weight.T.copy()
        nodes += [flatten, helper.make_node("Gemm", ["flat", "fc", "bias"], ["logits"])]
    elif tail == "matmul_add":  # tf2onnx's Dense
        init["fc"] = weight.T.copy()
        nodes += [flatten, helper.make_node("MatMul", ["flat", "fc"], ["mm"]),
                  helper.make_node("Add", ["mm", "bias"], ["logits"])]
    elif tail == "conv1x1_flatten":  # TF-slim MobileNets: Conv 1x1 -> Squeeze -> Identity
        init["fc"] = weight[:, :, None, None].copy()
        nodes += [helper.make_node("Conv", ["pooled", "fc", "bias"], ["head"]),
                  helper.make_node("Flatten", ["head"], ["squeezed"]),
                  helper.make_node("Identity", ["squeezed"], ["logits"])]
    elif tail == "conv1x1_squeeze_reshape":
        init["fc"] = weight[:, :, None, None].copy()
        init["axes"] = np.array([2, 3], np.int64)
        init["shape"] = np.array([-1, CLASSES], np.int64)
        nodes += [helper.make_node("Conv", ["pooled", "fc", "bias"], ["head"]),
                  helper.make_node("Squeeze", ["head", "axes"], ["squeezed"]),
                  helper.make_node("Reshape", ["squeezed", "shape"], ["logits"])]
    else:
        raise ValueError(tail)
    model = build_model(nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])],
                        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])], init)
    return model, weight, alpha


TAILS = ["gemm_transB", "gemm", "matmul_add", "conv1x1_flatten", "conv1x1_squeeze_reshape"]


def _graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(with_shapes(model))


def _run(model: onnx.ModelProto, layers: tuple[str, ...], seed: np.ndarray, x: np.ndarray) -> dict:
    rewritten = rewrite(model, RewriteRequest(layers, "logits", input_gradient=True))
    session = ort.InferenceSession(rewritten.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"input": x, SEED: seed})))
    return out


def _seeds(batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    one_hot = np.zeros((batch, CLASSES), np.float32)
    one_hot[np.arange(batch), np.arange(batch) % CLASSES] = 1
    several = np.zeros((batch, CLASSES), np.float32)
    several[:, [1, 4]] = [0.5, -2.0]
    mixed = rng.normal(size=(batch, CLASSES)).astype(np.float32)
    mixed[0] = 0  # top-1 for this row, dense for the others
    return {"one_hot": one_hot, "top1": np.zeros((batch, CLASSES), np.float32), "several": several,
            "dense": rng.normal(size=(batch, CLASSES)).astype(np.float32), "mixed": mixed}


@pytest.mark.parametrize("tail", TAILS)
def test_recognised_on_the_heads_exporters_write(tail):
    model, _, alpha = _head_model(tail)
    graph = _graph(model)
    found = find_classifier(graph.tensors()["logits"], [graph.tensors()["features"]])
    assert found is not None
    assert found.x.name == ("flat" if "conv" not in tail else "pooled")
    assert found.alpha == pytest.approx(alpha)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", ["one_hot", "top1", "several", "dense", "mixed"])
def test_gradients_equal_seed_times_weights_and_the_general_vjps(tail, kind, monkeypatch):
    model, weight, alpha = _head_model(tail)
    batch = 3
    x = np.random.default_rng(1).normal(size=(batch, 3, 8, 8)).astype(np.float32)
    seed = _seeds(batch)[kind]
    classifier_input = "flat" if "conv" not in tail else "pooled"
    found = []
    monkeypatch.setattr(surgery, "find_classifier", lambda *args: found.append(find_classifier(*args)) or found[-1])
    fast = _run(model, ("features", classifier_input), seed, x)
    assert found and found[-1] is not None  # the row gather was used

    effective = seed.copy()
    for row in np.flatnonzero(~seed.any(axis=1)):  # all-zero rows mean the top-1 class
        effective[row, np.argmax(fast["logits"][row])] = 1
    expected = alpha * effective.astype(np.float64) @ weight.astype(np.float64)
    got = fast[GRAD_PREFIX + classifier_input].reshape(batch, FEATURES)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

    monkeypatch.setattr(surgery, "find_classifier", lambda *args: None)
    general = _run(model, ("features", classifier_input), seed, x)
    for name in ("features", "input"):
        np.testing.assert_allclose(fast[GRAD_PREFIX + name], general[GRAD_PREFIX + name], rtol=1e-5, atol=1e-6)


def test_a_fixed_batch_and_a_seed_without_nonzero_entries():
    """Batch 1 as the shared MobileNets; a dense output of zeros gathers no row (nnz = 0)."""
    model, weight, _ = _head_model("conv1x1_flatten", batch=1)
    x = np.random.default_rng(2).normal(size=(1, 3, 8, 8)).astype(np.float32)
    seed = np.zeros((1, CLASSES), np.float32)
    seed[0, 3] = 2.0
    out = _run(model, ("features",), seed, x)
    np.testing.assert_allclose(out[GRAD_PREFIX + "input"].shape, x.shape)
    graph = _graph(model)
    classifier = find_classifier(graph.tensors()["logits"], [graph.tensors()["features"]])
    b = surgery.Emitter(graph, 13)
    empty = gs.Variable("empty_seed", np.float32, [1, CLASSES])
    graph.inputs.append(empty)
    dx = classifier.vjp(b, empty)
    dx.dtype, dx.name = np.float32, "dx"
    graph.outputs = [dx]
    graph.cleanup()
    built = gs.export_onnx(graph)
    built.ir_version = 8
    session = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: (np.zeros((1, CLASSES), np.float32) if i.name == "empty_seed" else x) for i in session.get_inputs()}
    (result,) = session.run(["dx"], feeds)
    assert result.shape == (1, FEATURES, 1, 1) and not result.any()


def test_refused_when_an_explained_tensor_is_inside_the_classifier_chain():
    model, _, _ = _head_model("conv1x1_flatten")
    graph = _graph(model)
    tensors = graph.tensors()
    assert find_classifier(tensors["logits"], [tensors["head"]]) is None
    assert find_classifier(tensors["logits"], [tensors["squeezed"]]) is None
    assert find_classifier(tensors["logits"], [tensors["pooled"]]) is not None


def test_refused_for_a_conv_on_a_map_and_for_quantized_weights():
    rng = np.random.default_rng(0)
    spatial = build_model(  # a 1x1 Conv on a 4x4 map, pooled after: not a classifier on a vector
        [helper.make_node("Conv", ["input", "w"], ["head"]),
         helper.make_node("GlobalAveragePool", ["head"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["logits"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        {"w": rng.normal(size=(5, 3, 1, 1)).astype(np.float32)})
    graph = _graph(spatial)
    assert find_classifier(graph.tensors()["logits"], [graph.tensors()["input"]]) is None

    quantized = build_model(  # weights from a DequantizeLinear: not an initializer to gather from
        [helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"]),
         helper.make_node("Gemm", ["input", "w"], ["logits"], transB=1)],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5])],
        {"wq": rng.integers(-5, 5, (5, 4)).astype(np.int8), "scale": np.array(0.1, np.float32)})
    graph = _graph(quantized)
    assert find_classifier(graph.tensors()["logits"], [graph.tensors()["input"]]) is None


@pytest.mark.parametrize("batch, found", [(2, True), ("N", False)])
def test_a_bias_with_a_batch_axis_only_where_the_batch_is_fixed(batch, found):
    """An Add of a [2, C] constant leaves a [2, C] input as it is (a bias), but would widen a
    symbolic batch of 1: refused there."""
    rng = np.random.default_rng(0)
    model = build_model(
        [helper.make_node("Gemm", ["input", "w"], ["mm"], transB=1),
         helper.make_node("Add", ["mm", "offsets"], ["logits"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 5])],
        {"w": rng.normal(size=(5, 4)).astype(np.float32), "offsets": rng.normal(size=(2, 5)).astype(np.float32)})
    graph = _graph(model)
    assert (find_classifier(graph.tensors()["logits"], [graph.tensors()["input"]]) is not None) == found
