"""Benchmark: what Grad-CAM costs on top of one plain forward pass.

Side by side in one process: onnxruntime on the original model (forward only) and onnxcam's
``Explainer.explain`` (the rewritten model's forward + in-graph backward, then the map),
same provider, same inputs. Prints medians and the ratio, then Score-CAM's time at batch 1
and, on CUDA, how many nodes onnxruntime placed on the CPU. Usage:

    python tools/bench_overhead.py [MODEL] [--device cpu|cuda|auto] [--batch 1 8] [--repeats 20]
    python tools/bench_overhead.py [MODEL] --nodes [--repeats 50]

``--nodes`` says where a batch-1 Grad-CAM's extra time goes, on one thread and independent of
load from elsewhere: onnxruntime's profiler sums the kernel time of the model's own nodes and
of the nodes onnxcam added (backward and map, named ``onnxcam/...``), with the costliest added
ops; then, interleaved, the CPU time of the calling thread (where a one-thread onnxruntime
runs) for the plain forward, the rewritten model's run alone and ``Explainer.explain``
(run + Python per call), 25th percentiles, each call right after a plain forward.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxcam import Explainer  # noqa: E402

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "models" / "mobilenet" / "mobilenet_v2_1.0_224.onnx"


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", "--provider", dest="device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: one per core)")
    parser.add_argument("--scorecam-repeats", type=int, default=3, help="0 skips Score-CAM")
    parser.add_argument("--nodes", action="store_true", help="where the extra time goes (one thread, CPU)")
    args = parser.parse_args()
    if args.nodes:
        return added_nodes(args.model, args.repeats)

    explainer = Explainer(args.model, provider=args.device, threads=args.threads)
    rewritten, session = explainer.prepared()
    options = ort.SessionOptions()
    if args.threads:
        options.intra_op_num_threads = args.threads
    plain = ort.InferenceSession(args.model, options, providers=session.session.get_providers())
    input_name = plain.get_inputs()[0].name
    print(f"{Path(args.model).name} on {session.provider}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"{'batch':>5} {'forward ms':>11} {'gradcam ms':>11} {'ratio':>6}")
    rng = np.random.default_rng(0)
    ratios: dict[str, str] = {}
    for batch in args.batch:
        height, width = explainer.input_size
        shape = (batch, 3, height, width) if explainer.input_layout == "NCHW" else (batch, height, width, 3)
        x = rng.uniform(-1, 1, shape).astype(np.float32)
        static = explainer.graph.static_batch()

        def forward() -> None:
            step = static or batch
            for start in range(0, batch, step):
                plain.run(None, {input_name: x[start:start + step]})

        fwd = median_ms(forward, args.repeats)
        cam = median_ms(lambda: explainer.explain(x), args.repeats)
        print(f"{batch:>5} {fwd:>11.1f} {cam:>11.1f} {cam / fwd:>6.2f}")
        ratios.setdefault("ratio", f"{cam / fwd:.2f} (batch {batch})")
    if args.scorecam_repeats:
        x = rng.uniform(-1, 1, (1,) + shape[1:]).astype(np.float32)
        score = median_ms(lambda: explainer.explain(x, "scorecam"), args.scorecam_repeats)
        print(f"scorecam ms (batch 1): {score:.0f}")
    placement = session.placement
    print(f"provider: {session.provider}")
    print("cpu-placed nodes: " + (placement.describe() if placement else "not counted (CPU session)"))
    print(f"gradcam/forward ratio: {ratios.get('ratio', '-')}")


def kernel_times(path: str, feeds: dict, outputs: list[str] | None, repeats: int) -> dict[str, tuple[str, float]]:
    """Mean kernel time (us) per node over ``repeats`` one-thread runs: {node: (op, us)}."""
    import json
    import tempfile

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        for _ in range(repeats):
            session.run(outputs, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, tuple[str, float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"][:-len("_kernel_time")]
            op, total = times.get(node, (event["args"].get("op_name", "?"), 0.0))
            times[node] = (op, total + event["dur"] / repeats)
    return times


def added_nodes(model: str, repeats: int) -> None:
    from onnxcam.surgery import SEED

    explainer = Explainer(model, provider="cpu", threads=1)
    height, width = explainer.input_size
    shape = (1, 3, height, width) if explainer.input_layout == "NCHW" else (1, height, width, 3)
    x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    explainer.explain(x)
    request = explainer._map_requests["gradcam"]
    rewritten, session = explainer._maps_session(request)
    names = [rewritten.logits, *rewritten.layers, *rewritten.gradients.values(), *rewritten.weights.values(),
             rewritten.heatmap]
    feeds = {rewritten.input: x, SEED: np.zeros((1, explainer._classes()), np.float32)}
    with tempfile_model(rewritten) as path:
        times = kernel_times(path, feeds, names, repeats)
    added = {n: t for n, t in times.items() if n.startswith("onnxcam")}
    own = sum(us for n, (_, us) in times.items() if n not in added)
    extra = sum(us for _, us in added.values())
    print(f"{Path(model).name}, one thread: model's own nodes {own:.0f} us, onnxcam's {len(added)} added nodes "
          f"{extra:.0f} us ({extra / own:.1%})")
    by_op: dict[str, float] = {}
    for op, us in added.values():
        by_op[op] = by_op.get(op, 0.0) + us
    print("  added, by op: " + ", ".join(f"{op} {us:.0f}" for op, us in sorted(by_op.items(), key=lambda t: -t[1])[:10]))

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    plain = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    image = plain.get_inputs()[0].name
    calls = {"forward": lambda: plain.run(None, {image: x}),
             "rewritten run": lambda: session.session.run(names, feeds),
             "explain": lambda: explainer.explain(x)}
    spent: dict[str, list[int]] = {k: [] for k in calls}
    # each onnxcam call right after a plain forward, as the forward after it: the same caches
    # (two sessions never share weight buffers; back to back, a session would find its own warm)
    order = ["forward", "rewritten run", "forward", "explain"]
    for _ in range(max(repeats, 100)):
        for key in order:
            started = time.thread_time_ns()
            calls[key]()
            spent[key].append(time.thread_time_ns() - started)
    p25 = {k: float(np.percentile(v, 25)) / 1e3 for k, v in spent.items()}
    print("  calling thread's CPU time, p25: " + ", ".join(
        f"{k} {us:.0f} us ({us / p25['forward']:.3f}x)" for k, us in p25.items()))


def tempfile_model(rewritten):
    """The rewrite's model as a file (its cache entry when it has one)."""
    import contextlib
    import tempfile

    import onnx

    if rewritten.path is not None:
        return contextlib.nullcontext(str(rewritten.path))

    @contextlib.contextmanager
    def written():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "rewritten.onnx"
            onnx.save(rewritten.model, str(path))
            yield str(path)
    return written()


if __name__ == "__main__":
    main()
