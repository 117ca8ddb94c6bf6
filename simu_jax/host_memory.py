"""Host memory: keep the blocks XLA:CPU frees in the process, for the next execution to reuse.

XLA:CPU allocates each execution's temp buffer as one block (136 MB for the bench's 4-layer
gradient) and frees it when the execution ends. glibc's malloc serves a block that large with a
fresh ``mmap`` (above the mmap threshold, at most 32 MB on 64-bit: mallopt(3)) and gives it back with
``munmap`` (both seen with strace), so every call faults in and zeroes every page of it again: 35k
minor page faults per gradient call, and faulting in 142 MB costs ~110 ms on one thread of the
project's 2-core AMD EPYC VM. No mmap and no trimming alone changed nothing (measured); with one
arena as well, the freed block stays mapped and the next call reuses it (about 100 faults per
call; the gradient 0.74x the time of the default allocator, in turns in one process). Our reading,
not checked in glibc's source: the block comes from an XLA worker thread's arena, which maps any
block larger than its 64 MB heap whatever mmap_max says.

The cost: the process keeps its peak heap (freed memory is not returned to the OS) and every
thread shares one malloc arena, which slows malloc-heavy work on several threads: the default
`simu-jax demo` (compiles and short fine-tunes) took 2 min 22-29 s with these settings against
1 min 50-52 s without, on the same VM. So they are opt-in: ``SIMU_JAX_HOST_ALLOCATOR=keep``
for long runs of one compiled step (`simu-jax` applies the variable at start,
`configure_host_allocator`); ``simu-jax bench``, which times steady-state steps, runs with
``keep`` unless the variable says ``system`` (and gives its main PyTorch peer the same settings).
It is a no-op where the C library is not glibc. A program that imports simu_jax calls
`configure_host_allocator` itself, before its first JAX computation (XLA's threads take their
arena at their first allocation).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ALLOCATOR_ENV = "SIMU_JAX_HOST_ALLOCATOR"
ALLOCATORS = ("keep", "system")

# (mallopt parameter, value, glibc tunable): one arena; large blocks from the heap, not mmap;
# the heap's top never trimmed (int max: mallopt takes an int)
KEEP_SETTINGS = ((-8, 1, "glibc.malloc.arena_max"),  # M_ARENA_MAX
                 (-4, 0, "glibc.malloc.mmap_max"),  # M_MMAP_MAX
                 (-1, 2**31 - 1, "glibc.malloc.trim_threshold"))  # M_TRIM_THRESHOLD

_applied: str | None = None


def requested_allocator(default: str = "system") -> str:
    """``keep`` or ``system``: ``SIMU_JAX_HOST_ALLOCATOR``, else ``default``."""
    value = os.environ.get(ALLOCATOR_ENV, default)
    if value not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_ENV}={value!r}; allowed: {', '.join(ALLOCATORS)}")
    return value


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def configure_host_allocator(default: str = "system") -> str:
    """Apply the allocator `requested_allocator(default)` names to this process's glibc malloc
    (``keep``: the module docstring's settings; ``system``: nothing is changed) and return what
    is in effect (`host_allocator`)."""
    global _applied
    if requested_allocator(default) == "system":
        _applied = _applied or "system"
        return host_allocator()
    libc = _glibc()
    if libc is None:
        _applied = "system (not glibc)"
    else:
        ok = all(libc.mallopt(param, value) == 1 for param, value, _ in KEEP_SETTINGS)
        _applied = "keep" if ok else "system (mallopt refused)"
    return host_allocator()


def glibc_tunables() -> str:
    """The ``keep`` settings as a ``GLIBC_TUNABLES`` value, for a child process (the torch peer)."""
    return ":".join(f"{name}={value}" for _, value, name in KEEP_SETTINGS)


def host_allocator() -> str:
    """What this process runs with: ``keep``, or ``system`` (with the reason when keep was asked
    for but is not in effect); ``system`` if `configure_host_allocator` never applied keep."""
    return _applied or "system"
