"""Hugging Face safetensors <-> simu-jax params, with safetensors + numpy only (no torch).

Name map (HF -> ours): `model.embed_tokens.weight` -> `model.embed_tokens.embedding`;
`model.layers.{i}.X.weight` -> slice i of `model.layers.X.kernel` (transposed, linear layers)
or `model.layers.X.weight` (norms); `model.norm.weight` -> same; `lm_head.weight` ->
`lm_head.kernel` (transposed). HF linear weights are [out, in], ours [in, out].
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from simu_jax.models.config import ModelConfig
from simu_jax.models.transformer import CausalLM, abstract_model

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
# Buffers some checkpoints carry that are recomputed, never learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightMismatchError(ValueError):
    """A checkpoint tensor is missing, unexpected, or has the wrong shape for the config."""


def _hf_name(path: tuple[str, ...], layer: int | None) -> tuple[str, bool]:
    """HF tensor name for one of our param paths (and layer index); and whether to transpose."""
    *mods, leaf = path
    transpose = leaf == "kernel"
    if path == ("model", "embed_tokens", "embedding"):
        return "model.embed_tokens.weight", False
    if layer is not None:
        mods = ["model", "layers", str(layer), *mods[2:]]
    return ".".join(mods) + ".weight", transpose


def _flatten(tree: dict, prefix=()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} named in {index} is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"no safetensors weights in {path} (expected model.safetensors or model.safetensors.index.json)"
    )


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for f in _weight_files(path):
        with safe_open(str(f), framework="flax") as st:
            for name in st.keys():
                if not name.endswith(_IGNORED_SUFFIXES):
                    tensors[name] = np.asarray(st.get_tensor(name))
    return tensors


def params_from_hf_tensors(cfg: ModelConfig, tensors: dict[str, np.ndarray], param_dtype=jnp.float32) -> dict:
    """Our pure param dict (numpy leaves) from HF-named tensors; strict about names and shapes."""
    graphdef, abstract_state = nnx.split(abstract_model(cfg, param_dtype=param_dtype))
    shapes = _flatten(nnx.to_pure_dict(abstract_state))
    used: set[str] = set()
    flat = {}
    for path, spec in shapes.items():
        stacked = path[:2] == ("model", "layers")
        layers = range(cfg.num_hidden_layers) if stacked else [None]
        pieces = []
        for i in layers:
            name, transpose = _hf_name(path, i)
            if name not in tensors:
                raise WeightMismatchError(f"checkpoint has no tensor {name} (needed for {'.'.join(path)})")
            arr = tensors[name]
            arr = arr.T if transpose else arr
            want = spec.shape[1:] if stacked else spec.shape
            if tuple(arr.shape) != tuple(want):
                shown = tuple(arr.shape[::-1]) if transpose else tuple(arr.shape)
                expected = tuple(want[::-1]) if transpose else tuple(want)
                raise WeightMismatchError(f"tensor {name} has shape {shown} but the config expects {expected}")
            pieces.append(arr)
            used.add(name)
        value = np.stack(pieces) if stacked else pieces[0]
        flat[path] = value.astype(spec.dtype)
    unexpected = sorted(set(tensors) - used)
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some tied checkpoints still store the copy
    if unexpected:
        raise WeightMismatchError(
            f"checkpoint has {len(unexpected)} tensor(s) the config does not use, e.g. {', '.join(unexpected[:3])}"
        )
    return _unflatten(flat)


def hf_tensors_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    out = {}
    for path, value in _flatten(params).items():
        value = np.asarray(value)
        if path[:2] == ("model", "layers"):
            for i in range(cfg.num_hidden_layers):
                name, transpose = _hf_name(path, i)
                out[name] = np.ascontiguousarray(value[i].T if transpose else value[i])
        else:
            name, transpose = _hf_name(path, None)
            out[name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def load_pretrained(path: str | Path, dtype=jnp.float32, compute_dtype=None, remat: str = "none") -> CausalLM:
    """Load an HF directory (config.json + model.safetensors or sharded + index) as a CausalLM.

    `dtype` is the parameter dtype, `compute_dtype` the matmul dtype (defaults to `dtype`).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = ModelConfig.from_pretrained(path)
    params = params_from_hf_tensors(cfg, read_safetensors(path), param_dtype=dtype)
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=dtype, dtype=compute_dtype, remat=remat))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def save_pretrained(
    model: CausalLM,
    path: str | Path,
    *,
    params: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an HF directory transformers can load: config.json, safetensors (+ tokenizer files).

    `params` overrides the model's own (e.g. after unlearning). Tokenizer files (and
    generation_config.json) are copied from `tokenizer_dir` when given. The directory is
    written beside its destination and renamed into place, so an interrupted save never
    leaves a directory that looks complete; an existing directory is refused unless
    `overwrite`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    cfg: ModelConfig = model.config
    if params is None:
        params = nnx.to_pure_dict(nnx.state(model))
    tensors = {k: jnp.asarray(v) for k, v in hf_tensors_from_params(cfg, params).items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        hf_cfg = cfg.to_hf_dict()
        hf_cfg["dtype"] = str(jnp.dtype(next(iter(tensors.values())).dtype))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        _write_shards(tmp, tensors, max_shard_bytes)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _write_shards(out: Path, tensors: dict[str, jax.Array], max_shard_bytes: int) -> None:
    shards: list[dict[str, jax.Array]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].size * tensors[name].dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.size * t.dtype.itemsize for t in tensors.values())
    index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
