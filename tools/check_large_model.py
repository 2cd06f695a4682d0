"""Check: a classifier over protobuf's 2 GiB limit explains end to end (too big for CI).

Builds ``input [1,3,16,16] -> Conv 3x3 (64) -> Relu ['features'] -> GlobalAveragePool ->
Flatten -> Concat(Gemm(W_1, transB), Gemm(W_2, transB)) -> logits``, W = [W_1; W_2] (classes,
64) written straight to an ONNX external-data file (default 9,000,000 classes: 2.3 GB in two
tensors of 1.15 GB; protobuf cannot copy a single tensor over 2 GiB, so models that big split
their weights anyway). Then ``Explainer(path)`` runs
Grad-CAM twice (the second from the rewrite cache) and the result is checked against the
closed form: for this head d logit_c / d A_k(i,j) = W[c, k] / (h w), so Grad-CAM's channel
weights are W[c] / (h w) and the map is ReLU(sum_k W[c,k] A_k), min-max scaled.

``--memory`` runs the two in separate processes (the first with an empty cache) and prints
each one's peak RSS (VmHWM) and its ratio to the weights' size. ``--inline-limit BYTES``
lowers :data:`onnxcam.large_models.INLINE_LIMIT` so that a smaller model takes the big-model
path (``--classes 3000000 --inline-limit 134217728``: 0.72 GiB of weights).

    python tools/check_large_model.py [--classes 9000000] [--workdir /tmp/onnxcam-large]
        [--memory] [--inline-limit BYTES]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcam import Explainer, large_models  # noqa: E402

DATA = "big.onnx.data"
#: Rows of W generated and written at a time: the builder never holds W whole.
ROWS = 1 << 20


def build(folder: Path, classes: int, seed: int = 0) -> Path:
    """Write the model and its external data to ``folder``; returns the model's path."""
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.3, (64, 3, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, 64).astype(np.float32)
    with open(folder / DATA, "wb") as stream:
        for start in range(0, classes, ROWS):
            rng.standard_normal((min(ROWS, classes - start), 64), dtype=np.float32).tofile(stream)
    half = classes // 2
    tensors = []
    for index, (start, stop) in enumerate(((0, half), (half, classes))):
        tensor = TensorProto(name=f"head_w{index}", data_type=TensorProto.FLOAT, dims=[stop - start, 64],
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", DATA), ("offset", str(start * 64 * 4)),
                           ("length", str((stop - start) * 64 * 4))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        tensors.append(tensor)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["pre"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["pre"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "head_w0"], ["logits0"], transB=1),
        helper.make_node("Gemm", ["flat", "head_w1"], ["logits1"], transB=1),
        helper.make_node("Concat", ["logits0", "logits1"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "big", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(conv_b, "conv_b"), *tensors])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = folder / "big.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def reference(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The conv weights and W as written (W mapped from its file: reading the target's row
    does not add W to this process's memory)."""
    skeleton = onnx.load(str(path), load_external_data=False)
    arrays = {t.name: numpy_helper.to_array(t) for t in skeleton.graph.initializer if t.name.startswith("conv_")}
    classes = sum(int(t.dims[0]) for t in skeleton.graph.initializer if t.name.startswith("head_w"))
    head = np.memmap(path.parent / DATA, np.float32, "r", shape=(classes, 64))
    return arrays["conv_w"], arrays["conv_b"], head


def expected_gradcam(x: np.ndarray, conv_w: np.ndarray, conv_b: np.ndarray,
                     row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features and the Grad-CAM map of the class whose classifier row is ``row`` (W[c]), by
    the closed form (numpy, float64)."""
    padded = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # (3, 16, 16, 3, 3)
    features = np.maximum(np.einsum("chwij,kcij->khw", windows, conv_w) + conv_b[:, None, None], 0)
    cam = np.maximum(np.einsum("k,khw->hw", row.astype(np.float64), features), 0)
    return features, (cam - cam.min()) / (cam.max() - cam.min())  # min-max, as pytorch-grad-cam


def explain_once(path: Path) -> dict:
    """One ``Explainer(path)`` Grad-CAM, checked against the closed form."""
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    started = time.perf_counter()
    explanation = Explainer(path, provider="cpu").explain(x, "gradcam")
    elapsed = time.perf_counter() - started
    conv_w, conv_b, head = reference(path)
    target = int(explanation.targets.reshape(-1)[0])
    row = np.asarray(head[target])
    _, cam = expected_gradcam(x, conv_w, conv_b, row)
    grad = explanation.gradients["features"].reshape(64, 16, 16)
    grad_error = float(np.abs(grad - row[:, None, None] / 256.0).max())
    map_error = float(np.abs(explanation.heatmaps[0] - cam).max())
    return {"seconds": elapsed, "target": target, "grad_error": grad_error, "map_error": map_error,
            "ok": grad_error < 1e-6 and map_error < 1e-4, "peak_bytes": peak_rss()}


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: getrusage's maximum (kilobytes on Linux, bytes on macOS)
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def report(attempt: str, result: dict, weights: int) -> None:
    print(f"{attempt}: {result['seconds']:.1f} s, target {result['target']}, gradient max error "
          f"{result['grad_error']:.1e}, map max error {result['map_error']:.1e}, peak RSS "
          f"{result['peak_bytes'] / 2**30:.2f} GiB = {result['peak_bytes'] / weights:.2f}x the weights "
          f"-> {'pass' if result['ok'] else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=9_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--memory", action="store_true",
                        help="cold and warm explain each in its own process, peak RSS of each")
    parser.add_argument("--inline-limit", type=int, default=None,
                        help="onnxcam.large_models.INLINE_LIMIT in bytes (lower: the big-model path on a smaller model)")
    parser.add_argument("--run", choices=("cold", "warm"), help=argparse.SUPPRESS)  # a --memory child
    args = parser.parse_args()
    if args.inline_limit is not None:
        large_models.INLINE_LIMIT = args.inline_limit
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="onnxcam-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["ONNXCAM_CACHE_DIR"] = str(folder / "cache")
    # the default bound (2 GiB) would not keep a 2.15 GiB rewrite: the second run must be a hit
    os.environ.setdefault("ONNXCAM_CACHE_MAX_BYTES", "64G")
    if args.run:  # the model is built; this process only explains, so its peak is the explain's
        print(json.dumps(explain_once(folder / "big.onnx")))
        return
    path = build(folder, args.classes)
    weights = (folder / DATA).stat().st_size
    print(f"model: {path} + weights {weights / 2**30:.2f} GiB (INLINE_LIMIT {large_models.INLINE_LIMIT})")
    shutil.rmtree(folder / "cache", ignore_errors=True)
    results = []
    for attempt, run in (("first (rewrite)", "cold"), ("second (cache)", "warm")):
        if args.memory:
            command = [sys.executable, __file__, "--run", run, "--workdir", str(folder)]
            if args.inline_limit is not None:
                command += ["--inline-limit", str(args.inline_limit)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{attempt} failed:\n{done.stderr}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
        else:
            result = explain_once(path)
        report(attempt, result, weights)
        results.append(result)
        if run == "cold" and not any((folder / "cache").glob("*.onnx")):
            sys.exit("the first run stored no rewrite in the cache (ONNXCAM_CACHE_MAX_BYTES too small?)")
    cache = sorted((folder / "cache").iterdir())
    print("cache:", ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in cache))
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
