"""Maps computed inside the graph: :mod:`onnxcam.methods`' formulas and scaling as ONNX nodes.

A batch-1 Grad-CAM on a small model costs little more than its forward pass in onnxruntime;
what used to remain was Python per call: the channel weights, the weighted sum, the ReLU and
min-max scaling and the resize to the input, a dozen numpy passes and a ``cv2.resize`` per
map. Emitted into the rewritten graph (:mod:`onnxcam.surgery`, ``RewriteRequest.maps``) they
run in the same onnxruntime call, and ``Explainer.explain`` only reads the outputs.

Nothing here is a second copy of a formula:

* the method's map is :meth:`onnxcam.methods.Method.raw_map` itself, run on :class:`Traced`
  tensors that emit one node per numpy operation (weights first, through
  :meth:`~onnxcam.methods.Method.channel_weights`, so they can be returned too);
* the scaling is :func:`onnxcam.methods.combine_layers` written with ONNX ops
  (:func:`combine`): per layer ``nan_to_num``, ReLU, ``(m - min) / (max + 1e-7)`` per image,
  bilinear resize (``cv2.resize`` INTER_LINEAR is ONNX Resize ``linear`` with ``half_pixel``
  coordinates: both sample ``x_in = (x_out + 0.5) / s - 0.5`` clamped to the border, and
  cv2's switch to INTER_AREA for an exact 2x downscale averages the same 2x2 blocks), clip to
  [0, 1]; the mean over layers; that scaling once more (without the steps that cannot change
  a finite map in [0, 1]).

Float32 in both; only the order of the sums (ReduceMean vs numpy's pairwise sums) and the
resize's coordinate rounding differ, so maps agree with the numpy path to ~2e-6
(``tests/test_ingraph.py``). :mod:`onnxcam.export` builds its self-explaining models from the
same pieces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_graphsurgeon as gs

from .autodiff import Emitter
from .methods import METHODS, Method

#: scale_maps' epsilon in ``(m - min) / (max + eps)`` (pytorch-grad-cam's scale_cam_image).
SCALE_EPS = 1e-7
_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Axis of H in the image input, by layout (Explainer.input_layout).
H_AXIS = {"NCHW": 2, "NHWC": 1}
#: Output names of a rewrite with maps.
HEATMAP_OUTPUT = "onnxcam_heatmap"
WEIGHTS_PREFIX = "onnxcam_weights/"
#: Per image (N, 3): the sum of the image input, the sum of the logits (each finite exactly
#: when every value is, barring an overflow) and the heatmap's peak (0 for an all-zero map):
#: the Explainer's per-call checks, made where the data is (:func:`onnxcam.surgery._emit_checks`).
CHECKS_OUTPUT = "onnxcam_checks"
INPUT_SUM, LOGITS_SUM, MAP_PEAK = range(3)
#: The top-1 class (N, 1) int64 and the seed (N, C) each image was explained for.
TOP1_OUTPUT = "onnxcam_top1"
SEED_USED_OUTPUT = "onnxcam_seed_used"


def _formulas_fingerprint() -> str:
    """Hash of the code that shapes the emitted maps (this module and the formulas): part of
    every :class:`MapRequest`, so the rewrite cache's key changes with them."""
    here = Path(__file__).parent
    return hashlib.sha256(b"".join((here / n).read_bytes() for n in ("ingraph.py", "methods.py"))).hexdigest()[:16]


_FINGERPRINT = _formulas_fingerprint()


@dataclass(frozen=True)
class MapRequest:
    """What :func:`emit_maps` needs besides the graph: the method, the image layout, each
    layer's layout (as ``RewriteRequest.layers``), and the input size (H, W) when the image is
    not in the graph (a head) or to pin it (None: read from the image's shape)."""

    method: str
    input_layout: str
    layouts: tuple[str, ...]
    size: tuple[int, int] | None = None
    code: str = _FINGERPRINT


def in_graph(method: Method) -> bool:
    """Whether ``method``'s map is one formula on (A, G): the gradient methods without a
    principal component (an SVD per image)."""
    return method.kind == "gradient" and method.projection is None


def emit_maps(b: Emitter, request: MapRequest, activations: Sequence[gs.Tensor],
              gradients: Sequence[gs.Tensor], image: gs.Tensor | None) -> tuple[gs.Tensor, list[gs.Tensor | None]]:
    """The heatmap (N, H, W) in [0, 1] of ``request.method`` over the layers, and per layer its
    channel weights (N, K) (None for per-position methods). ``activations`` and ``gradients``
    in the layers' own layouts; ``image`` gives (H, W) when ``request.size`` is None."""
    spec = METHODS[request.method]
    raws, weights = [], []
    for A, G, layout in zip(activations, gradients, request.layouts):
        a, g = Traced(b, to_nchw(b, A, layout)), Traced(b, to_nchw(b, G, layout))
        w = spec.channel_weights(a, g) if spec.weights is not None else None
        raws.append(spec.raw_map(a, g, w).tensor)
        weights.append(None if w is None else w.tensor)
    hw = b.ints(request.size) if request.size is not None else input_hw(b, image, request.input_layout)
    size = request.size or static_hw(image, request.input_layout)
    sizes = [(layer_hw(A, layout), tuple(size)) for A, layout in zip(activations, request.layouts)]
    return combine(b, raws, hw, sizes), weights


# -- layouts and sizes ----------------------------------------------------------------------------

def to_nchw(b: Emitter, tensor: gs.Tensor, layout: str) -> gs.Tensor:
    """The methods' formulas index (N, C, h, w), as the Explainer's ``to_nchw``."""
    return b.transpose(tensor, [0, 3, 1, 2]) if layout == "NHWC" else tensor


def static_hw(image: gs.Tensor, layout: str) -> list[int | None]:
    """The image's (H, W) where fixed, else None, from its layout."""
    start = H_AXIS[layout]
    dims = list(image.shape or [None] * 4)[start:start + 2]
    return [d if isinstance(d, int) and d > 0 else None for d in dims]


def layer_hw(tensor: gs.Tensor, layout: str) -> tuple[int, int] | None:
    """A 4-D layer's (h, w) in its layout (NCHW or NHWC) where fixed, else None."""
    dims = list(tensor.shape or [])
    if layout not in H_AXIS or len(dims) != 4:
        return None
    hw = dims[H_AXIS[layout]:H_AXIS[layout] + 2]
    return tuple(int(d) for d in hw) if all(isinstance(d, (int, np.integer)) and d > 0 for d in hw) else None


def input_hw(b: Emitter, image: gs.Tensor, layout: str) -> gs.Tensor:
    """The image's (H, W) as int64 [2]: constants when static, else read from its shape."""
    dims = static_hw(image, layout)
    if None not in dims:
        return b.ints(dims)
    return b.shape(image, start=H_AXIS[layout], end=H_AXIS[layout] + 2)


# -- scaling ----------------------------------------------------------------------------------------

def scale(b: Emitter, maps: gs.Tensor, in_range: bool = False) -> gs.Tensor:
    r"""scale_maps before its resize, per image of (N, h, w): nan -> 0, +inf -> float max
    (``np.nan_to_num``), :math:`m = \mathrm{relu}(m)`, :math:`(m - \min m) / (\max(m - \min m) + 10^{-7})`.

    ``in_range``: the maps are already finite and >= 0 (a scaled, resized, clipped map or a
    mean of such), where the first three steps change nothing: they are left out (four
    passes over full-size maps)."""
    if not in_range:  # nan_to_num, then ReLU and +inf -> float max as one Clip
        finite = b.where(b.op("IsNaN", maps), 0.0, maps)
        maps = b.op("Clip", finite, b.const(np.float32(0)), b.const(np.float32(_FLOAT32_MAX)))
    shifted = b.sub(maps, b.reduce("ReduceMin", maps, [1, 2]))
    return b.div(shifted, b.add(b.reduce("ReduceMax", shifted, [1, 2]), SCALE_EPS))


def clip01(b: Emitter, maps: gs.Tensor) -> gs.Tensor:
    return b.op("Clip", maps, b.const(np.float32(0)), b.const(np.float32(1)))


#: A map's fixed (h, w) and the fixed (H, W) it is resized to, where both are known.
Sizes = tuple[tuple[int, int] | None, tuple[int | None, int | None]]


def resize(b: Emitter, maps: gs.Tensor, hw: gs.Tensor, sizes: Sizes | None = None) -> gs.Tensor:
    r"""(N, h, w) -> (N, H, W) as ``cv2.resize(m, (W, H), INTER_LINEAR)`` per map (see the
    module docstring); sizes rather than scales, so H, W are exact.

    An upsampling between fixed ``sizes`` is two MatMuls with :func:`upsampling_matrix`
    (:math:`R_H\, m\, R_W^T`): the same weights, and 7x faster than onnxruntime's Resize
    for 7x7 -> 224x224 (14 vs 96 us on one core), which recomputes its coefficients per run."""
    (small, large) = sizes if sizes is not None else (None, (None, None))
    if small is not None and None not in large and all(s <= l for s, l in zip(small, large)):
        rows = b.const(upsampling_matrix(large[0], small[0]))
        cols = b.const(upsampling_matrix(large[1], small[1]).T.copy())
        return b.matmul(b.matmul(rows, maps), cols)
    batched = b.unsqueeze(maps, [1])
    sizes = b.concat([b.shape(batched, end=2), hw], axis=0)
    resized = b.op("Resize", batched, None, None, sizes, mode="linear",
                   coordinate_transformation_mode="half_pixel")
    return b.squeeze(resized, [1])


def upsampling_matrix(size_out: int, size_in: int) -> np.ndarray:
    r"""(size_out, size_in) float32 whose row o holds the linear interpolation weights of
    output o: :math:`x = \max((o + 0.5)\, n_{in} / n_{out} - 0.5, 0)`, weight :math:`1 - f` on
    :math:`\lfloor x \rfloor` and :math:`f = x - \lfloor x \rfloor` on the next pixel, clamped
    to the last (cv2 INTER_LINEAR and ONNX Resize ``linear``/``half_pixel`` when upsampling)."""
    x = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
    low = np.minimum(np.floor(x).astype(np.int64), size_in - 1)
    frac = x - low
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size_out), np.minimum(low + 1, size_in - 1)), frac)
    return matrix.astype(np.float32)


def combine(b: Emitter, raws: Sequence[gs.Tensor], hw: gs.Tensor,
            sizes: Sequence[Sizes] | None = None) -> gs.Tensor:
    """:func:`onnxcam.methods.combine_layers`: per layer ``scale_maps(raw, size)``, the mean
    over layers, then ``scale_maps`` once more. ``sizes`` per layer, where known, let the
    resize be matrix products (:func:`resize`)."""
    sizes = sizes or [None] * len(raws)
    scaled = [clip01(b, resize(b, scale(b, raw), hw, size)) for raw, size in zip(raws, sizes)]
    mean = scaled[0]
    if len(scaled) > 1:
        mean = b.div(b.op("Sum", *scaled), float(len(scaled)))
    # scale_maps' final clip is left out too: (m - min) / (max(m - min) + eps) is in [0, 1)
    # for finite m >= 0 (m - min >= 0 exactly, and <= the max it is divided by)
    return scale(b, mean, in_range=True)


def post_process(b: Emitter, raw: gs.Tensor, hw: gs.Tensor, sizes: Sizes | None = None) -> gs.Tensor:
    """combine_layers([raw], size) for one layer: scale_maps(raw, size), then scale_maps()."""
    return combine(b, [raw], hw, [sizes])


# -- numpy formulas as graphs -----------------------------------------------------------------

class Traced:
    """A graph tensor that :mod:`onnxcam.methods`' numpy formulas run on unchanged.

    Each operation they use emits one ONNX node through the emitter: the arithmetic operators
    and ``**``, ``!=`` / ``==`` / ``>``, ``np.maximum`` (``__array_ufunc__``), ``np.where``
    and ``np.einsum`` (``__array_function__``), ``.sum`` / ``.mean`` over axes, and indexing
    with full slices and ``None`` (new axes). Anything else raises, so a formula that cannot be
    exported fails loudly instead of exporting something else.
    """

    __array_priority__ = 1000  # numpy defers ``scalar * traced`` to us
    __hash__ = None  # __eq__ builds a node

    _UFUNCS = {np.maximum: "Max", np.minimum: "Min", np.add: "Add", np.subtract: "Sub",
               np.multiply: "Mul", np.true_divide: "Div", np.power: "Pow"}

    def __init__(self, b: Emitter, tensor: gs.Tensor):
        self.b, self.tensor = b, tensor

    def _node(self, op: str, *operands) -> Traced:
        inputs = [o.tensor if isinstance(o, Traced) else o for o in operands]
        return Traced(self.b, self.b.op(op, *inputs))

    def __add__(self, o): return self._node("Add", self, o)
    def __radd__(self, o): return self._node("Add", o, self)
    def __sub__(self, o): return self._node("Sub", self, o)
    def __rsub__(self, o): return self._node("Sub", o, self)
    def __mul__(self, o): return self._node("Mul", self, o)
    def __rmul__(self, o): return self._node("Mul", o, self)
    def __truediv__(self, o): return self._node("Div", self, o)
    def __rtruediv__(self, o): return self._node("Div", o, self)
    def __pow__(self, o): return self._node("Pow", self, o)
    def __neg__(self): return self._node("Neg", self)
    def __matmul__(self, o): return self._node("MatMul", self, o)
    def __rmatmul__(self, o): return self._node("MatMul", o, self)
    def __eq__(self, o): return self._node("Equal", self, o)
    def __ne__(self, o): return self._node("Not", self == o)
    def __gt__(self, o): return self._node("Greater", self, o)
    def __lt__(self, o): return self._node("Less", self, o)

    def sum(self, axis: int | Sequence[int], keepdims: bool = False) -> Traced:
        return Traced(self.b, self.b.reduce_sum(self.tensor, _axes(axis), keepdims))

    def mean(self, axis: int | Sequence[int], keepdims: bool = False) -> Traced:
        return Traced(self.b, self.b.reduce_mean(self.tensor, _axes(axis), keepdims))

    def __getitem__(self, key) -> Traced:
        key = key if isinstance(key, tuple) else (key,)
        if not all(k is None or k == slice(None) for k in key):
            raise NotImplementedError(f"only [:, None]-style indexing is exported, got {key}")
        return Traced(self.b, self.b.unsqueeze(self.tensor, [i for i, k in enumerate(key) if k is None]))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or kwargs or ufunc not in self._UFUNCS:
            raise NotImplementedError(f"np.{ufunc.__name__} is not exported")
        return self._node(self._UFUNCS[ufunc], *inputs)

    def __array_function__(self, func, types, args, kwargs):
        if func is np.einsum and not kwargs and isinstance(args[0], str):
            return Traced(self.b, self.b.einsum(args[0], *(a.tensor if isinstance(a, Traced) else a for a in args[1:])))
        if func is not np.where or kwargs or len(args) != 3:
            raise NotImplementedError(f"np.{func.__name__} is not exported")
        return self._node("Where", *args)


def _axes(axis: int | Sequence[int]) -> list[int]:
    return [axis] if isinstance(axis, int) else list(axis)


# -- Score-CAM's masked inputs --------------------------------------------------------------------

#: Input of a masked-input model: channel activations (B, h, w), float64, one mask each.
MASK_SOURCE = "onnxcam_mask_source"


@dataclass(frozen=True)
class MaskRequest:
    """A forward model whose image input is multiplied by Score-CAM masks in the graph: the
    image layout and the (h, w) of the activations the masks come from."""

    input_layout: str
    map_size: tuple[int, int]
    code: str = _FINGERPRINT


def feed_masked(b: Emitter, image: gs.Variable, request: MaskRequest) -> gs.Variable:
    r"""Make every reader of ``image`` (1, ...) read :math:`x \odot M_k` for a batch of masks,
    :func:`onnxcam.perturbation.upsampled_masks` of the new input :data:`MASK_SOURCE`
    (B, h, w) float64, in float64 as there: bilinear upsampling with ``align_corners=True``
    as two MatMuls with :func:`onnxcam.perturbation.bilinear_matrix` (the same matrices),
    :math:`(u - \min) / (\max - \min + 10^{-8})` per mask, then float32 and the product.
    The image's (H, W) must be static. Returns the new input."""
    from .perturbation import bilinear_matrix

    size = static_hw(image, request.input_layout)
    if None in size:
        raise ValueError("Score-CAM masks in the graph need a static input size")
    graph = b.graph
    consumers = [(node, index) for node in graph.nodes for index, t in enumerate(node.inputs) if t is image]
    source = gs.Variable(MASK_SOURCE, np.float64, [None, *request.map_size])
    graph.inputs.append(source)
    rows = b.const(bilinear_matrix(size[0], request.map_size[0]), np.float64)
    cols = b.const(bilinear_matrix(size[1], request.map_size[1]).T.copy(), np.float64)
    up = b.matmul(b.matmul(rows, source), cols)  # (B, H, W)
    low = b.reduce("ReduceMin", up, [1, 2])
    high = b.reduce("ReduceMax", up, [1, 2])
    masks = b.cast(b.div(b.sub(up, low), b.add(b.sub(high, low), b.const(1e-8, np.float64))), 1)  # FLOAT
    masks = b.unsqueeze(masks, [1] if request.input_layout == "NCHW" else [3])
    masked = b.mul(image, masks)
    for node, index in consumers:
        node.inputs[index] = masked
    return source
