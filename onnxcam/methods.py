"""Stage 4: turn activations A and gradients G into class activation maps.

Every activation-space method is a formula on NCHW arrays, A, G of shape (N, K, h, w), where
G = d score / d A and score = ``sum(seed * logits)`` (the raw, pre-softmax logit of the target
class for a one-hot seed). As in pytorch-grad-cam, a method is either

* a *channel weighting* ``w (N, K)``: the map is ``sum_k w_k A_k`` (Grad-CAM, Grad-CAM++,
  XGrad-CAM, counterfactual; CAM, Score-CAM and Ablation-CAM get their weights from the graph
  or from extra runs, see :mod:`onnxcam.head` and :mod:`onnxcam.perturbation`), or
* *per-position terms* ``T (N, K, h, w)``: the map is ``sum_k T_k`` (HiResCAM, element-wise
  Grad-CAM, LayerCAM), or
* a *projection*: the first principal component of a (N, K, h, w) array (Eigen-CAM,
  Eigen-Grad-CAM).

``eigen_smooth`` (pytorch-grad-cam) replaces the channel sum of the weighted activations
``w_k A_k`` (or of the terms) by their first principal component; the projection methods
ignore it, as there.

Scaling to [0, 1] and resizing is shared (:func:`scale_maps`) and follows pytorch-grad-cam, so
maps are comparable with it: ReLU, per-image ``(m - min) / (max + 1e-7)``, bilinear resize;
with several layers, each is scaled, then ReLU, mean over layers, scaled again.

Pixel-space methods (saliency, SmoothGrad, guided backprop, guided Grad-CAM, Integrated
Gradients) live in :mod:`onnxcam.pixel`; they are registered here too so that every method
name is in :data:`METHODS`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .errors import OnnxcamWarning

ArrayFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
MapFn = ArrayFn

#: How a method gets what it needs: "gradient" (A and G from one forward + backward),
#: "activation" (A only), "graph" (A and weights read from the classifier head),
#: "perturbation" (A and extra forward runs), "pixel" (gradients w.r.t. the input),
#: "attention" (every self-attention's probabilities, and their gradients: :mod:`onnxcam.attention`).
KINDS = ("gradient", "activation", "graph", "perturbation", "pixel", "attention")


# -- channel weightings -----------------------------------------------------------------------

def gradcam_weights(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Grad-CAM (Selvaraju et al., ICCV 2017): :math:`w_k = \frac{1}{hw}\sum_{ij} G_{kij}`."""
    return G.mean(axis=(2, 3))


def counterfactual_weights(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Counterfactual Grad-CAM (Selvaraju et al. 2017, sec. 5): :math:`w_k = -\frac{1}{hw}\sum_{ij} G_{kij}`;
    highlights regions whose removal would raise the class score."""
    return -G.mean(axis=(2, 3))


def gradcam_plus_plus_weights(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Grad-CAM++ (Chattopadhay et al., WACV 2018, with an exponential score, as
    pytorch-grad-cam): :math:`\alpha = G^2 / (2G^2 + \sum_{ab} A_k \cdot G^3 + 10^{-6})`
    (0 where G = 0), :math:`w_k = \sum_{ij} \mathrm{relu}(G)\,\alpha`."""
    g2 = G ** 2
    denominator = 2 * g2 + A.sum(axis=(2, 3), keepdims=True) * (g2 * G) + 1e-6  # g2*G: numpy's float32 G**3 is ~500x slower
    alpha = np.where(G != 0, g2 / np.where(G != 0, denominator, 1.0), 0.0)
    return (np.maximum(G, 0) * alpha).sum(axis=(2, 3))


def xgradcam_weights(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""XGrad-CAM (Fu et al., BMVC 2020): :math:`w_k = \sum_{ij} G A / (\sum_{ij} A + 10^{-7})`."""
    return (G * A).sum(axis=(2, 3)) / (A.sum(axis=(2, 3)) + 1e-7)


# -- per-position terms -----------------------------------------------------------------------

def hirescam_terms(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""HiResCAM (Draelos & Carin 2020): :math:`L = \sum_k G_k \odot A_k` (no pooling)."""
    return G * A


def gradcam_elementwise_terms(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Element-wise Grad-CAM (pytorch-grad-cam): :math:`L = \sum_k \mathrm{relu}(G_k \odot A_k)`."""
    return np.maximum(G * A, 0)


def layercam_terms(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""LayerCAM (Jiang et al., TIP 2021): :math:`L = \sum_k \mathrm{relu}(G_k) \odot A_k`."""
    return np.maximum(G, 0) * A


def eigengradcam_matrix(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Eigen-Grad-CAM (pytorch-grad-cam): the first principal component of G * A."""
    return G * A


def eigencam_matrix(A: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020): first principal component of A;
    class-agnostic (the targets only change what ``Explanation.targets`` reports)."""
    return A


# -- shared maths ------------------------------------------------------------------------------

def weighted_activations(weights: np.ndarray, A: np.ndarray) -> np.ndarray:
    """``w_k A_k`` per channel: (N, K) x (N, K, h, w) -> (N, K, h, w)."""
    return weights[:, :, None, None] * A


def weighted_sum(weights: np.ndarray, A: np.ndarray) -> np.ndarray:
    r""":math:`\sum_k w_k A_k`: (N, K) x (N, K, h, w) -> (N, h, w), the channel sum of
    :func:`weighted_activations` without building them (one contraction: in the graph one
    MatMul, :meth:`onnxcam.autodiff.Emitter.einsum`, ~5x faster than Mul + ReduceSum over
    MobileNetV2's 1280 x 7 x 7)."""
    return np.einsum("nk,nkhw->nhw", weights, A)


def first_principal_component(X: np.ndarray) -> np.ndarray:
    r"""Projection of each image's (hw, K) matrix on its first principal component, (N, h, w).

    As pytorch-grad-cam's ``get_2d_projection``: NaN -> 0, :math:`M = X - \bar X` (channel
    means over positions), :math:`M = U S V^T`, map :math:`= M v_1`. Economy SVD (never the
    hw x hw one). The sign of a singular vector is arbitrary (and in pytorch-grad-cam depends
    on the BLAS build); it is fixed so the map correlates positively with the mean over
    channels, so bright regions are where the array is large.
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


# -- the registry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A named method: its kind (see :data:`KINDS`) and, for activation-space methods, the
    formula as a channel weighting, per-position terms or a matrix to project."""

    name: str
    kind: str
    citation: str = ""
    weights: ArrayFn | None = None
    terms: ArrayFn | None = None
    projection: ArrayFn | None = None

    @property
    def needs_gradient(self) -> bool:
        """Whether the gradient at the layer is needed (pixel methods need the input's)."""
        return self.kind == "gradient"

    @property
    def activation_space(self) -> bool:
        """Maps built from the layer's activations (all but the pixel-space and attention methods)."""
        return self.kind not in ("pixel", "attention")

    @property
    def weights_channels(self) -> bool:
        """Whether the map is ``sum_k w_k A_k`` for channel weights ``w``."""
        return self.weights is not None or self.kind in ("graph", "perturbation")

    def raw_map(self, A: np.ndarray, G: np.ndarray | None = None, weights: np.ndarray | None = None,
                eigen_smooth: bool = False) -> np.ndarray:
        """The unscaled map (N, h, w): the channel sum of the weighted activations or terms, or
        with ``eigen_smooth`` their first principal component. ``weights`` (N, K) are given
        for the methods that do not compute them from (A, G)."""
        if self.projection is not None:
            return first_principal_component(self.projection(A, G))
        if weights is None and self.weights is not None:
            weights = self.weights(A, G)
        if weights is not None and not eigen_smooth:
            return weighted_sum(weights, A)
        return reduce_channels(self.contributions(A, G, weights), eigen_smooth)

    def contributions(self, A: np.ndarray, G: np.ndarray | None = None,
                      weights: np.ndarray | None = None) -> np.ndarray:
        """Per-channel contributions (N, K, h, w) whose channel sum is the map."""
        if weights is None and self.weights is not None:
            weights = self.weights(A, G)
        if weights is not None:
            return weighted_activations(weights, A)
        if self.terms is None:
            raise ValueError(f"method '{self.name}' needs channel weights")
        return self.terms(A, G)

    def channel_weights(self, A: np.ndarray, G: np.ndarray | None) -> np.ndarray:
        """The channel weights (N, K) of a weighting method computable from (A, G)."""
        if self.weights is None:
            raise ValueError(f"method '{self.name}' has no channel weights computable from A and G")
        return self.weights(A, G)

    def fn(self, A: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
        """The raw map from (A, G), for the methods that need nothing else."""
        return self.raw_map(A, G)


def reduce_channels(contributions: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """(N, K, h, w) -> (N, h, w): the channel sum, or the first principal component."""
    if eigen_smooth:
        return first_principal_component(contributions)
    return contributions.sum(axis=1)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("cam", "graph", "Zhou et al., CVPR 2016"),
    Method("gradcam", "gradient", "Selvaraju et al., ICCV 2017", weights=gradcam_weights),
    Method("gradcam++", "gradient", "Chattopadhay et al., WACV 2018", weights=gradcam_plus_plus_weights),
    Method("xgradcam", "gradient", "Fu et al., BMVC 2020", weights=xgradcam_weights),
    Method("hirescam", "gradient", "Draelos & Carin 2020", terms=hirescam_terms),
    Method("gradcam-elementwise", "gradient", "pytorch-grad-cam", terms=gradcam_elementwise_terms),
    Method("layercam", "gradient", "Jiang et al., TIP 2021", terms=layercam_terms),
    Method("eigencam", "activation", "Muhammad & Yeasin, IJCNN 2020", projection=eigencam_matrix),
    Method("eigengradcam", "gradient", "pytorch-grad-cam", projection=eigengradcam_matrix),
    Method("scorecam", "perturbation", "Wang et al., CVPRW 2020"),
    Method("ablationcam", "perturbation", "Desai & Ramaswamy, WACV 2020"),
    Method("saliency", "pixel", "Simonyan et al., ICLR workshop 2014"),
    Method("smoothgrad", "pixel", "Smilkov et al. 2017"),
    Method("guided-backprop", "pixel", "Springenberg et al., ICLR workshop 2015"),
    Method("guided-gradcam", "pixel", "Selvaraju et al., ICCV 2017"),
    Method("integrated-gradients", "pixel", "Sundararajan et al., ICML 2017"),
    Method("counterfactual", "gradient", "Selvaraju et al. 2017, sec. 5", weights=counterfactual_weights),
    Method("rollout", "attention", "Abnar & Zuidema, ACL 2020"),
    Method("gradient-rollout", "attention", "Chefer, Gur & Wolf, ICCV 2021"),
]}


# -- the classic names, as maps ---------------------------------------------------------------

def gradcam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    r"""Grad-CAM map :math:`\sum_k w_k A_k`, :math:`w_k = \mathrm{mean}_{ij} G_k`."""
    return METHODS["gradcam"].raw_map(A, G)


def counterfactual(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Counterfactual Grad-CAM map: Grad-CAM with negated gradients."""
    return METHODS["counterfactual"].raw_map(A, G)


def gradcam_plus_plus(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Grad-CAM++ map (see :func:`gradcam_plus_plus_weights`)."""
    return METHODS["gradcam++"].raw_map(A, G)


def xgradcam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """XGrad-CAM map (see :func:`xgradcam_weights`)."""
    return METHODS["xgradcam"].raw_map(A, G)


def hirescam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """HiResCAM map (see :func:`hirescam_terms`)."""
    return METHODS["hirescam"].raw_map(A, G)


def gradcam_elementwise(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Element-wise Grad-CAM map (see :func:`gradcam_elementwise_terms`)."""
    return METHODS["gradcam-elementwise"].raw_map(A, G)


def layercam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """LayerCAM map (see :func:`layercam_terms`)."""
    return METHODS["layercam"].raw_map(A, G)


def eigencam(A: np.ndarray, G: np.ndarray | None = None) -> np.ndarray:
    """Eigen-CAM map (see :func:`eigencam_matrix`)."""
    return first_principal_component(A)


def eigengradcam(A: np.ndarray, G: np.ndarray) -> np.ndarray:
    """Eigen-Grad-CAM map (see :func:`eigengradcam_matrix`)."""
    return first_principal_component(G * A)


# -- scaling ----------------------------------------------------------------------------------

def scale_maps(maps: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Per image: ReLU, ``(m - min) / (max + 1e-7)``, bilinear resize to ``size`` = (H, W)
    (``cv2.resize`` per map, as pytorch-grad-cam's ``scale_cam_image``).

    An all-zero map stays all zero (never NaN, never noise stretched to [0, 1])."""
    maps = np.array(maps, dtype=np.float32)  # a copy: everything below is in place
    if not np.isfinite(maps).all():
        np.nan_to_num(maps, copy=False)
    np.maximum(maps, 0, out=maps)
    maps -= maps.min(axis=(1, 2), keepdims=True)
    maps /= maps.max(axis=(1, 2), keepdims=True) + np.float32(1e-7)
    if size is not None and maps.shape[1:] != tuple(size):
        resized = np.empty((len(maps),) + tuple(size), np.float32)
        for single, out in zip(maps, resized):
            out[...] = cv2.resize(single, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        maps = resized
    return np.clip(maps, 0.0, 1.0, out=maps)


def combine_layers(per_layer: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's multi-layer aggregation: scale each, ReLU, mean, scale again."""
    scaled = [scale_maps(maps, size) for maps in per_layer]
    mean = scaled[0] if len(scaled) == 1 else np.mean(np.stack(scaled), axis=0)
    return scale_maps(mean)


def warn_empty_maps(maps: np.ndarray, method: str, layers: Sequence[str],
                    activations: dict[str, np.ndarray] | None = None,
                    gradients: dict[str, np.ndarray] | None = None) -> None:
    """An :class:`~onnxcam.errors.OnnxcamWarning` per all-zero map of a batch (N, T, H, W),
    saying why when it can: the activations (N, K, h, w) are zero, or the gradients
    (N, T, K, h, w) of the target's score are; else no part of the layer speaks for the
    target (every weighted activation is <= 0, which the ReLU of the map zeroes).

    The zero map is right in each case, and the scaling keeps it zero (:func:`scale_maps`);
    the warning says why the overlay shows nothing."""
    flat = maps.reshape(maps.shape[0], maps.shape[1], -1)
    if flat.shape[-1] and (flat.max(axis=-1) > 0).all():
        return  # the usual case, without the per-map Python below
    where = ", ".join(layers)
    empty = ~(flat > 0).any(axis=-1)
    for image, target in zip(*np.nonzero(empty)):
        if activations and not any(A[image].any() for A in activations.values()):
            why = f"the activation at {where} is zero"
        elif gradients and not any(G[image, min(target, G.shape[1] - 1)].any() for G in gradients.values()):
            why = f"the gradient of the target's score at {where} is zero"
        else:
            why = f"nothing at {where} speaks for the target (zero or negative evidence everywhere)"
        which = f"image {image}" + (f", target {target}" if maps.shape[1] > 1 else "")
        warnings.warn(f"the {method} map of {which} is all zero: {why}; try another layer, target or method",
                      OnnxcamWarning, stacklevel=3)
