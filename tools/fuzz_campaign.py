"""A long fuzz campaign: mutated models and images (tests/fuzz_cases.py) in a watched worker.

Each case runs in a worker process the parent watches: a case that raises anything but
onnxcam's own errors, produces out-of-range maps, exceeds ``--timeout`` seconds, or kills the
worker (a crash, or the worker's memory limit) is a failure. Failures are grouped by
signature (exception type and the deepest onnxcam frame, or "timeout"/"crash"), each with
the first case that showed it, so a case can be rerun in-process with ``--case N``::

    nice -n 19 python tools/fuzz_campaign.py --cases 12000 --report fuzz-report.json
    python tools/fuzz_campaign.py --case 4711          # rerun one case, with its traceback

Cases are numbered; case ``i`` is a model case when ``i % 5 < 3`` (seed model ``i`` modulo
the seeds), else an image case, with numpy's generator seeded by ``(--seed, i)``; random
bytes make one model case in 20 and one image case in 10.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing as mp
import resource
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_case(index: int, seed: int):
    """(kind, label, data, rng) of case ``index``."""
    import numpy as np

    from tests.fuzz_cases import IMAGE_KINDS, SEED_MODELS, mutated_image, mutated_model

    rng = np.random.default_rng([seed, index])
    if index % 5 < 3:
        if rng.random() < 0.05:
            return "model", "random bytes", rng.bytes(int(rng.integers(0, 4096))), rng
        label = sorted(SEED_MODELS)[index % len(SEED_MODELS)]
        return "model", label, mutated_model(label, rng), rng
    if rng.random() < 0.1:
        return "image", "random bytes", rng.bytes(int(rng.integers(0, 4096))), rng
    label = IMAGE_KINDS[index % len(IMAGE_KINDS)]
    return "image", label, mutated_image(label, rng), rng


def run_case(index: int, seed: int) -> str:
    from tests.fuzz_cases import run_image_case, run_model_case

    kind, _, data, rng = make_case(index, seed)
    return run_model_case(data, rng) if kind == "model" else run_image_case(data)


def signature(exc: BaseException) -> str:
    """Exception type and the deepest frame inside onnxcam (else the deepest frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/onnxcam/" in f.filename] or frames
    where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno} ({ours[-1].name})" if ours else "?"
    return f"{type(exc).__name__} at {where}"


def worker(connection, seed: int, memory_gb: float) -> None:
    limit = int(memory_gb * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import warnings
    warnings.simplefilter("ignore")
    while True:
        index = connection.recv()
        if index is None:
            return
        try:
            connection.send(("ok", run_case(index, seed), ""))
        except Exception as exc:  # noqa: BLE001 - the point: report whatever escapes
            connection.send(("fail", signature(exc), str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""))


def campaign(cases: int, start: int, seed: int, timeout: float, memory_gb: float) -> dict:
    context = mp.get_context("spawn")
    outcomes: collections.Counter = collections.Counter()
    failures: dict[str, dict] = {}
    slowest: list[tuple[float, int]] = []
    process = connection = None
    started = time.time()

    def restart():
        nonlocal process, connection
        if process is not None:
            process.kill()
            process.join()
        connection, child = context.Pipe()
        process = context.Process(target=worker, args=(child, seed, memory_gb), daemon=True)
        process.start()

    def fail(key: str, index: int, message: str):
        entry = failures.setdefault(key, {"count": 0, "first_case": index, "message": message})
        entry["count"] += 1
        outcomes["FAILED"] += 1

    restart()
    for index in range(start, start + cases):
        kind, label, _, _ = make_case(index, seed)
        began = time.time()
        connection.send(index)
        if not connection.poll(timeout):
            fail(f"timeout over {timeout:.0f} s ({kind})", index, label)
            restart()
            continue
        try:
            status, value, message = connection.recv()
        except EOFError:
            fail(f"worker died ({kind}: crash or memory limit)", index, label)
            restart()
            continue
        elapsed = time.time() - began
        slowest = sorted(slowest + [(elapsed, index)], reverse=True)[:5]
        if status == "ok":
            outcomes[f"{kind}: {value}"] += 1
        else:
            fail(value, index, message)
        done = index - start + 1
        if done % 500 == 0:
            print(f"{done}/{cases} cases, {time.time() - started:.0f} s, {len(failures)} distinct failures",
                  flush=True)
    connection.send(None)
    process.join(timeout=10)
    return {"cases": cases, "start": start, "seed": seed, "seconds": round(time.time() - started, 1),
            "outcomes": dict(outcomes), "distinct_failures": len(failures), "failures": failures,
            "slowest": [{"case": i, "seconds": round(s, 2)} for s, i in slowest]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    parser.add_argument("--memory-gb", type=float, default=8.0, help="address-space limit of the worker")
    parser.add_argument("--report", type=Path, help="write the summary as JSON here")
    parser.add_argument("--case", type=int, help="rerun one case in this process, with its traceback")
    args = parser.parse_args()
    if args.case is not None:
        kind, label, data, _ = make_case(args.case, args.seed)
        print(f"case {args.case}: {kind} from {label}, {len(data)} bytes")
        print(run_case(args.case, args.seed))
        return
    report = campaign(args.cases, args.start, args.seed, args.timeout, args.memory_gb)
    print(json.dumps(report, indent=1))
    if args.report:
        args.report.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
