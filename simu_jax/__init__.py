"""simu-jax: Selective Influence Machine Unlearning in JAX/Flax.

`simu_jax.load_pretrained(path, dtype=...)` / `simu_jax.save_pretrained(model, path)` read and
write Hugging Face directories (see `simu_jax.models.convert`); they are imported lazily so
the command line starts without loading JAX.
"""

__version__ = "0.1.0"

_LAZY = {"load_pretrained": "simu_jax.models.convert", "save_pretrained": "simu_jax.models.convert"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'simu_jax' has no attribute {name!r}")
