"""Small hand-built ONNX classifiers for tests: each exercises one situation (NCHW torch-like
export, NHWC tf2onnx-like export, no spatial activation, an op without a VJP rule)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def build_model(nodes, inputs, outputs, initializers, opset: int = 13, name: str = "tiny") -> onnx.ModelProto:
    """A checked single-graph model (IR 8, which onnxruntime accepts) from nodes and numpy initializers."""
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_classifier(classes: int = 5, size: int = 16, seed: int = 0, tail_op: str | None = None,
                    batch: int | str = "N", channels: int = 3) -> onnx.ModelProto:
    """input [N,channels,S,S] -> Conv3x3 -> Relu -> Conv3x3 s2 -> Clip(0,6) ['features'] ->
    [tail_op] -> GlobalAveragePool -> Flatten -> Gemm -> logits -> Softmax -> probs."""
    rng = np.random.default_rng(seed)
    init = {
        "w1": rng.normal(0, 0.4, (8, 3, 3, 3)).astype(np.float32)[:, :channels],
        "b1": rng.normal(0, 0.1, 8).astype(np.float32),
        "w2": rng.normal(0, 0.3, (12, 8, 3, 3)).astype(np.float32),
        "b2": rng.normal(0, 0.1, 12).astype(np.float32),
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
        "fc_w": rng.normal(0, 0.5, (classes, 12)).astype(np.float32),
        "fc_b": rng.normal(0, 0.1, classes).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["features"], name="relu6"),
    ]
    pooled_from = "features"
    if tail_op is not None:
        nodes.append(helper.make_node(tail_op, ["features"], ["tail"], name="odd_tail"))
        pooled_from = "tail"
    nodes += [
        helper.make_node("GlobalAveragePool", [pooled_from], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=1),
    ]
    return build_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, channels, size, size])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes])],
        init,
    )


def nhwc_classifier(classes: int = 4, size: int = 12, seed: int = 1) -> onnx.ModelProto:
    """A tf2onnx-style export: NHWC input, Transposes around the convolution, an NHWC
    activation 'act_nhwc' [N,S,S,6], then back to NCHW for pooling."""
    rng = np.random.default_rng(seed)
    init = {
        "w": rng.normal(0, 0.4, (6, 3, 3, 3)).astype(np.float32),
        "b": rng.normal(0, 0.1, 6).astype(np.float32),
        "fc": rng.normal(0, 0.5, (6, classes)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Transpose", ["input"], ["x_nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        helper.make_node("Conv", ["x_nchw", "w", "b"], ["conv"], name="conv", auto_pad="SAME_UPPER"),
        helper.make_node("Transpose", ["conv"], ["conv_nhwc"], perm=[0, 2, 3, 1], name="to_nhwc"),
        helper.make_node("Relu", ["conv_nhwc"], ["act_nhwc"], name="relu"),
        helper.make_node("Transpose", ["act_nhwc"], ["act_nchw"], perm=[0, 3, 1, 2], name="back"),
        helper.make_node("GlobalAveragePool", ["act_nchw"], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "fc"], ["logits"], name="fc"),
    ]
    return build_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        init,
    )


def mlp_classifier() -> onnx.ModelProto:
    """No spatial activation at all: Flatten -> Gemm."""
    rng = np.random.default_rng(2)
    init = {"w": rng.normal(size=(3, 48)).astype(np.float32)}
    nodes = [helper.make_node("Flatten", ["input"], ["flat"]),
             helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)]
    return build_model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        init,
    )
