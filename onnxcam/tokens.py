"""Token layers: the ``[N, T, C]`` activations of vision transformers, read as (C, h, w) maps.

A ViT's residual stream holds ``T = P + h*w`` tokens: ``P`` *prefix* tokens (CLS, DeiT's
distillation token, register tokens) that belong to no image position, then one token per
patch, row-major over an ``h x w`` grid. Explaining such a tensor means dropping the prefix and
reshaping the rest to ``(C, h, w)``: what pytorch-grad-cam's ``reshape_transform`` does by hand
for each model (``tensor[:, 1:, :].reshape(N, 14, 14, C)`` for ViT-B/16). Here the grid and the
prefix are read from the graph, in this order:

1. the nearest upstream 4-D activation with a known layout (the patch-embedding Conv's output
   ``[N, C, h, w]``, or a hybrid backbone's last stage): ``(h, w)`` from it, ``P = T - h*w``;
2. otherwise the prefix is what Concats along the token axis add from tensors that do not depend
   on the image (the CLS token, the position-embedding side; expanded to a dynamic batch through
   ``Shape`` or not), and ``T - P`` must factor into exactly one ``h x w`` with square patches
   of a whole number of pixels for the input size;
3. otherwise the tensor is *ambiguous*: choosing it is an error asking for ``--grid H W
   --prefix P`` (never a guess).

A position embedding ``[1, T, C]`` is not a further source: its ``T`` is the token count of
the tensor it is added to, already known from that tensor's shape, and it covers the prefix
or not depending on whether it is added after or before the prefix Concat, which rule 2
reads from the Concat itself.

The default layer (:func:`default_index`) follows the pooling: when the classifier reads only
prefix tokens (``x[:, 0]``, DeiT's ``(x[:, 0], x[:, 1])``), the tensors after the last
self-attention reach the logits only through those tokens, so their patch tokens have zero
gradient and Grad-CAM there is meaningless. The default is then the last block's first
LayerNorm (pytorch-grad-cam's ViT tutorial: ``model.blocks[-1].norm1``), i.e. the last token
tensor of the residual width that still feeds a self-attention. For mean-pooled models (Swin,
DeiT-III / ViT ``global_pool="avg"``) it is the last token or spatial tensor before pooling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import large_models
from .errors import LayerError, OnnxcamError

if TYPE_CHECKING:
    from .model import ModelGraph


#: Prefix tokens larger than this are not believed (CLS + distillation + a few registers).
MAX_PREFIX = 16

#: The ``layout`` of token layers: batch, tokens, channels.
TOKENS = "NTC"


@dataclass(frozen=True)
class TokenGrid:
    """``prefix`` tokens, then ``h x w`` patch tokens in row-major order."""

    prefix: int
    h: int
    w: int

    @property
    def tokens(self) -> int:
        return self.prefix + self.h * self.w


@dataclass(frozen=True)
class TokenTensor:
    """A token tensor feeding the logits: its grid, or why the grid cannot be read."""

    name: str
    tokens: int
    channels: int
    grid: TokenGrid | None
    why: str = ""


class TokenIndex:
    """Every ``[N, T, C]`` tensor of a graph with its grid, from one forward pass over the nodes."""

    def __init__(self, graph: ModelGraph, override: TokenGrid | None = None):
        self.graph = graph
        self.override = override
        self._initializer_dims = {t.name: tuple(t.dims) for t in graph.model.graph.initializer}
        self._stream = self._stream_length()
        self._sources = self._grid_sources()
        self._prefixes = self._concat_prefixes()
        self.tensors: dict[str, TokenTensor] = {}
        for node in graph.model.graph.node:
            for name in node.output:
                found = self._token_tensor(name)
                if found is not None:
                    self.tensors[name] = found

    # -- which tensors are tokens -------------------------------------------------------------
    def _token_tensor(self, name: str) -> TokenTensor | None:
        dims = self.graph.dims(name)
        if dims is None or len(dims) != 3 or self.graph.elem_type(name) != onnx.TensorProto.FLOAT:
            return None
        batch, tokens, channels = dims
        if not (isinstance(tokens, int) and isinstance(channels, int)) or tokens < 2:
            return None
        if not self._is_batch(batch):
            return None  # [T, N, C] (torch's MultiheadAttention inside) or [N*heads, T, d]
        if self.override is not None:
            if tokens != self.override.tokens:
                return None
            return TokenTensor(name, tokens, channels, self.override)
        grid, why = self._grid(name, tokens)
        if grid is None and not why:
            return None
        return TokenTensor(name, tokens, channels, grid, why)

    def _stream_length(self) -> int | None:
        """The most common token count of [N, T, C] tensors: the residual stream's."""
        counts: dict[int, int] = {}
        for name in self.graph.value_info:
            dims = self.graph.dims(name)
            if dims is not None and len(dims) == 3 and isinstance(dims[1], int) and self._is_batch(dims[0]):
                counts[dims[1]] = counts.get(dims[1], 0) + 1
        return max(counts, key=lambda t: (counts[t], t)) if counts else None  # ties: the longer (with prefix)

    def _dims(self, name: str):
        return self._initializer_dims.get(name) or self.graph.dims(name)

    def _is_batch(self, dim) -> bool:
        want = (self.graph.dims(self.graph.input.name) or (None,))[0]
        if isinstance(want, int):
            return dim == want
        return isinstance(dim, str)

    # -- where the grid comes from ------------------------------------------------------------
    def _grid_sources(self) -> dict[str, tuple[int, int]]:
        """For every tensor, the (h, w) of the nearest upstream 4-D activation of known layout."""
        def own(node: onnx.NodeProto) -> tuple[int, int] | None:
            name = node.output[0] if node.output else ""
            layout = self.graph.layouts.get(name)
            if layout in ("NCHW", "NHWC"):
                dims = dict(zip(layout, self.graph.dims(name) or ()))
                if isinstance(dims.get("H"), int) and isinstance(dims.get("W"), int):
                    return dims["H"], dims["W"]
            return None
        return _propagate(self.graph, own)

    def _concat_prefixes(self) -> dict[str, int]:
        """Tokens added along the token axis by Concats of image-independent tensors (the CLS
        token, distillation and register tokens)."""
        variable = _downstream_of_input(self.graph)

        def own(node: onnx.NodeProto) -> int | None:
            dims = self.graph.dims(node.output[0])
            if node.op_type != "Concat" or len(node.input) < 2 or dims is None or len(dims) != 3:
                return None
            if _attribute(node, "axis", 0) not in (1, -2):
                return None
            constant = [self._dims(i) for i in node.input if i not in variable]
            sizes = [d[1] for d in constant if d is not None and len(d) == 3]
            ok = len(sizes) == len(constant) and all(isinstance(v, int) for v in sizes)
            return sum(sizes) if ok else None
        return _propagate(self.graph, own)

    def _grid(self, name: str, tokens: int) -> tuple[TokenGrid | None, str]:
        source = self._sources.get(name)
        if source is not None:
            prefix = tokens - source[0] * source[1]
            if 0 <= prefix <= MAX_PREFIX:
                return TokenGrid(prefix, *source), ""
            return None, ""  # not one token per position: windows, or channels on axis 1
        if tokens != self._stream:
            return None, ""  # grids by factoring are believed for the residual stream only
        prefix = self._prefixes.get(name, 0)
        if self.graph.static_input_hw() is None:
            return None, "the input size is dynamic (give --size H W)"
        shapes = factor_grids(tokens - prefix, self.graph.static_input_hw())
        if len(shapes) == 1:
            return TokenGrid(prefix, *shapes[0]), ""
        if not shapes:
            height, width = self.graph.static_input_hw()
            return None, (f"{tokens - prefix} tokens (after {prefix} prefix tokens found in the graph) fit "
                          f"no grid of square patches of a {height}x{width} input")
        listed = ", ".join(f"{h}x{w}" for h, w in shapes[:4])
        return None, (f"{tokens} tokens with {prefix} prefix fit several grids ({listed}) and no "
                      "patch-embedding tensor says which")


def factor_grids(count: int, image_hw: tuple[int, int]) -> list[tuple[int, int]]:
    """Every ``h x w = count`` whose patches are squares of a whole number of pixels."""
    height, width = image_hw
    found = []
    for h in range(1, count + 1):
        if count % h:
            continue
        w = count // h
        if height % h == 0 and width % w == 0 and height // h == width // w:
            found.append((h, w))
    return found


def parse_grid(grid: tuple[int, int] | None, prefix: int | None) -> TokenGrid | None:
    """The user's ``--grid H W --prefix P`` (prefix 0 when only the grid is given)."""
    if grid is None:
        if prefix is not None:
            raise OnnxcamError("--prefix needs --grid H W too (the patch grid of the token layer)")
        return None
    h, w = (int(v) for v in grid)
    p = int(prefix or 0)
    if h < 1 or w < 1 or p < 0:
        raise OnnxcamError(f"--grid must be positive and --prefix >= 0, got grid {h} {w}, prefix {p}")
    return TokenGrid(p, h, w)


# -- arrays ---------------------------------------------------------------------------------------

def to_nchw(array: np.ndarray, grid: TokenGrid) -> np.ndarray:
    """(..., T, C) tokens -> (..., C, h, w) patches: the prefix dropped, the rest row-major."""
    patches = array[..., grid.prefix:, :]
    shaped = patches.reshape(patches.shape[:-2] + (grid.h, grid.w, patches.shape[-1]))
    return np.moveaxis(shaped, -1, -3)


def emit_to_nchw(b, tensor, grid: TokenGrid):
    """:func:`to_nchw` as graph nodes (``b`` an :class:`onnxcam.autodiff.Emitter`), for the
    self-explaining export: Slice off the prefix, Reshape to (N, h, w, C), Transpose."""
    patches = b.slice(tensor, [grid.prefix], [np.iinfo(np.int64).max], [1])
    return b.transpose(b.reshape(patches, [0, grid.h, grid.w, -1]), [0, 3, 1, 2])


# -- the default layer ------------------------------------------------------------------------

def reads_prefix_only(graph: ModelGraph, index: TokenIndex, upstream: set[str]) -> bool:
    """Whether the classifier pools tokens by picking prefix tokens (``x[:, 0]``): a Gather or
    Slice on the token axis of a token tensor that keeps only prefix positions."""
    for name, tensor in index.tensors.items():
        prefix = tensor.grid.prefix if tensor.grid is not None else 1
        for node in graph.consumers.get(name, []):
            if node.output[0] not in upstream:
                continue
            picked = _picked_tokens(graph, node, tensor.tokens)
            if picked is not None and picked and max(picked) < prefix:
                return True
    return False


def pooled_tokens(graph: ModelGraph, index: TokenIndex, upstream: set[str]) -> list[int]:
    """The prefix tokens the classifier reads (e.g. [0] for CLS, [0, 1] for distilled DeiT)."""
    picked: set[int] = set()
    for name, tensor in index.tensors.items():
        prefix = tensor.grid.prefix if tensor.grid is not None else 1
        for node in graph.consumers.get(name, []):
            if node.output[0] in upstream:
                chosen = _picked_tokens(graph, node, tensor.tokens)
                if chosen and max(chosen) < prefix:
                    picked.update(chosen)
    return sorted(picked)


def _picked_tokens(graph: ModelGraph, node: onnx.NodeProto, tokens: int) -> list[int] | None:
    """Token positions a Gather / Slice on axis 1 keeps, when they are constants."""
    if node.op_type == "Gather" and _attribute(node, "axis", 0) in (1, -2):
        indices = _constant(graph, node.input[1])
        if indices is None:
            return None
        return sorted({int(i) % tokens for i in np.asarray(indices).reshape(-1)})
    if node.op_type == "Slice" and len(node.input) >= 3:
        starts, ends = _constant(graph, node.input[1]), _constant(graph, node.input[2])
        axes = _constant(graph, node.input[3]) if len(node.input) > 3 and node.input[3] else None
        if starts is None or ends is None:
            return None
        axes = list(range(len(starts))) if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
        steps = _constant(graph, node.input[4]) if len(node.input) > 4 and node.input[4] else None
        for position, axis in enumerate(axes):
            if axis in (1, -2):
                step = int(np.asarray(steps).reshape(-1)[position]) if steps is not None else 1
                start = int(np.asarray(starts).reshape(-1)[position])
                end = int(np.asarray(ends).reshape(-1)[position])
                return list(range(tokens))[slice(start, end, step)]
        return None
    return None


def feeds_attention(graph: ModelGraph, upstream: set[str]) -> set[str]:
    """Tensors that reach the logits through a self-attention's token mixing (``softmax(QK^T)
    V``): the ancestors of the inputs of every MatMul that reads a Softmax output."""
    mixing: list[str] = []
    for node in graph.model.graph.node:
        if node.op_type == "Softmax" and node.output[0] in upstream:
            mixing += [i for c in graph.consumers.get(node.output[0], [])
                       if c.op_type == "MatMul" and c.output[0] in upstream for i in c.input]
    alive: set[str] = set()
    for name in mixing:
        alive |= graph.ancestors(name)
    return alive


def default_index(graph: ModelGraph, names: list[str], index: TokenIndex, upstream: set[str]) -> int:
    """Which of the candidate layers ``names`` (graph order) is the default; see the module
    docstring for the rule."""
    last = len(names) - 1
    tokens = [i for i, n in enumerate(names) if n in index.tensors]
    if not tokens or not reads_prefix_only(graph, index, upstream):
        return last
    alive = feeds_attention(graph, upstream)
    reaching = [i for i in tokens if names[i] in alive]
    if not reaching:
        return last
    norms = [i for i in reaching if graph.producer[names[i]].op_type == "LayerNormalization"]
    if norms:
        return norms[-1]
    width = max(index.tensors[names[i]].channels for i in tokens[-1:])
    same = [i for i in reaching if index.tensors[names[i]].channels == width]
    return (same or reaching)[-1]


def ambiguous_error(source: str, tensor: TokenTensor) -> LayerError:
    return LayerError(f"{source}: token tensor '{tensor.name}' ({tensor.tokens} tokens x {tensor.channels}): "
                      f"the grid cannot be read from the graph: {tensor.why}; give --grid H W --prefix P "
                      "(API: Explainer(..., grid=(H, W), prefix=P))")


def _propagate(graph: ModelGraph, own) -> dict:
    """A value per tensor: ``own(node)`` for a node's outputs where it says, else the value of
    the node's first input that has one (forward, in the graph's topological order)."""
    values: dict = {}
    for node in graph.model.graph.node:
        value = own(node)
        if value is None:
            value = next((values[i] for i in node.input if i in values), None)
        if value is not None:
            for out in node.output:
                values[out] = value
    return values


def _downstream_of_input(graph: ModelGraph) -> set[str]:
    """Tensors whose values depend on the image's. Not through Shape / Size: a CLS token
    expanded to the batch (``Expand(cls, Shape(x)[0:1] ...)``, any dynamic-batch export) is
    still the same learned token for every image."""
    seen = {graph.input.name}
    for node in graph.model.graph.node:
        if node.op_type not in ("Shape", "Size") and any(i in seen for i in node.input):
            seen.update(o for o in node.output if o)
    return seen


def _constant(graph: ModelGraph, name: str) -> np.ndarray | None:
    for tensor in graph.model.graph.initializer:
        if tensor.name == name:
            return large_models.array(tensor)
    producer = graph.producer.get(name)
    if producer is not None and producer.op_type == "Constant":
        for attribute in producer.attribute:
            if attribute.name == "value":
                return onnx.numpy_helper.to_array(attribute.t)
            if attribute.name in ("value_int", "value_ints"):
                return np.asarray(onnx.helper.get_attribute_value(attribute))
    return None


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
