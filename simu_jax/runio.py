"""Run directories, atomic writes, metadata, metrics, progress, NaN guard and signals.

Run directory contract (shared by every command that writes one)::

    OUT/
      run.json            resolved config + everything that reproduces the run (written at start,
                          rewritten with the final status at the end)
      config.yaml         the resolved config (reload with --config OUT/config.yaml)
      metrics.jsonl       one JSON object per line, flushed line by line
      checkpoints/        orbax checkpoints (resume state)
      ...                 the command's results (e.g. model/, final_metrics.json), each written
                          to a temporary name and renamed into place
      COMPLETE            written LAST, atomically: a run is finished iff this file exists

An interrupted, crashed or NaN-stopped run never has ``COMPLETE``; readers (and
``--resume``) must check :func:`is_complete`, not the presence of result files.
All single files are written with :func:`write_text_atomic` / :func:`write_json_atomic`
(temp file in the same directory, fsync, ``os.replace``).

``OUT`` may be a URL (``gs://bucket/run``; :func:`simu_jax.base.as_path`). On an object store
a rename is a copy plus a delete, so nothing is renamed there: each single file is one object
upload, which becomes visible whole when it finishes (never half-written), and ``COMPLETE`` is
still written last, so a directory without it is still an unfinished run. What is lost is the
atomic replacement of a whole directory (``--overwrite`` deletes ``COMPLETE`` first, then the
rest), and ``metrics.jsonl`` (objects cannot be appended to) is uploaded whole again at most
every :attr:`MetricsLogger.remote_flush_s` seconds and at the end of the run, so a crash loses
at most those seconds of lines.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from simu_jax.base import NonFiniteLossError, as_path, is_remote
from simu_jax.config import to_dict

__all__ = [
    "COMPLETE_MARKER",
    "GracefulSignals",
    "MetricsLogger",
    "NanGuard",
    "NonFiniteLossError",
    "Progress",
    "hash_arrays",
    "hash_json",
    "is_complete",
    "mark_complete",
    "package_versions",
    "prepare_output_dir",
    "progress",
    "run_metadata",
    "write_json_atomic",
    "write_text_atomic",
]

COMPLETE_MARKER = "COMPLETE"
# Files whose presence marks a directory as a simu-jax run directory (safe to --overwrite).
_RUN_DIR_MARKERS = ("run.json", "config.yaml", COMPLETE_MARKER, "metrics.jsonl", "checkpoints")


# --------------------------------------------------------------------------- atomic writes


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same directory and ``os.replace``.

    A URL (``gs://``, ...) is written as one object upload instead: an object store shows an
    object only once its upload is complete, so readers never see it half-written, and a
    temp object plus a rename would be a second full copy."""
    path = as_path(path, "file")
    if is_remote(path):
        with path.open("wb") as f:
            f.write(data)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _json_default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(x, "tolist"):  # jax arrays
        return x.tolist()
    if isinstance(x, (set, tuple)):
        return list(x)
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return str(x)


def _finite_json(x):
    """NaN/Inf are not JSON; write them as strings so files stay parseable everywhere."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    text = json.dumps(_finite_json(json.loads(json.dumps(obj, default=_json_default))), indent=indent)
    return write_text_atomic(path, text + "\n")


# --------------------------------------------------------------------------- run directory


def is_complete(path: str | os.PathLike) -> bool:
    return (as_path(path) / COMPLETE_MARKER).is_file()


def mark_complete(path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write the ``COMPLETE`` marker (call after every other output is in place)."""
    return write_json_atomic(as_path(path) / COMPLETE_MARKER, {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                            **(info or {})})


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> Path:
    """Create (or reuse) a run directory.

    * new path: created.
    * existing path, neither flag: ``FileExistsError`` (nothing is touched).
    * ``resume``: reused as is (a non-existent path is simply created: a first launch with
      ``--resume`` starts fresh, so one command line serves a preemptible job).
    * ``overwrite``: the old run is deleted first; refused (``FileExistsError``) if the
      directory is not empty and does not look like a simu-jax run directory, so a typo
      can never wipe an unrelated folder.

    ``path`` may be a ``gs://`` URL (:func:`simu_jax.base.as_path`: the run's checkpoints go
    there too). An object store has no empty directories, so a new remote run directory comes
    into being with its first file; ``--overwrite`` of a remote one deletes ``COMPLETE`` first
    (a half-deleted run never looks finished), then the rest.
    """
    path = as_path(path, checkpoints=True)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume are mutually exclusive")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path {path} exists and is not a directory")
    if path.exists():
        if resume:
            return path
        if not overwrite:
            raise FileExistsError(f"output directory {path} already exists (use --overwrite to replace it or "
                                  f"--resume to continue it)")
        entries = list(path.iterdir())
        if entries and not any((path / m).exists() for m in _RUN_DIR_MARKERS):
            raise FileExistsError(f"output directory {path} is not empty and is not a simu-jax run directory; "
                                  f"refusing to delete it with --overwrite")
        if is_remote(path):  # a rename would copy every object: delete in place, the marker first
            if (path / COMPLETE_MARKER).exists():
                (path / COMPLETE_MARKER).unlink()
            path.rmtree()
            return path
        # Rename first, delete after: a crash mid-delete never leaves a half-old directory at `path`.
        trash = path.with_name(f".{path.name}.deleting-{os.getpid()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- metadata


_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "tokenizers", "numpy",
             "safetensors", "simu-jax")


def package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(start: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{'commit': sha, 'ref': branch}`` of the checkout holding ``start`` (default: this
    package), read from ``.git`` files directly (no subprocess); ``None`` if not a checkout."""
    here = Path(start or Path(__file__).resolve().parent).resolve()
    for d in (here, *here.parents):
        git = d / ".git"
        if git.is_file():  # worktree / submodule: "gitdir: <path>"
            text = git.read_text().strip()
            if text.startswith("gitdir:"):
                git = (d / text.split(":", 1)[1].strip()).resolve()
        if not git.is_dir():
            continue
        try:
            head = (git / "HEAD").read_text().strip()
            if not head.startswith("ref:"):
                return {"commit": head, "ref": None}
            ref = head.split(":", 1)[1].strip()
            common = git
            if (git / "commondir").is_file():
                common = (git / (git / "commondir").read_text().strip()).resolve()
            for base in (git, common):
                if (base / ref).is_file():
                    return {"commit": (base / ref).read_text().strip(), "ref": ref}
            packed = common / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        return {"commit": parts[0], "ref": ref}
            return {"commit": None, "ref": ref}  # a branch without commits yet
        except OSError:
            return None
    return None


def hash_arrays(arrays: Mapping[str, Any]) -> str:
    """SHA-256 over named arrays (name, dtype, shape and bytes), order-independent of dict order."""
    import numpy as np

    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(np.asarray(arrays[name]))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def run_metadata(config: Any, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that reproduces a run: resolved config, seed, versions, git, devices, mesh.

    ``config`` is a config dataclass (or a dict); ``extra`` adds e.g. ``data_hash``,
    ``mask_hash``, ``mesh`` (a ``jax.sharding.Mesh`` or its description), the command line.
    """
    import jax

    cfg = to_dict(config) if not isinstance(config, Mapping) else dict(config)
    extra = dict(extra or {})
    mesh = extra.pop("mesh", None)
    if mesh is not None and hasattr(mesh, "shape") and hasattr(mesh, "axis_names"):
        mesh = {"axis_names": list(mesh.axis_names), "shape": dict(mesh.shape)}
    devices = jax.devices()
    meta = {
        "command": extra.pop("command", None) or " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": cfg,
        "seed": cfg.get("seed"),
        "versions": package_versions(),
        "python": platform.python_version(),
        "git": git_commit(),
        "host": platform.node(),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "process_index": jax.process_index(),
        "devices": [f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip() for d in devices],
        "mesh": mesh,
    }
    meta.update(extra)
    return meta


# --------------------------------------------------------------------------- metrics + progress


class MetricsLogger:
    """Append JSON lines to ``path`` (e.g. ``metrics.jsonl``), flushed after every line.

    Only process 0 writes when ``primary=False`` is passed by other processes. On an object
    store (a URL ``path``), where objects cannot be appended to, the lines are kept and the
    whole file (the lines already there on resume included) is uploaded again at most every
    ``remote_flush_s`` seconds and on :meth:`close`.
    """

    remote_flush_s = 30.0

    def __init__(self, path: str | os.PathLike, primary: bool = True):
        self.path = as_path(path, "metrics file")
        self.primary = primary
        self._f = None
        self._lines: list[str] | None = None  # remote: every line, uploaded whole
        self._flushed = 0.0
        if primary and is_remote(self.path):
            self._lines = self.path.read_text(encoding="utf-8").splitlines(True) if self.path.exists() else []
        elif primary:
            self._f = open(self.path, "a", encoding="utf-8")

    def log(self, record: Mapping[str, Any] | None = None, **kwargs) -> None:
        if self._f is None and self._lines is None:
            return
        rec = {**(record or {}), **kwargs}
        rec = _finite_json(json.loads(json.dumps(rec, default=_json_default)))
        if self._lines is not None:
            self._lines.append(json.dumps(rec) + "\n")
            if time.monotonic() - self._flushed >= self.remote_flush_s:
                self._upload()
            return
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()

    def _upload(self) -> None:
        write_text_atomic(self.path, "".join(self._lines))
        self._flushed = time.monotonic()

    def close(self) -> None:
        if self._lines is not None:
            self._upload()
            self._lines = None
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    out = []
    for line in as_path(path, "metrics file").read_text(encoding="utf-8").splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


class Progress:
    """A tqdm bar (steps, steps/s, ETA) with loss in its postfix; silent when ``quiet``."""

    def __init__(self, total: int, desc: str = "", quiet: bool = False, initial: int = 0, unit: str = "step"):
        self.quiet = quiet
        self.n = initial
        self._bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar (nothing in quiet mode)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v


def progress(total: int, desc: str = "", quiet: bool = False, initial: int = 0) -> Progress:
    """A :class:`Progress` bar: ``with progress(n, "finetune", quiet) as bar: bar.update(1, loss=l)``."""
    return Progress(total, desc, quiet, initial)


# --------------------------------------------------------------------------- NaN guard


class NanGuard:
    """Check a dict of scalar loss terms each step: ``guard.check(step, {"nll": x, ...})``.

    Raises :class:`NonFiniteLossError` naming the step and the first non-finite term (in
    the dict's order, so put the primary terms first). ``hint`` (a string, or a callable
    returning one, evaluated only on failure) is appended to the message, e.g. where the
    last good checkpoint is. Values may be jax/numpy scalars; returns them as floats.
    """

    def __init__(self, hint: str | Callable[[], str] = ""):
        self.hint = hint

    def check(self, step: int, terms: Mapping[str, Any]) -> dict[str, float]:
        values = {name: float(value) for name, value in terms.items()}
        for name, v in values.items():
            if not math.isfinite(v):
                hint = self.hint() if callable(self.hint) else self.hint
                raise NonFiniteLossError(step, name, v, hint)
        return values


# --------------------------------------------------------------------------- signals


class GracefulSignals:
    """Turn SIGINT/SIGTERM into a flag the training loop polls (``if sig.stop: ...``).

    The first signal sets ``stop`` (and ``signal_name``); the loop then checkpoints and
    exits cleanly. A second signal raises ``KeyboardInterrupt`` at once (the user insists).
    Previous handlers are restored on exit. Outside the main thread it does nothing
    (Python only delivers signals there).
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.stop = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.stop = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "GracefulSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def request_stop(self, reason: str = "requested") -> None:
        """Set the flag programmatically (e.g. a simulated preemption)."""
        self.stop = True
        self.signal_name = reason
