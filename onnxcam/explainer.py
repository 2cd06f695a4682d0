"""The Python API: ``Explainer(model).explain(x)`` ties the pipeline stages together.

model (inspect) -> surgery (rewrite, cached) -> runtime (sessions) -> methods (maps).

Which models run, by method kind (:data:`onnxcam.methods.KINDS`):

* gradient methods, one target per image: the rewritten model, forward + backward, once;
* several targets per image (``targets=[[3, 7, 9]]``, ``topk=3``): the forward model once, then
  the *head* (the layers after the explained activation, :mod:`onnxcam.surgery`) fed the
  activation once per target, so the backbone runs once whatever the number of targets;
* eigencam, cam: the forward model only (CAM reads its weights from the graph, :mod:`onnxcam.head`);
* scorecam: the forward model on masked inputs; ablationcam: the head on ablated activations
  (:mod:`onnxcam.perturbation`); every class's logits come from each run, so several targets
  cost nothing extra;
* pixel-space methods: the rewritten model with the input gradient (:mod:`onnxcam.pixel`);
* attention methods (rollout, gradient-rollout): every self-attention's probabilities, and
  their gradients, exposed by one rewritten model (:mod:`onnxcam.attention`).

A target is a *seed vector* ``s`` over the logits: the explained score is ``s . logits`` (a
one-hot ``s`` for a class).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import dense as dense_outputs, perturbation, pixel
from .errors import LayerError, ModelError, OnnxcamError, OnnxcamWarning, TargetError, UnsupportedOpError
from .head import linear_head
from .ingraph import (CHECKS_OUTPUT, INPUT_SUM, LOGITS_SUM, MAP_PEAK, MASK_SOURCE, SEED_USED_OUTPUT, TOP1_OUTPUT,
                      MapRequest, MaskRequest, in_graph)
from .images import Preprocess, make_preprocess, preprocess_from_metadata
from .methods import METHODS, Method, combine_layers, scale_maps, warn_empty_maps
from .model import Layer, ModelGraph, load_model, pin_input_size
from .cache import cached_rewrite
from .runtime import Session, resolve_provider
from .surgery import SEED, RewriteRequest, Rewritten, head_frontier, rewrite
from .targets import TOP1, Targets, TargetSet, resolve_targets
from .validate import check_class_scores, finite_rows, nonfinite_message
from .validate_model import check_batch, checked_model
from . import attention, tokens

#: pytorch-grad-cam's default test-time augmentation (ttach): horizontal flip x [0.9, 1, 1.1].
AUGMENTATIONS: tuple[tuple[bool, float], ...] = tuple(
    (flip, factor) for flip in (False, True) for factor in (0.9, 1.0, 1.1))


@dataclass
class Explanation:
    """Maps for a batch at the model's input size, float32 in [0, 1].

    With one target per image (the default, an int, or one per image) ``heatmaps`` is
    (N, H, W) and ``targets`` (N,); with several (``targets`` of shape (N, T) or ``topk=T``,
    or seed vectors (N, T, C)) they are (N, T, H, W) and (N, T). A target given as a seed
    vector reports class -1; ``seeds`` (N, T, C) holds what was explained in every case.
    ``weights`` holds the channel weights of channel-weighting methods per layer, shaped
    like ``targets`` plus the channel axis.
    """

    heatmaps: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    layers: tuple[str, ...]
    method: str
    provider: str
    seconds: float
    activations: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    gradients: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    seeds: np.ndarray | None = field(default=None, repr=False)

    @property
    def layer(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else ",".join(self.layers)

    @property
    def multi_target(self) -> bool:
        return self.targets.ndim == 2

    @property
    def per_target(self) -> np.ndarray:
        """``heatmaps`` as (N, T, H, W) whatever the number of targets."""
        return self.heatmaps if self.multi_target else self.heatmaps[:, None]

    @property
    def finite(self) -> np.ndarray:
        """(N,) False for images whose logits hold NaN or Inf: their targets and maps mean
        nothing (``explain`` warns about them)."""
        return finite_rows(self.logits)

    @property
    def probabilities(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):  # non-finite logits give NaN (see ``finite``)
            shifted = self.logits - self.logits.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            return exp / exp.sum(axis=1, keepdims=True)


@dataclass
class ChannelImportance:
    """The Grad-CAM paper's textual-explanation ingredients (Selvaraju et al. 2017, "Textual explanations"):
    the ``k`` channels of ``layer`` with the largest and the smallest weights, per image (and
    target), each with its activation map ``relu(A_k)`` min-max scaled and resized to the
    input, (N, [T,] k, H, W)."""

    layer: str
    method: str
    targets: np.ndarray
    most: np.ndarray
    most_weights: np.ndarray
    most_maps: np.ndarray
    least: np.ndarray
    least_weights: np.ndarray
    least_maps: np.ndarray


@dataclass(frozen=True)
class Options:
    """Method options (each method reads those that concern it).

    ``eigen_smooth``: first principal component instead of the channel sum (activation-space
    methods). ``batch_size``: images per onnxruntime run (default: the explainer's).
    ``max_channels``: Score-CAM scores only that many highest-variance channels.
    ``samples``, ``noise``: SmoothGrad's n and sigma (fraction of the image's value range).
    ``steps``, ``baseline``: Integrated Gradients. ``seed``: SmoothGrad's noise.
    """

    eigen_smooth: bool = False
    batch_size: int | None = None
    max_channels: int | None = None
    samples: int = 25
    noise: float = 0.15
    steps: int = 50
    baseline: float | np.ndarray = 0.0
    seed: int = 0


_FLOAT32 = np.dtype(np.float32)


@dataclass(frozen=True)
class _MapsRun:
    """An in-graph maps session as explain() uses it: the outputs it reads (those the
    session has), and whether the graph makes the per-call checks (CHECKS_OUTPUT)."""

    spec: Method
    rewritten: Rewritten
    session: Session
    names: tuple[str, ...]
    checks: bool


_DEFAULT_OPTIONS = Options()
#: explain()'s options but the baseline, as Options' defaults
_DEFAULT_GIVEN = (_DEFAULT_OPTIONS.eigen_smooth, _DEFAULT_OPTIONS.batch_size, _DEFAULT_OPTIONS.max_channels,
                  _DEFAULT_OPTIONS.samples, _DEFAULT_OPTIONS.noise, _DEFAULT_OPTIONS.steps, _DEFAULT_OPTIONS.seed)
#: Explainer's method that computes the parts of each kind of method
_STEPS = {"gradient": "_gradient_parts", "activation": "_activation_parts", "graph": "_graph_parts",
          "perturbation": "_perturbation_parts", "pixel": "_pixel_parts", "attention": "_attention_parts"}


class _Lazy:
    """A value computed on first use (the forward run, shared by a method's steps)."""

    def __init__(self, compute: Callable[[], dict[str, np.ndarray]]):
        self.compute, self.value = compute, None

    def __call__(self) -> dict[str, np.ndarray]:
        if self.value is None:
            self.value = self.compute()
        return self.value


class Explainer:
    """Explains an ONNX image classifier.

    ``model`` is a path or a ModelProto; ``layer`` a tensor (or node) name, several, or None for
    the default (the last spatial activation before the logits); ``provider`` "auto", "cpu"
    or "cuda"; ``output`` which output to explain when there are several; ``batch_size`` how
    many inputs go through onnxruntime at once; ``input_size`` (H, W) pins the input size of
    models exported with a dynamic one (gradient rules and the cache work on fixed sizes);
    ``threads`` the intra-op threads of every onnxruntime session (0: onnxruntime's default,
    one per core); ``cache=False`` rewrites without reading or writing the rewrite cache
    (:mod:`onnxcam.cache`). The provider is checked here, before any rewrite or image.
    ``grid=(H, W)`` and ``prefix=P`` say how to read transformer token layers when the graph
    does not (:mod:`onnxcam.tokens`).

    Gradient methods with one target per image compute their maps inside the rewritten graph
    (:mod:`onnxcam.ingraph`), so a call is one onnxruntime run; ``in_graph_maps = False``
    computes them with numpy after the run instead (the reference the graph is tested against).
    """

    #: gradient methods' maps (weights, sum, scaling, resize) computed by onnxruntime
    in_graph_maps: bool = True
    _class_count: int | None = None

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, layer: str | Sequence[str] | None = None,
                 provider: str = "auto", output: str | None = None, cache: bool = True,
                 batch_size: int = 16, input_size: tuple[int, int] | None = None, threads: int = 0,
                 grid: tuple[int, int] | None = None, prefix: int | None = None):
        resolve_provider(provider)  # an unknown or unusable provider fails now, before any work
        provider = str(provider).lower()
        if isinstance(model, onnx.ModelProto):
            self.source, proto = "<model>", checked_model(model, "<model>")
        else:
            # with the cache, weights stay in the model's file: sessions read the cache's
            # entries, so the weights are never held here (without it, every session would be
            # built from a temporary copy of them: large_models.session)
            self.source, proto = str(model), load_model(model, weights_in_file=cache)
        proto = pin_input_size(proto, input_size, self.source)
        self.graph = ModelGraph(proto, self.source, tokens.parse_grid(grid, prefix))
        self._proto = self.graph.model  # the annotated copy: the model's weights held once
        self.output = output
        self.logits_name = self.graph.logits(output)
        #: a segmentation or detection output (onnxcam.dense), None for class scores [N, C]
        self.dense = dense_outputs.output_of(self.graph, self.logits_name)
        if self.dense is None:
            check_class_scores(self.graph, self.logits_name)
        self.input_layout = self.graph.input_layout()
        if layer is None:
            chosen = [next(l for l in self.layers() if l.default)]
        else:
            names = [layer] if isinstance(layer, str) else list(layer)
            chosen = [self.graph.find_layer(name, output) for name in names]
        self.targets_layers: list[Layer] = chosen
        self.provider_requested = provider
        self.cache = cache
        self.batch_size = max(1, int(batch_size))
        self.threads = max(0, int(threads))
        self._sessions: dict[RewriteRequest, tuple[Rewritten, Session]] = {}
        self._maps_runs: dict[str, _MapsRun] = {}  # by method name: explain()'s in-graph maps
        self._zero_seed_cache: dict[int, np.ndarray] = {}
        self._frontiers: dict[str, tuple[str, ...] | LayerError] = {}
        self._linear_heads: dict[str, np.ndarray] = {}
        self._not_in_graph: set[RewriteRequest] = set()
        self._map_requests: dict[str, RewriteRequest] = {}
        self.metadata = {p.key: p.value for p in proto.metadata_props}

    def __repr__(self) -> str:
        names = ", ".join(l.name for l in self.targets_layers)
        return f"Explainer({self.source!r}, layer={names!r}, provider={self.provider_requested!r})"

    # -- inspection ---------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """The candidate spatial activations, the default one marked."""
        found = self.graph.layers(self.output)
        if self.dense is None:
            return found
        return dense_outputs.mark_default(found, dense_outputs.default_layer(self.graph, found, self.dense))

    @property
    def num_classes(self) -> int | None:
        if self.dense is not None:
            return self.dense.classes
        dims = self.graph.dims(self.logits_name)
        return dims[-1] if dims and isinstance(dims[-1], int) else None

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.graph.static_input_hw()

    def preprocess(self, preset: str | None = None, size: tuple[int, int] | None = None,
                   **overrides) -> Preprocess:
        """The input normalization: a preset, else what the model declares, else ImageNet's."""
        return make_preprocess(preset, self.input_layout, size or self.input_size,
                               declared=preprocess_from_metadata(self.metadata),
                               channels=self.input_channels, **overrides)

    @property
    def input_channels(self) -> int:
        """The image input's channel count (3 when the model leaves it dynamic)."""
        dims = self.graph.dims(self.graph.input.name) or ()
        channels = dims[1 if self.input_layout == "NCHW" else 3] if len(dims) == 4 else None
        return channels if isinstance(channels, int) else 3

    def labels(self) -> list[str] | None:
        """Class names the model carries in its ``onnxcam.labels`` metadata, if any (None, with
        a warning, when their count differs from the model's classes)."""
        import json
        from .labels import check_labels
        raw = self.metadata.get("onnxcam.labels")
        labels = [str(label) for label in json.loads(raw)] if raw else None
        return check_labels(labels, self.num_classes, f"{self.source} (metadata onnxcam.labels)",
                            explicit=False)

    # -- models and sessions ------------------------------------------------------------------
    def session(self, request: RewriteRequest) -> tuple[Rewritten, Session]:
        """The rewritten model for ``request`` and its session (built once, cached on disk)."""
        if request not in self._sessions:
            if self.cache:
                # a verified hit comes back as its file's path: onnxruntime reads it, so the
                # rewritten weights never exist as a Python object (resnet50: 528 -> 320 MiB)
                rewritten, _ = cached_rewrite(self._proto, request, self.source, threads=self.threads,
                                              parse=False)
            else:
                rewritten = rewrite(self._proto, request, self.source, threads=self.threads)
            model = rewritten.path or rewritten.model
            self._sessions[request] = (rewritten, self._new_session(model, request, rewritten.origin))
        return self._sessions[request]

    def _new_session(self, model: onnx.ModelProto | str, request: RewriteRequest,
                     origin: str | None = None) -> Session:
        """A session for a rewrite. The full model's gradient graph does not prepack its weights
        (see :class:`onnxcam.runtime.Session`: each would be packed twice, vgg16 +500 MiB; at
        batch 1 unpacked is as fast); a head does, as its batch is images x targets (vgg16's
        head at batch 5: 418 ms unpacked, 219 packed)."""
        alone = request.gradient and request.head is None  # the one run of a top-1 explanation
        return Session(model, self.provider_requested, threads=self.threads, source=origin,
                       prepack=not request.gradient or request.head is not None, spinning=alone)

    def prepared(self, input_gradient: bool = False, relu: str = "plain") -> tuple[Rewritten, Session]:
        """The model with gradients at the layers (and the input) and its session."""
        return self.session(RewriteRequest(self._layer_names, self.logits_name,
                                           input_gradient=input_gradient, relu=relu))

    @property
    def _layer_names(self) -> tuple[str, ...]:
        return tuple(l.name for l in self.targets_layers)

    def frontier(self, layer: str) -> tuple[str, ...]:
        """The other inputs of the head cut at ``layer`` (raises LayerError when it cannot be cut)."""
        if layer not in self._frontiers:
            try:
                self._frontiers[layer] = head_frontier(self.graph, layer, self.logits_name)
            except LayerError as exc:
                self._frontiers[layer] = exc
        found = self._frontiers[layer]
        if isinstance(found, LayerError):
            raise found
        return found

    def linear_head(self, layer: str) -> np.ndarray:
        """CAM's weights (classes, channels) read from the graph (:func:`onnxcam.head.linear_head`)."""
        if layer not in self._linear_heads:
            self._linear_heads[layer] = linear_head(self.graph, layer, self.logits_name).astype(np.float64)
        return self._linear_heads[layer]

    def _forward_model(self) -> tuple[Rewritten, Session]:
        """Forward only: logits, the layers, and every cuttable layer's frontier."""
        exposed = list(self._layer_names)
        for name in self._layer_names:
            try:
                exposed += [f for f in self.frontier(name) if f not in exposed]
            except LayerError:
                pass
        return self.session(RewriteRequest(tuple(exposed), self.logits_name, gradient=False))

    def _head(self, layer: str, gradient: bool) -> tuple[Rewritten, Session]:
        self.frontier(layer)  # a clear LayerError before any surgery when it cannot be cut
        return self.session(RewriteRequest((layer,) if gradient else (), self.logits_name,
                                           gradient=gradient, head=layer))

    @property
    def provider(self) -> str:
        """The provider the session really runs on ("cpu", "cuda")."""
        return self.prepared()[1].provider

    # -- running ------------------------------------------------------------------------------
    def run_model(self, rewritten: Rewritten, session: Session, feeds: dict[str, np.ndarray],
                  wanted: Sequence[str], batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Run ``feeds`` (all batched alike) in chunks of ``batch_size`` (default: the
        explainer's), or of the export's fixed batch; outputs concatenated."""
        static = self._static_batch
        step = (batch_size or self.batch_size) if rewritten.batch_dynamic else static
        total = len(next(iter(feeds.values())))
        wanted = session.present(wanted)
        if total <= step and (rewritten.batch_dynamic or total == step):
            outputs = session.run(feeds, wanted)  # one run: its outputs as they come, no concatenation copy
            if (wanted, total) not in session.batches_checked:  # the same shapes for the same run
                check_batch(outputs, total, self.source)
                session.batches_checked.add((wanted, total))
            return outputs
        chunks = []
        for start in range(0, total, step):
            chunk = {k: v[start:start + step] for k, v in feeds.items()}
            real = min(step, total - start)
            if not rewritten.batch_dynamic and real < step:  # a fixed batch: pad, then drop the padding
                chunk = {k: np.concatenate([v, np.repeat(v[-1:], step - real, axis=0)]) for k, v in chunk.items()}
            outputs = session.run(chunk, wanted)
            check_batch(outputs, len(next(iter(chunk.values()))), self.source)
            chunks.append({n: o[:real] for n, o in outputs.items()})
        return {name: np.concatenate([c[name] for c in chunks]) for name in wanted}

    def run(self, x: np.ndarray, seeds: np.ndarray, input_gradient: bool = False,
            relu: str = "plain") -> tuple[dict[str, np.ndarray], str]:
        """Forward + backward for a batch; outputs by name, concatenated over chunks."""
        rewritten, session = self.prepared(input_gradient, relu)
        wanted = [rewritten.logits] + list(rewritten.layers) + list(rewritten.gradients.values())
        return self.run_model(rewritten, session, {rewritten.input: x, SEED: seeds}, wanted), session.provider

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Logits, layer activations (own layout) and head frontiers, without any gradient."""
        rewritten, session = self._forward_model()
        return self.run_model(rewritten, session, {rewritten.input: x},
                              [rewritten.logits, *rewritten.layers])

    def seeds(self, targets: Targets, batch: int) -> np.ndarray:
        """One-hot seed rows for one target per image; all-zero rows (top-1, chosen in-graph)
        for None."""
        classes = self._classes()
        if targets is None:
            return np.zeros((batch, classes), np.float32)
        resolved = self.resolve_targets(targets, batch)
        if resolved.multi:
            raise TargetError("several targets per image: use explain(), which returns one map per target")
        return resolved.seeds[:, 0]

    def resolve_targets(self, targets: Targets, batch: int, topk: int | None = None) -> TargetSet:
        """Targets as seed vectors; see :meth:`explain` for the accepted forms."""
        if self.dense is not None:
            dense_outputs.check_target(self.dense, self.output is not None, targets)
            return dense_outputs.resolve(self.dense, targets, batch, topk)
        return resolve_targets(targets, batch, self._classes(), topk)

    @functools.cached_property
    def _input_dims(self) -> tuple:
        """The image input's dims (ints where fixed), read once: check_input is per call."""
        return tuple(self.graph.dims(self.graph.input.name) or ())

    @functools.cached_property
    def _input_item(self) -> tuple[int, ...] | None:
        """One image's dims when all are fixed (the shape check_input's quick path accepts)."""
        item = self._input_dims[1:]
        return item if len(item) == 3 and all(isinstance(d, int) for d in item) else None

    @functools.cached_property
    def _static_batch(self) -> int:
        """The export's fixed batch (1 when dynamic), read once: run_model is per call."""
        return self.graph.static_batch() or 1

    def _classes(self) -> int:
        if self._class_count:
            return self._class_count
        classes = self.num_classes
        if classes is None:
            raise OnnxcamError(f"{self.source}: the logits' class dimension is not static")
        self._class_count = classes
        return classes

    def check_input(self, x: np.ndarray, finite: bool = True) -> np.ndarray:
        """``x`` as a contiguous float32 batch, or a clear error: dims, an empty batch, the dtype,
        the model's fixed sizes, and (``finite``) NaN or Inf values (:meth:`check_finite`)."""
        if type(x) is np.ndarray and x.shape[1:] == self._input_item and x.dtype == _FLOAT32 and len(x) \
                and x.flags.c_contiguous:  # the usual batch, checked in one line (explain() is per call)
            if finite:
                self.check_finite(x)
            return x
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise OnnxcamError(f"expected a batch (N, ...) of 4 dims in the model's layout, got shape {list(x.shape)}")
        if len(x) == 0:
            raise OnnxcamError("an empty batch: give at least one image")
        if x.dtype.kind not in "fiu":
            raise OnnxcamError(f"the input must be numbers (float32), got {x.dtype}")
        if finite:
            self.check_finite(x)
        dims = self._input_dims
        for axis, (want, got) in enumerate(zip(dims[1:], x.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise OnnxcamError(f"input shape {list(x.shape)} does not match the model's "
                                   f"{list(dims)} (axis {axis}: {got} != {want})")
        return np.ascontiguousarray(x, dtype=np.float32)

    @staticmethod
    def check_finite(x: np.ndarray) -> None:
        bad = np.flatnonzero(~finite_rows(x))
        if len(bad):
            raise OnnxcamError(f"the input holds NaN or Inf (image {int(bad[0])}): check the preprocessing "
                               "(a zero std or scale?)")

    def to_nchw(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        """A layer tensor (batch first, maybe more leading axes) in NCHW."""
        if layer.layout == tokens.TOKENS:
            return tokens.to_nchw(array, layer.grid)
        if layer.layout != "NHWC":
            return array
        lead = array.ndim - 3
        return np.moveaxis(array, -1, lead)

    def from_nchw(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        if layer.layout == tokens.TOKENS:
            raise OnnxcamError(f"layer '{layer.name}' holds transformer tokens: its prefix tokens cannot be "
                               "rebuilt from a (C, h, w) map, so methods that feed modified activations back "
                               "(ablationcam) do not apply; use scorecam or a gradient method")
        return np.ascontiguousarray(np.moveaxis(array, 1, -1) if layer.layout == "NHWC" else array)

    def _input_hw(self, x: np.ndarray) -> tuple[int, int]:
        return tuple(x.shape[2:4]) if self.input_layout == "NCHW" else tuple(x.shape[1:3])

    # -- explaining ---------------------------------------------------------------------------
    def explain(self, x: np.ndarray, method: str = "gradcam", targets: Targets = None, *,
                topk: int | None = None, eigen_smooth: bool = False, aug_smooth: bool = False,
                batch_size: int | None = None, max_channels: int | None = None, samples: int = 25,
                noise: float = 0.15, steps: int = 50, baseline: float | np.ndarray = 0.0,
                seed: int = 0) -> Explanation:
        """Maps for a preprocessed batch ``x`` (the model's own layout).

        ``targets``: None (each image's top-1 class), a class for every image, one class per
        image (N,), several classes per image (N, T) (or (1, T) for all), or float seed vectors
        over the logits (C,), (N, C) or (N, T, C) explaining ``s . logits``. ``topk=T``
        explains each image's T best classes. Several targets are explained in one pass (see
        the module docstring) and give ``heatmaps`` (N, T, H, W).

        For a segmentation or detection output (``self.dense``, :mod:`onnxcam.dense`) a target
        is a class, a ``SegmentationTarget(class, region)`` or a ``DetectionTarget(anchor,
        class)`` (one, one per image, or (N, T) of them), or a float seed of the output's shape.

        ``eigen_smooth`` (activation-space methods) and ``aug_smooth`` (any method: mean over
        horizontal flip x brightness [0.9, 1, 1.1] of the preprocessed input, maps flipped
        back, as pytorch-grad-cam; the targets are those of the unaugmented input) smooth the
        maps. Per method: ``max_channels``, ``batch_size`` (scorecam, ablationcam),
        ``samples``, ``noise``, ``seed`` (smoothgrad), ``steps``, ``baseline``
        (integrated-gradients); see :class:`Options`.
        """
        usual = (eigen_smooth, batch_size, max_channels, samples, noise, steps, seed) == _DEFAULT_GIVEN \
            and type(baseline) is float and baseline == 0.0
        if usual and targets is None and topk is None and not aug_smooth:
            run = self._maps_runs.get(method)
            if run is not None and run.checks:
                return self._explain_top1(self.check_input(x, finite=False), run)
        spec = self.method(method)
        x = self.check_input(x, finite=False)
        if usual:
            options = _DEFAULT_OPTIONS  # nothing to check (explain() is per call)
        else:
            options = Options(eigen_smooth, batch_size, max_channels, samples, noise, steps, baseline, seed)
            _check_options(spec, options)
        wanted = self.resolve_targets(targets, len(x), topk)
        if aug_smooth or not self._run_checks_input(spec, wanted, options):
            self.check_finite(x)
        if aug_smooth and self.dense is not None:
            raise OnnxcamError(f"aug_smooth flips the image but not a {self.dense.kind} target: not for dense outputs")
        return self._augmented(x, spec, wanted, options) if aug_smooth else self._explain(x, spec, wanted, options)

    @staticmethod
    def method(name: str) -> Method:
        if name not in METHODS:
            raise OnnxcamError(f"unknown method '{name}': choose one of {', '.join(METHODS)}")
        return METHODS[name]

    def _explain(self, x: np.ndarray, spec: Method, wanted: TargetSet, options: Options) -> Explanation:
        started = time.perf_counter()
        forward = _Lazy(lambda: self.forward(x))
        in_graph_top1 = wanted.resolver is None and not wanted.multi and (
            spec.kind in ("gradient", "attention") or spec.name in ("saliency", "guided-backprop", "guided-gradcam"))
        if wanted.seeds is None and not in_graph_top1:
            wanted = wanted.resolve(forward()[self.logits_name])
        parts = getattr(self, _STEPS[spec.kind])(x, spec, wanted, options, forward)
        return self._assemble(x, spec, parts, started)

    def _assemble(self, x: np.ndarray, spec: Method, parts: _Parts, started: float) -> Explanation:
        """The Explanation of ``parts``, warning about all-zero maps and non-finite logits."""
        wanted = parts.targets
        # (N, T, H, W) with several targets, else the maps (N, H, W) as they are
        heatmaps = parts.maps.reshape((len(x), wanted.seeds.shape[1]) + parts.maps.shape[1:]) if wanted.multi \
            else parts.maps
        if parts.peaks is None or not all(peak > 0 for peak in parts.peaks):  # peaks: the graph's, per map
            warn_empty_maps(heatmaps if wanted.multi else heatmaps[:, None], spec.name,
                            ("the input",) if spec.kind == "pixel" else self._layer_names,
                            parts.activations if spec.kind != "pixel" else None, parts.gradients)
        if not parts.finite:  # not known from the graph's checks: read the logits
            _warn_nonfinite(parts.logits, stacklevel=5)  # _assemble <- _explain <- explain <- its caller
        squeeze = (lambda a: a) if wanted.multi else (lambda a: a[:, 0])
        return Explanation(
            heatmaps, parts.logits, squeeze(wanted.classes),
            parts.layers or self._layer_names, spec.name,
            parts.provider, time.perf_counter() - started, parts.activations,
            {k: squeeze(v) for k, v in parts.gradients.items()},
            {k: squeeze(v) for k, v in parts.weights.items()}, wanted.seeds)

    def _augmented(self, x: np.ndarray, spec: Method, wanted: TargetSet, options: Options) -> Explanation:
        """pytorch-grad-cam's aug_smooth: the mean of the maps of the 6 augmentations."""
        started = time.perf_counter()
        if wanted.seeds is None:
            wanted = wanted.resolve(self.forward(x)[self.logits_name])
        width_axis = 3 if self.input_layout == "NCHW" else 2
        maps, plain = [], None
        for flip, factor in AUGMENTATIONS:
            augmented = np.flip(x, axis=width_axis) * np.float32(factor) if flip else x * np.float32(factor)
            with warnings.catch_warnings():  # one augmentation's empty map is no news: the mean's is
                warnings.simplefilter("ignore", OnnxcamWarning)
                result = self._explain(np.ascontiguousarray(augmented), spec, wanted, options)
            maps.append(np.flip(result.heatmaps, axis=-1) if flip else result.heatmaps)
            if not flip and factor == 1.0:
                plain = result
        mean = np.mean(np.stack(maps), axis=0).astype(np.float32)
        warn_empty_maps(mean if plain.multi_target else mean[:, None], spec.name, self._layer_names)
        _warn_nonfinite(plain.logits, stacklevel=4)  # _augmented <- explain <- its caller
        return replace(plain, heatmaps=mean, seconds=time.perf_counter() - started)

    # -- the kinds ----------------------------------------------------------------------------
    def _layer_gradients(self, x: np.ndarray, wanted: TargetSet, forward: _Lazy) -> _Parts:
        """Logits, activations (N, K, h, w) and gradients (N, T, K, h, w) at the layers: one
        target per image in one forward + backward run, several through the heads."""
        if wanted.seeds is None or wanted.seeds.shape[1] == 1:
            seeds = np.zeros((len(x), self._classes()), np.float32) if wanted.seeds is None else wanted.seeds[:, 0]
            outputs, provider = self.run(x, seeds)
            rewritten, _ = self.prepared()
            logits = outputs[rewritten.logits]
            wanted = wanted.resolve(logits)
            activations = {l.name: self.to_nchw(l, outputs[l.name]) for l in self.targets_layers}
            gradients = {l.name: self.to_nchw(l, outputs[rewritten.gradients[l.name]])[:, None]
                         for l in self.targets_layers}
            return _Parts(wanted, logits, provider, activations, gradients)
        outputs = forward()
        activations = {l.name: self.to_nchw(l, outputs[l.name]) for l in self.targets_layers}
        gradients, provider = self._gradients_per_target(x, wanted.seeds, outputs)
        return _Parts(wanted, outputs[self.logits_name], provider, activations, gradients)

    def _gradients_per_target(self, x: np.ndarray, seeds: np.ndarray,
                              outputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
        """d (s_t . logits) / d A for every target t: the head fed each activation T times;
        layers whose head cannot be cut fall back to the full model on x repeated T times."""
        count, targets = seeds.shape[:2]
        flat = seeds.reshape((count * targets,) + seeds.shape[2:])
        gradients, provider, fallback = {}, "cpu", []
        for layer in self.targets_layers:
            try:
                rewritten, session = self._head(layer.name, gradient=True)
            except (LayerError, UnsupportedOpError):
                fallback.append(layer)
                continue
            feeds = {name: np.repeat(outputs[name], targets, axis=0)
                     for name in (layer.name, *rewritten.extra_inputs)}
            feeds[SEED] = flat
            grad = self.run_model(rewritten, session, feeds, [rewritten.gradients[layer.name]])
            nchw = self.to_nchw(layer, grad[rewritten.gradients[layer.name]])
            gradients[layer.name] = nchw.reshape((count, targets) + nchw.shape[1:])
            provider = session.provider
        if fallback:
            full, provider = self.run(np.repeat(x, targets, axis=0), flat)
            rewritten, _ = self.prepared()
            for layer in fallback:
                nchw = self.to_nchw(layer, full[rewritten.gradients[layer.name]])
                gradients[layer.name] = nchw.reshape((count, targets) + nchw.shape[1:])
        return gradients, provider

    def _gradient_parts(self, x, spec: Method, wanted: TargetSet, options: Options, forward: _Lazy) -> _Parts:
        parts = self._in_graph_parts(x, spec, wanted, options, forward)
        if parts is not None:
            return parts
        parts = self._layer_gradients(x, wanted, forward)
        if spec.weights is not None:
            parts.weights = {name: spec.channel_weights(_flat(A, parts.targets), _merge(parts.gradients[name]))
                             .reshape(parts.gradients[name].shape[:3])
                             for name, A in parts.activations.items()}
        parts.maps = self._activation_maps(spec, parts, self._input_hw(x), options.eigen_smooth)
        return parts

    def _in_graph_parts(self, x, spec: Method, wanted: TargetSet, options: Options,
                        forward: _Lazy) -> _Parts | None:
        """Logits, activations, gradients, weights and maps from one run of a rewrite that
        computes the maps too (:mod:`onnxcam.ingraph`), for several targets one run of the
        head with maps; None where that does not apply (eigen_smooth, a projection method,
        several targets with several layers or a dynamic input size) or the graph cannot take
        the formula: the numpy path then."""
        if not (self.in_graph_maps and in_graph(spec) and not options.eigen_smooth):
            return None
        if wanted.seeds is not None and wanted.seeds.shape[1] > 1:
            return self._in_graph_head_parts(spec, wanted, forward)
        run = self._maps_run(spec)
        if run is None:
            return None
        rewritten = run.rewritten
        seeds = self._zero_seeds(len(x)) if wanted.seeds is None else wanted.seeds[:, 0]
        return self._maps_parts(x, run, wanted,
                                self.run_model(rewritten, run.session, {rewritten.input: x, SEED: seeds}, run.names))

    def _maps_parts(self, x: np.ndarray, run: _MapsRun, wanted: TargetSet,
                    outputs: dict[str, np.ndarray]) -> _Parts:
        """The parts of one run of an in-graph maps session, its checks read."""
        rewritten, session = run.rewritten, run.session
        logits = outputs[rewritten.logits]
        peaks = finite = None
        if run.checks:  # one small output read as a list: cheaper than numpy calls after a run
            checks = outputs[CHECKS_OUTPUT].tolist()
            if not all(math.isfinite(row[INPUT_SUM]) for row in checks):
                self.check_finite(x)  # names the image (a sum that overflowed passes)
            finite = all(math.isfinite(row[LOGITS_SUM]) for row in checks) or None
            peaks = [row[MAP_PEAK] for row in checks]
            if finite and wanted.seeds is None:  # top-1 as the graph chose it: ArgMax is np.argmax on finite logits
                wanted = TargetSet(outputs[SEED_USED_OUTPUT][:, None], outputs[TOP1_OUTPUT], multi=False)
        layers = self.targets_layers
        return _Parts(wanted.resolve(logits), logits, session.provider,
                      {l.name: self.to_nchw(l, outputs[l.name]) for l in layers},
                      {l.name: self.to_nchw(l, outputs[rewritten.gradients[l.name]])[:, None] for l in layers},
                      {name: outputs[output][:, None] for name, output in rewritten.weights.items()},
                      outputs[rewritten.heatmap], peaks=peaks, finite=finite)

    def _explain_top1(self, x: np.ndarray, run: _MapsRun) -> Explanation:
        """The usual call: each image's top-1, default options, through a built in-graph maps
        session that checks itself. One run, then the Explanation straight from its outputs
        (as :meth:`_assemble` would make it, without the per-target axis put in and taken
        out again: ~0.1 ms of Python per call less, cold caches after the run). Where the
        checks find something to report (a non-finite input or logits, an all-zero map), the
        general assembly takes the outputs over: the same errors and warnings, no second run."""
        started = time.perf_counter()
        rewritten = run.rewritten
        outputs = self.run_model(rewritten, run.session, {rewritten.input: x, SEED: self._zero_seeds(len(x))},
                                 run.names)
        if not all(math.isfinite(total) and math.isfinite(logits) and peak > 0
                   for total, logits, peak in outputs[CHECKS_OUTPUT].tolist()):
            return self._assemble(x, run.spec, self._maps_parts(x, run, TOP1, outputs), started)
        layers = self.targets_layers
        return Explanation(
            outputs[rewritten.heatmap], outputs[rewritten.logits], outputs[TOP1_OUTPUT][:, 0], self._layer_names,
            run.spec.name, run.session.provider, time.perf_counter() - started,
            {l.name: self.to_nchw(l, outputs[l.name]) for l in layers},
            {l.name: self.to_nchw(l, outputs[rewritten.gradients[l.name]]) for l in layers},
            {name: outputs[output] for name, output in rewritten.weights.items()}, outputs[SEED_USED_OUTPUT][:, None])

    def _maps_run(self, spec: Method) -> _MapsRun | None:
        """The in-graph maps session of ``spec`` and what explain() reads from it, looked up
        by the method's name (hashing its RewriteRequest is per call); None where the maps
        cannot be in the graph."""
        run = self._maps_runs.get(spec.name)
        if run is None:
            found = self._maps_session(self._map_request(spec))
            if found is None:
                return None
            rewritten, session = found
            wanted = [rewritten.logits, *rewritten.layers, *rewritten.gradients.values(),
                      *rewritten.weights.values(), rewritten.heatmap, CHECKS_OUTPUT, TOP1_OUTPUT, SEED_USED_OUTPUT]
            names = session.present(wanted)
            run = self._maps_runs[spec.name] = _MapsRun(spec, rewritten, session, names, CHECKS_OUTPUT in names)
        return run

    def _zero_seeds(self, batch: int) -> np.ndarray:
        """All-zero seeds (top-1, chosen in the graph) for ``batch`` images, made once per
        batch size (read-only: onnxruntime only reads its inputs)."""
        seeds = self._zero_seed_cache.get(batch)
        if seeds is None:
            seeds = np.zeros((batch, self._classes()), np.float32)
            seeds.flags.writeable = False
            self._zero_seed_cache = {batch: seeds}  # the last size only: a run's last batch is smaller
        return seeds

    def _map_request(self, spec: Method) -> RewriteRequest:
        """The rewrite with ``spec``'s maps in the graph, built once per method (hashing it is
        per call)."""
        request = self._map_requests.get(spec.name)
        if request is None:
            maps = MapRequest(spec.name, self.input_layout, tuple(l.layout for l in self.targets_layers))
            request = self._map_requests[spec.name] = RewriteRequest(self._layer_names, self.logits_name, maps=maps)
        return request

    def _run_checks_input(self, spec: Method, wanted: TargetSet, options: Options) -> bool:
        """Whether this call is the one run of an in-graph maps session already built, which
        checks the input's finiteness itself (its sum): the Python pass over the input, which
        onnxruntime's run has just pushed out of the caches, is then left out."""
        if not (self.in_graph_maps and in_graph(spec) and not options.eigen_smooth):
            return False
        if wanted.seeds is not None and wanted.seeds.shape[1] > 1:
            return False
        run = self._maps_runs.get(spec.name)
        return run is not None and run.checks

    def _in_graph_head_parts(self, spec: Method, wanted: TargetSet, forward: _Lazy) -> _Parts | None:
        """Several targets, one layer: the forward model once, then the head cut at the layer
        fed the activation once per target, computing gradients, weights and maps."""
        if len(self.targets_layers) != 1 or self.input_size is None:
            return None
        layer = self.targets_layers[0]
        try:
            self.frontier(layer.name)
        except LayerError:
            return None
        maps = MapRequest(spec.name, self.input_layout, (layer.layout,), size=tuple(self.input_size))
        found = self._maps_session(RewriteRequest((layer.name,), self.logits_name, head=layer.name, maps=maps),
                                   UnsupportedOpError)
        if found is None:
            return None
        rewritten, session = found
        outputs = forward()
        count, targets = wanted.seeds.shape[:2]
        feeds = {name: np.repeat(outputs[name], targets, axis=0) for name in (layer.name, *rewritten.extra_inputs)}
        feeds[SEED] = _merge(wanted.seeds)
        gradient = rewritten.gradients[layer.name]
        out = self.run_model(rewritten, session, feeds, [gradient, *rewritten.weights.values(), rewritten.heatmap])
        nchw = self.to_nchw(layer, out[gradient])
        return _Parts(wanted, outputs[self.logits_name], session.provider,
                      {layer.name: self.to_nchw(layer, outputs[layer.name])},
                      {layer.name: nchw.reshape((count, targets) + nchw.shape[1:])},
                      {name: out[output].reshape(count, targets, -1) for name, output in rewritten.weights.items()},
                      out[rewritten.heatmap])

    def _maps_session(self, request: RewriteRequest, *fallback: type[Exception]) -> tuple[Rewritten, Session] | None:
        """The session of a rewrite with in-graph maps or masks; None (and remembered) when
        its extra nodes cannot be built or loaded, or on a ``fallback`` error."""
        if request in self._not_in_graph:
            return None
        try:
            return self.session(request)
        except fallback:
            pass
        except (UnsupportedOpError, LayerError, ModelError):
            raise  # the model's own problem: the plain rewrite reports the same
        except Exception:  # noqa: BLE001 - the extra nodes failed: numpy computes the maps
            pass
        self._not_in_graph.add(request)
        return None

    def _activation_parts(self, x, spec: Method, wanted: TargetSet, options: Options, forward: _Lazy) -> _Parts:
        parts = self._forward_parts(wanted, forward)
        parts.maps = self._activation_maps(spec, parts, self._input_hw(x), options.eigen_smooth)
        return parts

    def _graph_parts(self, x, spec: Method, wanted: TargetSet, options: Options, forward: _Lazy) -> _Parts:
        parts = self._forward_parts(wanted, forward)
        parts.weights = {l.name: (wanted.seeds.astype(np.float64) @ self.linear_head(l.name)).astype(np.float32)
                         for l in self.targets_layers}
        parts.maps = self._activation_maps(spec, parts, self._input_hw(x), options.eigen_smooth)
        return parts

    def _perturbation_parts(self, x, spec: Method, wanted: TargetSet, options: Options, forward: _Lazy) -> _Parts:
        parts = self._forward_parts(wanted, forward)
        batch = options.batch_size or (self.batch_size if spec.name == "scorecam" else 2 * self.batch_size)
        if spec.name == "scorecam":
            rewritten, session = self._forward_model()
            parts.provider = session.provider

            def score(inputs: np.ndarray) -> np.ndarray:
                return self.run_model(rewritten, session, {rewritten.input: inputs}, [rewritten.logits],
                                      batch)[rewritten.logits]

            parts.weights = {name: perturbation.scorecam_weights(x, A, wanted.seeds, score, self.input_layout,
                                                                 batch, options.max_channels,
                                                                 self._masked_scores(x, A.shape[2:], batch))
                             for name, A in parts.activations.items()}
        else:
            parts.weights = {l.name: perturbation.ablationcam_weights(
                parts.activations[l.name], wanted.seeds, self._ablation_head(l, forward()), batch)
                for l in self.targets_layers}
        parts.maps = self._activation_maps(spec, parts, self._input_hw(x), options.eigen_smooth)
        return parts

    def _masked_scores(self, x: np.ndarray, map_size: tuple[int, ...], batch: int) -> perturbation.MaskedFn | None:
        """Score-CAM's masked images built and run inside onnxruntime (a forward model whose
        input is multiplied by masks made in the graph, :func:`onnxcam.ingraph.feed_masked`):
        per batch only the channel maps (B, h, w) go in and the logits come out. None (numpy
        builds the masks) without a static input size or when the graph cannot be built."""
        if not self.in_graph_maps or self.input_size is None or (self.graph.static_batch() or 1) != 1:
            return None
        found = self._maps_session(RewriteRequest((), self.logits_name, gradient=False,
                                                  masks=MaskRequest(self.input_layout, tuple(int(d) for d in map_size))))
        if found is None:
            return None
        rewritten, session = found
        step = batch if rewritten.batch_dynamic else 1
        logits = rewritten.logits

        def masked(n: int, channels: np.ndarray) -> np.ndarray:
            image, sources = x[n:n + 1], channels.astype(np.float64)
            return np.concatenate([session.run({rewritten.input: image, MASK_SOURCE: sources[start:start + step]},
                                               [logits])[logits] for start in range(0, len(sources), step)])
        return masked

    def _ablation_head(self, layer: Layer, outputs: dict[str, np.ndarray]) -> perturbation.HeadFn:
        """logits from (modified) activations of one image, through the head cut at ``layer``."""
        try:
            rewritten, session = self._head(layer.name, gradient=False)
        except LayerError as exc:
            raise OnnxcamError(f"ablationcam needs the layers after '{layer.name}' as a separate model "
                               f"but {exc}; choose another layer (e.g. the default) or use scorecam") from None

        def head(batch: np.ndarray, image: int) -> np.ndarray:
            feeds = {layer.name: self.from_nchw(layer, batch)}
            for name in rewritten.extra_inputs:
                feeds[name] = np.repeat(outputs[name][image:image + 1], len(batch), axis=0)
            return self.run_model(rewritten, session, feeds, [rewritten.logits], len(batch))[rewritten.logits]
        return head

    def _forward_parts(self, wanted: TargetSet, forward: _Lazy) -> _Parts:
        outputs = forward()
        rewritten, session = self._forward_model()
        activations = {l.name: self.to_nchw(l, outputs[l.name]) for l in self.targets_layers}
        return _Parts(wanted.resolve(outputs[self.logits_name]), outputs[self.logits_name],
                      session.provider, activations, {})

    def _activation_maps(self, spec: Method, parts: _Parts, size: tuple[int, int],
                         eigen_smooth: bool) -> np.ndarray:
        """(N*T, H, W) maps: every layer's raw map per target, combined as pytorch-grad-cam."""
        per_layer = []
        targets = parts.targets.seeds.shape[1]
        for name, A in parts.activations.items():
            if spec.kind == "activation":  # class-agnostic: one map per image, repeated
                per_layer.append(np.repeat(spec.raw_map(A), targets, axis=0))
                continue
            gradients = _merge(parts.gradients[name]) if name in parts.gradients else None
            weights = _merge(parts.weights[name]) if name in parts.weights else None
            per_layer.append(spec.raw_map(_flat(A, parts.targets), gradients, weights, eigen_smooth))
        return combine_layers(per_layer, size)

    def _pixel_parts(self, x, spec: Method, wanted: TargetSet, options: Options, forward: _Lazy) -> _Parts:
        batch = options.batch_size or self.batch_size
        relu = "guided" if spec.name in ("guided-backprop", "guided-gradcam") else "plain"
        rewritten, session = self.prepared(input_gradient=True, relu=relu)
        grad_name = rewritten.gradients[rewritten.input]

        def gradient(points: np.ndarray, seeds: np.ndarray) -> np.ndarray:
            return self.run_model(rewritten, session, {rewritten.input: points, SEED: seeds}, [grad_name])[grad_name]

        activations, gradients, weights = {}, {}, {}
        if spec.name in ("smoothgrad", "integrated-gradients"):
            logits = forward()[self.logits_name]
            if spec.name == "smoothgrad":
                attributions = pixel.smoothgrad(x, wanted.seeds, gradient, options.samples, options.noise,
                                                batch, options.seed)
            else:
                attributions = pixel.integrated_gradients(x, wanted.seeds, gradient, options.steps,
                                                          options.baseline, batch)
            attributions = _merge(attributions)
        else:
            if wanted.seeds is None:  # each image's top-1, chosen in-graph in the same run
                seeds = np.zeros((len(x), self._classes()), np.float32)
                out = self.run_model(rewritten, session, {rewritten.input: x, SEED: seeds},
                                     [rewritten.logits, grad_name])
                logits, attributions = out[rewritten.logits], out[grad_name]
                wanted = wanted.resolve(logits)
            else:
                targets = wanted.seeds.shape[1]
                out = self.run_model(rewritten, session,
                                     {rewritten.input: np.repeat(x, targets, axis=0),
                                      SEED: _merge(wanted.seeds)}, [rewritten.logits, grad_name])
                logits, attributions = out[rewritten.logits][::targets], out[grad_name]
            if spec.name == "guided-gradcam":
                cam = self._gradient_parts(x, METHODS["gradcam"], wanted, options, forward)
                activations, gradients, weights = cam.activations, cam.gradients, cam.weights
                attributions = pixel.guided_gradcam(attributions, cam.maps, self.input_layout)
        maps = scale_maps(pixel.pixel_map(attributions, self.input_layout))
        return _Parts(wanted, logits, session.provider, activations, gradients, weights, maps)

    def _attention_parts(self, x, spec: Method, wanted: TargetSet, options: Options, forward: _Lazy) -> _Parts:
        """Rollout / gradient-weighted rollout from every self-attention's probabilities (and
        their gradients) in one run (:mod:`onnxcam.attention`)."""
        if not hasattr(self, "_attention"):
            self._attention = attention.find_attention(self.graph, self.logits_name)
        found = self._attention
        gradient = spec.name == "gradient-rollout"
        rewritten, session = self.session(RewriteRequest(found.names, self.logits_name, gradient=gradient))
        gradients = [rewritten.gradients.get(n, "") for n in found.names] if gradient else []
        if gradient and wanted.seeds is None:
            x_run, seeds = x, np.zeros((len(x), self._classes()), np.float32)  # top-1 chosen in-graph
        elif gradient:
            x_run, seeds = np.repeat(x, wanted.seeds.shape[1], axis=0), _merge(wanted.seeds)
        else:
            x_run, seeds = x, None
        feeds = {rewritten.input: x_run} if seeds is None else {rewritten.input: x_run, SEED: seeds}
        out = self.run_model(rewritten, session, feeds, [rewritten.logits, *found.names, *gradients])
        batch = len(x_run)
        probabilities = [attention.per_head(out[n], batch) for n in found.names]
        logits = out[rewritten.logits] if seeds is None or wanted.seeds is None else out[rewritten.logits][::len(x_run) // len(x)]
        wanted = wanted.resolve(logits)
        if gradient:
            raw = attention.gradient_rollout(probabilities, [attention.per_head(out[g], batch) for g in gradients], found)
        else:
            raw = np.repeat(attention.rollout(probabilities, found), wanted.seeds.shape[1], axis=0)
        return _Parts(wanted, logits, session.provider, maps=combine_layers([raw], self._input_hw(x)),
                      layers=found.names)

    # -- channel importance -------------------------------------------------------------------
    def channels(self, x: np.ndarray, method: str = "gradcam", targets: Targets = None, k: int = 5,
                 layer: str | None = None, **options) -> ChannelImportance:
        """The ``k`` most and least important channels of ``layer`` (default: the first
        explained one) by the weights of a channel-weighting ``method`` (gradcam, gradcam++,
        xgradcam, counterfactual, cam, scorecam, ablationcam), each with its activation map."""
        spec = self.method(method)
        if not spec.weights_channels:
            raise OnnxcamError(f"'{method}' does not weight channels; channel importance needs one of "
                               + ", ".join(m.name for m in METHODS.values() if m.weights_channels))
        if options.get("aug_smooth"):
            raise OnnxcamError("channel importance is read from one pass: aug_smooth does not apply")
        result = self.explain(x, method, targets, **options)
        name = layer or result.layers[0]
        if name not in result.weights:
            raise LayerError(f"layer '{name}' is not explained by this explainer ({', '.join(result.layers)})")
        weights = result.weights[name]
        k = max(1, min(int(k), weights.shape[-1]))
        order = np.argsort(-weights, axis=-1, kind="stable")
        most, least = order[..., :k], order[..., ::-1][..., :k]
        size = result.heatmaps.shape[-2:]
        return ChannelImportance(
            name, method, result.targets,
            most, np.take_along_axis(weights, most, -1), self._channel_maps(result.activations[name], most, size),
            least, np.take_along_axis(weights, least, -1), self._channel_maps(result.activations[name], least, size))

    @staticmethod
    def _channel_maps(A: np.ndarray, indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """``relu(A_k)`` scaled and resized for each chosen channel: (N, [T,] k, H, W)."""
        picked = np.stack([A[n][indices[n]] for n in range(len(A))])
        flat = picked.reshape((-1,) + A.shape[2:])
        return scale_maps(flat, tuple(size)).reshape(picked.shape[:-2] + tuple(size))


@dataclass
class _Parts:
    """What a method kind produced for one batch: resolved targets, logits, the provider,
    layer tensors (NCHW), gradients (N, T, K, h, w), weights (N, T, K), maps (N*T, H, W)."""

    targets: TargetSet
    logits: np.ndarray
    provider: str
    activations: dict[str, np.ndarray] = field(default_factory=dict)
    gradients: dict[str, np.ndarray] = field(default_factory=dict)
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    maps: np.ndarray | None = None
    #: what the maps were read from, when not the explainer's layers (attention methods)
    layers: tuple[str, ...] = ()
    #: each map's peak (N*T,) where the graph computed it (no pass over the maps when all > 0)
    peaks: Sequence[float] | None = None
    #: True where the graph's checks found every logit finite (None: not known)
    finite: bool | None = None


def _warn_nonfinite(logits: np.ndarray, stacklevel: int) -> None:
    """Warn about the images whose logits hold NaN or Inf (``stacklevel``: explain()'s caller)."""
    bad = np.flatnonzero(~finite_rows(logits))
    if len(bad):
        warnings.warn(nonfinite_message(bad, len(logits)), OnnxcamWarning, stacklevel=stacklevel)


def _merge(array: np.ndarray) -> np.ndarray:
    """(N, T, ...) -> (N*T, ...)."""
    return array.reshape((-1,) + array.shape[2:])


def _flat(A: np.ndarray, targets: TargetSet) -> np.ndarray:
    """Activations (N, ...) repeated once per target: (N*T, ...), matching :func:`_merge`."""
    count = targets.seeds.shape[1]
    return A if count == 1 else np.repeat(A, count, axis=0)


def _check_options(spec: Method, options: Options) -> None:
    if options.eigen_smooth and not spec.activation_space and spec.name != "guided-gradcam":
        raise OnnxcamError(f"eigen_smooth applies to activation-space methods, not '{spec.name}'")
    for name in ("batch_size", "max_channels"):
        value = getattr(options, name)
        if value is not None and int(value) < 1:
            raise OnnxcamError(f"{name} must be at least 1, got {value}")
    if options.samples < 1 or options.steps < 1:
        raise OnnxcamError("samples and steps must be at least 1")
    if not options.noise >= 0 or not math.isfinite(options.noise):
        raise OnnxcamError(f"noise must be >= 0 and finite, got {options.noise}")
    baseline = options.baseline
    if not (math.isfinite(baseline) if isinstance(baseline, (int, float)) else np.all(np.isfinite(baseline))):
        raise OnnxcamError("the integrated-gradients baseline must be finite")
