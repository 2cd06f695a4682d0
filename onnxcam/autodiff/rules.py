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
  the adjoint is ConvTranspose with the begin pads only, cropped or padded to the input size
  (a stride-1 Conv's adjoint is a Conv with the flipped kernel instead, much faster on
  onnxruntime's CPU provider: :func:`conv_input_grad`).

Sizes known only at run time flow through the same formulas as :class:`Dim` values (int64
tensors with integer arithmetic), so one rule serves static and dynamic shapes.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator, Sequence
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
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        producer = tensor.inputs[0] if tensor.inputs else None  # a Constant node (TorchScript's ReduceMean axes)
        if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
            value = producer.attrs["value"]
            return np.asarray(value.values if isinstance(value, gs.Constant) else value)
        return None


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


class Dim:
    """A size known only at run time (an int64 tensor of shape [1]) with the integer
    arithmetic of the size formulas, so that one formula serves sizes known at build time
    (plain ints, computed here) and sizes known at run time (emitted as nodes). ``//`` is
    ONNX Div, which truncates: the formulas only divide non-negative sizes, where that is
    the floor."""

    def __init__(self, b: Emitter, tensor: Tensor):
        self.b, self.tensor = b, tensor

    def _emit(self, op: str, left: Size, right: Size) -> Dim:
        return Dim(self.b, self.b.op(op, sizes_tensor(self.b, [left]), sizes_tensor(self.b, [right])))

    def __add__(self, other: Size) -> Dim: return self._emit("Add", self, other)
    def __radd__(self, other: Size) -> Dim: return self._emit("Add", other, self)
    def __sub__(self, other: Size) -> Dim: return self._emit("Sub", self, other)
    def __rsub__(self, other: Size) -> Dim: return self._emit("Sub", other, self)
    def __mul__(self, other: Size) -> Dim: return self._emit("Mul", self, other)
    def __rmul__(self, other: Size) -> Dim: return self._emit("Mul", other, self)
    def __floordiv__(self, other: Size) -> Dim: return self._emit("Div", self, other)


#: A size: an int when known at build time, a :class:`Dim` when known only at run time.
Size = int | Dim


def size_max(a: Size, c: Size) -> Size:
    dim = a if isinstance(a, Dim) else c
    if not isinstance(dim, Dim):
        return max(a, c)
    return Dim(dim.b, dim.b.op("Max", sizes_tensor(dim.b, [a]), sizes_tensor(dim.b, [c])))


def all_known(sizes: Sequence[Size]) -> bool:
    return not any(isinstance(s, Dim) for s in sizes)


def sizes_tensor(b: Emitter, sizes: Sequence[Size]) -> Tensor:
    """``sizes`` as an int64 vector: a constant when all are known at build time."""
    if all_known(sizes):
        return b.ints([int(s) for s in sizes])
    parts = [s.tensor if isinstance(s, Dim) else b.ints([int(s)]) for s in sizes]
    return parts[0] if len(parts) == 1 else b.concat(parts, axis=0)


def axis_size(b: Emitter, tensor: gs.Tensor, axis: int) -> Size:
    """The size of ``tensor`` along ``axis``: from its static shape, else read at run time."""
    shape = static_shape(tensor)
    if shape is None:
        raise NotImplementedError(f"gradient needs the rank of '{tensor.name}'")
    dim = shape[axis]
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return int(dim)
    return Dim(b, b.shape(tensor, start=axis, end=axis + 1))


def spatial_sizes(b: Emitter, tensor: gs.Tensor) -> list[Size]:
    """Sizes of the spatial axes (2, 3, ...) of an N, C, spatial... tensor."""
    return [axis_size(b, tensor, axis) for axis in range(2, rank_of(tensor, "spatial"))]


def spatial_pads(ctx: VJP, spatial_in: Sequence[Size], kernel: Sequence[int],
                 strides: Sequence[int], dilations: Sequence[int]) -> list[Size]:
    """Explicit [begin..., end...] pads of a Conv or pool, resolving auto_pad: SAME makes
    ``out = ceil(n/s)`` and pads ``total = max((out-1)*s + d*(k-1) + 1 - n, 0)``, the odd extra
    pad at the end (SAME_UPPER) or the begin (SAME_LOWER); VALID: none. Pads of a size known
    only at run time are :class:`Dim` sizes, except under stride 1, where out = n and the
    total is d*(k-1) whatever n."""
    rank = len(kernel)
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        return list(ctx.attr("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        return [0] * 2 * rank
    begins, ends = [], []
    for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
        if s == 1:
            total = (k - 1) * d  # out = n: the same total whatever n (static pads)
        else:
            out = (size + s - 1) // s
            total = size_max((out - 1) * s + (k - 1) * d + 1 - size, 0)
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


def window_adjoint(b: Emitter, grad: Tensor, weight, group: int, kernel: Sequence[int],
                   strides: Sequence[int], dilations: Sequence[int], begins: Sequence[Size],
                   x: gs.Tensor, y: gs.Tensor) -> Tensor:
    """Adjoint of a (grouped) sliding-window sum y[o] = sum_k w[k] x[o*s + k*d - begin]:
    ConvTranspose with the begin pads only, giving ``s*(o-1) + d*(k-1) + 1 - begin`` samples,
    then crop/zero-pad to the input size (``x``'s, read at run time when not static). Never
    ``output_shape``: it makes the spec ignore ``pads`` (the bug onnx-ad has on asymmetric
    pads). Begin pads known only at run time (auto_pad SAME on a dynamic size) cannot be an
    attribute: ConvTranspose then runs unpadded and a run-time Slice drops the first
    ``begin`` samples."""
    rank = len(kernel)
    static = all_known(begins)
    dx = b.op("ConvTranspose", grad, weight, group=group, strides=list(strides),
              dilations=list(dilations), pads=([int(p) for p in begins] if static else [0] * rank) + [0] * rank)
    in_spatial, out_spatial = static_spatial(x), static_spatial(y)
    if not static:
        dx = b.op("Slice", dx, sizes_tensor(b, begins), b.ints([np.iinfo(np.int64).max] * rank),
                  b.ints(list(range(2, 2 + rank))))
    if not static or in_spatial is None or out_spatial is None:
        return fit_spatial_like(b, dx, x, rank)
    produced = [s * (o - 1) + d * (k - 1) + 1 - p
                for s, o, d, k, p in zip(strides, out_spatial, dilations, kernel, begins)]
    return fit_spatial(b, dx, produced, in_spatial)


def window_geometry(ctx: VJP, kernel: Sequence[int] | None = None):
    """kernel, strides, dilations and explicit pads of a Conv or pool node (auto_pad SAME on
    an input size known only at run time gives :class:`Dim` pads)."""
    kernel = list(kernel if kernel is not None else ctx.attr("kernel_shape"))
    rank = len(kernel)
    strides = list(ctx.attr("strides", [1] * rank))
    dilations = list(ctx.attr("dilations", [1] * rank))
    same = ctx.attr("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")
    if same and any(d != 1 for d in dilations):
        raise NotImplementedError(
            f"{ctx.node.op} with auto_pad SAME and dilations: onnxruntime refuses it for Conv and pads "
            "pools without the dilation, so its output size differs from the ONNX spec's")
    in_spatial = spatial_sizes(ctx.b, ctx.x[0]) if same else []
    pads = spatial_pads(ctx, in_spatial, kernel, strides, dilations)
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


_INT64_MAX, _INT64_MIN = int(np.iinfo(np.int64).max), int(np.iinfo(np.int64).min)


def _lead_and_spatial(b: Emitter, lead: Sequence[int], like: gs.Tensor) -> Tensor:
    """The shape ``lead + like.shape[2:]``: a constant when ``like``'s spatial dims are static,
    else read at run time."""
    spatial = static_spatial(like)
    if spatial is not None:
        return b.ints(list(lead) + spatial)
    return b.concat([b.ints(list(lead)), b.shape(like, start=2)], axis=0)


def _per_group(weight: gs.Tensor, source: gs.Tensor, group: int, what: str) -> int:
    """Channels per group of a convolution's source: ``weight.shape[1]``, else C / group."""
    for dims, divide in ((static_shape(weight), 1), (static_shape(source), group)):
        if dims is not None and len(dims) > 1 and isinstance(dims[1], (int, np.integer)):
            return int(dims[1]) // divide
    raise NotImplementedError(f"{what} weight gradient with groups needs a static channel count")


def conv_weight_grad(b: Emitter, source: Tensor, source_like: gs.Tensor, sink: Tensor, sink_like: gs.Tensor,
                     group: int, per_group: int, kernel: Sequence[int], strides: Sequence[int],
                     dilations: Sequence[int], pads: Sequence[Size]) -> Tensor:
    """Weight gradient of a grouped convolution ``y = Conv(source, W)`` (W [M, C_g, K...],
    strides s, dilations d, pads p) given ``sink`` = dL/dy, channels c = gamma*C_g + c' and
    m = gamma*M_g + m' in group gamma::

        dW[m, c', k] = sum_{n, o} sink[n, m, o] * source_pad[n, gamma*C_g + c', o*s + k*d]

    That is itself a Conv over o with batch and channel axes swapped: input ``source`` as
    [C_g, G*N, ...] (channel gamma*N + n), kernel ``sink`` as [M, N, ...], group G, strides d
    and dilations s (swapped), the forward pads. Its K' = floor((n + p_b + p_e - s(o-1) - 1)/d)
    + 1 >= K samples (the forward's o = floor((n + p_b + p_e - d(K-1) - 1)/s) + 1) are cropped
    to K and the result transposed to [M, C_g, K...]. ``*_like`` carry the static shapes of
    ``source`` and ``sink``; pads known only at run time are applied by a Pad before."""
    rank = len(kernel)
    spatial = list(range(2, 2 + rank))
    if not all_known(pads):
        source = b.pad(source, sizes_tensor(b, [0, 0] + list(pads[:rank]) + [0, 0] + list(pads[rank:])))
        source_like, pads = source, [0] * 2 * rank  # (its sizes are read from it at run time)
    if group == 1:
        lhs = b.transpose(source, [1, 0] + spatial)
    else:
        split = b.reshape(source, [0, group, per_group, -1])  # [N, G, C_g, prod(space)]
        lhs = b.reshape(b.transpose(split, [2, 1, 0, 3]), _lead_and_spatial(b, [per_group, -1], source_like))
    dw = b.op("Conv", lhs, b.transpose(sink, [1, 0] + spatial), group=group, strides=list(dilations),
              dilations=list(strides), pads=list(pads))
    n_in, n_out = static_spatial(source_like), static_spatial(sink_like)
    produced = None if n_in is None or n_out is None else [
        (n + pb + pe - s * (o - 1) - 1) // d + 1
        for n, o, pb, pe, s, d in zip(n_in, n_out, pads[:rank], pads[rank:], strides, dilations)]
    if produced != list(kernel):
        dw = b.slice(dw, [0] * rank, list(kernel), spatial)
    return b.transpose(dw, [1, 0] + spatial)


def _adjoint_kernel(ctx: VJP, group: int, rank: int) -> Tensor | None:
    """Conv's weight W [M, C_g, K...] as the kernel of its adjoint, W'[gamma*C_g + c', m', k]
    = W[gamma*M_g + m', c', K-1-k] ([C, M_g, K...]: transposed per group, flipped), or None
    when W's shape is not static. Emitted as nodes even when W is a constant: onnxruntime
    folds them when the session loads, and the model file keeps one copy of the weights
    (a folded constant would double the size of every rewritten model)."""
    b, weight, value = ctx.b, ctx.x[1], ctx.const_input(1)
    dims = list(value.shape) if value is not None else known_dims(weight)
    if dims is None:
        return None
    (m, cg), kernel = dims[:2], dims[2:]
    grouped = [group, m // group, cg] + kernel
    flat = [group * cg, m // group] + kernel
    swap = [0, 2, 1] + list(range(3, 3 + rank))
    if group == 1:
        turned = b.transpose(weight, [1, 0] + list(range(2, 2 + rank)))
    else:
        turned = b.reshape(b.transpose(b.reshape(weight, grouped), swap), flat)
    if all(k == 1 for k in kernel):
        return turned  # nothing to flip
    return b.slice(turned, [-1] * rank, [_INT64_MIN] * rank, list(range(2, 2 + rank)), [-1] * rank)


def conv_input_grad(ctx: VJP, group: int, kernel: Sequence[int], strides: Sequence[int],
                    dilations: Sequence[int], pads: Sequence[Size]) -> Tensor:
    """Input gradient of a grouped Conv. With stride 1 it is a Conv again::

        dx[i] = sum_k W[k] g[i + p_b - k*d] = sum_k W'[k] g_pad[i + k*d],  W' = W flipped

    with the per-group transposed, flipped kernel of :func:`_adjoint_kernel` and pads
    d(K-1) - p (begin and end): exactly n_in samples, no crop. A pad larger than d(K-1)
    makes those g samples read nothing but padding: they are sliced off first. onnxruntime's
    CPU Conv (GEMM, im2col, depthwise kernels) is much faster than the ConvTranspose (col2im)
    of :func:`window_adjoint`, which remains for strides > 1 (and pads known only at run
    time)."""
    b, rank = ctx.b, len(kernel)
    adjoint = _adjoint_kernel(ctx, group, rank) if all(s == 1 for s in strides) and all_known(pads) else None
    if adjoint is None:
        return window_adjoint(b, ctx.g, ctx.x[1], group, kernel, strides, dilations, pads[:rank],
                              ctx.x[0], ctx.y[0])
    margins = [d * (k - 1) - p for d, k, p in zip(list(dilations) * 2, list(kernel) * 2, pads)]
    grad = ctx.g
    if any(m < 0 for m in margins):
        grad = b.slice(grad, [max(-m, 0) for m in margins[:rank]],
                       [m if m < 0 else _INT64_MAX for m in margins[rank:]], list(range(2, 2 + rank)))
    return b.op("Conv", grad, adjoint, group=group, dilations=list(dilations),
                pads=[max(m, 0) for m in margins], kernel_shape=list(kernel))


@rule("Conv")
def _conv(ctx: VJP):
    """y = Conv(x, W) + B: dx by :func:`conv_input_grad`, dW by :func:`conv_weight_grad`
    (weights computed from the input: dynamic/conditional convolutions), dB by
    :func:`_bias_grad`."""
    b, (x, weight), group = ctx.b, ctx.x[:2], int(ctx.attr("group", 1))
    kernel, strides, dilations, pads = window_geometry(
        ctx, ctx.attr("kernel_shape", (static_shape(weight) or [])[2:]))
    if not kernel:
        raise NotImplementedError("Conv gradient needs the kernel size (kernel_shape or a static weight)")
    if not all_known(pads) and all(s == 1 for s in strides):
        # auto_pad SAME at stride 1 pads d(k-1) in total whatever the size: any size gives them.
        pads = spatial_pads(ctx, [1] * len(kernel), kernel, strides, dilations)
    dx = conv_input_grad(ctx, group, kernel, strides, dilations, pads) if ctx.needs(0) else None
    dw = None
    if ctx.needs(1):
        per_group = _per_group(weight, x, group, "Conv") if group > 1 else 0
        dw = conv_weight_grad(b, x, x, ctx.g, ctx.y[0], group, per_group, kernel, strides, dilations, pads)
    return [dx, dw, _bias_grad(ctx, 2)]


def conv_transpose_geometry(ctx: VJP) -> tuple[list[int], list[int], list[int], list[Size]]:
    """kernel, strides, dilations and the pads [begin..., end'...] that place g at offset
    ``begin`` of y_full (length f = s(n-1) + d(k-1) + 1) for a ConvTranspose node: pads and
    auto_pad/output_shape resolved as the spec and onnxruntime do (total = f + output_padding
    - out, the odd extra at the end for SAME_UPPER, a negative total is 0 with zeros
    appended), end' = max(f - begin - out, 0) pads g up to y_full's length."""
    b = ctx.b
    in_spatial, out_spatial = spatial_sizes(b, ctx.x[0]), spatial_sizes(b, ctx.y[0])
    kernel = list(ctx.attr("kernel_shape", (static_shape(ctx.x[1]) or [])[2:]))
    rank = len(kernel)
    strides = list(ctx.attr("strides", [1] * rank))
    dilations = list(ctx.attr("dilations", [1] * rank))
    extra = list(ctx.attr("output_padding", [0] * rank))
    full = [s * (n - 1) + d * (k - 1) + 1 for s, n, d, k in zip(strides, in_spatial, dilations, kernel)]
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if ctx.attr("output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [size_max(f + e - o, 0) for f, e, o in zip(full, extra, out_spatial)]
        begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    else:
        begins = list(ctx.attr("pads", [0] * 2 * rank))[:rank]
    ends = [size_max(f - p - o, 0) for f, p, o in zip(full, begins, out_spatial)]
    return kernel, strides, dilations, begins + ends


def _conv_transpose_weight_grad(ctx: VJP) -> Tensor | None:
    """dW of y = ConvTranspose(x, W): by <g, ConvTranspose(x, W)> = <Conv(g_pad, W), x> (the
    input-gradient identity), W is the kernel of a Conv from g (padded to y_full) to x, so
    dW is :func:`conv_weight_grad` with source g and sink x::

        dW[c, m', k] = sum_{n, i} x[n, c, i] * g_pad[n, gamma*M_g + m', i*s + k*d]
    """
    if not ctx.needs(1):
        return None
    group = int(ctx.attr("group", 1))
    kernel, strides, dilations, pads = conv_transpose_geometry(ctx)
    per_group = _per_group(ctx.x[1], ctx.y[0], group, "ConvTranspose") if group > 1 else 0
    return conv_weight_grad(ctx.b, ctx.g, ctx.y[0], ctx.x[0], ctx.x[0], group, per_group, kernel,
                            strides, dilations, pads)


def _conv_transpose_input_grad(ctx: VJP) -> Tensor:
    """dx = Conv(g, W, pads [begin, end']) cropped/padded to x (see :func:`_conv_transpose`).
    Pads known only at run time cannot be attributes: g is zero-padded by a Pad node and the
    Conv runs unpadded; its ``floor((begin + o + end' - d(k-1) - 1)/s) + 1`` samples are then
    fitted to x's run-time size."""
    b, weight = ctx.b, ctx.x[1]
    kernel, strides, dilations, pads = conv_transpose_geometry(ctx)
    rank = len(kernel)
    conv = dict(group=int(ctx.attr("group", 1)), strides=strides, dilations=dilations, kernel_shape=kernel)
    if not all_known(pads):
        padded = b.pad(ctx.g, sizes_tensor(b, [0, 0] + pads[:rank] + [0, 0] + pads[rank:]))
        return fit_spatial_like(b, b.op("Conv", padded, weight, **conv), ctx.x[0], rank)
    dx = b.op("Conv", ctx.g, weight, pads=[int(p) for p in pads], **conv)
    out_spatial, in_spatial = static_spatial(ctx.y[0]), static_spatial(ctx.x[0])
    if out_spatial is None or in_spatial is None:
        return fit_spatial_like(b, dx, ctx.x[0], rank)
    produced = [(o + p + e - d * (k - 1) - 1) // s + 1 for o, p, e, d, k, s
                in zip(out_spatial, pads[:rank], pads[rank:], dilations, kernel, strides)]
    return fit_spatial(b, dx, produced, in_spatial)


@rule("ConvTranspose")
def _conv_transpose(ctx: VJP):
    """y = crop(y_full, begin), y_full[i*s + k*d] += x[i] w[k] (length s(n-1) + d(k-1) + 1,
    plus output_padding). The adjoint correlates g placed at offset ``begin`` of y_full with
    w: a Conv with the same weight, group, strides, dilations and pads [begin, end'], where
    end' pads g to y_full's length (a negative end' is cropped after). dW: see
    :func:`_conv_transpose_weight_grad`."""
    dx = _conv_transpose_input_grad(ctx) if ctx.needs(0) else None
    return [dx, _conv_transpose_weight_grad(ctx), _bias_grad(ctx, 2)]


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


def _einsum_explicit(ctx: VJP, terms: list[list[str]], out: list[str]
                     ) -> tuple[list[list[str]], list[str], Iterator[str]]:
    """The equation with every "..." spelled out in unused letters, so that a gradient never
    has to broadcast through an ellipsis, and the letters still unused.

    The ellipsis dims of the operands are right-aligned, as broadcasting aligns them. A
    position where all of them are the same dim gets one letter; a dim 1 there that others
    broadcast (a different, or unknown, size) gets a letter of its own, used by no other
    operand: the forward sum over it is trivial, and in the gradient the broadcast letter is
    summed away by the einsum itself, y = sum over the broadcast dims of what that operand
    fed. Sizes unknown at build time are taken to be equal (onnxruntime's shape check
    rejects unequal ellipsis dims other than 1 when they are known)."""
    used = {t for term in terms + [out] for t in term}
    free = iter([c for c in string.ascii_letters if c not in used])
    spans: list[list | None] = []
    for term, tensor in zip(terms, ctx.x):
        if "..." not in term:
            spans.append(None)
            continue
        start, rank = term.index("..."), rank_of(tensor, "Einsum with '...'")
        spans.append(list(static_shape(tensor)[start:start + rank - len(term) + 1]))
    width = max((len(span) for span in spans if span is not None), default=0)
    try:
        shared = [next(free) for _ in range(width)]
        at = [[span[p - width + len(span)] for span in spans if span is not None and p >= width - len(span)]
              for p in range(width)]
        explicit = []
        for term, span in zip(terms, spans):
            letters = []
            for p, dim in enumerate(span or []):
                position = width - len(span) + p
                broadcast = dim == 1 and any(other != 1 for other in at[position])
                letters.append(next(free) if broadcast else shared[position])
            explicit.append(_spell_ellipsis(term, letters))
    except StopIteration:
        raise NotImplementedError("Einsum gradient: too many subscripts to spell out '...'") from None
    return explicit, _spell_ellipsis(out, shared), free


def _spell_ellipsis(term: list[str], letters: list[str]) -> list[str]:
    if "..." not in term:
        return term
    at = term.index("...")
    return term[:at] + letters + term[at + 1:]


def _letter_size(b: Emitter, tensor: gs.Tensor, axis: int) -> Tensor:
    """The size of ``tensor`` along ``axis`` as an int64 vector [n] (constant when static)."""
    dims = static_shape(tensor)
    dim = dims[axis] if dims is not None else None
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return b.ints([int(dim)])
    return b.shape(tensor, start=axis, end=axis + 1)


def _einsum_embed(b: Emitter, grad: Tensor, kept: list[str], term: list[str], x: gs.Tensor,
                  free: Iterator[str]) -> Tensor:
    """The gradient over the letters ``kept`` (each once) placed into ``x``'s layout ``term``:
    letters of ``term`` missing from ``kept`` (summed away by the forward) are broadcast
    with ones vectors 1[l]; a letter repeated in ``term`` (a diagonal, "ii", "bii") gets a
    fresh letter per extra occurrence tied to the first by an identity, so g lands on the
    diagonal and zeros elsewhere::

        dx[t relabeled] = einsum(grad[kept], I[l, l'] ..., 1[u] ... -> t relabeled)
    """
    if kept == term:
        return grad
    operands, subscripts, relabeled, first = [grad], ["".join(kept)], [], set()
    for axis, letter in enumerate(term):
        if letter in first:
            fresh = next(free, None)
            if fresh is None:
                raise NotImplementedError("Einsum gradient: too many subscripts for a diagonal")
            operands.append(_identity_matrix(b, x, axis))
            subscripts.append(letter + fresh)
            relabeled.append(fresh)
            continue
        first.add(letter)
        relabeled.append(letter)
        if letter not in kept and term.count(letter) == 1:  # (an identity carries a repeated one)
            operands.append(b.expand(b.const(np.float32(1.0)), _letter_size(b, x, axis)))
            subscripts.append(letter)
    return b.einsum(",".join(subscripts) + "->" + "".join(relabeled), *operands)


def _identity_matrix(b: Emitter, x: gs.Tensor, axis: int) -> Tensor:
    """I[n, n], n = the size of ``x`` along ``axis`` (a constant when static)."""
    dims = static_shape(x)
    dim = dims[axis] if dims is not None else None
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return b.const(np.eye(int(dim)))
    size = _letter_size(b, x, axis)
    return b.op("EyeLike", b.expand(b.const(np.float32(0.0)), b.concat([size, size], axis=0)))


@rule("Einsum")
def _einsum(ctx: VJP):
    """Einsum is linear in each operand: with "..." spelled out in letters
    (:func:`_einsum_explicit`), d operand_i = einsum(g, other operands -> the letters of
    operand i that occur in g or another operand, each once), then placed into operand i's
    layout by :func:`_einsum_embed` (summed-away letters broadcast back, repeated letters on
    the diagonal). Broadcasting through "..." needs no unbroadcast: a dim 1 that others
    broadcast has a letter of its own, and the broadcast letter is summed by the einsum."""
    b = ctx.b
    terms, out = _einsum_subscripts(ctx.attr("equation"))
    terms, out, free = _einsum_explicit(ctx, terms, out)
    join = "".join
    grads: list[Tensor | None] = []
    for i, term in enumerate(terms):
        if not ctx.needs(i):
            grads.append(None)
            continue
        others = [t for j, t in enumerate(terms) if j != i]
        seen = set(out).union(*others)
        kept = [t for t in dict.fromkeys(term) if t in seen]
        equation = ",".join(join(t) for t in [out] + others) + "->" + join(kept)
        grad = ctx.g if not others and kept == out else \
            b.einsum(equation, ctx.g, *[x for j, x in enumerate(ctx.x) if j != i])
        grads.append(_einsum_embed(b, grad, kept, term, ctx.x[i], free))
    return grads


# -- pooling ----------------------------------------------------------------------------------

@rule("GlobalAveragePool")
def _global_average_pool(ctx: VJP):
    b, x = ctx.b, ctx.x[0]
    shape = static_shape(x)
    spatial = shape[2:] if shape is not None else None
    if spatial and all(isinstance(d, (int, np.integer)) for d in spatial):
        return [b.spread(ctx.g, x, range(2, len(shape)), 1.0 / float(np.prod(spatial)))]
    scaled = b.div(ctx.g, b.as_float(b.op("ReduceProd", b.shape(x, start=2), keepdims=1)))
    return [b.expand(scaled, b.shape(x))]


@rule("GlobalMaxPool")
def _global_max_pool(ctx: VJP):
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    spatial = list(range(2, rank_of(x, "GlobalMaxPool")))
    return [b.mul(ctx.g, ties_mask(b, x, y, spatial))]


def _window_counts(ctx: VJP) -> Tensor:
    """How many elements each AveragePool window divides by, as onnxruntime counts them: the
    taps inside the input (count_include_pad=0), or inside the input and its explicit pads
    (count_include_pad=1; a ceil_mode window's overhang past the end pad never counts). That
    is the window sum of a ones map padded with count_include_pad over the pads,
    ``c = crop_y(Conv(Pad(1, pads, value=count_include_pad), ones_k))``, the Conv zero-padding
    s-1 more at the end so that the last windows ceil_mode adds exist; built in the graph
    from the run-time sizes (a constant subgraph onnxruntime folds when they are static)."""
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    kernel, strides, dilations, pads = window_geometry(ctx)
    rank = len(kernel)
    ones = b.full(sizes_tensor(b, [1, 1] + spatial_sizes(b, x)), 1.0)
    include = float(ctx.attr("count_include_pad", 0))
    padded = b.op("Pad", ones, sizes_tensor(b, [0, 0] + pads[:rank] + [0, 0] + pads[rank:]), b.const(include))
    counts = b.op("Conv", padded, b.const(np.ones([1, 1] + kernel)), kernel_shape=kernel, strides=strides,
                  dilations=dilations, pads=[0] * rank + [s - 1 for s in strides])
    return b.op("Slice", counts, b.ints([0] * rank), sizes_tensor(b, spatial_sizes(b, y)),
                b.ints(list(range(2, 2 + rank))))


@rule("AveragePool")
def _average_pool(ctx: VJP):
    """y = S(x) / c, S the window sum and c each window's count: dx = S^T(g / c)."""
    return [window_sum_adjoint(ctx, ctx.b.div(ctx.g, _window_counts(ctx)))]


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
    dims = static_shape(x)
    if dims is not None and axes and all(isinstance(dims[i], (int, np.integer)) and dims[i] > 0 for i in axes):
        count = float(np.prod([int(dims[i]) for i in axes]))
        return [b.spread(g, x, axes, 1.0 / count if ctx.node.op == "ReduceMean" else 1.0), None]
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
    basis (so it matches onnxruntime's coordinate conventions exactly): eye(n_in), a constant
    when n_in is known at build time, else built at run time (EyeLike)."""
    if ctx.attr("mode", "nearest") == "nearest":
        return [move_elements(ctx, numbers=np.int32)]  # onnxruntime's Resize has no int64 kernel
    rank = rank_of(ctx.x[0], "Resize")
    if ctx.attr("coordinate_transformation_mode") == "tf_crop_and_resize" or \
            ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NotImplementedError("Resize with tf_crop_and_resize or a keep_aspect_ratio_policy")
    if rank < 2:
        raise NotImplementedError("linear/cubic Resize of a 1-D tensor (no second axis to hold the basis)")
    scales = _resize_scales(ctx, rank)
    grad = ctx.g
    for axis in _resized_axes(ctx, rank, scales):
        grad = _along_axis(ctx.b, _resize_matrix(ctx, axis, scales), grad, axis, rank)
    return [grad]


def _resize_scales(ctx: VJP, rank: int) -> np.ndarray | None:
    """Full-rank constant scales, or None when the Resize is driven by sizes (constant or
    computed at run time)."""
    sizes = ctx.const_input(3)
    if ctx.has_input(3) and (sizes is None or sizes.size):
        return None
    scales = ctx.const_input(2)
    if scales is None:
        raise NotImplementedError("linear/cubic Resize with scales computed at run time "
                                  "(constant scales, or sizes, are supported)")
    full = np.ones(rank, np.float32)
    axes = ctx.attr("axes")
    full[[a % rank for a in axes] if axes is not None else list(range(rank))] = scales
    return full


def _resized_axes(ctx: VJP, rank: int, scales: np.ndarray | None) -> list[int]:
    """Axes the Resize changes: those with scale != 1 (a scale near 1 resamples even where the
    size stays), or, driven by sizes, every axis whose input and output sizes are not known
    to be equal (equal sizes mean scale 1: the identity)."""
    if scales is not None:
        return [a for a in range(rank) if scales[a] != 1]
    before = static_shape(ctx.x[0])
    after = static_shape(ctx.y[0]) or [None] * rank
    known = [d is not None and not (isinstance(d, (int, np.integer)) and d < 0) for d in before]
    return [a for a in range(rank) if not (known[a] and before[a] == after[a])]


def _resize_matrix(ctx: VJP, axis: int, scales: np.ndarray | None) -> Tensor:
    """W^T [n_in, n_out] of the Resize along ``axis``: the op applied to eye(n_in) laid out on
    (spare, axis), every other axis of size 1, with scale 1 (or its size kept) on ``spare``,
    any other axis."""
    b, x, y = ctx.b, ctx.x[0], ctx.y[0]
    rank = rank_of(x, "Resize")
    spare = 1 if axis == 0 else 0
    others = [a for a in range(rank) if a not in (spare, axis)]
    n_in = axis_size(b, x, axis)
    if isinstance(n_in, Dim):
        eye = b.op("EyeLike", b.zeros(sizes_tensor(b, [n_in, n_in])))
        basis = b.unsqueeze(eye, others) if others else eye
    else:
        shape = [1] * rank
        shape[axis] = shape[spare] = n_in
        basis = b.const(np.eye(n_in).reshape(shape))
    attrs = {k: v for k, v in ctx.node.attrs.items() if k not in ("axes", "keep_aspect_ratio_policy")}
    if scales is not None:
        axis_scales = np.ones(rank, np.float32)
        axis_scales[axis] = scales[axis]
        out = b.op("Resize", basis, None, b.const(axis_scales, np.float32), **attrs)
    else:
        sizes: list[Size] = [1] * rank
        sizes[spare], sizes[axis] = n_in, axis_size(b, y, axis)
        out = b.op("Resize", basis, None, None, sizes_tensor(b, sizes), **attrs)
    matrix = b.squeeze(out, others) if others else out  # [n_in, n_out] or [n_out, n_in]
    return matrix if spare < axis else b.transpose(matrix, [1, 0])


def _along_axis(b: Emitter, matrix: Tensor, grad: Tensor, axis: int, rank: int) -> Tensor:
    """``matrix`` [n_in, n_out] applied to ``grad`` along ``axis`` (which has n_out): move
    the axis to the rows, multiply from the left, move it back."""
    if axis == rank - 2 or rank == 1:
        return b.matmul(matrix, grad)
    perm = list(range(rank))
    perm[axis], perm[rank - 2] = perm[rank - 2], perm[axis]
    return b.transpose(b.matmul(matrix, b.transpose(grad, perm)), perm)


# -- quantization (QDQ models) ----------------------------------------------------------------

#: Rules that are estimators, not derivatives (quantization is piecewise constant): checked
#: against their definition, not finite differences.
STRAIGHT_THROUGH = frozenset({"QuantizeLinear", "DequantizeLinear"})

#: Integer range of each QuantizeLinear output type.
_QUANT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
                 np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535)}


def _per_axis(ctx: VJP, tensor: gs.Tensor) -> Tensor:
    """A scale or zero point as float, shaped to broadcast against the quantized tensor: a
    1-D per-axis one gets size 1 on every axis but ``axis``."""
    b, x = ctx.b, ctx.x[0]
    if ctx.attr("block_size", 0):
        raise NotImplementedError("blocked quantization (block_size) has no gradient rule")
    value = b.as_float(tensor) if tensor.dtype is None or np.dtype(tensor.dtype) != b.float_dtype else tensor
    shape = static_shape(tensor)
    if shape is None or len(shape) == 0 or (len(shape) == 1 and shape[0] == 1):
        return value
    rank = rank_of(x, ctx.node.op)
    axis = ctx.attr("axis", 1) % rank
    return b.reshape(value, [-1 if a == axis else 1 for a in range(rank)])


@rule("DequantizeLinear")
def _dequantize_linear(ctx: VJP):
    """y = (q - zero_point) * scale: dq = g * scale (the gradient of the integers is carried
    as float; only :func:`_quantize_linear` consumes it)."""
    return [ctx.b.mul(ctx.g, _per_axis(ctx, ctx.x[1]))]


@rule("QuantizeLinear")
def _quantize_linear(ctx: VJP):
    """q = saturate(round(x / scale) + zero_point): the straight-through estimator (Bengio et
    al. 2013, as quantization-aware training uses it, e.g. torch's ``fake_quantize``
    backward): rounding counts as the identity, saturation does not, so
    dx = g / scale where ``qmin <= round(x / scale) + zero_point <= qmax``, else 0. With the
    DequantizeLinear after it (same scale) a QDQ pair passes g through unchanged wherever x is
    inside the representable range."""
    b, x, q = ctx.b, ctx.x[0], ctx.y[0]
    scale = _per_axis(ctx, ctx.x[1])
    zero = _per_axis(ctx, ctx.x[2]) if ctx.has_input(2) else 0.0
    dtype = q.dtype if q.dtype is not None else (ctx.x[2].dtype if ctx.has_input(2) else np.uint8)
    try:
        low, high = _QUANT_RANGES[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise NotImplementedError(f"quantization to {dtype} has no gradient rule (int8, uint8, int16, "
                                  "uint16 have)") from None
    level = b.add(b.op("Round", b.div(x, scale)), zero)
    inside = b.and_(b.op("GreaterOrEqual", level, float(low)), b.op("LessOrEqual", level, float(high)))
    return [b.where(inside, b.div(ctx.g, scale), 0.0)]
