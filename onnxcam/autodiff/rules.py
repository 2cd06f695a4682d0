"""Vector-Jacobian product rules: one small function per ONNX op.

A rule receives a :class:`VJP` context (the emitter ``b``, the forward node's inputs ``x`` and
outputs ``y``, the incoming gradient ``g`` of its first output, and ``needs(i)``: whether input
``i`` wants a gradient) and returns one gradient per input (``None`` where not needed).
Recipes follow ``docs/onnx-autodiff.md``; each was checked against float64 central finite
differences (``tests/test_autodiff_rules.py``).

Adding an op means adding one rule here and one case to the op grid in the tests.
Conventions that keep ORT fast: prefer the forward *output* (Relu reads ``y > 0``, which
keeps Conv+Relu fusion intact) and fold shapes into constants when they are static.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .emitter import Emitter, Tensor

#: Ops whose outputs carry no gradient (integer results, comparisons, shape plumbing).
NON_DIFFERENTIABLE = frozenset({
    "Shape", "Size", "NonZero", "ArgMax", "ArgMin", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "Not", "And", "Or", "Xor", "Range", "ConstantOfShape", "Constant",
    "IsNaN", "IsInf", "Sign", "Floor", "Ceil", "Round", "RandomNormalLike",
    "RandomUniformLike", "EyeLike", "OneHot",
})


@dataclass
class VJP:
    """Everything a rule sees of one forward node during the backward pass."""

    b: Emitter
    node: gs.Node
    grads: list[Tensor | None]
    wants: list[bool]

    @property
    def g(self) -> Tensor:
        return self.grads[0]

    @property
    def x(self) -> list[gs.Tensor]:
        return self.node.inputs

    @property
    def y(self) -> list[gs.Tensor]:
        return self.node.outputs

    def needs(self, index: int) -> bool:
        return index < len(self.wants) and self.wants[index]

    def attr(self, name: str, default=None):
        return self.node.attrs.get(name, default)

    def const_input(self, index: int) -> np.ndarray | None:
        """The value of input ``index`` when it is a constant, else None."""
        if index >= len(self.x):
            return None
        tensor = self.x[index]
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


@dataclass(frozen=True)
class Rule:
    fn: Callable[[VJP], Sequence[Tensor | None]]
    min_opset: int = 13

    def __call__(self, ctx: VJP) -> Sequence[Tensor | None]:
        return self.fn(ctx)


RULES: dict[str, Rule] = {}


def rule(*op_types: str, min_opset: int = 13):
    """Register ``fn`` as the VJP of ``op_types``."""
    def register(fn):
        for op in op_types:
            RULES[op] = Rule(fn, min_opset)
        return fn
    return register


# -- helpers shared by rules ------------------------------------------------------------------

def static_shape(tensor: gs.Tensor) -> list | None:
    shape = tensor.shape
    return list(shape) if shape is not None else None


def unbroadcast(b: Emitter, grad: Tensor, like: gs.Tensor, out: gs.Tensor) -> Tensor:
    """Sum ``grad`` (shaped like ``out``) over the axes ``like`` was broadcast along."""
    like_shape, out_shape = static_shape(like), static_shape(out)
    if like_shape is not None and out_shape is not None and None not in like_shape + out_shape:
        if like_shape == out_shape:
            return grad
        lead = len(out_shape) - len(like_shape)
        axes = list(range(lead)) + [
            lead + i for i, d in enumerate(like_shape) if d == 1 and out_shape[lead + i] != 1
        ]
        summed = b.reduce_sum(grad, axes, keepdims=True) if axes else grad
        return b.reshape_like(summed, like)
    # Dynamic shapes: broadcast axes are those where like's (left-padded) shape is 1.
    rank_out = len(out_shape) if out_shape is not None else None
    rank_like = len(like_shape) if like_shape is not None else None
    if rank_out is None or rank_like is None:
        raise NotImplementedError("broadcast gradient needs known ranks")
    padded = b.concat([b.ints([1] * (rank_out - rank_like)), b.shape(like)], axis=0) \
        if rank_out > rank_like else b.shape(like)
    axes = b.reshape(b.op("NonZero", b.equal(padded, b.ints([1]))), [-1])
    summed = b.op("ReduceSum", grad, axes, keepdims=1, noop_with_empty_axes=1)
    return b.reshape(summed, b.shape(like))


def spatial_pads(ctx: VJP, spatial_in: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> list[int]:
    """Explicit [begin..., end...] pads, resolving auto_pad (SAME_UPPER/LOWER, VALID)."""
    rank = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad in ("NOTSET", ""):
        return list(ctx.attr("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        return [0] * 2 * rank
    begins, ends = [], []
    for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def fit_spatial(b: Emitter, grad: Tensor, produced: Sequence[int], wanted: Sequence[int]) -> Tensor:
    """Crop or zero-pad the trailing spatial dims of ``grad`` from ``produced`` to ``wanted``."""
    rank = len(wanted)
    if list(produced) == list(wanted):
        return grad
    if any(p > w for p, w in zip(produced, wanted)):
        grad = b.slice(grad, [0] * rank, [min(p, w) for p, w in zip(produced, wanted)],
                       list(range(2, 2 + rank)))
    if any(p < w for p, w in zip(produced, wanted)):
        grad = b.pad(grad, [0] * (2 + rank) + [0, 0] + [max(w - p, 0) for p, w in zip(produced, wanted)])
    return grad


def transpose_conv(ctx: VJP, grad: Tensor, weight, x: gs.Tensor, group: int,
                   kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> Tensor:
    """Adjoint of a (grouped) convolution: ConvTranspose with the begin pads only, then
    crop/pad to the input size. Never ``output_shape``: it makes the spec ignore ``pads``."""
    b = ctx.b
    x_shape, g_shape = static_shape(x), static_shape(ctx.y[0])
    if x_shape is None or g_shape is None or not all(isinstance(d, int) for d in x_shape[2:] + g_shape[2:]):
        raise NotImplementedError(f"{ctx.node.op} gradient needs static spatial shapes")
    rank = len(kernel)
    pads = spatial_pads(ctx, x_shape[2:], kernel, strides, dilations)
    begins = pads[:rank]
    produced = [s * (o - 1) + d * (k - 1) + 1 - p
                for s, o, d, k, p in zip(strides, g_shape[2:], dilations, kernel, begins)]
    dx = b.op("ConvTranspose", grad, weight, group=group, strides=list(strides),
              dilations=list(dilations), pads=begins + [0] * rank)
    return fit_spatial(b, dx, produced, x_shape[2:])


def pool_geometry(ctx: VJP, x_shape: Sequence[int]) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(ctx.attr("kernel_shape"))
    rank = len(kernel)
    strides = list(ctx.attr("strides", [1] * rank))
    dilations = list(ctx.attr("dilations", [1] * rank))
    pads = spatial_pads(ctx, x_shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads


# -- elementwise ------------------------------------------------------------------------------

@rule("Identity", "Dropout")
def _identity(ctx: VJP):
    return [ctx.g]


@rule("Relu")
def _relu(ctx: VJP):
    b = ctx.b
    return [b.where(b.greater(ctx.y[0], 0.0), ctx.g, 0.0)]


def guided_relu(ctx: VJP):
    """Guided backpropagation (Springenberg et al. 2015): also drop negative gradients."""
    b = ctx.b
    keep = b.and_(b.greater(ctx.y[0], 0.0), b.greater(ctx.g, 0.0))
    return [b.where(keep, ctx.g, 0.0)]


@rule("LeakyRelu")
def _leaky_relu(ctx: VJP):
    b = ctx.b
    alpha = float(ctx.attr("alpha", 0.01))
    return [b.where(b.greater(ctx.x[0], 0.0), ctx.g, b.mul(ctx.g, alpha))]


@rule("Clip")
def _clip(ctx: VJP):
    # Strict inequalities, as torch's hardtanh/ReLU6 backward: the bounds get no gradient.
    b = ctx.b
    x = ctx.x[0]
    inside = None
    for index, compare in ((1, b.greater), (2, b.less)):
        if len(ctx.x) > index and ctx.x[index].name:
            test = compare(x, ctx.x[index])
            inside = test if inside is None else b.and_(inside, test)
    return [ctx.g if inside is None else b.where(inside, ctx.g, 0.0)]


@rule("Sigmoid")
def _sigmoid(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    return [b.mul(ctx.g, b.mul(y, b.sub(1.0, y)))]


@rule("Tanh")
def _tanh(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    return [b.mul(ctx.g, b.sub(1.0, b.mul(y, y)))]


@rule("HardSigmoid")
def _hard_sigmoid(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    z = b.add(b.mul(x, alpha), beta)
    inside = b.and_(b.greater(z, 0.0), b.less(z, 1.0))
    return [b.where(inside, b.mul(ctx.g, alpha), 0.0)]


@rule("HardSwish")
def _hard_swish(ctx: VJP):
    # d/dx x*relu6(x+3)/6 = 0 (x < -3), (2x+3)/6 (-3 <= x <= 3), 1 (x > 3), as torch.
    b, x = ctx.b, ctx.x[0]
    middle = b.add(b.mul(x, 1.0 / 3.0), 0.5)
    slope = b.where(b.less(x, -3.0), 0.0, b.where(b.greater(x, 3.0), 1.0, middle))
    return [b.mul(ctx.g, slope)]


@rule("Exp")
def _exp(ctx: VJP):
    return [ctx.b.mul(ctx.g, ctx.y[0])]


@rule("Log")
def _log(ctx: VJP):
    return [ctx.b.div(ctx.g, ctx.x[0])]


@rule("Sqrt")
def _sqrt(ctx: VJP):
    return [ctx.b.div(ctx.b.mul(ctx.g, 0.5), ctx.y[0])]


@rule("Neg")
def _neg(ctx: VJP):
    return [ctx.b.neg(ctx.g)]


@rule("Reciprocal")
def _reciprocal(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    return [b.neg(b.mul(ctx.g, b.mul(y, y)))]


# -- broadcasting arithmetic ------------------------------------------------------------------

@rule("Add", "Sub")
def _add_sub(ctx: VJP):
    b, (lhs, rhs), out = ctx.b, ctx.x, ctx.y[0]
    grads: list[Tensor | None] = [None, None]
    if ctx.needs(0):
        grads[0] = unbroadcast(b, ctx.g, lhs, out)
    if ctx.needs(1):
        signed = ctx.g if ctx.node.op == "Add" else b.neg(ctx.g)
        grads[1] = unbroadcast(b, signed, rhs, out)
    return grads


@rule("Mul")
def _mul(ctx: VJP):
    b, (lhs, rhs), out = ctx.b, ctx.x, ctx.y[0]
    return [
        unbroadcast(b, b.mul(ctx.g, rhs), lhs, out) if ctx.needs(0) else None,
        unbroadcast(b, b.mul(ctx.g, lhs), rhs, out) if ctx.needs(1) else None,
    ]


@rule("Div")
def _div(ctx: VJP):
    b, (num, den), out = ctx.b, ctx.x, ctx.y[0]
    return [
        unbroadcast(b, b.div(ctx.g, den), num, out) if ctx.needs(0) else None,
        unbroadcast(b, b.neg(b.div(b.mul(ctx.g, out), den)), den, out) if ctx.needs(1) else None,
    ]


# -- normalization ----------------------------------------------------------------------------

@rule("BatchNormalization")
def _batch_norm(ctx: VJP):
    """Inference mode: y = scale * (x - mean) / sqrt(var + eps) + bias, so dx = g * scale / sqrt(var + eps)."""
    b, x = ctx.b, ctx.x[0]
    eps = float(ctx.attr("epsilon", 1e-5))
    rank = len(static_shape(x) or [0, 0, 0, 0])
    scale, var = ctx.const_input(1), ctx.const_input(4)
    if scale is not None and var is not None:
        factor = b.const((scale / np.sqrt(var + eps)).reshape([-1] + [1] * (rank - 2)))
    else:
        factor = b.div(ctx.x[1], b.sqrt(b.add(ctx.x[4], eps)))
        factor = b.reshape(factor, [-1] + [1] * (rank - 2))
    return [b.mul(ctx.g, factor)]


# -- convolution and linear algebra -----------------------------------------------------------

@rule("Conv")
def _conv(ctx: VJP):
    if not ctx.needs(0):
        return [None]
    weight = ctx.x[1]
    kernel = list(ctx.attr("kernel_shape", (static_shape(weight) or [])[2:]))
    rank = len(kernel)
    strides = list(ctx.attr("strides", [1] * rank))
    dilations = list(ctx.attr("dilations", [1] * rank))
    return [transpose_conv(ctx, ctx.g, weight, ctx.x[0], int(ctx.attr("group", 1)),
                           kernel, strides, dilations)]


@rule("Gemm")
def _gemm(ctx: VJP):
    """Y = alpha*op(A) op(B) + beta*C."""
    b, (a_in, b_in) = ctx.b, ctx.x[:2]
    alpha, beta = float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0))
    trans_a, trans_b = int(ctx.attr("transA", 0)), int(ctx.attr("transB", 0))
    grads: list[Tensor | None] = [None] * len(ctx.x)
    if ctx.needs(0):
        grads[0] = (b.gemm(ctx.g, b_in, trans_b=1 - trans_b, alpha=alpha) if not trans_a
                    else b.gemm(b_in, ctx.g, trans_a=trans_b, trans_b=1, alpha=alpha))
    if ctx.needs(1):
        grads[1] = (b.gemm(a_in, ctx.g, trans_a=1 - trans_a, alpha=alpha) if not trans_b
                    else b.gemm(ctx.g, a_in, trans_a=1, trans_b=trans_a, alpha=alpha))
    if len(ctx.x) > 2 and ctx.needs(2):
        grads[2] = unbroadcast(b, b.mul(ctx.g, beta), ctx.x[2], ctx.y[0])
    return grads


def _swap_last_two(b: Emitter, tensor: gs.Tensor) -> Tensor:
    rank = len(static_shape(tensor) or [0, 0])
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    return b.transpose(tensor, perm)


@rule("MatMul")
def _matmul(ctx: VJP):
    b, (lhs, rhs), out = ctx.b, ctx.x, ctx.y[0]
    lhs_rank, rhs_rank = len(static_shape(lhs) or []), len(static_shape(rhs) or [])
    if lhs_rank < 2 or rhs_rank < 2:
        raise NotImplementedError("MatMul gradient with 1-D operands")
    return [
        unbroadcast(b, b.matmul(ctx.g, _swap_last_two(b, rhs)), lhs, out) if ctx.needs(0) else None,
        unbroadcast(b, b.matmul(_swap_last_two(b, lhs), ctx.g), rhs, out) if ctx.needs(1) else None,
    ]


# -- pooling ----------------------------------------------------------------------------------

@rule("GlobalAveragePool")
def _global_average_pool(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    shape = static_shape(x)
    spatial = shape[2:] if shape is not None else None
    if spatial and all(isinstance(d, int) for d in spatial):
        scaled = b.mul(ctx.g, 1.0 / float(np.prod(spatial)))
    else:
        count = b.cast(b.op("ReduceProd", b.shape(x, start=2), keepdims=1), 1)
        scaled = b.div(ctx.g, count)
    return [b.expand(scaled, b.shape(x))]


@rule("GlobalMaxPool")
def _global_max_pool(ctx: VJP):
    # Ties share the gradient equally, so the VJP stays a linear map of g.
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    hits = b.as_float(b.equal(x, y))
    ties = b.reduce_sum(hits, list(range(2, len(static_shape(x) or [0, 0, 0, 0]))))
    return [b.mul(b.div(ctx.g, ties), hits)]


def _window_counts(ctx: VJP, x_shape: Sequence[int], y_shape: Sequence[int]) -> np.ndarray:
    """How many elements each AveragePool window divides by, as onnxruntime computes it."""
    kernel, strides, dilations, pads = pool_geometry(ctx, x_shape)
    rank = len(kernel)
    include_pad = int(ctx.attr("count_include_pad", 0))
    per_axis = []
    for axis in range(rank):
        size, out = x_shape[2 + axis], y_shape[2 + axis]
        begin, end = pads[axis], pads[rank + axis]
        counts = np.empty(out)
        for o in range(out):
            start = o * strides[axis] - begin
            taps = start + dilations[axis] * np.arange(kernel[axis])
            lo, hi = (-begin, size + end) if include_pad else (0, size)
            counts[o] = np.count_nonzero((taps >= lo) & (taps < hi))
        per_axis.append(counts)
    grid = per_axis[0]
    for counts in per_axis[1:]:
        grid = np.multiply.outer(grid, counts)
    return grid


@rule("AveragePool")
def _average_pool(ctx: VJP):
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    x_shape, y_shape = static_shape(x), static_shape(y)
    if x_shape is None or y_shape is None or not all(isinstance(d, int) for d in x_shape[1:] + y_shape[1:]):
        raise NotImplementedError("AveragePool gradient needs static C,H,W")
    kernel, strides, dilations, _ = pool_geometry(ctx, x_shape)
    counts = _window_counts(ctx, x_shape, y_shape)
    channels = x_shape[1]
    ones = b.const(np.ones([channels, 1] + kernel))
    scaled = b.div(ctx.g, b.const(counts.astype(np.float32)))
    return [transpose_conv(ctx, scaled, ones, x, channels, kernel, strides, dilations)]


@rule("MaxPool", min_opset=16)
def _max_pool(ctx: VJP):
    """Scatter-add g to the argmax positions (Indices output, flat over N*C*H*W); unlike
    MaxUnpool this is right when windows overlap."""
    b, node, x = ctx.b, ctx.node, ctx.x[0]
    if len(node.outputs) < 2 or not node.outputs[1].name:
        indices = gs.Variable(b._name("maxpool_indices"), dtype=np.int64)
        node.outputs = [node.outputs[0], indices]
        node.attrs["storage_order"] = 0
    indices = node.outputs[1]
    flat_zeros = b.reshape(b.zeros_like(x), [-1])
    scattered = b.op("ScatterElements", flat_zeros, b.reshape(indices, [-1]),
                     b.reshape(ctx.g, [-1]), axis=0, reduction="add")
    return [b.reshape(scattered, b.shape(x))]


# -- shape and data movement ------------------------------------------------------------------

@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(ctx: VJP):
    return [ctx.b.reshape_like(ctx.g, ctx.x[0])] + [None] * (len(ctx.x) - 1)


@rule("Transpose")
def _transpose(ctx: VJP):
    perm = list(ctx.attr("perm", []))
    if not perm:
        perm = list(reversed(range(len(static_shape(ctx.x[0]) or []))))
    return [ctx.b.transpose(ctx.g, list(np.argsort(perm)))]


@rule("Concat")
def _concat(ctx: VJP):
    axis = int(ctx.attr("axis"))
    sizes = []
    for tensor in ctx.x:
        shape = static_shape(tensor)
        if shape is None or not isinstance(shape[axis], int):
            raise NotImplementedError("Concat gradient needs static sizes along the axis")
        sizes.append(shape[axis])
    return ctx.b.split(ctx.g, sizes, axis)


@rule("Softmax")
def _softmax(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    axis = int(ctx.attr("axis", -1))
    inner = b.reduce_sum(b.mul(ctx.g, y), [axis], keepdims=True)
    return [b.mul(y, b.sub(ctx.g, inner))]
