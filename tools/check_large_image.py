"""Real 20000 x 20000 images through onnxcam.decode.load_image, each in a fresh process:
the shape it comes back at (or the error), the seconds, and the peak memory over the
interpreter's own. Not in CI (writing the images takes ~0.5 GB and a few seconds)::

    python tools/check_large_image.py [--side 20000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

PROBE = """
import sys, time, warnings
from onnxcam.decode import load_image
from onnxcam.errors import ImageError

def high_water():  # MiB; ru_maxrss would include the parent's peak, inherited across exec
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024

base = high_water()
started = time.perf_counter()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
        outcome = f"shape {load_image(sys.argv[1]).shape}"
    except ImageError as exc:
        outcome = f"ImageError: {exc}"
seconds = time.perf_counter() - started
peak = high_water() - base
print(f"{outcome}; {seconds:.2f} s; peak +{peak} MiB" + "".join(f"; warning: {w.message}" for w in caught))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=20000)
    args = parser.parse_args()
    side = args.side
    ramp = np.arange(side, dtype=np.uint32)
    image = ((ramp[:, None] // 64 + ramp[None, :] // 64) % 2 * 200 + 20).astype(np.uint8)  # a checkerboard
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        for suffix in (".jpg", ".png"):
            path = Path(folder) / f"huge{suffix}"
            assert cv2.imwrite(str(path), image)
            done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                                  cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})
            print(f"{side}x{side}{suffix} ({path.stat().st_size / 2 ** 20:.1f} MiB): "
                  f"{done.stdout.strip() or done.stderr.strip()}")


if __name__ == "__main__":
    main()
