"""Sanity check by cascading model randomization (Adebayo et al., "Sanity Checks for Saliency
Maps", NeurIPS 2018, sec. 3).

The learnable layers (Conv, ConvTranspose, Gemm, MatMul with a weight initializer) are
randomized cumulatively from the logits down: step k re-draws the weights and biases of the
top ``cut_k`` layers from a normal distribution with each tensor's own standard deviation
(a fixed seed), by rewriting the ONNX initializers. Each step's maps, for the original
explained class, are compared with the original maps: Spearman's rank correlation and SSIM.
A method that explains the model must change as soon as the top layers lose their weights;
maps that keep their look while the weights are gone show the input's edges, not the model.

Summaries per method: ``changed_at`` is the first step whose mean rank correlation with the
original falls below 0.5 (None: never), ``stops_changing_at`` the first step from which
every later step's maps correlate at least 0.9 with the step before (None: they change
until the end). A constant map (all zero after randomization, say) has no ranking: its rank
correlation is counted as 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .. import large_models
from ..explainer import Explainer
from ..model import load_model
from .stats import spearman, ssim

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weight_layers(model: onnx.ModelProto) -> list[tuple[str, list[str]]]:
    """(node name, its initializer inputs) of the learnable layers, top (logits side) first."""
    initializers = {i.name for i in model.graph.initializer}
    found = []
    for node in reversed(model.graph.node):
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and node.input[1] in initializers:
            names = [n for n in node.input[1:] if n in initializers]
            found.append((node.name or node.output[0], names))
    return found


def randomized(model: onnx.ModelProto, tensors: Sequence[str], seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers ``tensors`` are redrawn from N(0, std(tensor))."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    rng = np.random.default_rng((seed, 2018))  # not the bare seed: models made with it would redraw themselves
    wanted = set(tensors)
    for index, initializer in enumerate(copy.graph.initializer):
        if initializer.name not in wanted:
            continue
        values = large_models.array(initializer)
        spread = float(values.std()) or 0.01
        fresh = rng.normal(0.0, spread, values.shape).astype(values.dtype)
        copy.graph.initializer[index].CopyFrom(numpy_helper.from_array(fresh, initializer.name))
    return copy


def cut_points(layers: int, steps: int) -> list[int]:
    """How many top layers are randomized at each step: ``steps`` points from 1 to all."""
    return sorted(set(int(round(v)) for v in np.linspace(1, layers, max(1, min(steps, layers)))))


def _similarity(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    rho = spearman(a, b)
    return (0.0 if np.isnan(rho) else rho), ssim(a, b)


def cascading_randomization(model: str | os.PathLike | onnx.ModelProto, x: np.ndarray, classes: np.ndarray,
                            originals: dict[str, np.ndarray], layer: str | Sequence[str] | None = None,
                            steps: int = 8, seed: int = 0, provider: str = "cpu",
                            batch_size: int = 16, method_options: dict | None = None) -> dict[str, dict]:
    """Per method: the cascade's steps (randomized layers, per-image Spearman and SSIM with
    the original map and with the previous step's) and the summaries above.

    ``x`` is the preprocessed batch (model layout), ``classes`` (N,) the explained classes,
    ``originals[method]`` the original maps (N, H, W) at the input size."""
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    layers = weight_layers(proto)
    options = method_options or {}
    results: dict[str, dict] = {m: {"steps": []} for m in originals}
    previous = dict(originals)
    for count in cut_points(len(layers), steps):
        tensors = [t for _, names in layers[:count] for t in names]
        explainer = Explainer(randomized(proto, tensors, seed), layer=layer, provider=provider,
                              cache=False, batch_size=batch_size)
        for method, original in originals.items():
            maps = explainer.explain(x, method, targets=classes, **options.get(method, {})).heatmaps
            to_original = [_similarity(o, m) for o, m in zip(original, maps)]
            to_previous = [_similarity(p, m) for p, m in zip(previous[method], maps)]
            results[method]["steps"].append({
                "randomized": count, "down_to": layers[count - 1][0],
                "spearman": [s for s, _ in to_original], "ssim": [s for _, s in to_original],
                "spearman_previous": [s for s, _ in to_previous]})
            previous[method] = maps
    for method, result in results.items():
        steps_ = result["steps"]
        means = [float(np.mean(s["spearman"])) for s in steps_]
        consecutive = [float(np.mean(s["spearman_previous"])) for s in steps_]
        result["mean_spearman"] = means
        result["mean_ssim"] = [float(np.mean(s["ssim"])) for s in steps_]
        changed = [i for i, v in enumerate(means) if v < 0.5]
        result["changed_at"] = steps_[changed[0]]["randomized"] if changed else None
        stable = None
        for i in range(len(steps_) - 1, -1, -1):
            if consecutive[i] >= 0.9:
                stable = i
            else:
                break
        result["stops_changing_at"] = steps_[stable]["randomized"] if stable is not None else None
        result["layers"] = len(layers)
    return results
