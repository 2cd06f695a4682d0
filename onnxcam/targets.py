"""What to explain: targets as seed vectors over the logits.

A target is a *seed vector* ``s``: the explained score is ``s . logits`` (one-hot for a
class, any linear functional of the outputs for custom heads). Users give classes, several
classes per image, seed vectors or ``topk``; :func:`resolve_targets` turns every form into
(N, T, C) seeds and (N, T) classes (-1 for a seed vector), with clear errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import TargetError

Targets = int | Sequence[int] | Sequence[Sequence[int]] | np.ndarray | None


@dataclass(frozen=True)
class TargetSet:
    """Targets as seed vectors (N, T, C) and classes (N, T) (-1 for a seed vector);
    ``seeds`` None until the logits pick the top ``topk`` (1 for the default), or until
    ``resolver`` builds them from the model's output (dense outputs, :mod:`onnxcam.dense`,
    whose seeds have the output's shape: (N, T, *output)."""

    seeds: np.ndarray | None
    classes: np.ndarray | None
    multi: bool
    topk: int = 1
    resolver: Callable[[np.ndarray], TargetSet] | None = field(default=None, repr=False)

    def resolve(self, logits: np.ndarray) -> TargetSet:
        if self.seeds is not None:
            return self
        if self.resolver is not None:
            return self.resolver(logits)
        classes = (np.argmax(logits, axis=1)[:, None] if self.topk == 1  # the first maximum, as argsort's
                   else np.argsort(-logits, axis=1, kind="stable")[:, :self.topk])
        return TargetSet(one_hot(classes, logits.shape[1]), classes, self.multi, self.topk)


#: Each image's top-1 class, picked once the logits are known (the default target).
TOP1 = TargetSet(None, None, multi=False)


def one_hot(classes: np.ndarray, count: int) -> np.ndarray:
    """Seed vectors (..., count) with a 1 at each class."""
    seeds = np.zeros(classes.shape + (count,), np.float32)
    rows = seeds.reshape(-1, count)  # a view: flat indexing is several times faster than put_along_axis
    rows[np.arange(len(rows)), np.asarray(classes).reshape(-1)] = 1.0
    return seeds


def resolve_targets(targets: Targets, batch: int, classes: int, topk: int | None = None) -> TargetSet:
    """Targets for a batch of ``batch`` images of a ``classes``-way model as seed vectors.

    Accepted: None (each image's top-1, picked once the logits are known), a class for every
    image, one class per image (N,), several per image (N, T) (or (1, T) for all), float seed
    vectors (C,), (N, C) or (N, T, C); or ``topk`` (each image's T best classes)."""
    if topk is not None:
        if targets is not None:
            raise TargetError("give either targets or topk, not both")
        if not 1 <= int(topk) <= classes:
            raise TargetError(f"topk must be between 1 and {classes}, got {topk}")
        return TargetSet(None, None, multi=True, topk=int(topk))
    if targets is None:
        return TOP1
    try:
        values = np.asarray(targets)
    except ValueError:
        raise TargetError("targets must be a class, one class per image, or an (N, T) array of classes") from None
    if values.dtype.kind == "f":
        return _seed_vectors(values, batch, classes)
    if values.dtype.kind not in "iu" or values.ndim > 2:
        raise TargetError(f"targets must be class indices or float seed vectors, got {values.dtype} "
                          f"of shape {list(values.shape)}")
    multi = values.ndim == 2
    grid = values.reshape(-1, 1) if values.ndim < 2 else values
    if values.ndim == 0:
        grid = np.broadcast_to(grid, (batch, 1))
    if multi and len(grid) == 1:
        grid = np.broadcast_to(grid, (batch, grid.shape[1]))
    if len(grid) != batch:
        raise TargetError(f"{len(grid)} targets for a batch of {batch} images")
    bad = [int(v) for v in grid.reshape(-1) if not 0 <= v < classes]
    if bad:
        raise TargetError(f"target class {bad[0]} is out of range: the model has {classes} classes "
                          f"(0..{classes - 1})")
    grid = np.ascontiguousarray(grid, dtype=np.int64)
    return TargetSet(one_hot(grid, classes), grid, multi)


def _seed_vectors(values: np.ndarray, batch: int, classes: int) -> TargetSet:
    if values.shape[-1] != classes or values.ndim > 3:
        raise TargetError(f"a seed vector has one weight per logit ({classes}), got shape {list(values.shape)}")
    multi = values.ndim == 3
    grid = values.reshape((1, 1, classes) if values.ndim == 1 else
                          (values.shape[0], 1, classes) if values.ndim == 2 else values.shape)
    if len(grid) == 1:
        grid = np.broadcast_to(grid, (batch,) + grid.shape[1:])
    if len(grid) != batch:
        raise TargetError(f"{len(grid)} seed vectors for a batch of {batch} images")
    if not np.all(np.isfinite(grid)) or not np.all(np.abs(grid).sum(axis=-1) > 0):
        raise TargetError("a seed vector must be finite and not all zero")
    seeds = np.ascontiguousarray(grid, dtype=np.float32)
    return TargetSet(seeds, np.full(seeds.shape[:2], -1, np.int64), multi)
