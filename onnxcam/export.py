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

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import large_models
from .autodiff import Emitter
from .autodiff.opset import IR_FOR_OPSET
from .errors import LayerError, OnnxcamError, OnnxcamWarning
from .explainer import Explainer
from .head import linear_head
from .images import METADATA_LABELS, METADATA_PREPROCESS, Preprocess, preprocess_to_metadata
from .ingraph import Traced, input_hw, static_hw, to_nchw
from .ingraph import post_process as _post_process
from .methods import METHODS, Method
from .model import Layer, opset_of
from .cache import cached_rewrite
from .tokens import emit_to_nchw
from .attention import (AttentionLayers, emit_patch_map, find_attention, gradient_rollout_relevance,
                        rollout_relevance)
from .surgery import METADATA_KEY, SEED, RewriteRequest, Rewritten, rewrite

TARGET = "target"
HEATMAP = "heatmap"
TARGET_CLASS = "target_class"


def exportable_methods() -> list[str]:
    """Methods whose map is one formula on (A, G) or on A and the head's weights: gradient
    methods without a principal component, and CAM; and for transformers the attention
    rollouts (a product over the attention layers). Score-CAM, Ablation-CAM (data-dependent
    numbers of extra runs), Eigen-CAM / Eigen-Grad-CAM (an SVD) and the pixel-space methods
    (sampling, other rectifier rules) are not."""
    return [m.name for m in METHODS.values()
            if (m.kind == "gradient" and m.projection is None) or m.kind in ("graph", "attention")]


def export_explained(model: str | os.PathLike | onnx.ModelProto, method: str = "gradcam",
                     layer: str | None = None, output: str | None = None,
                     input_size: tuple[int, int] | None = None, topk: int | None = None,
                     labels: Sequence[str] | None = None, preprocess: Preprocess | None = None,
                     cache: bool = True, threads: int = 0, grid: tuple[int, int] | None = None,
                     prefix: int | None = None) -> onnx.ModelProto:
    """The model with ``target`` in and ``heatmap``, ``target_class`` out (module docstring).

    ``layer``, ``output`` (which model output to explain), ``input_size`` (H, W for models
    with a dynamic size), ``grid`` and ``prefix`` (token layers) mean what they mean for
    :class:`onnxcam.explainer.Explainer`; the heatmaps equal
    ``Explainer(model, layer).explain(x, method, targets).heatmaps``.

    ``topk=K`` exports the K best classes at once instead: no ``target`` input, ``heatmap``
    [N, K, H, W] and ``target_class`` [N, K] (ONNX TopK: best first, ties to the lower index,
    as ``Explainer.explain(x, method, topk=K)``). The backbone runs once; the head (the layers
    after the explained one, :func:`onnxcam.surgery.head_frontier`) and its backward run on the
    activation repeated K times, as the Explainer's multi-target path does.

    ``labels`` and ``preprocess`` are written into the metadata (with the source model's
    sha256), so a consumer in any language can build the input and name the classes.
    ``cache=False`` skips the rewrite cache; ``threads``: onnxruntime's intra-op threads.
    """
    spec = _exportable(method)
    if topk is not None and int(topk) < 1:
        raise OnnxcamError(f"topk must be at least 1, got {topk}")
    explainer = Explainer(model, layer=layer, output=output, input_size=input_size, cache=cache,
                          threads=threads, grid=grid, prefix=prefix)
    if explainer.dense is not None:
        raise OnnxcamError(f"{explainer.source}: output '{explainer.logits_name}' is a {explainer.dense.kind} "
                           "output; the self-explaining export takes class-score outputs [N, C] only")
    chosen = explainer.targets_layers[0]
    found = find_attention(explainer.graph, explainer.logits_name) if spec.kind == "attention" else None
    gradient = spec.needs_gradient or spec.name == "gradient-rollout"
    classes = explainer.num_classes
    if topk is not None and classes is not None and topk > classes:
        raise OnnxcamError(f"topk must be at most the class count {classes}, got {topk}")
    if topk is not None and found is not None:
        raise OnnxcamError(f"--topk exports maps computed at one layer; '{spec.name}' reads every attention "
                           "layer: export it one class per run (the target input)")
    if topk is None:
        request = RewriteRequest(found.names if found else (chosen.name,), explainer.logits_name, gradient=gradient)
    else:  # forward only: the gradient comes from the head, inlined below
        request = RewriteRequest((chosen.name, *_frontier(explainer, chosen)), explainer.logits_name,
                                 gradient=False)
    rewritten = _rewrite(explainer, request)
    graph = gs.import_onnx(rewritten.model)
    b = Emitter(graph, opset_of(rewritten.model), np.float32, prefix="onnxcam_export")
    tensors = graph.tensors()
    taken = [n for n in (TARGET, HEATMAP, TARGET_CLASS) if n in tensors]
    if taken:
        raise OnnxcamError(f"{explainer.source}: the model already has a tensor named '{taken[0]}'")
    image, logits = tensors[rewritten.input], tensors[rewritten.logits]
    hw = input_hw(b, image, explainer.input_layout)
    if topk is None:
        target = gs.Variable(TARGET, np.int64, [(image.shape or [None])[0]])
        target_class = _target_class(b, target, logits)
        if found is not None:
            if gradient:
                _feed_seed(graph, tensors[SEED], _one_hot(b, target_class, logits))
            raw = Traced(b, _attention_map(b, found, tensors, rewritten, image, gradient))
        elif spec.needs_gradient:
            A = _to_nchw(b, tensors[chosen.name], chosen)
            _feed_seed(graph, tensors[SEED], _one_hot(b, target_class, logits))
            G = Traced(b, _to_nchw(b, tensors[rewritten.gradients[chosen.name]], chosen))
            raw = spec.raw_map(Traced(b, A), G)
        else:
            A = _to_nchw(b, tensors[chosen.name], chosen)
            raw = spec.raw_map(Traced(b, A), None, Traced(b, _cam_weights(b, explainer, chosen, target_class)))
        sizes = None if found is not None else _sizes(chosen, image, explainer.input_layout)
        heatmap = _post_process(b, raw.tensor, hw, sizes)
    else:
        target = None
        target_class, heatmap = _topk_maps(b, graph, explainer, spec, chosen, rewritten, int(topk), hw)
    _finish_outputs(graph, explainer, rewritten.logits, target, heatmap, target_class, topk)
    exported = gs.export_onnx(graph.cleanup().toposort(), do_type_check=False)
    exported.ir_version = IR_FOR_OPSET.get(max(opset_of(exported), 13), 10)
    described = chosen if found is None else replace(chosen, name=",".join(found.names))
    _set_metadata(exported, explainer, spec, described, topk=topk, labels=labels, preprocess=preprocess)
    batch = fixed_batch(exported)
    if batch is not None:
        warnings.warn(f"{explainer.source}: the exported model takes batches of exactly {batch} image(s): the "
                      "source model's batch is fixed and could not be proven safe to make dynamic "
                      "(re-export it with a dynamic batch axis for other sizes)", OnnxcamWarning, stacklevel=2)
    return exported


def _rewrite(explainer: Explainer, request: RewriteRequest) -> Rewritten:
    """The explainer's rewrite for ``request`` (from the cache unless it was turned off), its
    weights read in where the Explainer left them in the source's file and they fit in one
    message: onnx-graphsurgeon reads them (a head's weights shared with the backbone's) and
    the export must stand alone."""
    if explainer.cache:
        rewritten = cached_rewrite(explainer.graph.model, request, explainer.source, threads=explainer.threads)[0]
    else:
        rewritten = rewrite(explainer.graph.model, request, explainer.source, threads=explainer.threads)
    rewritten.model = large_models.self_contained(rewritten.model)
    return rewritten


def _frontier(explainer: Explainer, layer: Layer) -> tuple[str, ...]:
    """The head's other inputs, or why several classes cannot be exported at this layer."""
    try:
        return explainer.frontier(layer.name)
    except LayerError as exc:
        raise OnnxcamError(f"{exc}; --topk exports need a head that can be cut at the explained layer: "
                           f"choose another layer (onnxcam layers) or export one class per run") from None


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size a model's first input is fixed at, None when it is dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


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


def _attention_map(b: Emitter, found: AttentionLayers, tensors, rewritten, image: gs.Tensor,
                   gradient: bool) -> gs.Tensor:
    """attention.py's rollout recurrences run on the graph's attention probabilities (and
    their gradients) as (N, heads, T, T), then the pooled rows over the patches, (N, h, w)."""
    tokens = found.grid.tokens
    per_head = b.concat([b.shape(image, end=1), b.ints([-1, tokens, tokens])], axis=0)
    probabilities = [Traced(b, b.reshape(tensors[n], per_head)) for n in found.names]
    eye = np.eye(tokens, dtype=np.float32)
    if gradient:
        grads = [Traced(b, b.reshape(tensors[rewritten.gradients[n]], per_head)) for n in found.names]
        relevance = gradient_rollout_relevance(probabilities, grads, eye)
    else:
        relevance = rollout_relevance(probabilities, eye)
    return emit_patch_map(b, relevance.tensor, found)


def _sizes(layer: Layer, image: gs.Tensor, input_layout: str):
    """The layer's map size (its (C, H, W) in any layout) and the image's, where fixed (lets
    the resize be MatMuls)."""
    hw = tuple(layer.shape[1:3])
    fixed = all(isinstance(d, (int, np.integer)) and d > 0 for d in hw)
    return (tuple(int(d) for d in hw) if fixed else None), tuple(static_hw(image, input_layout))


def _to_nchw(b: Emitter, tensor: gs.Tensor, layer: Layer) -> gs.Tensor:
    """The methods' formulas index (N, C, h, w), as the Explainer's ``to_nchw``."""
    if layer.grid is not None:
        return emit_to_nchw(b, tensor, layer.grid)
    return to_nchw(b, tensor, layer.layout)


# -- several classes in one run -----------------------------------------------------------------

def _topk_maps(b: Emitter, graph: gs.Graph, explainer: Explainer, spec: Method, layer: Layer,
               forward: Rewritten, k: int, hw: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor]:
    """``target_class`` [N, K] (TopK of the logits) and ``heatmap`` [N, K, H, W].

    Every per-image tensor the map needs (the activation, the head's frontier) is repeated K
    times along the batch (``np.repeat(a, K, axis=0)``); row ``n * K + j`` explains class
    ``classes[n, j]``, so the maps reshape to [N, K, H, W]."""
    tensors = graph.tensors()
    logits = tensors[forward.logits]
    classes = b.op("TopK", logits, b.ints([k]), axis=-1, largest=1, sorted=1, outputs=2)[1]
    flat = b.reshape(classes, b.ints([-1]))
    A = _repeat(b, tensors[layer.name], k)
    if spec.needs_gradient:
        head = _rewrite(explainer, RewriteRequest((layer.name,), explainer.logits_name, gradient=True,
                                                  head=layer.name))
        if not head.batch_dynamic:
            raise OnnxcamError(f"{explainer.source}: the head after '{layer.name}' cannot take a batch of "
                               f"N x {k} activations (its batch size is fixed): export one class per run")
        feeds = {name: _repeat(b, tensors[name], k) for name in head.extra_inputs}
        feeds[layer.name] = A
        feeds[SEED] = _one_hot(b, flat, logits)
        G = _inline(graph, gs.import_onnx(head.model), "onnxcam_head/", feeds)[head.gradients[layer.name]]
        raw = spec.raw_map(Traced(b, _to_nchw(b, A, layer)), Traced(b, _to_nchw(b, G, layer)))
    else:
        raw = spec.raw_map(Traced(b, _to_nchw(b, A, layer)), None,
                           Traced(b, _cam_weights(b, explainer, layer, flat)))
    maps = _post_process(b, raw.tensor, hw, _sizes(layer, tensors[forward.input], explainer.input_layout))
    batch = b.shape(logits, end=1)
    heatmap = b.reshape(maps, b.concat([batch, b.ints([k]), hw], axis=0))
    return classes, heatmap


def _repeat(b: Emitter, tensor: gs.Tensor, k: int) -> gs.Tensor:
    """``np.repeat(tensor, k, axis=0)``: [N, ...] -> [N * k, ...] (each row k times in a row)."""
    rest = b.shape(tensor, start=1)
    tiled = b.expand(b.unsqueeze(tensor, [1]), b.concat([b.shape(tensor, end=1), b.ints([k]), rest], axis=0))
    return b.reshape(tiled, b.concat([b.ints([-1]), rest], axis=0))


def _inline(host: gs.Graph, guest: gs.Graph, prefix: str, feeds: dict[str, gs.Tensor]) -> dict[str, gs.Tensor]:
    """Add ``guest``'s nodes to ``host``, its inputs fed by ``feeds`` (guest input name -> host
    tensor); returns its outputs by (guest) name. Guest variables are renamed with ``prefix``;
    a guest constant equal to the host's constant of the same name is shared, so a head's
    weights are stored once."""
    host_constants = {n: t for n, t in host.tensors().items() if isinstance(t, gs.Constant)}
    inputs = {i.name: i for i in guest.inputs}
    outputs = {o.name: o for o in guest.outputs}
    missing = [name for name in inputs if name not in feeds]
    if missing:
        raise OnnxcamError(f"internal: no feed for the head's inputs {missing}")
    shared: dict[str, gs.Constant] = {}
    for name, tensor in guest.tensors().items():
        same = host_constants.get(name)
        if (isinstance(tensor, gs.Constant) and same is not None and same.values.dtype == tensor.values.dtype
                and same.values.shape == tensor.values.shape and np.array_equal(same.values, tensor.values)):
            shared[name] = same
        else:
            tensor.name = prefix + name
            if isinstance(tensor, gs.Variable):
                tensor.shape = None  # its batch is the host's times K: a shared "N" would be wrong
    for node in guest.nodes:
        node.name = prefix + (node.name or node.op)
        node.inputs = [shared.get(t.name, t) if isinstance(t, gs.Constant) else t for t in node.inputs]
        host.nodes.append(node)
    for name, variable in inputs.items():
        # The guest's input variable stays (its consumers read it); an Identity now produces it.
        host.nodes.append(gs.Node("Identity", variable.name + "/feed", inputs=[feeds[name]], outputs=[variable]))
    return outputs


# -- outputs and metadata ---------------------------------------------------------------------

def _finish_outputs(graph: gs.Graph, explainer: Explainer, logits_name: str, target: gs.Variable | None,
                    heatmap: gs.Tensor, target_class: gs.Tensor, topk: int | None = None) -> None:
    """Inputs: image (and target, one class per image). Outputs: the model's own (with the
    logits), heatmap, target_class; with ``topk`` each image's K classes along a second axis."""
    tensors = graph.tensors()
    image = graph.inputs[0]  # the rewrite keeps the image first
    if target is not None:
        graph.inputs.append(target)
    batch = (image.shape or [None])[0]
    names = [o.name for o in explainer.graph.outputs]
    names += [logits_name] if logits_name not in names else []
    per_image = [batch] if topk is None else [batch, int(topk)]
    heatmap = _named(graph, heatmap, HEATMAP, np.float32, [*per_image, *static_hw(image, explainer.input_layout)])
    target_class = _named(graph, target_class, TARGET_CLASS, np.int64, per_image)
    outputs = [tensors[n] for n in names] + [heatmap, target_class]
    for tensor in outputs:
        tensor.dtype = tensor.dtype or np.float32
    graph.outputs = outputs


def _named(graph: gs.Graph, tensor: gs.Tensor, name: str, dtype, shape: Sequence) -> gs.Tensor:
    """``tensor`` under ``name`` (an Identity: the tensor may also feed other nodes)."""
    named = gs.Variable(name, dtype, list(shape))
    graph.nodes.append(gs.Node("Identity", f"onnxcam_export/{name}", inputs=[tensor], outputs=[named]))
    return named


def _set_metadata(exported: onnx.ModelProto, explainer: Explainer, spec: Method, layer: Layer,
                  topk: int | None = None, labels: Sequence[str] | None = None,
                  preprocess: Preprocess | None = None) -> None:
    """The original model's metadata (labels, preprocessing), what the export computes, and
    where it comes from: onnxcam's version and the source model's sha256."""
    from . import __version__

    kept = {k: v for k, v in explainer.metadata.items() if k != METADATA_KEY}
    if topk is None:
        shapes = {"onnxcam.outputs": f"{HEATMAP} [N,H,W] in [0,1]; {TARGET_CLASS} [N] int64",
                  "onnxcam.inputs": f"{TARGET} [N] int64: class to explain, -1 = top-1"}
    else:
        shapes = {"onnxcam.outputs": f"{HEATMAP} [N,{topk},H,W] in [0,1]; {TARGET_CLASS} [N,{topk}] int64 "
                                     f"(the {topk} best classes, best first)",
                  "onnxcam.inputs": "the image only", "onnxcam.topk": str(int(topk))}
    kept.update({"onnxcam.version": __version__, "onnxcam.method": spec.name,
                 "onnxcam.layer": layer.name, "onnxcam.logits": explainer.logits_name,
                 "onnxcam.source_sha256": _source_sha256(explainer), **shapes})
    if labels is not None:
        kept[METADATA_LABELS] = json.dumps(list(labels))
    if preprocess is not None:  # the model fixes layout and size
        size = preprocess.size or explainer.input_size
        kept[METADATA_PREPROCESS] = preprocess_to_metadata(replace(preprocess, layout=explainer.input_layout, size=size))
    del exported.metadata_props[:]
    for key, value in kept.items():
        entry = exported.metadata_props.add()
        entry.key, entry.value = key, value


def _source_sha256(explainer: Explainer) -> str:
    """sha256 of the source file as ``sha256sum`` prints it; of the serialized model (weights
    included) when the source was a ModelProto."""
    if explainer.source != "<model>" and os.path.isfile(explainer.source):
        digest = hashlib.sha256()
        with open(explainer.source, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return large_models.fingerprint(explainer.graph.model).hexdigest()
