"""Benchmark: onnxcam vs pytorch-grad-cam, same weights, same inputs, one process.

pytorch-grad-cam (``grad-cam``) is what users compare onnxcam with, so both run here side by
side on the same machine: a torchvision model with random weights (``weights=None``, fixed
seed, BatchNorm statistics measured on the benchmark's own images so activations keep a sane
scale; nothing is downloaded) is explained by pytorch-grad-cam in torch, and the same model,
exported to ONNX (TorchScript exporter, opset 17, dynamic batch) in a temporary folder, by
onnxcam on onnxruntime. Both explain the same tensor: pytorch-grad-cam's usual target layer
(resnet50 ``layer4[-1]``, mobilenet_v2 and convnext_tiny ``features[-1]``); its ONNX name is
found by value (the intermediate tensor equal to the torch forward hook's output) and checked
against the layer onnxcam picks by default. The targets are each image's top-1 class by torch
(the same class on both sides, whatever a near-tie in float rounding would pick).

Rows, per model: a plain forward of each side (torch eval forward under ``inference_mode``;
an onnxruntime session on the exported model) so each tool's overhead over its own forward
can be read; Grad-CAM and Grad-CAM++ at every ``--batch``; K targets for one image
(pytorch-grad-cam: K calls, and one call on the image repeated K times with K targets;
onnxcam: ``targets=[[c1, ..., cK]]``); Score-CAM for one image on ``--scorecam-models``
(pytorch-grad-cam's ``batch_size`` and onnxcam's both ``--scorecam-batch-size``; every
channel is scored on both sides, no ``max_channels``, but onnxcam runs each distinct mask
once: the row's note says how many). Calls are timed interleaved (the map check is the
warm-up round, then ``--repeats`` rounds over all the calls of a batch size), so that load
from elsewhere on the machine hits both sides alike. The maps of the first call of each row
are compared (Pearson r over all pixels, max |difference|); below r = 0.999 or above 1e-3 a
warning is printed with the numbers.

Threads: ``torch.set_num_threads(--threads)`` and onnxruntime's ``intra_op_num_threads`` =
``--threads`` for both onnxruntime sessions (the plain one and onnxcam's), default the
machine's core count. ``--device cuda`` runs torch on the GPU and onnxruntime with the CUDA
provider; UNTESTED (written on a CPU-only machine). Usage::

    python tools/bench_vs_pytorch_grad_cam.py [--models resnet50 mobilenet_v2] [--batch 1 8]
        [--methods gradcam gradcam++] [--repeats 5] [--k 5] [--scorecam-models mobilenet_v2]
        [--scorecam-repeats 2] [--scorecam-batch-size 32]
        [--size 224] [--threads N] [--settle 0.05] [--device cpu|cuda]

Table: median / best ms of each side, speed-up = pytorch-grad-cam median / onnxcam median,
each side's median over its own forward's median at the same batch (for the K-target rows,
the forward of the one image), the map agreement. Reading the gradient rows: pytorch-grad-cam
calls ``loss.backward()``, the whole backward pass down to the input, weight gradients
included; onnxcam's rewritten graph differentiates only from the logits back to the explained
tensor (for the last layer: the pooling and the classifier), so its overhead over a forward
is small.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # ScoreCAM's progress bar: noise in a benchmark

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
import pytorch_grad_cam as pgc
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxcam  # noqa: E402
from onnxcam import Explainer  # noqa: E402
from onnxcam.perturbation import distinct_masks  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # ImageNet normalization, as torchvision
STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SEED, TORCH_SEED = 20240611, 0
MIN_R, MAX_DIFF = 0.999, 1e-3  # map agreement expected of the same method on the same tensor


@dataclass(frozen=True)
class Arch:
    """A torchvision architecture and pytorch-grad-cam's usual target layer for it."""

    build: Callable[[], torch.nn.Module]
    target: Callable[[torch.nn.Module], torch.nn.Module]
    target_name: str


ARCHS: dict[str, Arch] = {
    "resnet50": Arch(lambda: torchvision.models.resnet50(weights=None), lambda m: m.layer4[-1], "layer4[-1]"),
    "mobilenet_v2": Arch(lambda: torchvision.models.mobilenet_v2(weights=None), lambda m: m.features[-1],
                         "features[-1]"),
    "convnext_tiny": Arch(lambda: torchvision.models.convnext_tiny(weights=None), lambda m: m.features[-1],
                          "features[-1]"),
    "vgg16": Arch(lambda: torchvision.models.vgg16(weights=None), lambda m: m.features[-1], "features[-1]"),
}

PGC_METHODS = {"gradcam": pgc.GradCAM, "gradcam++": pgc.GradCAMPlusPlus, "scorecam": pgc.ScoreCAM}


# -- inputs and models ----------------------------------------------------------------------
def smooth_images(count: int, size: int, seed: int) -> np.ndarray:
    """``count`` normalized NCHW float32 images: a bicubic upsampled 6x6 random colour grid, so
    the maps have structure (white noise gives near-flat activations)."""
    rng = np.random.default_rng(seed)
    images = [cv2.resize(rng.uniform(0, 1, (6, 6, 3)).astype(np.float32), (size, size),
                         interpolation=cv2.INTER_CUBIC) for _ in range(count)]
    x = (np.clip(np.stack(images), 0, 1) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def build_model(name: str, calibration: torch.Tensor) -> torch.nn.Module:
    """Random weights (fixed seed); BatchNorm running statistics = those of ``calibration``
    (one train-mode pass, cumulative average), else a deep random ResNet's activations and
    logits drift to scales where float32 rounding alone separates the two sides' maps."""
    torch.manual_seed(TORCH_SEED)
    model = ARCHS[name].build()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(calibration)
    return model.eval()


def export(model: torch.nn.Module, x: torch.Tensor, path: Path) -> None:
    """TorchScript exporter, opset 17, dynamic batch; IR version 8 (onnxruntime's limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, x, str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    proto.ir_version = 8
    onnx.save(proto, str(path))


def hooked(model: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The output of ``module`` for ``x`` (a forward hook)."""
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().cpu().numpy()))
    with torch.inference_mode():
        model(x)
    handle.remove()
    return seen[0]


def onnx_layer_of(explainer: Explainer, path: Path, activation: np.ndarray, x: np.ndarray) -> tuple[str, float]:
    """The ONNX tensor equal (by value) to the torch activation, and its max |difference|
    relative to max |activation|: among onnxcam's candidate layers of the same shape, run once
    as extra outputs, the closest. The exporter folds BatchNorm into the convolutions, so
    rounding differs (about 1e-4 relative at 224 px); another layer differs by O(1). Raises
    when even the closest is further than 1e-2."""
    candidates = [l.name for l in explainer.layers() if tuple(l.shape) == activation.shape[1:]]
    proto = onnx.load(str(path))
    for name in candidates:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    scale = max(1e-12, float(np.abs(activation).max()))
    distance = {name: float(np.abs(value - activation).max()) / scale
                for name, value in zip(candidates, session.run(candidates, {"input": x}))
                if value.shape == activation.shape}
    best = min(distance, key=distance.get, default=None)
    if best is None or distance[best] > 1e-2:
        raise RuntimeError(f"no ONNX tensor equals the torch activation {activation.shape}: relative "
                           f"distances {distance}")
    return best, distance[best]


# -- one row ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One comparison: ``pgc`` and ``onnxcam`` return the maps, (N, H, W) or (N, K, H, W)."""

    method: str
    batch: int
    pgc: Callable[[], np.ndarray]
    onnxcam: Callable[[], np.ndarray]


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Pearson r over all pixels and the largest absolute difference."""
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1]), float(np.abs(a - b).max())


def pgc_maps(bench: "Bench", method: str, calls: list[tuple[torch.Tensor, list[int]]]) -> np.ndarray:
    """pytorch-grad-cam as its README uses it: ``with GradCAM(model, target_layers) as cam``,
    then ``cam(input_tensor, targets)`` for each (input, classes) of ``calls``; maps stacked
    along a new axis 1, (N, len(calls), H, W). The CAM object lives for the call only: its
    hooks stay on the model while it exists, and would otherwise also run (and cost) in every
    other forward of the shared model."""
    with PGC_METHODS[method](model=bench.model, target_layers=[bench.target_module]) as cam:
        if method == "scorecam":
            cam.batch_size = bench.args.scorecam_batch_size
        maps = [cam(input_tensor=xt, targets=[ClassifierOutputTarget(int(c)) for c in classes])
                for xt, classes in calls]
    if bench.device.type == "cuda":
        torch.cuda.synchronize()
    return np.stack(maps, axis=1)


class Bench:
    """Everything for one model: the torch model, the ONNX export, onnxcam, pytorch-grad-cam."""

    def __init__(self, name: str, args: argparse.Namespace, folder: Path):
        self.name, self.args = name, args
        self.device = torch.device(args.device)
        count = max(max(args.batch), 8)
        self.x = smooth_images(count, args.size, IMAGE_SEED)
        model = build_model(name, torch.from_numpy(self.x))
        self.path = folder / f"{name}.onnx"
        export(model, torch.from_numpy(self.x[:1]), self.path)
        self.model = model.to(self.device)
        self.target_module = ARCHS[name].target(model)
        self.xt = torch.from_numpy(self.x).to(self.device)
        with torch.inference_mode():
            self.logits = self.model(self.xt).float().cpu().numpy()
        self.top = np.argsort(-self.logits, axis=1)

        provider = "cuda" if args.device == "cuda" else "cpu"
        probe = Explainer(self.path, provider=provider, cache=False, threads=args.threads)
        default = next(l.name for l in probe.layers() if l.default)
        activation = hooked(self.model, self.target_module, self.xt[:1])
        self.layer, distance = onnx_layer_of(probe, self.path, activation, self.x[:1])
        self.layer_note = ("onnxcam's default" if self.layer == default else f"NOT onnxcam's default '{default}'") \
            + f"; max |difference| {distance:.1e} of max |activation|"
        self.explainer = Explainer(self.path, layer=self.layer, provider=provider, cache=False,
                                   threads=args.threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        providers = (["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda"
                     else ["CPUExecutionProvider"])
        self.plain = ort.InferenceSession(str(self.path), options, providers=providers)

    def distinct_masks(self) -> str:
        """How many Score-CAM forward runs onnxcam makes for image 0 (constant channels, e.g.
        all zero after the last ReLU, share the zero mask), of how many channels."""
        activation = self.explainer.forward(self.x[:1])[self.layer][0]
        distinct, _ = distinct_masks(activation)
        return f"{len(distinct)} of {len(activation)} channels"

    def forwards(self, batch: int) -> tuple[Callable[[], object], Callable[[], object]]:
        """The plain forward of each side: torch (synchronized on CUDA, so GPU time is inside
        the measurement) and the onnxruntime session on the exported model."""
        xt, x = self.xt[:batch], self.x[:batch]

        def torch_forward():
            with torch.inference_mode():
                out = self.model(xt)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return out
        return torch_forward, lambda: self.plain.run(None, {"input": x})

    def method_row(self, method: str, batch: int, **onnxcam_options) -> Row:
        xt, x = self.xt[:batch], self.x[:batch]
        classes = [int(c) for c in self.top[:batch, 0]]
        return Row(method, batch, lambda: pgc_maps(self, method, [(xt, classes)])[:, 0],
                   lambda: self.explainer.explain(x, method, targets=classes, **onnxcam_options).heatmaps)

    def k_rows(self, k: int) -> list[Row]:
        """K targets for image 0: pytorch-grad-cam as K calls, and as one call on a batch of K
        copies with one target each; onnxcam in one explain call. Maps (1, K, H, W)."""
        xt, x = self.xt[:1], self.x[:1]
        classes = [int(c) for c in self.top[0, :k]]
        repeated = xt.repeat(k, 1, 1, 1)
        ours = lambda: self.explainer.explain(x, "gradcam", targets=[classes]).heatmaps  # noqa: E731
        return [Row(f"gradcam K={k}, pgc {k} calls", 1,
                    lambda: pgc_maps(self, "gradcam", [(xt, [c]) for c in classes]), ours),
                Row(f"gradcam K={k}, pgc batch of {k}", 1,
                    lambda: pgc_maps(self, "gradcam", [(repeated, classes)])[:, 0][None], ours)]


# -- reporting ----------------------------------------------------------------------------------
def ms(times: list[float]) -> tuple[float, float]:
    return statistics.median(times) * 1e3, min(times) * 1e3


def cell(value: tuple[float, float]) -> str:
    return f"{value[0]:>8.1f} / {value[1]:>7.1f}"


HEADER = (f"{'model':<13} {'method':<27} {'batch':>5} {'pytorch-grad-cam ms':>19} {'onnxcam ms':>18} "
          f"{'speed-up':>8} {'onnxcam/fwd':>11} {'pgc/fwd':>8} {'r':>9} {'max|diff|':>9}")


def interleaved(calls: list[Callable[[], object]], repeats: int, settle: float,
                clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """Seconds of each call, ``repeats`` rounds over all of them, so that a burst of load from
    elsewhere on the machine hits every call alike. No warm-up round here: the caller has
    already run every call once (the map check), sessions built and caches filled.

    ``settle`` seconds of sleep before each call, untimed: after a run, onnxruntime's and
    torch's (OpenMP) worker threads spin-wait a while for more work, and in one process on a
    few cores they steal the cores of the other runtime's next call (measured here on 2
    cores: torch's mobilenet_v2 forward 39-53 ms right after an onnxruntime run, 15-20 ms
    alone; with a 50 ms pause, as alone). Both runtimes keep their default spinning, as users
    get them. ``clock``: ``time.thread_time`` measures the calling thread's CPU time (with one
    thread per runtime the whole call runs there), less sensitive to load from elsewhere."""
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times):
            time.sleep(settle)
            started = clock()
            call()
            spent.append(clock() - started)
    return times


def run_group(bench: Bench, rows: list[Row], batch: int, repeats: int, settle: float,
              clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Check every row's maps (also the warm-up), time its calls and the plain forwards at
    ``batch`` (the images of the rows) interleaved, print the rows; returns them as dicts
    (milliseconds, medians and best; ratios of medians)."""
    forwards = bench.forwards(batch)
    for call in forwards:
        call()
    checks = []
    for row in rows:
        r, diff = agreement(np.asarray(row.pgc()), np.asarray(row.onnxcam()))
        checks.append((r, diff))
        if not (r >= MIN_R and diff <= MAX_DIFF):
            print(f"WARNING {bench.name} {row.method} batch {row.batch}: maps differ, r = {r:.6f}, "
                  f"max |diff| = {diff:.2e} (expected r >= {MIN_R}, max |diff| <= {MAX_DIFF})", flush=True)
    times = [ms(t) for t in interleaved([*forwards, *(c for row in rows for c in (row.pgc, row.onnxcam))],
                                         repeats, settle, clock)]
    torch_fwd, ort_fwd = times[:2]
    print(f"{bench.name:<13} {'forward (torch | ort)':<27} {batch:>5} {cell(torch_fwd)} {cell(ort_fwd)} "
          f"{torch_fwd[0] / ort_fwd[0]:>7.2f}x", flush=True)
    results = [{"model": bench.name, "row": "forward", "batch": batch, "pgc_ms": torch_fwd, "onnxcam_ms": ort_fwd}]
    for row, (r, diff), theirs, ours in zip(rows, checks, times[2::2], times[3::2]):
        results.append({"model": bench.name, "row": row.method, "batch": row.batch, "pgc_ms": theirs,
                        "onnxcam_ms": ours, "speedup": theirs[0] / ours[0], "onnxcam_over_forward": ours[0] / ort_fwd[0],
                        "pgc_over_forward": theirs[0] / torch_fwd[0], "r": r, "max_diff": diff})
        flag = "" if r >= MIN_R and diff <= MAX_DIFF else " !"
        print(f"{bench.name:<13} {row.method:<27} {row.batch:>5} {cell(theirs)} {cell(ours)} "
              f"{theirs[0] / ours[0]:>7.2f}x {ours[0] / ort_fwd[0]:>11.2f} {theirs[0] / torch_fwd[0]:>8.2f} "
              f"{r:>9.6f} {diff:>9.2e}{flag}", flush=True)
    return results


def use_threads(threads: int) -> None:
    """torch gets ``threads`` intra-op threads (onnxcam's sessions get them via
    ``Explainer(threads=...)``)."""
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"], choices=list(ARCHS))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--methods", nargs="+", default=["gradcam", "gradcam++"], choices=["gradcam", "gradcam++"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, default=5, help="targets for the K-target rows (0: none)")
    parser.add_argument("--scorecam-models", nargs="*", default=["mobilenet_v2"], choices=list(ARCHS))
    parser.add_argument("--scorecam-repeats", type=int, default=2)
    parser.add_argument("--scorecam-batch-size", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--settle", type=float, default=0.05,
                        help="seconds of untimed pause before each timed call (spinning threads)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: torch on the GPU, onnxruntime's CUDA provider (UNTESTED)")
    args = parser.parse_args()
    use_threads(args.threads)

    print(f"onnxcam {onnxcam.__version__} (onnxruntime {ort.__version__}, onnx {onnx.__version__}) vs "
          f"pytorch-grad-cam {version('grad-cam')} (torch {torch.__version__}, torchvision {torchvision.__version__}); "
          f"{args.device}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{args.threads} threads each (torch.set_num_threads, onnxruntime intra_op_num_threads); "
          f"input {args.size}x{args.size}, random weights; {args.repeats} interleaved repeats "
          f"({args.scorecam_repeats} for scorecam), {args.settle:g} s pause before each, median / best; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in dict.fromkeys(args.models + args.scorecam_models):
            setup = time.perf_counter()
            bench = Bench(name, args, Path(folder))
            print(f"{name}: pytorch-grad-cam target {ARCHS[name].target_name} = ONNX tensor "
                  f"'{bench.layer}' ({bench.layer_note}); set up in {time.perf_counter() - setup:.0f} s",
                  flush=True)
            print(HEADER, flush=True)
            if name in args.models:
                for batch in args.batch:
                    rows = [bench.method_row(m, batch) for m in args.methods]
                    if batch == 1 and args.k > 0:
                        rows += bench.k_rows(args.k)
                    run_group(bench, rows, batch, args.repeats, args.settle)
            if name in args.scorecam_models:
                print(f"{name:<13} scorecam: pytorch-grad-cam scores every channel; onnxcam every distinct "
                      f"mask, here {bench.distinct_masks()}", flush=True)
                run_group(bench, [bench.method_row("scorecam", 1, batch_size=args.scorecam_batch_size)], 1,
                          args.scorecam_repeats, args.settle)
            del bench
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
