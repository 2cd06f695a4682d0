"""Checks on a model from a stranger, before anything else reads it.

:func:`checked_model` runs right after parsing (:func:`onnxcam.model.load_model`, and on a
ModelProto handed to :class:`onnxcam.Explainer`) and turns every structural fault that would
otherwise surface as a deep onnx, onnx-graphsurgeon or onnxruntime failure (or as a
misleading "no spatial activation") into one :class:`~onnxcam.errors.ModelError` line naming
the node, op or tensor and what to do:

* a node reading a tensor that nothing produces (a dangling input: a truncated or hand-edited
  file), two nodes producing one tensor, a graph output nothing produces;
* a cycle (ONNX graphs are acyclic); nodes merely out of order are sorted, as onnxruntime does;
* ops that are not ONNX ops at the declared opset, ops of custom domains (onnxruntime cannot
  run them without their library), opsets newer than onnx or onnxruntime know;
* declared shapes over :data:`MAX_ELEMENTS` values per tensor (a hostile or mistaken model
  would otherwise make onnxcam allocate them).

Models in float16, bfloat16 or float64 are computed in float32 (:func:`as_float32`): the
weights are converted (exactly, for the two 16-bit types), Casts to those types become Casts
to float32, so the forward pass, the gradient and the maps are all float32. onnxruntime's CPU
provider has no float64 kernels for Conv and pools, and the gradient rules emit float32
constants, so this is what makes such models explainable at all.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import large_models
from .errors import ModelError

#: The most values any declared tensor may hold (per the dims that are fixed; a symbolic
#: batch counts as 1): 2^28 float32 values are 1 GiB. A 3 x 8192 x 8192 input fits.
MAX_ELEMENTS = 2 ** 28

#: Domains whose ops onnxruntime runs without extra libraries.
_ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")
_ORT_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc")

#: Float types computed in float32 instead.
_NARROW_OR_WIDE = frozenset({TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE})

#: Ops whose ``dtype``/``to`` attribute names the float type they produce.
_TYPE_ATTRIBUTES = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                    "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


def checked_model(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """``model`` if it passes the checks in the module docstring, a fixed copy when it only
    needed its nodes sorted or its floats made float32; else a ModelError."""
    graph = model.graph
    if not graph.node:
        raise ModelError(f"{source}: not an ONNX model or an empty graph (no nodes)")
    _check_text(model, source)
    _check_opsets(model, source)
    _check_ops(model, source)
    _check_tensors(model, source)
    order = _topological_order(graph, source)
    check_declared(model, source)
    needs_float32 = _has_non_float32(model)
    if order is None and not needs_float32:
        return model
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    if order is not None:
        nodes = [fixed.graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for copy, node in zip(copies, nodes):
            copy.CopyFrom(node)
        del fixed.graph.node[:]
        fixed.graph.node.extend(copies)
    if needs_float32:
        as_float32(fixed)
    return fixed


def _check_text(model: onnx.ModelProto, source: str) -> None:
    """Names, op types and domains are valid UTF-8 (protobuf hands out bytes where they are not)."""
    graph = model.graph
    texts = [e.domain for e in model.opset_import]
    texts += [v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)]
    texts += [t.name for t in _all_tensors(graph)]
    for node in _all_nodes(graph):
        texts += [node.op_type, node.domain, node.name, *node.input, *node.output, *(a.name for a in node.attribute)]
    bad = next((text for text in texts if not isinstance(text, str)), None)
    if bad is not None:
        raise ModelError(f"{source}: a name or op type is not valid text ({bytes(bad)[:40]!r}): the file is "
                         "corrupt; re-export it")


# -- versions, ops, domains -------------------------------------------------------------------

def _check_opsets(model: onnx.ModelProto, source: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain not in ("", "ai.onnx"):
            continue
        if entry.version < 1 or entry.version > newest:
            raise ModelError(f"{source}: declares opset {entry.version} of the ONNX domain; onnx "
                             f"{onnx.__version__} knows opsets 1 to {newest}: re-export with a released opset")
        supported = ort_max_opset()
        if supported is not None and entry.version > supported:
            raise ModelError(f"{source}: declares opset {entry.version}; onnxruntime supports opsets up to "
                             f"{supported}: re-export with opset {supported} or lower")


@functools.lru_cache(maxsize=1)
def ort_max_opset() -> int | None:
    """The newest ONNX opset this onnxruntime loads (asked once, with a one-node model), or
    None when it cannot be told."""
    import onnxruntime as ort

    for version in range(onnx.defs.onnx_opset_version(), 12, -1):
        probe = onnx.helper.make_model(
            onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "probe",
                                   [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]),
            opset_imports=[onnx.helper.make_opsetid("", version)], ir_version=8)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return version
        except Exception as exc:  # noqa: BLE001 - the message says up to which opset it goes
            found = re.search(r"till opset (\d+)", str(exc))
            if found:
                return int(found.group(1))
    return None


def _check_ops(model: onnx.ModelProto, source: str) -> None:
    """Every node's op exists in its domain at the declared opset; no custom domains."""
    opsets = {("" if e.domain == "ai.onnx" else e.domain): e.version for e in model.opset_import}
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version if 3 <= model.ir_version <= onnx.IR_VERSION else onnx.IR_VERSION
    context.opset_imports = opsets
    for node in _all_nodes(model.graph):
        domain = "" if node.domain == "ai.onnx" else node.domain
        where = f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"
        if domain in _ORT_DOMAINS:
            continue  # onnxruntime's own contrib ops: it loads them; the gradient may not pass
        if domain not in _ONNX_DOMAINS:
            raise ModelError(f"{source}: {where} is a custom op of domain '{domain}', which onnxruntime "
                             "cannot run without that domain's library: export the model with standard "
                             "ONNX ops only (e.g. torch.onnx.export without custom symbolic functions)")
        if domain not in opsets:
            raise ModelError(f"{source}: {where} uses domain '{domain or 'ai.onnx'}' but the model "
                             "declares no opset for it: the file is incomplete; re-export the model")
        version = opsets[domain]
        if not onnx.defs.has(node.op_type, domain):
            raise ModelError(f"{source}: {where}: '{node.op_type}' is not an op of the ONNX domain "
                             f"'{domain or 'ai.onnx'}': the file is corrupt or needs a custom runtime")
        if not onnx.defs.has(node.op_type, version, domain):
            since = onnx.defs.get_schema(node.op_type, onnx.defs.onnx_opset_version(), domain).since_version
            raise ModelError(f"{source}: {where}: {node.op_type} exists from opset {since} on, but the "
                             f"model declares opset {version}: re-export with opset {since} or later")
        if node.op_type == "Transpose" and domain == "":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm is not None and sorted(perm) != list(range(len(perm))):
                raise ModelError(f"{source}: {where} has perm {perm}, not a permutation of the axes: "
                                 "the file is corrupt; re-export it")
        if not any(True for _ in _subgraphs(node)):  # a subgraph's checks need its outer scope
            try:
                onnx.checker.check_node(node, context)
            except onnx.checker.ValidationError as exc:
                detail = str(exc).strip().splitlines()[0]
                raise ModelError(f"{source}: {where} does not match the {node.op_type} of opset {version} "
                                 f"({detail}): the file is corrupt or mislabels its opset; re-export it") from None


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for sub in _subgraphs(node):
            yield from _all_nodes(sub)


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            yield attribute.g
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            yield from attribute.graphs


def _check_tensors(model: onnx.ModelProto, source: str) -> None:
    """Every stored tensor (initializers, Constant values) has a known element type and holds
    as many values as its dims say (external data is checked against its file at load)."""
    for tensor in _all_tensors(model.graph):
        name = f"tensor '{tensor.name}'" if tensor.name else "a constant tensor"
        if tensor.data_type not in TensorProto.DataType.values() or tensor.data_type == TensorProto.UNDEFINED:
            raise ModelError(f"{source}: {name} has element type {tensor.data_type}, which ONNX does not define: "
                             "the file is corrupt; re-export the model")
        if any(d < 0 for d in tensor.dims):
            raise ModelError(f"{source}: {name} has negative dims {list(tensor.dims)}: the file is corrupt")
        if (tensor.data_location == TensorProto.EXTERNAL or tensor.data_type in _UNCOUNTED
                or tensor.HasField("segment")):
            continue
        expected = int(np.prod(tensor.dims, dtype=object)) if tensor.dims else 1
        if tensor.data_type == TensorProto.STRING and tensor.HasField("raw_data"):
            raise ModelError(f"{source}: {name} is a string tensor with raw data, which ONNX does not allow: "
                             "the file is corrupt; re-export it")
        if tensor.HasField("raw_data"):
            held = len(tensor.raw_data) / onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        else:
            held = len(getattr(tensor, onnx.helper.tensor_dtype_to_field(tensor.data_type)))
            held /= 2 if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else 1
        if held != expected:
            raise ModelError(f"{source}: {name} has dims {list(tensor.dims)} ({expected:,} values) but holds "
                             f"{held:,g}: the file is corrupt or truncated; re-export it")


#: Element types whose values are not counted here: the sub-byte types packed two or four to
#: a byte.
_UNCOUNTED = frozenset({TensorProto.UINT4, TensorProto.INT4, TensorProto.FLOAT4E2M1,
                        getattr(TensorProto, "UINT2", -1), getattr(TensorProto, "INT2", -1)})


# -- structure --------------------------------------------------------------------------------

def _topological_order(graph: onnx.GraphProto, source: str) -> list[int] | None:
    """None when the nodes are already in a valid order; else the order to put them in.

    Raises on a dangling input, a tensor produced twice, an output nothing produces, or a cycle."""
    known = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer or name in known - {""}:
                raise ModelError(f"{source}: tensor '{name}' is produced twice (node '{node.name}' "
                                 f"({node.op_type}) and an earlier node or input): the file is corrupt")
            producer[name] = index
    needs: list[set[int]] = []
    for node in graph.node:
        reads = list(node.input) + [n for sub in _subgraphs(node) for n in _free_names(sub)]
        deps = set()
        for name in reads:
            if name in producer:
                deps.add(producer[name])
            elif name not in known:
                where = f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"
                raise ModelError(f"{source}: {where} reads '{name}', which no node, graph input or "
                                 "initializer provides: the file is truncated or was edited; re-export it")
        needs.append(deps)
    for output in graph.output:
        if output.name not in producer and output.name not in known:
            raise ModelError(f"{source}: graph output '{output.name}' is produced by no node: the file is "
                             "truncated or was edited; re-export it")
    in_order = all(dep < index for index, deps in enumerate(needs) for dep in deps)
    order = None if in_order else _kahn(needs)
    if order is not None and len(order) < len(needs):
        cycle = _a_cycle(needs, set(range(len(needs))) - set(order))[::-1]  # in data-flow order
        names = " -> ".join(f"'{graph.node[i].name or graph.node[i].op_type}'" for i in cycle + cycle[:1])
        raise ModelError(f"{source}: the graph has a cycle ({names}); ONNX graphs must be acyclic: "
                         "the file is corrupt or was edited; re-export it")
    _check_input_reaches_an_output(graph, source)
    return order


def _check_input_reaches_an_output(graph: onnx.GraphProto, source: str) -> None:
    """Some graph output is computed from the image input (a model whose outputs ignore it,
    e.g. a node rewired to read a weight instead, explains nothing)."""
    constants = {t.name for t in graph.initializer}
    reached = {i.name for i in graph.input if i.name not in constants}
    if not reached:
        return  # "no data input" is reported with the model's other inputs
    changed = True
    while changed:  # the nodes may be out of order or cyclic here: iterate to a fixed point
        changed = False
        for node in graph.node:
            reads = set(node.input) | {n for sub in _subgraphs(node) for n in _free_names(sub)}
            if reads & reached and not set(node.output) <= reached:
                reached |= set(node.output)
                changed = True
    if not any(o.name in reached for o in graph.output):
        names = ", ".join(f"'{i.name}'" for i in graph.input if i.name not in constants)
        raise ModelError(f"{source}: no output of the model depends on its input {names}: a node was rewired "
                         "or the file is corrupt; re-export it")


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the enclosing scopes."""
    defined = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {""}
    defined |= {name for node in graph.node for name in node.output}
    free = set()
    for node in graph.node:
        free |= {name for name in node.input if name not in defined}
        for sub in _subgraphs(node):
            free |= _free_names(sub) - defined
    return free | {o.name for o in graph.output if o.name not in defined}


def _kahn(needs: list[set[int]]) -> list[int]:
    """A topological order (stable: ties keep the file's order) of the nodes it can reach."""
    import heapq

    waiting = [len(deps) for deps in needs]
    users: list[list[int]] = [[] for _ in needs]
    for index, deps in enumerate(needs):
        for dep in deps:
            users[dep].append(index)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    return order


def _a_cycle(needs: list[set[int]], stuck: set[int]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm could not order (walk dependencies until a
    node repeats: every stuck node has a stuck dependency)."""
    path: list[int] = []
    seen: dict[int, int] = {}
    node = min(stuck)
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(d for d in needs[node] if d in stuck)
    return path[seen[node]:][:8]


# -- sizes ------------------------------------------------------------------------------------

def check_declared(model: onnx.ModelProto, source: str) -> None:
    """No declared tensor (input, output, value_info) has an undefined element type, negative
    dims or more than :data:`MAX_ELEMENTS` values."""
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        tensor_type = value.type.tensor_type
        if tensor_type.elem_type not in TensorProto.DataType.values():
            raise ModelError(f"{source}: tensor '{value.name}' declares element type {tensor_type.elem_type}, "
                             "which ONNX does not define: the file is corrupt; re-export it")
        if not tensor_type.HasField("shape"):
            continue
        dims = [d.dim_value for d in tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise ModelError(f"{source}: tensor '{value.name}' declares a negative dimension {dims}: "
                             "the file is corrupt; re-export it")
        count = int(np.prod(dims, dtype=object)) if dims else 1
        if count > MAX_ELEMENTS:
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
            hint = ("export the model for a smaller input size (or give a smaller --size)"
                    if any(value.name == i.name for i in graph.input) else
                    "the file is corrupt, or the model is far larger than an image classifier")
            raise ModelError(f"{source}: tensor '{value.name}' has shape {shape}, {count:,} values, over "
                             f"onnxcam's limit of {MAX_ELEMENTS:,} per tensor: {hint}")


# -- float32 ----------------------------------------------------------------------------------

def _has_non_float32(model: onnx.ModelProto) -> bool:
    graph = model.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    if any(v.type.tensor_type.elem_type in _NARROW_OR_WIDE for v in values):
        return True
    for tensor in _all_tensors(graph):
        if tensor.data_type in _NARROW_OR_WIDE:
            return True
    for node in _all_nodes(graph):
        name = _TYPE_ATTRIBUTES.get(node.op_type)
        if name and any(a.name == name and a.i in _NARROW_OR_WIDE for a in node.attribute):
            return True
    return False


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant/ConstantOfShape values, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_tensors(sub)


def as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """Make every float16/bfloat16/float64 tensor, Cast target and declared type float32, in
    place (see the module docstring); returns ``model``."""
    graph = model.graph
    for tensor in _all_tensors(graph):
        if tensor.data_type in _NARROW_OR_WIDE:
            widened = numpy_helper.from_array(large_models.array(tensor).astype(np.float32), tensor.name)
            tensor.CopyFrom(widened)
    for sub in [graph, *(_nested_graphs(graph))]:
        for value in list(sub.input) + list(sub.output) + list(sub.value_info):
            if value.type.tensor_type.elem_type in _NARROW_OR_WIDE:
                value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in _all_nodes(graph):
        name = _TYPE_ATTRIBUTES.get(node.op_type)
        for attribute in node.attribute:
            if attribute.name == name and attribute.i in _NARROW_OR_WIDE:
                attribute.i = TensorProto.FLOAT
    _drop_float_casts(model)
    return model


def _drop_float_casts(model: onnx.ModelProto) -> None:
    """Remove the Casts that have become float32 -> float32. A float16 export that keeps
    float32 inputs and outputs ends in ``Softmax -> Cast``; without the Cast, the logits are
    found behind the Softmax again (:meth:`onnxcam.model.ModelGraph.logits`)."""
    graph = model.graph
    try:
        inferred = large_models.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types unknown: the Casts stay (they are harmless)
        return
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    fixed = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if node.op_type != "Cast" or to != TensorProto.FLOAT or types.get(node.input[0]) != TensorProto.FLOAT:
            continue
        source, result = node.input[0], node.output[0]
        if result in outputs:
            if source in fixed or source in outputs:
                continue
            old, new = source, result  # the producer writes the output's name directly
        else:
            old, new = result, source
        graph.node.remove(node)
        for other in graph.node:
            other.input[:] = [new if name == old else name for name in other.input]
            other.output[:] = [new if name == old else name for name in other.output]
        kept = [value for value in graph.value_info if value.name != old]
        del graph.value_info[:]
        graph.value_info.extend(kept)


def _nested_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    for node in graph.node:
        for sub in _subgraphs(node):
            yield sub
            yield from _nested_graphs(sub)


# -- quantized models ---------------------------------------------------------------------------

#: Ops of QOperator-format and dynamically quantized models that compute on integers.
_INTEGER_OPS = frozenset({"ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear",
                          "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"})


def quantized_ops_hint(nodes) -> str:
    """What to do when integer ops block the gradient ('' when none of ``nodes``, NodeProtos
    or (op, name) pairs, is one)."""
    pairs = [(n.op_type, n.name) if hasattr(n, "op_type") else tuple(n) for n in nodes]
    found = [(op, name) for op, name in pairs if op.startswith("QLinear") or op in _INTEGER_OPS]
    if not found:
        return ""
    op, name = found[0]
    return (f"; {op} '{name}' computes on quantized integers, which have no gradient: explain the float "
            "model, or quantize it in QDQ format (onnxruntime.quantization.quantize_static(..., "
            "quant_format=QuantFormat.QDQ)), which onnxcam explains straight through DequantizeLinear")


def check_batch(outputs: dict[str, np.ndarray], batch: int, source: str) -> None:
    """Every output of a run on ``batch`` inputs has ``batch`` rows: a model whose layers move
    the batch axis elsewhere (a Transpose over it) runs, but its logits are not per image."""
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != batch:
            raise ModelError(f"{source}: '{name}' has shape {list(value.shape)} for a batch of {batch}: the "
                             "model moves the batch axis (a Transpose or Reshape over it); onnxcam explains "
                             "models whose outputs keep the input's first axis as the batch")
