"""Shared test fixtures.

The suite compiles hundreds of small XLA:CPU programs and runs each a few times, so its time is
mostly LLVM optimizing code: the tests run with ``--xla_backend_optimization_level=0`` (set
here, before JAX starts its backend, and inherited by the CLI subprocesses the tests launch).
That leaves XLA's HLO passes and the float semantics as they are (fast-math is off either way);
only the machine code is less optimized. tests/test_attribution.py: 78 s -> 25 s on the 2-core
Xeon. ``SIMU_JAX_TEST_FULL_OPT=1`` runs the suite fully optimized.
"""

import contextlib
import os

if os.environ.get("SIMU_JAX_TEST_FULL_OPT") != "1" and "xla_backend_optimization_level" not in os.environ.get(
        "XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax
import pytest


@contextlib.contextmanager
def _x64():
    """float64 on, restored afterwards (``jax.enable_x64`` where it exists)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        with ctx(True):
            yield
    else:  # pragma: no cover - older/newer jax without the context manager
        prev = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            yield
        finally:
            jax.config.update("jax_enable_x64", prev)


@pytest.fixture
def x64():
    with _x64():
        yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for a module's torch references (its spinning threads are ~10x
    slower on a busy 2-core machine); a module asks with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
