"""Reference harness for the autodiff engine: our VJP against float64 finite differences.

For a small forward model ``y = f(x_1, ..., x_k)`` and a seed ``s`` shaped like ``y``, the
engine's gradient of the scalar ``F = sum(s * y)`` with respect to each ``x_i`` is built with
onnx-graphsurgeon (import, :class:`Emitter`, :func:`build_gradients`, export) and run in
onnxruntime in float32. The reference is independent of all that code: the *forward* model
converted to float64 and evaluated by ``onnx.reference.ReferenceEvaluator``, differentiated by
central differences along random directions ``v``::

    <grad_i, v>  ~=  (F(x_i + eps v) - F(x_i - eps v)) / (2 eps)        (error O(eps^2))

Directional checks cost two evaluations per direction whatever the input size, and a wrong
gradient ``grad + e`` fails them with probability ~1 because ``<e, v> ~ N(0, |e|^2)``.

ReferenceEvaluator traps (docs/onnx-autodiff.md and found here): its Erf (also inside Gelu)
computes in float32, its ConvTranspose crashes on groups and mishandles ``output_shape``, its
opset-9 BatchNormalization ignores ``epsilon``, its GlobalMaxPool drops a dim of 3-D inputs,
its Softmax ignores the pre-13 semantics and it has no GlobalLpPool; all are replaced below by
float64 numpy implementations, and every case first asserts that reference and onnxruntime
agree on the forward pass. Where the reference cannot run an op at all (negative Pad, linear
Upsample) and the op is linear in the differentiated input, the ``"ort"`` reference evaluates
the forward model in onnxruntime float32 with ``eps=1`` instead (exact for a linear map up to
float32 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from onnxcam.autodiff import RULES, Emitter, build_gradients, plan
from onnxcam.autodiff.opset import IR_FOR_OPSET, upgrade
from onnxcam.model import opset_of, with_shapes

ENABLE_ALL = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
DISABLE_ALL = ort.GraphOptimizationLevel.ORT_DISABLE_ALL


# -- building small forward models ------------------------------------------------------------

@dataclass
class Input:
    """A graph input fed with ``value``; ``symbolic`` axes get named (dynamic) dims: a list of
    axes (each named after the input) or a mapping axis -> name (shared names are equal dims)."""

    value: np.ndarray
    symbolic: Sequence[int] | Mapping[int, str] = ()
    differentiate: bool = True


def node_model(op_type: str, args: Sequence, *, attrs: Mapping | None = None, opset: int = 13,
               outputs: int = 1) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A one-node model. ``args`` are the node inputs in order: an :class:`Input` becomes a
    graph input, an array an initializer, ``None`` the empty optional input."""
    return graph_model([(op_type, list(range(len(args))), attrs or {}, outputs)], args, opset=opset)


def graph_model(nodes: Sequence[tuple], args: Sequence, *, opset: int = 13
                ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A small model: ``nodes`` are ``(op, inputs, attrs, n_outputs)`` where an input is an
    index into ``args``, the name of an earlier node's output ("n0", "n1_1", ...) or None
    (the empty optional input). The last
    node's first output is the model output ``y``."""
    names, graph_inputs, initializers, feeds = [], [], [], {}
    for index, arg in enumerate(args):
        if arg is None:
            names.append("")
        elif isinstance(arg, Input):
            name = f"x{index}"
            names_of = arg.symbolic if isinstance(arg.symbolic, Mapping) else \
                {axis: f"{name}_d{axis}" for axis in arg.symbolic}
            dims = [names_of.get(axis, size) for axis, size in enumerate(arg.value.shape)]
            dtype = helper.np_dtype_to_tensor_dtype(arg.value.dtype)
            graph_inputs.append(helper.make_tensor_value_info(name, dtype, dims))
            feeds[name] = arg.value
            names.append(name)
        else:
            name = f"c{index}"
            initializers.append(numpy_helper.from_array(np.asarray(arg), name))
            names.append(name)

    made = []
    for position, (op_type, inputs, attrs, n_outputs) in enumerate(nodes):
        ins = [names[i] if isinstance(i, int) else (i or "") for i in inputs]
        outs = [f"n{position}" if k == 0 else f"n{position}_{k}" for k in range(n_outputs)]
        made.append(helper.make_node(op_type, ins, outs, name=f"{op_type.lower()}_{position}", **attrs))
    made[-1].output[0] = "y"
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(made, "case", graph_inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = IR_FOR_OPSET.get(opset, 10)
    inferred = onnx.shape_inference.infer_shapes(model).graph.output[0]
    if inferred.type.tensor_type.HasField("shape"):
        model.graph.output[0].CopyFrom(inferred)
        onnx.checker.check_model(model)  # (the checker insists on an output shape)
    return model, feeds


def distinct(shape: Sequence[int], seed: int = 0, step: float = 0.05, offset: float = 0.013) -> np.ndarray:
    """Shuffled, well-separated values: no ties (MaxPool) and no point within ``step/4`` of a
    kink at 0 (Relu, Abs), so central differences never straddle a corner."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    values = (np.arange(n) - n // 2) * step + offset
    return np.asarray(rng.permutation(values).reshape(shape), np.float32)


def normal(shape: Sequence[int], seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale + shift, np.float32)


def positive(shape: Sequence[int], seed: int = 0, low: float = 0.5, high: float = 2.0) -> np.ndarray:
    return np.asarray(np.random.default_rng(seed).uniform(low, high, shape), np.float32)


# -- our gradient -----------------------------------------------------------------------------

def gradient_model(model: onnx.ModelProto, wrt: Sequence[str], output: str = "y",
                   rules=RULES) -> onnx.ModelProto:
    """``model`` plus input ``seed`` and outputs ``grad/<w>`` = d sum(seed*output) / d w,
    built as surgery builds it (opset upgraded to 13, then to what the rules need)."""
    if opset_of(model) < 13:
        model = upgrade(model, 13)
    graph = gs.import_onnx(with_shapes(model))
    tensors = graph.tensors()
    need = plan([tensors[w] for w in wrt], tensors[output], rules).min_opset
    if need > opset_of(model):
        model = upgrade(model, need)
        graph = gs.import_onnx(with_shapes(model))
        tensors = graph.tensors()
    out = tensors[output]
    seed = gs.Variable("seed", dtype=np.float32, shape=out.shape)
    graph.inputs.append(seed)
    grads = build_gradients(Emitter(graph, opset_of(model)), out, seed, [tensors[w] for w in wrt], rules)
    outputs, taken = [], {i.name for i in graph.inputs}
    for name, grad in zip(wrt, grads):
        # A gradient that is a graph input (the seed, through Identity chains) or that is
        # shared by two wrt tensors (Mean's inputs) gets its own copy to carry the name.
        grad = grad if grad.name not in taken else _identity(graph, grad)
        taken.add(f"grad/{name}")
        grad.name, grad.dtype, grad.shape = f"grad/{name}", np.float32, tensors[name].shape
        outputs.append(grad)
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    built = gs.export_onnx(graph, do_type_check=False)
    built.ir_version = IR_FOR_OPSET.get(opset_of(built), 10)
    # The schema check catches opset-signature mistakes (an attribute that became an input).
    onnx.checker.check_model(built)
    return built


def _identity(graph: gs.Graph, tensor: gs.Tensor) -> gs.Variable:
    out = gs.Variable(tensor.name + "_copy")
    graph.nodes.append(gs.Node("Identity", inputs=[tensor], outputs=[out]))
    return out


def ort_session(model: onnx.ModelProto, optimization=ENABLE_ALL) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def engine_gradients(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], wrt: Sequence[str],
                     seed: np.ndarray, optimization=ENABLE_ALL, rules=RULES) -> list[np.ndarray]:
    """Our gradients of sum(seed * y) w.r.t. ``wrt``, run in onnxruntime float32."""
    session = ort_session(gradient_model(model, wrt, rules=rules), optimization)
    wanted = {i.name for i in session.get_inputs()}
    run_feeds = {k: v for k, v in {**feeds, "seed": seed.astype(np.float32)}.items() if k in wanted}
    return session.run([f"grad/{w}" for w in wrt], run_feeds)


# -- the float64 reference --------------------------------------------------------------------

_erf64 = np.vectorize(math.erf, otypes=[np.float64])


class Erf(OpRun):
    """Erf in float64 (the stock reference kernel rounds to float32)."""

    op_domain = ""

    def _run(self, x):
        return (_erf64(x).astype(x.dtype),)


class Gelu(OpRun):
    """Gelu in float64 (the stock one expands to a function whose Erf is float32)."""

    op_domain = ""

    def _run(self, x, approximate="none"):
        if approximate == "tanh":
            y = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
        else:
            y = 0.5 * x * (1 + _erf64(x / math.sqrt(2)))
        return (y.astype(x.dtype),)


class BatchNormalization(OpRun):
    """Inference-mode batch norm (the stock opset-9 kernel ignores ``epsilon``)."""

    op_domain = ""

    def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=None, training_mode=0, spatial=1):
        assert not training_mode, "reference BatchNormalization: inference mode only"
        per_channel = [-1] + [1] * (x.ndim - 2)
        y = (x - mean.reshape(per_channel)) / np.sqrt(var.reshape(per_channel) + epsilon)
        return ((y * scale.reshape(per_channel) + bias.reshape(per_channel)).astype(x.dtype),)


class GlobalMaxPool(OpRun):
    """Max over space keeping the dims (the stock kernel drops a dim of 3-D inputs)."""

    op_domain = ""

    def _run(self, x):
        return (x.max(axis=tuple(range(2, x.ndim)), keepdims=True),)


class GlobalLpPool(OpRun):
    """Missing from the reference: (sum over space |x|^p)^(1/p), keeping the dims."""

    op_domain = ""

    def _run(self, x, p=2):
        axes = tuple(range(2, x.ndim))
        return ((np.abs(x) ** p).sum(axis=axes, keepdims=True) ** (1.0 / p),)


class ConvTranspose(OpRun):
    """ConvTranspose as its definition: scatter ``x[i] * w`` to ``y_full[i*s + j*d]``, then
    crop the begin pads. Pads follow the spec (and onnxruntime) for auto_pad/output_shape."""

    op_domain = ""

    def _run(self, x, w, bias=None, auto_pad=None, dilations=None, group=None, kernel_shape=None,
             output_padding=None, output_shape=None, pads=None, strides=None):
        rank = x.ndim - 2
        group = group or 1
        strides = list(strides or [1] * rank)
        dilations = list(dilations or [1] * rank)
        output_padding = list(output_padding or [0] * rank)
        kernel = w.shape[2:]
        full = [s * (n - 1) + (k - 1) * d + 1 + p for s, n, k, d, p
                in zip(strides, x.shape[2:], kernel, dilations, output_padding)]
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else (auto_pad or "NOTSET")
        if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = list(output_shape)[-rank:] if output_shape is not None else \
                [s * n for s, n in zip(strides, x.shape[2:])]
            # onnxruntime clamps a negative total padding to 0 and zero-fills the end.
            totals = [max(f - t, 0) for f, t in zip(full, target)]
            begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        else:
            pads = list(pads or [0] * 2 * rank)
            begins = pads[:rank]
            target = [f - pads[i] - pads[rank + i] for i, f in enumerate(full)]
        c_in, c_out_g = w.shape[0], w.shape[1]
        y_full = np.zeros([x.shape[0], c_out_g * group]
                          + [max(f, b + t) for f, b, t in zip(full, begins, target)], dtype=x.dtype)
        per_group = c_in // group
        for position in np.ndindex(*x.shape[2:]):
            for tap in np.ndindex(*kernel):
                where = tuple(slice(p * s + t * d, p * s + t * d + 1)
                              for p, s, t, d in zip(position, strides, tap, dilations))
                for gi in range(group):
                    xs = x[(slice(None), slice(gi * per_group, (gi + 1) * per_group)) + position]
                    ws = w[(slice(gi * per_group, (gi + 1) * per_group), slice(None)) + tap]
                    block = (slice(None), slice(gi * c_out_g, (gi + 1) * c_out_g))
                    y_full[block + where] += (xs @ ws).reshape(xs.shape[0], c_out_g, *[1] * rank)
        crop = tuple(slice(b, b + t) for b, t in zip(begins, target))
        y = y_full[(slice(None), slice(None)) + crop]
        if bias is not None:
            y = y + bias.reshape([1, -1] + [1] * rank)
        return (y.astype(x.dtype),)


class _CoercedSoftmax(OpRun):
    """Softmax before opset 13: over the input flattened to 2-D at ``axis`` (the stock
    reference applies the opset-13 semantics whatever the model's opset)."""

    op_domain = ""
    log = False

    def _run(self, x, axis=1):
        flat = x.reshape(int(np.prod(x.shape[:axis % x.ndim])), -1)
        shifted = flat - flat.max(axis=1, keepdims=True)
        logs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return ((logs if self.log else np.exp(logs)).reshape(x.shape),)


_REFERENCE_OPS = [Erf, Gelu, BatchNormalization, GlobalMaxPool, GlobalLpPool, ConvTranspose]
_BEFORE_13 = [type("Softmax", (_CoercedSoftmax,), {}), type("LogSoftmax", (_CoercedSoftmax,), {"log": True})]

#: Inputs that stay float32 whatever the model's type (the schema fixes them).
_FLOAT32_ONLY = {("Resize", 2), ("Upsample", 1)}


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forward model in float64: float32 initializers, graph inputs/outputs, Cast targets,
    Constant/ConstantOfShape values (nested graphs are not expected in test models)."""
    converted = onnx.ModelProto()
    converted.CopyFrom(model)
    graph = converted.graph
    keep32 = {node.input[i] for node in graph.node for (op, i) in _FLOAT32_ONLY
              if node.op_type == op and len(node.input) > i}
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT and tensor.name not in keep32:
            array = numpy_helper.to_array(tensor).astype(np.float64)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    for value in list(graph.input) + list(graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    del graph.value_info[:]
    for node in graph.node:
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                attribute.i = TensorProto.DOUBLE
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                array = numpy_helper.to_array(attribute.t).astype(np.float64)
                attribute.t.CopyFrom(numpy_helper.from_array(array, attribute.t.name))
    return converted


@dataclass
class Functional:
    """F(feeds) = sum(seed * y), in float64 (ReferenceEvaluator) or float32 onnxruntime."""

    model: onnx.ModelProto
    seed: np.ndarray
    reference: str = "float64"
    _run: object = field(init=False, repr=False)

    def __post_init__(self):
        if self.reference == "float64":
            legacy = _BEFORE_13 if opset_of(self.model) < 13 else []
            evaluator = ReferenceEvaluator(to_float64(self.model), new_ops=_REFERENCE_OPS + legacy)
            self._run = lambda feeds: evaluator.run(None, {k: _as64(v) for k, v in feeds.items()})[0]
        else:
            session = ort_session(self.model, DISABLE_ALL)
            self._run = lambda feeds: session.run(None, {k: _as32(v) for k, v in feeds.items()})[0]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> float:
        return float(np.sum(self.seed.astype(np.float64) * self._run(feeds).astype(np.float64)))

    def output(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._run(feeds)


def _as64(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float64) if value.dtype == np.float32 else value


def _as32(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if value.dtype.kind == "f" else value


def directional_error(functional: Functional, feeds: Mapping[str, np.ndarray], name: str,
                      grad: np.ndarray, directions: int, eps: float, rng: np.random.Generator
                      ) -> tuple[float, float]:
    """Largest |<grad, v> - FD_v F| over random unit-variance ``v``, and the scale it is
    judged against, |grad|_2 + |FD| (the size of <grad, v> for such v)."""
    worst, scale = 0.0, float(np.linalg.norm(grad.astype(np.float64)))
    base = feeds[name].astype(np.float64)
    for _ in range(directions):
        v = rng.standard_normal(base.shape)
        plus = functional({**feeds, name: base + eps * v})
        minus = functional({**feeds, name: base - eps * v})
        fd = (plus - minus) / (2 * eps)
        worst = max(worst, abs(float(np.sum(grad.astype(np.float64) * v)) - fd))
        scale = max(scale, abs(fd))
    return worst, scale


def check_forward(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], reference: str = "float64",
                  rtol: float = 1e-4) -> np.ndarray:
    """The model's output in onnxruntime, asserted equal (to float32 accuracy) to the
    reference's: finite differences of a reference that disagrees with onnxruntime on the
    forward pass would check the wrong function."""
    ours = ort_session(model).run(["y"], {k: _as32(v) for k, v in feeds.items()})[0]
    if reference != "float64":
        return ours
    theirs = np.asarray(Functional(model, np.zeros(1), reference).output(feeds))
    assert theirs.shape == ours.shape, f"forward shape: reference {theirs.shape}, onnxruntime {ours.shape}"
    scale = max(float(np.abs(theirs).max(initial=0.0)), 1.0)
    error = float(np.abs(theirs - ours).max(initial=0.0))
    assert error <= rtol * scale, f"forward: reference and onnxruntime differ by {error:.3g}"
    return ours


def check_vjp(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], wrt: Sequence[str] | None = None,
              *, reference: str = "float64", directions: int = 3, eps: float | None = None,
              rtol: float = 2e-4, atol: float = 1e-5, optimization=ENABLE_ALL, seed: int = 0,
              rules=RULES) -> dict[str, np.ndarray]:
    """Assert that our VJP of ``model`` matches central differences; returns the gradients.

    ``wrt`` defaults to every float graph input. The seed is random normal (shape of ``y``
    from a reference forward run)."""
    rng = np.random.default_rng(seed)
    wrt = list(wrt) if wrt is not None else [k for k, v in feeds.items() if v.dtype.kind == "f"]
    out = check_forward(model, feeds, reference)
    seed_value = rng.standard_normal(out.shape)
    functional = Functional(model, seed_value, reference)
    grads = engine_gradients(model, feeds, wrt, seed_value, optimization, rules)
    eps = eps if eps is not None else (1.0 if reference == "ort" else 1e-5)
    for name, grad in zip(wrt, grads):
        assert grad.shape == feeds[name].shape, f"grad/{name}: shape {grad.shape} != {feeds[name].shape}"
        assert np.all(np.isfinite(grad)), f"grad/{name} has non-finite values"
        err, scale = directional_error(functional, feeds, name, grad, directions, eps, rng)
        assert err <= rtol * scale + atol, \
            f"grad/{name}: |<g,v> - FD| = {err:.3g} exceeds {rtol:g} * {scale:.3g} + {atol:g}"
    return dict(zip(wrt, grads))
