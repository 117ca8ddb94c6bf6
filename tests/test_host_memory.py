"""`simu_jax.host_memory`: with the `keep` settings XLA:CPU's freed temp buffers are reused, not
faulted in again by every execution; `system` (the default) is glibc's; a bad value is one line
and a non-zero exit."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from simu_jax import host_memory

HERE = Path(__file__).resolve().parent


def probe(allocator: str) -> dict:
    env = dict(os.environ, SIMU_JAX_HOST_ALLOCATOR=allocator, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(HERE / "host_memory_probe.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="the keep settings are glibc's (a no-op elsewhere)")
def test_keep_reuses_freed_temp_buffers_system_faults_them_in_every_call():
    """Minor page faults per call (the median of 10): glibc's default maps the temp blocks fresh
    every execution (all their pages faulted in: measured 0.9-1.1x the program's temp pages per
    call), the keep settings reuse them (median 0; a few calls fault while the heap grows to
    its steady size)."""
    keep, system = probe("keep"), probe("system")
    assert keep["allocator"] == "keep" and system["allocator"] == "system"
    pages = keep["temp_pages"]
    assert statistics.median(system["faults"]) > 0.5 * pages
    assert statistics.median(keep["faults"]) < 0.1 * pages


def test_settings_and_a_bad_value(monkeypatch):
    assert host_memory.glibc_tunables() == ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                                            "glibc.malloc.trim_threshold=2147483647")
    monkeypatch.delenv(host_memory.ALLOCATOR_ENV, raising=False)
    assert host_memory.requested_allocator() == "system" and host_memory.requested_allocator("keep") == "keep"
    monkeypatch.setenv(host_memory.ALLOCATOR_ENV, "system")
    assert host_memory.requested_allocator("keep") == "system"  # the variable wins over a default
    assert host_memory.configure_host_allocator() == "system"
    env = dict(os.environ, SIMU_JAX_HOST_ALLOCATOR="bogus")
    proc = subprocess.run([sys.executable, "-m", "simu_jax.cli", "report", "--help"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.strip() == "simu-jax: error: SIMU_JAX_HOST_ALLOCATOR='bogus'; allowed: keep, system"
