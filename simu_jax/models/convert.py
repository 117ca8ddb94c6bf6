"""Hugging Face safetensors <-> simu-jax params, with safetensors + numpy only (no torch).

Name map (HF -> ours): `model.embed_tokens.weight` -> `model.embed_tokens.embedding`;
`model.layers.{i}.X.weight` -> slice i of `model.layers.X.kernel` (transposed, linear layers)
or `model.layers.X.weight` (norms); `model.norm.weight` -> same; `lm_head.weight` ->
`lm_head.kernel` (transposed). HF linear weights are [out, in], ours [in, out].

Loading (:func:`load_params`, :func:`load_pretrained`) checks the files from their headers
(:func:`checkpoint_tensors`: index, shards, byte counts; then names and shapes against the
config), then builds every leaf with ``jax.make_array_from_callback`` on the target shardings,
reading only each device's block (``safe_open(...).get_slice``) and casting it on the host:
no full-model copy on a host or a device. Saving (:func:`save_pretrained`) slices, casts and
gathers one HF tensor at a time on device and streams it into its file
(:func:`write_safetensors`); with several processes each writes its share of the files.
The mesh-aware entry points (``mesh=``, ``rules=``, the source dtype on save) are
:mod:`simu_jax.sharding.hf_io`, also ``simu_jax.load_pretrained`` / ``simu_jax.save_pretrained``.

Remote directories (``gs://bucket/model``, any URL :func:`simu_jax.base.as_path` accepts) are
read in place, not downloaded: the headers are parsed from the objects (:func:`read_header`,
a ranged read of the first bytes), and each device's block is one ranged read of the rows it
spans (:func:`_read_block`; safetensors' ``safe_open`` needs a local file to memory-map), so
loading from a bucket reads what it reads from a disk, plus whole rows for a block split
along a tensor's second dimension. The small files (config.json, tokenizer files) are copied
into a local cache, :func:`local_metadata_dir` (tokenizers load from local files). Saving to a
URL writes every file in place (an object store renames by copying) with config.json last: a
directory without config.json is no model, to this loader or to transformers."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

from simu_jax.base import as_path, is_remote
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


class CheckpointFileError(ValueError):
    """A weights file or index is missing, truncated, corrupt or inconsistent; the message is one
    line naming the file."""


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one checkpoint tensor lives: its file, shape and dtype (from the file's header),
    and the byte offset of its data in the file."""

    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int = 0


def _weight_files(path: Path) -> list[Path]:
    files, _ = _weight_map(path)
    return files


def _weight_map(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of an HF directory (validated index: a JSON object whose weight_map maps
    tensor names to files that exist), and the index's name -> file map (None: one file)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not weight_map or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise ValueError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            why = "no weight_map" if isinstance(e, (KeyError, TypeError)) else " ".join(str(e).split())[:120]
            raise CheckpointFileError(f"{index}: not a valid safetensors index ({why})") from None
        for n in weight_map.values():
            if Path(n).name != n:
                raise CheckpointFileError(f"{index}: file name {n!r} is not a plain file name")
        files = [path / n for n in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"shard {f} named in {index} is missing")
        return files, weight_map
    single = path / "model.safetensors"
    if single.is_file():
        return [single], None
    raise FileNotFoundError(
        f"no safetensors weights in {path} (expected model.safetensors or model.safetensors.index.json)"
    )


def local_metadata_dir(path) -> Path:
    """A local directory holding the small files of the HF directory ``path``: ``path`` itself
    when it is local; for a URL, config.json and the tokenizer files copied into
    ``$SIMU_JAX_CACHE/remote/<hash of the URL>`` (default ``~/.cache/simu_jax``), refreshed on
    every call (tokenizers load from local files only; the weights are read in place)."""
    import hashlib

    path = as_path(path, "model directory")
    if not is_remote(path):
        return path
    from simu_jax.runio import write_bytes_atomic

    root = Path(os.environ.get("SIMU_JAX_CACHE", "~/.cache/simu_jax")).expanduser()
    local = root / "remote" / hashlib.sha256(str(path).encode()).hexdigest()[:16]
    for name in ("config.json", *TOKENIZER_FILES):
        if (path / name).is_file():
            write_bytes_atomic(local / name, (path / name).read_bytes())
    return local


def read_header(file: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, from its header alone (nothing else is read); a
    truncated or corrupt file (bad header, offsets past the end or overlapping, wrong byte
    counts) raises :class:`CheckpointFileError` naming it."""
    def bad(why: str):
        raise CheckpointFileError(f"{file}: not a valid safetensors file ({why})")

    stat = file.stat()
    size = stat.length if is_remote(file) else stat.st_size  # epath's StatResult / os.stat_result
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            bad(f"{size} bytes, shorter than the 8-byte header length")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100 * 2**20):
            bad(f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            bad("the header is not JSON")
    if not isinstance(header, dict):
        bad("the header is not a JSON object")
    out: dict[str, TensorInfo] = {}
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = np.dtype(_ST_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            bad(f"bad header entry for tensor {name}")
        if stop - start != math.prod(shape) * dtype.itemsize:
            bad(f"tensor {name}: {stop - start} bytes for shape {shape} {dtype}")
        spans.append((start, stop, name))
        out[name] = TensorInfo(file, shape, dtype, 8 + n + start)
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            bad(f"tensor {name}: data offsets overlap or leave a gap")
        end = stop
    if 8 + n + end != size:
        bad(f"the tensors need {8 + n + end} bytes, the file has {size} (truncated?)")
    return out


def checkpoint_tensors(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of an HF directory (single file or sharded + index) -> :class:`TensorInfo`,
    read from the files' headers only. Refuses (one line naming the file) a bad or missing index,
    a missing shard, a truncated or corrupt file, a tensor in two files, and a tensor the index
    places in a file that does not hold it."""
    path = as_path(path, "model directory")
    files, weight_map = _weight_map(path)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointFileError(f"{f}: tensor {name} is also in {tensors[name].file}")
            tensors[name] = info
    if weight_map is not None:
        index = path / "model.safetensors.index.json"
        for name, fname in weight_map.items():
            if name not in tensors or tensors[name].file.name != fname:
                raise CheckpointFileError(f"{path / fname}: has no tensor {name} (named in {index})")
    return {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory as a numpy array, whole (the simple path: the full model on
    the host; :func:`load_params` reads slices instead)."""
    by_file: dict[Path, list[str]] = {}
    infos = checkpoint_tensors(path)
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for f, names in by_file.items():
        if is_remote(f):
            for name in names:
                tensors[name] = _read_block(infos[name], name, ())
            continue
        with safe_open(str(f), framework="numpy") as st:
            for name in names:
                tensors[name] = st.get_tensor(name)
    return tensors


def _read_block(info: TensorInfo, name: str, src: tuple) -> np.ndarray:
    """The block ``src`` (one slice per dimension; ``()``: all) of one checkpoint tensor. A local
    file: safetensors' memory-mapped ``get_slice``. A URL: one ranged read of the rows the block
    spans (a range of the first dimension is contiguous in the file; fsspec turns the seek and
    read into a ranged GET), the other dimensions sliced on the host."""
    if not is_remote(info.file):
        with safe_open(str(info.file), framework="numpy") as st:  # mapped for this one tensor only
            return st.get_slice(name)[src] if src else st.get_tensor(name)
    shape = info.shape
    start, stop, step = src[0].indices(shape[0]) if src else (0, shape[0] if shape else 1, 1)
    row = math.prod(shape[1:]) * info.dtype.itemsize
    with info.file.open("rb") as f:
        f.seek(info.offset + start * row)
        raw = f.read((stop - start) * row)
    if len(raw) != (stop - start) * row:
        raise CheckpointFileError(f"{info.file}: tensor {name} ends early (the file changed while it was read?)")
    block = np.frombuffer(raw, info.dtype).reshape((stop - start, *shape[1:]) if shape else ())
    return block[(slice(None, None, step), *src[1:])] if src else block


def _refuse_unused(cfg: ModelConfig, tensors, used: set) -> None:
    """A checkpoint tensor the config does not use is an error (a tied lm_head copy is not)."""
    unexpected = sorted(set(tensors) - used)
    if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
        unexpected.remove("lm_head.weight")  # some tied checkpoints still store the copy
    if unexpected:
        raise WeightMismatchError(
            f"checkpoint has {len(unexpected)} tensor(s) the config does not use, e.g. {', '.join(unexpected[:3])}"
        )


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
    _refuse_unused(cfg, tensors, used)
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


def _leaf_names(cfg: ModelConfig, path: tuple[str, ...]) -> tuple[list[str], bool, bool]:
    """HF tensor names of one of our leaves (one per layer for a stacked leaf), whether it is
    stacked, and whether HF stores it transposed."""
    stacked = path[:2] == ("model", "layers")
    layers = range(cfg.num_hidden_layers) if stacked else [None]
    names = []
    transpose = False
    for i in layers:
        name, transpose = _hf_name(path, i)
        names.append(name)
    return names, stacked, transpose


def _match_checkpoint(cfg: ModelConfig, tensors: dict[str, TensorInfo], shapes: dict) -> dict:
    """path -> the TensorInfo of each HF tensor of that leaf; strict about names and shapes
    (the checks of :func:`params_from_hf_tensors`, with the file named)."""
    used: set[str] = set()
    plan = {}
    for path, spec in shapes.items():
        names, stacked, transpose = _leaf_names(cfg, path)
        want = tuple(spec.shape[1:] if stacked else spec.shape)
        infos = []
        for name in names:
            if name not in tensors:
                raise WeightMismatchError(f"checkpoint has no tensor {name} (needed for {'.'.join(path)})")
            info = tensors[name]
            have = info.shape[::-1] if transpose else info.shape
            if tuple(have) != want:
                expected = want[::-1] if transpose else want
                raise WeightMismatchError(f"tensor {name} has shape {tuple(info.shape)} but the config expects "
                                          f"{tuple(expected)} ({info.file})")
            infos.append((name, info))
            used.add(name)
        plan[path] = (infos, stacked, transpose)
    _refuse_unused(cfg, tensors, used)
    return plan


def check_checkpoint(path, cfg: ModelConfig | None = None) -> None:
    """Refuse an HF directory that :func:`load_params` would refuse (one line naming the file or
    tensor: a bad config.json, index or header, a missing shard, a tensor missing, unexpected
    or of the wrong shape), from config.json and the safetensors headers alone: no weight is
    read. The pipelines call it before they create their run directory."""
    path = as_path(path, "model directory")
    cfg = ModelConfig.from_pretrained(path) if cfg is None else cfg
    _, abstract_state = nnx.split(abstract_model(cfg))
    _match_checkpoint(cfg, checkpoint_tensors(path), _flatten(nnx.to_pure_dict(abstract_state)))


def _index_key(index: tuple, shape: tuple[int, ...]) -> tuple:
    return tuple(s.indices(d) if isinstance(s, slice) else (s, s + 1, 1) for s, d in zip(index, shape))


def _slice_reader(shape: tuple[int, ...], dtype, infos, stacked: bool, transpose: bool):
    """``index -> np.ndarray``: the block ``index`` of one of our leaves, read from the
    checkpoint with ``safe_open(...).get_slice(name)[...]`` (only that block of each HF tensor,
    transposed HF [out, in] -> our [in, out]) and cast to ``dtype`` slice by slice, written into
    one array of the block's shape (no stacking copy). The file is opened (memory-mapped) for
    one HF tensor at a time, so the pages a read touches are released after each tensor."""
    def read(index) -> np.ndarray:
        index = () if index is None else tuple(index)
        index = index + (slice(None),) * (len(shape) - len(tuple(index)))
        bounds = [s.indices(d) for s, d in zip(index, shape)]
        block = tuple(len(range(*b)) for b in bounds)
        out = np.empty(block, dtype)
        layers = range(*bounds[0]) if stacked else [0]
        inner = tuple(slice(*b) for b in (bounds[1:] if stacked else bounds))
        src = inner[::-1] if transpose else inner
        for j, layer in enumerate(layers):
            name, info = infos[layer]
            part = _read_block(info, name, src)
            part = part.T if transpose else part
            if stacked:
                out[j] = part
            else:
                out[...] = part
            del part
        return out

    return read


def _make_array(shape, dtype, sharding, read) -> jax.Array:
    """``jax.make_array_from_callback`` for this process's devices; a block that several local
    devices hold (a replicated axis) is read once and handed to each of them."""
    indices = sharding.addressable_devices_indices_map(tuple(shape))
    uses: dict[tuple, int] = {}
    for index in indices.values():
        key = _index_key(index, shape)
        uses[key] = uses.get(key, 0) + 1
    cache: dict[tuple, np.ndarray] = {}

    def cb(index):
        key = _index_key(index, shape)
        if uses.get(key, 1) == 1:
            return read(index)
        if key not in cache:
            cache[key] = read(index)
        uses[key] -= 1
        return cache[key] if uses[key] else cache.pop(key)

    return jax.make_array_from_callback(tuple(shape), sharding, cb, dtype=dtype)


def load_params(path: str | Path, cfg: ModelConfig | None = None, shardings=None, dtype=jnp.float32) -> dict:
    """Our pure param dict, read straight into ``shardings`` without a full-model copy anywhere.

    ``shardings``: ``None`` (this process's first device), one ``jax.sharding.Sharding`` for
    every leaf, a tree of them shaped like the params, or a callable
    ``(abstract_params, cfg) -> tree`` (how :mod:`simu_jax.sharding.hf_io` passes a mesh's
    ``param_shardings``). Every leaf is a ``jax.make_array_from_callback`` whose callback reads
    only the block its device holds from the safetensors file(s) (``get_slice``), and casts it
    to ``dtype`` on the host, block by block: each process reads only what its devices hold,
    and the host's peak is about the final arrays plus one block. Names, shapes and files are
    checked first, from the headers alone: :class:`CheckpointFileError` /
    :class:`WeightMismatchError` (one line naming the file or tensor) before anything is read.
    """
    path = as_path(path, "model directory")
    cfg = ModelConfig.from_pretrained(path) if cfg is None else cfg
    _, abstract_state = nnx.split(abstract_model(cfg, param_dtype=dtype))
    abstract = nnx.to_pure_dict(abstract_state)
    shapes = _flatten(abstract)
    plan = _match_checkpoint(cfg, checkpoint_tensors(path), shapes)
    if callable(shardings) and not isinstance(shardings, jax.sharding.Sharding):
        shardings = shardings(abstract, cfg)
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        flat_sh = {p: shardings for p in shapes}
    else:
        flat_sh = _flatten(shardings) if isinstance(shardings, dict) else None
        if flat_sh is None or set(flat_sh) != set(shapes):
            raise ValueError("shardings must be a Sharding or a tree shaped like the model's params")
    flat = {}
    for p, spec in shapes.items():
        infos, stacked, transpose = plan[p]
        read = _slice_reader(tuple(spec.shape), np.dtype(spec.dtype), infos, stacked, transpose)
        # wait for each leaf's transfers: a device_put returns before it has copied its host
        # block, and blocks of several leaves in flight raised the one-device peak from 94-98 MB
        # to 101-115 MB (84 MB held, largest block 16.8 MB; tests/test_hf_io.py's memory worker)
        flat[p] = _make_array(spec.shape, spec.dtype, flat_sh[p], read).block_until_ready()
    return _unflatten(flat)


def load_pretrained(path: str | Path, dtype=jnp.float32, compute_dtype=None, remat: str = "none", *,
                    layer_loop: str = "auto", shardings=None) -> CausalLM:
    """Load an HF directory (config.json + model.safetensors or sharded + index) as a CausalLM.

    `dtype` is the parameter dtype, `compute_dtype` the matmul dtype (defaults to `dtype`).
    Weights are read slice by slice into `shardings` (default: one device; see
    :func:`load_params`), so the host's peak memory is about the model's size in `dtype`. For a
    device mesh use ``simu_jax.load_pretrained(path, mesh=...)`` (:mod:`simu_jax.sharding.hf_io`).
    """
    path = as_path(path, "model directory")
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    cfg = ModelConfig.from_pretrained(path)
    params = load_params(path, cfg, shardings, dtype)
    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=dtype, dtype=compute_dtype, remat=remat,
                                               layer_loop=layer_loop))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------


def _config_of(model, params) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ModelConfig):
        return cfg
    if isinstance(model, nnx.GraphDef):
        if params is None:
            raise ValueError("save_pretrained(graphdef, ...) needs params=")
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
        return nnx.merge(model, nnx.State(shapes)).config
    raise TypeError(f"save_pretrained needs a CausalLM, its graphdef (with params=) or a ModelConfig, "
                    f"got {type(model).__name__}")


@functools.lru_cache(maxsize=None)
def _gather_fn(stacked: bool, transpose: bool, dtype, out_sharding):
    """One HF tensor of a leaf, sliced, cast and transposed on device (``out_sharding``:
    replicated across processes, or None: XLA keeps it sharded)."""
    def one(x, i):
        if stacked:
            x = jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
        x = x.astype(dtype)
        return x.T if transpose else x

    return jax.jit(one, out_shardings=out_sharding)


# Instrumentation: each is called as f(name, array) with an HF tensor's on-device array right after
# save_pretrained gathered it (the bench's scale section sums the devices' bytes there).
GATHER_LISTENERS: list = []


def _replicated_like(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    return None


@dataclasses.dataclass(frozen=True)
class _OutTensor:
    name: str
    path: tuple[str, ...]
    layer: int | None
    transpose: bool
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _out_tensors(cfg: ModelConfig, flat: dict, dtype) -> list[_OutTensor]:
    out = []
    for path, value in flat.items():
        names, stacked, transpose = _leaf_names(cfg, path)
        shape = tuple(np.shape(value)[1:] if stacked else np.shape(value))
        shape = shape[::-1] if transpose else shape
        dt = np.dtype(value.dtype if dtype is None else dtype)
        for i, name in enumerate(names):
            out.append(_OutTensor(name, path, i if stacked else None, transpose, shape, dt))
    if cfg.tie_word_embeddings:
        out = [t for t in out if t.name != "lm_head.weight"]
    return sorted(out, key=lambda t: t.name)


def _host_tensor(value, t: _OutTensor, owner: bool) -> np.ndarray | None:
    """The HF tensor ``t`` of leaf ``value`` on the host (None on a process that does not write
    it). A jax.Array is sliced, cast and transposed on device, keeping a sharded layout, and
    copied to the host shard by shard; an array spanning several processes is gathered to a
    replicated one first (a collective every process joins). A host array is sliced and cast
    in numpy."""
    if isinstance(value, jax.Array):
        local = value.is_fully_addressable
        if not owner and local:
            return None
        rep = None if local else _replicated_like(value.sharding)
        if not local and rep is None:
            raise ValueError(f"cannot gather {t.name}: an array spanning processes needs a NamedSharding, "
                             f"not {type(value.sharding).__name__}")
        fn = _gather_fn(t.layer is not None, t.transpose, t.dtype, rep)
        out = fn(value, np.int32(t.layer or 0))
        for listener in GATHER_LISTENERS:
            listener(t.name, out)
        if not owner:
            return None
        return np.asarray(out if local else out.addressable_data(0))
    if not owner:
        return None
    a = np.asarray(value)
    a = a[t.layer] if t.layer is not None else a
    return np.ascontiguousarray((a.T if t.transpose else a).astype(t.dtype, copy=False))


def write_safetensors(file: str | Path, tensors: list[tuple[str, tuple[int, ...], np.dtype]], fetch,
                      metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file tensor by tensor: the header from ``tensors`` (name, shape,
    dtype), then each tensor's bytes from ``fetch(name)`` in that order, so the host holds one
    tensor at a time (not the whole file)."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in tensors:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with as_path(file, "weights file").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in tensors:
            a = fetch(name)
            if tuple(a.shape) != tuple(shape) or a.dtype != np.dtype(dtype):
                raise ValueError(f"{file}: tensor {name} came as {a.shape} {a.dtype}, expected {shape} {dtype}")
            f.write(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
            del a


def _barrier(name: str, nproc: int) -> None:
    if nproc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_pretrained(
    model,
    path: str | Path,
    *,
    params: dict | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    dtype=None,
) -> Path:
    """Write an HF directory transformers can load: config.json, safetensors (+ tokenizer files).

    `model`: a CausalLM, its graphdef (with `params`) or its ModelConfig. `params` overrides
    the model's own (e.g. after unlearning): jax arrays (on any sharding, several processes
    included: then every process must call this) or host arrays (then the caller writes alone,
    e.g. process 0 after gathering). `dtype`: the dtype of the written tensors (default: each
    parameter's own). Each HF tensor is sliced out of its stacked leaf, cast and gathered on
    device one at a time and streamed into its file, so a host holds one tensor, never the
    model. Files are split by `max_shard_bytes` (with an index when there are several); with
    several processes, file k is written by process k % P (every process must call this; the
    directory must be on storage they share). Tokenizer files (and generation_config.json) are
    copied from `tokenizer_dir` when given. The directory is written beside its destination and
    renamed into place, so an interrupted save never leaves a directory that looks complete; an
    existing directory is refused unless `overwrite`. A URL `path` (``gs://...``) is written in
    place instead (an object store renames by copying every object): an old directory is
    deleted first (its config.json first), config.json is written last, and a failed save
    deletes what it wrote, so no directory with a config.json is ever half-written.
    """
    path = as_path(path, "model directory")
    remote = is_remote(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    cfg = _config_of(model, params)
    if params is None:
        params = nnx.to_pure_dict(nnx.state(model))
    flat = _flatten(params)
    tensors = _out_tensors(cfg, flat, dtype)
    shards: list[list[_OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    # Collective only when some array spans other processes' devices (then every process calls
    # this); host arrays or this process's own arrays are written by the caller alone.
    spans = any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in flat.values())
    proc, nproc = (jax.process_index(), jax.process_count()) if spans else (0, 1)

    path.parent.mkdir(parents=True, exist_ok=True)
    if remote:  # written in place, config.json last
        tmp = path
        if proc == 0 and path.exists():
            _remove_model_dir(path)
        _barrier("simu_jax.save_pretrained.start", nproc)
    elif nproc == 1:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    else:  # one name every process agrees on, made fresh by process 0
        tmp = path.with_name(f".{path.name}.tmp-save")
        if proc == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        _barrier("simu_jax.save_pretrained.start", nproc)
    saved = False
    try:
        for k, (fname, shard) in enumerate(zip(names, shards)):
            owner = k % nproc == proc
            by_name = {t.name: t for t in shard}
            if owner:
                write_safetensors(tmp / fname, [(t.name, t.shape, t.dtype) for t in shard],
                                  lambda n: _host_tensor(flat[by_name[n].path], by_name[n], True))
            else:  # join the gathers of arrays that span processes
                for t in shard:
                    _host_tensor(flat[t.path], t, False)
        _barrier("simu_jax.save_pretrained.files", nproc)
        if proc == 0:
            if len(shards) > 1:
                index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors))},
                         "weight_map": {t.name: fname for fname, shard in zip(names, shards) for t in shard}}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            if tokenizer_dir is not None:
                source = as_path(tokenizer_dir, "tokenizer directory")
                for name in TOKENIZER_FILES:
                    if (source / name).is_file():
                        if remote or is_remote(source):
                            (tmp / name).write_bytes((source / name).read_bytes())
                        else:
                            shutil.copy2(source / name, tmp / name)
            hf_cfg = cfg.to_hf_dict()
            emb = [t for t in tensors if t.name == "model.embed_tokens.weight"] or tensors
            hf_cfg["dtype"] = str(jnp.dtype(emb[0].dtype))
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")  # last: see the docstring
            if not remote and path.exists():
                old = path.with_name(f".{path.name}.old-{os.getpid()}")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            elif not remote:
                os.replace(tmp, path)
        _barrier("simu_jax.save_pretrained.done", nproc)
        saved = True
    finally:
        if proc == 0 and not remote and tmp.exists():
            shutil.rmtree(tmp)
        elif proc == 0 and remote and not saved and path.exists():
            _remove_model_dir(path)  # nothing half-written
    return path


def _remove_model_dir(path) -> None:
    """Delete an HF directory on an object store, config.json first (a directory without it is
    no model, so an interrupted delete never leaves one that loads)."""
    if (path / "config.json").exists():
        (path / "config.json").unlink()
    if path.exists():
        path.rmtree()
