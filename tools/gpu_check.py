#!/usr/bin/env python
"""One prepared device check for a lent GPU (<= 7 minutes on one H100 / H200): run via tools/gpu_check.sh.

Sections, in order (each one is skipped, not started, when the time budget is spent; the JSON
is rewritten after each section, so a run cut short still leaves its numbers):

1. ``parity``: logits of small random LLaMA and OLMo-1 models (float32, two layers, 96 tokens)
   from ``simu_jax.models.apply`` on the device against an independent numpy float64 forward
   written here from the HF definitions; at ``highest`` matmul precision (must agree to
   ~1e-4) and at the default precision (TF32 on NVIDIA, for information), plus the bf16
   model's top-1 agreement.
2. ``grad_step``: an OLMo-1B-sized random model (OLMo-1: 16 layers, hidden 2048, intermediate
   8192, 16 heads, vocab 50304, tied embeddings, non-parametric LayerNorm), bf16 parameters and
   compute, next-token NLL, ``value_and_grad`` + an SGD update (params donated); tokens/s and
   MFU = model FLOPs/s / the card's dense bf16 peak, model FLOPs per token = 6 N_matmul +
   12 L T h (N_matmul = L (4h^2 + 3hI) + hV, PaLM's convention).
3. ``simu_step``: one ``simu_graddiff`` step of ``simu_jax.engine.Unlearner`` (Sophia on attention
   + 10% of the down_proj rows, forget + retain batches); tokens/s, MFU against the same
   full-training FLOPs (nominal) and against the FLOPs the masked step does (estimated).
4. ``so_step`` and ``sophia_h_step``: one ``so_graddiff`` step (Sophia, g*g, all parameters) and
   one with the Hutchinson estimator (Sophia-H), the same batches; issue 15's ratios
   ``simu_over_so_step`` and ``sophia_h_over_so_step`` in the summary.
5. ``attribution``: IG attribution (``attribution.neuron_scores``, m = 3) of the forget rows on an
   8-layer model of the 1B width against the gradient of the same rows (``attribution_over_grad``).
6. ``hvp_over_grad``: exact HVP (``curvature.hvp``) over gradient time at the 1B size.

Prints the JSON and writes it to ``--out``. ``--tiny`` shrinks every size so the script can be
tried on a CPU. No test needs this script.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Dense bf16 peak (no sparsity), by device_kind substring, first match wins.
PEAK_BF16 = (
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
    ("L40S", 362e12),
)

OLMO_1B = dict(model_type="olmo", vocab_size=50304, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=16, num_key_value_heads=16, head_dim=128, tie_word_embeddings=True,
               max_position_embeddings=2048, rope_theta=10000.0)
TINY_BIG = dict(model_type="olmo", vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True,
                max_position_embeddings=2048, rope_theta=10000.0)


def peak_flops(kind: str) -> float | None:
    for key, value in PEAK_BF16:
        if key.lower() in kind.lower():
            return value
    return None


def timed(fn, repeats: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "first_call_s": first}


# ---------------------------------------------------------------------------------------
# An independent numpy reference forward (float64) for LLaMA and OLMo-1
# ---------------------------------------------------------------------------------------


def np_forward(cfg, params: dict, ids: np.ndarray) -> np.ndarray:
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    m = p["model"]
    b, t = ids.shape
    h, d, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def norm(x, w=None, eps=None):
        if cfg.model_type == "olmo":  # LayerNorm without parameters, eps 1e-5
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) / np.sqrt(var + 1e-5)
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2) / d))
    freqs = np.arange(t)[:, None] * inv[None]
    cos = np.cos(np.concatenate([freqs, freqs], -1))[None, :, None]
    sin = np.sin(np.concatenate([freqs, freqs], -1))[None, :, None]

    def rope(x):
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + np.concatenate([-x2, x1], -1) * sin

    causal = np.tril(np.ones((t, t), bool))
    x = m["embed_tokens"]["embedding"][ids]
    lay = m["layers"]
    for i in range(cfg.num_hidden_layers):
        a = lay["self_attn"]
        hin = norm(x, lay["input_layernorm"]["weight"][i]) if cfg.model_type == "llama" else norm(x)
        q = rope((hin @ a["q_proj"]["kernel"][i]).reshape(b, t, nh, d))
        k = rope((hin @ a["k_proj"]["kernel"][i]).reshape(b, t, nkv, d))
        v = (hin @ a["v_proj"]["kernel"][i]).reshape(b, t, nkv, d)
        k, v = np.repeat(k, nh // nkv, axis=2), np.repeat(v, nh // nkv, axis=2)
        s = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d)
        s = np.where(causal[None, None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s = s / s.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", s, v).reshape(b, t, nh * d)
        x = x + o @ a["o_proj"]["kernel"][i]
        hm = norm(x, lay["post_attention_layernorm"]["weight"][i]) if cfg.model_type == "llama" else norm(x)
        mlp = lay["mlp"]
        g = hm @ mlp["gate_proj"]["kernel"][i]
        x = x + ((g / (1 + np.exp(-g))) * (hm @ mlp["up_proj"]["kernel"][i])) @ mlp["down_proj"]["kernel"][i]
    x = norm(x, m["norm"]["weight"]) if cfg.model_type == "llama" else norm(x)
    head = m["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"]
    return x @ head


def random_params(cfg, dtype, seed: int = 0):
    """(graphdef, params) with N(0, 0.02^2) kernels / embeddings and unit norm weights, drawn on device."""
    from flax import nnx

    from simu_jax.models import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg, param_dtype=dtype, dtype=dtype))
    shapes = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)

    @jax.jit
    def draw(key):
        out = []
        for i, (path, s) in enumerate(leaves):
            if path[-1].key == "weight":
                out.append(jnp.ones(s.shape, s.dtype))
            else:
                out.append((0.02 * jax.random.normal(jax.random.fold_in(key, i), s.shape, jnp.float32)).astype(s.dtype))
        return out

    return graphdef, jax.tree_util.tree_unflatten(treedef, draw(jax.random.key(seed)))


def check_parity() -> dict:
    from simu_jax.models import ModelConfig, apply

    out = {}
    rng = np.random.default_rng(0)
    for name, extra in (("llama", dict(model_type="llama", num_key_value_heads=2, tie_word_embeddings=False)),
                        ("olmo", dict(model_type="olmo", num_key_value_heads=4, tie_word_embeddings=True))):
        cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, head_dim=64, max_position_embeddings=2048, **extra)
        graphdef, params = random_params(cfg, jnp.float32, seed=1)
        # a larger init so the logits are far from zero (std 0.02 would make every check trivial)
        params = jax.tree.map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
        ids = rng.integers(0, cfg.vocab_size, size=(2, 96)).astype(np.int32)
        ref = np_forward(cfg, params, ids)
        scale = float(np.abs(ref).max())
        fwd = jax.jit(lambda p, i: apply(graphdef, p, i))
        with jax.default_matmul_precision("highest"):
            hi = np.asarray(jax.jit(lambda p, i: apply(graphdef, p, i))(params, jnp.asarray(ids)), np.float64)
        lo = np.asarray(fwd(params, jnp.asarray(ids)), np.float64)
        g16, p16 = random_params(cfg, jnp.bfloat16, seed=1)
        p16 = jax.tree.map(lambda x: x.astype(jnp.float32) * 3.0 if x.ndim >= 2 else x.astype(jnp.float32), p16)
        p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p16)
        ref16 = np_forward(cfg, p16, ids)
        bf = np.asarray(jax.jit(lambda p, i: apply(g16, p, i))(p16, jnp.asarray(ids)), np.float64)
        out[name] = {
            "max_abs_logit": scale,
            "max_abs_diff_highest": float(np.abs(hi - ref).max()),
            "max_abs_diff_default_precision": float(np.abs(lo - ref).max()),
            "bf16_max_abs_diff": float(np.abs(bf - ref16).max()),
            "bf16_top1_agreement": float((bf.argmax(-1) == ref16.argmax(-1)).mean()),
            "pass": bool(np.abs(hi - ref).max() <= 1e-4 * max(1.0, scale)),
        }
    out["pass"] = all(v["pass"] for v in out.values() if isinstance(v, dict))
    return out


# ---------------------------------------------------------------------------------------
# The 1B-sized model
# ---------------------------------------------------------------------------------------


def model_flops_per_token(cfg, seq: int) -> float:
    h, i, layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    n_matmul = layers * (4 * h * h + 3 * h * i) + h * v
    return 6.0 * n_matmul + 12.0 * layers * seq * h


def make_tokens(cfg, batch: int, seq: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, seq)).astype(np.int32)
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones((batch, seq), jnp.int32),
            "labels": jnp.asarray(ids)}


def grad_step(cfg, graphdef, params, batch: int, seq: int, repeats: int, peak: float | None) -> dict:
    from simu_jax.losses import token_mean_nll
    from simu_jax.models import apply

    data = make_tokens(cfg, batch, seq, 0)

    def loss(p, b):
        return token_mean_nll(apply(graphdef, p, b["input_ids"], b["attention_mask"]), b["labels"])

    @functools.partial(jax.jit, donate_argnums=0)
    def step(p, b):
        value, g = jax.value_and_grad(loss)(p, b)
        return jax.tree.map(lambda x, y: (x - 1e-5 * y).astype(x.dtype), p, g), value

    state = {"p": params}

    def call():
        state["p"], value = step(state["p"], data)
        return value

    t = timed(call, repeats, 2)
    tokens = batch * seq
    flops = model_flops_per_token(cfg, seq) * tokens
    return {**t, "batch": batch, "seq": seq, "tokens_per_s": tokens / t["median_s"],
            "model_tflops_per_s": flops / t["median_s"] / 1e12,
            "mfu": (flops / t["median_s"] / peak) if peak else None, "params": state["p"]}


def unlearn_data(cfg, batch: int, seq: int) -> dict:
    """Forget + retain batches of random tokens, the loss on the second half (as in QA unlearning)."""
    data = {"forget": make_tokens(cfg, batch, seq, 1), "retain": make_tokens(cfg, batch, seq, 2)}
    for part in data.values():
        part["labels"] = jnp.where(jnp.arange(seq)[None] >= seq // 2, part["labels"], -100)
    return data


def unlearn_step(cfg, graphdef, params, batch: int, seq: int, repeats: int, peak: float | None,
                 method: str = "simu_graddiff", estimator: str = "fisher") -> dict:
    """One step of `simu_jax.engine.Unlearner` (`method`, Sophia with `estimator`); tokens/s, MFU
    against the full-training FLOPs (nominal) and, for a SIMU step, against the FLOPs it does."""
    from simu_jax.engine import StepSettings, Unlearner, get_method
    from simu_jax.optim import OptimSpec

    is_simu = method.startswith("simu")
    rng = np.random.default_rng(0)
    k = cfg.intermediate_size // 10
    selected = np.zeros((cfg.num_hidden_layers, cfg.intermediate_size), bool)
    for layer in range(cfg.num_hidden_layers):
        selected[layer, rng.choice(cfg.intermediate_size, k, replace=False)] = True
    u = Unlearner(graphdef, params, get_method(method),
                  StepSettings(optim=OptimSpec(learning_rate=1e-5, estimator=estimator)),
                  selected=selected if is_simu else None)
    data = unlearn_data(cfg, batch, seq)
    key = jax.random.key(0)

    def call():
        u.step(data, key)
        return u.trainable

    t = timed(call, repeats, 2)
    tokens = 2 * batch * seq
    nominal = model_flops_per_token(cfg, seq) * tokens
    out = {**t, "method": method, "estimator": estimator, "batch_per_part": batch, "seq": seq,
           "tokens_per_s": tokens / t["median_s"], "num_trainable": u.num_trainable, "state_bytes": u.state_bytes(),
           "mfu_nominal": (nominal / t["median_s"] / peak) if peak else None}
    if is_simu:
        h, layers = cfg.hidden_size, cfg.num_hidden_layers
        n_matmul = layers * (4 * h * h + 3 * h * cfg.intermediate_size) + h * cfg.vocab_size
        # forward 2N + input gradients 2N + weight gradients of attention and the K rows only
        done = (4.0 * n_matmul + 2.0 * layers * (4 * h * h + k * h) + 12.0 * layers * seq * h) * tokens
        out["mfu_estimated_flops_done"] = (done / t["median_s"] / peak) if peak else None
    return out


def attribution_ratio(cfg, batch: int, seq: int, repeats: int) -> dict:
    """IG attribution (`attribution.neuron_scores`, m = 3) of one batch of forget rows on an
    8-layer model of `cfg`'s width, against the gradient of the same rows' token-mean NLL."""
    import dataclasses

    from simu_jax.attribution import neuron_scores
    from simu_jax.losses import token_mean_nll
    from simu_jax.models import apply

    cfg8 = dataclasses.replace(cfg, num_hidden_layers=8)
    graphdef, params = random_params(cfg8, jnp.bfloat16, seed=4)
    rows = unlearn_data(cfg8, batch, seq)["forget"]

    def loss(p, b):
        return token_mean_nll(apply(graphdef, p, b["input_ids"], b["attention_mask"]), b["labels"])

    g = jax.jit(jax.grad(loss))
    tg = timed(lambda: g(params, rows), repeats, 1)
    ti = timed(lambda: neuron_scores(graphdef, params, [rows], method="ig", steps=3), max(2, repeats // 2), 1)
    return {"layers": 8, "ig_steps": 3, "rows": batch, "seq": seq, "grad": tg, "ig": ti,
            "attribution_over_grad": ti["median_s"] / tg["median_s"]}


def hvp_ratio(cfg, graphdef, params, batch: int, seq: int, repeats: int) -> dict:
    from simu_jax.curvature import hvp
    from simu_jax.losses import token_mean_nll
    from simu_jax.models import apply

    data = make_tokens(cfg, batch, seq, 3)

    def loss(p, b):
        return token_mean_nll(apply(graphdef, p, b["input_ids"], b["attention_mask"]), b["labels"])

    v = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), params)
    g = jax.jit(jax.grad(loss))
    hv = jax.jit(lambda p, vv, b: hvp(loss, p, vv, b))
    tg = timed(lambda: g(params, data), repeats, 1)
    th = timed(lambda: hv(params, v, data), repeats, 1)
    return {"batch": batch, "seq": seq, "grad": tg, "hvp": th, "hvp_over_grad": th["median_s"] / tg["median_s"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the JSON here too")
    ap.add_argument("--budget-s", type=float, default=270.0, help="skip sections that would start after this")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (try the script on a CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.tiny:  # a CPU try of the script: LLVM optimizations off (compiles ~40% faster), before JAX starts
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", "?")
    peak = peak_flops(kind) if dev.platform == "gpu" else None
    result = {"device": {"platform": dev.platform, "device_kind": kind, "num_devices": jax.device_count(),
                         "jax": jax.__version__, "backend": jax.default_backend(), "peak_bf16_flops": peak},
              "targets": {"mfu_grad_step": ">= 0.35 on an H100 (issue 7)", "sophia_h_over_so_step": "<= 3.0 (issue 15)",
                          "attribution_over_grad": "<= 6 (issue 15)"}, "sections": {}}

    def save():
        result["wall_s"] = time.perf_counter() - t_start
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=float) + "\n")

    def section(name, fn, min_left_s):
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < min_left_s:
            result["sections"][name] = {"skipped": f"{left:.0f} s of budget left, needs ~{min_left_s} s"}
            save()
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
            result["sections"][name] = {k: v for k, v in out.items() if k != "params"}
            result["sections"][name]["section_s"] = time.perf_counter() - t0
            print(f"[gpu_check] {name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - record and go on to the next section
            result["sections"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                        "traceback": traceback.format_exc()[-3000:]}
            out = None
        save()
        return out

    from simu_jax.models import ModelConfig

    section("parity", check_parity, 0)
    cfg = ModelConfig(**(TINY_BIG if args.tiny else OLMO_1B))
    seq = 64 if args.tiny else 1024
    t0 = time.perf_counter()
    graphdef, params = random_params(cfg, jnp.bfloat16, seed=0)
    jax.block_until_ready(params)
    result["model"] = {**{k: v for k, v in (TINY_BIG if args.tiny else OLMO_1B).items()}, "dtype": "bfloat16",
                       "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
                       "init_s": time.perf_counter() - t0}
    out = section("grad_step", lambda: grad_step(cfg, graphdef, params, 2 if args.tiny else 8, seq, args.repeats,
                                                  peak), 60)
    if out is not None:
        params = out["params"]  # the old buffers were donated
    nb = 2 if args.tiny else 4
    section("simu_step", lambda: unlearn_step(cfg, graphdef, params, nb, seq, args.repeats, peak), 70)
    section("so_step", lambda: unlearn_step(cfg, graphdef, params, nb, seq, args.repeats, peak, "so_graddiff"), 70)
    section("sophia_h_step", lambda: unlearn_step(cfg, graphdef, params, nb, seq, args.repeats, peak, "so_graddiff",
                                                  estimator="hutchinson"), 80)
    section("attribution", lambda: attribution_ratio(cfg, nb, seq, args.repeats), 70)
    section("hvp_over_grad", lambda: hvp_ratio(cfg, graphdef, params, nb, seq, args.repeats), 70)
    sec = result["sections"]

    def step_ratio(a, b):  # a step's median over another's, None if either is missing
        ta, tb = sec.get(a, {}).get("median_s"), sec.get(b, {}).get("median_s")
        return ta / tb if ta and tb else None

    result["summary"] = {
        "device_kind": kind,
        "parity_pass": sec.get("parity", {}).get("pass"),
        "grad_step_tokens_per_s": sec.get("grad_step", {}).get("tokens_per_s"),
        "grad_step_mfu": sec.get("grad_step", {}).get("mfu"),
        "simu_step_tokens_per_s": sec.get("simu_step", {}).get("tokens_per_s"),
        "simu_step_mfu_nominal": sec.get("simu_step", {}).get("mfu_nominal"),
        "simu_step_mfu_estimated_flops_done": sec.get("simu_step", {}).get("mfu_estimated_flops_done"),
        "so_step_mfu_nominal": sec.get("so_step", {}).get("mfu_nominal"),
        "simu_over_so_step": step_ratio("simu_step", "so_step"),
        "sophia_h_over_so_step": step_ratio("sophia_h_step", "so_step"),
        "attribution_over_grad": sec.get("attribution", {}).get("attribution_over_grad"),
        "hvp_over_grad": sec.get("hvp_over_grad", {}).get("hvp_over_grad"),
    }
    save()
    print(json.dumps(result, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
