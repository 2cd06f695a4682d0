"""Interfaces: ONNX models that carry their own explanation.

:func:`export_explained` turns a classifier into a model that any onnxruntime (Python, C++,
JavaScript, ...) runs to get the logits *and* the class activation map, with no onnxcam at
run time:

* inputs: the model's image input (unchanged), and ``target`` int64 [N]: the class to explain
  per image, -1 (or any value outside [0, C)) for the image's top-1 class;
* outputs: the model's own outputs (the explained logits among them, under their own name),
  ``heatmap`` float32 [N, H, W] in [0, 1] at the input's size, and ``target_class`` int64 [N],
  the class each map explains.

The graph is the rewrite :class:`onnxcam.explainer.Explainer` runs (:mod:`onnxcam.surgery`:
the activation ``A`` and ``G = d score / d A``), with three additions in standard ONNX ops:

1. the seed: ``t = target`` where ``0 <= target < C``, else ``argmax(logits)`` (the first
   maximum, as ONNX ArgMax and numpy agree); ``seed = one_hot(t)`` replaces the rewrite's
   ``onnxcam_seed`` input (an Equal against ``range(C)``, so no OneHot with its -1 wrap-around);
2. the method's map, by running :mod:`onnxcam.methods`' own numpy formula
   (:meth:`onnxcam.methods.Method.raw_map`) on :class:`Traced` tensors that emit a node for each
   numpy operation, so the exported formula is the library's, never a second copy; CAM's
   weights are the rows of the head matrix :func:`onnxcam.head.linear_head` gathered by ``t``;
3. :func:`onnxcam.methods.combine_layers`' post-processing for one layer (:mod:`onnxcam.ingraph`,
   which the Explainer's own in-graph maps use too): ``nan_to_num``, ReLU,
   ``(m - min) / (max + 1e-7)`` per image, bilinear resize (``cv2.resize`` INTER_LINEAR is
   ONNX Resize linear with ``half_pixel`` coordinates: both sample ``x_in = (x_out + 0.5) / s
   - 0.5`` clamped to the border, and cv2's switch to INTER_AREA for an exact 2x downscale
   averages the same 2x2 blocks), clip to [0, 1], then that scaling once more (pytorch-grad-
   cam rescales the mean over layers, here of one layer: the resized map's minimum is not 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import large_models
from .autodiff import Emitter
from .autodiff.opset import IR_FOR_OPSET
from .errors import OnnxcamError
from .explainer import Explainer
from .head import linear_head
from .ingraph import Traced, input_hw, static_hw, to_nchw
from .ingraph import post_process as _post_process
from .methods import METHODS, Method
from .model import Layer, opset_of
from .surgery import METADATA_KEY, SEED, RewriteRequest, cached_rewrite

TARGET = "target"
HEATMAP = "heatmap"
TARGET_CLASS = "target_class"


def exportable_methods() -> list[str]:
    """Methods whose map is one formula on (A, G) or on A and the head's weights: gradient
    methods without a principal component, and CAM. Score-CAM, Ablation-CAM (data-dependent
    numbers of extra runs), Eigen-CAM / Eigen-Grad-CAM (an SVD) and the pixel-space methods
    (sampling, other rectifier rules) are not."""
    return [m.name for m in METHODS.values()
            if (m.kind == "gradient" and m.projection is None) or m.kind == "graph"]


def export_explained(model: str | os.PathLike | onnx.ModelProto, method: str = "gradcam",
                     layer: str | None = None, output: str | None = None,
                     input_size: tuple[int, int] | None = None) -> onnx.ModelProto:
    """The model with ``target`` in and ``heatmap``, ``target_class`` out (module docstring).

    ``layer``, ``output`` (which model output to explain) and ``input_size`` (H, W for models
    with a dynamic size) mean what they mean for :class:`onnxcam.explainer.Explainer`; the
    heatmaps equal ``Explainer(model, layer).explain(x, method, targets).heatmaps``.
    """
    spec = _exportable(method)
    explainer = Explainer(model, layer=layer, output=output, input_size=input_size)
    chosen = explainer.targets_layers[0]
    request = RewriteRequest((chosen.name,), explainer.logits_name, gradient=spec.needs_gradient)
    rewritten, _ = cached_rewrite(explainer.graph.model, request, explainer.source)
    graph = gs.import_onnx(rewritten.model)
    b = Emitter(graph, opset_of(rewritten.model), np.float32, prefix="onnxcam_export")
    tensors = graph.tensors()
    taken = [n for n in (TARGET, HEATMAP, TARGET_CLASS) if n in tensors]
    if taken:
        raise OnnxcamError(f"{explainer.source}: the model already has a tensor named '{taken[0]}'")
    image, logits = tensors[rewritten.input], tensors[rewritten.logits]
    target = gs.Variable(TARGET, np.int64, [(image.shape or [None])[0]])
    target_class = _target_class(b, target, logits)
    A = to_nchw(b, tensors[chosen.name], chosen.layout)
    if spec.needs_gradient:
        _feed_seed(graph, tensors[SEED], _one_hot(b, target_class, logits))
        raw = spec.raw_map(Traced(b, A), Traced(b, to_nchw(b, tensors[rewritten.gradients[chosen.name]], chosen.layout)))
    else:
        raw = spec.raw_map(Traced(b, A), None, Traced(b, _cam_weights(b, explainer, chosen, target_class)))
    heatmap = _post_process(b, raw.tensor, input_hw(b, image, explainer.input_layout))
    _finish_outputs(graph, explainer, rewritten.logits, target, heatmap, target_class)
    exported = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    exported.ir_version = IR_FOR_OPSET.get(max(opset_of(exported), 13), 10)
    _set_metadata(exported, explainer, spec, chosen)
    return exported


def save_explained(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write an exported model atomically (over 2 GiB: weights beside it, ``path + ".data"``)."""
    large_models.save(model, path)


#: Why a method's map is not one graph, by kind (and for the projection methods).
_NOT_IN_GRAPH = {
    "perturbation": "needs one extra model run per channel",
    "pixel": "is a pixel-space method (noise samples, path integrals or guided ReLU gradients)",
    "projection": "needs an SVD per image",
}


def _exportable(method: str) -> Method:
    allowed = exportable_methods()
    if method in allowed:
        return METHODS[method]
    if method not in METHODS:
        why = "is not a method"
    else:
        spec = METHODS[method]
        why = "cannot be computed in the graph: it " + _NOT_IN_GRAPH["projection" if spec.projection else spec.kind]
    raise OnnxcamError(f"method '{method}' {why}; export supports {', '.join(allowed)}")


# -- target and seed --------------------------------------------------------------------------

def _classes(b: Emitter, logits: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
    """C as an int64 scalar and ``range(C)`` (from the logits' shape, folded when static)."""
    count = b.squeeze(b.shape(logits, start=-1), [0])
    return count, b.range(b.const(np.int64(0)), count, b.const(np.int64(1)))


def _target_class(b: Emitter, target: gs.Tensor, logits: gs.Tensor) -> gs.Tensor:
    """``t = target if 0 <= target < C else argmax(logits)``, int64 [N]."""
    count, _ = _classes(b, logits)
    valid = b.and_(b.op("GreaterOrEqual", target, b.const(np.int64(0))), b.less(target, count))
    top1 = b.op("ArgMax", logits, axis=-1, keepdims=0)
    return b.where(valid, target, top1)


def _one_hot(b: Emitter, target_class: gs.Tensor, logits: gs.Tensor) -> gs.Tensor:
    """[N, C] float: 1 at ``t``. Never an all-zero row, so the rewrite's own top-1 default
    (which would pick the same class) never fires."""
    _, positions = _classes(b, logits)
    return b.as_float(b.equal(b.unsqueeze(target_class, [1]), positions))


def _feed_seed(graph: gs.Graph, seed_input: gs.Tensor, seed: gs.Tensor) -> None:
    """Turn the rewrite's ``onnxcam_seed`` input into a tensor computed from ``target``."""
    graph.inputs = [t for t in graph.inputs if t is not seed_input]
    graph.nodes.append(gs.Node("Identity", "onnxcam_export/seed", inputs=[seed], outputs=[seed_input]))


# -- the map ----------------------------------------------------------------------------------

def _cam_weights(b: Emitter, explainer: Explainer, layer: Layer, target_class: gs.Tensor) -> gs.Tensor:
    """CAM's w = seed @ W (W: the head as a (classes, channels) matrix,
    :func:`onnxcam.head.linear_head`): for a one-hot seed, W's row ``t``, gathered exactly."""
    head = linear_head(explainer.graph, layer.name, explainer.logits_name).astype(np.float32)
    return b.op("Gather", b.const(head), target_class, axis=0)


# -- outputs and metadata ---------------------------------------------------------------------

def _finish_outputs(graph: gs.Graph, explainer: Explainer, logits_name: str, target: gs.Variable,
                    heatmap: gs.Tensor, target_class: gs.Tensor) -> None:
    """Inputs: image, target. Outputs: the model's own (with the logits), heatmap, target_class."""
    tensors = graph.tensors()
    graph.inputs.append(target)  # after the image, which the rewrite keeps first
    batch = target.shape[0]
    names = [o.name for o in explainer.graph.outputs]
    names += [logits_name] if logits_name not in names else []
    image = graph.inputs[0]
    heatmap = _named(graph, heatmap, HEATMAP, np.float32, [batch, *static_hw(image, explainer.input_layout)])
    target_class = _named(graph, target_class, TARGET_CLASS, np.int64, [batch])
    outputs = [tensors[n] for n in names] + [heatmap, target_class]
    for tensor in outputs:
        tensor.dtype = tensor.dtype or np.float32
    graph.outputs = outputs


def _named(graph: gs.Graph, tensor: gs.Tensor, name: str, dtype, shape: Sequence) -> gs.Tensor:
    """``tensor`` under ``name`` (an Identity: the tensor may also feed other nodes)."""
    named = gs.Variable(name, dtype, list(shape))
    graph.nodes.append(gs.Node("Identity", f"onnxcam_export/{name}", inputs=[tensor], outputs=[named]))
    return named


def _set_metadata(exported: onnx.ModelProto, explainer: Explainer, spec: Method, layer: Layer) -> None:
    """The original model's metadata (labels, preprocessing) and what the export computes."""
    from . import __version__

    kept = {k: v for k, v in explainer.metadata.items() if k != METADATA_KEY}
    kept.update({"onnxcam.version": __version__, "onnxcam.method": spec.name,
                 "onnxcam.layer": layer.name, "onnxcam.logits": explainer.logits_name,
                 "onnxcam.outputs": f"{HEATMAP} [N,H,W] in [0,1]; {TARGET_CLASS} [N] int64",
                 "onnxcam.inputs": f"{TARGET} [N] int64: class to explain, -1 = top-1"})
    del exported.metadata_props[:]
    for key, value in kept.items():
        entry = exported.metadata_props.add()
        entry.key, entry.value = key, value
