"""Stage 3: run rewritten models with onnxruntime, on CUDA where it really works.

``onnxruntime-gpu`` lists the CUDA provider even on machines without a GPU, and creating a
session with it there logs a loud error before falling back to CPU. So CUDA is probed once,
quietly (:func:`cuda_status`):

1. the build has a CUDA provider, and the NVIDIA driver (``libcuda``) loads, and its CUDA
   version is at least the major version onnxruntime was built for;
2. ``onnxruntime.preload_dlls()`` (onnxruntime-gpu >= 1.21) loads CUDA and cuDNN from the
   NVIDIA pip wheels, so ``auto`` finds them when installed that way;
3. a one-Conv session runs on ``CUDAExecutionProvider`` (cuDNN loads lazily, at the first
   Conv: a Relu probe passes where the model's first Conv then fails), with onnxruntime's
   default logger and the session's logger silenced, one thread.

When a step fails, the reason is kept (the missing library's name from the dynamic loader,
a driver too old for the build's CUDA), so ``--provider cuda`` says why it cannot run.

On CUDA, nodes without a CUDA kernel run on the CPU while ``get_providers()[0]`` still says
CUDA. A CUDA session therefore profiles its first run (then stops) and counts where the
nodes ran (:class:`Placement`); the count is logged, and a gradient subgraph mostly on the
CPU is warned about.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort

from . import large_models
from .errors import OnnxcamError, OnnxcamWarning
from .model import first_line

log = logging.getLogger("onnxcam")
_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
#: onnxruntime's default logger severity (WARNING); it has no getter to save and restore.
_ORT_DEFAULT_SEVERITY = 2
#: Node names the autodiff emits (onnxcam.autodiff.Emitter's prefix).
GRADIENT_PREFIX = "onnxcam/"


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(True, "") when onnxruntime can really run a Conv on a CUDA device here, else
    (False, why). Computed once per process; see the module docstring."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "this onnxruntime build has no CUDA provider (pip install onnxruntime-gpu)"
    driver = _load_driver()
    if isinstance(driver, str):
        return False, driver
    mismatch = _version_mismatch(_driver_cuda_version(driver), _build_cuda_version())
    if mismatch:
        return False, mismatch
    preload_messages = _preload_dlls()
    reason = _probe_conv()
    if reason is None:
        return True, ""
    missing = _provider_library_error() or "; ".join(preload_messages)
    return False, f"{reason}: {missing}" if missing else reason


def cuda_usable() -> bool:
    """True when onnxruntime can really run a node on a CUDA device here."""
    return cuda_status()[0]


def _load_driver() -> ctypes.CDLL | str:
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return f"no NVIDIA driver: {name} cannot be loaded (no GPU here, or its driver is not installed)"


def _driver_cuda_version(driver) -> tuple[int, int] | None:
    """The newest CUDA version the driver supports (cuDriverGetVersion: 1000 * major + 10 * minor)."""
    try:
        version = ctypes.c_int(0)
        if driver.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
        return version.value // 1000, (version.value % 1000) // 10
    except (AttributeError, OSError):
        return None


def _build_cuda_version() -> tuple[int, int] | None:
    """The CUDA version onnxruntime-gpu was built for (its build_and_package_info)."""
    try:
        from onnxruntime.capi import build_and_package_info as info
        major, minor = str(info.cuda_version).split(".")[:2]
        return int(major), int(minor)
    except (ImportError, AttributeError, ValueError):
        return None


def _version_mismatch(driver: tuple[int, int] | None, build: tuple[int, int] | None) -> str | None:
    """Why a driver supporting CUDA ``driver`` cannot run onnxruntime built for ``build``."""
    if driver is None or build is None or driver[0] >= build[0]:
        return None
    return (f"CUDA major version mismatch: the NVIDIA driver supports CUDA up to {driver[0]}.{driver[1]} "
            f"but onnxruntime-gpu {ort.__version__} is built for CUDA {build[0]}.{build[1]} (update the "
            f"driver, or install an onnxruntime-gpu built for CUDA {driver[0]})")


def _preload_dlls() -> list[str]:
    """``onnxruntime.preload_dlls()`` where it exists; returns the failures it reported
    (it prints them: captured here, so nothing reaches the terminal)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return []
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            preload()
    except Exception as exc:  # noqa: BLE001 - a failed preload only means: not from the wheels
        return [first_line(exc)]
    return [line.strip() for line in printed.getvalue().splitlines() if line.startswith("Failed to load")]


def _probe_model() -> onnx.ModelProto:
    """x [1, 1, 8, 8] -> Conv 3x3 -> Relu: cuDNN is loaded at the first Conv."""
    weight = onnx.numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "w")
    return onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["x", "w"], ["c"]), onnx.helper.make_node("Relu", ["c"], ["y"])],
            "probe", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 6, 6])], [weight]),
        opset_imports=[onnx.helper.make_opsetid("", 13)], ir_version=7)


@contextlib.contextmanager
def quiet_onnxruntime():
    """onnxruntime's default logger at FATAL only (it prints a red ``[E:...]`` line when a
    provider's libraries are missing), back to its default (WARNING) after."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(_ORT_DEFAULT_SEVERITY)


def _probe_conv() -> str | None:
    """None when the probe Conv ran on CUDA, else why not."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    try:
        with quiet_onnxruntime():
            session = ort.InferenceSession(_probe_model().SerializeToString(), options,
                                           providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            if "CUDAExecutionProvider" not in session.get_providers():
                return "onnxruntime could not create its CUDA provider"
            y = session.run(None, {"x": np.ones((1, 1, 8, 8), np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - any failure means CUDA is not usable
        return f"a Conv on CUDA failed ({first_line(exc)})"
    if not np.allclose(y, 9.0):
        return "a Conv on CUDA gave wrong results"
    return None


def _provider_library_error() -> str | None:
    """The dynamic loader's message for onnxruntime's CUDA provider library, which names the
    first missing dependency (``libcudnn.so.9: cannot open shared object file``); None
    when it loads."""
    folder = os.path.join(os.path.dirname(ort.__file__), "capi")
    prefix, suffix = ("", ".dll") if sys.platform == "win32" else ("lib", ".so")
    shared = os.path.join(folder, f"{prefix}onnxruntime_providers_shared{suffix}")
    cuda = os.path.join(folder, f"{prefix}onnxruntime_providers_cuda{suffix}")
    try:
        if os.path.exists(shared):
            ctypes.CDLL(shared, mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        ctypes.CDLL(cuda)
    except OSError as exc:
        return first_line(exc)
    return None


def resolve_provider(provider: str) -> str:
    """'auto' -> 'cuda' when usable else 'cpu'; 'cuda' without CUDA is an error saying why."""
    provider = str(provider).lower()
    if provider not in ("auto", "cpu", "cuda"):
        raise OnnxcamError(f"unknown provider '{provider}': use auto, cpu or cuda")
    if provider == "auto":
        return "cuda" if cuda_usable() else "cpu"
    if provider == "cuda":
        usable, why = cuda_status()
        if not usable:
            raise OnnxcamError(f"provider 'cuda' requested but CUDA is not usable here: {why}; "
                               "use --provider cpu or auto")
    return provider


# -- where nodes ran --------------------------------------------------------------------------

@dataclass
class Placement:
    """Where a session's nodes ran (from onnxruntime's profile of one run). ``gradient_*``:
    the nodes the autodiff emitted (named ``onnxcam/...``)."""

    nodes: int
    cpu: int
    gradient_nodes: int
    gradient_cpu: int
    cpu_ops: dict[str, int] = field(default_factory=dict)

    @property
    def gradient_mostly_on_cpu(self) -> bool:
        return self.gradient_nodes > 0 and 2 * self.gradient_cpu > self.gradient_nodes

    def describe(self) -> str:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.cpu_ops.items(), key=lambda kv: -kv[1])[:6])
        return (f"{self.cpu} of {self.nodes} nodes ran on the CPU ({self.gradient_cpu} of "
                f"{self.gradient_nodes} gradient nodes)" + (f": {ops}" if ops else ""))


def placement_from_profile(events: list[dict]) -> Placement:
    """Count the distinct nodes per provider in an onnxruntime profile (the ``Node`` events
    ``<node>_kernel_time`` carry ``args.provider`` and ``args.op_name``)."""
    providers: dict[str, tuple[str, str]] = {}
    for event in events:
        name, args = event.get("name", ""), event.get("args") or {}
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and "provider" in args:
            providers[name[:-len("_kernel_time")]] = (args["provider"], args.get("op_name", "?"))
    on_cpu = {name: op for name, (provider, op) in providers.items() if provider == "CPUExecutionProvider"}
    gradient = [name for name in providers if GRADIENT_PREFIX in name]
    return Placement(len(providers), len(on_cpu), len(gradient),
                     sum(1 for name in gradient if name in on_cpu), dict(Counter(on_cpu.values())))


class Session:
    """An onnxruntime session plus the provider it actually runs on.

    ``source`` names where the model came from (a cache entry) in error messages;
    ``placement`` profiles the first run to count where nodes ran (default: on CUDA only),
    then :attr:`placement` holds the :class:`Placement`.
    """

    def __init__(self, model: onnx.ModelProto | bytes | str, provider: str = "auto",
                 optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                 threads: int = 0, source: str | None = None, placement: bool | None = None,
                 prepack: bool = True, spinning: bool = True):
        wanted = resolve_provider(provider)
        self.source = source
        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as one OnnxcamError line, not a log line too
        options.graph_optimization_level = optimization
        if threads:
            options.intra_op_num_threads = threads
        if not spinning:
            # Sessions that alternate with another (a forward, then the head for several
            # targets; Score-CAM's masked batches): a pool that spin-waits after its run takes
            # the cores from the other session's run (mobilenet_v2 top-5 on 2 cores: 39-52 ms
            # with spinning, 15-18 ms without). A session run alone keeps spinning (lower latency).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.placement: Placement | None = None
        self._profile_folder = None
        if placement if placement is not None else wanted == "cuda":
            self._profile_folder = tempfile.mkdtemp(prefix="onnxcam-profile-")
            weakref.finalize(self, shutil.rmtree, self._profile_folder, True)
            options.enable_profiling = True
            options.profile_file_prefix = os.path.join(self._profile_folder, "run")
        if not prepack:
            # Each Gemm/MatMul kernel keeps its own packed copy of its weight; in a gradient
            # graph the forward and the backward node read the same one, so it was packed
            # twice (vgg16: +500 MiB); at batch 1 unpacked was no slower, at batch 5 up to 2x slower
            options.add_session_config_entry("session.disable_prepacking", "1")
        providers = [_NAMES[wanted]] + (["CPUExecutionProvider"] if wanted != "cpu" else [])
        try:
            self.session = (large_models.session(model, options, providers)
                            if isinstance(model, onnx.ModelProto)
                            else ort.InferenceSession(model, options, providers=providers))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise OnnxcamError(f"onnxruntime cannot load the model{self._from()}: {first_line(exc)}") from None
        used = self.session.get_providers()[0]
        self.provider = {v: k for k, v in _NAMES.items()}.get(used, used)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._outputs = frozenset(self.output_names)
        self._present: dict[tuple[str, ...], tuple[str, ...]] = {}
        #: (outputs, batch) runs whose outputs were found to keep the batch axis (check_batch)
        self.batches_checked: set[tuple[tuple[str, ...], int]] = set()

    def present(self, names: Sequence[str]) -> tuple[str, ...]:
        """``names`` once each, in order, without those the model does not output; remembered
        per list (the Explainer asks on every call)."""
        key = tuple(names)
        found = self._present.get(key)
        if found is None:
            found = self._present[key] = tuple(n for n in dict.fromkeys(key) if n in self._outputs)
        return found

    def _from(self) -> str:
        return f" ({self.source}; 'onnxcam cache clear' removes it)" if self.source else ""

    def run(self, feeds: dict[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run and return the requested outputs by name; errors come back as one line."""
        names = outputs or self.output_names
        try:
            values = self.session.run(names, feeds)
        except Exception as exc:  # noqa: BLE001
            raise OnnxcamError(f"onnxruntime failed to run the model{self._from()}: {first_line(exc)}") from None
        if self._profile_folder is not None and self.placement is None:
            self._count_placement()
        return dict(zip(names, values))

    def _count_placement(self) -> None:
        """End the profiling (later runs are not profiled), count, log, warn, clean up."""
        try:
            path = self.session.end_profiling()
            with open(path, encoding="utf-8") as stream:
                self.placement = placement_from_profile(json.load(stream))
        except (OSError, ValueError) as exc:
            log.info("node placement unknown: %s", first_line(exc))
            return
        finally:
            shutil.rmtree(self._profile_folder, ignore_errors=True)
        log.info("onnxruntime on %s: %s", self.provider, self.placement.describe())
        if self.provider != "cpu" and self.placement.gradient_mostly_on_cpu:
            warnings.warn(f"on {self.provider}, most of the gradient ran on the CPU: {self.placement.describe()}",
                          OnnxcamWarning, stacklevel=3)
