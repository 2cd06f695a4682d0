"""Engine-level behaviour of the autodiff: several ``wrt`` tensors at once, accumulation where
a tensor fans out, integer/shape subgraphs left alone, missing rules all reported at once,
strictness where a rule cannot supply a gradient, and the guided-ReLU swap.

Gradients are checked against float64 central differences (tests/autodiff_reference.py).
The gradient with respect to an *intermediate* tensor A is checked through a zero graph input
``delta`` added to A: d F / d delta = d F / d A at delta = 0."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from onnxcam.autodiff import RULES, Emitter, Rule, build_gradients, guided_relu, plan
from onnxcam.autodiff.opset import upgrade
from onnxcam.errors import UnsupportedOpError
from onnxcam.model import with_shapes
from tests.autodiff_reference import (DISABLE_ALL, Functional, Input, check_vjp, directional_error,
                                      distinct, engine_gradients, graph_model, normal, ort_session)

I64 = np.int64


def _conv_net(delta_shape=(2, 4, 6, 6)):
    """x -> Conv -> Relu -> [+ delta] ('n2' = A + delta, A = 'n1') -> Conv s2 -> GAP -> Flatten
    -> Gemm -> y."""
    args = [Input(normal((2, 3, 6, 6))), normal((4, 3, 3, 3), 1, 0.5), Input(np.zeros(delta_shape, np.float32)),
            normal((5, 4, 3, 3), 2, 0.5), normal((7, 5), 3, 0.5)]
    nodes = [("Conv", [0, 1], dict(pads=[1, 1, 1, 1]), 1), ("Relu", ["n0"], {}, 1), ("Add", ["n1", 2], {}, 1),
             ("Conv", ["n2", 3], dict(strides=[2, 2]), 1), ("GlobalAveragePool", ["n3"], {}, 1),
             ("Flatten", ["n4"], {}, 1), ("Gemm", ["n5", 4], dict(transB=1), 1)]
    return graph_model(nodes, args)


def test_gradients_for_a_layer_and_the_input_in_one_graph():
    model, feeds = _conv_net()
    rng = np.random.default_rng(0)
    seed = rng.standard_normal((2, 7))
    grad_a, grad_x = engine_gradients(model, feeds, ["n1", "x0"], seed)
    functional = Functional(model, seed)
    for fed, grad in (("x2", grad_a), ("x0", grad_x)):  # A is checked through delta = x2
        error, scale = directional_error(functional, feeds, fed, grad, 3, 1e-5, rng)
        assert error <= 2e-4 * scale, fed
    # The same gradients as built one at a time: wrt tensors do not disturb each other.
    alone = engine_gradients(model, feeds, ["n1"], seed)[0]
    np.testing.assert_allclose(grad_a, alone, rtol=1e-6, atol=1e-7)


def test_residual_add_accumulates_both_branches():
    """y = Conv(Relu(Conv(x))) + x: x reaches y twice."""
    args = [Input(normal((1, 3, 5, 5))), normal((3, 3, 3, 3), 1, 0.4), normal((3, 3, 1, 1), 2, 0.4)]
    nodes = [("Conv", [0, 1], dict(pads=[1, 1, 1, 1]), 1), ("Relu", ["n0"], {}, 1),
             ("Conv", ["n1", 2], {}, 1), ("Add", ["n2", 0], {}, 1)]
    check_vjp(*graph_model(nodes, args))


def test_silu_fan_out_accumulates():
    """x * sigmoid(x): d/dx = s + x s (1 - s), the sum of both paths."""
    model, feeds = graph_model([("Sigmoid", [0], {}, 1), ("Mul", [0, "n0"], {}, 1)], [Input(normal((2, 5)))])
    grads = check_vjp(model, feeds)
    seed = np.random.default_rng(0).standard_normal((2, 5))  # the seed check_vjp drew first
    s = 1 / (1 + np.exp(-feeds["x0"].astype(np.float64)))
    np.testing.assert_allclose(grads["x0"], seed * (s + feeds["x0"] * s * (1 - s)), rtol=1e-5, atol=1e-6)


def test_integer_and_shape_subgraphs_are_ignored():
    """A Reshape target computed by Shape/Gather/Concat, an ArgMax feeding GatherElements'
    indices and a float->int->float Cast round trip: only float data paths are
    differentiated (the round trip is piecewise constant: gradient 0)."""
    args = [Input(normal((2, 3, 4))), np.array([0], I64), np.array([-1], I64)]
    nodes = [("Shape", [0], {}, 1), ("Gather", ["n0", 1], dict(axis=0), 1),          # n1 = [N]
             ("Concat", ["n1", 2], dict(axis=0), 1), ("Reshape", [0, "n2"], {}, 1),   # n3 [N, 12]
             ("ArgMax", ["n3"], dict(axis=1, keepdims=1), 1),                          # n4 [N, 1] int
             ("GatherElements", ["n3", "n4"], dict(axis=1), 1),                        # n5 row max
             ("Cast", ["n3"], dict(to=6), 1), ("Cast", ["n6"], dict(to=1), 1),         # n7 via int32
             ("Add", ["n5", "n7"], {}, 1), ("Tanh", ["n8"], {}, 1)]
    model, feeds = graph_model(nodes, args)
    graph = gs.import_onnx(with_shapes(model))
    tensors = graph.tensors()
    path = plan([tensors["x0"]], tensors["y"])
    assert [n.op for n in path.nodes] == ["Reshape", "GatherElements", "Add", "Tanh"]
    assert path.missing == []
    check_vjp(model, feeds)


def test_every_node_without_a_rule_is_reported_at_once():
    """Two path nodes without rules are both named; one off the path is not."""
    args = [Input(normal((2, 5)))]
    nodes = [("Hardmax", [0], {}, 1), ("Cos", [0], {}, 1), ("Sin", [0], {}, 1),
             ("Add", ["n0", "n1"], {}, 1)]                                             # Sin is unused
    model, feeds = graph_model(nodes, args)
    with pytest.raises(UnsupportedOpError) as info:
        engine_gradients(model, feeds, ["x0"], np.ones((2, 5)))
    assert sorted(info.value.nodes) == [("Cos", "cos_1"), ("Hardmax", "hardmax_0")]
    message = str(info.value)
    assert "hardmax_0" in message and "cos_1" in message and "sin_2" not in message


def test_a_rule_without_a_gradient_for_an_input_on_the_path_is_an_error():
    """An input on the path that the rule leaves without a gradient is refused by the engine,
    never a silent zero."""
    model, feeds = graph_model([("Mul", [0, 1], {}, 1)], [Input(normal((2, 3))), Input(normal((2, 3)))])
    half_rule = {**RULES, "Mul": Rule(lambda ctx: [ctx.g])}
    with pytest.raises(UnsupportedOpError, match=r"input 1 \('x1'\)") as info:
        engine_gradients(model, feeds, ["x0", "x1"], np.ones((2, 3)), rules=half_rule)
    assert info.value.nodes == [("Mul", "mul_0")]
    assert engine_gradients(model, feeds, ["x0"], np.ones((2, 3)), rules=half_rule)[0].shape == (2, 3)


def test_a_gradient_reaching_an_unhandled_output_is_an_error():
    """LayerNormalization's Mean output used downstream: its rule only covers Y."""
    args = [Input(normal((2, 6))), np.ones(6, np.float32), np.zeros(6, np.float32)]
    nodes = [("LayerNormalization", [0, 1, 2], dict(axis=-1), 2), ("Add", ["n0", "n0_1"], {}, 1)]
    model, feeds = graph_model(nodes, args, opset=17)
    with pytest.raises(UnsupportedOpError, match="first output"):
        engine_gradients(model, feeds, ["x0"], np.ones((2, 6)))


def test_unreachable_wrt_gets_zeros_and_the_output_gets_the_seed():
    model, feeds = graph_model([("Relu", [0], {}, 1), ("Neg", [1], {}, 1), ("Add", ["n0", "n1"], {}, 1)],
                               [Input(distinct((2, 3))), Input(normal((2, 3)))])
    seed = np.random.default_rng(1).standard_normal((2, 3))
    at_output, at_relu = engine_gradients(model, feeds, ["y", "n0"], seed)
    np.testing.assert_allclose(at_output, seed.astype(np.float32))
    np.testing.assert_allclose(at_relu, seed.astype(np.float32))
    # x1 only feeds a node whose output is not on a path from x0: not reached from x0.
    graph = gs.import_onnx(with_shapes(model))
    tensors = graph.tensors()
    emitter = Emitter(graph, 13)
    grads = build_gradients(emitter, tensors["n0"], gs.Variable("s", np.float32, [2, 3]), [tensors["x1"]])
    assert grads[0].inputs[0].op == "Mul"  # zeros_like: nothing on a path


def _guided_vs_plain(model, feeds, seed):
    guided_rules = {**RULES, "Relu": Rule(guided_relu)}
    plain = engine_gradients(model, feeds, ["x0"], seed)[0]
    guided = engine_gradients(model, feeds, ["x0"], seed, rules=guided_rules)[0]
    return plain, guided


def test_guided_relu_zeroes_negative_gradients_at_relus_only():
    """y = Relu(Relu(x) * w): guided backprop keeps g only where both the forward input and
    the incoming gradient are positive, at each Relu; the Mul in between is untouched."""
    x = distinct((3, 8))
    weight = np.where(np.arange(8) % 2, 1.5, -0.7).astype(np.float32)
    model, feeds = graph_model([("Relu", [0], {}, 1), ("Mul", ["n0", 1], {}, 1), ("Relu", ["n1"], {}, 1)],
                               [Input(x), weight])
    seed = np.random.default_rng(2).standard_normal((3, 8)).astype(np.float32)
    plain, guided = _guided_vs_plain(model, feeds, seed)
    hidden = np.maximum(x, 0) * weight
    g_hidden = seed * (hidden > 0) * (seed > 0)          # guided at the outer Relu
    g_relu_out = g_hidden * weight                       # plain Mul
    expected = g_relu_out * (x > 0) * (g_relu_out > 0)   # guided at the inner Relu
    np.testing.assert_allclose(guided, expected, rtol=1e-6)
    np.testing.assert_allclose(plain, seed * (hidden > 0) * weight * (x > 0), rtol=1e-6)
    assert not np.allclose(plain, guided)


def test_guided_relu_leaves_other_rectifiers_alone():
    """Only the Relu rule is swapped: LeakyRelu and Clip gradients are unchanged."""
    model, feeds = graph_model([("LeakyRelu", [0], dict(alpha=0.2), 1), ("Clip", ["n0", 1, 2], {}, 1)],
                               [Input(distinct((4, 5))), np.float32(-0.2), np.float32(0.3)])
    seed = np.random.default_rng(3).standard_normal((4, 5))
    plain, guided = _guided_vs_plain(model, feeds, seed)
    np.testing.assert_array_equal(plain, guided)


def test_optimization_level_does_not_change_the_gradient():
    model, feeds = _conv_net()
    seed = np.random.default_rng(4).standard_normal((2, 7))
    enabled = engine_gradients(model, feeds, ["n1", "x0"], seed)
    disabled = engine_gradients(model, feeds, ["n1", "x0"], seed, optimization=DISABLE_ALL)
    for a, b in zip(enabled, disabled):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


LEGACY_RESIZES = [(op, opset, mode, scales) for op, opset in (("Upsample", 9), ("Resize", 10))
                  for mode in ("nearest", "linear")
                  for scales in ((1, 1, 2, 3), (1, 1, 1.3, 1.7), (1, 1, 0.6, 0.8))
                  if op == "Resize" or min(scales) >= 1]  # Upsample only upsamples


@pytest.mark.parametrize("op, opset, mode, scales", LEGACY_RESIZES)
def test_upgrade_keeps_legacy_resize_semantics(op, opset, mode, scales):
    """onnx's version converter alone turns Resize-10's asymmetric resampling into half_pixel;
    the upgrade the autodiff relies on must give onnxruntime's forward result unchanged."""
    model, feeds = graph_model([(op, [0, 1], dict(mode=mode), 1)],
                               [Input(normal((1, 2, 7, 9))), np.array(scales, np.float32)], opset=opset)
    before = ort_session(model).run(None, feeds)[0]
    after = ort_session(upgrade(model, 16)).run(None, feeds)[0]
    np.testing.assert_array_equal(before, after)
