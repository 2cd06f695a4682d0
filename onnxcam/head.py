"""Read a classifier head from the graph: the linear map from pooled features to the logits.

CAM (Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016)
is defined for networks whose last spatial activation ``A`` is globally average-pooled and fed
to a linear classifier: ``y_c = sum_k W[c, k] mean_ij A_k + b_c``, and then
``M_c = sum_k W[c, k] A_k``. Here ``W`` is read from the graph by following the single path
from the layer to the logits:

    A -> [Identity | Dropout | Transpose]* -> GlobalAveragePool | ReduceMean(H, W) |
         AveragePool(kernel = H x W) -> [Flatten | Reshape | Squeeze | Unsqueeze | Identity |
         Dropout]* -> Gemm | MatMul | 1x1 Conv | BatchNormalization | Mul/Div by a constant |
         Add/Sub of a constant | Neg ... -> logits

Every linear step is composed into one matrix (C x K); constant additions (biases) are dropped,
as they shift every position of the map equally and vanish in its min-max normalization. Any
other op makes the head not CAM-able, and the error names it.
"""

from __future__ import annotations

import numpy as np
import onnx

from . import large_models
from .errors import OnnxcamError
from .model import ModelGraph

_PASS_SPATIAL = frozenset({"Identity", "Dropout"})
_PASS_VECTOR = frozenset({"Identity", "Dropout", "Flatten", "Reshape", "Squeeze", "Unsqueeze"})


def linear_head(graph: ModelGraph, layer: str, logits: str) -> np.ndarray:
    """``W`` (classes, channels) with ``logits = W @ mean_ij(A) + const`` for the layer ``A``.

    Raises :class:`OnnxcamError` naming the op that breaks the GAP -> linear pattern."""
    reader = _HeadReader(graph, layer, logits)
    return reader.read()


class _HeadReader:
    def __init__(self, graph: ModelGraph, layer: str, logits: str):
        self.graph, self.layer, self.logits = graph, layer, logits
        self.needed = graph.ancestors(logits)
        self.tensors: dict[str, onnx.TensorProto] = {t.name: t for t in graph.model.graph.initializer}
        for node in graph.model.graph.node:
            if node.op_type == "Constant" and node.attribute:
                value = onnx.helper.get_attribute_value(node.attribute[0])
                if isinstance(value, onnx.TensorProto):
                    self.tensors[node.output[0]] = value

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output (converted on demand), else None."""
        tensor = self.tensors.get(name)
        return None if tensor is None else large_models.array(tensor)

    def fail(self, node: onnx.NodeProto | None, why: str) -> OnnxcamError:
        where = f"{node.op_type} '{node.name}'" if node is not None else "the graph"
        return OnnxcamError(
            f"{self.graph.source}: CAM needs layer '{self.layer}' to be globally average-pooled into a "
            f"linear classifier, but {where} {why}; use gradcam (equal to CAM up to scale on such heads)")

    def next_node(self, tensor: str) -> onnx.NodeProto:
        """The one node on the way from ``tensor`` to the logits."""
        on_path = [n for n in self.graph.consumers.get(tensor, [])
                   if any(o in self.needed for o in n.output)]
        if len(on_path) != 1:
            raise self.fail(on_path[0] if on_path else None,
                            f"branches off '{tensor}'" if on_path else f"does not use '{tensor}'")
        return on_path[0]

    def read(self) -> np.ndarray:
        tensor, layout = self.layer, self.graph.layouts.get(self.layer, "NCHW")
        channels = self.graph.dims(self.layer)[layout.index("C")]
        # spatial part: up to the global average pool
        while True:
            if tensor == self.logits:
                raise self.fail(None, "reaches the logits without pooling")
            node = self.next_node(tensor)
            if node.op_type in _PASS_SPATIAL:
                tensor = node.output[0]
            elif node.op_type == "Transpose":
                perm = list(_attr(node, "perm", []))
                layout = "".join(layout[p] for p in perm)
                tensor = node.output[0]
            elif self.is_global_average(node, tensor, layout):
                tensor = node.output[0]
                break
            else:
                raise self.fail(node, f"follows '{tensor}' before any global average pool")
        # linear part: compose every step into one matrix
        matrix = np.eye(channels)
        while tensor != self.logits:
            node = self.next_node(tensor)
            matrix = self.compose(node, tensor, matrix)
            tensor = node.output[0]
        return matrix.astype(np.float32)

    def is_global_average(self, node: onnx.NodeProto, tensor: str, layout: str) -> bool:
        if node.op_type == "GlobalAveragePool":
            return layout == "NCHW" or self._raise(node, f"pools a {layout} tensor over the wrong axes")
        spatial = {layout.index("H"), layout.index("W")}
        if node.op_type == "ReduceMean":
            axes = _attr(node, "axes", None)
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = self.constant(node.input[1])
            axes = {int(a) % 4 for a in (axes if axes is not None else [])}
            return axes == spatial or self._raise(node, "averages over axes other than the spatial ones")
        if node.op_type == "AveragePool":
            dims = self.graph.dims(tensor) or ()
            kernel = list(_attr(node, "kernel_shape", []))
            full = layout == "NCHW" and len(dims) == 4 and kernel == [dims[2], dims[3]]
            padding = _attr(node, "auto_pad", b"NOTSET")
            no_pad = not any(_attr(node, "pads", [])) and padding in (b"NOTSET", "NOTSET", b"VALID", "VALID")
            return (full and no_pad) or self._raise(node, "is an average pool smaller than the feature map")
        return False

    def _raise(self, node: onnx.NodeProto, why: str) -> bool:
        raise self.fail(node, why)

    def constant_operand(self, node: onnx.NodeProto, tensor: str) -> tuple[np.ndarray, int]:
        """The constant input of a binary node and the position of ``tensor`` in it."""
        position = list(node.input).index(tensor)
        other = node.input[1 - position] if len(node.input) == 2 else None
        value = self.constant(other) if other is not None else None
        if value is None:
            raise self.fail(node, "combines the pooled features with a non-constant tensor")
        return value.astype(np.float64), position

    def compose(self, node: onnx.NodeProto, tensor: str, matrix: np.ndarray) -> np.ndarray:
        op = node.op_type
        if op in _PASS_VECTOR:
            return matrix
        if op == "Neg":
            return -matrix
        if op == "Gemm":
            if list(node.input).index(tensor) != 0 or _attr(node, "transA", 0):
                raise self.fail(node, "takes the features as its second or transposed operand")
            weight = self.constant(node.input[1])
            if weight is None:
                raise self.fail(node, "has a non-constant weight")
            weight = weight.astype(np.float64)
            weight = weight if _attr(node, "transB", 0) else weight.T
            return float(_attr(node, "alpha", 1.0)) * weight @ matrix
        if op == "MatMul":
            weight, position = self.constant_operand(node, tensor)
            if position != 0 or weight.ndim != 2:
                raise self.fail(node, "is not features @ constant matrix")
            return weight.T @ matrix
        if op == "Conv":
            weight = self.constant(node.input[1])
            if weight is None or weight.ndim != 4 or weight.shape[2:] != (1, 1) or _attr(node, "group", 1) != 1:
                raise self.fail(node, "is not a 1x1 convolution with constant weights")
            return weight[:, :, 0, 0].astype(np.float64) @ matrix
        if op == "BatchNormalization":
            scale, _, _, var = (self.constant(n) for n in node.input[1:5])
            if scale is None or var is None:
                raise self.fail(node, "has non-constant statistics")
            factor = scale / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))
            return factor.astype(np.float64)[:, None] * matrix
        if op in ("Add", "Sub"):
            _, position = self.constant_operand(node, tensor)  # a bias: drops out of the map
            return -matrix if op == "Sub" and position == 1 else matrix
        if op in ("Mul", "Div"):
            factor, position = self.constant_operand(node, tensor)
            if op == "Div" and position == 1:
                raise self.fail(node, "divides by the features")
            factor = factor.reshape(-1)
            if factor.size not in (1, matrix.shape[0]):
                raise self.fail(node, "scales the features by a non-broadcastable constant")
            factor = 1.0 / factor if op == "Div" else factor
            return factor[:, None] * matrix if factor.size > 1 else float(factor[0]) * matrix
        raise self.fail(node, "is not linear")


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default
