"""simu-jax: Selective Influence Machine Unlearning in JAX/Flax.

`simu_jax.load_pretrained(path, *, mesh=None, rules=None, dtype=...)` reads a Hugging Face
directory straight into a device mesh's shardings (or onto one device), slice by slice;
`simu_jax.save_pretrained(model, path, *, params=None, dtype=None, ...)` writes one back, tensor
by tensor, in the source checkpoint's dtype by default (see `simu_jax.sharding.hf_io`). They
are imported lazily so the command line starts without loading JAX.
"""

__version__ = "0.1.0"

_LAZY = {"load_pretrained": "simu_jax.sharding.hf_io", "save_pretrained": "simu_jax.sharding.hf_io"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'simu_jax' has no attribute {name!r}")
