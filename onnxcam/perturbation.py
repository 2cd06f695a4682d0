"""Gradient-free channel weights from extra forward runs: Score-CAM and Ablation-CAM.

Both weight the channels of the layer's activations ``A`` (N, K, h, w) by how a target score
reacts to them, and both get *every* class's logits from each run, so several targets cost
nothing extra: a target is a seed vector ``s`` and its score is ``s . logits``.

Runs are done in batches of ``batch_size`` through callables the explainer provides (one
onnxruntime session each), so memory stays bounded by one batch whatever K is.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

#: logits (B, C) for a batch of model inputs
ForwardFn = Callable[[np.ndarray], np.ndarray]
#: logits (B, C) for a batch of layer activations (NCHW) and one image's frontier tensors
HeadFn = Callable[[np.ndarray, int], np.ndarray]
#: logits (B, C) of image ``n`` times the Score-CAM masks of channels (B, h, w):
#: ``forward(x[n] * upsampled_masks(channels))``, e.g. built in the graph (:mod:`onnxcam.ingraph`)
MaskedFn = Callable[[int, np.ndarray], np.ndarray]


def bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
    """(size_out, size_in) interpolation weights of 1-D bilinear resampling with
    ``align_corners=True`` (torch ``UpsamplingBilinear2d``): output i samples input position
    ``i (size_in - 1) / (size_out - 1)``."""
    matrix = np.zeros((size_out, size_in))
    if size_in == 1 or size_out == 1:
        matrix[:, 0] = 1.0
        return matrix
    position = np.arange(size_out) * (size_in - 1) / (size_out - 1)
    low = np.minimum(np.floor(position).astype(int), size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = position - low
    np.add.at(matrix, (np.arange(size_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def upsampled_masks(activations: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Score-CAM's masks for one image: each channel (K, h, w) upsampled bilinearly
    (align_corners=True) to ``size`` and min-max normalized, ``(u - min) / (max - min + 1e-8)``."""
    rows = bilinear_matrix(size[0], activations.shape[1])
    cols = bilinear_matrix(size[1], activations.shape[2])
    up = np.einsum("Hh,khw,Ww->kHW", rows, activations.astype(np.float64), cols, optimize=True)
    low = up.min(axis=(1, 2), keepdims=True)
    high = up.max(axis=(1, 2), keepdims=True)
    return ((up - low) / (high - low + 1e-8)).astype(np.float32)


def softmax(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = scores - scores.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=axis, keepdims=True)


def highest_variance_channels(activations: np.ndarray, count: int | None) -> np.ndarray:
    """Indices of the ``count`` channels of one image (K, h, w) with the largest spatial
    variance (Faster-ScoreCAM, as tf-keras-vis ``max_N``), in channel order; all when None."""
    channels = activations.shape[0]
    if count is None or count >= channels:
        return np.arange(channels)
    spread = activations.reshape(channels, -1).var(axis=1)
    return np.sort(np.argsort(-spread, kind="stable")[:count])


def scorecam_weights(x: np.ndarray, A: np.ndarray, seeds: np.ndarray, forward: ForwardFn | None,
                     layout: str = "NCHW", batch_size: int = 16,
                     max_channels: int | None = None, masked: MaskedFn | None = None) -> np.ndarray:
    r"""Score-CAM (Wang et al., "Score-CAM: Score-Weighted Visual Explanations for CNNs",
    CVPRW 2020), as pytorch-grad-cam:

    .. math:: M_k = \mathrm{norm}(\mathrm{up}(A_k)),\quad
              S_k = s \cdot f(x \odot M_k),\quad w = \mathrm{softmax}_k(S)

    ``x`` is the preprocessed batch in the model's ``layout``, ``A`` (N, K, h, w), ``seeds``
    (N, T, C). Returns weights (N, T, K); with ``max_channels`` only that many highest-variance
    channels are scored and softmaxed, the others weigh 0 (Faster-ScoreCAM).

    Channels with the same mask give the same masked input, so each distinct mask is run once
    (:func:`distinct_masks`): every spatially constant channel has the all-zero mask
    (``up(c) - min = 0``), and after the last ReLU of a CNN many channels are all zero (on the
    MobileNets 9-34 % of them on photos, 64-75 % on a black image). Masks are built one batch
    at a time, so memory is bounded by a batch whatever K is. ``masked`` scores a batch of
    masks directly (the masked images never reach Python); by default they are built here
    and run through ``forward``.
    """
    if masked is None:
        size = x.shape[2:4] if layout == "NCHW" else x.shape[1:3]

        def masked(n: int, channels: np.ndarray) -> np.ndarray:
            return forward(_masked(x[n], upsampled_masks(channels, size), layout))
    weights = np.zeros(seeds.shape[:2] + (A.shape[1],), np.float32)
    for n in range(len(x)):
        kept = highest_variance_channels(A[n], max_channels)
        distinct, which = distinct_masks(A[n][kept])
        logits = np.concatenate([masked(n, distinct[start:start + batch_size])
                                 for start in range(0, len(distinct), batch_size)])
        scores = target_scores(logits, seeds[n])[which]  # (kept, T): each channel gets its mask's score
        weights[n][:, kept] = softmax(scores.T.astype(np.float64), axis=-1)
    return weights


def target_scores(outputs: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """``s_t . y_b`` for outputs (B, ...) and seeds (T, ...) of one shape: (B, T). Logits
    (B, C) and seed vectors (T, C), or dense outputs and seeds of their shape
    (:mod:`onnxcam.dense`), flattened."""
    return outputs.reshape(len(outputs), -1) @ seeds.reshape(len(seeds), -1).T


def distinct_masks(activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct Score-CAM masks of one image's channels (K, h, w), as channels whose
    :func:`upsampled_masks` are those masks, and for each channel the index of its own.

    A spatially constant channel's mask is all zero by definition (its min-max normalization
    has a zero numerator), so such channels become one zero channel: it is computed exactly
    zero, where upsampling a constant in floating point could leave last-bit ripples that the
    ``1e-8`` in the normalization would not remove (up to 2e-7 for MobileNet v2's channel
    saturated at 6 on a black image). Bit-identical channels share a mask too.
    """
    flat = activations.reshape(len(activations), -1)
    constant = flat.min(axis=1) == flat.max(axis=1)
    keys = np.where(constant[:, None], np.zeros_like(flat), flat)
    unique, which = np.unique(keys, axis=0, return_inverse=True)
    return unique.reshape((-1,) + activations.shape[1:]), which.reshape(-1)


def _masked(image: np.ndarray, masks: np.ndarray, layout: str) -> np.ndarray:
    """One image times each mask (B, H, W): a batch (B, ...) in the model's layout."""
    masks = masks[:, None] if layout == "NCHW" else masks[..., None]
    return np.ascontiguousarray(image[None] * masks, dtype=np.float32)


def ablation_value(activations: np.ndarray) -> float:
    """What an ablated channel is set to (pytorch-grad-cam's AblationLayer): 0 when the
    image's activations have minimum 0 (post-ReLU), else ``min(A) - 1e7``."""
    low = float(activations.min())
    return 0.0 if low == 0 else low - 1e7


def ablationcam_weights(A: np.ndarray, seeds: np.ndarray, head: HeadFn,
                        batch_size: int = 32) -> np.ndarray:
    r"""Ablation-CAM (Desai & Ramaswamy, WACV 2020), as pytorch-grad-cam:

    .. math:: w_k = (y - y_k) / y

    where ``y = s . head(A)`` and ``y_k`` the same with channel k ablated (see
    :func:`ablation_value`). ``head(batch, n)`` returns the logits for activations of image
    ``n`` (the rest of the network after the layer, fed that image's frontier). ``A``
    (N, K, h, w), ``seeds`` (N, T, C); returns (N, T, K). Where ``y = 0`` the weights are
    ``y - y_k`` (the drop itself) instead of a division by zero.
    """
    channels = A.shape[1]
    weights = np.zeros(seeds.shape[:2] + (channels,), np.float32)
    for n in range(len(A)):
        value = ablation_value(A[n])
        original = target_scores(head(A[n][None], n), seeds[n])[0]  # (T,)
        ablated = []
        for start in range(0, channels, batch_size):
            indices = np.arange(start, min(start + batch_size, channels))
            batch = np.repeat(A[n][None], len(indices), axis=0)
            batch[np.arange(len(indices)), indices] = value
            ablated.append(target_scores(head(batch, n), seeds[n]))
        drops = original[None, :] - np.concatenate(ablated)  # (K, T)
        scale = np.where(original != 0, original, 1.0)
        weights[n] = (drops / scale).T
    return weights
