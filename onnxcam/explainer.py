"""The Python API: ``Explainer(model).explain(x)`` ties the pipeline stages together.

model (inspect) -> surgery (rewrite, cached) -> runtime (one session) -> methods (maps).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import OnnxcamError, TargetError
from .images import Preprocess, make_preprocess, preprocess_from_metadata
from .methods import METHODS, combine_layers
from .model import Layer, ModelGraph, load_model
from .runtime import Session
from .surgery import SEED, RewriteRequest, Rewritten, cached_rewrite, rewrite

Targets = int | Sequence[int] | np.ndarray | None


@dataclass
class Explanation:
    """Maps for a batch: ``heatmaps`` (N, H, W) float32 in [0, 1] at the model's input size."""

    heatmaps: np.ndarray
    logits: np.ndarray
    targets: np.ndarray
    layers: tuple[str, ...]
    method: str
    provider: str
    seconds: float
    activations: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    gradients: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def layer(self) -> str:
        return self.layers[0] if len(self.layers) == 1 else ",".join(self.layers)

    @property
    def probabilities(self) -> np.ndarray:
        shifted = self.logits - self.logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


class Explainer:
    """Explains an ONNX image classifier.

    ``model`` is a path or a ModelProto; ``layer`` a tensor (or node) name, several, or None for
    the default (the last spatial activation before the logits); ``provider`` "auto", "cpu"
    or "cuda"; ``output`` which output to explain when there are several.
    """

    def __init__(self, model: str | os.PathLike | onnx.ModelProto, layer: str | Sequence[str] | None = None,
                 provider: str = "auto", output: str | None = None, cache: bool = True,
                 batch_size: int = 16):
        if isinstance(model, onnx.ModelProto):
            self.source, proto = "<model>", model
        else:
            self.source, proto = str(model), load_model(model)
        self.graph = ModelGraph(proto, self.source)
        self._proto = proto
        self.output = output
        self.logits_name = self.graph.logits(output)
        self.input_layout = self.graph.input_layout()
        if layer is None:
            chosen = [next(l for l in self.graph.layers(output) if l.default)]
        else:
            names = [layer] if isinstance(layer, str) else list(layer)
            chosen = [self.graph.find_layer(name, output) for name in names]
        self.targets_layers: list[Layer] = chosen
        self.provider_requested = provider
        self.cache = cache
        self.batch_size = max(1, int(batch_size))
        self._prepared: dict[tuple, tuple[Rewritten, Session]] = {}
        self.metadata = {p.key: p.value for p in proto.metadata_props}

    def __repr__(self) -> str:
        names = ", ".join(l.name for l in self.targets_layers)
        return f"Explainer({self.source!r}, layer={names!r}, provider={self.provider_requested!r})"

    # -- inspection ---------------------------------------------------------------------------
    def layers(self) -> list[Layer]:
        """The candidate spatial activations, the default one marked."""
        return self.graph.layers(self.output)

    @property
    def num_classes(self) -> int | None:
        dims = self.graph.dims(self.logits_name)
        return dims[-1] if dims and isinstance(dims[-1], int) else None

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.graph.static_input_hw()

    def preprocess(self, preset: str | None = None, size: tuple[int, int] | None = None,
                   **overrides) -> Preprocess:
        """The input normalization: a preset, else what the model declares, else ImageNet's."""
        return make_preprocess(preset, self.input_layout, size or self.input_size,
                               declared=preprocess_from_metadata(self.metadata), **overrides)

    def labels(self) -> list[str] | None:
        """Class names the model carries in its ``onnxcam.labels`` metadata, if any."""
        import json
        raw = self.metadata.get("onnxcam.labels")
        return list(json.loads(raw)) if raw else None

    # -- running ------------------------------------------------------------------------------
    def prepared(self, input_gradient: bool = False, relu: str = "plain") -> tuple[Rewritten, Session]:
        """The rewritten model and its session for this configuration (built once)."""
        key = (input_gradient, relu)
        if key not in self._prepared:
            request = RewriteRequest(tuple(l.name for l in self.targets_layers), self.logits_name,
                                     input_gradient=input_gradient, relu=relu)
            if self.cache:
                rewritten, _ = cached_rewrite(self._proto, request, self.source)
            else:
                rewritten = rewrite(self._proto, request, self.source)
            self._prepared[key] = (rewritten, Session(rewritten.model, self.provider_requested))
        return self._prepared[key]

    @property
    def provider(self) -> str:
        """The provider the session really runs on ("cpu", "cuda")."""
        return self.prepared()[1].provider

    def seeds(self, targets: Targets, batch: int) -> np.ndarray:
        """One-hot seed rows for ``targets``; all-zero rows (top-1, chosen in-graph) for None."""
        classes = self.num_classes
        if classes is None:
            raise OnnxcamError(f"{self.source}: the logits' class dimension is not static")
        seeds = np.zeros((batch, classes), np.float32)
        if targets is None:
            return seeds
        values = np.broadcast_to(np.asarray(targets, dtype=np.int64).reshape(-1), (batch,)) \
            if np.ndim(targets) == 0 else np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(values) != batch:
            raise TargetError(f"{len(values)} targets for a batch of {batch} images")
        bad = [int(v) for v in values if not 0 <= v < classes]
        if bad:
            raise TargetError(f"target class {bad[0]} is out of range: the model has {classes} classes (0..{classes - 1})")
        seeds[np.arange(batch), values] = 1.0
        return seeds

    def check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise OnnxcamError(f"expected a batch (N, ...) of 4 dims in the model's layout, got shape {list(x.shape)}")
        dims = self.graph.dims(self.graph.input.name) or ()
        for axis, (want, got) in enumerate(zip(dims[1:], x.shape[1:]), start=1):
            if isinstance(want, int) and want != got:
                raise OnnxcamError(f"input shape {list(x.shape)} does not match the model's "
                                   f"{list(dims)} (axis {axis}: {got} != {want})")
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, x: np.ndarray, seeds: np.ndarray, input_gradient: bool = False,
            relu: str = "plain") -> tuple[dict[str, np.ndarray], str]:
        """Forward + backward for a batch; outputs by name, concatenated over chunks."""
        rewritten, session = self.prepared(input_gradient, relu)
        step = self.batch_size if rewritten.batch_dynamic else (self.graph.static_batch() or 1)
        wanted = [rewritten.logits] + list(rewritten.layers) + list(rewritten.gradients.values())
        wanted = [n for n in dict.fromkeys(wanted) if n in session.output_names]
        chunks: list[dict[str, np.ndarray]] = []
        for start in range(0, len(x), step):
            feeds = {rewritten.input: x[start:start + step], SEED: seeds[start:start + step]}
            chunks.append(session.run(feeds, wanted))
        merged = {name: np.concatenate([c[name] for c in chunks]) for name in wanted}
        return merged, session.provider

    def to_nchw(self, layer: Layer, array: np.ndarray) -> np.ndarray:
        return array.transpose(0, 3, 1, 2) if layer.layout == "NHWC" else array

    def explain(self, x: np.ndarray, method: str = "gradcam", targets: Targets = None) -> Explanation:
        """Maps for a preprocessed batch ``x`` (the model's own layout); ``targets`` a class
        index, one per image, or None for each image's top-1 class."""
        if method not in METHODS:
            raise OnnxcamError(f"unknown method '{method}': choose one of {', '.join(METHODS)}")
        started = time.perf_counter()
        x = self.check_input(x)
        outputs, provider = self.run(x, self.seeds(targets, len(x)))
        rewritten, _ = self.prepared()
        logits = outputs[rewritten.logits]
        chosen = logits.argmax(axis=1) if targets is None else self.seeds(targets, len(x)).argmax(axis=1)
        activations = {l.name: self.to_nchw(l, outputs[l.name]) for l in self.targets_layers}
        gradients = {l.name: self.to_nchw(l, outputs[rewritten.gradients[l.name]])
                     for l in self.targets_layers}
        fn = METHODS[method].fn
        per_layer = [fn(activations[l.name], gradients[l.name]) for l in self.targets_layers]
        size = tuple(x.shape[2:4]) if self.input_layout == "NCHW" else tuple(x.shape[1:3])
        heatmaps = combine_layers(per_layer, size)
        return Explanation(heatmaps, logits, chosen.astype(np.int64),
                           tuple(l.name for l in self.targets_layers), method, provider,
                           time.perf_counter() - started, activations, gradients)

