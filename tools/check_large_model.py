"""Check: a classifier over protobuf's 2 GiB limit explains end to end (too big for CI).

Builds ``input [1,3,16,16] -> Conv 3x3 (64) -> Relu ['features'] -> GlobalAveragePool ->
Flatten -> Concat(Gemm(W_1, transB), Gemm(W_2, transB)) -> logits``, W = [W_1; W_2] (classes,
64) written straight to an ONNX external-data file (default 9,000,000 classes: 2.3 GB in two
tensors of 1.15 GB; protobuf cannot copy a single tensor over 2 GiB, so models that big split
their weights anyway). Then ``Explainer(path)`` runs
Grad-CAM twice (the second from the rewrite cache) and the result is checked against the
closed form: for this head d logit_c / d A_k(i,j) = W[c, k] / (h w), so Grad-CAM's channel
weights are W[c] / (h w) and the map is ReLU(sum_k W[c,k] A_k), min-max scaled. Peak memory is printed
(several copies of W exist at once: loading, graph export, the session).

    python tools/check_large_model.py [--classes 9000000] [--workdir /tmp/onnxcam-large]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcam import Explainer  # noqa: E402


def build(folder: Path, classes: int, seed: int = 0) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 0.3, (64, 3, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, 64).astype(np.float32)
    head = rng.standard_normal((classes, 64), dtype=np.float32)
    head.tofile(folder / "big.onnx.data")
    half = classes // 2
    tensors = []
    for index, (start, stop) in enumerate(((0, half), (half, classes))):
        tensor = TensorProto(name=f"head_w{index}", data_type=TensorProto.FLOAT, dims=[stop - start, 64],
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "big.onnx.data"), ("offset", str(start * 64 * 4)),
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
    return path, conv_w, conv_b, head


def expected_gradcam(x: np.ndarray, conv_w: np.ndarray, conv_b: np.ndarray, head: np.ndarray,
                     target: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and the Grad-CAM map by the closed form (numpy, float64)."""
    padded = np.pad(x[0].astype(np.float64), ((0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2))  # (3, 16, 16, 3, 3)
    features = np.maximum(np.einsum("chwij,kcij->khw", windows, conv_w) + conv_b[:, None, None], 0)
    cam = np.maximum(np.einsum("k,khw->hw", head[target].astype(np.float64), features), 0)
    return features, (cam - cam.min()) / (cam.max() - cam.min())  # min-max, as pytorch-grad-cam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=9_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.workdir or Path(tempfile.mkdtemp(prefix="onnxcam-large-"))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["ONNXCAM_CACHE_DIR"] = str(folder / "cache")
    path, conv_w, conv_b, head = build(folder, args.classes)
    print(f"model: {path} + weights {(folder / 'big.onnx.data').stat().st_size / 2**30:.2f} GiB")
    x = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)

    for attempt in ("first (rewrite)", "second (cache)"):
        started = time.perf_counter()
        explanation = Explainer(path, provider="cpu").explain(x, "gradcam")
        elapsed = time.perf_counter() - started
        target = int(explanation.targets.reshape(-1)[0])
        features, cam = expected_gradcam(x, conv_w, conv_b, head, target)
        grad = explanation.gradients["features"].reshape(64, 16, 16)
        grad_error = float(np.abs(grad - head[target][:, None, None] / 256.0).max())
        map_error = float(np.abs(explanation.heatmaps[0] - cam).max())
        ok = grad_error < 1e-6 and map_error < 1e-4
        print(f"{attempt}: {elapsed:.1f} s, target {target}, gradient max error {grad_error:.1e}, "
              f"map max error {map_error:.1e} -> {'pass' if ok else 'FAIL'}")
        if not ok:
            sys.exit(1)
    cache = sorted((folder / "cache").iterdir())
    print("cache:", ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in cache))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB")


if __name__ == "__main__":
    main()
