"""Explain datasets on a Ray cluster (``pip install "onnxcam[ray]"``).

The images become a Ray Data dataset of paths; ``map_batches`` sends batches to a pool of
actors, each holding one :class:`onnxcam.runner.Worker` (one onnxruntime session set) for its
whole life. Each actor decodes, explains and writes its batch to the output folder exactly as
a local run does (same names, same files) and returns the records; the driver appends them to
``results.jsonl``, so resume and ``--overwrite`` work as locally.

What is per worker and what is per image: actors on a node that sees the driver's model file
unchanged (the same machine, or a shared file system) read it there, like a local run, its
weights left in the file (:mod:`onnxcam.large_models`); elsewhere the driver's bytes come
through Ray's object store and are written to a file of the actor's own first, so no actor
holds the model in memory. The rewrite (surgery + autodiff) is done once by the driver's
check and read back from the rewrite cache by every actor on the same machine (on other
machines, the first actor of each node builds it, the others find it in that node's cache);
the session is built once per actor. Per image there is only decoding, the model run and the
writes, so throughput scales with the actors while the cluster has cores (or GPUs) for them
and the output folder (a shared file system on a real cluster) keeps up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OnnxcamError
from .explainer import Explainer
from .images import Preprocess
from .runner import Item, Journal, Settings, Summary, Worker, explain_folder, recorder


@dataclass(frozen=True)
class _ModelFile:
    """Where an actor finds the model: the driver's file where the actor's node has it
    unchanged (same size and modification time), else ``data``, the file's bytes in Ray's
    object store (None when every actor is on the driver's machine, or for a model with
    external data, whose files must then be readable from every node)."""

    path: str
    stamp: tuple[int, int]
    data: Any = None

    def here(self) -> tuple[str, str | None]:
        """The model file to open on this node, and the temporary folder holding it when it
        was written here from the object store (the caller removes it)."""
        try:
            stat = os.stat(self.path)
            if (stat.st_size, stat.st_mtime_ns) == self.stamp:
                return self.path, None
        except OSError:
            pass
        if self.data is None:
            raise OnnxcamError(f"the model {self.path} is not readable (or not the driver's file) on this Ray "
                               "node: put it on a file system every node shares")
        import ray
        folder = tempfile.mkdtemp(prefix="onnxcam-ray-model-")
        path = os.path.join(folder, os.path.basename(self.path))
        try:
            with open(path, "wb") as stream:
                stream.write(ray.get(self.data))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return path, folder


@dataclass(frozen=True)
class _Blueprint:
    """Everything an actor needs to rebuild the driver's worker (picklable)."""

    model: _ModelFile
    layers: tuple[str, ...]
    output: str | None
    provider: str
    input_size: tuple[int, int] | None
    batch_size: int
    threads: int
    preprocess: Preprocess
    settings: Settings
    outdir: str

    def worker(self) -> Worker:
        path, folder = self.model.here()
        explainer = Explainer(path, layer=list(self.layers), provider=self.provider, output=self.output,
                              batch_size=self.batch_size, input_size=self.input_size, threads=self.threads)
        worker = Worker(explainer, self.preprocess, self.settings, self.outdir)
        if folder is not None:  # the actor's copy goes with it (a mapped file outlives its name)
            weakref.finalize(worker, shutil.rmtree, folder, True)
        return worker


class _Actor:
    """A Ray Data actor: one worker (sessions built once), called per batch of paths."""

    def __init__(self, blueprint: _Blueprint):
        self.worker = blueprint.worker()
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="onnxcam-io")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [Item(str(p), str(k), str(n)) for p, k, n in zip(batch["path"], batch["key"], batch["name"])]
        records = self.worker.process(items, self.pool)
        return {"record": np.array([json.dumps(r) for r in records], dtype=object)}


def _model_for_actors(source: str) -> _ModelFile:
    """The model file for the actors (:class:`_ModelFile`): its bytes go to the object store
    unless the cluster is this machine alone or the weights are in external data files."""
    import onnx
    import ray
    from onnx.external_data_helper import uses_external_data
    path = Path(source).absolute()
    if not path.is_file():
        raise OnnxcamError("Ray runs need the model as a file (Explainer given a ModelProto)")
    stat = path.stat()
    model = _ModelFile(str(path), (stat.st_size, stat.st_mtime_ns))
    skeleton = onnx.load(str(path), load_external_data=False)
    if any(uses_external_data(t) for t in skeleton.graph.initializer) or _only_this_machine():
        return model
    return replace(model, data=ray.put(path.read_bytes()))


def _only_this_machine() -> bool:
    """Whether the cluster's one node is this machine (a local cluster): its actors read the
    model file itself."""
    import ray
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def connect(address: str | None) -> None:
    """``ray.init`` unless already connected: ``None``/"local" starts a local cluster (or joins
    ``RAY_ADDRESS`` when set), anything else is a cluster address ("auto", "ray://host:10001")."""
    try:
        import ray
    except ImportError:
        raise OnnxcamError('Ray is not installed: pip install "onnxcam[ray]"') from None
    if ray.is_initialized():
        return
    # On this machine the actors share the driver's rewrite cache and import path.
    here = address in (None, "local", "auto")
    env = {k: os.environ[k] for k in ("ONNXCAM_CACHE_DIR", "PYTHONPATH") if k in os.environ and here}
    try:
        ray.init(address=None if address in (None, "local") else address, log_to_driver=False,
                 logging_level="WARNING", runtime_env={"env_vars": env} if env else None)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise OnnxcamError(f"cannot connect to the Ray cluster at {address}: {exc}") from None


def run_ray(worker: Worker, items: Sequence[Item], journal: Journal, batch_size: int, *,
            address: str | None = None, workers: int = 2, gpus: float = 0.0,
            on_record: Callable[[dict], None] | None = None,
            advance: Callable[[int], None] | None = None,
            stopping: Callable[[], bool] = lambda: False) -> Summary:
    """:func:`onnxcam.runner.run_local`'s counterpart on Ray: ``workers`` actors (1 CPU and
    ``gpus`` GPUs each; onnxruntime threads = 1 per actor unless the explainer sets them).
    A failure of Ray itself (an actor that cannot start, a lost node) ends the run with
    onnxcam's one-line error; what was recorded until then stays."""
    connect(address)
    import ray
    ray.data.DataContext.get_current().enable_progress_bars = False  # onnxcam shows its own
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    summary = Summary(str(journal.outdir), total=len(items))
    record = recorder(journal, summary, on_record, advance)
    if not items:
        return summary
    explainer = worker.explainer
    blueprint = _Blueprint(_model_for_actors(explainer.source), tuple(l.name for l in explainer.targets_layers),
                           explainer.output, explainer.provider_requested, explainer.input_size,
                           explainer.batch_size, explainer.threads or 1, worker.preprocess, worker.settings,
                           str(Path(worker.outdir).absolute()))
    rows = [{"path": str(Path(i.path).absolute()), "key": i.key, "name": i.name} for i in items]
    blocks = min(-(-len(rows) // batch_size), 10_000)  # about a batch per block: every actor gets work
    dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        _Actor, fn_constructor_args=(blueprint,), batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1, num_gpus=gpus or None,
        max_restarts=0)  # a lost actor fails the run (its images are redone by the next one)
    given = {item.key: item.path for item in items}  # records name files as the user gave them
    started = time.perf_counter()
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for line in batch["record"]:
                outcome = json.loads(line)
                outcome["file"] = given.get(outcome["input"], outcome["file"])
                record(outcome)
            journal.sync()
            if stopping():  # batches the actors are writing now are redone by the next run
                summary.interrupted = True
                break
    except KeyboardInterrupt:
        summary.interrupted = True
    except ray.exceptions.RayError as exc:
        lines = str(exc).strip().splitlines()
        raise OnnxcamError(f"the Ray run failed after {summary.explained} images: "
                           f"{lines[-1] if lines else type(exc).__name__}") from None
    summary.seconds = time.perf_counter() - started
    return summary


def explain_dataset(paths: Sequence[str | os.PathLike] | str | os.PathLike, model: str | os.PathLike,
                    outdir: str | os.PathLike = "onnxcam-out", *, method: str = "gradcam", targets: Any = None,
                    layer: str | Sequence[str] | None = None, output: str | None = None,
                    input_size: tuple[int, int] | None = None, preset: str | None = None,
                    labels: Sequence[str] | None = None, npy: bool = False, channels: int | None = None,
                    overlay_size: int | None = None, batch_size: int = 16, pattern: str | None = None,
                    overwrite: bool = False, provider: str = "auto", threads: int = 1,
                    address: str | None = None, workers: int = 2, gpus_per_worker: float = 0.0,
                    progress: bool = False, on_record: Callable[[dict], None] | None = None,
                    **options: Any) -> Summary:
    """Explain image files, folders or glob patterns on Ray; outputs as ``onnxcam explain``.

    ``address``: None/"local" (a local cluster, or ``RAY_ADDRESS`` when set), "auto", or
    "ray://head:10001"; ``workers`` actors with ``gpus_per_worker`` GPUs each (give
    ``provider="cuda"`` with GPUs); ``threads``: onnxruntime threads per actor. ``options``
    go to :meth:`Explainer.explain` (topk, eigen_smooth, samples, ...); ``on_record`` is
    called with each image's record as it is journaled. Returns the run's
    :class:`onnxcam.runner.Summary`; failing images are in ``summary.failed``."""
    explainer = Explainer(model, layer=layer, provider=provider, output=output, batch_size=batch_size,
                          input_size=input_size, threads=threads)
    preprocess = explainer.preprocess(preset, input_size)
    known = tuple(labels) if labels else (tuple(explainer.labels() or ()) or None)
    settings = Settings(method, targets, dict(options), known, npy, channels, overlay_size)
    inputs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return explain_folder(Worker(explainer, preprocess, settings, outdir), inputs, outdir, pattern=pattern,
                          batch_size=batch_size, overwrite=overwrite, progress=progress, on_record=on_record,
                          ray=address or "local", ray_workers=workers, ray_gpus=gpus_per_worker)
