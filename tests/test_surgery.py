"""Graph surgery end to end: the gradient the rewritten model returns is checked against finite
differences of the *original* model (an independent computation), plus batch and cache."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnxcam.errors import OnnxcamWarning, UnsupportedOpError
from onnxcam.explainer import Explainer
from onnxcam.model import load_model
from onnxcam.cache import cache_dir, cached_rewrite
from onnxcam.surgery import SEED, RewriteRequest, rewrite
from tests.tiny_models import conv_classifier


def _to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forward model in float64, for a finite-difference reference free of float32 noise."""
    double = onnx.ModelProto()
    double.CopyFrom(model)
    for init in double.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32:
            init.CopyFrom(numpy_helper.from_array(array.astype(np.float64), init.name))
    for value in list(double.graph.input) + list(double.graph.output):
        if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            value.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    del double.graph.value_info[:]
    return double


def _score(evaluator, feeds: dict, output: str, seed: np.ndarray) -> float:
    return float((evaluator.run([output], feeds)[0] * seed).sum())


def test_layer_and_input_gradients_match_float64_finite_differences():
    model = conv_classifier()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 16, 16))
    seed = rng.normal(size=(2, 5))
    rewritten = rewrite(model, RewriteRequest(("r1",), "logits", input_gradient=True))
    session = ort.InferenceSession(rewritten.model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    out = dict(zip(names, session.run(None, {"input": x.astype(np.float32), SEED: seed.astype(np.float32)})))

    reference = ReferenceEvaluator(_to_float64(model))
    grad_x = out[rewritten.gradients["input"]]
    for _ in range(4):  # directional derivatives along random directions
        v = rng.normal(size=x.shape)
        eps = 1e-5
        fd = (_score(reference, {"input": x + eps * v}, "logits", seed)
              - _score(reference, {"input": x - eps * v}, "logits", seed)) / (2 * eps)
        assert float((grad_x * v).sum()) == pytest.approx(fd, rel=2e-4, abs=1e-5)

    # The layer gradient: cut the float64 model at 'r1' and differentiate the head.
    head = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(_to_float64(model))).extract_model(["r1"], ["logits"])
    head_eval = ReferenceEvaluator(head)
    activation = out["r1"].astype(np.float64)
    grad_a = out[rewritten.gradients["r1"]]
    for _ in range(4):
        v = rng.normal(size=activation.shape)
        eps = 1e-5
        fd = (_score(head_eval, {"r1": activation + eps * v}, "logits", seed)
              - _score(head_eval, {"r1": activation - eps * v}, "logits", seed)) / (2 * eps)
        assert float((grad_a * v).sum()) == pytest.approx(fd, rel=2e-4, abs=1e-5)


def test_mobilenet_layer_gradient_matches_finite_differences_of_its_head(mobilenet_small, tmp_path):
    """The head (GAP -> 1x1 Conv -> Flatten) is linear, so a float32 FD with eps=1 is exact."""
    explainer = Explainer(mobilenet_small, provider="cpu")
    layer = explainer.targets_layers[0].name
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    result = explainer.explain(x)
    head_path = tmp_path / "head.onnx"
    onnx.utils.extract_model(str(mobilenet_small), str(head_path), [layer], ["logits"])
    head = ort.InferenceSession(str(head_path), providers=["CPUExecutionProvider"])
    activation = result.activations[layer]
    target = int(result.targets[0])
    assert target == int(result.logits[0].argmax())
    rng = np.random.default_rng(2)
    for _ in range(3):
        v = rng.normal(size=activation.shape).astype(np.float32)
        plus = head.run(["logits"], {layer: activation + v})[0][0, target]
        minus = head.run(["logits"], {layer: activation - v})[0][0, target]
        directional = float((result.gradients[layer] * v).sum())
        assert directional == pytest.approx((plus - minus) / 2, rel=1e-3, abs=1e-4)


def test_zero_seed_means_top1_and_explicit_targets_are_honoured():
    explainer = Explainer(conv_classifier(), provider="cpu")
    x = np.random.default_rng(3).normal(size=(3, 3, 16, 16)).astype(np.float32)
    top1 = explainer.explain(x)
    chosen = explainer.explain(x, targets=top1.targets)
    other = explainer.explain(x, targets=[(t + 1) % 5 for t in top1.targets])
    np.testing.assert_array_equal(top1.targets, top1.logits.argmax(axis=1))
    np.testing.assert_allclose(top1.gradients["features"], chosen.gradients["features"])
    assert not np.allclose(top1.gradients["features"], other.gradients["features"])


def test_fixed_batch_export_becomes_dynamic_and_batches_agree(mobilenet_small):
    rewritten = rewrite(load_model(mobilenet_small),
                        RewriteRequest(("MobilenetV1/MobilenetV1/Conv2d_13_pointwise/Relu6",), "logits"))
    assert rewritten.batch_dynamic
    explainer = Explainer(mobilenet_small, provider="cpu")
    x = np.random.default_rng(4).uniform(-1, 1, (3, 3, 128, 128)).astype(np.float32)
    batched = explainer.explain(x)
    for i in range(3):
        single = explainer.explain(x[i:i + 1])
        np.testing.assert_allclose(batched.heatmaps[i], single.heatmaps[0], atol=1e-5)
        np.testing.assert_allclose(batched.logits[i], single.logits[0], rtol=1e-4, atol=1e-4)


def test_rewrites_are_cached_by_content_and_written_atomically(tmp_path):
    model = conv_classifier(seed=7)
    request = RewriteRequest(("features",), "logits")
    first, hit_first = cached_rewrite(model, request, directory=tmp_path)
    started = time.perf_counter()
    second, hit_second = cached_rewrite(model, request, directory=tmp_path)
    assert (hit_first, hit_second) == (False, True)
    assert second.gradients == first.gradients and second.batch_dynamic == first.batch_dynamic
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    # A different model (one weight changed) is a different entry.
    changed = conv_classifier(seed=8)
    _, hit_changed = cached_rewrite(changed, request, directory=tmp_path)
    assert not hit_changed and len(list(tmp_path.glob("*.onnx"))) == 2
    # A corrupt entry is rebuilt, not trusted.
    for entry in tmp_path.glob("*.onnx"):
        entry.write_bytes(b"garbage")
    with pytest.warns(OnnxcamWarning, match="rebuilding it"):
        rebuilt, hit = cached_rewrite(model, request, directory=tmp_path)
    assert not hit and rebuilt.gradients == first.gradients
    assert time.perf_counter() - started < 60


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXCAM_CACHE_DIR", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x"
    monkeypatch.delenv("ONNXCAM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "onnxcam"


def _op_without_rule() -> str:
    from onnxcam.autodiff import RULES
    return next(op for op in ("Softsign", "Celu", "Hardmax", "Mish") if op not in RULES)


def test_every_op_without_a_rule_is_named():
    op = _op_without_rule()
    with pytest.raises(UnsupportedOpError) as info:
        rewrite(conv_classifier(tail_op=op), RewriteRequest(("r1",), "logits"))
    assert info.value.nodes == [(op, "odd_tail")]
    assert op in str(info.value) and "odd_tail" in str(info.value)
    assert "layer 'tail'" in str(info.value)  # the API user also learns which layer works


def test_batch_dynamic_rewrites_only_reshapes_of_batched_data():
    """A Reshape whose target spells the batch as 1 becomes 0 (copy the batch); a Reshape of a
    weight with a leading 1 (the gradient graph reshapes kernels so) must keep it."""
    from onnx import TensorProto, helper

    from onnxcam.surgery import make_batch_dynamic

    shape = numpy_helper.from_array(np.array([1, 4, 3], np.int64), "shape")
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "weight")
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["xr"]),
             helper.make_node("Reshape", ["weight", "shape"], ["wr"]),
             helper.make_node("Add", ["xr", "wr"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 3])], [shape, weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    dynamic = make_batch_dynamic(model, "x")
    session = ort.InferenceSession(dynamic.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(3, 12)).astype(np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x.reshape(3, 4, 3) + 1.0)
