"""Typed run configuration: nested dataclasses read from YAML, with `--set a.b=c` overrides.

Every command describes its configuration as a tree of ``@dataclass`` es and calls
:func:`load_config`::

    @dataclass
    class Train:
        learning_rate: float = field(default=1e-3, metadata={"range": (0.0, None, "()")})
        schedule: Literal["cosine", "constant"] = "cosine"
        betas: tuple[float, float] = (0.9, 0.999)

    @dataclass
    class Run:
        model: ModelSpec = field(default_factory=ModelSpec)
        train: Train = field(default_factory=Train)

    cfg = load_config(Run, "run.yaml", ["train.learning_rate=3e-4"])

The reader is strict and fails at start with one line naming the key:

* unknown keys: ``config key 'train.lr' is unknown; allowed keys: learning_rate, schedule, betas``
* wrong types: ``config key 'train.learning_rate' must be float, got 'abc' (str)``
* ``Literal`` / ``metadata={"choices": (...)}``: ``... must be one of cosine, constant; got 'linear'``
* ``metadata={"range": (lo, hi, "(]")}`` (``None`` = unbounded; bracket pair ``[]``,
  ``()``, ``(]`` or ``[)``): ``config key 'attribution.t' must be in (0, 1]; got 0``
* cross-field checks: a dataclass may define ``check(self)`` that raises
  :class:`ConfigError` (with a ``key`` relative to that dataclass); the loader prefixes
  the full path.

Supported annotations: ``bool``, ``int``, ``float`` (ints are accepted; so are strings
like ``1e-3``, which YAML 1.1 reads as text), ``str``, ``Any``, ``Optional[X]`` /
``X | None``, ``Union``, ``Literal[...]``, ``tuple[X, ...]``, ``tuple[X, Y]``,
``list[X]``, ``dict[str, X]``, plain ``dict``/``list``, and nested dataclasses. Override
values are parsed as YAML scalars (``a.b=1e-3``, ``a.b=null``, ``a.b=[1, 2]``,
``a.b=true``); a nested dataclass that is ``None`` is created when a key under it is set.

The resolved configuration is saved with :func:`dump_yaml` and reloads to an equal object.

Shared specs used by several commands live here too: :class:`ModelSpec` (which model, how
to build it: :func:`build_model`) and :class:`DataSpec` (which benchmark and how to
tokenize it: :func:`load_benchmark`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

__all__ = [
    "Benchmark",
    "ConfigError",
    "DataSpec",
    "ModelSpec",
    "SyntheticSpec",
    "TemplateSpec",
    "apply_overrides",
    "benchmark_texts",
    "build_model",
    "host_init_params",
    "dump_yaml",
    "from_dict",
    "load_benchmark",
    "load_config",
    "model_config_from_spec",
    "parse_override",
    "qa_template",
    "resolve_model_path",
    "to_dict",
]


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range (one-line message).

    ``key`` is the dotted path of the offending key (``None`` for file-level errors).
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}' {message}" if key else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        if not prefix:
            return self
        return ConfigError(self.detail, f"{prefix}.{self.key}" if self.key else prefix)


# --------------------------------------------------------------------------- YAML + overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'a.b=c'`` -> ``(['a', 'b'], yaml_scalar('c'))``."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.learning_rate=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({_one_line(str(e))})") from None
    return parts, value


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b=c`` overrides to a raw (YAML-loaded) dict, creating nested dicts as needed."""
    data = _copy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"is {child!r}, not a mapping, so '{'.'.join(parts)}' cannot be set",
                                  ".".join(parts[: i + 1]))
            node = child
        node[parts[-1]] = value
    return data


def _copy(x):
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


def _one_line(msg: str) -> str:
    return " ".join(msg.split())


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(str(e))})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(cls, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()):
    """Read ``path`` (YAML; ``None`` = all defaults), apply ``overrides``, build and check ``cls``."""
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides or ())
    return from_dict(cls, data)


# --------------------------------------------------------------------------- typed conversion


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list, dict):
        args = typing.get_args(tp)
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _type_name(a) for a in args)}]"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _show(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


class _Mismatch(Exception):
    """Internal: a value does not fit a type (carries the relative key, if deeper)."""

    def __init__(self, key: str | None, message: str):
        self.key, self.message = key, message


def _convert(tp, value, key: str):
    """Convert/validate ``value`` against annotation ``tp``; raise ConfigError naming ``key``."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, key)
            except ConfigError as e:
                errors.append(e)
        # One member that is a nested structure: report its specific error.
        if len(non_none) == 1:
            raise errors[0]
        raise ConfigError(f"must be {_type_name(tp)}, got {_show(value)}", key)

    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(f"must be one of {', '.join(str(a) for a in args)}; got {value!r}", key)

    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"must be null, got {_show(value)}", key)

    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            value = to_dict(value)
        if value is None:
            raise ConfigError(f"must be {_type_name(tp)}, got null", key)
        if not isinstance(value, Mapping):
            raise ConfigError(f"must be {_type_name(tp)}, got {_show(value)}", key)
        return from_dict(tp, value, prefix=key)

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"must be bool (true/false), got {_show(value)}", key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        raise ConfigError(f"must be int, got {_show(value)}", key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"must be float, got {_show(value)}", key)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"must be str, got {_show(value)}", key)

    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"must be {_type_name(tp)} (a YAML list), got {_show(value)}", key)
        if not args:
            items = list(value)
        elif origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"must be a list of {len(args)} items ({_type_name(tp)}), got {_show(value)}", key)
            items = [_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items

    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"must be {_type_name(tp)} (a mapping), got {_show(value)}", key)
        if not args:
            return dict(value)
        kt, vt = args
        return {_convert(kt, k, key): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}

    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"must be {_type_name(tp)}, got {_show(value)}", key)


def _check_metadata(f: dataclasses.Field, value, key: str) -> None:
    if value is None:
        return
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"must be one of {', '.join(str(c) for c in choices)}; got {value!r}", key)
    rng = f.metadata.get("range")
    if rng is not None:
        lo, hi, *rest = rng
        brackets = rest[0] if rest else "[]"
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            ok = True
            if lo is not None:
                ok &= v > lo if brackets[0] == "(" else v >= lo
            if hi is not None:
                ok &= v < hi if brackets[1] == ")" else v <= hi
            if isinstance(v, float) and math.isnan(v):
                ok = False
            if not ok:
                interval = (
                    f"{brackets[0]}{_num(lo) if lo is not None else '-inf'}, "
                    f"{_num(hi) if hi is not None else 'inf'}{brackets[1]}"
                )
                raise ConfigError(f"must be in {interval}; got {v!r}", key)


def _num(x) -> str:
    return repr(int(x)) if isinstance(x, float) and x.is_integer() else repr(x)


def _hints(cls) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as e:  # pragma: no cover - a broken annotation is a programming error
        raise TypeError(f"cannot resolve the annotations of {cls.__name__}: {e}") from e


def from_dict(cls, data: Mapping[str, Any] | None, prefix: str = ""):
    """Build dataclass ``cls`` from a raw mapping, strictly (see module docstring)."""
    data = dict(data or {})
    hints = _hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise ConfigError(f"is unknown; allowed keys{' under ' + prefix if prefix else ''}: {', '.join(names)}",
                              where)
    kwargs = {}
    for f in fields:
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = _convert(hints[f.name], data[f.name], key)
        _check_metadata(f, value, key)
        kwargs[f.name] = value
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise e.prefixed(prefix) from None
    # Defaults are checked too (a subclass may tighten a range).
    for f in fields:
        if f.name not in kwargs:
            _check_metadata(f, getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ConfigError as e:
            raise e.prefixed(prefix) from None
    return obj


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) of a config dataclass: YAML/JSON-ready."""

    def conv(x):
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, Mapping):
            return {str(k): conv(v) for k, v in x.items()}
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        return x

    return conv(cfg)


def dump_yaml(cfg, path: str | os.PathLike | None = None) -> str:
    """The resolved config as YAML text; also written (atomically) to ``path`` if given."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)
    if path is not None:
        from simu_jax.runio import write_text_atomic

        write_text_atomic(path, text)
    return text


# --------------------------------------------------------------------------- shared specs

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
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] | None = None
    remat: Literal["none", "full", "dots"] = "none"
    seed: int = field(default=0, metadata={"range": (0, None)})

    def check(self) -> None:
        if self.path is not None and self.config is not None:
            raise ConfigError("set either model.path (HF directory) or model.config (random init), not both")
        if self.config is not None:
            from simu_jax.models import ModelConfig

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
    pre-download, or pass the local directory."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    text = str(path)
    if local.exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(f"model directory {path} does not exist")
    try:
        from huggingface_hub import snapshot_download

        patterns = _HUB_FILES_CONFIG + ([] if config_only else ["*.safetensors", "*.safetensors.index.json"])
        return Path(snapshot_download(text, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: one clear line
        raise FileNotFoundError(f"model.path {text!r} is not a local directory and could not be fetched from the "
                                f"Hugging Face hub ({type(e).__name__}: {_one_line(str(e))[:200]})") from None


def model_config_from_spec(spec: ModelSpec, **defaults):
    """The :class:`ModelConfig` a spec describes; ``defaults`` (e.g. ``vocab_size`` from the
    tokenizer) fill fields the spec leaves out."""
    from simu_jax.models import ModelConfig
    from simu_jax.models.config import UnsupportedConfigError

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
        raise ConfigError(_one_line(str(e)), "model.config") from None


def _jnp_dtype(name: str | None):
    import jax.numpy as jnp

    return None if name is None else {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def build_model(spec: ModelSpec, **defaults):
    """A :class:`simu_jax.models.CausalLM` loaded from ``spec.path`` or randomly initialized.

    Random init uses :func:`host_init_params` (the model's init distribution drawn with
    numpy, seeded by ``spec.seed``), the same init ``simu-jax finetune`` uses.
    """
    import jax
    from flax import nnx

    from simu_jax.models import abstract_model, init_model
    from simu_jax.models.convert import load_pretrained

    kw = dict(param_dtype=_jnp_dtype(spec.dtype), dtype=_jnp_dtype(spec.compute_dtype), remat=spec.remat)
    if spec.path is not None:
        return load_pretrained(resolve_model_path(spec.path), dtype=kw["param_dtype"], compute_dtype=kw["dtype"],
                               remat=spec.remat)
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
    import zlib

    import jax
    import numpy as np

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


@dataclass
class SyntheticSpec:
    """Fields of :class:`simu_jax.data.SyntheticConfig` (the embedded benchmark)."""

    seed: int = 0
    num_people: int = field(default=40, metadata={"range": (3, None)})
    forget_fraction: float = field(default=0.1, metadata={"range": (0.0, 1.0, "()")})
    holdout_fraction: float = field(default=0.1, metadata={"range": (0.0, 1.0, "[)")})
    facts_per_person: int = field(default=5, metadata={"range": (1, 9)})
    num_general: int = field(default=40, metadata={"range": (0, None)})
    num_perturbed: int = field(default=5, metadata={"range": (3, 8)})

    def check(self) -> None:
        if self.forget_fraction + self.holdout_fraction >= 1:
            raise ConfigError(f"forget_fraction + holdout_fraction must be < 1; got "
                              f"{self.forget_fraction} + {self.holdout_fraction}", "forget_fraction")


@dataclass
class TemplateSpec:
    """QA template; ``None`` fields take the benchmark's default (TOFU's
    ``Question: ...\\nAnswer: `` for synthetic/TOFU; input and output joined by a space for LUME)."""

    question_start: str | None = None
    question_end: str | None = None
    answer_start: str | None = None


_DEFAULT_SPLITS = {
    "synthetic": {"forget": "forget", "retain": "retain", "holdout": "holdout"},
    "tofu": {"forget": "forget10", "retain": "retain90", "holdout": "holdout10"},
    "lume": {"forget": "forget", "retain": "retain", "holdout": None},
}
_DEFAULT_TEMPLATES = {
    "synthetic": ("Question: ", "\n", "Answer: "),
    "tofu": ("Question: ", "\n", "Answer: "),
    "lume": ("", " ", ""),
}


@dataclass
class DataSpec:
    """Which benchmark, which splits, and how to tokenize it.

    ``source``: TOFU: a local directory of the JSON files or a hub name (default: the
    shared data directory if present, else ``locuslab/TOFU``); LUME: a local directory
    (default: the shared data directory). Ignored for ``synthetic``.
    Split names (``None`` = the benchmark's default): synthetic forget/retain/holdout;
    TOFU forget10/retain90/holdout10; LUME forget/retain (no holdout).
    Sequences longer than ``max_length`` tokens are truncated with a warning
    (``truncation: error`` makes it an error).
    """

    benchmark: Literal["synthetic", "tofu", "lume"] = "synthetic"
    source: str | None = None
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    forget: str | None = None
    retain: str | None = None
    holdout: str | None = None
    template: TemplateSpec = field(default_factory=TemplateSpec)
    max_length: int = field(default=256, metadata={"range": (8, None)})
    truncation: Literal["warn", "error"] = "warn"

    def check(self) -> None:
        if self.benchmark == "tofu":
            from simu_jax.data import TOFU_SPLITS

            for name in ("forget", "retain", "holdout"):
                split = getattr(self, name)
                if split is not None and split not in TOFU_SPLITS:
                    raise ConfigError(f"must be a TOFU split ({', '.join(TOFU_SPLITS)}); got {split!r}", name)
        elif self.benchmark == "lume":
            for name, allowed in (("forget", ("forget", "retain")), ("retain", ("forget", "retain"))):
                split = getattr(self, name)
                if split is not None and split not in allowed:
                    raise ConfigError(f"must be one of {', '.join(allowed)}; got {split!r}", name)
            if self.holdout is not None:
                raise ConfigError("must be null for LUME (it has no holdout split)", "holdout")

    def split_name(self, which: str) -> str | None:
        value = getattr(self, which)
        return value if value is not None else _DEFAULT_SPLITS[self.benchmark][which]


def qa_template(spec: DataSpec):
    """The :class:`simu_jax.data.QATemplate` of a data spec (benchmark defaults filled in)."""
    from simu_jax.data import QATemplate

    d = _DEFAULT_TEMPLATES[spec.benchmark]
    t = spec.template
    return QATemplate(
        question_start=d[0] if t.question_start is None else t.question_start,
        question_end=d[1] if t.question_end is None else t.question_end,
        answer_start=d[2] if t.answer_start is None else t.answer_start,
    )


@dataclass
class Benchmark:
    """QA records of one benchmark, by role.

    ``forget``/``retain``/``holdout`` are the training-side splits (``retain`` is the full
    retain set: e.g. TOFU retain90). ``retain_eval`` is the retain subset evaluated
    (TOFU: retain_perturbed, 400 records with paraphrases and perturbed answers; else
    ``retain``). ``general`` plays TOFU's real_authors/world_facts role.
    ``train_general``: whether fine-tuning a target mixes ``general`` into its data
    (only for the synthetic benchmark, whose model starts from scratch).
    """

    name: str
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    general: list[dict]
    refusals: list[str]
    retain_eval: list[dict]
    train_general: bool = False
    info: dict = field(default_factory=dict)


def _synthetic_config(spec: SyntheticSpec):
    from simu_jax.data import SyntheticConfig

    return SyntheticConfig(**dataclasses.asdict(spec))


def _tofu_source(spec: DataSpec):
    if spec.source is not None:
        return spec.source
    from simu_jax.data import TOFU_HUB_NAME, default_data_dir

    local = default_data_dir() / "tofu"
    return str(local) if local.is_dir() else TOFU_HUB_NAME


def load_benchmark(spec: DataSpec) -> Benchmark:
    """Load the benchmark a :class:`DataSpec` names as lists of QA records.

    * synthetic: :func:`simu_jax.data.make_synthetic` (forget/retain/holdout/general/refusals).
    * TOFU: forget = ``<forget>_perturbed`` when that split exists (same questions, plus
      paraphrased and perturbed answers), holdout likewise, retain = ``<retain>`` (e.g.
      retain90), retain_eval = ``retain_perturbed``, general = ``real_authors_perturbed`` +
      ``world_facts_perturbed`` (``paraphrased_answer`` = the answer, as TOFU evaluates them;
      ``general_set`` names the source), refusals = ``idontknow.jsonl`` (local source only; else the
      synthetic refusal strings).
    * LUME: rows map ``input`` -> question, ``output`` -> answer (``id``, ``task``, ``kind``
      kept); no holdout, no general.
    """
    from simu_jax import data as D

    name = spec.benchmark
    if name == "synthetic":
        bench = D.make_synthetic(_synthetic_config(spec.synthetic))
        return Benchmark(name, bench.forget, bench.retain, bench.holdout, bench.general, list(bench.refusals),
                         retain_eval=bench.retain, train_general=True,
                         info={"people": bench.people, "synthetic": dataclasses.asdict(spec.synthetic)})

    if name == "tofu":
        source = _tofu_source(spec)

        def with_perturbed(split: str | None) -> list[dict]:
            if split is None:
                return []
            perturbed = f"{split}_perturbed"
            return D.load_tofu(perturbed if perturbed in D.TOFU_SPLITS else split, source)

        forget = with_perturbed(spec.split_name("forget"))
        retain = D.load_tofu(spec.split_name("retain"), source)
        holdout = with_perturbed(spec.split_name("holdout"))
        retain_eval = D.load_tofu("retain_perturbed", source)
        # These two sets have no paraphrase; TOFU's evaluation uses the answer itself.
        general = [{"paraphrased_answer": r["answer"], **r, "general_set": s}
                   for s in ("real_authors_perturbed", "world_facts_perturbed") for r in D.load_tofu(s, source)]
        try:
            refusals = D.load_idontknow(source if Path(str(source)).is_dir() else None)
        except FileNotFoundError:
            refusals = list(D.REFUSALS)
        return Benchmark(name, forget, retain, holdout, general, refusals, retain_eval=retain_eval,
                         info={"source": str(source)})

    if name == "lume":
        def rows(split):
            return [{"question": r["input"], "answer": r["output"], "id": r["id"], "task": r["task"],
                     "kind": r["kind"], "doc_id": r["doc_id"]} for r in D.load_lume(split, spec.source)]

        forget, retain = rows(spec.split_name("forget")), rows(spec.split_name("retain"))
        return Benchmark(name, forget, retain, [], [], list(D.REFUSALS), retain_eval=retain,
                         info={"source": str(spec.source) if spec.source else "default"})
    raise ConfigError(f"must be one of synthetic, tofu, lume; got {name!r}", "data.benchmark")  # pragma: no cover


def benchmark_texts(bench: Benchmark) -> list[str]:
    """Every string of a benchmark (questions, answers, paraphrases, perturbed answers,
    refusals): the corpus a local BPE tokenizer is trained on."""
    out: list[str] = []
    seen: set[int] = set()
    for recs in (bench.forget, bench.retain, bench.holdout, bench.general, bench.retain_eval):
        if id(recs) in seen:
            continue
        seen.add(id(recs))
        for r in recs:
            for key in ("question", "answer", "paraphrased_question", "paraphrased_answer"):
                if isinstance(r.get(key), str):
                    out.append(r[key])
            out += [str(p) for p in r.get("perturbed_answer") or []]
    return out + list(bench.refusals)
