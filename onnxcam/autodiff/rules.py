"""Vector-Jacobian product rules: one small function per ONNX op.

A rule receives a :class:`VJP` context (the emitter ``b``, the forward node's inputs ``x`` and
outputs ``y``, the incoming gradient ``g`` of its first output, and ``needs(i)``: whether input
``i`` wants a gradient) and returns one gradient per input (``None`` where not needed).
Recipes follow ``docs/onnx-autodiff.md``; each is checked against float64 central finite
differences over a grid of shapes and attributes (``tests/test_autodiff_rules.py``).

Adding an op means adding one rule here and its cases to the op grid in the tests.
Conventions that keep ORT fast: prefer the forward *output* (Relu reads ``y > 0``, which
keeps Conv+Relu fusion intact) and fold shapes into constants when they are static.

Two generic recipes cover many ops at once:

* :func:`move_elements`, for ops that only copy elements of their input (Pad, Slice, Gather,
  Tile, DepthToSpace, nearest Resize, ...): run the op on the element numbers
  ``1..n`` of the input, then scatter-add ``g`` back to the numbers that arrived;
* :func:`window_adjoint`, for ops that sum over sliding windows (Conv, AveragePool, LpPool):
  the adjoint is ConvTranspose with the begin pads only, cropped or padded to the input size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper

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
        value = self.node.attrs.get(name, default)
        return value.decode() if isinstance(value, bytes) else value

    def has_input(self, index: int) -> bool:
        return index < len(self.x) and bool(self.x[index].name)

    def const_input(self, index: int) -> np.ndarray | None:
        """The value of input ``index`` when it is a constant, else None."""
        if not self.has_input(index):
            return None
        tensor = self.x[index]
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None


@dataclass(frozen=True)
class Rule:
    """A VJP function, the opset the tensors it emits need, and whether it handles gradients
    arriving at outputs other than the first (Split)."""

    fn: Callable[[VJP], Sequence[Tensor | None]]
    min_opset: int = 13
    multi_output: bool = False

    def __call__(self, ctx: VJP) -> Sequence[Tensor | None]:
        return self.fn(ctx)


RULES: dict[str, Rule] = {}


def rule(*op_types: str, min_opset: int = 13, multi_output: bool = False):
    """Register ``fn`` as the VJP of ``op_types``."""
    def register(fn):
        for op in op_types:
            RULES[op] = Rule(fn, min_opset, multi_output)
        return fn
    return register


# -- helpers shared by rules ------------------------------------------------------------------

def static_shape(tensor: gs.Tensor) -> list | None:
    shape = tensor.shape
    return list(shape) if shape is not None else None


def known_dims(tensor: gs.Tensor) -> list[int] | None:
    """The shape when every dim is a known integer, else None."""
    shape = static_shape(tensor)
    if shape is None or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        return None
    return [int(d) for d in shape]


def rank_of(tensor: gs.Tensor, what: str) -> int:
    shape = static_shape(tensor)
    if shape is None:
        raise NotImplementedError(f"{what} gradient needs the rank of '{tensor.name}'")
    return len(shape)


def unbroadcast(b: Emitter, grad: Tensor, like: gs.Tensor, out: gs.Tensor) -> Tensor:
    """Sum ``grad`` (shaped like ``out``) over the axes ``like`` was broadcast along."""
    like_shape, out_shape = static_shape(like), static_shape(out)
    if like_shape is not None and out_shape is not None and None not in like_shape + out_shape \
            and all(isinstance(d, (int, np.integer)) for d in like_shape + out_shape):
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
    """Explicit [begin..., end...] pads of a Conv or pool, resolving auto_pad
    (SAME_UPPER puts the odd extra pad at the end, SAME_LOWER at the begin; VALID: none)."""
    rank = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
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


def fit_spatial_like(b: Emitter, grad: Tensor, like: gs.Tensor, rank: int) -> Tensor:
    """:func:`fit_spatial` with sizes read at run time: zero-pad the end of each spatial axis
    up to ``like``'s size, then crop to it."""
    wanted, produced = b.shape(like, start=2), b.shape(grad, start=2)
    missing = b.op("Max", b.sub(wanted, produced), b.ints([0] * rank))
    padded = b.pad(grad, b.concat([b.ints([0] * (2 + rank) + [0, 0]), missing], axis=0))
    return b.op("Slice", padded, b.ints([0] * rank), wanted, b.ints(list(range(2, 2 + rank))))


def static_spatial(tensor: gs.Tensor) -> list[int] | None:
    shape = static_shape(tensor)
    if shape is None or not all(isinstance(d, (int, np.integer)) for d in shape[2:]):
        return None
    return [int(d) for d in shape[2:]]


def spatial_dims(ctx: VJP) -> tuple[list[int], list[int]]:
    """Static spatial sizes of the node's first input and first output."""
    in_spatial, out_spatial = static_spatial(ctx.x[0]), static_spatial(ctx.y[0])
    if in_spatial is None or out_spatial is None:
        raise NotImplementedError(f"{ctx.node.op} gradient needs static spatial shapes")
    return in_spatial, out_spatial


def window_adjoint(b: Emitter, grad: Tensor, weight, group: int, kernel: Sequence[int],
                   strides: Sequence[int], dilations: Sequence[int], begins: Sequence[int],
                   x: gs.Tensor, y: gs.Tensor) -> Tensor:
    """Adjoint of a (grouped) sliding-window sum y[o] = sum_k w[k] x[o*s + k*d - begin]:
    ConvTranspose with the begin pads only, giving ``s*(o-1) + d*(k-1) + 1 - begin`` samples,
    then crop/zero-pad to the input size (``x``'s, read at run time when not static). Never
    ``output_shape``: it makes the spec ignore ``pads`` (the bug onnx-ad has on asymmetric
    pads)."""
    rank = len(kernel)
    dx = b.op("ConvTranspose", grad, weight, group=group, strides=list(strides),
              dilations=list(dilations), pads=list(begins) + [0] * rank)
    in_spatial, out_spatial = static_spatial(x), static_spatial(y)
    if in_spatial is None or out_spatial is None:
        return fit_spatial_like(b, dx, x, rank)
    produced = [s * (o - 1) + d * (k - 1) + 1 - p
                for s, o, d, k, p in zip(strides, out_spatial, dilations, kernel, begins)]
    return fit_spatial(b, dx, produced, in_spatial)


def window_geometry(ctx: VJP, kernel: Sequence[int] | None = None):
    """kernel, strides, dilations and explicit pads of a Conv or pool node (auto_pad SAME
    needs the static input size)."""
    kernel = list(kernel if kernel is not None else ctx.attr("kernel_shape"))
    rank = len(kernel)
    strides = list(ctx.attr("strides", [1] * rank))
    dilations = list(ctx.attr("dilations", [1] * rank))
    in_spatial = static_spatial(ctx.x[0])
    if in_spatial is None and ctx.attr("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        raise NotImplementedError(f"{ctx.node.op} with auto_pad SAME needs a static input size")
    pads = spatial_pads(ctx, in_spatial or [], kernel, strides, dilations)
    return kernel, strides, dilations, pads


def window_sum_adjoint(ctx: VJP, grad: Tensor) -> Tensor:
    """Adjoint of the pool's plain window sum (every tap weight 1), per channel."""
    b, x = ctx.b, ctx.x[0]
    channels = (static_shape(x) or [None, None])[1]
    if not isinstance(channels, (int, np.integer)):
        raise NotImplementedError(f"{ctx.node.op} gradient needs a static channel count")
    kernel, strides, dilations, pads = window_geometry(ctx)
    ones = b.const(np.ones([int(channels), 1] + kernel))
    return window_adjoint(b, grad, ones, int(channels), kernel, strides, dilations,
                          pads[:len(kernel)], x, ctx.y[0])


def move_elements(ctx: VJP, replace: dict[int, object] | None = None, numbers: type = np.int64) -> Tensor:
    """Gradient of any op that only copies elements of its first input to its output.

    The op is run again on the element numbers ``P = 1..n`` laid out like the input, giving
    for every output element the number of the input element it came from (0 for a padded
    constant: a dummy slot). ``g`` is scatter-added to those numbers, so repeated reads
    (Tile, Gather with duplicates, reflect padding) accumulate:
    ``dx = ScatterElements(zeros[n+1], J, g, reduction="add")[1:]``.
    The numbers are int64 where onnxruntime runs the op on int64; ``numbers`` picks int32
    (Resize) or float32 (DepthToSpace, SpaceToDepth: float only, exact below 2^24 elements)
    otherwise. ``replace`` swaps inputs of the copy (Pad's constant value becomes 0).
    """
    b, x = ctx.b, ctx.x[0]
    kind = np.dtype(numbers)
    dims = known_dims(x)
    if dims is not None:
        n = int(np.prod(dims))
        if kind.kind == "f" and n >= 2 ** 24:
            raise NotImplementedError(f"{n} elements: too many to number exactly in float32")
        positions = b.reshape(b.range(b.const(1, kind), b.const(n + 1, kind), b.const(1, kind)), dims)
        slots = b.ints([n + 1])
    else:
        size = b.size(x)
        limit = b.cast(b.op("Add", size, b.const(np.int64(1))), helper.np_dtype_to_tensor_dtype(kind))
        positions = b.reshape(b.range(b.const(1, kind), limit, b.const(1, kind)), b.shape(x))
        slots = b.reshape(b.op("Add", size, b.const(np.int64(1))), [1])
    inputs = [positions] + list(ctx.x[1:])
    for index, value in (replace or {}).items():
        if index < len(inputs):
            inputs[index] = value
    moved = b.op(ctx.node.op, *inputs, **ctx.node.attrs)
    index = b.reshape(b.as_int64(moved) if kind.kind == "f" else moved, [-1])
    summed = b.scatter_add(b.zeros(slots), index, b.reshape(ctx.g, [-1]))
    return b.reshape_like(b.slice(summed, [1], [np.iinfo(np.int64).max], [0]), x)


def reduced_axes(ctx: VJP, rank: int) -> list[int]:
    """Axes of a Reduce* node (an attribute before opset 13/18, an input from then on), made
    non-negative and sorted; [] means identity (noop_with_empty_axes with no axes)."""
    axes = ctx.attr("axes")
    if axes is None and ctx.has_input(1):
        axes = ctx.const_input(1)
        if axes is None:
            raise NotImplementedError("reduction over computed axes")
    if axes is None or len(axes) == 0:
        return [] if int(ctx.attr("noop_with_empty_axes", 0)) else list(range(rank))
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1))


def keep_reduced(ctx: VJP, tensor: Tensor, axes: Sequence[int]) -> Tensor:
    """A reduced tensor (output or its gradient) with the reduced axes kept as size 1."""
    if int(ctx.attr("keepdims", 1)) or not axes:
        return tensor
    return ctx.b.unsqueeze(tensor, axes)


def ties_mask(b: Emitter, x: gs.Tensor, y_kept: Tensor, axes: Sequence[int]) -> Tensor:
    """Where x attains the reduced max/min, each hit weighted 1/(number of ties), so the VJP
    stays a linear map of g that sums to g (ties share it equally, as torch.amax)."""
    hits = b.as_float(b.equal(x, y_kept))
    return b.div(hits, b.reduce_sum(hits, axes, keepdims=True))


# -- elementwise ------------------------------------------------------------------------------

@rule("Identity", "Dropout")
def _identity(ctx: VJP):
    return [ctx.g]


@rule("Cast", "CastLike")
def _cast(ctx: VJP):
    """Cast the gradient back to the input's float type (integer inputs never get here)."""
    b, x = ctx.b, ctx.x[0]
    grad = ctx.g
    if x.dtype is not None and np.dtype(x.dtype) != b.float_dtype:
        grad = b.cast(grad, helper.np_dtype_to_tensor_dtype(np.dtype(x.dtype)))
    # CastLike's second input only lends its type: its gradient is zero.
    return [grad] + [b.zeros_like(t) for t in ctx.x[1:]]


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


@rule("PRelu")
def _prelu(ctx: VJP):
    """y = x (x > 0), slope*x otherwise; slope broadcasts to x."""
    b, (x, slope), y = ctx.b, ctx.x, ctx.y[0]
    positive = b.greater(x, 0.0)
    return [
        b.where(positive, ctx.g, b.mul(ctx.g, slope)) if ctx.needs(0) else None,
        unbroadcast(b, b.where(positive, 0.0, b.mul(ctx.g, x)), slope, y) if ctx.needs(1) else None,
    ]


@rule("Elu", "Selu")
def _exponential_units(ctx: VJP):
    """For x <= 0 the derivative is a function of y: Elu y + alpha, Selu y + gamma*alpha;
    for x > 0 it is 1 (Elu) or gamma (Selu)."""
    b, x, y, op = ctx.b, ctx.x[0], ctx.y[0], ctx.node.op
    alpha = float(ctx.attr("alpha", 1.0 if op == "Elu" else 1.67326319217681884765625))
    gamma = float(ctx.attr("gamma", 1.05070102214813232421875)) if op == "Selu" else 1.0
    return [b.mul(ctx.g, b.where(b.greater(x, 0.0), gamma, b.add(y, gamma * alpha)))]


@rule("Clip")
def _clip(ctx: VJP):
    # Strict inequalities, as torch's hardtanh/ReLU6 backward: the bounds get no gradient.
    b = ctx.b
    x = ctx.x[0]
    inside = None
    for index, compare in ((1, b.greater), (2, b.less)):
        if ctx.has_input(index):
            test = compare(x, ctx.x[index])
            inside = test if inside is None else b.and_(inside, test)
    return [ctx.g if inside is None else b.where(inside, ctx.g, 0.0)]


@rule("Abs")
def _abs(ctx: VJP):
    return [ctx.b.mul(ctx.g, ctx.b.sign(ctx.x[0]))]


@rule("Sigmoid")
def _sigmoid(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    return [b.mul(ctx.g, b.mul(y, b.sub(1.0, y)))]


@rule("Tanh")
def _tanh(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    return [b.mul(ctx.g, b.sub(1.0, b.mul(y, y)))]


@rule("Softplus")
def _softplus(ctx: VJP):
    return [ctx.b.mul(ctx.g, ctx.b.sigmoid(ctx.x[0]))]


@rule("Mish")
def _mish(ctx: VJP):
    """y = x tanh(softplus(x)): dy/dx = t + x (1 - t^2) sigmoid(x), t = tanh(softplus(x))."""
    b, x = ctx.b, ctx.x[0]
    t = b.tanh(b.op("Softplus", x))
    slope = b.add(t, b.mul(b.mul(x, b.sub(1.0, b.square(t))), b.sigmoid(x)))
    return [b.mul(ctx.g, slope)]


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


def _normal_pdf_cdf(b: Emitter, x) -> tuple[Tensor, Tensor]:
    """phi(x) = exp(-x^2/2)/sqrt(2 pi) and Phi(x) = (1 + erf(x/sqrt 2))/2."""
    pdf = b.mul(b.exp(b.mul(b.square(x), -0.5)), 1.0 / math.sqrt(2.0 * math.pi))
    cdf = b.mul(b.add(b.erf(b.mul(x, 1.0 / math.sqrt(2.0))), 1.0), 0.5)
    return pdf, cdf


@rule("Erf")
def _erf(ctx: VJP):
    """d erf(x)/dx = 2/sqrt(pi) exp(-x^2)."""
    b, x = ctx.b, ctx.x[0]
    return [b.mul(ctx.g, b.mul(b.exp(b.neg(b.square(x))), 2.0 / math.sqrt(math.pi)))]


@rule("Gelu")
def _gelu(ctx: VJP):
    """Exact: y = x Phi(x), dy/dx = Phi(x) + x phi(x). Tanh approximation (Hendrycks &
    Gimpel 2016): y = x (1 + t)/2, t = tanh(c (x + 0.044715 x^3)), c = sqrt(2/pi):
    dy/dx = (1 + t)/2 + x (1 - t^2) c (1 + 3*0.044715 x^2) / 2."""
    b, x = ctx.b, ctx.x[0]
    if ctx.attr("approximate", "none") == "tanh":
        c, k = math.sqrt(2.0 / math.pi), 0.044715
        x2 = b.square(x)
        t = b.tanh(b.mul(b.mul(x, b.add(b.mul(x2, k), 1.0)), c))
        inner = b.mul(b.sub(1.0, b.square(t)), b.mul(b.add(b.mul(x2, 3.0 * k), 1.0), c))
        slope = b.mul(b.add(b.add(t, 1.0), b.mul(x, inner)), 0.5)
    else:
        pdf, cdf = _normal_pdf_cdf(b, x)
        slope = b.add(cdf, b.mul(x, pdf))
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


@rule("Pow")
def _pow(ctx: VJP):
    """y = x^p: dx = g p x^(p-1), dp = g y ln(x). A constant exponent (often an integer
    tensor) is folded, so x^2 becomes 2x."""
    b, (base, power), out = ctx.b, ctx.x, ctx.y[0]
    grads: list[Tensor | None] = [None, None]
    if ctx.needs(0):
        constant = ctx.const_input(1)
        if constant is not None:
            p = constant.astype(b.float_dtype)
            slope = b.mul(b.const(p), b.pow(base, b.const(p - 1))) if np.any(p != 2) else b.mul(base, 2.0)
        else:
            p = power if power.dtype is None or np.dtype(power.dtype).kind == "f" else b.as_float(power)
            slope = b.mul(p, b.pow(base, b.sub(p, 1.0)))
        grads[0] = unbroadcast(b, b.mul(ctx.g, slope), base, out)
    if ctx.needs(1):
        grads[1] = unbroadcast(b, b.mul(b.mul(ctx.g, out), b.log(base)), power, out)
    return grads


@rule("Sum", "Mean")
def _sum_mean(ctx: VJP):
    b, out = ctx.b, ctx.y[0]
    grad = ctx.g if ctx.node.op == "Sum" else b.mul(ctx.g, 1.0 / len(ctx.x))
    return [unbroadcast(b, grad, x, out) if ctx.needs(i) else None for i, x in enumerate(ctx.x)]


@rule("Max", "Min")
def _max_min(ctx: VJP):
    """Each input gets g where it equals the result; ties share g equally (as torch.maximum)."""
    b, out = ctx.b, ctx.y[0]
    if len(ctx.x) == 1:
        return [ctx.g]
    hits = [b.as_float(b.equal(x, out)) for x in ctx.x]
    ties = hits[0]
    for hit in hits[1:]:
        ties = b.add(ties, hit)
    share = b.div(ctx.g, ties)
    return [unbroadcast(b, b.mul(share, hit), x, out) if ctx.needs(i) else None
            for i, (x, hit) in enumerate(zip(ctx.x, hits))]


@rule("Where")
def _where(ctx: VJP):
    b, (cond, on_true, on_false), out = ctx.b, ctx.x, ctx.y[0]
    return [
        None,
        unbroadcast(b, b.where(cond, ctx.g, 0.0), on_true, out) if ctx.needs(1) else None,
        unbroadcast(b, b.where(cond, 0.0, ctx.g), on_false, out) if ctx.needs(2) else None,
    ]


# -- normalization ----------------------------------------------------------------------------

@rule("BatchNormalization")
def _batch_norm(ctx: VJP):
    """Inference mode: y = scale * (x - mean) / sqrt(var + eps) + bias, so dx = g * scale / sqrt(var + eps)."""
    b, x = ctx.b, ctx.x[0]
    if int(ctx.attr("training_mode", 0)):
        raise NotImplementedError("training-mode BatchNormalization")
    eps = float(ctx.attr("epsilon", 1e-5))
    rank = len(static_shape(x) or [0, 0, 0, 0])
    scale, var = ctx.const_input(1), ctx.const_input(4)
    if scale is not None and var is not None:
        factor = b.const((scale / np.sqrt(var + eps)).reshape([-1] + [1] * (rank - 2)))
    else:
        factor = b.div(ctx.x[1], b.sqrt(b.add(ctx.x[4], eps)))
        factor = b.reshape(factor, [-1] + [1] * (rank - 2))
    return [b.mul(ctx.g, factor)]


def normalized_backward(b: Emitter, x: gs.Tensor, gg: Tensor, axes: Sequence[int], eps: float
                        ) -> tuple[Tensor, Tensor]:
    """For xhat = (x - mean) r, r = 1/sqrt(var + eps) over ``axes``, and gg = dL/dxhat:
    dx = r (gg - mean(gg) - xhat mean(gg xhat)). Returns (dx, xhat)."""
    centred = b.sub(x, b.reduce_mean(x, axes))
    r = b.div(1.0, b.sqrt(b.add(b.reduce_mean(b.square(centred), axes), eps)))
    xhat = b.mul(centred, r)
    inner = b.add(b.reduce_mean(gg, axes), b.mul(xhat, b.reduce_mean(b.mul(gg, xhat), axes)))
    return b.mul(r, b.sub(gg, inner)), xhat


@rule("LayerNormalization")
def _layer_norm(ctx: VJP):
    """y = xhat * scale + bias, normalized over axes [axis, rank)."""
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    rank = rank_of(x, "LayerNormalization")
    axes = list(range(int(ctx.attr("axis", -1)) % rank, rank))
    dx, xhat = normalized_backward(b, x, b.mul(ctx.g, ctx.x[1]), axes, float(ctx.attr("epsilon", 1e-5)))
    return [
        dx if ctx.needs(0) else None,
        unbroadcast(b, b.mul(ctx.g, xhat), ctx.x[1], y) if ctx.needs(1) else None,
        unbroadcast(b, ctx.g, ctx.x[2], y) if ctx.needs(2) else None,
    ]


@rule("InstanceNormalization")
def _instance_norm(ctx: VJP):
    """y = xhat * scale[c] + bias[c], normalized per (n, c) over the spatial axes."""
    b, x = ctx.b, ctx.x[0]
    rank = rank_of(x, "InstanceNormalization")
    per_channel = [-1] + [1] * (rank - 2)
    spatial, others = list(range(2, rank)), [0] + list(range(2, rank))
    scale = b.reshape(ctx.x[1], per_channel)
    dx, xhat = normalized_backward(b, x, b.mul(ctx.g, scale), spatial, float(ctx.attr("epsilon", 1e-5)))
    return [
        dx if ctx.needs(0) else None,
        b.reduce_sum(b.mul(ctx.g, xhat), others, keepdims=False) if ctx.needs(1) else None,
        b.reduce_sum(ctx.g, others, keepdims=False) if ctx.needs(2) else None,
    ]


# -- convolution and linear algebra -----------------------------------------------------------

def _bias_grad(ctx: VJP, index: int) -> Tensor | None:
    """Bias of Conv/ConvTranspose: sum of g over batch and space."""
    if not ctx.needs(index):
        return None
    rank = rank_of(ctx.y[0], ctx.node.op)
    return ctx.b.reduce_sum(ctx.g, [0] + list(range(2, rank)), keepdims=False)


def _no_weight_grad(ctx: VJP) -> None:
    if ctx.needs(1):
        raise NotImplementedError("gradient with respect to the weights (only inputs and biases)")


@rule("Conv")
def _conv(ctx: VJP):
    _no_weight_grad(ctx)
    dx = None
    if ctx.needs(0):
        weight = ctx.x[1]
        kernel, strides, dilations, pads = window_geometry(
            ctx, ctx.attr("kernel_shape", (static_shape(weight) or [])[2:]))
        dx = window_adjoint(ctx.b, ctx.g, weight, int(ctx.attr("group", 1)), kernel, strides,
                            dilations, pads[:len(kernel)], ctx.x[0], ctx.y[0])
    return [dx, None, _bias_grad(ctx, 2)]


@rule("ConvTranspose")
def _conv_transpose(ctx: VJP):
    """y = crop(y_full, begin), y_full[i*s + k*d] += x[i] w[k] (length s(n-1) + d(k-1) + 1,
    plus output_padding). The adjoint correlates g placed at offset ``begin`` of y_full with
    w: a Conv with the same weight, group, strides, dilations and pads [begin, end'], where
    end' pads g to y_full's length (a negative end' is cropped after)."""
    _no_weight_grad(ctx)
    dx = None
    if ctx.needs(0):
        b, weight = ctx.b, ctx.x[1]
        in_spatial, out_spatial = spatial_dims(ctx)
        kernel = list(ctx.attr("kernel_shape", (static_shape(weight) or [])[2:]))
        rank = len(kernel)
        strides = list(ctx.attr("strides", [1] * rank))
        dilations = list(ctx.attr("dilations", [1] * rank))
        extra = list(ctx.attr("output_padding", [0] * rank))
        full = [s * (n - 1) + d * (k - 1) + 1 for s, n, d, k in zip(strides, in_spatial, dilations, kernel)]
        auto_pad = ctx.attr("auto_pad", "NOTSET")
        if ctx.attr("output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            # Spec and onnxruntime: total = full + output_padding - out, SAME_UPPER puts the
            # odd extra pad at the end; a negative total is 0 with zeros appended.
            totals = [max(f + e - o, 0) for f, e, o in zip(full, extra, out_spatial)]
            begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        else:
            begins = list(ctx.attr("pads", [0] * 2 * rank))[:rank]
        ends = [max(f - p - o, 0) for f, p, o in zip(full, begins, out_spatial)]
        dx = b.op("Conv", ctx.g, weight, group=int(ctx.attr("group", 1)), strides=strides,
                  dilations=dilations, pads=begins + ends, kernel_shape=kernel)
        produced = [(o + p + e - d * (k - 1) - 1) // s + 1 for o, p, e, d, k, s
                    in zip(out_spatial, begins, ends, dilations, kernel, strides)]
        dx = fit_spatial(b, dx, produced, in_spatial)
    return [dx, None, _bias_grad(ctx, 2)]


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


def _einsum_subscripts(equation: str) -> tuple[list[list[str]], list[str]]:
    """Operand and output subscripts as token lists ("..." is one token); an implicit output
    is the ellipsis then the letters used once, sorted (the numpy convention)."""
    def tokens(term: str) -> list[str]:
        before, dots, after = term.partition("...")
        return list(before) + (["..."] if dots else []) + list(after)

    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = [tokens(t) for t in lhs.split(",")]
    if arrow:
        return terms, tokens(rhs)
    letters = [t for term in terms for t in term if t != "..."]
    ellipsis = ["..."] if any("..." in term for term in terms) else []
    return terms, ellipsis + sorted(c for c in set(letters) if letters.count(c) == 1)


def _same_ellipsis(ctx: VJP, terms: list[list[str]]) -> None:
    """The dims "..." stands for must be the same in every operand: a gradient through an
    ellipsis broadcast would also need summing over the broadcast dims (not done)."""
    covered = []
    for term, tensor in zip(terms, ctx.x):
        if "..." in term:
            shape = static_shape(tensor)
            if shape is None:
                raise NotImplementedError("Einsum with '...' needs known ranks")
            start = term.index("...")
            covered.append(tuple(shape[start:start + len(shape) - len(term) + 1]))
    if len(set(covered)) > 1:
        raise NotImplementedError(f"Einsum broadcasting through '...' ({' vs '.join(map(str, covered))})")


@rule("Einsum")
def _einsum(ctx: VJP):
    """Einsum is linear in each operand: d operand_i = einsum(g, other operands ->
    subscripts_i). Subscripts of operand i found nowhere else were summed away; they are
    restored by Unsqueeze + Expand. Not handled: diagonals (a repeated subscript) and
    broadcasting through "..." (refused, see :func:`_same_ellipsis`)."""
    b = ctx.b
    terms, out = _einsum_subscripts(ctx.attr("equation"))
    _same_ellipsis(ctx, terms)
    join = "".join
    grads: list[Tensor | None] = []
    for i, term in enumerate(terms):
        if not ctx.needs(i):
            grads.append(None)
            continue
        if len(set(term)) != len(term):
            raise NotImplementedError("Einsum with a repeated subscript in one operand")
        others = [t for j, t in enumerate(terms) if j != i]
        seen = set(out).union(*others)
        kept = [t for t in term if t in seen]
        equation = ",".join(join(t) for t in [out] + others) + "->" + join(kept)
        grad = b.einsum(equation, ctx.g, *[x for j, x in enumerate(ctx.x) if j != i])
        if len(kept) < len(term):
            rank = rank_of(ctx.x[i], "Einsum")
            dots = rank - len([t for t in term if t != "..."])
            axes, position = [], 0
            for token in term:
                width = dots if token == "..." else 1
                if token not in seen:
                    axes.extend(range(position, position + width))
                position += width
            grad = b.expand(b.unsqueeze(grad, axes), b.shape(ctx.x[i]))
        grads.append(grad)
    return grads


# -- pooling ----------------------------------------------------------------------------------

@rule("GlobalAveragePool")
def _global_average_pool(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    shape = static_shape(x)
    spatial = shape[2:] if shape is not None else None
    if spatial and all(isinstance(d, (int, np.integer)) for d in spatial):
        scaled = b.mul(ctx.g, 1.0 / float(np.prod(spatial)))
    else:
        scaled = b.div(ctx.g, b.as_float(b.op("ReduceProd", b.shape(x, start=2), keepdims=1)))
    return [b.expand(scaled, b.shape(x))]


@rule("GlobalMaxPool")
def _global_max_pool(ctx: VJP):
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    spatial = list(range(2, rank_of(x, "GlobalMaxPool")))
    return [b.mul(ctx.g, ties_mask(b, x, y, spatial))]


def _window_counts(ctx: VJP, x_shape: Sequence[int], y_shape: Sequence[int]) -> np.ndarray:
    """How many elements each AveragePool window divides by, as onnxruntime computes it."""
    kernel, strides, dilations, pads = window_geometry(ctx)
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
    x_spatial, y_spatial = spatial_dims(ctx)
    counts = _window_counts(ctx, [0, 0] + x_spatial, [0, 0] + y_spatial)
    return [window_sum_adjoint(ctx, ctx.b.div(ctx.g, ctx.b.const(counts)))]


@rule("LpPool")
def _lp_pool(ctx: VJP):
    """y = (sum_window |x|^p)^(1/p): dx = S(g / y^(p-1)) |x|^(p-1) sign(x), S the adjoint of
    the window sum; windows with y = 0 pass nothing (the subgradient 0)."""
    return [_lp_backward(ctx, window_sum_adjoint(ctx, _lp_share(ctx, ctx.y[0])), ctx.x[0])]


@rule("GlobalLpPool")
def _global_lp_pool(ctx: VJP):
    return [_lp_backward(ctx, _lp_share(ctx, ctx.y[0]), ctx.x[0])]


def _lp_share(ctx: VJP, y: gs.Tensor) -> Tensor:
    b, p = ctx.b, float(ctx.attr("p", 2))
    scale = y if p == 2 else b.pow(y, p - 1.0)
    zero = b.equal(y, 0.0)
    return b.where(zero, 0.0, b.div(ctx.g, b.where(zero, 1.0, scale)))


def _lp_backward(ctx: VJP, spread: Tensor, x: gs.Tensor) -> Tensor:
    b, p = ctx.b, float(ctx.attr("p", 2))
    slope = x if p == 2 else b.mul(b.pow(b.abs(x), p - 1.0), b.sign(x))
    return b.mul(spread, slope)


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
    scattered = b.scatter_add(flat_zeros, b.reshape(indices, [-1]), b.reshape(ctx.g, [-1]))
    return [b.reshape(scattered, b.shape(x))]


# -- reductions -------------------------------------------------------------------------------

def _reduction(ctx: VJP) -> tuple[list[int], Tensor, Tensor]:
    """Axes, the incoming gradient and the output with the reduced axes kept."""
    rank = rank_of(ctx.x[0], ctx.node.op)
    axes = reduced_axes(ctx, rank)
    return axes, keep_reduced(ctx, ctx.g, axes), keep_reduced(ctx, ctx.y[0], axes)


@rule("ReduceSum", "ReduceMean")
def _reduce_sum_mean(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    axes, g, _ = _reduction(ctx)
    if ctx.node.op == "ReduceMean" and axes:
        # count = size(x) / size(y): right for static and dynamic shapes alike.
        g = b.div(b.mul(g, b.as_float(b.size(ctx.y[0]))), b.as_float(b.size(x)))
    return [b.expand(g, b.shape(x)), None]


@rule("ReduceMax", "ReduceMin")
def _reduce_max_min(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    axes, g, y = _reduction(ctx)
    return [b.mul(g, ties_mask(b, x, y, axes)) if axes else g, None]


@rule("ReduceL2")
def _reduce_l2(ctx: VJP):
    """y = sqrt(sum x^2): dx = g x / y (0 where y = 0)."""
    b, x = ctx.b, ctx.x[0]
    _, g, y = _reduction(ctx)
    zero = b.equal(y, 0.0)
    return [b.mul(x, b.where(zero, 0.0, b.div(g, b.where(zero, 1.0, y)))), None]


@rule("ReduceSumSquare")
def _reduce_sum_square(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    _, g, _ = _reduction(ctx)
    return [b.mul(b.mul(x, 2.0), g), None]


@rule("ReduceLogSumExp")
def _reduce_log_sum_exp(ctx: VJP):
    """y = log sum exp(x): dx = g exp(x - y) (the softmax over the reduced axes)."""
    b, x = ctx.b, ctx.x[0]
    _, g, y = _reduction(ctx)
    return [b.mul(g, b.exp(b.sub(x, y))), None]


@rule("Softmax")
def _softmax(ctx: VJP):
    b, y = ctx.b, ctx.y[0]
    axis = int(ctx.attr("axis", -1))
    inner = b.reduce_sum(b.mul(ctx.g, y), [axis], keepdims=True)
    return [b.mul(y, b.sub(ctx.g, inner))]


@rule("LogSoftmax")
def _log_softmax(ctx: VJP):
    """y = x - log sum exp(x): dx = g - softmax(x) sum(g)."""
    b, y = ctx.b, ctx.y[0]
    total = b.reduce_sum(ctx.g, [int(ctx.attr("axis", -1))], keepdims=True)
    return [b.sub(ctx.g, b.mul(b.exp(y), total))]


# -- shape and data movement ------------------------------------------------------------------

@rule("Flatten", "Reshape", "Squeeze", "Unsqueeze")
def _reshape(ctx: VJP):
    return [ctx.b.reshape_like(ctx.g, ctx.x[0])] + [None] * (len(ctx.x) - 1)


@rule("Transpose")
def _transpose(ctx: VJP):
    perm = list(ctx.attr("perm", []))
    if not perm:
        perm = list(reversed(range(rank_of(ctx.x[0], "Transpose"))))
    return [ctx.b.transpose(ctx.g, list(np.argsort(perm)))]


@rule("Concat")
def _concat(ctx: VJP):
    """Split g back into the inputs' extents along the axis (read from the shapes at run
    time when they are not static)."""
    b = ctx.b
    axis = int(ctx.attr("axis"))
    sizes = [(static_shape(t) or [None] * (abs(axis) + 1))[axis] for t in ctx.x]
    if all(isinstance(s, (int, np.integer)) for s in sizes):
        return b.split(ctx.g, [int(s) for s in sizes], axis)
    axis %= rank_of(ctx.x[0], "Concat")
    extents = b.concat([b.shape(t, start=axis, end=axis + 1) for t in ctx.x], axis=0)
    parts = b.op("Split", ctx.g, extents, axis=axis, outputs=len(ctx.x))
    return parts if isinstance(parts, list) else [parts]


@rule("Split", multi_output=True)
def _split(ctx: VJP):
    """Concatenate the outputs' gradients; an output off the path contributes zeros."""
    b = ctx.b
    parts = [g if g is not None else b.zeros_like(y) for g, y in zip(ctx.grads, ctx.y)]
    return [b.concat(parts, int(ctx.attr("axis", 0)))]


@rule("Expand")
def _expand(ctx: VJP):
    return [unbroadcast(ctx.b, ctx.g, ctx.x[0], ctx.y[0]), None]


@rule("Slice", "Gather", "GatherElements", "GatherND", "Tile", "ReverseSequence", min_opset=16)
def _moved(ctx: VJP):
    return [move_elements(ctx)]


@rule("DepthToSpace", "SpaceToDepth", min_opset=16)
def _moved_float(ctx: VJP):
    return [move_elements(ctx, numbers=np.float32)]  # onnxruntime runs these on floats only


@rule("Pad", min_opset=16)
def _pad(ctx: VJP):
    # Padded constants must land in the dummy slot 0, whatever constant_value was.
    return [move_elements(ctx, replace={2: None})]


@rule("Resize", min_opset=16)
def _resize(ctx: VJP):
    """Nearest: an element mover. Linear and cubic are separable linear maps: along each
    resized axis y = W x, so dx = W^T g, with W read off the same Resize run on an identity
    basis (so it matches onnxruntime's coordinate conventions exactly)."""
    if ctx.attr("mode", "nearest") == "nearest":
        return [move_elements(ctx, numbers=np.int32)]  # onnxruntime's Resize has no int64 kernel
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    x_dims, y_dims = known_dims(x), known_dims(y)
    if x_dims is None or y_dims is None:
        raise NotImplementedError("linear/cubic Resize gradient needs static shapes")
    if ctx.attr("coordinate_transformation_mode") == "tf_crop_and_resize" or \
            ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize with tf_crop_and_resize or a keep_aspect_ratio_policy")
    scales = _resize_scales(ctx, len(x_dims))
    resized = [a for a, (i, o) in enumerate(zip(x_dims, y_dims))
               if i != o or (scales is not None and scales[a] != 1)]
    spare = [a for a in range(len(x_dims)) if a not in resized]
    if not spare:
        raise NotImplementedError("Resize of every axis (no axis left to hold the basis)")
    grad = ctx.g
    for axis in resized:
        matrix = _resize_matrix(ctx, axis, spare[0], x_dims, y_dims, scales)
        grad = _along_axis(b, matrix, grad, axis, len(x_dims))
    return [grad]


def _resize_scales(ctx: VJP, rank: int) -> np.ndarray | None:
    """Full-rank constant scales, or None when the Resize is driven by sizes."""
    sizes = ctx.const_input(3)
    if sizes is not None and sizes.size:
        return None
    scales = ctx.const_input(2)
    if scales is None:
        raise NotImplementedError("Resize with computed scales/sizes")
    full = np.ones(rank, np.float32)
    axes = ctx.attr("axes")
    full[[a % rank for a in axes] if axes is not None else list(range(rank))] = scales
    return full


def _resize_matrix(ctx: VJP, axis: int, spare: int, x_dims, y_dims, scales) -> Tensor:
    """W^T [n_in, n_out] of the Resize along ``axis``: the op applied to eye(n_in) laid out on
    (spare, axis), every other axis of size 1."""
    b, rank = ctx.b, len(x_dims)
    n_in, n_out = x_dims[axis], y_dims[axis]
    shape = [1] * rank
    shape[axis] = shape[spare] = n_in
    basis = b.const(np.eye(n_in).reshape(shape))
    attrs = {k: v for k, v in ctx.node.attrs.items() if k not in ("axes", "keep_aspect_ratio_policy")}
    if scales is not None:
        axis_scales = np.ones(rank, np.float32)
        axis_scales[axis] = scales[axis]
        out = b.op("Resize", basis, None, b.const(axis_scales, np.float32), **attrs)
    else:
        sizes = list(shape)
        sizes[axis] = n_out
        out = b.op("Resize", basis, None, None, b.ints(sizes), **attrs)
    if spare < axis:
        return b.reshape(out, [n_in, n_out])
    return b.transpose(b.reshape(out, [n_out, n_in]), [1, 0])


def _along_axis(b: Emitter, matrix: Tensor, grad: Tensor, axis: int, rank: int) -> Tensor:
    """``matrix`` [n_in, n_out] applied to ``grad`` along ``axis`` (which has n_out): move
    the axis to the rows, multiply from the left, move it back."""
    if axis == rank - 2 or rank == 1:
        return b.matmul(matrix, grad)
    perm = list(range(rank))
    perm[axis], perm[rank - 2] = perm[rank - 2], perm[axis]
    return b.transpose(b.matmul(matrix, b.transpose(grad, perm)), perm)
