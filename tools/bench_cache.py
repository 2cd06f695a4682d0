"""Benchmark: what verifying a cache entry costs on a hit.

Side by side in one process, on one model's cached rewrite: a verified hit
(:func:`onnxcam.cache.cached_rewrite`: key, manifest, SHA-256 of the entry, parse), a bare
``onnx.load`` of the same entry (what an unverified cache costs), and the rewrite itself
(a miss). Prints medians and ratios. Usage:

    python tools/bench_cache.py [MODEL] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_overhead import DEFAULT, median_ms  # noqa: E402 - tools/ is the script's folder
from onnxcam import Explainer  # noqa: E402
from onnxcam.cache import cache_key, cached_rewrite  # noqa: E402
from onnxcam.model import load_model  # noqa: E402
from onnxcam.surgery import RewriteRequest, rewrite  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=str(DEFAULT))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load_model(args.model)
    explainer = Explainer(model, cache=False)
    request = RewriteRequest((explainer.targets_layers[0].name,), explainer.logits_name)
    with tempfile.TemporaryDirectory() as folder:
        cached_rewrite(model, request, directory=Path(folder))
        entry = Path(folder) / f"{cache_key(model, request)}.onnx"
        hit = median_ms(lambda: cached_rewrite(model, request, directory=Path(folder)), args.repeats)
        bare = median_ms(lambda: onnx.load(str(entry)), args.repeats)
        key = median_ms(lambda: cache_key(model, request), args.repeats)
        miss = median_ms(lambda: rewrite(model, request), max(1, args.repeats // 2))
        size = entry.stat().st_size
    print(f"{Path(args.model).name}: entry {size / 2**20:.1f} MiB")
    print(f"verified hit {hit:.0f} ms (of which the key {key:.0f} ms), bare onnx.load {bare:.0f} ms, "
          f"rewrite {miss:.0f} ms")
    print(f"hit / bare load {hit / bare:.2f}, hit / rewrite {hit / miss:.3f}")


if __name__ == "__main__":
    main()
