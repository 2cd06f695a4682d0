#!/usr/bin/env bash
# The CUDA path, checked in one go on a machine with an NVIDIA GPU:
#   1. pip install -e ".[dev]"
#   2. the probe: is CUDA usable, and if not, why (missing library, driver/build mismatch)
#   3. the CUDA-relevant tests (tests/test_cuda.py runs on CUDA; test_runtime, test_cache)
#   4. tools/bench_overhead.py --device cuda (Grad-CAM / forward ratio, Score-CAM time,
#      nodes onnxruntime placed on the CPU)
#   5. onnxcam explain --provider cuda on a sample image
# and prints a short report at the end. On a machine without a usable GPU it says so, runs
# the same checks on the CPU, and exits 0 when they pass.
# Usage: bash tools/gpu_check.sh [--no-install] [MODEL.onnx]   (default: ../shared's mobilenet_v2)
set -uo pipefail
cd "$(dirname "$0")/.."
INSTALL=1
if [ "${1:-}" = --no-install ]; then INSTALL=0; shift; fi
LOG=$(mktemp -d "${TMPDIR:-/tmp}/onnxcam-gpu-check.XXXXXX")
export ONNXCAM_CACHE_DIR="$LOG/cache"   # a fresh cache: the first run rewrites, as a user's would
status=0
step() { echo "== $*"; }

if [ $INSTALL = 1 ]; then
  step "install (log: $LOG/pip.log)"
  # offline machines: retry without build isolation (no setuptools download), then fall back
  # to running from the checkout
  if ! python -m pip install -e ".[dev]" >"$LOG/pip.log" 2>&1 &&
     ! python -m pip install --no-build-isolation -e ".[dev]" >>"$LOG/pip.log" 2>&1; then
    echo "pip install failed (last line: $(tail -1 "$LOG/pip.log")); running from the checkout"
    INSTALL=0
  fi
fi
[ $INSTALL = 0 ] && export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "CUDA probe"
python - >"$LOG/probe.txt" 2>&1 <<'EOF'
import onnxruntime as ort
from onnxcam.runtime import cuda_status
usable, why = cuda_status()
print("DEVICE=" + ("cuda" if usable else "cpu"))
print(f"onnxruntime {ort.__version__} ({ort.get_device()}), providers: {', '.join(ort.get_available_providers())}")
print("CUDA usable" if usable else f"CUDA not usable: {why}")
if not usable and "shared object" in why:
    print("hint: pip install 'onnxruntime-gpu[cuda,cudnn]' installs CUDA and cuDNN as wheels, "
          "which onnxcam finds through onnxruntime.preload_dlls()")
EOF
grep -v '^DEVICE=' "$LOG/probe.txt"
DEVICE=$(sed -n 's/^DEVICE=//p' "$LOG/probe.txt")
DEVICE=${DEVICE:-cpu}
if [ "$DEVICE" = cpu ]; then
  echo "no usable GPU here: checking the CPU path only (tests/test_cuda.py will be skipped)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
fi

step "tests (log: $LOG/pytest.log)"
python -m pytest tests/test_cuda.py tests/test_runtime.py tests/test_cache.py -q -rs -s >"$LOG/pytest.log" 2>&1
tests=$?
tail -3 "$LOG/pytest.log"
[ $tests -ne 0 ] && status=1

MODEL=${1:-../shared/models/mobilenet/mobilenet_v2_1.0_224.onnx}
[ -f "$MODEL" ] || MODEL=models/demo/shapes.onnx
step "bench_overhead --device $DEVICE on $MODEL (log: $LOG/bench.log)"
python tools/bench_overhead.py "$MODEL" --device "$DEVICE" --batch 1 8 --repeats 20 >"$LOG/bench.log" 2>&1
bench=$?
cat "$LOG/bench.log"
[ $bench -ne 0 ] && status=1

step "onnxcam explain --provider $DEVICE"
python -m onnxcam.cli explain models/demo/shapes.onnx models/demo/samples/circle.png \
  -o "$LOG/explain" --provider "$DEVICE" >"$LOG/explain.log" 2>&1
explain=$?
cat "$LOG/explain.log"
[ $explain -ne 0 ] && status=1

echo
echo "== report"
echo "device:            $DEVICE ($(grep -E '^CUDA' "$LOG/probe.txt"))"
echo "provider used:     $(sed -n 's/^provider: //p' "$LOG/bench.log")"
echo "CPU-placed nodes:  $(sed -n 's/^cpu-placed nodes: //p' "$LOG/bench.log")"
echo "Grad-CAM/forward:  $(sed -n 's/^gradcam\/forward ratio: //p' "$LOG/bench.log")"
echo "Score-CAM:         $(sed -n 's/^scorecam ms (batch 1): //p' "$LOG/bench.log") ms (batch 1)"
echo "tests:             $(tail -1 "$LOG/pytest.log")"
grep -E '^mobilenet.* on CUDA' "$LOG/pytest.log" | sed 's/^/                   /'
echo "explain:           $([ $explain -eq 0 ] && grep -o '\[[a-z]*, [0-9]* ms\]' "$LOG/explain.log" | head -1 || echo failed)"
echo "logs:              $LOG"
exit $status
