"""The machine a bench run ran on: CPU, cores, memory, library versions, XLA's thread pool, load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import jax

from simu_jax.host_memory import host_allocator

__all__ = ["available_cores", "loadavg", "machine_info", "xla_cpu_threads"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def xla_cpu_threads() -> int | None:
    """Threads of XLA's CPU (Eigen) pool in this process, counted from /proc (None off Linux)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for t in tasks:
        try:
            if "XLAEigen" in Path(f"/proc/self/task/{t}/comm").read_text():
                count += 1
        except OSError:
            pass
    return count or None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "cpu_model": _cpu_model(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "backend": jax.default_backend(),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}",
        "num_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_allocator": host_allocator(),  # simu_jax.host_memory: keep | system
        # XLA's CPU runtime sizes its intra-op (Eigen) pool to the schedulable cores; this is
        # the pool counted from the thread names after a first computation.
        "jax_threads": xla_cpu_threads() or available_cores(),
        "loadavg_start": loadavg(),
    }
