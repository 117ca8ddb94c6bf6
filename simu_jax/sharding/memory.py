"""A memory model of one unlearning step: bytes by part, whole model and per device."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from simu_jax.sharding.mesh import MESH_AXES, parse_mesh_spec

__all__ = [
    "param_counts",
    "memory_estimate",
    "per_device",
    "memory_table",
    "print_memory_table",
    "LLAMA2_7B",
    "OLMO_1B",
]


def _cfg(**kw):
    from simu_jax.models import ModelConfig

    return ModelConfig(**kw)


def _presets():
    return {
        "LLaMA-2-7B": _cfg(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128),
        "OLMo-1B": _cfg(model_type="olmo", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                        tie_word_embeddings=True),
    }


LLAMA2_7B, OLMO_1B = _presets().values()

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _nbytes(dtype) -> int:
    name = jnp.dtype(dtype).name
    return _BYTES.get(name, jnp.dtype(dtype).itemsize)


def param_counts(cfg) -> dict[str, int]:
    """Parameter counts by group: embed, lm_head, attention, mlp_gate_up, mlp_down, norms, total."""
    h, i, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = n_layers * (2 * h * qd + 2 * h * kvd)
    if cfg.model_type == "llama":
        norms = n_layers * 2 * h + h
    elif cfg.model_type == "olmo2":
        norms = n_layers * (2 * h + qd + kvd) + h
    else:  # OLMo-1: LayerNorm without parameters
        norms = 0
    counts = {
        "embed": cfg.vocab_size * h,
        "lm_head": 0 if cfg.tie_word_embeddings else h * cfg.vocab_size,
        "attention": attention,
        "mlp_gate_up": n_layers * 2 * h * i,
        "mlp_down": n_layers * i * h,
        "norms": norms,
    }
    counts["total"] = sum(counts.values())
    return counts


def memory_estimate(model_config, method: str, trainable_fraction: float | None = None, *,
                    batch_tokens: int = 8 * 512, seq_len: int = 512, param_dtype="bfloat16",
                    state_dtype="float32", mlp_fraction: float = 0.05, remat: str = "none") -> dict[str, Any]:
    """Bytes of one unlearning step's memory, by part (whole model, before sharding).

    method: ``fo`` (AdamW on all params), ``so`` (Sophia on all params), ``simu`` (Sophia on
    all attention projections + ``mlp_fraction`` of the MLP neurons' ``down_proj`` rows,
    kept as a compact [L, K, H] copy). ``trainable_fraction`` (of all params) overrides the
    trainable count for any method.

    Returns ``params`` (all weights in ``param_dtype``, plus SIMU's compact rows),
    ``gradients`` (trainable, ``param_dtype``), ``optimizer_state`` (AdamW m and v / Sophia
    m, ``state_dtype``), ``curvature_state`` (Sophia's h; 0 for fo),
    ``activations_per_token`` (saved for the backward pass; see docs/scaling.md for the
    formula), ``activations`` (x ``batch_tokens``, forget + retain tokens of one step) and
    ``total``; plus ``trainable`` and ``total_params`` counts.
    """
    if method not in ("fo", "so", "simu"):
        raise ValueError(f"method={method!r}; allowed: fo, so, simu")
    if remat not in ("none", "full"):
        raise ValueError(f"remat={remat!r}; allowed: none, full")
    pb, sb = _nbytes(param_dtype), _nbytes(state_dtype)
    counts = param_counts(model_config)
    total = counts["total"]
    rows = 0
    if trainable_fraction is not None:
        if not 0 < trainable_fraction <= 1:
            raise ValueError(f"trainable_fraction must be in (0, 1], got {trainable_fraction}")
        trainable = int(round(trainable_fraction * total))
    elif method == "simu":
        rows = int(round(mlp_fraction * counts["mlp_down"]))
        trainable = counts["attention"] + rows
    else:
        trainable = total
    est = {
        "params": (total + rows) * pb,
        "gradients": trainable * pb,
        "optimizer_state": (2 if method == "fo" else 1) * trainable * sb,
        "curvature_state": 0 if method == "fo" else trainable * sb,
    }
    # activations saved for the backward pass, per token
    c = model_config
    h, i, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = pb * (4 * h + 3 * qd + 3 * kvd + 4 * i) + c.num_attention_heads * seq_len * (4 + pb)
    head = pb * h + 2 * 4 * c.vocab_size  # final norm output, fp32 logits and log-softmax
    if remat == "full":
        per_token = n_layers * pb * h + per_layer + head
    else:
        per_token = n_layers * per_layer + head
    est["activations_per_token"] = per_token
    est["activations"] = per_token * batch_tokens
    est["total"] = sum(est[k] for k in ("params", "gradients", "optimizer_state", "curvature_state", "activations"))
    est["trainable"] = trainable
    est["total_params"] = total
    return est


def per_device(estimate: Mapping[str, Any], mesh_shape) -> dict[str, Any]:
    """Per-device bytes under :data:`DEFAULT_RULES`: weights, gradients and states divided by
    fsdp x tensor (replicated over data), activations by data x fsdp (the batch split; tensor
    parallelism also splits the MLP/attention activations, ignored here: an upper bound)."""
    if isinstance(mesh_shape, jax.sharding.Mesh):
        sizes = {a: int(mesh_shape.shape.get(a, 1)) for a in MESH_AXES}
    elif isinstance(mesh_shape, str):  # a spec without -1: the sizes give the device count
        fixed = [int(p.split("=", 1)[1]) for p in mesh_shape.split(",") if "=" in p]
        if any(v < 1 for v in fixed):
            raise ValueError(f"per_device needs explicit axis sizes, got {mesh_shape!r}")
        sizes = parse_mesh_spec(mesh_shape, math.prod(fixed))
    else:
        sizes = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    model = sizes["fsdp"] * sizes["tensor"]
    batch = sizes["data"] * sizes["fsdp"]
    out = dict(estimate)
    for k in ("params", "gradients", "optimizer_state", "curvature_state"):
        out[k] = -(-estimate[k] // model)
    out["activations"] = -(-estimate["activations"] // batch)
    out["total"] = sum(out[k] for k in ("params", "gradients", "optimizer_state", "curvature_state", "activations"))
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def memory_table(models: Mapping[str, Any] | None = None, methods: Sequence[str] = ("fo", "so", "simu"),
                 **kwargs) -> str:
    """A markdown table of :func:`memory_estimate` (GiB; activations per token in KiB)."""
    models = _presets() if models is None else models
    lines = ["| model | method | trainable params | params | gradients | optimizer state | curvature state "
             "| activations / token (KiB) | activations (batch) | total |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, cfg in models.items():
        for method in methods:
            e = memory_estimate(cfg, method, **kwargs)
            lines.append(f"| {name} | {method} | {e['trainable'] / 1e9:.3f} B | {_gib(e['params'])} | "
                         f"{_gib(e['gradients'])} | {_gib(e['optimizer_state'])} | {_gib(e['curvature_state'])} | "
                         f"{e['activations_per_token'] / 1024:.0f} | {_gib(e['activations'])} | {_gib(e['total'])} |")
    return "\n".join(lines)


def print_memory_table(models: Mapping[str, Any] | None = None, methods: Sequence[str] = ("fo", "so", "simu"),
                       **kwargs) -> None:
    print(memory_table(models, methods, **kwargs))
