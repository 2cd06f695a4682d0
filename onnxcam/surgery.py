"""Stage 2: rewrite a classifier so one session returns logits, activations and gradients.

The rewritten model has

* inputs: the model's own image input, and ``onnxcam_seed`` [N, K] (K = number of logits):
  the weights of the linear functional ``score = sum(seed * logits)`` whose gradient is taken.
  A row of zeros means "the top-1 class": it is replaced in-graph by the one-hot of
  ``argmax(logits)``, so the usual explanation costs a single run. For a dense output
  (segmentation [N, K, H, W], detection [N, 4+K, A]) the seed has the output's shape and is
  used as given (:mod:`onnxcam.dense` builds it from a class and a region or an anchor);
* outputs: the logits, each chosen activation ``A`` and ``onnxcam_grad/<A>`` = d score / d A,
  plus ``onnxcam_grad/<input>`` when the input gradient was asked for (pixel-space methods).

Two variants serve the methods that need many evaluations:

* forward-only (``gradient=False``): no seed input, only the logits and the exposed tensors;
  Score-CAM scores its masked inputs with it;
* a *head* (``head=A``): the model cut at the activation ``A``, which becomes the input.
  The logits are a function of ``A`` and of the *frontier* (:func:`head_frontier`): the
  non-constant tensors the layers after ``A`` read that ``A`` does not determine (a residual
  branch that bypasses ``A``; empty when ``A`` separates the image from the logits). Feeding
  ``A`` (modified, or repeated once per target) and the frontier to the head gives the logits
  (and d score / d A) without re-running the backbone: Ablation-CAM and multi-target
  explanations use it.

Rewrites are cached by :mod:`onnxcam.cache`, so a second run on the same model skips surgery.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from .autodiff import RULES, Emitter, build_gradients, guided_relu, plan, upgrade
from .autodiff.classifier import find_classifier
from .autodiff.engine import describe_missing
from .autodiff.rules import VJP, Rule
from . import large_models
from .attention import fused_hint
from .errors import LayerError, ModelError, UnsupportedOpError
from .ingraph import (CHECKS_OUTPUT, HEATMAP_OUTPUT, MASK_SOURCE, SEED_USED_OUTPUT, TOP1_OUTPUT, WEIGHTS_PREFIX,
                      MapRequest, MaskRequest, emit_maps, feed_masked)
from .model import ModelGraph, first_line, opset_of, with_shapes
from .validate_model import quantized_ops_hint

# onnx-graphsurgeon's own warnings ("Could not convert: UNDEFINED ...") would be stray lines
# beside onnxcam's one-line errors; its errors surface as exceptions.
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

SEED = "onnxcam_seed"
GRAD_PREFIX = "onnxcam_grad/"
METADATA_KEY = "onnxcam.rewrite"
BATCH_SYMBOL = "onnxcam_batch"

#: IR version each opset needs; onnxruntime 1.31 rejects the IR 14 that onnx 1.23 writes.
_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


@dataclass(frozen=True)
class RewriteRequest:
    """What to expose. ``layers`` are tensor names; ``relu`` is "plain" or "guided".

    ``gradient=False`` builds a forward-only model (no seed input) exposing ``layers``;
    ``head=A`` cuts the model at tensor ``A`` (see the module docstring); ``layers`` is then
    ``(A,)`` when the gradient is wanted. ``maps`` also computes a method's heatmap and
    channel weights in the graph (:mod:`onnxcam.ingraph`); ``masks`` (forward-only) feeds the
    model Score-CAM's masked images, built in the graph from activations.
    """

    layers: tuple[str, ...]
    logits: str
    input_gradient: bool = False
    relu: str = "plain"
    dynamic_batch: bool = True
    gradient: bool = True
    head: str | None = None
    maps: MapRequest | None = None
    masks: MaskRequest | None = None


@dataclass
class Rewritten:
    """A rewritten model and the names of what it computes."""

    model: onnx.ModelProto
    input: str
    logits: str
    layers: tuple[str, ...]
    gradients: dict[str, str] = field(default_factory=dict)
    batch_dynamic: bool = False
    #: a head's other inputs (its frontier), fed from a forward run of the full model
    extra_inputs: tuple[str, ...] = ()
    #: where the model was read from (a cache entry), for error messages; None when built
    origin: str | None = None
    #: a verified cache entry's file, for onnxruntime to read instead of ``model`` (which may
    #: hold only the metadata; :func:`onnxcam.cache.cached_rewrite` with ``parse=False``)
    path: str | None = None
    #: with ``RewriteRequest.maps``: the heatmap output, and each layer's weights output
    heatmap: str | None = None
    weights: dict[str, str] = field(default_factory=dict)

    @property
    def has_seed(self) -> bool:
        return any(i.name == SEED for i in self.model.graph.input)

    @staticmethod
    def from_model(model: onnx.ModelProto) -> Rewritten:
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                info = json.loads(prop.value)
                return Rewritten(model, info["input"], info["logits"], tuple(info["layers"]),
                                 info["gradients"], info["batch_dynamic"],
                                 tuple(info.get("extra_inputs", ())), heatmap=info.get("heatmap"),
                                 weights=info.get("weights", {}))
        raise ModelError("not a model rewritten by onnxcam (no onnxcam.rewrite metadata)")


def _guided_clip(ctx: VJP):
    """Guided backprop through a Clip whose lower bound is >= 0 (ReLU6 is a rectifier too):
    the Clip gradient, also zeroed where the incoming gradient is negative. Deliberately
    unlike pytorch-grad-cam and captum, which only swap ``nn.ReLU`` modules, so that on
    MobileNets (ReLU6 everywhere) guided backprop is not just the plain gradient."""
    grads = list(RULES["Clip"](ctx))
    low = _constant_value(ctx.x[1]) if len(ctx.x) > 1 and ctx.x[1].name else None
    if low is None or low.size != 1 or float(low.reshape(-1)[0]) < 0:
        return grads  # no lower bound, or a hard-tanh-like clip: not a rectifier, left plain
    grads[0] = ctx.b.where(ctx.b.greater(ctx.g, 0.0), grads[0], 0.0)
    return grads


def _constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """An initializer's or a Constant node's value (torch exports ReLU6 bounds as Constant
    nodes, tf2onnx as initializers), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is not None and producer.op == "Constant":
        value = producer.attrs.get("value")
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


def rules_for(relu: str) -> Mapping[str, Rule]:
    """The VJP table; guided backprop swaps the rectifiers' rules (Relu, and Clip from 0)."""
    if relu == "guided":
        return {**RULES, "Relu": Rule(guided_relu), "Clip": Rule(_guided_clip)}
    return RULES


def rewrite(model: onnx.ModelProto, request: RewriteRequest, source: str = "<model>",
            threads: int = 0) -> Rewritten:
    """Add the seed input and the gradient subgraph; see the module docstring. ``threads``:
    intra-op threads of the onnxruntime session that checks a dynamic batch (0: default)."""
    if opset_of(model) < 13:
        model = _convert(model, 13, source)
    if not request.gradient:
        graph, tensors, _ = _prepare(model, request, source)
        static = _build_forward(graph, tensors, request, opset_of(model))
        return _with_dynamic_batch(static, request, threads)
    rules = rules_for(request.relu)
    graph, tensors, wrt = _prepare(model, request, source)
    gradient_plan = plan(wrt, tensors[request.logits], rules)
    if gradient_plan.missing:
        missing = [(n.op, n.name) for n in gradient_plan.missing]
        raise UnsupportedOpError(
            f"{source}: {describe_missing(gradient_plan.missing)}{quantized_ops_hint(missing)}; "
            f"{_working_layers_hint(model, tensors, request.logits, rules)}"
            f"{fused_hint(n.op for n in gradient_plan.missing)}",
            [(n.op, n.name) for n in gradient_plan.missing])
    if gradient_plan.min_opset > opset_of(model):
        model = _convert(model, gradient_plan.min_opset, source)
        graph, tensors, wrt = _prepare(model, request, source)

    static = _build(graph, tensors, wrt, request, rules, opset_of(model), source)
    return _with_dynamic_batch(static, request, threads)


def _working_layers_hint(model: onnx.ModelProto, tensors, logits: str, rules) -> str:
    """Which candidate layers have a fully supported gradient path (the nearest to the
    logits named), for the unsupported-op error."""
    layers = ModelGraph(model).layers(logits)
    working = [l.name for l in layers if l.name in tensors and not plan([tensors[l.name]], tensors[logits], rules).missing]
    if not working:
        return "no spatial layer of this model avoids those ops: please report the op"
    return f"a layer after them works, e.g. layer '{working[-1]}' (CLI: -l {working[-1]})"


def _with_dynamic_batch(static: Rewritten, request: RewriteRequest, threads: int = 0) -> Rewritten:
    input_name = static.input
    if _is_dynamic(static.model, input_name):
        static.batch_dynamic = True  # exported with a dynamic batch: nothing to verify
        _store_metadata(static)
    elif request.dynamic_batch:
        dynamic = _try_dynamic_batch(static, threads)
        if dynamic is not None:
            return dynamic
    return static


def _prepare(model: onnx.ModelProto, request: RewriteRequest, source: str):
    """The graph (cut at ``request.head`` when set), its tensors, and the tensors to
    differentiate with respect to."""
    graph = _import(model)
    tensors = graph.tensors()
    missing = [n for n in (*request.layers, request.logits, request.head) if n and n not in tensors]
    if missing:
        raise ModelError(f"{source}: no tensor named '{missing[0]}'")
    if request.head is not None:
        _cut(graph, tensors, request, source)
    wrt = [tensors[name] for name in request.layers] if request.gradient else []
    input_name = _data_input(graph).name
    if request.gradient and request.input_gradient and input_name not in request.layers:
        wrt.append(tensors[input_name])
    return graph, tensors, wrt


def head_frontier(model: onnx.ModelProto | ModelGraph, layer: str, logits: str,
                  source: str = "<model>") -> tuple[str, ...]:
    """The tensors besides ``layer`` that a head cut at ``layer`` needs as inputs.

    Walking back from ``logits``: a tensor downstream of ``layer`` is computed in the head; a
    constant one (depending on no graph input) is too; any other is on the frontier. Raises
    :class:`LayerError` when ``logits`` does not depend on ``layer``, or when the frontier
    holds a non-float tensor (shape arithmetic on the image, which a batched head cannot take).
    """
    graph = model if isinstance(model, ModelGraph) else ModelGraph(model, source)
    variable = _downstream(graph, {i.name for i in graph.inputs})
    below = _downstream(graph, {layer})
    if logits not in below:
        raise LayerError(f"{graph.source}: '{logits}' does not depend on layer '{layer}'")
    frontier: list[str] = []
    seen: set[str] = set()
    stack = [logits]
    while stack:
        name = stack.pop()
        if name in seen or name == layer or name not in variable:
            continue
        seen.add(name)
        if name not in below:
            frontier.append(name)
            continue
        stack.extend(i for i in graph.producer[name].input if i)
    for name in frontier:
        if graph.elem_type(name) not in _FLOATS:
            reader = next((n for n in graph.consumers.get(name, [])
                           if any(o in below for o in n.output)), None)
            where = f" (read by {reader.op_type} '{reader.name}')" if reader is not None else ""
            raise LayerError(f"{graph.source}: cannot cut the model at '{layer}': the layers after "
                             f"it also read the non-float tensor '{name}'{where}")
    return tuple(sorted(frontier))


_FLOATS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE})


def _downstream(graph: ModelGraph, names: set[str]) -> set[str]:
    """Tensors computed from any of ``names`` (themselves included)."""
    seen, stack = set(names), list(names)
    while stack:
        for node in graph.consumers.get(stack.pop(), []):
            for out in node.output:
                if out and out not in seen:
                    seen.add(out)
                    stack.append(out)
    return seen


def _cut(graph: gs.Graph, tensors, request: RewriteRequest, source: str) -> None:
    """Make ``request.head`` (and its frontier) the graph's inputs; drop what feeds them."""
    frontier = head_frontier(gs.export_onnx(graph, do_type_check=False), request.head,
                             request.logits, source)
    inputs = [tensors[request.head]] + [tensors[name] for name in frontier]
    for tensor in inputs:
        tensor.inputs.clear()
        if tensor.dtype is None:
            tensor.dtype = np.float32
    graph.inputs = inputs
    graph.outputs = [tensors[request.logits]]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()


def _build_forward(graph: gs.Graph, tensors, request: RewriteRequest, opset: int) -> Rewritten:
    """Forward only: the logits and the ``layers`` tensors as outputs, no seed input."""
    input_name = _data_input(graph).name
    if request.masks is not None:
        feed_masked(Emitter(graph, opset, np.float32, prefix="onnxcam_masks"), _data_input(graph), request.masks)
    logits = tensors[request.logits]
    outputs = list(graph.outputs)
    for tensor in [logits] + [tensors[name] for name in request.layers]:
        if tensor not in outputs and tensor.name != input_name:
            outputs.append(tensor)
    for tensor in outputs:
        if tensor.dtype is None:
            tensor.dtype = np.float32
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = _IR_FOR_OPSET.get(max(opset, 13), 10)
    rewritten = Rewritten(model, input_name, logits.name, tuple(request.layers), {},
                          batch_dynamic=False, extra_inputs=_extra_inputs(graph, input_name))
    _store_metadata(rewritten)
    return rewritten


def _extra_inputs(graph: gs.Graph, input_name: str) -> tuple[str, ...]:
    return tuple(t.name for t in graph.inputs if t.name not in (input_name, SEED, MASK_SOURCE))


def _build(graph: gs.Graph, tensors, wrt, request: RewriteRequest, rules, opset: int,
           source: str) -> Rewritten:
    logits = tensors[request.logits]
    float_dtype = np.float32
    emitter = Emitter(graph, opset, float_dtype)
    seed_in = gs.Variable(SEED, dtype=float_dtype, shape=list(logits.shape or [None, None]))
    graph.inputs.append(seed_in)
    # a class-score vector [N, C]: an all-zero row means top-1; a dense output's seed (the
    # output's shape, onnxcam.dense) is always given, and used as is
    dense = logits.shape is not None and len(logits.shape) != 2
    seed, top1 = (seed_in, None) if dense else _default_to_top1(emitter, seed_in, logits)
    # start after the classifier where its VJP can be a row gather (autodiff.classifier)
    classifier = None if dense else find_classifier(logits, wrt)
    start, cotangent = (logits, seed) if classifier is None else (classifier.x, classifier.vjp(emitter, seed))
    try:
        grads = build_gradients(emitter, start, cotangent, wrt, rules)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"{source}: {exc}", exc.nodes) from None

    input_name = _data_input(graph).name
    gradient_names: dict[str, str] = {}
    outputs = [t for t in graph.outputs]
    if logits not in outputs:
        outputs.append(logits)
    for tensor, grad in zip(wrt, grads):
        if tensor not in outputs and tensor.name != input_name:
            outputs.append(tensor)
        if grad.name.startswith(GRAD_PREFIX) or grad in graph.inputs:
            grad = emitter.op("Identity", grad)  # two tensors share one gradient: name a copy
        grad.name = GRAD_PREFIX + tensor.name
        grad.dtype, grad.shape = float_dtype, tensor.shape
        gradient_names[tensor.name] = grad.name
        outputs.append(grad)
    heatmap, weight_names = None, {}
    if request.maps is not None:
        image = _data_input(graph)
        heatmap, weight_names = _emit_maps(emitter, request, tensors, grads, image, outputs)
        if request.head is None and top1 is not None and image.shape is not None and len(image.shape) > 1:
            _emit_checks(emitter, logits, heatmap, image, outputs)
            _emit_top1(top1, seed, outputs)
        heatmap = heatmap.name
    for tensor in outputs:
        if tensor.dtype is None:
            tensor.dtype = float_dtype
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    model = gs.export_onnx(graph, do_type_check=False)
    opset = max(opset, 13)
    model.ir_version = _IR_FOR_OPSET.get(opset, 10)
    rewritten = Rewritten(model, input_name, logits.name, tuple(request.layers), gradient_names,
                          batch_dynamic=False, extra_inputs=_extra_inputs(graph, input_name),
                          heatmap=heatmap, weights=weight_names)
    _store_metadata(rewritten)
    return rewritten


def _emit_maps(b: Emitter, request: RewriteRequest, tensors, grads, image: gs.Tensor,
               outputs: list) -> tuple[gs.Tensor, dict[str, str]]:
    """The method's heatmap and channel weights as outputs (:func:`onnxcam.ingraph.emit_maps`)."""
    heatmap, weights = emit_maps(b, request.maps, [tensors[n] for n in request.layers],
                                 grads[:len(request.layers)], image)
    heatmap = _named(b, heatmap, HEATMAP_OUTPUT, outputs)
    names = {}
    for layer, tensor in zip(request.layers, weights):
        if tensor is not None:
            names[layer] = _named(b, tensor, WEIGHTS_PREFIX + layer, outputs).name
    return heatmap, names


def _named(b: Emitter, tensor: gs.Tensor, name: str, outputs: list) -> gs.Tensor:
    """``tensor`` as the graph output ``name``: renamed where it is a tensor onnxcam's
    emitter made and nothing else names (an Identity would copy it: ~11 us for a 224x224 map
    on one core), else an Identity of it."""
    if not (tensor.name.startswith(b.prefix + "/") and tensor.inputs and tensor not in outputs):
        tensor = b.op("Identity", tensor)
    tensor.name, tensor.dtype = name, np.float32
    outputs.append(tensor)
    return tensor


def _emit_checks(b: Emitter, logits: gs.Tensor, heatmap: gs.Tensor, image: gs.Tensor, outputs: list) -> None:
    """The Explainer's per-call checks, made in the graph (:data:`CHECKS_OUTPUT`): per image
    the sum of the input (finite exactly when every value is, barring an overflow), the sum
    of the logits (the same for them) and the heatmap's peak (0 for an all-zero map).

    The input's sum is the graph's first node, so the input is read while it is in the
    caches for the first layer anyway, not in a second pass from Python (~0.2 ms at 224x224
    once onnxruntime's run has pushed it out); and one small output read as one list is
    cheaper after a run than three numpy reductions (each ~20-80 us then)."""
    total = b.reduce_sum(image, list(range(1, len(image.shape))), keepdims=True)
    b.graph.nodes.insert(0, b.graph.nodes.pop(b.graph.nodes.index(total.inputs[0])))
    columns = [b.reshape(total, [-1, 1]), b.reduce_sum(logits, [1], keepdims=True),
               b.reshape(b.reduce("ReduceMax", heatmap, [1, 2], keepdims=True), [-1, 1])]
    checks = b.concat(columns, axis=1)
    checks.name, checks.dtype = CHECKS_OUTPUT, np.float32
    outputs.append(checks)


def _emit_top1(top1: gs.Tensor, seed: gs.Tensor, outputs: list) -> None:
    """The class (N, 1) and the seed (N, C) each image was explained for: the given seed, or
    one-hot of the top-1 class where it was all zero (:func:`_default_to_top1`); the
    Explainer reads them instead of a second argmax and one-hot in Python."""
    top1.name, top1.dtype = TOP1_OUTPUT, np.int64
    seed.name, seed.dtype = SEED_USED_OUTPUT, np.float32
    outputs.extend([top1, seed])


def _default_to_top1(b: Emitter, seed: gs.Tensor, logits: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
    """seed, with all-zero rows replaced by one-hot(argmax(logits)): top-1 in one pass; and
    the argmax (N, 1)."""
    classes = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
    top = b.op("ArgMax", logits, axis=-1, keepdims=1)
    positions = (b.const(np.arange(classes, dtype=np.int64)) if classes is not None else
                 b.op("Range", b.const(np.int64(0)), b.squeeze(b.shape(logits, start=-1), [0]),
                      b.const(np.int64(1))))
    empty = b.equal(b.reduce("ReduceL1", seed, [-1], keepdims=True), 0.0)
    return b.where(b.and_(empty, b.equal(positions, top)), 1.0, seed), top


def _store_metadata(rewritten: Rewritten) -> None:
    info = {"input": rewritten.input, "logits": rewritten.logits, "layers": list(rewritten.layers),
            "gradients": rewritten.gradients, "batch_dynamic": rewritten.batch_dynamic,
            "extra_inputs": list(rewritten.extra_inputs)}
    if rewritten.heatmap is not None:
        info.update(heatmap=rewritten.heatmap, weights=rewritten.weights)
    props = [p for p in rewritten.model.metadata_props if p.key != METADATA_KEY]
    del rewritten.model.metadata_props[:]
    rewritten.model.metadata_props.extend(props)
    entry = rewritten.model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)


def _import(model: onnx.ModelProto) -> gs.Graph:
    graph = gs.import_onnx(with_shapes(model, in_place=True))  # value_info only: no copy of the weights
    for tensor in graph.tensors().values():
        # a weight left in its file (large_models.load_external_data): read from there when a
        # rule asks for its values (BatchNormalization's scale); exported as the reference
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues \
                and large_models.in_file(tensor._values.tensor):
            tensor._values = _FileValues(tensor._values.tensor)
            # once read, gs keeps the array and exports it with this data_location: it must
            # not claim to be external then (unread, the reference is exported as it came)
            tensor.data_location = None
    return graph


class _FileValues(LazyValues):
    """gs's lazily loaded values of an initializer that stays in its external-data file."""

    def load(self) -> np.ndarray:
        return large_models.array(self.tensor)


def _data_input(graph: gs.Graph) -> gs.Variable:
    return next(t for t in graph.inputs if t.name != SEED)


def _convert(model: onnx.ModelProto, opset: int, source: str) -> onnx.ModelProto:
    """Upgrade the opset (rules need e.g. ScatterElements reductions from opset 16)."""
    try:
        converted = upgrade(model, opset)  # keeps legacy Resize/Upsample semantics
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise ModelError(f"{source}: the gradient needs opset {opset} but converting from opset "
                         f"{opset_of(model)} failed ({first_line(exc)})") from None
    converted.ir_version = _IR_FOR_OPSET.get(opset, 10)
    return converted


# -- batch ------------------------------------------------------------------------------------

def _is_dynamic(model: onnx.ModelProto, input_name: str) -> bool:
    for value in model.graph.input:
        if value.name == input_name:
            return not value.type.tensor_type.shape.dim[0].HasField("dim_value")
    return False


def make_batch_dynamic(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """A copy whose batch dimension is symbolic: for exports that pinned batch=1.

    Every data input (``input_name``, the seed, a head's frontier) and output gets the
    symbolic batch. Reshape targets that spell the batch as a literal 1 become 0 ("copy the
    input's dim"), which is right when the Reshape keeps the batch as its first axis; the
    caller verifies. Only Reshapes of batched data are touched: a Reshape of a weight (the
    gradient graph reshapes kernels to [1, M, C, k, k]) has no batch, and its 1 stays.
    """
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    graph = dynamic.graph
    constants = {t.name for t in graph.initializer}
    batched = {input_name, SEED} | {i.name for i in graph.input if i.name not in constants}
    for value in list(graph.input) + list(graph.output):
        if value.name in {o.name for o in graph.output} or value.name in batched:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].dim_param = BATCH_SYMBOL
    del graph.value_info[:]
    initializers = {t.name: t for t in graph.initializer}
    live, renamed = set(batched), {}
    for node in graph.node:  # topological order: ``live`` holds what depends on batched data
        if any(name in live for name in node.input):
            live.update(node.output)
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[0] not in live:
            continue
        target = initializers.get(node.input[1])
        if target is None:
            continue
        values = large_models.array(target)
        if values.ndim == 1 and values.size > 1 and values[0] == 1:
            if target.name not in renamed:  # a fresh initializer: others may share this one
                fixed = values.copy()
                fixed[0] = 0
                renamed[target.name] = f"{target.name}/batch"
                graph.initializer.append(onnx.numpy_helper.from_array(fixed, renamed[target.name]))
            node.input[1] = renamed[target.name]
    return dynamic


def _try_dynamic_batch(static: Rewritten, threads: int = 0) -> Rewritten | None:
    """Make the batch dynamic if a batch of 3 gives the same results as 3 single runs."""
    dynamic_model = make_batch_dynamic(static.model, static.input)
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        if threads:
            options.intra_op_num_threads = threads
        options.add_session_config_entry("session.disable_prepacking", "1")  # no packed weight copies
        session = large_models.session(dynamic_model, options, ["CPUExecutionProvider"])
        feeds = _probe_feeds(session, batch=3)
        batched = session.run(None, feeds)
        singles = [session.run(None, {k: v[i:i + 1] for k, v in feeds.items()}) for i in range(3)]
    except Exception:  # noqa: BLE001 - any failure means: keep the batch static
        return None
    for index, value in enumerate(batched):
        joined = np.concatenate([s[index] for s in singles], axis=0)
        scale = max(float(np.abs(joined).max()), 1e-6)
        if value.shape != joined.shape or float(np.abs(value - joined).max()) > 1e-4 * scale:
            return None
    dynamic = replace(static, model=dynamic_model, batch_dynamic=True)
    _store_metadata(dynamic)
    return dynamic


def _probe_feeds(session, batch: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [batch] + [d if isinstance(d, int) else 1 for d in value.shape[1:]]
        if value.name == SEED:
            feeds[value.name] = np.zeros(shape, np.float32)
        else:
            dtype = np.float64 if value.type == "tensor(double)" else np.float32
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds

