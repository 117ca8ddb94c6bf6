"""Hugging Face directories straight onto a device mesh, and back, without a full-model copy.

:func:`load_pretrained` reads every parameter into its place on the mesh
(:func:`~simu_jax.sharding.mesh.param_shardings` of the model, by the logical-axis rules):
each leaf is a ``jax.make_array_from_callback`` whose callback reads from the safetensors
file(s) only the block one device holds (``safe_open(...).get_slice(name)[...]``, the L HF
tensors of a stacked ``[L, ...]`` leaf one by one, HF ``[out, in]`` linear weights sliced
transposed) and casts it on the host, block by block
(:func:`simu_jax.models.convert.load_params`). Each process reads only what its own devices
hold; no host and no device ever holds the whole model (unless it is replicated there).

:func:`save_pretrained` is :func:`simu_jax.models.convert.save_pretrained` (each HF tensor
gathered and cast on device, streamed into its file; several processes split the files) with
one default more: the written dtype is the source checkpoint's (``config.json``'s
``torch_dtype`` / ``dtype`` of ``source``, else of ``tokenizer_dir`` when that is a model
directory), else the parameters' own, so float32 master weights trained from a bf16
checkpoint are written as bf16 again.

``simu_jax.load_pretrained`` / ``simu_jax.save_pretrained`` are these two functions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp

from simu_jax.models import convert
from simu_jax.sharding.mesh import DEFAULT_RULES, param_shardings

__all__ = ["load_pretrained", "save_pretrained", "source_dtype"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load_pretrained(path, *, mesh=None, rules: Mapping[str, Any] | None = None, dtype=jnp.float32,
                    compute_dtype=None, remat: str = "none", layer_loop: str = "auto"):
    """An HF directory (config.json + model.safetensors, or sharded + model.safetensors.index.json)
    as a CausalLM whose parameters are laid out on ``mesh`` by ``rules`` (default
    :data:`~simu_jax.sharding.mesh.DEFAULT_RULES`), read slice by slice.

    ``dtype``: the parameter dtype (cast on the host, per block); ``compute_dtype``: the matmul
    dtype (default ``dtype``); ``remat``, ``layer_loop``: as the model's. Without a mesh the model goes to one
    device, and the host's peak memory is about the model's size in ``dtype``.

    Refused with one line naming the file (a ``ValueError`` / ``FileNotFoundError``: the CLI's
    one-line error and exit 1), before any weight is read: a missing directory, config, index
    or shard; an index that is not JSON or has no ``weight_map``; a truncated or corrupt
    safetensors file; a tensor missing, unexpected or with the wrong shape for the config.
    """
    if mesh is None:
        shardings = None
    else:
        rules = DEFAULT_RULES if rules is None else rules

        def shardings(abstract, cfg):
            return param_shardings(abstract, mesh, rules, cfg)

    return convert.load_pretrained(path, dtype=dtype, compute_dtype=compute_dtype, remat=remat, layer_loop=layer_loop,
                                   shardings=shardings)


def source_dtype(directory) -> Any | None:
    """The parameter dtype an HF directory's ``config.json`` declares (``torch_dtype`` or
    ``dtype``: float32, bfloat16, float16), or None when it has none (or no config)."""
    if directory is None:
        return None
    from simu_jax.base import as_path

    cfg = as_path(directory, "model directory") / "config.json"
    try:
        hf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(hf, dict):
        return None
    for key in ("torch_dtype", "dtype"):
        if isinstance(hf.get(key), str) and hf[key] in _DTYPES:
            return _DTYPES[hf[key]]
    return None


def save_pretrained(model, path, *, params=None, dtype=None, source=None, tokenizer_dir=None,
                    overwrite: bool = False, max_shard_bytes: int = 5 * 2**30):
    """Write ``model`` (a CausalLM, or its graphdef / ModelConfig with ``params``: sharded jax
    arrays or host arrays) as an HF directory transformers loads.

    ``dtype``: the written tensors' dtype; default the source checkpoint's
    (:func:`source_dtype` of ``source``, else of ``tokenizer_dir``: the pipelines pass the
    source model directory there), else the parameters' own dtype. Per tensor it is sliced
    out of its stacked leaf, cast and gathered on device and streamed into its file (host
    memory: one tensor); with several processes, process i writes the files assigned to it
    (file k -> process k % P) and every process must call this. Atomic: written in a temp
    directory beside ``path`` and renamed into place; an existing ``path`` is refused unless
    ``overwrite``. See :func:`simu_jax.models.convert.save_pretrained`.
    """
    if dtype is None:
        dtype = source_dtype(source) or source_dtype(tokenizer_dir)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"save_pretrained dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    return convert.save_pretrained(model, path, params=params, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes, dtype=dtype)
