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

This module is only that machinery (bottom layer, see ``docs/architecture.md``). The specs
shared by several commands live with what they describe: :class:`simu_jax.models.spec.ModelSpec`
and :class:`simu_jax.data.DataSpec`.
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

from simu_jax.base import ConfigError

__all__ = ["ConfigError", "apply_overrides", "dump_yaml", "from_dict", "load_config", "parse_override", "to_dict"]


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


def _deep_merge(base: dict, child: dict) -> dict:
    """``child`` over ``base``: mappings merge key by key, any other value replaces."""
    out = _copy(base)
    for k, v in child.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else _copy(v)
    return out


def read_config_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML config with its ``base:`` chain resolved: ``base: FILE`` (relative to this file)
    names a config whose keys this one overrides (mappings merged key by key), so a family of
    runs shares one file and each run states only what differs."""
    path = Path(path)
    data = read_yaml(path)
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of a YAML config, got {_show(base)}")
    base_path = (path.parent / base).resolve()
    if base_path in _seen + (path.resolve(),):
        raise ConfigError(f"{path}: base {base} makes a cycle")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base config not found: {base_path}")
    return _deep_merge(read_config_yaml(base_path, _seen + (path.resolve(),)), data)


def load_config(cls, path: str | os.PathLike | None = None, overrides: Sequence[str] = ()):
    """Read ``path`` (YAML, with its ``base:`` chain, :func:`read_config_yaml`; ``None`` = all
    defaults), apply ``overrides``, build and check ``cls``."""
    data = read_config_yaml(path) if path is not None else {}
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


def dump_yaml(cfg) -> str:
    """The resolved config as YAML text (write it with :func:`simu_jax.runio.write_text_atomic`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, allow_unicode=True)
