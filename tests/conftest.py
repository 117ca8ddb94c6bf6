"""Shared test fixtures."""

import contextlib

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
