"""Benchmark: what a self-explaining export (``onnxcam export``) costs next to the plain model.

Side by side in one run, per model: the plain model and the exported file (one class, and
``--topk 5``) in Python onnxruntime (CPU, batch 1, median), the same in onnxruntime-node
(tools/time_node.js, when NODE_PATH finds it), file size and node count; and the exported
file in headless Chromium with onnxruntime-web (WASM, one thread), timed by wall-clock console
stamps. Ratios are to the plain model in the same runtime. Usage:

    NODE_PATH=.../node_modules python tools/bench_export.py [--models mobilenet_v2 resnet50] [--repeats 20]

resnet50 is torchvision's architecture with random weights, exported here with torch (a tool
dependency, never the package's); mobilenet_v2 is ../shared's.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxcam.deploy import write_web  # noqa: E402
from onnxcam.export import export_explained, save_explained  # noqa: E402

SHARED = ROOT.parent / "shared" / "models" / "mobilenet"


def resnet50(folder: Path) -> Path:
    import torch
    import torchvision

    path = folder / "resnet50.onnx"
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(model, torch.randn(1, 3, 224, 224), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path


def python_ms(path: Path, repeats: int) -> float:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in value.shape]
        feeds[value.name] = (np.full(dims, -1, np.int64) if value.type == "tensor(int64)"
                             else np.random.default_rng(0).uniform(-1, 1, dims).astype(np.float32))
    session.run(None, feeds)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def node_ms(path: Path, repeats: int) -> float | None:
    node = shutil.which("node")
    if node is None:
        return None
    done = subprocess.run([node, str(ROOT / "tools" / "time_node.js"), str(path), str(repeats)],
                          capture_output=True, text=True)
    return json.loads(done.stdout)["median_ms"] if done.returncode == 0 else None


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def browser_ms(path: Path, repeats: int, folder: Path) -> float | None:
    """Per-run wall time of the exported file in headless Chromium (onnxruntime-web WASM)."""
    chromium = shutil.which("chromium")
    modules = next((Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep)
                    if p and (Path(p) / "onnxruntime-web").exists()), None)
    if chromium is None or modules is None:
        return None
    site = folder / f"site-{path.stem}"
    write_web(path, site)
    (site / "node_modules").symlink_to(modules, target_is_directory=True)
    import cv2
    hw = json.loads((site / "config.json").read_text())["size"]
    cv2.imwrite(str(site / "x.png"), np.random.default_rng(0).integers(0, 255, (hw[0], hw[1], 3), np.uint8))
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/index.html?image=x.png&repeat={repeats}"
        done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--no-first-run", f"--user-data-dir={folder / 'profile'}", "--enable-logging=stderr",
                               "--v=0", "--virtual-time-budget=600000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=600)
    finally:
        httpd.shutdown()
    stamps = dict(re.findall(r":(\d{4}/\d{6}\.\d+):INFO:CONSOLE.*onnxcam-timing (start|end)", done.stderr))
    found = {kind: stamp for stamp, kind in stamps.items()}
    if set(found) != {"start", "end"}:
        return None
    seconds = [datetime.strptime(found[k], "%m%d/%H%M%S.%f") for k in ("start", "end")]
    return (seconds[1] - seconds[0]).total_seconds() * 1000 / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, onnxruntime "
          f"{ort.__version__}, 2 threads, batch 1, median of {args.repeats}; {time.strftime('%Y-%m-%d')}")
    print("model | file | size MB | nodes | Python ms (x plain) | Node ms (x plain) | browser WASM ms")
    print("---|---|---|---|---|---|---")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.models:
            plain = SHARED / "mobilenet_v2_1.0_224.onnx" if name == "mobilenet_v2" else resnet50(folder)
            files = {"plain": plain}
            for label, topk in (("gradcam", None), ("gradcam top-5", 5)):
                path = folder / f"{name}-{label.replace(' ', '')}.onnx"
                save_explained(export_explained(str(plain), "gradcam", topk=topk), path)
                files[label] = path
            base_py = base_node = None
            for label, path in files.items():
                model = onnx.load(str(path), load_external_data=False)
                py, nd = python_ms(path, args.repeats), node_ms(path, args.repeats)
                base_py, base_node = (py, nd) if label == "plain" else (base_py, base_node)
                web = browser_ms(path, max(3, args.repeats // 4), folder) if label == "gradcam" else None
                ratio = lambda v, b: f"{v:.1f} ({v / b:.2f}x)" if v is not None and b else "n/a"
                print(f"{name} | {label} | {path.stat().st_size / 1e6:.1f} | {len(model.graph.node)} | "
                      f"{ratio(py, base_py)} | {ratio(nd, base_node)} | {f'{web:.0f}' if web else ''}")


if __name__ == "__main__":
    main()
