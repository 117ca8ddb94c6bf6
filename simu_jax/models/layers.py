"""Building blocks shared by the LLaMA / OLMo / OLMo-2 decoder: rope, norms, plain einsum attention.

Norms, softmax and rope tables are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from simu_jax.models.config import ModelConfig

F32 = jnp.float32


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies, as transformers' `modeling_rope_utils` computes them (float32)."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        # Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`,
        # short ones kept, a smooth interpolation in between.
        factor, old_len = cfg.rope_factor, cfg.rope_original_max_position_embeddings
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, head_dim] for integer positions [B, T] (HF's half-split layout)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, N, D]; rotate_half convention (not interleaved), as in HF LLaMA."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, weight applied in float32, cast back to x's dtype."""
    x32 = x.astype(F32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(F32) * x32).astype(x.dtype)


def layer_norm_no_params(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """OLMo-1's LayerNorm: no weight, no bias, computed in float32."""
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """Softmax over the last axis, the same ops as `jax.nn.softmax`, differentiated by its
    closed form dy = y * (dx - <y, dx>): reverse mode then keeps y alone. `jax.nn.softmax`
    does this only under the `jax_softmax_custom_jvp` flag (off in jax 0.10); without it AD
    goes through exp / sum and the layer scan stacks exp, y, 1/sum and 1/sum^2 for the
    backward (the bench's gradient: 0.93x the CPU time, bit-identical forward)."""
    e = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)


@softmax.defjvp
def _softmax_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    y = softmax(x)
    return y, y * (dx - jnp.sum(y * dx, axis=-1, keepdims=True))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Plain einsum attention with grouped KV heads (GQA/MQA).

    q [B, T, H, D], k/v [B, S, KV, D], mask [B, T, S] (True = may attend). Scores and softmax
    in float32. Masked scores are set to the most negative float (as HF eager does), so a
    fully masked row (a padding query) is uniform instead of NaN. No fused kernel: this path
    must stay differentiable twice (forward-over-reverse HVPs).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * (d**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(F32).min)
    probs = softmax(scores).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h * d)
