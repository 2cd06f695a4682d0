"""Stage 1 of the pipeline: load an exported classifier and find what can be explained.

Two questions are answered here, from the graph alone:

* Which tensor holds the logits?  The pre-softmax scores: if an output is produced by
  Softmax/LogSoftmax, its input is explained instead (the gradient of a softmax output mixes
  all classes, which is not what Grad-CAM is defined on).
* Which tensors are spatial activations, and in which layout?  torch exports are NCHW
  throughout; tf2onnx exports of Keras models take NHWC input and wrap convolutions in
  Transposes. The layout of every 4-D tensor is propagated forward from ops whose layout is
  fixed by the ONNX spec (Conv and pools are NCHW) through Transposes and layout-preserving
  ops, and through Reshapes by following where each element sits in the map (MaxViT's
  window / grid partitions put back together), so nothing is guessed from shapes except the
  graph input.

The default layer is the last spatial activation (H*W > 1) on the way to the logits, i.e. the
tensor right before the spatial dimensions are pooled or flattened away.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from . import large_models, tokens
from .errors import LayerError, ModelError
from .validate_model import checked_model, quantized_ops_hint

#: Ops whose output is NCHW by the ONNX spec whatever feeds them.
_NCHW_OPS = frozenset({
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "BatchNormalization", "InstanceNormalization", "LRN",
    "DepthToSpace", "SpaceToDepth", "MaxUnpool", "QLinearConv",
})

#: Ops whose output has the layout of their (first 4-D) data input.
_LAYOUT_PRESERVING_OPS = frozenset({
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid",
    "HardSwish", "Tanh", "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Pow",
    "Reciprocal", "Neg", "Abs", "Add", "Sub", "Mul", "Div", "Sum", "Mean", "Max", "Min",
    "Where", "Identity", "Dropout", "Cast", "Pad", "Concat", "Slice", "Resize", "Upsample",
    "Mish", "Swish", "Floor", "Ceil", "Round", "Sign", "Not", "Equal", "Less", "Greater",
    "QuantizeLinear", "DequantizeLinear",
    "LayerNormalization",
})

#: Ops that keep a channels-last layout when they act on the last axis with a constant weight
#: (a Linear layer on NHWC tensors: Swin, ConvNeXt's pointwise MLPs).
_CHANNEL_LAST_LINEAR_OPS = frozenset({"MatMul", "Gemm"})

#: Ops whose every output element sits where the same element of their inputs does.
_POSITIONWISE_OPS = _LAYOUT_PRESERVING_OPS - {"Concat", "Slice", "Pad", "Resize", "Upsample"}

_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

_FLOAT_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
})


@dataclass(frozen=True)
class Layer:
    """A spatial activation that can be explained.

    ``shape`` is (C, H, W) whatever the tensor's own layout; ``layout`` says how the tensor is
    stored ("NCHW", "NHWC", or "NTC" for transformer tokens [N, T, C] whose first ``prefix``
    tokens are dropped and the rest read as an H x W grid, :mod:`onnxcam.tokens`).
    """

    name: str
    op: str
    node: str
    shape: tuple[int, int, int]
    layout: str
    default: bool = False
    prefix: int = 0

    @property
    def kind(self) -> str:
        """How the layer is read, for listings: "NCHW", "NHWC", "tokens (prefix 1, grid 14x14)"."""
        if self.layout == tokens.TOKENS:
            return f"tokens (prefix {self.prefix}, grid {self.shape[1]}x{self.shape[2]})"
        return self.layout

    @property
    def grid(self) -> tokens.TokenGrid | None:
        return tokens.TokenGrid(self.prefix, self.shape[1], self.shape[2]) if self.layout == tokens.TOKENS else None


def load_model(path: str | os.PathLike, weights_in_file: bool = False) -> onnx.ModelProto:
    """Read an ONNX model (external data files beside it are resolved), with clear errors.

    ``weights_in_file``: big inline weights are not read but left in the model file itself
    (:func:`onnxcam.large_models.parse_leaving_weights`), as a large model's are left in its
    external-data file: the Explainer holds no copy of them while onnxruntime builds its
    sessions from the rewrite cache. The model then needs its file while it is used."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, expected an .onnx file")
    found = large_models.parse_leaving_weights(path) if weights_in_file else None
    model, spans = found or (None, {})
    try:
        if model is None:
            model = onnx.load(str(path), load_external_data=False)
    except DecodeError:
        raise ModelError(f"{path}: not an ONNX model (the file does not parse as ONNX protobuf)") from None
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot be loaded as ONNX ({first_line(exc)})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model or an empty graph (no nodes)")
    _check_external_data(model, path)
    try:  # a large model's big weights stay in their files (large_models.load_external_data)
        large_models.load_external_data(model, path.parent)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: its external weights cannot be read ({first_line(exc)})") from None
    large_models.leave_in_file(model, spans, path)  # after: load_external_data drops basepaths it did not set
    return checked_model(model, str(path))


def _check_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Every external-data file a tensor names must lie inside the model's folder and hold
    the bytes the tensor claims, so a moved or truncated weights file is named, not met
    as a failure deep in onnx."""
    folder = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or folder not in target.parents:
            raise ModelError(f"{path}: tensor '{tensor.name}' points outside the model's folder for "
                             f"its external data ('{location}'); refusing to read it")
        if not target.is_file():
            raise ModelError(f"{path}: tensor '{tensor.name}' keeps its weights in '{location}', which "
                             f"is missing; copy it next to the model")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise ModelError(f"{path}: '{location}' is shorter than tensor '{tensor.name}' needs "
                             f"({target.stat().st_size} < {end} bytes): truncated or the wrong file")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line errors."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def with_shapes(model: onnx.ModelProto, in_place: bool = False) -> onnx.ModelProto:
    """The model with value_info for every tensor whose shape can be known.

    ONNX shape inference (with data propagation) first. Exports with a dynamic batch often
    compute Reshape targets at run time (ShuffleNet's channel shuffle: Shape -> Gather -> Div
    -> Concat), which inference cannot follow, leaving every later tensor shapeless; those
    shapes are then read off one onnxruntime run at batch 1, the batch put back symbolic.
    ``in_place``: annotate ``model`` itself rather than a copy (no copy of its weights)."""
    try:
        inferred = large_models.infer_shapes(model, in_place, data_prop=True)
    except Exception:  # noqa: BLE001 - a model ORT can run may still trip the strict checker
        try:
            inferred = large_models.infer_shapes(model, in_place)
        except Exception:  # noqa: BLE001
            return model
    return _shapes_from_a_run(inferred)


def _shapes_from_a_run(model: onnx.ModelProto) -> onnx.ModelProto:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        return model
    dims = static_dims(inputs[0]) or ()
    # a symbol other than the input's batch ("unk__7" after Swin's window reshapes) is unknown too
    shapeless = [vi for vi in model.graph.value_info
                 if vi.type.tensor_type.elem_type in _FLOAT_TYPES and not _fully_known(vi, dims[:1])]
    if not shapeless:
        return model
    if not dims or any(not isinstance(d, int) for d in dims[1:]):
        return model  # spatial size unknown: nothing to run at
    batch = dims[0]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    if isinstance(batch, int):
        probe.graph.input[list(probe.graph.input).index(inputs[0])].type.tensor_type.shape.dim[0].dim_value = 1
    del probe.graph.output[:]
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(vi.name, vi.type.tensor_type.elem_type, None) for vi in shapeless)
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = large_models.session(probe, options, ["CPUExecutionProvider"])
        elem = onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type)
        # only the shapes are kept: each run's arrays are freed at once (ViT-B/16: ~0.5 GB a run)
        values = [v.shape for v in session.run(None, {inputs[0].name: np.zeros([1] + list(dims[1:]), elem)})]
    except Exception:  # noqa: BLE001 - shapes stay unknown; the caller reports what it cannot use
        return model
    pairs = None
    if not isinstance(batch, int):
        # a second run at batch 2 tells which dims follow the batch ([T, N, C] inside torch's
        # MultiheadAttention, [N*windows, ...] in Swin): those stay symbolic
        try:
            pairs = [v.shape for v in session.run(None, {inputs[0].name: np.zeros([2] + list(dims[1:]), elem)})]
        except Exception:  # noqa: BLE001 - then only a leading 1 is taken for the batch
            pairs = None
    for index, (vi, value) in enumerate(zip(shapeless, values)):
        before = static_dims(vi) or ()
        shape: list[int | str] = list(value)
        if pairs is not None and len(pairs[index]) == len(value):
            for axis, (one, two) in enumerate(zip(value, pairs[index])):
                if one != two:
                    symbol = before[axis] if axis < len(before) and isinstance(before[axis], str) else None
                    shape[axis] = (batch if isinstance(batch, str) else "batch") if (axis, one) == (0, 1) else (
                        symbol or f"onnxcam_dim_{index}_{axis}")
        elif shape and shape[0] == 1 and not isinstance(batch, int) and len(value) >= 2:
            shape[0] = batch if isinstance(batch, str) else "batch"
        vi.type.tensor_type.ClearField("shape")
        for d in shape:
            entry = vi.type.tensor_type.shape.dim.add()
            if isinstance(d, str):
                entry.dim_param = d
            else:
                entry.dim_value = d
    return model


def _fully_known(vi: onnx.ValueInfoProto, batch: tuple = ()) -> bool:
    dims = static_dims(vi)
    return dims is not None and all(isinstance(d, int) or (d is not None and d in batch) for d in dims)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset the model was exported with."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def static_dims(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    """Dims of a tensor: int when static, the symbol (str) when named, None when unknown."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    return tuple(dims)


class ModelGraph:
    """Read-only index over a model's graph: producers, consumers, types, shapes, layouts."""

    def __init__(self, model: onnx.ModelProto, source: str = "<model>",
                 token_grid: tokens.TokenGrid | None = None):
        self.source = source
        self.token_grid = token_grid
        self.model = with_shapes(model)
        graph = self.model.graph
        self.opset = opset_of(self.model)
        self.initializers = {t.name for t in graph.initializer}
        self.inputs = [i for i in graph.input if i.name not in self.initializers]
        self.outputs = list(graph.output)
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.value_info: dict[str, onnx.ValueInfoProto] = {}
        for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
            self.value_info[vi.name] = vi
        if not self.inputs:
            raise ModelError(f"{source}: the graph has no data input")
        if len(self.inputs) > 1:
            names = ", ".join(f"'{i.name}'" for i in self.inputs)
            raise ModelError(f"{source}: the model needs {len(self.inputs)} inputs ({names}); onnxcam explains "
                             "classifiers with one image input: export it with the others fixed as constants")
        kind = self.inputs[0].type.tensor_type.elem_type
        if kind != onnx.TensorProto.FLOAT:
            raise ModelError(f"{source}: input '{self.inputs[0].name}' is "
                             f"{onnx.TensorProto.DataType.Name(kind).lower()}; onnxcam feeds float32 images "
                             "(export the model with a float32 input; a Cast inside the graph is fine)")
        self.layouts = self._propagate_layouts()

    # -- basic facts ---------------------------------------------------------------------------
    def dims(self, name: str) -> tuple[int | str | None, ...] | None:
        vi = self.value_info.get(name)
        return static_dims(vi) if vi is not None else None

    def elem_type(self, name: str) -> int | None:
        vi = self.value_info.get(name)
        return vi.type.tensor_type.elem_type if vi is not None else None

    @property
    def input(self) -> onnx.ValueInfoProto:
        return self.inputs[0]

    def input_layout(self) -> str:
        """NCHW or NHWC for the image input: from its shape, else from a leading Transpose."""
        dims = self.dims(self.input.name) or ()
        if len(dims) != 4:
            raise ModelError(
                f"{self.source}: input '{self.input.name}' has shape {list(dims)}; "
                "onnxcam explains image classifiers with a 4-D input (N,C,H,W or N,H,W,C)")
        for consumer in self.consumers.get(self.input.name, []):
            if consumer.op_type == "Transpose":
                perm = list(_attr(consumer, "perm", []))
                if perm == [0, 3, 1, 2]:
                    return "NHWC"
                if perm == [0, 2, 3, 1]:
                    return "NCHW"
        if dims[1] in (1, 3, 4) and dims[3] not in (1, 3, 4):
            return "NCHW"
        if dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4):
            return "NHWC"
        return "NCHW"

    # -- layouts ------------------------------------------------------------------------------
    def _propagate_layouts(self) -> dict[str, str]:
        """Axis letters ("NCHW", "NHWC", ...) of every 4-D tensor whose layout is known.

        Where no op fixes the layout, the places of the elements are followed instead
        (:class:`_Places`): through Reshape, Transpose, element-wise ops and channel-wise
        LayerNorm / Linear, so a map cut into windows and put back (MaxViT's window and grid
        attention, ShuffleNet's channel shuffle) is a map again, and a tensor still in windows
        is never read as one."""
        layouts: dict[str, str] = {}
        places: dict[str, _Places] = {}
        try:
            layouts[self.input.name] = self.input_layout()
        except ModelError:
            pass
        for node in self.model.graph.node:  # ONNX requires topological order
            layout = None
            if node.op_type in _NCHW_OPS:
                layout = "NCHW"
            elif node.op_type == "Transpose" and node.input[0] in layouts:
                perm = list(_attr(node, "perm", []))
                source = layouts[node.input[0]]
                if len(perm) == len(source):
                    layout = "".join(source[p] for p in perm)
            elif node.op_type in _LAYOUT_PRESERVING_OPS:
                for name in node.input:
                    if name in layouts:
                        layout = layouts[name]
                        break
            elif node.op_type in _CHANNEL_LAST_LINEAR_OPS and node.input[0] in layouts:
                if layouts[node.input[0]].endswith("C") and node.input[1] in self.initializers:
                    layout = layouts[node.input[0]]
            dims = self.dims(node.output[0]) if node.output else None
            if layout is None and dims is not None:
                moved = self._moved(node, dims, layouts, places)
                if moved is not None:
                    layout = moved.layout(dims)
                    if layout is None:
                        places[node.output[0]] = moved
            if layout is not None and dims is not None and len(dims) == 4:
                layouts[node.output[0]] = layout
        return layouts

    def _moved(self, node: onnx.NodeProto, dims: tuple, layouts: dict[str, str],
               places: dict[str, _Places]) -> _Places | None:
        """The places of ``node``'s output elements, when they follow from its input's."""
        def where(name: str) -> _Places | None:
            if name in places:
                return places[name]
            return _Places.of(layouts[name], self.dims(name) or ()) if name in layouts else None

        if not node.input or len(dims) < 2 or dims[0] is None:
            return None
        if node.op_type in _POSITIONWISE_OPS:
            # the inputs of the output's own shape must agree on where their elements are
            found = [where(name) for name in node.input if name and self.dims(name) == dims]
            found = [f for f in found if f is not None]
            return found[0] if found and all(f.same(found[0]) for f in found) else None
        if node.op_type not in ("Reshape", "Transpose", "LayerNormalization", "MatMul"):
            return None
        source, before = where(node.input[0]), self.dims(node.input[0])
        if source is None or before is None or before[0] != dims[0]:
            return None  # unknown, or the batch axis takes part (Swin's windows go to the batch axis)
        if node.op_type == "Transpose":
            perm = list(_attr(node, "perm", []))
            return source.transposed(perm) if perm[:1] == [0] and len(perm) == len(dims) else None
        if node.op_type == "Reshape":
            return source.reshaped(before[1:], dims[1:])
        if node.op_type == "LayerNormalization":
            # normalising over trailing channel axes moves nothing
            axis = _attr(node, "axis", -1) % len(dims)
            return source if axis >= 1 and before == dims and source.channels_only(axis - 1) else None
        if node.op_type == "MatMul" and node.input[1] in self.initializers:
            # a Linear layer on a channels-last axis (constant weight): new channels, same places
            return source if before[:-1] == dims[:-1] and source.channels_only(len(dims) - 2) else None
        return None

    # -- what to explain ----------------------------------------------------------------------
    def logits(self, output: str | None = None) -> str:
        """The tensor to differentiate: the chosen (or first) output, looking through Softmax."""
        names = [o.name for o in self.outputs]
        if output is not None:
            if output not in names and output not in self.producer:
                raise ModelError(
                    f"{self.source}: no output or tensor named '{output}'; outputs are {names}")
            chosen = output
        else:
            resolved = [self._through_softmax(n) for n in names]
            plain = [r for r, n in zip(resolved, names) if r == n]
            chosen = (plain or resolved)[0]
        return self._through_softmax(chosen)

    def _through_softmax(self, name: str) -> str:
        node = self.producer.get(name)
        while node is not None and node.op_type in _QDQ_OPS:  # a quantized model's Softmax output
            node = self.producer.get(node.input[0])
        return node.input[0] if node is not None and node.op_type in _SOFTMAX_OPS else name

    def ancestors(self, name: str) -> set[str]:
        """All tensors ``name`` depends on (itself included)."""
        seen = {name}
        stack = [name]
        while stack:
            node = self.producer.get(stack.pop())
            if node is None:
                continue
            for inp in node.input:
                if inp and inp not in seen:
                    seen.add(inp)
                    stack.append(inp)
        return seen

    def layers(self, output: str | None = None) -> list[Layer]:
        """Spatial activations (NCHW, NHWC, transformer tokens) feeding the logits, in graph
        order; the default one marked (:func:`onnxcam.tokens.default_index`)."""
        logits = self.logits(output)
        upstream = self.ancestors(logits)
        index = self.token_index()
        candidates: list[Layer] = []
        for node in self.model.graph.node:
            for name in node.output:
                if name not in upstream:
                    continue
                layer = self._spatial_layer(name, node) or self._token_layer(name, node, index)
                if layer is not None:
                    candidates.append(layer)
        if not candidates:
            unread = [t for n, t in index.tensors.items() if n in upstream and t.grid is None and t.why]
            if unread:
                raise tokens.ambiguous_error(self.source, unread[-1])
            hint = (" (the input size is dynamic: give input_size=(H, W) (CLI: --size H W))" if self.static_input_hw() is None
                    else "; onnxcam explains convolutional classifiers and vision transformers")
            raise LayerError(
                f"{self.source}: no spatial activation (a 4-D tensor with H*W > 1 and a known "
                f"layout, or transformer tokens) feeds the output '{logits}'{quantized_ops_hint(self.model.graph.node) or hint}")
        chosen = tokens.default_index(self, [c.name for c in candidates], index, upstream)
        return [c if i != chosen else Layer(**{**c.__dict__, "default": True}) for i, c in enumerate(candidates)]

    def _spatial_layer(self, name: str, node: onnx.NodeProto) -> Layer | None:
        if name not in self.layouts or self.elem_type(name) not in _FLOAT_TYPES:
            return None
        layout = self.layouts[name]
        if layout not in ("NCHW", "NHWC"):
            return None
        dims = dict(zip(layout, self.dims(name) or ()))
        chw = (dims.get("C"), dims.get("H"), dims.get("W"))
        if not all(isinstance(d, int) for d in chw) or chw[1] * chw[2] <= 1:
            return None
        return Layer(name, node.op_type, node.name, chw, layout)

    @staticmethod
    def _token_layer(name: str, node: onnx.NodeProto, index: tokens.TokenIndex) -> Layer | None:
        found = index.tensors.get(name)
        if found is None or found.grid is None:
            return None
        grid = found.grid
        return Layer(name, node.op_type, node.name, (found.channels, grid.h, grid.w), tokens.TOKENS,
                     prefix=grid.prefix)

    def token_index(self) -> tokens.TokenIndex:
        """The token tensors of the graph and their grids (built once)."""
        if not hasattr(self, "_token_index"):
            self._token_index = tokens.TokenIndex(self, self.token_grid)
        return self._token_index

    def find_layer(self, name: str, output: str | None = None) -> Layer:
        """The layer called ``name`` (a tensor name, or a node name whose output is meant)."""
        tensor = next((n.output[0] for n in self.model.graph.node if n.name == name and n.output), name)
        unread = self.token_index().tensors.get(tensor)
        if unread is not None and unread.grid is None and unread.why:
            raise tokens.ambiguous_error(self.source, unread)
        layers = self.layers(output)
        for layer in layers:
            if name in (layer.name, layer.node):
                return layer
        if name in self.producer or name in self.value_info:
            dims = self.dims(name)
            raise LayerError(
                f"{self.source}: tensor '{name}' (shape {list(dims) if dims else 'unknown'}) is "
                "not a spatial activation feeding the logits; run `onnxcam layers` for the "
                "candidates")
        near = ", ".join(l.name for l in layers[-3:])
        raise LayerError(
            f"{self.source}: no tensor or node named '{name}'; candidates include {near} "
            "(see `onnxcam layers`)")

    def static_input_hw(self) -> tuple[int, int] | None:
        """The input's (H, W) when fixed by the model, else None."""
        dims = self.dims(self.input.name) or ()
        if len(dims) != 4:
            return None
        layout = self.input_layout()
        h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
        return (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def static_batch(self) -> int | None:
        """The input's batch size when the export fixed it, else None (dynamic)."""
        dims = self.dims(self.input.name) or (None,)
        return dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None


def pin_input_size(model: onnx.ModelProto, size: tuple[int, int] | None,
                   source: str = "<model>") -> onnx.ModelProto:
    """The model with its image input's H, W fixed to ``size`` when they are dynamic.

    Models exported with a dynamic spatial size are explained at one size at a time: fixed
    shapes let every gradient rule resolve its geometry and key the rewrite cache. A model
    whose size is fixed is returned as is (``size`` must then agree with it)."""
    graph = ModelGraph(model, source)
    layout = graph.input_layout()
    fixed = graph.static_input_hw()
    spatial = (2, 3) if layout == "NCHW" else (1, 2)
    if fixed is not None:
        if size is not None and tuple(size) != fixed:
            raise ModelError(f"{source}: the model's input size is fixed at {fixed[0]}x{fixed[1]}; "
                             f"input_size {size[0]}x{size[1]} (CLI: --size) does not apply")
        return model
    if size is None:
        return model
    if any(int(v) < 1 for v in size):
        raise ModelError(f"input_size (CLI: --size) must be positive, got {list(size)}")
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    target = next(i for i in pinned.graph.input if i.name == graph.input.name)
    for axis, value in zip(spatial, size):
        target.type.tensor_type.shape.dim[axis].dim_value = int(value)
    del pinned.graph.value_info[:]
    return pinned


@dataclass(frozen=True)
class _Places:
    """Where the elements of a tensor sit in an ``hw`` feature map.

    ``index`` has the tensor's shape without the batch axis, except that axes holding
    channels have size 1 (so does every axis of size 1), and holds ``h * W + w``. Reshape and
    Transpose move it as they move the data; a Reshape that would mix channels with positions
    ends the trail (nothing is guessed)."""

    index: np.ndarray
    hw: tuple[int, int]

    @staticmethod
    def of(layout: str, dims: tuple) -> _Places | None:
        """The places of a tensor whose layout ("NCHW", "NHWC", "NHCW", ...) is known."""
        shape = dict(zip(layout, dims))
        h, w = shape.get("H"), shape.get("W")
        if layout[:1] != "N" or sorted(layout) != sorted("NCHW") or not (isinstance(h, int) and isinstance(w, int)):
            return None
        index = np.arange(h * w, dtype=np.int32).reshape(1, h, w)
        return _Places(index.transpose(["CHW".index(axis) for axis in layout[1:]]), (h, w))

    def layout(self, dims: tuple) -> str | None:
        """"NCHW" or "NHWC" when a 4-D tensor of ``dims`` holds the map in that layout."""
        h, w = self.hw
        if len(dims) != 4 or self.index.size != h * w or not np.array_equal(self.index.reshape(-1), np.arange(h * w)):
            return None
        if tuple(dims[2:]) == (h, w) and self.index.shape == (1, h, w):
            return "NCHW"
        if tuple(dims[1:3]) == (h, w) and self.index.shape == (h, w, 1):
            return "NHWC"
        return None

    def same(self, other: _Places) -> bool:
        return self.hw == other.hw and np.array_equal(self.index, other.index)

    def channels_only(self, first: int) -> bool:
        """Whether the axes from ``first`` (batch not counted) hold channels only."""
        return all(size == 1 for size in self.index.shape[first:])

    def transposed(self, perm: list[int]) -> _Places:
        return _Places(self.index.transpose([axis - 1 for axis in perm[1:]]), self.hw)

    def reshaped(self, before: tuple, after: tuple) -> _Places | None:
        """After a Reshape of the non-batch dims ``before`` to ``after``: each run of axes
        whose sizes multiply alike (size-1 axes aside) must be all channels or all positions."""
        if not all(isinstance(d, int) and d > 0 for d in before + after) or self.index.ndim != len(before):
            return None
        sizes = [d for d in before if d > 1], [d for d in after if d > 1]
        if int(np.prod(sizes[0])) != int(np.prod(sizes[1])):
            return None
        spatial = [self.index.shape[k] > 1 for k, d in enumerate(before) if d > 1]
        kinds: list[bool] = []  # per non-1 axis of ``after``: holds positions
        i = j = 0
        while i < len(sizes[0]):
            group, product, out = [spatial[i]], sizes[0][i], [sizes[1][j]]
            i, j = i + 1, j + 1
            while product != int(np.prod(out)):
                if product < int(np.prod(out)):
                    group.append(spatial[i])
                    product *= sizes[0][i]
                    i += 1
                else:
                    out.append(sizes[1][j])
                    j += 1
            if len(set(group)) > 1:
                return None  # channels and positions mixed in one axis
            kinds += group[:1] * len(out)
        kept = iter(kinds)
        shape = [d if d > 1 and next(kept) else 1 for d in after]
        return _Places(self.index.reshape(shape), self.hw)


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def to_numpy(tensor: onnx.TensorProto) -> np.ndarray:
    return large_models.array(tensor)
