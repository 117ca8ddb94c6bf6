"""An in-memory object store behind ``gs://`` for tests (gcsfs is not installed offline).

``FakeGCS`` is fsspec's ``MemoryFileSystem`` with the semantics of an object store that the
code under test must cope with, as gcsfs has them: names are ``bucket/key`` without a leading
slash; there are no directories (``mkdir`` does nothing; a "directory" exists while some object
lies under its prefix); a written object becomes visible only when its file is closed (the
upload is finalized), never half-written; objects cannot be appended to; a rename is a copy
and a delete. :func:`install` registers it for fsspec's ``gs`` / ``gcs`` protocols, which is
the filesystem ``etils.epath.Path("gs://...")`` asks fsspec for (epath's fsspec backend,
``backend.py`` ``_FileSystemSpecBackend.fs``), so ``simu_jax.base.as_path`` and every epath
operation run their real code against it. Orbax's array writes go through TensorStore's own
GCS driver, not fsspec, so checkpoints on ``gs://`` cannot be tested with this fake.
"""

from __future__ import annotations

import io

import fsspec
from fsspec.implementations.memory import MemoryFileSystem


class _Upload(io.BytesIO):
    """A write: the object appears in the store only on close (a finalized upload)."""

    def __init__(self, fs, path):
        super().__init__()
        self.fs, self.path = fs, path

    def close(self):
        if not self.closed:
            from fsspec.implementations.memory import MemoryFile

            self.fs.store[self.path] = MemoryFile(self.fs, self.path, self.getvalue())
        super().close()


class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    root_marker = ""
    store: dict = {}  # its own store, not memory://'s

    @property
    def pseudo_dirs(self):  # never a directory without objects under it
        return [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for p in ("gs://", "gcs://"):
            path = path.removeprefix(p)
        return path.strip("/")

    def mkdir(self, path, create_parents=True, **kwargs):
        pass  # an object store has no directories

    def makedirs(self, path, exist_ok=False):
        pass

    def rmdir(self, path):
        pass

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        if "a" in mode or "+" in mode:
            raise NotImplementedError(f"gs://{path}: objects cannot be appended to or updated in place")
        if "w" in mode or "x" in mode:
            return _Upload(self, path)
        return super()._open(path, mode, **kwargs)

    def mv(self, path1, path2, recursive=False, **kwargs):  # a copy, then a delete
        self.copy(path1, path2, recursive=recursive)
        self.rm(path1, recursive=recursive)


def install() -> type[FakeGCS]:
    """Register :class:`FakeGCS` for ``gs://`` (and empty it); returns the class (``.store``)."""
    fsspec.register_implementation("gs", FakeGCS, clobber=True)
    fsspec.register_implementation("gcs", FakeGCS, clobber=True)
    FakeGCS.store.clear()
    FakeGCS.clear_instance_cache()
    from etils.epath import backend

    backend._FileSystemSpecBackend._get_filesystem.cache_clear()
    return FakeGCS


def uninstall() -> None:
    """Back to fsspec's own ``gs`` entry (gcsfs, missing offline)."""
    from fsspec.registry import _registry

    for p in ("gs", "gcs"):
        _registry.pop(p, None)
    FakeGCS.store.clear()
    from etils.epath import backend

    backend._FileSystemSpecBackend._get_filesystem.cache_clear()


def objects(prefix: str = "") -> dict[str, bytes]:
    """The store's objects (``bucket/key`` -> bytes) under ``prefix``."""
    return {k: v.getvalue() for k, v in FakeGCS.store.items() if k.startswith(prefix)}
