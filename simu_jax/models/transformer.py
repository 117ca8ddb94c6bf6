"""One Flax NNX decoder for the LLaMA, OLMo and OLMo-2 families.

The three families differ only in where the norms sit and in two attention details, so one
module with three switches (`cfg.norm_kind`, `cfg.post_norm`, `cfg.qk_norm`, plus OLMo's
`clip_qkv`) keeps each piece of logic in one place instead of three near-copies.

Parameter names mirror HF's (`model.layers.self_attn.q_proj.kernel`, `model.norm.weight`,
`lm_head.kernel`), kernels in JAX's [in, out] layout, so conversion is a 1:1 map plus
transposes. The decoder layers are stacked: every layer parameter has a leading
`num_hidden_layers` axis and the forward pass is a `jax.lax.scan` over it, which keeps
compile time flat in depth; shallow models run it unrolled (`layer_loop`, see LAYER_LOOPS).

The pure view used by every transform: `graphdef, state = nnx.split(model)`;
`params = nnx.to_pure_dict(state)` (a nested dict of arrays); `apply(graphdef, params,
input_ids, attention_mask)` returns float32 logits.

MLP hook (for neuron attribution): the activation feeding `down_proj`,
`a = silu(gate(x)) * up(x)` of shape [B, T, I], can be returned (`return_mlp_acts`), scaled
by a per-layer factor (`mlp_scale`, leading axis L, broadcast against [B, T, I]) and
perturbed additively (`mlp_delta`, [L, B, T, I]); the gradient w.r.t. `mlp_delta` at zero is
dL/da at the scaled point. `return_mlp_residuals` also returns every layer's mid residual r_l
(between attention and MLP) [L, B, T, H]; `run(start_layer=l, start_residual=r_l,
start_neurons=n)` then computes only layer l's down projection of n, layers l+1..L-1 and the
head (earlier layers skipped by `lax.switch`, one compiled program for every traced l): all
that changes when only layer l's neurons are scaled. `mlp_rows = (idx [L, K], rows [L, K, H])` adds
`a[..., idx] @ rows` to each layer's `down_proj` output: SIMU trains a neuron subset this way,
as a compact [L, K, H] array, with the corresponding kernel rows zeroed in the frozen params.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from simu_jax.models.config import ModelConfig
from simu_jax.models.layers import F32, apply_rope, attention, layer_norm_no_params, rms_norm, rope_cos_sin

# Logical axes of the residual stream [B, T, H] at a layer boundary: rows over the batch axes,
# the hidden axis whole (Megatron keeps it whole on every tensor rank; "embed" is the weights'
# fsdp axis, which the batch already uses).
RESIDUAL_AXES = ("batch", "length", None)

_ACTIVATION_CONSTRAINT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "simu_jax_activation_constraint", default=None)


@contextlib.contextmanager
def activation_constraint(constrain: Callable[[jax.Array, Sequence[str | None]], jax.Array]):
    """While the model is traced inside this context, every layer boundary's residual stream
    ``x`` becomes ``constrain(x, RESIDUAL_AXES)`` (e.g. a ``with_sharding_constraint`` by logical
    names: ``sharding.activation_sharding(mesh, rules)``). Outside it the model is unchanged.

    Enter it *inside* the function being traced, one whose jit cache key names the layout (the
    mesh a static argument, or a jit made for that mesh): the hook is read at trace time and a
    cached trace does not see a context entered later."""
    token = _ACTIVATION_CONSTRAINT.set(constrain)
    try:
        yield
    finally:
        _ACTIVATION_CONSTRAINT.reset(token)


def constrain_activation(x: jax.Array, names: Sequence[str | None] = RESIDUAL_AXES) -> jax.Array:
    """``x`` through the active :func:`activation_constraint` (unchanged when there is none)."""
    constrain = _ACTIVATION_CONSTRAINT.get()
    return x if constrain is None else constrain(x, names)


# How the decoder loops over its stacked layers (`CausalLM(layer_loop=...)`): "scan" is one
# `lax.scan` body, compile time flat in depth; "unrolled" is the same scan with `unroll=True`
# (straight-line layers, the same stacked params and outputs), which on XLA:CPU skips the
# per-iteration weight slices and residual stacking of the loop (the bench's 4-layer gradient:
# 0.71-0.88x the scan's time, measured in turns) but compiles each layer separately (16 layers,
# hidden 128: 8.2 s against 3.5 s scanned; 4 layers: 3.0 against 2.9 s); "auto" unrolls up to
# AUTO_UNROLL_MAX_LAYERS layers and scans deeper models, and scans on a mesh (inside an
# `activation_constraint`): there the scan keeps one layer's FSDP-gathered weights live at a time,
# where the unrolled program gathers several layers' at once (the SIMU step's temp per device on
# fsdp=8, tests/test_sharding.py: 0.45x one device unrolled, under 0.19x scanned).
LAYER_LOOPS = ("auto", "scan", "unrolled")
AUTO_UNROLL_MAX_LAYERS = 8


def unrolls(layer_loop: str, num_layers: int, on_mesh: bool = False) -> bool:
    """Whether ``layer_loop`` runs a model of ``num_layers`` layers unrolled (``on_mesh``: traced
    inside an :func:`activation_constraint`, i.e. a mesh step)."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop={layer_loop!r}; allowed: {', '.join(LAYER_LOOPS)}")
    return layer_loop == "unrolled" or (layer_loop == "auto" and not on_mesh
                                        and num_layers <= AUTO_UNROLL_MAX_LAYERS)


REMAT_POLICIES = {
    "none": None,
    "full": "full",
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dense(x: jax.Array, w: jax.Array, **dot_kwargs) -> jax.Array:
    """x [..., in] @ w [in, out] as one 2-D matmul over the flattened [tokens, in] rows.

    The same math as `jnp.dot(x, w)`, but XLA:CPU gets 2-D dots in its backward too: with a
    [B, T, in] operand the weight gradient contracts two token axes and XLA writes the
    activations' cotangent transposed first (the `copy_*`/`transpose_*` fusions that took
    ~20% of a gradient's op time). Measured on the bench's gradient (hidden 256, 4 layers):
    0.78x the CPU time of the 3-D form, bit-identical logits.
    """
    if x.ndim == 2:
        return jnp.dot(x, w, **dot_kwargs)
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, **dot_kwargs)
    return y.reshape(*x.shape[:-1], y.shape[-1])


class Linear(nnx.Module):
    """Bias-free linear map; `kernel` is [in, out] (or [L, in, out] when stacked)."""

    def __init__(self, d_in: int, d_out: int, *, layers: int | None, init_std: float, param_dtype, rngs: nnx.Rngs):
        shape = (d_in, d_out) if layers is None else (layers, d_in, d_out)
        self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), shape, F32).astype(param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return dense(x, self.kernel[...].astype(x.dtype))


class Embedding(nnx.Module):
    def __init__(self, vocab: int, hidden: int, *, init_std: float, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(init_std * jax.random.normal(rngs.params(), (vocab, hidden), F32).astype(param_dtype))


class RMSNorm(nnx.Module):
    def __init__(self, size: int, *, layers: int | None, eps: float, param_dtype):
        shape = (size,) if layers is None else (layers, size)
        self.weight = nnx.Param(jnp.ones(shape, param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, layers: int, param_dtype, rngs: nnx.Rngs):
        lin = dict(layers=layers, init_std=cfg.initializer_range, param_dtype=param_dtype, rngs=rngs)
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, h * d, **lin)
        self.k_proj = Linear(cfg.hidden_size, kv * d, **lin)
        self.v_proj = Linear(cfg.hidden_size, kv * d, **lin)
        self.o_proj = Linear(h * d, cfg.hidden_size, **lin)
        if cfg.qk_norm:  # OLMo-2: RMSNorm over the full q / k width, before the head split
            self.q_norm = RMSNorm(h * d, layers=layers, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(kv * d, layers=layers, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.cfg = cfg

    def __call__(self, x, cos, sin, mask, kv_cache=None, cache_index=None):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:  # OLMo-1
            q, k, v = (jnp.clip(z, -cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        q = apply_rope(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), cos, sin)
        k = apply_rope(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), cos, sin)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        if kv_cache is not None:  # write this chunk into the cache slots [cache_index, cache_index + t)
            k_cache, v_cache = kv_cache
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
            kv_cache = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        return self.o_proj(attention(q, k, v, mask)), kv_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, layers: int, param_dtype, rngs: nnx.Rngs):
        lin = dict(layers=layers, init_std=cfg.initializer_range, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **lin)

    def __call__(self, x, scale=None, delta=None, rows=None):
        act = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)  # the neurons: input of down_proj
        neurons = act
        if scale is not None:
            act = act * scale.astype(act.dtype)
        if delta is not None:
            act = act + delta.astype(act.dtype)
        return self.down(act, rows), neurons

    def down(self, act, rows=None):
        """down_proj of the neuron activations ``act`` [..., I]."""
        out = self.down_proj(act)
        if rows is not None:  # extra down_proj rows for a neuron subset: out += act[..., idx] @ rows
            idx, row_values = rows
            out = out + dense(jnp.take(act, idx, axis=-1), row_values.astype(act.dtype))
        return out


class DecoderLayers(nnx.Module):
    """All decoder layers, parameters stacked on a leading layer axis."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        n = cfg.num_hidden_layers
        self.self_attn = Attention(cfg, layers=n, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, layers=n, param_dtype=param_dtype, rngs=rngs)
        norm = dict(layers=n, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        if cfg.model_type == "llama":
            self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
        elif cfg.model_type == "olmo2":
            self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm)
        self.cfg = cfg

    def layer(self, x, cos, sin, mask, kv_cache, cache_index, scale, delta, rows):
        """One layer; called inside the scan on a module merged from one layer's slice. Returns
        (output, kv cache, neurons, mid) with mid the residual between attention and MLP."""
        cfg = self.cfg
        if cfg.model_type == "olmo2":  # h = x + norm(f(x))
            a, kv_cache = self.self_attn(x, cos, sin, mask, kv_cache, cache_index)
            mid = x + self.post_attention_layernorm(a)
            m, neurons = self.mlp(mid, scale, delta, rows)
        else:  # h = x + f(norm(x))
            pre_attn = self.input_layernorm if cfg.model_type == "llama" else layer_norm_no_params
            pre_mlp = self.post_attention_layernorm if cfg.model_type == "llama" else layer_norm_no_params
            a, kv_cache = self.self_attn(pre_attn(x), cos, sin, mask, kv_cache, cache_index)
            mid = x + a
            m, neurons = self.mlp(pre_mlp(mid), scale, delta, rows)
        return self.mlp_residual(mid, m), kv_cache, neurons, mid

    def mlp_residual(self, mid, m):
        """The layer's output from its mid residual and its MLP output (OLMo-2 normalizes it)."""
        return mid + (self.post_feedforward_layernorm(m) if self.cfg.model_type == "olmo2" else m)

    def finish_from_neurons(self, mid, neurons, rows):
        """The layer's output given its mid residual and its neuron activations (what down_proj
        takes): the tail of :meth:`layer`, without attention, gate and up."""
        return self.mlp_residual(mid, self.mlp.down(neurons, rows))


class Backbone(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range,
                                      param_dtype=param_dtype, rngs=rngs)
        self.layers = DecoderLayers(cfg, param_dtype=param_dtype, rngs=rngs)
        if cfg.norm_kind == "rmsnorm":
            self.norm = RMSNorm(cfg.hidden_size, layers=None, eps=cfg.rms_norm_eps, param_dtype=param_dtype)


class CausalLM(nnx.Module):
    """LLaMA / OLMo / OLMo-2 causal LM. `dtype` is the compute dtype (defaults to param dtype)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=None,
        remat: str = "none",
        layer_loop: str = "auto",
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; allowed: {', '.join(REMAT_POLICIES)}")
        unrolls(layer_loop, cfg.num_hidden_layers)  # checks the name
        self.config = cfg
        self.dtype = jnp.dtype(dtype or param_dtype)
        self.remat = remat
        self.layer_loop = layer_loop
        self.model = Backbone(cfg, param_dtype=param_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, layers=None, init_std=cfg.initializer_range,
                                  param_dtype=param_dtype, rngs=rngs)

    def __call__(self, input_ids, attention_mask=None, positions=None, **kwargs) -> jax.Array:
        return self.run(input_ids, attention_mask, positions, **kwargs)[0]

    def run(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        *,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
        mlp_scale: jax.Array | None = None,
        mlp_delta: jax.Array | None = None,
        mlp_rows: tuple[jax.Array, jax.Array] | None = None,
        return_mlp_acts: bool = False,
        return_mlp_residuals: bool = False,
        start_layer: jax.Array | int | None = None,
        start_residual: jax.Array | None = None,
        start_neurons: jax.Array | None = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, Any]]:
        """Logits [B, T, V] in float32, and aux {'cache', 'mlp_acts', 'mlp_residuals'}.

        Without a cache, `attention_mask` is [B, T] (1 = real token) and default positions are
        `cumsum(mask) - 1` (what HF generate uses, so left padding is handled). With a cache
        (k, v each [L, B, S, KV, D]), `attention_mask` covers all S cache slots, the T new
        tokens are written at slots [cache_index, cache_index + T), and `positions` must be given.

        Suffix run from inside layer l = `start_layer` (an int or traced scalar): given its mid
        residual r_l (between attention and MLP, [B, T, H]: `aux['mlp_residuals'][l]` of a full
        run on the same ids) and neuron activations n_l ([B, T, I], what down_proj takes, e.g.
        alpha * `aux['mlp_acts'][l]`), it computes layer l's output r_l + down(n_l) (OLMo-2:
        r_l + norm(down(n_l))), then layers l+1..L-1 and the head: all that depends on n_l. The
        earlier layers are skipped by `lax.switch` (only the taken branch executes, forward and
        backward); their `mlp_acts` are zeros and their cache slots are left as they are.

        `logits_at` ([B, P] positions): the logits of only those positions, [B, P, V] (the head
        and the loss cost P / T of the full ones, e.g. when only answer positions are scored).
        """
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        key_valid = attention_mask.astype(bool)
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
        s = key_valid.shape[1]
        query_slot = cache_index + jnp.arange(t)
        causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
        mask = causal[None] & key_valid[:, None, :]
        cos, sin = rope_cos_sin(cfg, positions)

        suffix = (start_layer, start_residual, start_neurons)
        if any(v is None for v in suffix) and not all(v is None for v in suffix):
            raise ValueError("a suffix run needs start_layer, start_residual and start_neurons")
        if start_layer is None:
            x = self.model.embed_tokens.embedding[...][input_ids].astype(self.dtype)
        else:  # the carry is unused until layer start_layer, which starts from start_residual
            x = jnp.zeros(start_residual.shape, self.dtype)
        graphdef, layer_state = nnx.split(self.model.layers)
        zeros_acts = (lambda: jnp.zeros((b, t, cfg.intermediate_size), self.dtype)) if return_mlp_acts else lambda: None

        def layer_body(x, xs):
            index, layer_params, kv_cache, scale, delta, rows = xs
            layers = nnx.merge(graphdef, layer_params)

            def run_layer(x):
                y, new_kv, neurons, mid = layers.layer(x, cos, sin, mask, kv_cache, cache_index, scale, delta, rows)
                return y, new_kv, neurons if return_mlp_acts else None, mid if return_mlp_residuals else None

            if start_layer is None:
                y, kv_cache, neurons, mid = run_layer(x)
                return y, (kv_cache, neurons, mid)

            def skip_layer(x):
                return x, kv_cache, zeros_acts(), None

            def finish_layer(x):  # layer start_layer from its mid residual and neuron activations
                y = layers.finish_from_neurons(start_residual.astype(self.dtype), start_neurons.astype(self.dtype), rows)
                return y, kv_cache, start_neurons.astype(self.dtype) if return_mlp_acts else None, None

            # the branches not taken write zeros for the taken one's saved residuals: keep only the
            # matmul outputs of a run layer ("dots" remat; 0.7x the suffix time of saving all, measured)
            run_saving_dots = jax.checkpoint(lambda x: run_layer(x)[:3] + (None,), policy=REMAT_POLICIES["dots"])
            branch = (index >= start_layer).astype(jnp.int32) + (index > start_layer).astype(jnp.int32)
            y, kv_cache, neurons, _ = jax.lax.switch(branch, (skip_layer, finish_layer, run_saving_dots), x)
            return y, (kv_cache, neurons, None)

        def body(x, xs):  # the residual stream at both layer boundaries through the activation hook
            y, out = layer_body(constrain_activation(x), xs)
            return constrain_activation(y), out

        policy = REMAT_POLICIES[self.remat]
        if policy == "full":
            body = jax.checkpoint(body)
        elif policy is not None:
            body = jax.checkpoint(body, policy=policy)
        xs = (jnp.arange(cfg.num_hidden_layers), layer_state, cache, mlp_scale, mlp_delta, mlp_rows)
        x, (new_cache, mlp_acts, mlp_residuals) = jax.lax.scan(
            body, x, xs, unroll=unrolls(self.layer_loop, cfg.num_hidden_layers,
                                        on_mesh=_ACTIVATION_CONSTRAINT.get() is not None))

        if logits_at is not None:  # the final norm is per position: gather first, normalize P columns
            x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
        if cfg.norm_kind == "rmsnorm":
            x = self.model.norm(x)
        else:
            x = layer_norm_no_params(x)
        if cfg.tie_word_embeddings:
            head = self.model.embed_tokens.embedding[...].T
        else:
            head = self.lm_head.kernel[...]
        logits = dense(x, head.astype(x.dtype), preferred_element_type=F32)
        return logits, {"cache": new_cache, "mlp_acts": mlp_acts, "mlp_residuals": mlp_residuals}


def init_model(cfg: ModelConfig, *, seed: int = 0, param_dtype=jnp.float32, dtype=None, remat="none",
               layer_loop="auto") -> CausalLM:
    return CausalLM(cfg, rngs=nnx.Rngs(seed), param_dtype=param_dtype, dtype=dtype, remat=remat, layer_loop=layer_loop)


def abstract_model(cfg: ModelConfig, *, param_dtype=jnp.float32, dtype=None, remat="none",
                   layer_loop="auto") -> CausalLM:
    """The model's structure with ShapeDtypeStruct leaves, no memory allocated."""
    return nnx.eval_shape(lambda: init_model(cfg, param_dtype=param_dtype, dtype=dtype, remat=remat,
                                             layer_loop=layer_loop))


def split_params(model: CausalLM) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, params) with params a plain nested dict of arrays: the pure view."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef: nnx.GraphDef, *param_trees) -> CausalLM:
    """Rebuild a module from its graphdef and one or more (partial) param trees."""
    return nnx.merge(graphdef, *[t if isinstance(t, nnx.State) else nnx.State(t) for t in param_trees])


def apply(graphdef, params, input_ids, attention_mask=None, positions=None, **kwargs) -> jax.Array:
    """Pure forward: float32 logits [B, T, V] as a function of the params pytree."""
    return merge_params(graphdef, params)(input_ids, attention_mask, positions, **kwargs)


def apply_with_aux(graphdef, params, input_ids, attention_mask=None, positions=None, **kwargs):
    return merge_params(graphdef, params).run(input_ids, attention_mask, positions, **kwargs)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
