"""Batched greedy / sampled generation with a jit-compiled KV cache.

Prompts are left-padded ([B, P] ids + mask). The cache has P + max_new_tokens slots per
sequence; positions follow HF generate (`cumsum(mask) - 1`), so a padded batch generates the
same tokens as each prompt alone. A sequence that emitted EOS is padded with `pad_token_id`
afterwards; the loop stops early once every sequence is done.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from simu_jax.models.transformer import CausalLM, merge_params


def _next_token(logits, key, do_sample, temperature, top_k, top_p):
    """Pick the next token from logits [B, V] (float32)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:  # nucleus: keep the smallest set whose probability reaches top_p
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        cutoff_index = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_ids", "pad_id"),
)
def _generate(graphdef, params, input_ids, attention_mask, key, *, max_new_tokens, do_sample, temperature, top_k,
              top_p, eos_ids, pad_id):
    model = merge_params(graphdef, params)
    cfg = model.config
    b, p = input_ids.shape
    s = p + max_new_tokens
    cache_shape = (cfg.num_hidden_layers, b, s, cfg.num_key_value_heads, cfg.head_dim)
    cache = (jnp.zeros(cache_shape, model.dtype), jnp.zeros(cache_shape, model.dtype))
    slot_mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    logits, aux = model.run(input_ids, slot_mask, positions, cache=cache, cache_index=0)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def emit(logits_last, key, done):
        tok = _next_token(logits_last, key, do_sample, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        return tok, done | jnp.isin(tok, eos)

    key, sub = jax.random.split(key)
    tok, done = emit(logits[:, -1], sub, jnp.zeros((b,), bool))
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok)
    last_pos = positions[:, -1]

    def cond(carry):
        i, _, _, _, done, _, _ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, tok, cache, slot_mask, done, out, key = carry
        slot = p + i - 1  # slot of the token being fed
        slot_mask = jax.lax.dynamic_update_slice_in_dim(slot_mask, jnp.ones((b, 1), jnp.int32), slot, axis=1)
        pos = (last_pos + i)[:, None]
        logits, aux = model.run(tok[:, None], slot_mask, pos, cache=cache, cache_index=slot)
        key, sub = jax.random.split(key)
        tok, done = emit(logits[:, -1], sub, done)
        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
        return i + 1, tok, aux["cache"], slot_mask, done, out, key

    carry = (jnp.int32(1), tok, aux["cache"], slot_mask, done, out, key)
    return jax.lax.while_loop(cond, body, carry)[5]


def generate(
    model: CausalLM | tuple,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """New tokens [B, max_new_tokens] for left-padded prompts; `model` is a CausalLM or (graphdef, params)."""
    if isinstance(model, tuple):
        graphdef, params = model
        cfg = merge_params(graphdef, params).config
    else:
        graphdef, state = nnx.split(model)
        params = nnx.to_pure_dict(state)
        cfg = model.config
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = cfg.eos_token_ids if eos_token_id is None else (eos_token_id if isinstance(eos_token_id, tuple) else (eos_token_id,))
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else 0)
    return _generate(
        graphdef, params, input_ids, attention_mask, jax.random.key(seed),
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=float(temperature), top_k=top_k,
        top_p=None if top_p is None else float(top_p), eos_ids=tuple(int(e) for e in eos), pad_id=int(pad_token_id),
    )
