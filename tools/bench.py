"""Benchmark: everything onnxcam costs, side by side in one run, ratios next to each other.

Three tables, each measured interleaved (every call of a group once per round, ``--repeats``
rounds, medians), so load from elsewhere on the machine hits every column alike:

1. **over the forward** (onnxcam alone): per model, a plain onnxruntime session on the model
   file, and onnxcam's Grad-CAM at batch 1 and ``--batch``, the top-5 classes of one image
   in one call, Grad-CAM++ and the exported self-explaining model (``onnxcam export``), each
   as a ratio to the plain forward at the same batch. Models: the shared MobileNets
   (``../shared/models/mobilenet``, where present) and torchvision architectures with random
   weights exported to ONNX (``--models``; BatchNorm statistics calibrated on the benchmark's
   images, as in ``tools/bench_vs_pytorch_grad_cam.py``, whose helpers this script uses);
2. **vs pytorch-grad-cam** (``--pgc-models``): the same torchvision weights explained by
   pytorch-grad-cam in torch and by onnxcam (Grad-CAM at batch 1 and ``--batch``, Score-CAM
   for one image on ``--scorecam-models``), speed-ups and each side over its own forward,
   maps compared (Pearson r, max |difference|);
3. **peak RSS** (``--memory-models``): in fresh subprocesses, ``VmHWM`` of a plain
   onnxruntime session running one image, of ``Explainer(model).explain(x)`` (Grad-CAM) with
   an empty rewrite cache (the rewrite is built) and with a warm one (loaded), and of a
   process that only imports onnxcam; ratios to the plain session.

Prints the machine, threads and versions, the load average before and after (this machine
may be shared: read the ratios, not the milliseconds), and writes everything to ``--json``.
``--quick``: mobilenet_v2 only, few repeats (a couple of minutes). ``--device cuda`` runs
torch on the GPU and onnxruntime's CUDA provider; UNTESTED (written on a CPU-only machine).
Usage::

    python tools/bench.py [--quick] [--device cpu|cuda] [--threads N] [--json bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import bench_vs_pytorch_grad_cam as vs  # noqa: E402
import onnxcam  # noqa: E402
from onnxcam import Explainer, export_explained  # noqa: E402

SHARED_MOBILENETS = sorted((ROOT.parent / "shared" / "models" / "mobilenet").glob("*.onnx"))

#: Peak RSS of one process: "forward" (onnxruntime alone), "import" (import onnxcam only), or a
#: method explained by onnxcam; prints VmHWM in KiB (not ru_maxrss: Linux carries that over
#: exec from the parent, here a process holding torch).
MEMORY_PROBE = r"""
import sys
import numpy as np
kind, path, provider = sys.argv[1], sys.argv[2], sys.argv[3]
if kind == "forward":
    import onnxruntime as ort
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(path, providers=providers)
    value = session.get_inputs()[0]
    shape = [1] + [d if isinstance(d, int) else 224 for d in value.shape[1:]]
    session.run(None, {value.name: np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)})
else:
    sys.path.insert(0, sys.argv[4])
    import onnxcam
    if kind != "import":
        explainer = onnxcam.Explainer(path, provider=provider)
        h, w = explainer.input_size
        shape = (1, 3, h, w) if explainer.input_layout == "NCHW" else (1, h, w, 3)
        explainer.explain(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32), kind)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def median_best(times: list[float]) -> tuple[float, float]:
    return statistics.median(times) * 1e3, min(times) * 1e3


def inputs_for(explainer: Explainer, batch: int) -> np.ndarray:
    """``batch`` smooth images (:func:`vs.smooth_images`, ImageNet-normalized) at the model's
    size, in its layout."""
    h, w = explainer.input_size
    x = vs.smooth_images(batch, max(h, w), vs.IMAGE_SEED)[:, :, :h, :w]
    return np.ascontiguousarray(x if explainer.input_layout == "NCHW" else x.transpose(0, 2, 3, 1))


# -- 1. over the forward ------------------------------------------------------------------------
def overhead_rows(name: str, path: Path, args: argparse.Namespace) -> list[dict]:
    """onnxcam's calls on ``path`` and a plain session, interleaved; ratios to the forward."""
    provider = "cuda" if args.device == "cuda" else "cpu"
    explainer = Explainer(path, provider=provider, threads=args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    plain = ort.InferenceSession(str(path), options, providers=providers)
    image = plain.get_inputs()[0].name
    static = explainer.graph.static_batch()
    exported = ort.InferenceSession(export_explained(str(path), "gradcam").SerializeToString(), options,
                                    providers=providers)
    export_batch = exported.get_inputs()[0].shape[0]

    def forward(x: np.ndarray):
        step = static or len(x)
        return [plain.run(None, {image: x[i:i + step]}) for i in range(0, len(x), step)]

    def export_run(x: np.ndarray):
        step = export_batch if isinstance(export_batch, int) else len(x)
        return [exported.run(None, {image: x[i:i + step], "target": np.full(min(step, len(x)), -1, np.int64)})
                for i in range(0, len(x), step)]

    rows = []
    for batch in dict.fromkeys([1, args.batch]):
        x = inputs_for(explainer, batch)
        calls = {"forward": lambda x=x: forward(x), "gradcam": lambda x=x: explainer.explain(x)}
        if batch == 1:
            calls.update({"top-5 in one call": lambda x=x: explainer.explain(x, topk=5),
                          "gradcam++": lambda x=x: explainer.explain(x, "gradcam++"),
                          "export (self-explaining)": lambda x=x: export_run(x)})
        for call in calls.values():
            call()  # sessions built, caches warm
        times = dict(zip(calls, vs.interleaved(list(calls.values()), args.repeats, args.settle, args.timer)))
        fwd = median_best(times["forward"])
        for label, spent in times.items():
            ms = median_best(spent)
            rows.append({"model": name, "row": label, "batch": batch, "ms": ms, "over_forward": ms[0] / fwd[0]})
            print(f"{name:<26} {label:<26} {batch:>5} {ms[0]:>9.2f} {ms[1]:>9.2f} {ms[0] / fwd[0]:>8.3f}",
                  flush=True)
    return rows


# -- 3. peak RSS --------------------------------------------------------------------------------
def peak_rss_mib(kind: str, path: Path, provider: str, cache: Path) -> float:
    env = dict(os.environ, ONNXCAM_CACHE_DIR=str(cache))
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, kind, str(path), provider, str(ROOT)],
                         env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def memory_rows(name: str, path: Path, args: argparse.Namespace, folder: Path) -> list[dict]:
    provider = "cuda" if args.device == "cuda" else "cpu"
    cache = folder / f"cache-{name}"
    weights = sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 2**20
    measured = [("forward", "plain onnxruntime session", "forward"),
                ("import", "import onnxcam only", "import"),
                ("gradcam", "gradcam, cache empty", "gradcam"),
                ("gradcam", "gradcam, cache warm", "gradcam")]
    rows, plain = [], None
    for kind, label, _ in measured:
        mib = peak_rss_mib(kind, path, provider, cache)
        plain = mib if kind == "forward" else plain
        rows.append({"model": name, "row": label, "model_mib": weights, "peak_rss_mib": mib,
                     "over_forward": mib / plain})
        print(f"{name:<26} {label:<26} {weights:>9.0f} {mib:>11.0f} {mib / plain:>8.2f}", flush=True)
    return rows


# -- main ---------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="mobilenet_v2 only, few repeats")
    parser.add_argument("--models", nargs="*", default=["resnet50", "mobilenet_v2", "vgg16"],
                        choices=list(vs.ARCHS), help="torchvision models for the over-the-forward table")
    parser.add_argument("--pgc-models", nargs="*", default=["resnet50", "mobilenet_v2"], choices=list(vs.ARCHS))
    parser.add_argument("--scorecam-models", nargs="*", default=["mobilenet_v2"], choices=list(vs.ARCHS))
    parser.add_argument("--memory-models", nargs="*", default=["resnet50", "vgg16"], choices=list(vs.ARCHS))
    parser.add_argument("--shared", action=argparse.BooleanOptionalAction, default=True,
                        help="also the shared MobileNets in the over-the-forward table")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--pgc-repeats", type=int, default=5)
    parser.add_argument("--scorecam-repeats", type=int, default=2)
    parser.add_argument("--scorecam-batch-size", type=int, default=32)
    parser.add_argument("--settle", type=float, default=0.05,
                        help="seconds of untimed pause before each timed call (spinning threads)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: torch on the GPU, onnxruntime's CUDA provider (UNTESTED)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: one thread per runtime, each call's CPU time on the calling thread "
                             "(time.thread_time): ratios that survive a loaded machine")
    parser.add_argument("--json", default="bench.json", help="where to write the results")
    args = parser.parse_args()
    args.timer = time.perf_counter
    if args.clock == "cpu":
        if args.device == "cuda":
            parser.error("--clock cpu measures CPU work; use the wall clock with --device cuda")
        args.threads, args.timer = 1, time.thread_time
    if args.device == "cuda":  # say so in one line now, not after minutes of CPU rows
        try:
            onnxcam.runtime.resolve_provider("cuda")
            if not vs.torch.cuda.is_available():
                raise onnxcam.OnnxcamError("torch sees no CUDA device (a CPU-only torch build?)")
        except onnxcam.OnnxcamError as exc:
            parser.exit(2, f"bench.py: --device cuda: {exc}\n")
    if args.quick:
        args.models = args.pgc_models = args.scorecam_models = args.memory_models = ["mobilenet_v2"]
        args.repeats, args.pgc_repeats, args.scorecam_repeats = 5, 3, 1
    # the helpers of bench_vs_pytorch_grad_cam read these
    args.size, args.k = 224, 5
    vs.use_threads(args.threads)

    machine = {"onnxcam": onnxcam.__version__, "onnxruntime": ort.__version__, "torch": vs.torch.__version__,
               "pytorch-grad-cam": version("grad-cam"), "python": platform.python_version(),
               "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": args.threads, "clock": args.clock, "device": args.device, "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_before": os.getloadavg()}
    print(f"onnxcam {machine['onnxcam']}, onnxruntime {machine['onnxruntime']}, torch {machine['torch']}, "
          f"pytorch-grad-cam {machine['pytorch-grad-cam']}; {args.device}, {machine['cpu']}, "
          f"{machine['cores']} cores, {args.threads} threads, {args.clock} clock; {args.repeats} interleaved repeats, medians; "
          f"load average {machine['load_before'][0]:.1f}", flush=True)
    results: dict = {"machine": machine, "over_forward": [], "vs_pytorch_grad_cam": [], "memory": []}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxcam-bench-") as tmp:
        folder = Path(tmp)
        os.environ["ONNXCAM_CACHE_DIR"] = str(folder / "cache")
        exported: dict[str, Path] = {}

        def export(name: str) -> Path:
            if name not in exported:
                x = vs.smooth_images(8, 224, vs.IMAGE_SEED)
                model = vs.build_model(name, vs.torch.from_numpy(x))
                exported[name] = folder / f"{name}.onnx"
                vs.export(model, vs.torch.from_numpy(x[:1]), exported[name])
            return exported[name]

        print(f"\n1. over the forward (onnxcam / plain onnxruntime session, same batch)\n"
              f"{'model':<26} {'call':<26} {'batch':>5} {'median ms':>9} {'best ms':>9} {'/forward':>8}", flush=True)
        shared = SHARED_MOBILENETS if args.shared else []
        for path in shared[-1:] if args.quick else shared:
            results["over_forward"] += overhead_rows(path.stem, path, args)
        for name in args.models:
            results["over_forward"] += overhead_rows(name, export(name), args)

        print(f"\n2. vs pytorch-grad-cam (same weights, same inputs)\n{vs.HEADER}", flush=True)
        for name in dict.fromkeys(args.pgc_models + args.scorecam_models):
            bench = vs.Bench(name, argparse.Namespace(**{**vars(args), "batch": [1, args.batch]}), folder)
            if name in args.pgc_models:
                for batch in (1, args.batch):
                    rows = [bench.method_row("gradcam", batch)]
                    results["vs_pytorch_grad_cam"] += vs.run_group(bench, rows, batch, args.pgc_repeats, args.settle,
                                                                    args.timer)
            if name in args.scorecam_models:
                print(f"{name:<13} scorecam: onnxcam runs each distinct mask once, here {bench.distinct_masks()}",
                      flush=True)
                rows = [bench.method_row("scorecam", 1, batch_size=args.scorecam_batch_size)]
                results["vs_pytorch_grad_cam"] += vs.run_group(bench, rows, 1, args.scorecam_repeats, args.settle,
                                                                args.timer)
            del bench

        print(f"\n3. peak RSS (fresh processes, VmHWM)\n"
              f"{'model':<26} {'process':<26} {'model MiB':>9} {'peak MiB':>11} {'/forward':>8}", flush=True)
        for name in args.memory_models:
            results["memory"] += memory_rows(name, export(name), args, folder)
    machine["load_after"] = os.getloadavg()
    machine["seconds"] = time.perf_counter() - started
    Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\nload average {machine['load_after'][0]:.1f}; {machine['seconds']:.0f} s; results in {args.json}")


if __name__ == "__main__":
    main()
