"""Stage 2, kept: the rewrite cache. A second run on a model skips the surgery.

An entry is ``<key>.onnx`` (plus ``<key>.onnx.data`` for a model over 2 GiB, see
:mod:`onnxcam.large_models`) and its manifest ``<key>.json``, written last, atomically. The key
is a hash of

* the source model's content (:func:`onnxcam.large_models.fingerprint`),
* the request (:class:`onnxcam.surgery.RewriteRequest`),
* the source of every onnxcam module the rewrite runs (surgery and everything it imports:
  the autodiff, shape inference in model.py, large_models, ...: :func:`code_fingerprint`),
* the versions of onnx, onnxruntime, onnx-graphsurgeon, numpy and protobuf.

Nothing read from the cache folder is trusted beyond a checked hash: an entry is used only
when its manifest names this key, this source hash and this request, and each of its files
has the size and SHA-256 the manifest records (the bytes hashed are the bytes parsed); the
files must be regular files of ours that no one else can write. Anything else (a torn or
corrupt file, another model planted under the key, an entry without manifest) is rebuilt
with a warning naming the file. Nothing from the cache is executed: entries are parsed as
ONNX protobuf and JSON only. A cache folder that other users can write (group or world
writable, or not owned by us) is not used at all, with a warning: they could plant a
manifest too.

Concurrency: writers and readers of one key hold an exclusive lock on ``<key>.lock``
(``fcntl.flock``; a second process rewriting the same model waits, then reads the entry), and
every file is written to a temporary and renamed. Size: the folder is kept under
:func:`max_bytes` (``$ONNXCAM_CACHE_MAX_BYTES``, default 2 GiB) by removing the least
recently used entries (a hit touches the manifest's mtime). On first use in a process the
folder is swept of stale temporaries and orphaned entry files.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import re
import stat
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from . import large_models
from .errors import OnnxcamWarning
from .files import STALE_SECONDS, atomic_write_bytes, sweep_stale_temporaries
from .surgery import METADATA_KEY, RewriteRequest, Rewritten, rewrite

#: Manifest format; a change makes old entries misses.
FORMAT = 2  # 2: the manifest also holds the rewrite's metadata (sessions from the verified path)
DEFAULT_MAX_BYTES = 2 * 1024**3
#: A manifest is a few hundred bytes; a bigger one is not ours.
_MANIFEST_LIMIT = 1 << 20
#: How long a process waits for another one holding an entry's lock (building it).
LOCK_TIMEOUT = 1800.0
_KEY = re.compile(r"^([0-9a-f]{32})\.(json|onnx|onnx\.data|lock)$")
#: Temporary files of onnxcam versions that used ``tempfile.mkstemp`` (cache folder only).
_OLD_TEMP = re.compile(r"^\.[0-9a-f]{32}\.(json|onnx|onnx\.data)\.[a-z0-9_]{8}\.tmp$")
_PREPARED: set[str] = set()


class _Invalid(Exception):
    """An entry that must not be used: ``path`` and why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.path, self.reason = path, reason


def cache_dir() -> Path:
    """$ONNXCAM_CACHE_DIR, else $XDG_CACHE_HOME/onnxcam, else ~/.cache/onnxcam."""
    if os.environ.get("ONNXCAM_CACHE_DIR"):
        return Path(os.environ["ONNXCAM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "onnxcam"


def max_bytes() -> int:
    """The size bound: $ONNXCAM_CACHE_MAX_BYTES (bytes, or with a K, M or G suffix, powers
    of 1024; 0 disables storing), else :data:`DEFAULT_MAX_BYTES`."""
    text = os.environ.get("ONNXCAM_CACHE_MAX_BYTES", "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)i?b?", text.lower())
    if not match:
        warnings.warn(f"ONNXCAM_CACHE_MAX_BYTES='{text}' is not a size (e.g. 500M, 2G); "
                      f"using {DEFAULT_MAX_BYTES >> 30}G", OnnxcamWarning, stacklevel=2)
        return DEFAULT_MAX_BYTES
    return int(float(match.group(1)) * 1024 ** " kmg".index(match.group(2) or " "))


@functools.lru_cache(maxsize=4)
def code_fingerprint(package: Path | None = None) -> str:
    """Hash of the source of every module in :func:`shaping_modules`."""
    package = package or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in shaping_modules(package):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:32]


def shaping_modules(package: Path | None = None) -> list[Path]:
    """:mod:`onnxcam.surgery`, this module and every onnxcam module they import,
    transitively: found by reading their imports, so a new dependency of the rewrite is in
    the key without a list to keep up to date."""
    package = package or Path(__file__).resolve().parent
    pending, seen = [package / "surgery.py", package / "cache.py"], set()
    while pending:
        path = pending.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        pending.extend(_local_imports(path, package))
    return sorted(seen)


def _local_imports(path: Path, package: Path) -> list[Path]:
    """The onnxcam modules (files) that ``path`` imports with relative imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_bytes())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
        parts = node.module.split(".") if node.module else []
        target = base.joinpath(*parts)
        candidates = [target.with_suffix(".py"), target / "__init__.py"]
        if not parts:  # from . import x, y
            candidates = [base / f"{a.name}.py" for a in node.names] + [base / a.name / "__init__.py" for a in node.names]
        else:
            candidates += [target / f"{a.name}.py" for a in node.names]
        found += [c for c in candidates if c.is_file() and package in c.parents]
    return found


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The libraries whose behaviour shapes a rewrite (shape inference, the version
    converter, graph surgeon's cleanup, the dynamic-batch check)."""
    import google.protobuf
    import onnx_graphsurgeon
    import onnxruntime

    return {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx_graphsurgeon": onnx_graphsurgeon.__version__, "numpy": np.__version__,
            "protobuf": google.protobuf.__version__}


def _request_record(request: RewriteRequest) -> dict:
    return json.loads(json.dumps(asdict(request)))  # tuples as lists, as a manifest holds them


def cache_key(model: onnx.ModelProto, request: RewriteRequest, source_hash: str | None = None) -> str:
    """The entry's name: a hash of the model's content, the request, the code and versions."""
    source_hash = source_hash or large_models.fingerprint(model).hexdigest()
    identity = {"format": FORMAT, "source": source_hash, "request": _request_record(request),
                "code": code_fingerprint(), "versions": versions()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def refusal(directory: Path) -> str | None:
    """Why ``directory`` must not be used as a cache (others can write it), else None."""
    if os.name != "posix":
        return None
    try:
        info = os.stat(directory)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != os.getuid():
        return f"is owned by another user (uid {info.st_uid})"
    if info.st_mode & 0o022:
        return f"is writable by other users (mode {stat.S_IMODE(info.st_mode):o}); 'chmod go-w' it after checking its contents"
    return None


def cached_rewrite(model: onnx.ModelProto, request: RewriteRequest, source: str = "<model>",
                   directory: Path | None = None, threads: int = 0,
                   parse: bool = True) -> tuple[Rewritten, bool]:
    """The rewrite from the cache when a verified entry exists (returns ``(rewritten, hit)``),
    else built by :func:`onnxcam.surgery.rewrite` and stored. See the module docstring.
    ``parse=False``: a hit is verified without parsing and comes back as metadata plus
    ``Rewritten.path`` (the verified file, for an onnxruntime session to read); a large
    model's fresh rewrite also names the entry just stored in ``path``."""
    directory = Path(directory or cache_dir())
    try:
        if not directory.is_dir():  # mkdir on an existing folder costs ~10 ms on some filesystems
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        return rewrite(model, request, source, threads=threads), False  # read-only: no cache
    why = refusal(directory)  # after mkdir: someone else may have created it meanwhile
    if why is not None:
        warnings.warn(f"rewrite cache {directory} {why}: not using it (set ONNXCAM_CACHE_DIR "
                      "to another folder)", OnnxcamWarning, stacklevel=2)
        return rewrite(model, request, source, threads=threads), False
    source_hash = large_models.fingerprint(model).hexdigest()
    key = cache_key(model, request, source_hash)
    _prepare(directory)
    with _locked(directory, key) as locked:
        try:
            found = _load(directory, key, source_hash, request, parse)
        except _Invalid as exc:
            warnings.warn(f"rewrite cache entry {exc}; rebuilding it", OnnxcamWarning, stacklevel=2)
            found = None
        if found is not None:
            return found, True
        rewritten = rewrite(model, request, source, threads=threads)
        limit = max_bytes()
        if locked and _estimated_bytes(rewritten.model) <= limit:
            try:
                _store(directory, key, source_hash, request, source, rewritten.model)
            except OSError:  # a full or read-only cache only costs the next run a rewrite
                for path in _paths(directory, key):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
            else:
                if not parse and large_models.is_large(rewritten.model):
                    # the session maps the weights just written rather than another copy of them
                    # written for it (large_models.session)
                    entry = _paths(directory, key)[1]
                    rewritten.path, rewritten.origin = str(entry), f"cached rewrite {entry}"
    evict(directory, limit, keep={key})
    return rewritten, False


# -- entries ----------------------------------------------------------------------------------

def _paths(directory: Path, key: str) -> tuple[Path, Path, Path]:
    return directory / f"{key}.json", directory / f"{key}.onnx", directory / f"{key}.onnx.data"


def _check_file(path: Path) -> os.stat_result:
    """A regular file of ours that no other user can write, else :class:`_Invalid`."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise _Invalid(path, "is missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise _Invalid(path, "is not a regular file")
    if os.name == "posix" and (info.st_uid != os.getuid() or info.st_mode & 0o022):
        raise _Invalid(path, "is writable by another user")
    return info


def _load(directory: Path, key: str, source_hash: str, request: RewriteRequest,
          parse: bool = True) -> Rewritten | None:
    """The verified entry, None when there is none, :class:`_Invalid` when it is unusable.
    ``parse=False``: the files are hashed as streams and not parsed; the result's ``model``
    holds only the rewrite's metadata (from the manifest) and ``path`` names the verified file,
    for onnxruntime to read itself (the weights never become a Python object)."""
    manifest_path, entry, data = _paths(directory, key)
    if not os.path.lexists(manifest_path):
        for orphan in (entry, data):
            if os.path.lexists(orphan):
                raise _Invalid(orphan, "has no manifest (a killed writer's, or not ours)")
        return None
    if _check_file(manifest_path).st_size > _MANIFEST_LIMIT:
        raise _Invalid(manifest_path, "is too big to be a manifest")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        recorded = {name: (int(v["size"]), str(v["sha256"])) for name, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise _Invalid(manifest_path, f"is not a manifest ({type(exc).__name__})") from None
    for field, wanted in (("format", FORMAT), ("key", key), ("source_sha256", source_hash),
                          ("request", _request_record(request)), ("code", code_fingerprint()),
                          ("versions", versions())):
        if manifest.get(field) != wanted:
            raise _Invalid(manifest_path, f"records another {field.replace('_sha256', '')} than this request's")
    if set(recorded) not in ({entry.name}, {entry.name, data.name}):
        raise _Invalid(manifest_path, f"lists unexpected files {sorted(recorded)}")
    _check_file(entry)
    if not parse and isinstance(manifest.get("rewrite"), str):
        return _verified_path(manifest_path, entry, data, recorded, manifest["rewrite"])
    raw = entry.read_bytes()
    _verify(entry, raw, *recorded[entry.name])
    try:
        model = onnx.ModelProto.FromString(raw)
        if data.name in recorded:
            _check_file(data)
            with open(data, "rb") as stream:
                _verify(data, stream, *recorded[data.name])
            onnx.external_data_helper.load_external_data_for_model(model, str(directory))
        rewritten = Rewritten.from_model(model)
    except _Invalid:
        raise
    except Exception as exc:  # noqa: BLE001 - parsing a checked file should not fail; if it does, rebuild
        raise _Invalid(entry, f"cannot be read ({type(exc).__name__})") from None
    rewritten.origin = f"cached rewrite {entry}"
    with contextlib.suppress(OSError):
        os.utime(manifest_path)  # last used: eviction removes the least recently used first
    return rewritten


def _verified_path(manifest_path: Path, entry: Path, data: Path, recorded: dict, info: str) -> Rewritten:
    """An entry checked by streaming its files through sha256 (none of it kept in memory),
    described by the rewrite metadata its manifest holds."""
    for path in (entry, data):
        if path.name in recorded:
            _check_file(path)
            with open(path, "rb") as stream:
                _verify(path, stream, *recorded[path.name])
    stub = onnx.ModelProto()
    prop = stub.metadata_props.add()
    prop.key, prop.value = METADATA_KEY, info
    try:
        rewritten = Rewritten.from_model(stub)
    except Exception as exc:  # noqa: BLE001 - a manifest that verifies but does not describe a rewrite
        raise _Invalid(manifest_path, f"does not describe a rewrite ({type(exc).__name__})") from None
    rewritten.origin, rewritten.path = f"cached rewrite {entry}", str(entry)
    with contextlib.suppress(OSError):
        os.utime(manifest_path)  # last used: eviction removes the least recently used first
    return rewritten


def _digest(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 24), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _verify(path: Path, content, size: int, sha256: str) -> None:
    """``content`` (bytes, or a stream read in chunks) has ``size`` bytes and ``sha256``."""
    digest, length = hashlib.sha256(), 0
    chunks = [content] if isinstance(content, bytes) else iter(lambda: content.read(1 << 24), b"")
    for chunk in chunks:
        digest.update(chunk)
        length += len(chunk)
    if length != size:
        raise _Invalid(path, f"has {length} bytes where its manifest records {size}")
    if digest.hexdigest() != sha256:
        raise _Invalid(path, "does not match the SHA-256 its manifest records (changed or corrupt)")


def _estimated_bytes(model: onnx.ModelProto) -> int:
    if large_models.is_large(model):
        return sum(large_models.tensor_bytes(t) for t in model.graph.initializer)
    return model.ByteSize()


def _store(directory: Path, key: str, source_hash: str, request: RewriteRequest, source: str,
           model: onnx.ModelProto) -> None:
    """Write the entry's files, then its manifest (each atomically, owner-only)."""
    manifest_path, entry, data = _paths(directory, key)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(manifest_path)  # the entry being replaced is invalid from here on
    if large_models.is_large(model):
        large_models.save(model, entry, mode=0o600)
        files = {}
        for path in (entry, data):
            digest, size = _digest(path)
            files[path.name] = {"size": size, "sha256": digest}
    else:
        raw = model.SerializeToString()
        atomic_write_bytes(entry, raw, mode=0o600)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data)
        files = {entry.name: {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}}
    rewrite_info = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    manifest = {"format": FORMAT, "key": key, "source_sha256": source_hash,
                "request": _request_record(request), "code": code_fingerprint(),
                "versions": versions(), "files": files, "source": source, "created": time.time(),
                "rewrite": rewrite_info}
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode(), mode=0o600)


@contextlib.contextmanager
def _locked(directory: Path, key: str, blocking: bool = True) -> Iterator[bool]:
    """Hold the exclusive lock of ``key``; yields False when it could not be had (another
    process held it :data:`LOCK_TIMEOUT` seconds, or at once without blocking), True else.
    Where there are no locks (Windows, a filesystem without flock) yields True without
    locking: the renames and the digests still keep a reader from using a torn entry."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path = directory / f"{key}.lock"
    deadline = time.monotonic() + (LOCK_TIMEOUT if blocking else 0)
    handle = None
    while handle is None:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:
            yield False
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held by another process
            os.close(handle)
            handle = None
            if time.monotonic() >= deadline:
                yield False
                return
            time.sleep(0.05)
            continue
        except OSError:  # no locks on this filesystem: the renames and digests still hold
            os.close(handle)
            yield True
            return
        try:  # an evicter may have removed the lock file meanwhile: lock the current one
            same = os.path.samestat(os.fstat(handle), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(handle)
            handle = None
    try:
        yield True
    finally:
        os.close(handle)


# -- the folder -------------------------------------------------------------------------------

@dataclass
class Entry:
    """One key's files in the cache folder."""

    key: str
    files: list[Path]
    size: int
    last_used: float
    complete: bool


def entries(directory: Path | None = None) -> list[Entry]:
    """The folder's entries (grouped by key), least recently used first."""
    directory = Path(directory or cache_dir())
    groups: dict[str, list[tuple[Path, os.stat_result]]] = {}
    try:
        listing = list(os.scandir(directory))
    except OSError:
        return []
    for item in listing:
        match = _KEY.match(item.name)
        if match:
            with contextlib.suppress(OSError):
                groups.setdefault(match.group(1), []).append((Path(item.path), item.stat(follow_symlinks=False)))
    found = []
    for key, members in groups.items():
        names = {p.name for p, _ in members}
        manifest = [s for p, s in members if p.suffix == ".json"]
        last = manifest[0].st_mtime if manifest else max(s.st_mtime for _, s in members)
        found.append(Entry(key, [p for p, _ in members], sum(s.st_size for _, s in members), last,
                           {f"{key}.json", f"{key}.onnx"} <= names))
    return sorted(found, key=lambda e: e.last_used)


def evict(directory: Path, limit: int, keep: set[str] = frozenset()) -> list[str]:
    """Remove the least recently used entries until the folder holds at most ``limit``
    bytes; entries in ``keep`` or in use (locked) stay. Returns the keys removed."""
    found = entries(directory)
    total = sum(e.size for e in found)
    removed = []
    for entry in found:
        if total <= limit:
            break
        if entry.key in keep:
            continue
        with _locked(directory, entry.key, blocking=False) as locked:
            if locked:
                _remove(entry)
                total -= entry.size
                removed.append(entry.key)
    return removed


def _remove(entry: Entry) -> None:
    """The manifest first (the entry is invalid from then on), the lock file last."""
    order = {".json": 0, ".onnx": 1, ".data": 2, ".lock": 3}
    for path in sorted(entry.files, key=lambda p: order.get(p.suffix, 2)):
        with contextlib.suppress(OSError):
            os.unlink(path)


def clear(directory: Path | None = None) -> tuple[int, int]:
    """Remove every entry and onnxcam temporary file; returns (entries, bytes) removed."""
    directory = Path(directory or cache_dir())
    found = [e for e in entries(directory) if any(p.suffix != ".lock" for p in e.files)]
    for entry in found:
        _remove(entry)
    for entry in entries(directory):  # lock files of no entry
        _remove(entry)
    sweep_stale_temporaries(directory, older_than=0, force=True)
    return len(found), sum(e.size for e in found)


def _prepare(directory: Path) -> None:
    """Once per process: remove stale temporaries and orphaned entry files (files without a
    manifest, or a manifest without its model, untouched for :data:`STALE_SECONDS`)."""
    if str(directory) in _PREPARED:
        return
    _PREPARED.add(str(directory))
    sweep_stale_temporaries(directory)
    now = time.time()
    with contextlib.suppress(OSError):
        for item in os.scandir(directory):
            if _OLD_TEMP.match(item.name) and now - item.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
    for entry in entries(directory):
        if not entry.complete and now - entry.last_used > STALE_SECONDS and \
                any(p.suffix != ".lock" for p in entry.files):
            with _locked(directory, entry.key, blocking=False) as locked:
                if locked:
                    _remove(entry)


@dataclass
class Info:
    """What ``onnxcam cache info`` shows."""

    folder: Path
    entries: int
    bytes: int
    max_bytes: int
    refused: str | None


def info(directory: Path | None = None) -> Info:
    """The folder, its complete entries, the bytes of everything in it, the bound, and why
    it is not used (if it is not)."""
    directory = Path(directory or cache_dir())
    found = [e for e in entries(directory) if e.complete]
    return Info(directory, len(found), sum(e.size for e in entries(directory)), max_bytes(), refusal(directory))
