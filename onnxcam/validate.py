"""Checks of the user's requests that the API and the CLI share, each one clear error.

What the model must offer (a class-score vector to explain), which providers exist, whether
numbers that come back are usable (non-finite logits are reported per image, never drawn as
maps), and results as strict JSON (no ``NaN``, which most parsers reject).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .model import ModelGraph


def check_class_scores(graph: ModelGraph, name: str) -> None:
    """The explained output must be a class-score vector [N, C]: one score per class (a single
    score [N, 1] is explained as it is). Other ranks (a feature map, a per-pixel output) are
    refused, naming the outputs that are."""
    dims = graph.dims(name)
    if dims is None or len(dims) == 2:
        return
    shape = "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"
    kind = "a feature map" if len(dims) == 4 else f"a {len(dims)}-D tensor"
    vectors = [o.name for o in graph.outputs if len(graph.dims(o.name) or ()) == 2]
    hint = (f"choose one with output= (CLI: --output): {', '.join(vectors)}" if vectors else
            "export the model with its classifier's logits as an output")
    flatten = " (a [N, C, 1, 1] output: add a Flatten)" if len(dims) == 4 and dims[2:] == (1, 1) else ""
    raise ModelError(f"{graph.source}: output '{name}' is {kind} {shape}{flatten}, not a class-score "
                     f"vector [N, C]; onnxcam explains one score per class: {hint}")


def finite_rows(logits: np.ndarray) -> np.ndarray:
    """(N,) True where an image's logits are all finite."""
    return np.isfinite(logits.reshape(len(logits), -1)).all(axis=1)


def nonfinite_message(bad: np.ndarray, count: int) -> str:
    """Why the images at ``bad`` (indices in a batch of ``count``) have no usable map."""
    which = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    return (f"the model's outputs are NaN or Inf for image(s) {which} of this batch of {count}: their "
            "targets and maps mean nothing (check the preprocessing, or the model with these inputs)")


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def json_bytes(value: Any) -> bytes:
    """Strict JSON (``allow_nan=False``) of ``value`` after :func:`json_safe`."""
    return json.dumps(json_safe(value), indent=1, allow_nan=False).encode()


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file (through symlinks, relative paths, hard links)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()
