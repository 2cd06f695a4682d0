"""Fuzz cases shared by tests/test_fuzz.py (hypothesis, brief, in CI) and
tools/fuzz_campaign.py (a long campaign in a watched worker process).

A case is a seed (a small valid model or image file) and a random generator that mutates it,
at the byte level (bit flips, overwrites, truncation, deleted or inserted or repeated spans)
or, for models, at the protobuf level (op types, tensor names, attributes, dims, element
types, initializers, opsets, node order), so that most mutants still parse and reach the
checks, the surgery and onnxruntime. :func:`run_model_case` and :func:`run_image_case` return
what onnxcam did ("ok", or "refused: <error type>") and let anything else escape: the
property is that only :class:`~onnxcam.errors.OnnxcamError` ever does.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcam import Explainer
from onnxcam.decode import load_image
from onnxcam.errors import OnnxcamError
from tests.tiny_models import conv_classifier, mlp_classifier, nhwc_classifier

#: Op types a mutation may write: real ones (some without gradient rules), and nonsense.
OP_TYPES = ["Relu", "Conv", "Add", "Mul", "Reshape", "Transpose", "Softmax", "Gemm", "MaxPool", "Identity",
            "Concat", "Slice", "Resize", "Cast", "QuantizeLinear", "DequantizeLinear", "Loop", "If", "Sigmoid",
            "Hardmax", "TopK", "Where", "Expand", "Tile", "Pad", "Frobnicate", ""]
ELEM_TYPES = [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.INT64, TensorProto.UINT8,
              TensorProto.INT8, TensorProto.BOOL, TensorProto.STRING, TensorProto.BFLOAT16, 0, 99]
METHODS = ["gradcam", "gradcam++", "scorecam", "ablationcam", "cam", "eigencam", "saliency", "layercam"]


def _qdq_model() -> onnx.ModelProto:
    from tests.test_hardening_models import _qdq_classifier
    return _qdq_classifier(np.array([0.01, 0.02, 0.05]))


SEED_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv": lambda: conv_classifier(size=12),
    "nhwc": lambda: nhwc_classifier(size=8),
    "mlp": mlp_classifier,
    "qdq": _qdq_model,
    "batch1": lambda: conv_classifier(size=8, batch=1),
}


def _image(kind: str) -> bytes:
    rng = np.random.default_rng(len(kind))
    image = cv2.GaussianBlur(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8), (5, 5), 2)
    if kind == "png16":
        return cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes()
    if kind == "gray.png":
        return cv2.imencode(".png", image[..., 0])[1].tobytes()
    if kind == "rgba.png":
        return cv2.imencode(".png", np.dstack([image, image[..., :1]]))[1].tobytes()
    return cv2.imencode("." + kind, image)[1].tobytes()


IMAGE_KINDS = [k for k in ["png", "jpg", "webp", "bmp", "tiff", "gif", "ppm", "png16", "gray.png", "rgba.png"]
               if k not in ("webp", "gif") or cv2.haveImageWriter(f"x.{k}")]


def seed_image(kind: str) -> bytes:
    return _image(kind)


# -- mutations --------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: np.random.Generator, count: int = 1) -> bytes:
    """``count`` byte-level mutations."""
    blob = bytearray(data)
    for _ in range(count):
        choice = rng.integers(6)
        at = int(rng.integers(len(blob) + 1))
        if choice == 0 and blob:  # flip one bit
            at = min(at, len(blob) - 1)
            blob[at] ^= 1 << int(rng.integers(8))
        elif choice == 1 and blob:  # overwrite a span with random bytes
            span = int(rng.integers(1, 9))
            blob[at:at + span] = rng.bytes(span)[:len(blob[at:at + span])]
        elif choice == 2:  # truncate
            del blob[at:]
        elif choice == 3:  # delete a span
            del blob[at:at + int(rng.integers(1, 64))]
        elif choice == 4:  # insert random bytes
            blob[at:at] = rng.bytes(int(rng.integers(1, 16)))
        else:  # repeat a span
            span = bytes(blob[at:at + int(rng.integers(1, 64))])
            blob[at:at] = span
    return bytes(blob)


def _names(model: onnx.ModelProto) -> list[str]:
    graph = model.graph
    return sorted({n for node in graph.node for n in list(node.input) + list(node.output) if n}
                  | {i.name for i in graph.input} | {t.name for t in graph.initializer})


def mutate_proto(model: onnx.ModelProto, rng: np.random.Generator, count: int = 1) -> bytes:
    """``count`` structural mutations of a copy of ``model``, serialized."""
    mutant = onnx.ModelProto()
    mutant.CopyFrom(model)
    graph = mutant.graph
    for _ in range(count):
        names = _names(mutant) + ["ghost", ""]
        pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
        choice = int(rng.integers(12))
        nodes = list(graph.node)
        if choice == 0 and nodes:
            pick(nodes).op_type = pick(OP_TYPES)
        elif choice == 1 and nodes:
            node = pick(nodes)
            if node.input:
                node.input[int(rng.integers(len(node.input)))] = pick(names)
        elif choice == 2 and nodes:
            node = pick(nodes)
            if node.output:
                node.output[int(rng.integers(len(node.output)))] = pick(names)
        elif choice == 3 and nodes:
            node = pick(nodes)
            if node.attribute:
                attribute = pick(list(node.attribute))
                value = int(pick([0, 1, 2, 3, -1, -7, 2 ** 31 - 1, 10 ** 9]))
                if attribute.type == onnx.AttributeProto.INT:
                    attribute.i = value
                elif attribute.type == onnx.AttributeProto.INTS and attribute.ints:
                    attribute.ints[int(rng.integers(len(attribute.ints)))] = value
                elif attribute.type == onnx.AttributeProto.FLOAT:
                    attribute.f = float(pick([0.0, -1.0, 1e30, float("nan"), float("inf")]))
            else:
                node.attribute.append(helper.make_attribute(pick(["axis", "perm", "to", "mode"]), int(rng.integers(-3, 5))))
        elif choice == 4 and nodes:  # drop or duplicate a node
            index = int(rng.integers(len(nodes)))
            if rng.random() < 0.5:
                del graph.node[index]
            else:
                graph.node.insert(index, nodes[index])
        elif choice == 5 and graph.initializer:
            tensor = pick(list(graph.initializer))
            kind = int(rng.integers(3))
            if kind == 0 and tensor.dims:
                tensor.dims[int(rng.integers(len(tensor.dims)))] = int(pick([0, 1, 2, 7, 10 ** 6, -1]))
            elif kind == 1:
                tensor.data_type = int(pick(ELEM_TYPES))
            elif tensor.raw_data:  # a value short
                tensor.raw_data = tensor.raw_data[:-int(rng.integers(1, 5))]
        elif choice == 6:  # declared dims and types of inputs, outputs, value_info
            values = list(graph.input) + list(graph.output) + list(graph.value_info)
            if values:
                value = pick(values)
                tensor_type = value.type.tensor_type
                if rng.random() < 0.3:
                    tensor_type.elem_type = int(pick(ELEM_TYPES))
                elif tensor_type.shape.dim:
                    dim = tensor_type.shape.dim[int(rng.integers(len(tensor_type.shape.dim)))]
                    size = pick([0, 1, 2, 3, 5, 64, -2, 10 ** 5, 10 ** 12, "sym"])
                    if isinstance(size, str):
                        dim.dim_param = size
                    else:
                        dim.dim_value = int(size)
        elif choice == 7 and mutant.opset_import:
            mutant.opset_import[0].version = int(rng.integers(-1, 32))
        elif choice == 8:
            mutant.ir_version = int(rng.integers(-1, 16))
        elif choice == 9 and nodes:  # shuffle the nodes
            order = rng.permutation(len(nodes))
            del graph.node[:]
            graph.node.extend(nodes[i] for i in order)
        elif choice == 10:  # an extra input or output
            extra = helper.make_tensor_value_info(pick(names) or "extra", int(pick(ELEM_TYPES)),
                                                  [int(d) for d in rng.integers(-1, 5, int(rng.integers(0, 5)))])
            (graph.input if rng.random() < 0.5 else graph.output).append(extra)
        elif choice == 11 and nodes:  # a node of a domain
            pick(nodes).domain = pick(["com.example", "ai.onnx.ml", "com.microsoft", "ai.onnx"])
    try:
        return mutant.SerializeToString()
    except Exception:  # noqa: BLE001 - e.g. a string field set to something unencodable
        return model.SerializeToString()


def mutated_model(seed: str, rng: np.random.Generator) -> bytes:
    model = SEED_MODELS[seed]()
    count = int(rng.integers(1, 4))
    if rng.random() < 0.25:
        return mutate_bytes(model.SerializeToString(), rng, count)
    return mutate_proto(model, rng, count)


def mutated_image(kind: str, rng: np.random.Generator) -> bytes:
    return mutate_bytes(seed_image(kind), rng, int(rng.integers(1, 4)))


# -- running ----------------------------------------------------------------------------------

def run_model_case(data: bytes, rng: np.random.Generator, folder: str | None = None) -> str:
    """Load ``data`` as a model file, list its layers and explain a random input with a random
    method. Returns "ok" or "refused: <OnnxcamError subclass>"; anything else escapes."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                explainer = Explainer(path, cache=False)
                explainer.layers()
                size = explainer.input_size
                if size is None:
                    return "ok"
                batch = explainer.graph.static_batch() or 2
                if batch > 4:
                    return "ok"  # a valid model of a large fixed batch: explaining it is only slow
                shape = (batch, 3, *size) if explainer.input_layout == "NCHW" else (batch, *size, 3)
                channels_ok = explainer.graph.dims(explainer.graph.input.name)
                if channels_ok is not None and len(channels_ok) == 4:
                    shape = tuple(d if isinstance(d, int) and d > 0 else s for d, s in zip(channels_ok, shape))
                x = rng.standard_normal(shape).astype(np.float32)
                method = METHODS[int(rng.integers(len(METHODS)))]
                result = explainer.explain(x, method, max_channels=3)
        except OnnxcamError as exc:
            return f"refused: {type(exc).__name__}"
        maps = result.heatmaps
        if not (np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1):
            raise AssertionError(f"{method}: maps outside [0, 1] or not finite")
        return "ok"


def run_image_case(data: bytes, folder: str | None = None, suffix: str = ".img") -> str:
    """Decode ``data`` as an image file: "ok" (RGB float32 in [0, 255]) or "refused: ImageError"."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / f"image{suffix}"
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                image = load_image(path)
        except OnnxcamError as exc:
            return f"refused: {type(exc).__name__}"
        if not (image.dtype == np.float32 and image.ndim == 3 and image.shape[2] == 3
                and np.isfinite(image).all() and image.min() >= 0 and image.max() <= 255):
            raise AssertionError(f"decoded image {image.dtype} {image.shape} out of range")
        return "ok"

