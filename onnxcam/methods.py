"""Stage 4: turn activations A and gradients G into class activation maps.

Each activation-space method is its formula on NCHW arrays: A, G of shape (N, K, h, w) ->
raw map (N, h, w). G = d score / d A, score = the seeded (pre-softmax) logit. Scaling to
[0, 1] and resizing is shared (:func:`scale_maps`) and follows pytorch-grad-cam, so maps are
comparable with it: ReLU, per-image ``(m - min) / (max + 1e-7)``, bilinear resize; with
several layers, each is scaled, then ReLU, mean over layers, scaled again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

MapFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Method:
    """A named activation-space method; ``needs_gradient`` False means A alone suffices."""

    name: str
    fn: MapFn
    needs_gradient: bool = True
    citation: str = ""


def _channel_weighted(weights: np.ndarray, activations: np.ndarray) -> np.ndarray:
    return np.einsum("nk,nkhw->nhw", weights, activations, optimize=True)


def gradcam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Grad-CAM (Selvaraju et al., ICCV 2017): :math:`w_k = \frac{1}{hw}\sum_{ij} G_{kij}`,
    :math:`L = \sum_k w_k A_k`."""
    return _channel_weighted(G.mean(axis=(2, 3)), A)


def counterfactual(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Counterfactual Grad-CAM (Selvaraju et al. 2017, sec. 5): Grad-CAM with negated
    gradients; highlights regions whose removal would raise the class score."""
    return gradcam(A, -G)


def gradcam_plus_plus(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Grad-CAM++ (Chattopadhay et al., WACV 2018), pytorch-grad-cam's closed form:
    :math:`\alpha = G^2 / (2G^2 + \sum_{ab} A_k \cdot G^3 + 10^{-6})` (0 where G = 0),
    :math:`w_k = \sum_{ij} \mathrm{relu}(G)\,\alpha`."""
    g2 = G ** 2
    denominator = 2 * g2 + A.sum(axis=(2, 3), keepdims=True) * G ** 3 + 1e-6
    alpha = np.where(G != 0, g2 / np.where(G != 0, denominator, 1.0), 0.0)
    weights = (np.maximum(G, 0) * alpha).sum(axis=(2, 3))
    return _channel_weighted(weights, A)


def xgradcam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""XGrad-CAM (Fu et al., BMVC 2020): :math:`w_k = \sum_{ij} G A / (\sum_{ij} A + 10^{-7})`."""
    weights = (G * A).sum(axis=(2, 3)) / (A.sum(axis=(2, 3)) + 1e-7)
    return _channel_weighted(weights, A)


def hirescam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""HiResCAM (Draelos & Carin 2020): :math:`L = \sum_k G_k \odot A_k` (no pooling)."""
    return (G * A).sum(axis=1)


def gradcam_elementwise(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Element-wise Grad-CAM (pytorch-grad-cam): :math:`L = \sum_k \mathrm{relu}(G_k \odot A_k)`."""
    return np.maximum(G * A, 0).sum(axis=1)


def layercam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""LayerCAM (Jiang et al., TIP 2021): :math:`L = \sum_k \mathrm{relu}(G_k) \odot A_k`."""
    return (np.maximum(G, 0) * A).sum(axis=1)


def first_principal_component(X: np.ndarray) -> np.ndarray:
    """Projection of each image's (hw, K) matrix on its first principal component, (N, h, w).

    Economy SVD (never the hw x hw one). The sign of a singular vector is arbitrary (and in
    pytorch-grad-cam depends on the BLAS build); it is fixed so the map correlates positively
    with the mean activation, so bright regions are where the layer is active.
    """
    X = np.nan_to_num(X.astype(np.float64))
    maps = []
    for activations in X:
        k, h, w = activations.shape
        matrix = activations.reshape(k, h * w).T
        centred = matrix - matrix.mean(axis=0)
        if not np.any(centred):
            maps.append(np.zeros((h, w)))
            continue
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        projection = centred @ vt[0]
        if np.dot(projection, matrix.mean(axis=1) - matrix.mean()) < 0:
            projection = -projection
        maps.append(projection.reshape(h, w))
    return np.stack(maps).astype(np.float32)


def eigencam(A: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): first principal component of A; class-agnostic."""
    return first_principal_component(A)


def eigengradcam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Eigen-Grad-CAM (pytorch-grad-cam): first principal component of G * A."""
    return first_principal_component(G * A)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("gradcam", gradcam, citation="Selvaraju et al. 2017"),
    Method("gradcam++", gradcam_plus_plus, citation="Chattopadhay et al. 2018"),
    Method("xgradcam", xgradcam, citation="Fu et al. 2020"),
    Method("hirescam", hirescam, citation="Draelos & Carin 2020"),
    Method("gradcam-elementwise", gradcam_elementwise, citation="pytorch-grad-cam"),
    Method("layercam", layercam, citation="Jiang et al. 2021"),
    Method("eigencam", eigencam, needs_gradient=False, citation="Muhammad & Yeasin 2020"),
    Method("eigengradcam", eigengradcam, citation="pytorch-grad-cam"),
    Method("counterfactual", counterfactual, citation="Selvaraju et al. 2017, sec. 5"),
]}


def scale_maps(maps: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Per image: ReLU, ``(m - min) / (max + 1e-7)``, bilinear resize to ``size`` = (H, W).

    An all-zero map stays all zero (never NaN, never noise stretched to [0, 1])."""
    maps = np.maximum(np.nan_to_num(maps.astype(np.float32)), 0)
    scaled = []
    for single in maps:
        single = single - single.min()
        single = single / (single.max() + 1e-7)
        if size is not None and single.shape != tuple(size):
            single = cv2.resize(single, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        scaled.append(single)
    return np.clip(np.stack(scaled), 0.0, 1.0).astype(np.float32)


def combine_layers(per_layer: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's multi-layer aggregation: scale each, ReLU, mean, scale again."""
    scaled = [scale_maps(maps, size) for maps in per_layer]
    return scale_maps(np.mean(np.stack(scaled), axis=0))
