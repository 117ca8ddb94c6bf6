"""Which model a run starts from: :class:`ModelSpec` (the ``model:`` section of every run
config) and the one way to load a model with its tokenizer, :func:`load_model`.

``load_model`` is used by finetune, unlearn, ``simu-jax evaluate``, the demo and the
experiments: an HF directory (or hub id) -> parameters, the graph of a freshly built
abstract model (so equal configs share compiled steps), the tokenizer and the directory
its files come from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from simu_jax.base import ConfigError, as_path, is_remote
from simu_jax.models.config import ModelConfig, UnsupportedConfigError
from simu_jax.models.convert import load_pretrained, local_metadata_dir
from simu_jax.models.transformer import CausalLM, abstract_model, init_model, split_params

__all__ = ["LoadedModel", "ModelSpec", "build_model", "check_model_files", "host_init_params", "jnp_dtype", "load_model",
           "load_tokenizer", "model_config_from_spec", "resolve_model_path"]


def one_line(msg: str) -> str:
    return " ".join(str(msg).split())


_MODEL_CONFIG_DEFAULTS = dict(model_type="llama", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                              num_attention_heads=4)


@dataclass
class ModelSpec:
    """Which model to start from.

    ``path``: a Hugging Face directory (config.json + safetensors) to load, or a hub
    repository id (``meta-llama/Llama-2-7b-hf``, fetched and cached); or ``None`` and
    ``config``: a dict of :class:`simu_jax.models.ModelConfig` fields for a randomly
    initialized model (``vocab_size`` and the special token ids may be left out: they are
    taken from the tokenizer; ``head_dim`` defaults to hidden/heads,
    ``num_key_value_heads`` to the number of heads, ``model_type`` to llama).
    ``dtype`` is the parameter dtype, ``compute_dtype`` the matmul dtype (default: ``dtype``).
    ``layer_loop``: the decoder layers as one scanned body (compile time flat in depth),
    unrolled (faster steps on XLA:CPU, compile time linear in depth), or ``auto`` (unrolled up to
    8 layers on one device, scanned on a mesh); see :data:`simu_jax.models.transformer.LAYER_LOOPS`.
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] | None = None
    remat: Literal["none", "full", "dots"] = "none"
    layer_loop: Literal["auto", "scan", "unrolled"] = "auto"
    seed: int = field(default=0, metadata={"range": (0, None)})

    def check(self) -> None:
        if self.path is not None:
            as_path(self.path, "model.path")  # a bad URL scheme is refused here, before any output exists
        if self.path is not None and self.config is not None:
            raise ConfigError("set either model.path (HF directory) or model.config (random init), not both")
        if self.config is not None:
            allowed = [f.name for f in dataclasses.fields(ModelConfig)]
            for k in self.config:
                if k not in allowed:
                    raise ConfigError(f"is not a ModelConfig field; allowed: {', '.join(allowed)}", f"config.{k}")


_HUB_FILES_CONFIG = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                     "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja"]


def resolve_model_path(path: str | os.PathLike, config_only: bool = False) -> Path:
    """A local HF model directory for ``path``: an existing directory as is, else a hub
    repository id (``owner/name``) fetched with ``huggingface_hub.snapshot_download``
    (config and tokenizer files only with ``config_only``; the safetensors weights
    otherwise; cached, so a second call is free). Offline, set ``HF_HUB_OFFLINE=1`` and
    pre-download, or pass the local directory. A URL (``gs://bucket/model``) is returned as an
    ``etils.epath.Path`` (:func:`simu_jax.base.as_path`): its weights are read in place
    (:mod:`simu_jax.models.convert`)."""
    local = as_path(path, "model.path").expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if is_remote(local) or local.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = _HUB_FILES_CONFIG + ([] if config_only else ["*.safetensors", "*.safetensors.index.json"])
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: one clear line
        raise FileNotFoundError(f"model.path {text!r} is not a local directory and could not be fetched from the "
                                f"Hugging Face hub ({type(e).__name__}: {one_line(str(e))[:200]})") from None


def check_model_files(path: str | os.PathLike) -> Path:
    """The model directory ``path`` resolves to (:func:`resolve_model_path`), refused in one line
    naming the file when its files would not load: no config.json or weights, a bad config.json,
    index or safetensors header, a missing shard, a tensor of the wrong name or shape
    (:func:`simu_jax.models.convert.check_checkpoint`; headers only, no weight is read). A
    pipeline calls this before it creates its run directory, so a bad model leaves nothing
    behind."""
    from simu_jax.models.convert import check_checkpoint

    local = resolve_model_path(path)
    _check_model_dir(local)
    check_checkpoint(local)
    return local


def model_config_from_spec(spec: ModelSpec, **defaults):
    """The :class:`ModelConfig` a spec describes; ``defaults`` (e.g. ``vocab_size`` from the
    tokenizer) fill fields the spec leaves out."""
    if spec.path is not None:
        return ModelConfig.from_pretrained(resolve_model_path(spec.path, config_only=True))
    fields = {**_MODEL_CONFIG_DEFAULTS, **{k: v for k, v in defaults.items() if v is not None}, **(spec.config or {})}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    if "vocab_size" not in fields:
        raise ConfigError("model.config needs vocab_size (or a tokenizer to take it from)", "model.config.vocab_size")
    try:
        return ModelConfig(**fields)
    except UnsupportedConfigError as e:
        raise ConfigError(str(e), "model.config") from None
    except TypeError as e:
        raise ConfigError(one_line(str(e)), "model.config") from None


def jnp_dtype(name: str | None):
    """``"float32"`` / ``"bfloat16"`` (a :class:`ModelSpec` dtype field) -> the jnp dtype; ``None`` stays ``None``."""
    return None if name is None else {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(spec: ModelSpec, **defaults):
    """A :class:`simu_jax.models.CausalLM` loaded from ``spec.path`` or randomly initialized.

    Random init uses :func:`host_init_params` (the model's init distribution drawn with
    numpy, seeded by ``spec.seed``), the same init ``simu-jax finetune`` uses.
    """
    kw = dict(param_dtype=jnp_dtype(spec.dtype), dtype=jnp_dtype(spec.compute_dtype), remat=spec.remat,
              layer_loop=spec.layer_loop)
    if spec.path is not None:
        return load_pretrained(resolve_model_path(spec.path), dtype=kw["param_dtype"], compute_dtype=kw["dtype"],
                               remat=spec.remat, layer_loop=spec.layer_loop)
    cfg = model_config_from_spec(spec, **defaults)
    graphdef, state = nnx.split(abstract_model(cfg, **kw))
    params = host_init_params(nnx.to_pure_dict(state), cfg.initializer_range, spec.seed)
    if params is None:
        return init_model(cfg, seed=spec.seed, **kw)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, params))
    return nnx.merge(graphdef, state)


def host_init_params(abstract_params: dict, initializer_range: float, seed: int):
    """Random init drawn with numpy: N(0, initializer_range) for kernels and embeddings,
    ones for norm weights (the model's own init distribution), one independent stream per
    parameter name. Returns ``None`` for an unknown leaf kind (then the caller uses the
    model's jit-compiled init). On CPU this avoids compiling the threefry PRNG (seconds)."""
    unknown = []

    def one(path, spec):
        name = jax.tree_util.keystr(path)
        leaf = getattr(path[-1], "key", None)
        if leaf in ("kernel", "embedding"):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            return (initializer_range * rng.standard_normal(spec.shape, np.float32)).astype(spec.dtype)
        if leaf == "weight":
            return np.ones(spec.shape, spec.dtype)
        unknown.append(name)
        return None

    out = jax.tree_util.tree_map_with_path(one, abstract_params)
    return None if unknown else out


def load_tokenizer(source: str | os.PathLike):
    """An HF tokenizer from a directory or hub name.

    Directories saved as a generic fast tokenizer (e.g. ours, from
    :func:`simu_jax.data.train_bpe_tokenizer`) load through ``PreTrainedTokenizerFast``
    directly, which avoids importing torch via ``AutoTokenizer`` (seconds per command).
    """
    path = Path(source)
    config = path / "tokenizer_config.json"
    if config.is_file() and (path / "tokenizer.json").is_file():
        if json.loads(config.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


@dataclass
class LoadedModel:
    """What :func:`load_model` returns. ``model`` is an abstract :class:`CausalLM` (graph only:
    ``graphdef`` is its graph, ``params`` the loaded weights); ``tokenizer_dir`` holds the
    tokenizer files (copied next to a saved model); always a local directory (for a model on
    an object store, :func:`simu_jax.models.convert.local_metadata_dir`)."""

    model: CausalLM
    graphdef: Any
    params: dict
    tokenizer: Any
    tokenizer_dir: Path

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def _check_model_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(
            f"no weights in model directory {path} (expected model.safetensors or model.safetensors.index.json)")


def load_model(source: "ModelSpec | str | os.PathLike", *, dtype: str | None = None,
               compute_dtype: str | None = None, remat: str | None = None, layer_loop: str | None = None,
               shardings=None) -> LoadedModel:
    """Load a model and its tokenizer from an HF directory or hub id (or ``ModelSpec.path``).

    Dtypes, remat and the layer loop come from the spec, else the keyword arguments (``"float32"``,
    ``"none"`` and ``"auto"`` by default).
    Errors are one line naming the directory: missing directory, config, weights or tokenizer,
    or a tokenizer larger than the model's vocabulary. ``shardings``: where the weights are read
    to (see :func:`simu_jax.models.convert.load_params`: default one device; on a mesh, a callable
    ``(abstract_params, config) -> shardings``, so each device reads only its block).
    """
    if isinstance(source, ModelSpec):
        if source.path is None:
            raise ValueError("model.path is required: an HF model directory or hub id to load")
        spec = source
    else:
        spec = ModelSpec(path=os.fspath(source), dtype=dtype or "float32", compute_dtype=compute_dtype,
                         remat=remat or "none", layer_loop=layer_loop or "auto")
    path = resolve_model_path(spec.path)
    _check_model_dir(path)
    kw = dict(param_dtype=jnp_dtype(spec.dtype), dtype=jnp_dtype(spec.compute_dtype), remat=spec.remat,
              layer_loop=spec.layer_loop)
    loaded = load_pretrained(path, dtype=kw["param_dtype"], compute_dtype=kw["dtype"], remat=spec.remat,
                             layer_loop=spec.layer_loop, shardings=shardings)
    _, params = split_params(loaded)
    # The graph of a freshly built model (not of `loaded`, which carries its source directory
    # as an attribute), so equal configs share compiled steps.
    model = abstract_model(loaded.config, **kw)
    tokenizer_dir = local_metadata_dir(path)  # `path` itself, or a local copy of a remote one's small files
    try:
        tokenizer = load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"no tokenizer in model directory {path}: {one_line(str(e))[:160]}") from None
    if len(tokenizer) > loaded.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{loaded.config.vocab_size} ({path})")
    return LoadedModel(model, nnx.graphdef(model), params, tokenizer, tokenizer_dir)
