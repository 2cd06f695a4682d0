r"""ROAD: RemOve And Debias (Rong et al., "A Consistent and Efficient Evaluation Strategy for
Attribution Methods", ICML 2022), as pytorch-grad-cam's ``metrics/road.py`` defines it.

For a percentile p of the map's values, *most relevant first* (MoRF) keeps the pixels whose
value is below the p-th percentile and imputes the others; *least relevant first* (LeRF)
does the same on ``1 - map``. Imputation is the noisy linear imputer: every removed pixel
equals the weighted mean of its 8 neighbours (weights 1/6 for the 4 direct, 1/12 for the
diagonal ones, image borders dropping theirs),

.. math:: \sum_{j \in N(i)} w_{ij} (x_i - x_j) = 0 \quad \text{for every removed } i,

solved per channel, plus Gaussian noise of standard deviation 0.01. A metric value is the
score change ``f_c(imputed) - f_c(x)``; the averages run over ``percentiles`` (10, ..., 90)
and ``ROADCombined = (LeRF - MoRF) / 2``: higher is better.

pytorch-grad-cam solves the sparse system with scipy's LU. scipy is not a dependency of
onnxcam: when it is importable (``solver="auto"``) the system is solved the same way, exactly,
with one sparse LU factorization for all channels; otherwise (``solver="cg"``) with
Jacobi-preconditioned conjugate gradients on the same symmetric positive (semi-)definite
system, in numpy, all channels at once, started from the same problem solved on a grid half
as fine, to a relative residual of ``tolerance`` (default 1e-4: the imputed values then differ
from the exact solve by up to about the imputer's own noise, 1.2e-2 at most over ROAD's 18
masks of a 224x224 photo in [-1, 1]; ``tools/bench_road_imputer.py`` measures it and times
both, ``tools/check_evaluation.py`` compares with pytorch-grad-cam's solve). Every
8-connected removed region touches a kept pixel unless the whole image is removed; then there
is no data to interpolate and the image becomes 0 (the minimum-norm solution, where the
system's matrix is singular).
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

from ..errors import OnnxcamError
from .scoring import ScoreModel

#: (dy, dx) -> weight, pytorch-grad-cam's ``neighbors_weights``
NEIGHBOURS = (((1, 1), 1 / 12), ((0, 1), 1 / 6), ((-1, 1), 1 / 12), ((1, -1), 1 / 12),
              ((0, -1), 1 / 6), ((-1, -1), 1 / 12), ((1, 0), 1 / 6), ((-1, 0), 1 / 6))
PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)
SOLVERS = ("auto", "scipy", "cg")

Solver = Literal["auto", "scipy", "cg"]


def scipy_available() -> bool:
    """Whether the exact sparse solve can run (scipy is optional)."""
    try:
        import scipy.sparse.linalg  # noqa: F401
    except ImportError:
        return False
    return True


def _shift(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``out[..., y, x] = array[..., y + dy, x + dx]``, zero outside the image."""
    out = np.zeros_like(array)
    height, width = array.shape[-2:]
    ys, yd = (slice(dy, height), slice(0, height - dy)) if dy >= 0 else (slice(0, height + dy), slice(-dy, height))
    xs, xd = (slice(dx, width), slice(0, width - dx)) if dx >= 0 else (slice(0, width + dx), slice(-dx, width))
    out[..., yd, xd] = array[..., ys, xs]
    return out


def linear_impute(image: np.ndarray, keep: np.ndarray, noise: float = 0.01,
                  rng: np.random.Generator | None = None, tolerance: float = 1e-4,
                  max_iterations: int = 5000, solver: Solver = "auto") -> np.ndarray:
    """``image`` (C, H, W) with the pixels where ``keep`` (H, W) is False imputed (see the
    module docstring). ``solver``: "scipy" (exact sparse LU), "cg" (numpy conjugate
    gradients to ``tolerance``, at most ``max_iterations``) or "auto" (scipy when importable)."""
    if solver not in SOLVERS:
        raise OnnxcamError(f"unknown ROAD imputation solver '{solver}': choose one of {', '.join(SOLVERS)}")
    if solver == "scipy" and not scipy_available():
        raise OnnxcamError("ROAD imputation solver 'scipy' needs scipy (pip install scipy), which is not importable")
    image = np.asarray(image, np.float64)
    keep = np.asarray(keep, bool)
    unknown = ~keep
    if not unknown.any():
        return image.astype(np.float32)
    if not keep.any():
        solution = np.zeros_like(image)
    elif solver != "cg" and scipy_available():
        solution = _sparse_solve(image, keep)
    else:
        solution = _conjugate_gradients(image, keep, tolerance, max_iterations)
    if noise:
        rng = rng or np.random.default_rng(0)
        solution = solution + noise * rng.standard_normal(solution.shape) * unknown
    return np.where(unknown, solution, image).astype(np.float32)


def _degree(shape: tuple[int, int]) -> np.ndarray:
    """Every pixel's sum of neighbour weights inside the image (the system's diagonal)."""
    inside = np.ones(shape)
    return sum(w * _shift(inside, dy, dx) for (dy, dx), w in NEIGHBOURS)


def _sparse_solve(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The exact solve (C, H, W), 0 at kept pixels: one row per removed pixel, ``degree`` on
    the diagonal, ``-w`` towards removed neighbours, ``w x_j`` of kept neighbours on the right,
    factorized once for all channels. ``keep`` has a kept pixel."""
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    height, width = keep.shape
    solution = np.zeros_like(image)
    ys, xs = np.nonzero(~keep)
    index = np.full(keep.shape, -1, np.int64)
    index[ys, xs] = np.arange(len(ys))
    rows, cols, values = [np.arange(len(ys))], [np.arange(len(ys))], [_degree(keep.shape)[ys, xs]]
    rhs = np.zeros((len(ys), image.shape[0]))
    for (dy, dx), w in NEIGHBOURS:
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        source, ny, nx = np.nonzero(inside)[0], ny[inside], nx[inside]
        kept = keep[ny, nx]
        rhs[source[kept]] += w * image[:, ny[kept], nx[kept]].T
        rows.append(source[~kept])
        cols.append(index[ny[~kept], nx[~kept]])
        values.append(np.full(int((~kept).sum()), -w))
    matrix = csc_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(len(ys), len(ys)))
    # symmetric positive definite (diagonally dominant, strictly next to a kept pixel, which
    # every removed region touches): no pivoting is needed, and a symmetric fill-reducing
    # order factorizes ~2x faster than the default COLAMD at 90 % removed, 224x224
    factors = splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    solution[:, ys, xs] = factors.solve(rhs).T
    return solution


def _conjugate_gradients(image: np.ndarray, keep: np.ndarray, tolerance: float,
                         max_iterations: int) -> np.ndarray:
    """The iterative solve (C, H, W) to a relative residual of ``tolerance``."""
    unknown = ~keep
    degree = _degree(keep.shape)
    known = image * keep
    rhs = sum(w * _shift(known, dy, dx) for (dy, dx), w in NEIGHBOURS) * unknown

    height, width = keep.shape
    padded = np.zeros((image.shape[0], height + 2, width + 2))

    def operator(v: np.ndarray) -> np.ndarray:  # M v = degree v - sum_j w v_j over removed j
        padded[:, 1:-1, 1:-1] = v  # neighbours read as views of one zero-bordered copy
        total = degree * v
        for (dy, dx), w in NEIGHBOURS:
            total -= w * padded[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
        return total * unknown

    solution = _initial_guess(image, keep, tolerance) * unknown
    preconditioner = np.where(unknown, 1.0 / degree, 0.0)
    residual = rhs - operator(solution)
    z = preconditioner * residual
    direction = z.copy()
    rz = (residual * z).sum(axis=(1, 2))
    scale = np.maximum(np.sqrt((rhs * rhs).sum(axis=(1, 2))), 1e-30)
    for _ in range(max_iterations):
        if np.all(np.sqrt((residual * residual).sum(axis=(1, 2))) <= tolerance * scale):
            break
        applied = operator(direction)
        denominator = (direction * applied).sum(axis=(1, 2))
        alpha = np.where(denominator > 0, rz / np.where(denominator > 0, denominator, 1), 0.0)
        solution += alpha[:, None, None] * direction
        residual -= alpha[:, None, None] * applied
        z = preconditioner * residual
        rz_next = (residual * z).sum(axis=(1, 2))
        beta = np.where(rz > 0, rz_next / np.where(rz > 0, rz, 1), 0.0)
        direction = z + beta[:, None, None] * direction
        rz = rz_next
    return solution


def _initial_guess(image: np.ndarray, keep: np.ndarray, tolerance: float) -> np.ndarray:
    """Nested iteration: the same problem solved on a grid half as fine (a coarse pixel is kept
    when any of its 2x2 pixels is, with their mean), upsampled; CG then only removes the
    fine-scale error, in a fraction of the iterations a cold start needs."""
    height, width = keep.shape
    if min(height, width) < 16:
        return np.zeros_like(image)
    size = ((width + 1) // 2, (height + 1) // 2)
    share = cv2.resize(keep.astype(np.float64), size, interpolation=cv2.INTER_AREA)
    sums = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_AREA) for c in image * keep])
    coarse_keep = share > 0
    coarse = np.where(coarse_keep, sums / np.maximum(share, 1e-12), 0.0)
    solved = linear_impute(coarse, coarse_keep, noise=0.0, tolerance=tolerance, solver="cg").astype(np.float64)
    return np.stack([cv2.resize(c, (width, height), interpolation=cv2.INTER_LINEAR) for c in solved])


def road_keep_mask(heatmap: np.ndarray, percentile: float, most_relevant_first: bool) -> np.ndarray:
    """Pixels kept at ``percentile``: pytorch-grad-cam's ``mask < np.percentile(mask, p)`` on
    the map (MoRF) or on ``1 - map`` (LeRF)."""
    values = heatmap if most_relevant_first else 1.0 - heatmap
    return values < np.percentile(values, percentile)


def road(model: ScoreModel, image: np.ndarray, heatmap: np.ndarray, target: int,
         percentiles=PERCENTILES, noise: float = 0.01, seed: int = 0,
         original: float | None = None) -> dict[str, float]:
    """ROAD of one image (C, H, W) and its map (H, W): ``morf`` and ``lerf`` (score changes
    averaged over the percentiles) and ``combined = (lerf - morf) / 2``. Runs
    ``2 len(percentiles)`` perturbed inputs as one batch."""
    rng = np.random.default_rng(seed)
    batch = [linear_impute(image, road_keep_mask(heatmap, p, most), noise, rng)
             for most in (True, False) for p in percentiles]
    if original is None:
        original = float(model(image[None], target)[0])
    changes = model(np.stack(batch), target) - original
    morf, lerf = float(changes[:len(percentiles)].mean()), float(changes[len(percentiles):].mean())
    return {"morf": morf, "lerf": lerf, "combined": (lerf - morf) / 2.0}
