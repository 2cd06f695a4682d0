"""Statistics shared by the metrics: rank correlation, SSIM, bootstrap confidence intervals.

numpy and OpenCV only (no scipy), so the package keeps its small dependency list; the tests
check each against scipy/scikit-image where those are installed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (scipy's ``method='average'``)."""
    values = np.asarray(values, np.float64).ravel()
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), np.float64)
    sorted_values = values[order]
    # positions where a run of equal values starts
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # average of the 1-based ranks starts+1 .. ends
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    r"""Spearman's rank correlation :math:`\rho = \mathrm{corr}(\mathrm{rank}(a), \mathrm{rank}(b))`
    over all elements (ties: average ranks). NaN when either input is constant (no ranking)."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    r"""Mean structural similarity (Wang et al., IEEE TIP 2004) of two 2-D maps:

    .. math:: \mathrm{SSIM} = \frac{(2\mu_a\mu_b + C_1)(2\sigma_{ab} + C_2)}
              {(\mu_a^2 + \mu_b^2 + C_1)(\sigma_a^2 + \sigma_b^2 + C_2)}

    with Gaussian-weighted local statistics (window 11, sigma 1.5), :math:`C_1 = (0.01L)^2`,
    :math:`C_2 = (0.03L)^2`, L = ``data_range``; the mean over the pixels whose window lies
    inside the map (scikit-image's ``gaussian_weights=True, use_sample_covariance=False``)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def blur(image: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(image, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    pad = 5  # (window - 1) / 2: skimage crops the border its reflected padding touched
    cropped = index[pad:-pad, pad:-pad] if min(index.shape) > 2 * pad else index
    return float(cropped.mean())


def bootstrap_ci(values: Sequence, resamples: int = 2000, level: float = 0.95, seed: int = 0,
                 statistic: Callable[[np.ndarray], float] | None = None) -> tuple[float, float, float]:
    """(estimate, low, high): ``statistic`` of ``values`` (default: the mean, NaNs and Nones
    dropped) and its percentile-bootstrap ``level`` interval over ``resamples`` resamples of
    the rows, i.e. of the images (Efron & Tibshirani 1993). With a ``statistic``, ``values``
    is an array whose rows are images (MaxBoxAcc resamples the images' IoU curves). NaN for
    no values; one value gives a zero-width interval."""
    if statistic is None:
        data = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
        statistic = np.mean
    else:
        data = np.asarray(values, np.float64)
    if len(data) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(data), size=(resamples, len(data)))
    estimates = np.array([statistic(data[r]) for r in rows])
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(statistic(data)), float(low), float(high)
