"""Stage 2: rewrite a classifier so one session returns logits, activations and gradients.

The rewritten model has

* inputs: the model's own image input, and ``onnxcam_seed`` [N, K] (K = number of logits):
  the weights of the linear functional ``score = sum(seed * logits)`` whose gradient is taken.
  A row of zeros means "the top-1 class": it is replaced in-graph by the one-hot of
  ``argmax(logits)``, so the usual explanation costs a single run;
* outputs: the logits, each chosen activation ``A`` and ``onnxcam_grad/<A>`` = d score / d A,
  plus ``onnxcam_grad/<input>`` when the input gradient was asked for (pixel-space methods).

Rewrites are cached by content hash (model bytes, request, and the source of the autodiff), so
a second run on the same model skips surgery. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from .autodiff import RULES, Emitter, build_gradients, guided_relu, plan
from .autodiff.engine import describe_missing
from .autodiff.rules import Rule
from .errors import ModelError, UnsupportedOpError
from .model import ModelGraph, first_line, opset_of, with_shapes

SEED = "onnxcam_seed"
GRAD_PREFIX = "onnxcam_grad/"
METADATA_KEY = "onnxcam.rewrite"
BATCH_SYMBOL = "onnxcam_batch"

#: IR version each opset needs; onnxruntime 1.31 rejects the IR 14 that onnx 1.23 writes.
_IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


@dataclass(frozen=True)
class RewriteRequest:
    """What to expose. ``layers`` are tensor names; ``relu`` is "plain" or "guided"."""

    layers: tuple[str, ...]
    logits: str
    input_gradient: bool = False
    relu: str = "plain"
    dynamic_batch: bool = True


@dataclass
class Rewritten:
    """A rewritten model and the names of what it computes."""

    model: onnx.ModelProto
    input: str
    logits: str
    layers: tuple[str, ...]
    gradients: dict[str, str] = field(default_factory=dict)
    batch_dynamic: bool = False

    @staticmethod
    def from_model(model: onnx.ModelProto) -> Rewritten:
        for prop in model.metadata_props:
            if prop.key == METADATA_KEY:
                info = json.loads(prop.value)
                return Rewritten(model, info["input"], info["logits"], tuple(info["layers"]),
                                 info["gradients"], info["batch_dynamic"])
        raise ModelError("not a model rewritten by onnxcam (no onnxcam.rewrite metadata)")


def rules_for(relu: str) -> Mapping[str, Rule]:
    """The VJP table; guided backprop swaps only the Relu rule."""
    if relu == "guided":
        return {**RULES, "Relu": Rule(guided_relu)}
    return RULES


def rewrite(model: onnx.ModelProto, request: RewriteRequest, source: str = "<model>") -> Rewritten:
    """Add the seed input and the gradient subgraph; see the module docstring."""
    if opset_of(model) < 13:
        model = _convert(model, 13, source)
    graph = _import(model)
    rules = rules_for(request.relu)
    tensors = graph.tensors()
    wrt = [tensors[name] for name in request.layers]
    input_name = _data_input(graph).name
    if request.input_gradient and input_name not in request.layers:
        wrt.append(tensors[input_name])
    gradient_plan = plan(wrt, tensors[request.logits], rules)
    if gradient_plan.missing:
        raise UnsupportedOpError(f"{source}: {describe_missing(gradient_plan.missing)}",
                                 [(n.op, n.name) for n in gradient_plan.missing])
    if gradient_plan.min_opset > opset_of(model):
        model = _convert(model, gradient_plan.min_opset, source)
        graph = _import(model)
        tensors = graph.tensors()
        wrt = [tensors[w.name] for w in wrt]

    static = _build(graph, tensors, wrt, request, rules, opset_of(model), source)
    if _is_dynamic(static.model, input_name):
        static.batch_dynamic = True  # exported with a dynamic batch: nothing to verify
        _store_metadata(static)
    elif request.dynamic_batch:
        dynamic = _try_dynamic_batch(static)
        if dynamic is not None:
            return dynamic
    return static


def _build(graph: gs.Graph, tensors, wrt, request: RewriteRequest, rules, opset: int,
           source: str) -> Rewritten:
    logits = tensors[request.logits]
    float_dtype = np.float32
    emitter = Emitter(graph, opset, float_dtype)
    seed_in = gs.Variable(SEED, dtype=float_dtype, shape=list(logits.shape or [None, None]))
    graph.inputs.append(seed_in)
    seed = _default_to_top1(emitter, seed_in, logits)
    try:
        grads = build_gradients(emitter, logits, seed, wrt, rules)
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
        grad.name = GRAD_PREFIX + tensor.name
        grad.dtype, grad.shape = float_dtype, tensor.shape
        gradient_names[tensor.name] = grad.name
        outputs.append(grad)
    for tensor in outputs:
        if tensor.dtype is None:
            tensor.dtype = float_dtype
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=False).toposort()

    model = gs.export_onnx(graph, do_type_check=False)
    opset = max(opset, 13)
    model.ir_version = _IR_FOR_OPSET.get(opset, 10)
    rewritten = Rewritten(model, input_name, logits.name, tuple(request.layers), gradient_names,
                          batch_dynamic=False)
    _store_metadata(rewritten)
    return rewritten


def _default_to_top1(b: Emitter, seed: gs.Tensor, logits: gs.Tensor) -> gs.Tensor:
    """seed, with all-zero rows replaced by one-hot(argmax(logits)): top-1 in one pass."""
    classes = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
    top = b.op("ArgMax", logits, axis=-1, keepdims=1)
    positions = (b.const(np.arange(classes, dtype=np.int64)) if classes is not None else
                 b.op("Range", b.ints(0), b.squeeze(b.shape(logits, start=-1), [0]), b.ints(1)))
    one_hot = b.as_float(b.equal(positions, top))
    empty = b.as_float(b.equal(b.reduce_sum(b.abs(seed), [-1], keepdims=True), 0.0))
    return b.add(seed, b.mul(empty, one_hot))


def _store_metadata(rewritten: Rewritten) -> None:
    info = {"input": rewritten.input, "logits": rewritten.logits, "layers": list(rewritten.layers),
            "gradients": rewritten.gradients, "batch_dynamic": rewritten.batch_dynamic}
    props = [p for p in rewritten.model.metadata_props if p.key != METADATA_KEY]
    del rewritten.model.metadata_props[:]
    rewritten.model.metadata_props.extend(props)
    entry = rewritten.model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(info)


def _import(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(with_shapes(model))


def _data_input(graph: gs.Graph) -> gs.Variable:
    return next(t for t in graph.inputs if t.name != SEED)


def _convert(model: onnx.ModelProto, opset: int, source: str) -> onnx.ModelProto:
    """Upgrade the opset (rules need e.g. ScatterElements reductions from opset 16)."""
    try:
        converted = version_converter.convert_version(model, opset)
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

    Reshape targets that spell the batch as a literal 1 become 0 ("copy the input's dim"),
    which is right when the Reshape keeps the batch as its first axis; the caller verifies.
    """
    dynamic = onnx.ModelProto()
    dynamic.CopyFrom(model)
    graph = dynamic.graph
    for value in list(graph.input) + list(graph.output):
        if value.name in {o.name for o in graph.output} or value.name in (input_name, SEED):
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
                dims[0].dim_param = BATCH_SYMBOL
    del graph.value_info[:]
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        target = initializers.get(node.input[1])
        if target is None:
            continue
        values = onnx.numpy_helper.to_array(target)
        if values.ndim == 1 and values.size > 1 and values[0] == 1:
            fixed = values.copy()
            fixed[0] = 0
            target.CopyFrom(onnx.numpy_helper.from_array(fixed, target.name))
    return dynamic


def _try_dynamic_batch(static: Rewritten) -> Rewritten | None:
    """Make the batch dynamic if a batch of 3 gives the same results as 3 single runs."""
    dynamic_model = make_batch_dynamic(static.model, static.input)
    try:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(dynamic_model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
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
    dynamic = Rewritten(dynamic_model, static.input, static.logits, static.layers,
                        static.gradients, batch_dynamic=True)
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
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


# -- cache ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$ONNXCAM_CACHE_DIR, else $XDG_CACHE_HOME/onnxcam, else ~/.cache/onnxcam."""
    if os.environ.get("ONNXCAM_CACHE_DIR"):
        return Path(os.environ["ONNXCAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "onnxcam"


def _code_fingerprint() -> str:
    """Hash of the code that shapes a rewrite, so a changed rule invalidates the cache."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for path in sorted([here / "surgery.py", *(here / "autodiff").glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(model_bytes: bytes, request: RewriteRequest) -> str:
    digest = hashlib.sha256(model_bytes)
    digest.update(json.dumps(asdict(request), sort_keys=True).encode())
    digest.update(_code_fingerprint().encode())
    return digest.hexdigest()[:32]


def cached_rewrite(model: onnx.ModelProto, request: RewriteRequest, source: str = "<model>",
                   directory: Path | None = None) -> tuple[Rewritten, bool]:
    """The rewrite from the cache when present (returns ``(rewritten, hit)``), else built and
    stored atomically. An unreadable cache entry is rebuilt, never trusted."""
    model_bytes = model.SerializeToString()
    directory = directory or cache_dir()
    path = directory / f"{cache_key(model_bytes, request)}.onnx"
    if path.exists():
        try:
            return Rewritten.from_model(onnx.load(str(path))), True
        except Exception:  # noqa: BLE001 - a corrupt entry is rebuilt below
            pass
    rewritten = rewrite(model, request, source)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, rewritten.model.SerializeToString())
    except OSError:
        pass  # a read-only cache only costs the next run a rewrite
    return rewritten, False


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial file."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
