r"""The first step of the backward pass as a row gather: the classifier's VJP for a sparse seed.

Every explanation starts the backward pass at the logits :math:`z = W x + b` of a linear
classifier (Gemm, MatMul, or a 1x1 Conv on a 1x1 map, then maybe Flatten/Reshape/Squeeze,
as TensorFlow and PyTorch export their heads), with the seed :math:`s` of
``score = sum(s * z)``. The general VJP :math:`\partial x = s W` reads all of :math:`W`:
1001 x 1280 floats on MobileNetV2, ~0.35 ms on one core, 5 % of its whole forward pass, for
what is almost always one class. onnxcam's seeds are one-hot (a class, the top-1) or have a
few nonzero entries (several targets, a top-k), so with ``C`` the classes any image's seed
weighs (``NonZero`` of :math:`\sum_n |s_n|`)

.. math:: \partial x = s_{:, C}\, W_{C, :}

needs only the rows :math:`W_C`: two ``Gather`` and a [N, |C|] x [|C|, F] MatMul. It is exact
for every seed (a dense one gathers every row: about twice the dense product, still right),
so it replaces the general VJP wherever the pattern is recognised; the engine then starts
from :math:`x` with this cotangent (:func:`onnxcam.autodiff.engine.build_gradients`).

Recognised only where nothing else can be meant: a chain of single-input nodes from the
logits back to the linear op, constant weights (an initializer, not a DequantizeLinear
output), static class and feature sizes, and no explained tensor inside the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .emitter import Emitter

#: Shape-only ops the logits may pass through after the linear op (class axis kept).
_RESHAPES = frozenset({"Identity", "Flatten", "Reshape", "Squeeze"})


@dataclass(frozen=True)
class Classifier:
    """The linear op the logits come from: its input ``x`` [N, F] (or [N, F, 1, 1] for a
    Conv), the constant ``weight`` whose ``class_axis`` indexes the classes, ``alpha``
    (Gemm's scale) and the tensors from the op's output to the logits."""

    x: gs.Variable
    weight: gs.Constant
    class_axis: int
    alpha: float
    chain: frozenset[str]

    def vjp(self, b: Emitter, seed: gs.Tensor) -> gs.Tensor:
        r""":math:`\partial x = s W` for the seed [N, C], from the rows of the classes ``C`` any
        image's seed weighs: :math:`s_{:, C} W_{C}` (the other columns of ``s`` are zero)."""
        weighed = b.reduce("ReduceL1", seed, [0], keepdims=False)  # [C]: |s| summed over images
        classes = b.reshape(b.op("NonZero", weighed), [-1])
        picks = b.op("Gather", seed, classes, axis=1)  # [N, |C|]
        rows = b.op("Gather", self.weight, classes, axis=self.class_axis)
        if self.class_axis == 1:
            rows = b.transpose(rows, [1, 0])
        elif len(self.weight.shape) > 2:  # a 1x1 Conv's [C, F, 1, 1]
            rows = b.reshape(rows, [-1, int(self.weight.shape[1])])
        dx = b.matmul(picks, rows)  # [N, F]
        if self.alpha != 1.0:
            dx = b.mul(dx, self.alpha)
        return b.reshape_like(dx, self.x) if len(self.x.shape) != 2 else dx


def find_classifier(logits: gs.Tensor, wrt: Sequence[gs.Tensor]) -> Classifier | None:
    """The linear classifier ``logits`` [N, C] come from, or None where the pattern is not
    certain (then the engine's general VJPs run from the logits)."""
    shape = logits.shape
    if shape is None or len(shape) != 2 or not _static(shape[1:]):
        return None
    classes = shape[1]
    chain, tensor = {logits.name}, logits
    explained = {t.name for t in wrt}
    while True:
        if len(tensor.inputs) != 1:
            return None
        node = tensor.inputs[0]
        if node.op in _RESHAPES or (node.op == "Add" and _bias_input(node) is not None):
            previous = node.inputs[0] if node.op != "Add" else _bias_input(node)
            if not _class_vector(previous, classes):
                return None
            chain.add(previous.name)
            tensor = previous
            continue
        found = _linear(node, tensor, classes)
        if found is None or chain & explained:
            return None
        return Classifier(*found, frozenset(chain))


def _static(dims) -> bool:
    return all(isinstance(d, int) and d > 0 for d in dims)


def _class_vector(tensor: gs.Tensor, classes: int) -> bool:
    """[N, C] or [N, C, 1, ..., 1]: the class axis second and nothing else but ones."""
    shape = tensor.shape
    return (isinstance(tensor, gs.Variable) and shape is not None and len(shape) >= 2
            and shape[1] == classes and all(d == 1 for d in shape[2:]))


def _bias_input(add: gs.Node) -> gs.Variable | None:
    """The variable input of ``add`` when the other is a constant that does not widen it (a
    bias: the output has the input's shape, so the gradient passes unchanged)."""
    if len(add.inputs) != 2:
        return None
    variables = [t for t in add.inputs if isinstance(t, gs.Variable)]
    constants = [t for t in add.inputs if isinstance(t, gs.Constant)]
    if len(variables) != 1 or len(constants) != 1:
        return None
    x, bias = variables[0], constants[0]
    if x.shape is None or add.outputs[0].shape is None or list(x.shape) != list(add.outputs[0].shape):
        return None
    # a constant with a batch axis of its own could widen a batch of 1 left symbolic
    widening = len(bias.shape) == len(x.shape) and bias.shape[0] != 1 and not isinstance(x.shape[0], int)
    return None if widening or len(bias.shape) > len(x.shape) else x


def _linear(node: gs.Node, output: gs.Tensor, classes: int):
    """(x, weight, class axis, alpha) for Gemm / MatMul / 1x1 Conv producing ``output``."""
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    x, weight = node.inputs[0], node.inputs[1]
    if not isinstance(x, gs.Variable) or x.shape is None or not _static(x.shape[1:]):
        return None
    w = weight.shape
    if node.op == "Gemm" and len(x.shape) == 2 and not node.attrs.get("transA", 0):
        axis = 0 if node.attrs.get("transB", 0) else 1
        if list(w) == ([classes, x.shape[1]] if axis == 0 else [x.shape[1], classes]):
            return x, weight, axis, float(node.attrs.get("alpha", 1.0))
    if node.op == "MatMul" and len(x.shape) == 2 and list(w) == [x.shape[1], classes]:
        return x, weight, 1, 1.0
    if (node.op == "Conv" and len(x.shape) >= 3 and all(d == 1 for d in x.shape[2:])
            and list(w) == [classes, x.shape[1]] + [1] * (len(x.shape) - 2)
            and node.attrs.get("group", 1) == 1 and not any(node.attrs.get("pads", []))
            and node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
            and output.shape is not None and all(d == 1 for d in output.shape[2:])):
        return x, weight, 0, 1.0
    return None
