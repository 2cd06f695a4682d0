"""Build the Keras fixture: a real tf2onnx export of a channels-last CNN, with TensorFlow's gradients.

onnxcam must explain Keras models as exported by tf2onnx, which look unlike torch exports: the
input is NHWC and enters through a Transpose (tf2onnx wraps every convolution in Transposes,
then its transpose optimizer cancels all but that first one, so activations are NCHW inside),
``padding='same'`` with stride 2 becomes asymmetric pads, BatchNormalization stays as Mul/Add,
and tensor names are TensorFlow's. This script makes such a model and what TensorFlow says
about it, once; ``tests/test_keras_export.py`` checks onnxcam against it with numpy and
onnxruntime only.

Run it with a separate virtual environment that has TensorFlow (TensorFlow pins its own numpy,
protobuf and keras; installing it into the project's environment would disturb onnx and
onnxruntime there, and neither the package nor its tests may import TensorFlow)::

    python -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu tf2onnx onnx onnxruntime numpy
    /tmp/tfenv/bin/python tools/make_keras_fixture.py [--out tests/fixtures/keras]

Deterministically (``tf.keras.utils.set_random_seed``, oneDNN off, one thread):

1. Build the CNN of :func:`build_model` (one functional model) whose outputs are ``logits``
   (Dense, no activation) and ``probs`` (a separate Softmax). BatchNormalization layers get
   random moving statistics and affine parameters, biases are random, so that no term is
   trivially zero.
2. Export with ``tf2onnx.convert.from_function`` (a ``tf.function`` with an explicit input
   signature, batch ``None``: this works for Keras 3 models), opset 13, IR version 8; the
   outputs are renamed ``logits`` and ``probs``; the preprocessing (``x / 127.5 - 1``) and
   labels are declared in the ``onnxcam.preprocess`` / ``onnxcam.labels`` metadata.
3. For each Keras layer in :data:`PROBES` (the last is the one right before global average
   pooling), find the ONNX tensor holding its output ``A`` by value: onnxruntime runs a copy
   of the model with every float tensor as an output, and a 4-D tensor equal to ``A`` (max
   abs diff < 1e-4 x max(1, max |A|)) either as stored (NHWC) or after the NHWC -> NCHW
   transpose is a match; the last match in graph order is recorded with its layout.
4. With ``tf.GradientTape`` on the same weights, for two fixed NHWC inputs and fixed target
   classes ``t`` (neither image's top-1): the logits, each ``A``, ``dA = d logit[t] / dA`` and
   ``dx = d logit[t] / dx`` (the gradient of ``sum(logits * onehot(t))``, per image since
   images are independent), all NHWC. Also a 32x32 PNG (no resizing needed, so the CLI's
   input is exactly the stored one) with its preprocessed input, TensorFlow's logits, and the
   last layer's ``A`` and ``dA`` for its top-1 class (``image_*`` keys).
5. Write ``keras_cnn.onnx``, ``image.png``, ``reference.npz`` (float32) and
   ``provenance.json`` (each probed layer's ONNX name, op and stored layout, all matches, the
   graph's op counts, versions and the command).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections import Counter
from pathlib import Path

# tf2onnx numbers the nodes it creates (``Mean_Squeeze__101``) in set-iteration order, which
# depends on Python's string hashing: fix the hash seed (it must be set before Python starts).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

# Set before TensorFlow is imported: quiet logs, and the reference kernels rather than oneDNN's
# (whose results may vary with the CPU), on one thread (the machine is shared).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402

SEED = 20240
SIZE = 32
CLASSES = 5
OPSET = 13
IR_VERSION = 8
INPUT = "image"
LABELS = ["circle", "square", "triangle", "star", "cross"]
#: Two fixed targets, checked not to be either image's top-1, so the seed really matters.
TARGETS = np.array([2, 4], dtype=np.int64)
#: Keras layers whose activations and gradients are referenced, in graph order; the last is
#: the one right before global average pooling (Grad-CAM's usual layer, onnxcam's default).
#: The earlier ones put the gradient through the whole backbone: MaxPool and Conv with
#: asymmetric SAME pads, the depthwise Conv, swish, ReLU6 and the residual's two paths.
PROBES = ("stem_relu", "residual", "head_hswish")
#: The match tolerance of step 3, relative to max(1, max |A|).
MATCH_TOL = 1e-4
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "keras"


def build_model() -> tf.keras.Model:
    """The classifier: ``{logits, probs}`` from an NHWC image (one flat functional model).

    Shapes (NHWC): 32x32x3 -> conv 3x3 s1 SAME (16) + BN + ReLU -> conv 3x3 s2 SAME (24, pads
    (0, 1): the asymmetric case) + BN + ReLU6 = s -> depthwise 3x3 SAME + BN + swish -> conv 1x1
    (24) + BN = r -> s + r -> max pool 3x3 s2 SAME (16 -> 8, asymmetric pads again) -> conv 3x3
    SAME (32) + hard-swish = A (8x8x32) -> global average pool -> Dense(5) = logits.
    """
    layers = tf.keras.layers
    image = tf.keras.Input((SIZE, SIZE, 3), name=INPUT)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(image)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    x = layers.Conv2D(24, 3, strides=2, padding="same", name="down_conv")(x)
    x = layers.BatchNormalization(name="down_bn")(x)
    skip = layers.ReLU(max_value=6.0, name="down_relu6")(x)
    y = layers.DepthwiseConv2D(3, padding="same", name="dw_conv")(skip)
    y = layers.BatchNormalization(name="dw_bn")(y)
    y = layers.Activation("swish", name="dw_swish")(y)
    y = layers.Conv2D(24, 1, name="pw_conv")(y)
    y = layers.BatchNormalization(name="pw_bn")(y)
    x = layers.Add(name="residual")([skip, y])
    x = layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(x)
    x = layers.Conv2D(32, 3, padding="same", name="head_conv")(x)
    x = layers.Activation("hard_swish", name="head_hswish")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    logits = layers.Dense(CLASSES, name="logits")(x)
    probs = layers.Softmax(name="probs")(logits)
    return tf.keras.Model(image, {"logits": logits, "probs": probs}, name="keras_cnn")


def randomize(model: tf.keras.Model, rng: np.random.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, and non-zero biases."""
    for layer in model.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.6, 1.4, gamma.shape).astype(np.float32),
                rng.normal(0.0, 0.2, beta.shape).astype(np.float32),
                rng.normal(0.0, 0.2, mean.shape).astype(np.float32),
                rng.uniform(0.5, 1.5, variance.shape).astype(np.float32),
            ])
        elif getattr(layer, "use_bias", False):
            weights = layer.get_weights()
            weights[-1] = rng.normal(0.0, 0.1, weights[-1].shape).astype(np.float32)
            layer.set_weights(weights)


def export(classifier: tf.keras.Model) -> onnx.ModelProto:
    """tf2onnx export (opset 13, dynamic batch), outputs renamed, IR version 8."""
    spec = (tf.TensorSpec((None, SIZE, SIZE, 3), tf.float32, name=INPUT),)
    function = tf.function(lambda x: classifier(x, training=False), input_signature=spec)
    model, _ = tf2onnx.convert.from_function(function, input_signature=spec, opset=OPSET)
    # tf2onnx names outputs after TensorFlow's (Identity_1, ...): name them by what they are,
    # the one produced by Softmax is the probabilities.
    producers = {name: node.op_type for node in model.graph.node for name in node.output}
    renames = {out.name: "probs" if producers.get(out.name) == "Softmax" else "logits"
               for out in model.graph.output}
    assert sorted(renames.values()) == ["logits", "probs"], (renames, producers)
    rename_tensors(model.graph, renames)
    canonical_initializers(model.graph)
    model.ir_version = IR_VERSION
    del model.metadata_props[:]
    for key, value in {
        "onnxcam.preprocess": json.dumps({"mean": [0.5] * 3, "std": [0.5] * 3, "scale": 255.0,
                                          "layout": "NHWC", "size": [SIZE, SIZE]}),
        "onnxcam.labels": json.dumps(LABELS),
    }.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def rename_tensors(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename tensors everywhere they are mentioned (node inputs/outputs, graph outputs)."""
    for node in graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for value in list(graph.output) + list(graph.value_info):
        value.name = renames.get(value.name, value.name)


def canonical_initializers(graph: onnx.GraphProto) -> None:
    """Name each initializer after its first consumer (``<node>/<input slot>``), sorted.

    tf2onnx merges duplicated constants and numbers them (``const_fold_opt__92``) in an order
    that varies from run to run; named by use, the exported file is the same every time."""
    renames: dict[str, str] = {}
    initializers = {t.name for t in graph.initializer}
    for node in graph.node:
        for slot, name in enumerate(node.input):
            if name in initializers and name not in renames:
                renames[name] = f"{node.name}/input{slot}"
    rename_tensors(graph, renames)
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    graph.initializer.sort(key=lambda t: t.name)


def all_float_tensors(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every float tensor the graph computes on ``x``, by name (onnxruntime, CPU)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    known = {o.name for o in exposed.graph.output}
    for node in exposed.graph.node:
        for name in node.output:
            if name and name not in known and types.get(name) == onnx.TensorProto.FLOAT:
                exposed.graph.output.add().CopyFrom(
                    onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
                known.add(name)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(exposed.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT: x})))


def match_activation(model: onnx.ModelProto, x: np.ndarray, activation: np.ndarray) -> list[dict]:
    """The tensors equal to ``activation`` (NHWC), as stored or transposed, in graph order."""
    tensors = all_float_tensors(model, x)
    order = [n for node in model.graph.node for n in node.output]
    tolerance = MATCH_TOL * max(1.0, float(np.abs(activation).max()))
    candidates = {"NHWC": activation, "NCHW": activation.transpose(0, 3, 1, 2)}
    found = []
    for name in order:
        value = tensors.get(name)
        if value is None or value.ndim != 4:
            continue
        for layout, expected in candidates.items():
            if value.shape == expected.shape:
                error = float(np.abs(value - expected).max())
                if error < tolerance:
                    found.append({"name": name, "layout": layout, "max_abs_error": error,
                                  "op": producer_op(model, name)})
    return found


def producer_op(model: onnx.ModelProto, name: str) -> str:
    return next(node.op_type for node in model.graph.node if name in node.output)


def tf_reference(classifier: tf.keras.Model, x: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and, by ``tf.GradientTape``, ``d logit[t] / dx`` and for every probed layer its
    activation ``A`` and ``d logit[t] / dA`` (all NHWC; keys ``activation:<layer>``,
    ``grad:<layer>``).

    A probe model returns the probed layers' outputs next to the logits: run eagerly, those
    are the very tensors the logits were computed from, so the tape differentiates through
    them (a None gradient would say otherwise, and stops the script)."""
    probe = tf.keras.Model(classifier.input, [classifier.get_layer(n).output for n in PROBES]
                           + [classifier.get_layer("logits").output])
    image = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(image)
        *activations, logits = probe(image, training=False)
        score = tf.reduce_sum(logits * tf.one_hot(targets, CLASSES))
    grads = tape.gradient(score, [image, *activations])
    if any(g is None for g in grads):
        raise SystemExit("the tape did not reach every probed layer")
    reference = {"logits": logits.numpy(), "grad_input": grads[0].numpy()}
    for name, activation, grad in zip(PROBES, activations, grads[1:]):
        reference[f"activation:{name}"] = activation.numpy()
        reference[f"grad:{name}"] = grad.numpy()
    return reference


def inputs(rng: np.random.Generator) -> np.ndarray:
    """Two NHWC inputs in [-1, 1] (what ``x / 127.5 - 1`` gives), smooth plus noise."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    smooth = np.stack([np.sin(6 * xx + 2 * yy), np.cos(4 * yy - 3 * xx), np.sin(5 * xx * yy)], -1)
    batch = np.stack([smooth, smooth[::-1, ::-1] * 0.8])
    batch = batch + rng.normal(0.0, 0.25, batch.shape)
    return np.clip(batch, -1, 1).astype(np.float32)


def picture(rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB uint8 image: a bright disc on a noisy gradient."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    disc = ((yy - 12) ** 2 + (xx - 19) ** 2 < 49)[..., None] * np.array([200, 160, 40])
    base = np.stack([xx * 4, yy * 3, 255 - xx * 6], -1) * 0.5
    noisy = base + disc + rng.normal(0, 12, (SIZE, SIZE, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(node.op_type for node in model.graph.node).items()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)

    classifier = build_model()
    randomize(classifier, rng)
    model = export(classifier)

    x = inputs(rng)
    reference = tf_reference(classifier, x, TARGETS)
    if np.any(reference["logits"].argmax(1) == TARGETS):
        raise SystemExit("a target is its image's top-1 class: choose other TARGETS")
    layers = {}
    for name in PROBES:
        matches = match_activation(model, x, reference[f"activation:{name}"])
        if not matches:
            raise SystemExit(f"no ONNX tensor equals the output of Keras layer '{name}'")
        layers[name] = {"onnx_name": matches[-1]["name"], "stored_layout": matches[-1]["layout"],
                        "onnx_op": matches[-1]["op"],
                        "shape_nhwc": list(reference[f"activation:{name}"].shape[1:]),
                        "all_matches": matches}

    rgb = picture(rng)
    image_input = (rgb.astype(np.float32) / 127.5 - 1.0)[None]
    image_top1 = classifier(image_input, training=False)["logits"].numpy().argmax(1)
    last = PROBES[-1]
    image_reference = tf_reference(classifier, image_input, image_top1)
    image_arrays = {"image_input": image_input, "image_target": image_top1,
                    "image_logits": image_reference["logits"],
                    f"image_activation:{last}": image_reference[f"activation:{last}"],
                    f"image_grad:{last}": image_reference[f"grad:{last}"]}

    args.out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, args.out / "keras_cnn.onnx")
    (args.out / "image.png").write_bytes(tf.io.encode_png(rgb).numpy())
    arrays = {"x": x, "targets": TARGETS, **reference, **image_arrays}
    np.savez_compressed(args.out / "reference.npz",
                        **{k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()})
    provenance = {
        "layers": layers, "last_spatial_layer": PROBES[-1],
        "input": INPUT, "outputs": ["logits", "probs"], "targets": TARGETS.tolist(), "labels": LABELS,
        "opset": OPSET, "ir_version": IR_VERSION, "seed": SEED, "ops": op_counts(model),
        "model_bytes": (args.out / "keras_cnn.onnx").stat().st_size,
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__,
                     "keras": tf.keras.__version__, "tf2onnx": tf2onnx.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
        "command": " ".join([Path(sys.executable).name, "tools/make_keras_fixture.py", *(argv or sys.argv[1:])]),
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    print(json.dumps(layers, indent=1))
    print(json.dumps(provenance["ops"]))


if __name__ == "__main__":
    main()
