"""Pixel-space attributions from gradients with respect to the input.

The rewritten model returns ``d score / d x`` (``RewriteRequest(input_gradient=True)``, with
``relu="guided"`` for guided backpropagation); the functions here choose where to evaluate it
and how to combine it. ``gradient(points, seed)`` is the explainer's callable returning the
input gradients (B, ...) of the score ``seed . logits`` at a batch of inputs.

Map scaling, one rule for every pixel-space method: the attribution (N, C, H, W) becomes
``max_c |a_c|`` per pixel (Simonyan et al.'s rule for colour images; captum's ``Saliency``
takes the same absolute value, its visualizer sums channels instead), then the shared
per-image min-max scaling (:func:`onnxcam.methods.scale_maps`) brings it to [0, 1]. A constant
attribution (e.g. all zero) becomes an all-zero map, never NaN.

Guided backpropagation guides every rectifier: Relu and Clip with a lower bound of 0 (ReLU6),
see :func:`onnxcam.surgery.rules_for`; pytorch-grad-cam and captum only guide ``nn.ReLU``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

#: input gradients (B, ...) of ``seed . logits`` at a batch of model inputs (B, ...)
GradientFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def pixel_map(attribution: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    r"""(N, C, H, W) or (N, H, W, C) -> (N, H, W): :math:`\max_c |a_c|`."""
    axis = 1 if layout == "NCHW" else 3
    return np.abs(attribution).max(axis=axis)


def averaged_gradient(points: Iterator[np.ndarray], seed: np.ndarray, gradient: GradientFn) -> np.ndarray:
    """The mean input gradient over batches of points (each (B, ...)) for one seed vector."""
    total, count = None, 0
    for batch in points:
        grads = gradient(batch, np.repeat(seed[None], len(batch), axis=0)).astype(np.float64)
        total = grads.sum(axis=0) if total is None else total + grads.sum(axis=0)
        count += len(batch)
    return (total / count).astype(np.float32)


def noisy_copies(image: np.ndarray, samples: int, noise: float, rng: np.random.Generator,
                 batch_size: int) -> Iterator[np.ndarray]:
    """Batches of ``image + N(0, sigma^2)``, ``sigma = noise * (max(image) - min(image))``."""
    sigma = noise * float(image.max() - image.min())
    for start in range(0, samples, batch_size):
        count = min(batch_size, samples - start)
        yield (image[None] + rng.normal(0.0, sigma, (count,) + image.shape)).astype(np.float32)


def path_points(image: np.ndarray, baseline: np.ndarray, steps: int, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of ``baseline + (k / m)(image - baseline)`` for k = 1..m (right Riemann sum)."""
    for start in range(1, steps + 1, batch_size):
        alphas = np.arange(start, min(start + batch_size, steps + 1), dtype=np.float64) / steps
        shape = (-1,) + (1,) * image.ndim
        yield (baseline[None] + alphas.reshape(shape) * (image - baseline)[None]).astype(np.float32)


def smoothgrad(x: np.ndarray, seeds: np.ndarray, gradient: GradientFn, samples: int = 25,
               noise: float = 0.15, batch_size: int = 16, seed: int = 0) -> np.ndarray:
    r"""SmoothGrad (Smilkov et al. 2017, "SmoothGrad: removing noise by adding noise"):
    :math:`\hat M(x) = \frac{1}{n}\sum_{i=1}^{n} \nabla_x S(x + \epsilon_i)`,
    :math:`\epsilon_i \sim N(0, \sigma^2)`, :math:`\sigma` = ``noise`` times the image's value
    range (the paper's 10-20 %). ``seeds`` (N, T, C); returns gradients (N, T, ...). The same
    noise draws serve every target of an image; ``seed`` makes the draws reproducible."""
    out = np.zeros(seeds.shape[:2] + x.shape[1:], np.float32)
    for n in range(len(x)):
        for t in range(seeds.shape[1]):
            rng = np.random.default_rng([seed, n])
            out[n, t] = averaged_gradient(noisy_copies(x[n], samples, noise, rng, batch_size),
                                          seeds[n, t], gradient)
    return out


def integrated_gradients(x: np.ndarray, seeds: np.ndarray, gradient: GradientFn, steps: int = 50,
                         baseline: float | np.ndarray = 0.0, batch_size: int = 16) -> np.ndarray:
    r"""Integrated Gradients (Sundararajan et al., ICML 2017; the right Riemann sum):

    .. math:: IG_i(x) = (x_i - x'_i) \frac{1}{m}\sum_{k=1}^{m}
              \frac{\partial S(x' + \tfrac{k}{m}(x - x'))}{\partial x_i}

    ``baseline`` x' in the model's input space (a number, an image, or a batch like ``x``;
    0 = captum's default zeros). Completeness: the attributions sum to about
    ``S(x) - S(x')``. ``seeds`` (N, T, C); returns attributions (N, T, ...)."""
    base = np.broadcast_to(np.asarray(baseline, np.float32), x.shape)
    out = np.zeros(seeds.shape[:2] + x.shape[1:], np.float32)
    for n in range(len(x)):
        for t in range(seeds.shape[1]):
            mean = averaged_gradient(path_points(x[n], base[n], steps, batch_size), seeds[n, t], gradient)
            out[n, t] = (x[n] - base[n]) * mean
    return out


def guided_gradcam(guided: np.ndarray, cam: np.ndarray, layout: str = "NCHW") -> np.ndarray:
    r"""Guided Grad-CAM (Selvaraju et al., ICCV 2017): guided backpropagation times the
    Grad-CAM map upsampled to the input, :math:`G^{gb} \odot L^c` per colour channel.
    ``guided`` (B, ...) input gradients, ``cam`` (B, H, W) in [0, 1]."""
    return guided * (cam[:, None] if layout == "NCHW" else cam[..., None])
