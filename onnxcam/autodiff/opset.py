"""Opset upgrades that keep the model's meaning.

The rules emit opset >= 13 vocabulary (and ScatterElements reductions need 16), so older
models are upgraded with ``onnx.version_converter`` first. One of its adapters changes what
the model computes: Resize-10 (and Upsample-9, which becomes Resize-10) resamples with
*asymmetric* coordinates, ``x_in = x_out / scale``, but the 10 -> 11 adapter leaves
``coordinate_transformation_mode`` unset, i.e. ``half_pixel`` (onnx 1.23; a linear 2x
upsample then differs by up to ~1.0 on unit-variance inputs). :func:`upgrade` restores the
old semantics, as onnxruntime implements them for opset 10: asymmetric coordinates, and for
nearest the index ``floor(x_in)`` when upsampling, ``ceil(x_in)`` when downsampling
(``GetNearestPixelFromOriginal`` in onnxruntime's upsamplebase.h; checked against
onnxruntime 1.31 in tests/test_autodiff_engine.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .. import large_models

#: IR version for each opset that onnxruntime accepts (onnx 1.23 writes IR 14 by default).
IR_FOR_OPSET = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10, 22: 10}


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def upgrade(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` converted to ``opset`` with its meaning kept (see the module docstring);
    raises ``ValueError`` for a Resize-10 nearest that both up- and downsamples, which no
    single opset-11 ``nearest_mode`` reproduces."""
    legacy = _legacy_resizes(model) if default_opset(model) < 11 <= opset else {}
    converted = large_models.convert_version(model, opset)
    converted.ir_version = IR_FOR_OPSET.get(opset, 10)
    for node in converted.graph.node:
        if node.op_type == "Resize" and node.output[0] in legacy:
            _set_attribute(node, "coordinate_transformation_mode", "asymmetric")
            nearest = legacy[node.output[0]]
            if nearest is not None:
                _set_attribute(node, "nearest_mode", nearest)
    return converted


def _legacy_resizes(model: onnx.ModelProto) -> dict[str, str | None]:
    """Output name -> the nearest_mode that reproduces it (None for linear) for every
    Resize-10/Upsample node."""
    wanted = {n.input[1] for n in model.graph.node if n.op_type in ("Resize", "Upsample") and len(n.input) > 1}
    constants = {t.name: large_models.array(t) for t in model.graph.initializer if t.name in wanted}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    found: dict[str, str | None] = {}
    for node in model.graph.node:
        if node.op_type not in ("Resize", "Upsample"):
            continue
        mode = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "mode"), b"nearest")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "nearest":
            found[node.output[0]] = None
            continue
        scales = _legacy_scales(node, constants)
        changed = [] if scales is None else [s for s in np.asarray(scales).reshape(-1) if s != 1]
        if any(s < 1 for s in changed) and any(s > 1 for s in changed):
            raise ValueError(f"Resize '{node.name}' (opset < 11, nearest) up- and downsamples at once; "
                             "no opset-11 nearest_mode reproduces it")
        found[node.output[0]] = "ceil" if changed and changed[0] < 1 else "floor"
    return found


def _legacy_scales(node: onnx.NodeProto, constants: dict[str, np.ndarray]) -> np.ndarray | None:
    for attribute in node.attribute:
        if attribute.name == "scales":  # Upsample-7 keeps them as an attribute
            return np.asarray(attribute.floats)
    return constants.get(node.input[1]) if len(node.input) > 1 else None


def _set_attribute(node: onnx.NodeProto, name: str, value: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
