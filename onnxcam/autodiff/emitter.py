"""A small vocabulary for writing ONNX subgraphs so that VJP rules read like their maths.

``b.mul(g, b.mul(y, b.sub(1.0, y)))`` appends two Mul nodes and a Sub node to the graph and
returns the last output tensor. Python numbers become constants of the model's float type,
numpy arrays become constants of their own dtype, and every name is prefixed so that
nothing added can collide with the model's own tensors.

Everything emitted targets opset >= 13 (axes as inputs for ReduceSum/Squeeze/Unsqueeze,
Split sizes as an input); surgery upgrades older models before the engine runs. Where an op's
signature changed after 13 the emitter follows the model's opset: the other reductions take
``axes`` as an attribute before opset 18 and as an input from 18; ``Shape`` has ``start``/
``end`` only from 15; ScatterElements accumulates (``reduction``) only from 16.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

Tensor = gs.Tensor
Operand = "Tensor | float | int | np.ndarray"

#: First opset where each reduction takes ``axes`` as an input instead of an attribute.
_AXES_AS_INPUT = {"ReduceSum": 13}
_AXES_AS_INPUT_DEFAULT = 18


class Emitter:
    """Appends nodes to ``graph``; each method returns the new node's output tensor(s)."""

    def __init__(self, graph: gs.Graph, opset: int, float_dtype=np.float32, prefix: str = "onnxcam"):
        self.graph = graph
        self.opset = opset
        self.float_dtype = np.dtype(float_dtype)
        self.prefix = prefix
        self._ids = count()

    # -- plumbing -----------------------------------------------------------------------------
    def _name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._ids)}"

    def const(self, value, dtype=None) -> gs.Constant:
        """A constant tensor; floats default to the model's float type, ints to int64."""
        array = np.asarray(value)
        if dtype is not None:
            array = array.astype(dtype)
        elif array.dtype.kind == "f":
            array = array.astype(self.float_dtype)
        elif array.dtype.kind in "iub":
            array = array.astype(np.int64) if array.dtype.kind != "b" else array
        # np.array, not np.ascontiguousarray: that turns 0-d scalars into shape [1].
        return gs.Constant(self._name("const"), np.array(array, order="C"))

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return self.const(np.asarray(list(values), dtype=np.int64))

    def _operand(self, value) -> Tensor:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, (bool, np.bool_)):
            return self.const(np.asarray(value))
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self.const(np.asarray(float(value)))
        return self.const(value)

    def op(self, op_type: str, *inputs, outputs: int = 1, **attrs):
        """Emit one node. ``None`` inputs become ONNX's empty optional input."""
        ins = [gs.Variable.empty() if i is None else self._operand(i) for i in inputs]
        outs = [gs.Variable(self._name(op_type.lower())) for _ in range(outputs)]
        node = gs.Node(op_type, name=self._name(op_type), attrs=attrs, inputs=ins, outputs=outs)
        self.graph.nodes.append(node)
        return outs[0] if outputs == 1 else outs

    # -- arithmetic ---------------------------------------------------------------------------
    def add(self, a, b) -> Tensor: return self.op("Add", a, b)
    def sub(self, a, b) -> Tensor: return self.op("Sub", a, b)
    def mul(self, a, b) -> Tensor: return self.op("Mul", a, b)
    def div(self, a, b) -> Tensor: return self.op("Div", a, b)
    def neg(self, a) -> Tensor: return self.op("Neg", a)
    def exp(self, a) -> Tensor: return self.op("Exp", a)
    def sqrt(self, a) -> Tensor: return self.op("Sqrt", a)
    def pow(self, a, b) -> Tensor: return self.op("Pow", a, b)
    def abs(self, a) -> Tensor: return self.op("Abs", a)
    def sign(self, a) -> Tensor: return self.op("Sign", a)

    # -- comparisons and selection ------------------------------------------------------------
    def greater(self, a, b) -> Tensor: return self.op("Greater", a, b)
    def less(self, a, b) -> Tensor: return self.op("Less", a, b)
    def equal(self, a, b) -> Tensor: return self.op("Equal", a, b)
    def and_(self, a, b) -> Tensor: return self.op("And", a, b)
    def where(self, cond, a, b) -> Tensor: return self.op("Where", cond, a, b)

    def cast(self, a, to: int) -> Tensor: return self.op("Cast", a, to=to)

    def as_float(self, mask) -> Tensor:
        """A boolean mask (or integers) as the model's float type."""
        return self.cast(mask, helper.np_dtype_to_tensor_dtype(self.float_dtype))

    def as_int64(self, a) -> Tensor:
        return self.cast(a, helper.np_dtype_to_tensor_dtype(np.dtype(np.int64)))

    # -- elementwise functions ----------------------------------------------------------------
    def log(self, a) -> Tensor: return self.op("Log", a)
    def tanh(self, a) -> Tensor: return self.op("Tanh", a)
    def sigmoid(self, a) -> Tensor: return self.op("Sigmoid", a)
    def erf(self, a) -> Tensor: return self.op("Erf", a)
    def square(self, a) -> Tensor: return self.mul(a, a)

    # -- shapes -------------------------------------------------------------------------------
    def shape(self, a, start: int | None = None, end: int | None = None) -> Tensor:
        """Shape(a)[start:end]; a Slice of the Shape before opset 15 (no start/end there)."""
        if start is None and end is None:
            return self.op("Shape", a)
        if self.opset < 15:
            big = np.iinfo(np.int64).max
            return self.slice(self.op("Shape", a), [start or 0], [big if end is None else end], [0])
        attrs = {"start": start or 0}
        if end is not None:
            attrs["end"] = end
        return self.op("Shape", a, **attrs)

    def size(self, a) -> Tensor:
        """Number of elements, an int64 scalar."""
        return self.op("Size", a)

    def reshape(self, a, shape) -> Tensor:
        return self.op("Reshape", a, shape if isinstance(shape, Tensor) else self.ints(shape))

    def reshape_like(self, a, like: Tensor) -> Tensor:
        """``a`` reshaped to ``like``'s shape (static when known, so ORT can fold it)."""
        dims = like.shape
        if dims is not None and all(isinstance(d, int) and d >= 0 for d in dims):
            return self.reshape(a, list(dims))
        return self.reshape(a, self.shape(like))

    def expand(self, a, shape: Tensor) -> Tensor: return self.op("Expand", a, shape)

    def spread(self, a, like: gs.Tensor, axes: Sequence[int], factor: float = 1.0) -> Tensor:
        """``a`` (size 1 on ``axes``, like ``like`` elsewhere) times ``factor``, broadcast to
        ``like``'s shape. Where ``like``'s dims on ``axes`` are static this is one Mul by a
        constant of ``factor`` shaped 1 elsewhere: onnxruntime's Expand is ~4x slower than a
        broadcasting Mul for it (77 vs 19 us for MobileNetV2's [1, 1280, 7, 7] on one core)."""
        dims = list(like.shape) if like.shape is not None else None
        if dims is not None and all(isinstance(dims[i], (int, np.integer)) and dims[i] > 0 for i in axes):
            filler = [int(dims[i]) if i in axes else 1 for i in range(len(dims))]
            return self.mul(a, self.const(np.full(filler, factor, self.float_dtype)))
        scaled = a if factor == 1.0 else self.mul(a, factor)
        return self.expand(scaled, self.shape(like))
    def transpose(self, a, perm: Sequence[int]) -> Tensor: return self.op("Transpose", a, perm=list(perm))
    def unsqueeze(self, a, axes: Sequence[int]) -> Tensor: return self.op("Unsqueeze", a, self.ints(axes))
    def squeeze(self, a, axes: Sequence[int]) -> Tensor: return self.op("Squeeze", a, self.ints(axes))

    def concat(self, parts: Sequence, axis: int) -> Tensor:
        return self.op("Concat", *parts, axis=axis)

    def split(self, a, sizes: Sequence[int], axis: int) -> list[Tensor]:
        outs = self.op("Split", a, self.ints(sizes), axis=axis, outputs=len(sizes))
        return outs if isinstance(outs, list) else [outs]

    def slice(self, a, starts, ends, axes, steps=None) -> Tensor:
        args = [a, self.ints(starts), self.ints(ends), self.ints(axes)]
        if steps is not None:
            args.append(self.ints(steps))
        return self.op("Slice", *args)

    def pad(self, a, pads: Sequence[int] | Tensor) -> Tensor:
        """Zero padding; ``pads`` = [begin..., end...] (a constant list or an int64 tensor)."""
        return self.op("Pad", a, pads if isinstance(pads, Tensor) else self.ints(pads))

    def zeros_like(self, a) -> Tensor:
        return self.mul(a, 0.0)

    def zeros(self, shape: Tensor) -> Tensor:
        """A float zero tensor of the (1-D int64) ``shape``."""
        return self.full(shape, 0.0)

    def full(self, shape: Tensor, value: float) -> Tensor:
        """A float tensor of the (1-D int64) ``shape`` filled with ``value``."""
        filler = helper.make_tensor("value", helper.np_dtype_to_tensor_dtype(self.float_dtype), [1], [value])
        return self.op("ConstantOfShape", shape, value=filler)

    def range(self, start, limit, delta) -> Tensor:
        return self.op("Range", start, limit, delta)

    def scatter_add(self, data, indices, updates, axis: int = 0) -> Tensor:
        """ScatterElements with ``reduction="add"``: repeated indices accumulate (opset 16)."""
        if self.opset < 16:
            raise ValueError(f"ScatterElements reduction needs opset 16, the model has {self.opset}")
        return self.op("ScatterElements", data, indices, updates, axis=axis, reduction="add")

    # -- reductions ---------------------------------------------------------------------------
    def reduce(self, op_type: str, a, axes: Sequence[int] | None, keepdims: bool = True) -> Tensor:
        """``op_type`` (ReduceSum, ReduceMean, ...) over constant ``axes`` (None: all axes),
        with ``axes`` as an attribute or an input as the model's opset requires."""
        if axes is None:
            return self.op(op_type, a, keepdims=int(keepdims))
        if self.opset >= _AXES_AS_INPUT.get(op_type, _AXES_AS_INPUT_DEFAULT):
            return self.op(op_type, a, self.ints(axes), keepdims=int(keepdims))
        return self.op(op_type, a, axes=list(axes), keepdims=int(keepdims))

    def reduce_sum(self, a, axes: Sequence[int] | Tensor | None, keepdims: bool = True) -> Tensor:
        if isinstance(axes, Tensor):
            return self.op("ReduceSum", a, axes, keepdims=int(keepdims))
        return self.reduce("ReduceSum", a, axes, keepdims)

    def reduce_mean(self, a, axes: Sequence[int] | None, keepdims: bool = True) -> Tensor:
        return self.reduce("ReduceMean", a, axes, keepdims)

    # -- linear algebra -----------------------------------------------------------------------
    def matmul(self, a, b) -> Tensor: return self.op("MatMul", a, b)

    def gemm(self, a, b, trans_a: int = 0, trans_b: int = 0, alpha: float = 1.0) -> Tensor:
        return self.op("Gemm", a, b, transA=trans_a, transB=trans_b, alpha=float(alpha))

    def einsum(self, equation: str, *operands) -> Tensor:
        """One Einsum; the channel-weighted sum ``nk,nkhw->nhw`` of a map with static (h, w)
        as (N, 1, K) @ (N, K, h*w): onnxruntime's Einsum takes ~1.5x the MatMul's time for
        it (MobileNetV2's 1280 x 7 x 7 on one core)."""
        if equation == "nk,nkhw->nhw" and len(operands) == 2:
            weights, maps = operands
            dims = list(getattr(maps, "shape", None) or [])
            if len(dims) == 4 and all(isinstance(d, (int, np.integer)) and d > 0 for d in dims[2:]):
                flat = self.matmul(self.unsqueeze(weights, [1]), self.reshape(maps, [0, 0, -1]))
                return self.reshape(flat, [0, int(dims[2]), int(dims[3])])
        return self.op("Einsum", *operands, equation=equation)
