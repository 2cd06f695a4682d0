"""Models over protobuf's 2 GiB limit: the few places that serialize a whole model.

A protobuf message cannot be serialized beyond 2 GiB, yet onnx keeps a model loaded with its
external data as one message, and onnx's shape inference, version converter and
onnxruntime's in-memory session all go through serialization. Graph work itself (onnx-
graphsurgeon, the autodiff) never serializes, so only these entry points need care:

- :func:`infer_shapes`, :func:`convert_version`: run on a *skeleton*, the model with its big
  initializers replaced by placeholders (same name, type and dims; data marked external at
  :data:`DETACHED`), and the weights put back afterwards;
- :func:`session`: onnxruntime loads the model from a temporary file with external data
  (it maps the weights rather than copying them through protobuf);
- :func:`fingerprint` hashes the skeleton and the weights' bytes;
- :func:`save` writes ``path`` and, for big models, ``path + ".data"`` (ONNX external data,
  readable by ``onnx.load`` and every onnxruntime binding), each atomically.

Small models take the plain path everywhere. :data:`INLINE_LIMIT` decides (tests lower it to
run the big-model path on a small model).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .files import atomic_write, atomic_write_bytes

#: Weight bytes above which a model is never serialized whole (2 GiB less room for the graph
#: and the gradient subgraph's own constants).
INLINE_LIMIT = 2**31 - 2**28
#: Initializers at least this big are detached; smaller ones (shapes, axes, scalars that
#: shape inference and the autodiff read) stay in the skeleton.
DETACH_MIN_BYTES = 1024
#: External-data location that marks a detached initializer in a skeleton.
DETACHED = "onnxcam-detached-weight"


def tensor_bytes(tensor: TensorProto) -> int:
    """Size of an initializer's data, without serializing it."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if tensor.data_location == TensorProto.EXTERNAL:
        return 0
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize \
        if tensor.data_type != TensorProto.STRING else 1
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def is_large(model: onnx.ModelProto) -> bool:
    """True when the model's weights are too big to serialize it as one message."""
    return sum(tensor_bytes(t) for t in model.graph.initializer) > INLINE_LIMIT


def detach(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """The skeleton (every field copied but big initializers' data) and the detached
    initializers by name (references into ``model``, not copies)."""
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, skip="graph")
    _copy_fields(skeleton.graph, model.graph, skip="initializer")
    weights: dict[str, TensorProto] = {}
    for tensor in model.graph.initializer:
        if tensor_bytes(tensor) < DETACH_MIN_BYTES:
            skeleton.graph.initializer.add().CopyFrom(tensor)
            continue
        placeholder = skeleton.graph.initializer.add()
        placeholder.name, placeholder.data_type = tensor.name, tensor.data_type
        placeholder.dims.extend(tensor.dims)
        _mark_external(placeholder, DETACHED)
        weights[tensor.name] = tensor
    return skeleton, weights


def attach(skeleton: onnx.ModelProto, weights: dict[str, TensorProto]) -> onnx.ModelProto:
    """Put detached weights back into ``skeleton`` (in place; returned for chaining)."""
    for tensor in skeleton.graph.initializer:
        if _location(tensor) == DETACHED and tensor.name in weights:
            tensor.CopyFrom(weights[tensor.name])
    return skeleton


def on_skeleton(model: onnx.ModelProto, transform: Callable[[onnx.ModelProto], onnx.ModelProto]
                ) -> onnx.ModelProto:
    """``transform(model)``, run on the skeleton when the model is large."""
    if not is_large(model):
        return transform(model)
    skeleton, weights = detach(model)
    return attach(transform(skeleton), weights)


def infer_shapes(model: onnx.ModelProto, in_place: bool = False, **options: Any) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` for models of any size, run on the skeleton
    (inference on the whole model serializes it, parses it in C++ and back: four copies of
    the weights at once, resnet50 a 587 MiB peak to load it). A small model's result is one
    copy of it with the inferred value_info and outputs, as onnx's own; a large model is
    annotated in place rather than copied: every copy of a multi-GB model is that much more
    memory; ``in_place`` annotates a small model in place too."""
    inferred = onnx.shape_inference.infer_shapes(detach(model)[0], **options)
    if not in_place and not is_large(model):
        annotated = onnx.ModelProto()
        annotated.CopyFrom(model)
        model = annotated
    for name in ("value_info", "output"):
        field = getattr(model.graph, name)
        del field[:]
        field.extend(getattr(inferred.graph, name))
    return model


def convert_version(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``onnx.version_converter.convert_version`` for models of any size."""
    return on_skeleton(model, lambda m: onnx.version_converter.convert_version(m, opset))


def fingerprint(model: onnx.ModelProto) -> hashlib._Hash:
    """SHA-256 of the model's content: the skeleton, then each detached weight's bytes.
    ``value_info`` is left out: it is derived (shape inference adds it, in place for large
    models) and must not change the identity of a model."""
    skeleton, weights = detach(model)
    del skeleton.graph.value_info[:]
    digest = hashlib.sha256(skeleton.SerializeToString())
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(_raw(weights[name]))
    return digest


def session(model: onnx.ModelProto, options, providers: list[str]):
    """An ``onnxruntime.InferenceSession`` for ``model`` of any size. A large model is
    written with external data to a temporary folder and loaded from there: onnxruntime
    maps external weights from the file instead of holding another copy in memory."""
    import onnxruntime as ort

    if not is_large(model):
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="onnxcam-session-") as folder:
        path = Path(folder) / "model.onnx"
        save(model, path)
        return ort.InferenceSession(str(path), options, providers=providers)


def save(model: onnx.ModelProto, path: str | os.PathLike, mode: int | None = None) -> None:
    """Write ``model`` to ``path`` atomically; a large model's weights go to
    ``path + ".data"`` (ONNX external data, offsets 4 KiB-aligned), written first so a
    reader never finds the model without its complete data. ``mode``: the files' permissions
    (default: as ``open()`` creates them)."""
    path = Path(path)
    if not is_large(model):
        atomic_write_bytes(path, model.SerializeToString(), mode)
        return
    skeleton, weights = detach(model)
    data_name = path.name + ".data"
    entries = {t.name: t for t in skeleton.graph.initializer if _location(t) == DETACHED}

    def write_weights(stream) -> None:
        for name, tensor in weights.items():
            offset = -(-stream.tell() // 4096) * 4096
            stream.write(b"\0" * (offset - stream.tell()))
            data = _raw(tensor)
            stream.write(data)
            _mark_external(entries[name], data_name, offset, len(data))

    atomic_write(path.with_name(data_name), write_weights, mode)
    atomic_write_bytes(path, skeleton.SerializeToString(), mode)


def _raw(tensor: TensorProto) -> bytes:
    """Little-endian raw bytes of an initializer (converted when stored in typed fields)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(tensor)).raw_data


def _location(tensor: TensorProto) -> str | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return next((entry.value for entry in tensor.external_data if entry.key == "location"), None)


def _mark_external(tensor: TensorProto, location: str, offset: int | None = None,
                   length: int | None = None) -> None:
    del tensor.external_data[:]
    tensor.data_location = TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries += [("offset", str(offset)), ("length", str(length))]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _copy_fields(destination, source, skip: str) -> None:
    """Copy every set field of a protobuf message but ``skip`` (shallow in the sense that
    the skipped field's data is never touched)."""
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(destination, field.name).extend(value)
        elif field.message_type is not None:
            getattr(destination, field.name).CopyFrom(value)
        else:
            setattr(destination, field.name, value)
