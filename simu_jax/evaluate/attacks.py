"""Robustness attacks on an unlearned model: 4-bit weight quantization and relearning.

Unlearning that moves the weights only a little can be undone without knowing anything about
the forget set: Zhang et al. (arXiv 2410.16454, "Does your LLM truly unlearn? An embarrassingly
simple approach to recover unlearned knowledge"; at ICLR 2025 "Catastrophic failure of LLM
unlearning via quantization", their README) load unlearned models in 4 bits and find most of the forgotten
knowledge back, and a few fine-tuning steps on a handful of forget pairs bring back more than
those pairs (relearning). Each attack here is applied to the unlearned model, then the forget
metrics are measured again (:func:`run_attacks`, ``simu-jax evaluate --attack``,
``eval.attack`` of ``simu-jax unlearn``); ``recovery`` says how much of the forgetting is
undone (docs/metrics.md#robustness-attacks).

Quantizers (fake quantization: weights are quantized and dequantized back to their own dtype,
so the forward pass is unchanged; the arithmetic runs in float32):

* :func:`quantize_int4_rtn`: per-group asymmetric round-to-nearest with a zero point, llm-awq's
  ``pseudo_quantize_tensor`` (mit-han-lab/llm-awq @ d6e797a, ``awq/quantize/quantizer.py:61-103``,
  ``n_bit=4, zero_point=True``; AWQ's round-to-nearest INT4-g128 baseline).
* :func:`quantize_nf4` / :func:`quantize_fp4`: bitsandbytes' blockwise 4-bit types, absmax per
  block of 64 and the nearest of 16 code values (bitsandbytes-foundation/bitsandbytes @ 95f9af3,
  ``bitsandbytes/functional.py:772-859`` ``get_4bit_type``, ``backends/default/ops.py:225-259``
  quantize, ``:262-285`` dequantize). 2410.16454 loads its models with
  ``BitsAndBytesConfig(load_in_4bit=True)`` (zzwjames/FailureLLMUnlearning ``utils.py:92-101``),
  whose ``bnb_4bit_quant_type`` defaults to ``fp4`` (transformers 5.24 ``BitsAndBytesConfig``);
  NF4 is QLoRA's type (arXiv 2305.14314).

Which weights: every linear kernel inside the decoder blocks (attention q/k/v/o, MLP
gate/up/down). The token embedding, the norms and ``lm_head`` keep their values, as in both
references: transformers swaps only ``nn.Linear`` modules for bitsandbytes ones and skips the
output embedding (``integrations/bitsandbytes.py:162`` ``replace_with_bnb_linear``,
``quantizers/base.py:39-63`` ``get_keys_to_not_convert``, transformers 5.24), and llm-awq quantizes the linears of
the blocks (``quantizer.py:106-120``).

Layout: our kernels are ``[in, out]`` (``[L, in, out]`` stacked), HF's weights ``[out, in]``
(:mod:`simu_jax.models.convert`). Both references work on the HF tensor: RTN groups are
``group_size`` consecutive *input* features of one output row, and bitsandbytes' blocks are
64 consecutive elements of the row-major flattened ``[out, in]`` tensor of one layer. So the
quantizers move to the HF view (swap the last two axes), quantize there per layer, and move
back.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ATTACKS",
    "FORGET_METRICS",
    "FP4_CODE",
    "NF4_CODE",
    "AttackSpec",
    "attack_table",
    "format_attacks",
    "quantize_fp4",
    "quantize_int4_rtn",
    "quantize_nf4",
    "quantize_params",
    "quantized_paths",
    "recovery",
    "relearn",
    "relearn_records",
    "run_attacks",
    "spec_from_cli",
]

QUANTIZERS = ("int4", "nf4", "fp4")
ATTACKS = QUANTIZERS + ("relearn",)
# The forget metrics measured again after each attack (QA benchmarks; docs/metrics.md).
FORGET_METRICS = ("forget_prob", "forget_rouge", "forget_truth_ratio", "forget_quality",
                  "forget_extraction_strength", "forget_exact_memorization")
# bitsandbytes' block sizes (functional.py:920-921 refuses any other).
BNB_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# bitsandbytes functional.py:788-805 (get_4bit_type("nf4")): QLoRA's NormalFloat4, the
# create_normal_map(offset=0.9677083) quantiles of N(0, 1) normalized to [-1, 1]; sorted.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# bitsandbytes functional.py:823 and :854-855 (get_4bit_type("fp4")): sign, 2 exponent bits and
# 1 mantissa bit, listed in bit-pattern order [0, 0.0625, 8, 12, 4, 6, 2, 3, -0, -0.0625, -8,
# -12, -4, -6, -2, -3], divided by their absmax 12; here sorted by value (0 appears twice, +0
# and -0, as in the table).
FP4_CODE = tuple(v / 12.0 for v in sorted([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                                           -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]))
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


# --------------------------------------------------------------------------- quantizers


def _hf_view(w: jax.Array) -> jax.Array:
    """Our ``[..., in, out]`` kernel as HF's ``[..., out, in]`` float32 weight."""
    return jnp.swapaxes(w, -1, -2).astype(jnp.float32)


def _from_hf_view(x: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2).astype(like.dtype)


def _check_kernel(w) -> None:
    if w.ndim < 2:
        raise ValueError(f"a linear kernel [..., in, out] has >= 2 axes, got shape {tuple(w.shape)}")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"only floating-point kernels are quantized, got {w.dtype}")


@functools.partial(jax.jit, static_argnames=("group_size", "return_stats"))
def quantize_int4_rtn(w: jax.Array, group_size: int = 128, return_stats: bool = False):
    """INT4 per-group round-to-nearest fake quantization of a kernel ``[..., in, out]``.

    llm-awq's ``pseudo_quantize_tensor`` with ``n_bit=4, zero_point=True``
    (``awq/quantize/quantizer.py:64-75, 93-95``), per group of ``group_size`` consecutive input
    features of one output column of our kernel (one row of HF's ``[out, in]`` weight,
    ``w.reshape(-1, q_group_size)`` at line 67)::

        scale = max(max(g) - min(g), 1e-5) / 15
        zero  = clamp(-round(min(g) / scale), 0, 15)
        w'    = (clamp(round(w / scale) + zero, 0, 15) - zero) * scale

    ``round`` is half-to-even (torch.round and jnp.round). The error is at most ``scale / 2``
    wherever ``min(g) <= 0 <= max(g)`` (weight groups practically always); a group entirely
    of one sign gets zero = 0 or 15 by the clamp and loses more, exactly as in llm-awq.
    ``group_size=-1``: one group per output column (llm-awq's ``q_group_size=-1``). When ``in``
    is not a multiple of ``group_size`` the last group is shorter (GPTQ's column slices
    ``W[:, i:i + groupsize]``, IST-DASLab/gptq @ 2d65066 ``gptq.py:84-86, 121-123``; llm-awq asserts
    divisibility). The stacked layer axis
    (and any leading axis) is independent: every layer has its own groups.

    Returns the dequantized kernel in ``w``'s dtype; with ``return_stats`` also the per-group
    ``scale`` and ``zero`` (float32, ``[..., n_groups, out]``: group ``j`` covers kernel rows
    ``j*group_size`` to ``(j+1)*group_size - 1``).
    """
    _check_kernel(w)
    x = _hf_view(w)  # [..., out, in]
    n_in = x.shape[-1]
    g = n_in if group_size == -1 else int(group_size)
    if g < 1:
        raise ValueError(f"group_size must be >= 1 or -1 (one group per output channel), got {group_size}")
    g = min(g, n_in)
    n_groups = -(-n_in // g)
    pad = n_groups * g - n_in  # a shorter last group: pad with its own last value (min / max unchanged)
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], mode="edge") if pad else x
    xg = xp.reshape(*x.shape[:-1], n_groups, g)
    max_int = 15.0  # 2**4 - 1
    hi, lo = jnp.max(xg, axis=-1, keepdims=True), jnp.min(xg, axis=-1, keepdims=True)
    scale = jnp.maximum(hi - lo, 1e-5) / max_int
    zero = jnp.clip(-jnp.round(lo / scale), 0.0, max_int)
    q = (jnp.clip(jnp.round(xg / scale) + zero, 0.0, max_int) - zero) * scale
    q = q.reshape(*x.shape[:-1], n_groups * g)[..., :n_in]
    out = _from_hf_view(q, w)
    if not return_stats:
        return out
    return out, jnp.swapaxes(scale[..., 0], -1, -2), jnp.swapaxes(zero[..., 0], -1, -2)


def _quantize_4bit_code(w: jax.Array, code: Sequence[float], block_size: int, return_stats: bool):
    """bitsandbytes' blockwise 4-bit quantization with the sorted 16-value ``code``.

    Per layer, the HF weight is flattened row-major and cut into blocks of ``block_size``
    elements, the last one shorter when the size is not a multiple (``backends/default/ops.py:
    238-249``); per block ``absmax = max |w|``, ``x = clamp(w * (1 / absmax), -1, 1)``
    (``:244-245``, the same product with the reciprocal as the CUDA kernel,
    ``csrc/kernels.cu:332-337``); the code index is ``torch.bucketize`` of x over the midpoints
    of adjacent sorted codes (``:225-230, 252``: the nearest code, a tie going to the lower
    one, as the CUDA decision trees ``kernels.cu:64-152``); dequantized ``code[i] * absmax``
    (``:275-284``) in float32, then cast to the weight's dtype.
    """
    _check_kernel(w)
    if int(block_size) not in BNB_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {', '.join(map(str, BNB_BLOCK_SIZES))} "
                         f"(bitsandbytes' block sizes), got {block_size}")
    x = _hf_view(w)  # [..., out, in]
    lead, n = x.shape[:-2], x.shape[-2] * x.shape[-1]
    flat = x.reshape(*lead, n)
    n_blocks = -(-n // block_size)
    pad = n_blocks * block_size - n
    fp = jnp.pad(flat, [(0, 0)] * len(lead) + [(0, pad)], mode="edge") if pad else flat
    blocks = fp.reshape(*lead, n_blocks, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    scaled = jnp.clip(blocks * (1.0 / jnp.maximum(absmax, 1e-38)), -1.0, 1.0)
    table = jnp.asarray(code, jnp.float32)
    bounds = (table[:-1] + table[1:]) / 2
    idx = jnp.searchsorted(bounds, scaled, side="left")  # torch.bucketize(right=False)
    deq = (table[idx] * absmax).reshape(*lead, n_blocks * block_size)[..., :n]
    out = _from_hf_view(deq.reshape(x.shape), w)
    if not return_stats:
        return out
    return out, absmax[..., 0], idx.reshape(*lead, n_blocks * block_size)[..., :n]


@functools.partial(jax.jit, static_argnames=("block_size", "return_stats"))
def quantize_nf4(w: jax.Array, block_size: int = 64, return_stats: bool = False):
    """NF4 fake quantization of a kernel ``[..., in, out]`` (bitsandbytes ``quant_type="nf4"``,
    :data:`NF4_CODE`; see :func:`_quantize_4bit_code` for the blocks and the rounding). The
    error is at most ``absmax`` times half the widest gap of adjacent codes (0.1385: between
    0.7230 and 1). Returns the dequantized kernel in ``w``'s dtype; with ``return_stats``
    also ``absmax`` ``[..., n_blocks]`` and the code indices ``[..., out * in]`` (both over
    the row-major flattened HF ``[out, in]`` weight of each layer)."""
    return _quantize_4bit_code(w, NF4_CODE, block_size, return_stats)


@functools.partial(jax.jit, static_argnames=("block_size", "return_stats"))
def quantize_fp4(w: jax.Array, block_size: int = 64, return_stats: bool = False):
    """FP4 fake quantization (bitsandbytes ``quant_type="fp4"``, :data:`FP4_CODE`; the type
    ``BitsAndBytesConfig(load_in_4bit=True)`` gives, which 2410.16454 uses); as :func:`quantize_nf4`."""
    return _quantize_4bit_code(w, FP4_CODE, block_size, return_stats)


def _is_quantized(path: tuple[str, ...]) -> bool:
    """A linear kernel of the decoder blocks (``model.layers.*.kernel``)."""
    return len(path) > 2 and path[:2] == ("model", "layers") and path[-1] == "kernel"


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "name", k)))


def quantized_paths(params: Mapping[str, Any]) -> list[str]:
    """The dotted names of the leaves :func:`quantize_params` changes."""
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = tuple(_key(k) for k in path)
        if _is_quantized(p):
            out.append(".".join(p))
    return out


def quantize_params(params: Mapping[str, Any], scheme: str, *, group_size: int = 128,
                    block_size: int = 64) -> dict:
    """``params`` (a pure params dict) with every decoder-block linear kernel fake-quantized
    by ``scheme`` (``int4``: :func:`quantize_int4_rtn` with ``group_size``; ``nf4`` / ``fp4``:
    :func:`quantize_nf4` / :func:`quantize_fp4` with ``block_size``); embeddings, norms and
    ``lm_head`` unchanged (see the module docstring). Each stacked ``[L, in, out]`` kernel is
    quantized layer by layer."""
    if scheme == "int4":
        fn = functools.partial(quantize_int4_rtn, group_size=group_size)
    elif scheme == "nf4":
        fn = functools.partial(quantize_nf4, block_size=block_size)
    elif scheme == "fp4":
        fn = functools.partial(quantize_fp4, block_size=block_size)
    else:
        raise ValueError(f"unknown quantization {scheme!r}; expected one of {', '.join(QUANTIZERS)}")
    if not quantized_paths(params):
        raise ValueError("no decoder-block linear kernels (model.layers.*.kernel) in these params")

    def one(path, x):
        return fn(x) if _is_quantized(tuple(_key(k) for k in path)) else x

    return jax.tree_util.tree_map_with_path(one, params)


def _relative_change(before: Mapping[str, Any], after: Mapping[str, Any]) -> float:
    """||W' - W|| / ||W|| over the quantized kernels (float32)."""
    num = den = 0.0
    flat_b = dict((tuple(_key(k) for k in p), v) for p, v in jax.tree_util.tree_flatten_with_path(before)[0])
    for p, v in jax.tree_util.tree_flatten_with_path(after)[0]:
        p = tuple(_key(k) for k in p)
        if _is_quantized(p):
            b = flat_b[p].astype(jnp.float32)
            num += float(jnp.sum(jnp.square(v.astype(jnp.float32) - b)))
            den += float(jnp.sum(jnp.square(b)))
    return math.sqrt(num / den) if den > 0 else float("nan")


# --------------------------------------------------------------------------- relearning


def relearn_records(forget: Sequence[Mapping[str, Any]], n: int) -> list:
    """``n`` forget pairs spread over the set: every ``len // n``-th from the first (the
    experiments' ``forget[::10]`` for 2 of 20 pairs; different people on the synthetic
    benchmark, whose forget rows are grouped by person)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"relearning needs >= 1 forget pair, got {n}")
    if n > len(forget):
        raise ValueError(f"relearning on {n} forget pairs, but the forget set has {len(forget)}")
    return list(forget[:: max(len(forget) // n, 1)][:n])


def relearn(graphdef, params: Mapping[str, Any], arrays: Mapping[str, np.ndarray], *, steps: int = 10,
            learning_rate: float = 1e-3) -> tuple[dict, list[float]]:
    """The relearning attack: ``steps`` full-batch AdamW steps (constant ``learning_rate``,
    betas (0.9, 0.999), eps 1e-8, no weight decay, no clipping) on the answer-token NLL of the
    tokenized pairs ``arrays`` (``input_ids``, ``attention_mask``, ``labels`` [N, T]), every
    parameter trained. It is the fine-tuning step of ``simu-jax finetune``
    (:func:`simu_jax.train_step.compiled_steps`: token-mean NLL over all rows, one
    micro-batch). Returns ``(params, losses)``, ``losses[i]`` the NLL before step ``i``.
    ``params`` is not modified."""
    from simu_jax.train_step import compiled_steps

    steps = int(steps)
    if steps < 1:
        raise ValueError(f"relearning needs >= 1 step, got {steps}")
    if not float(learning_rate) > 0:
        raise ValueError(f"relearning learning rate must be > 0, got {learning_rate}")
    # finetune.optimizer_key's tuple: lr, min_lr_ratio 1 (constant), betas, eps, weight decay,
    # max_grad_norm, total steps, warmup 0
    opt_key = (float(learning_rate), 1.0, (0.9, 0.999), 1e-8, 0.0, None, steps, 0)
    optimizer, _, train_step, _ = compiled_steps(graphdef, opt_key, False)
    batch = {k: jnp.asarray(np.asarray(arrays[k]))[None] for k in ("input_ids", "attention_mask", "labels")}
    params = dict(params)
    state = optimizer.init(params)
    losses = []
    for i in range(steps):
        params, state, m = train_step(params, state, batch, jnp.float32(1.0), jnp.int32(i))
        losses.append(float(m["nll"]))
    return params, losses


# --------------------------------------------------------------------------- evaluation


@dataclass
class AttackSpec:
    """Robustness attacks run after the evaluation (docs/metrics.md#robustness-attacks).

    ``names``: any of ``int4`` (per-group RTN, ``group_size`` inputs per group, -1 = one group
    per output channel), ``nf4`` and ``fp4`` (bitsandbytes' blockwise types, ``block_size``
    elements per block), ``relearn`` (``relearn_steps`` AdamW steps at ``relearn_lr`` on
    ``relearn_examples`` forget pairs). Empty = no attacks. Synthetic and TOFU benchmarks."""

    names: tuple[Literal["int4", "nf4", "fp4", "relearn"], ...] = ()
    group_size: int = field(default=128, metadata={"range": (-1, None)})
    block_size: int = field(default=64, metadata={"choices": BNB_BLOCK_SIZES})
    relearn_steps: int = field(default=10, metadata={"range": (1, None)})
    relearn_examples: int = field(default=2, metadata={"range": (1, None)})
    relearn_lr: float = field(default=1e-3, metadata={"range": (0.0, None, "()")})

    def check(self) -> None:
        from simu_jax.base import ConfigError

        if self.group_size == 0:
            raise ConfigError("must be >= 1 or -1 (one group per output channel), got 0", "group_size")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"lists an attack twice: {list(self.names)}", "names")


def recovery(after: float, unlearned: float, target: float) -> float:
    """How much of the forgetting an attack undoes on one metric:
    ``(after - unlearned) / (target - unlearned)``: 0 = nothing, 1 = back to the target
    model, > 1 past it, < 0 further from it. NaN when target and unlearned are equal (nothing
    was forgotten on that metric) or a value is missing."""
    vals = [after, unlearned, target]
    if any(v is None or not math.isfinite(float(v)) for v in vals):
        return float("nan")
    gap = float(target) - float(unlearned)
    if gap == 0:
        return float("nan")
    return (float(after) - float(unlearned)) / gap


def _scorer_like(scorer, graphdef, params):
    """A :class:`Scorer` with ``scorer``'s settings for other ``params`` (cast to its dtype; on
    its mesh when it has one)."""
    from simu_jax.evaluate.scoring import Scorer

    return Scorer(graphdef, params, scorer.tokenizer, scorer.template, batch_size=scorer.batch_size,
                  max_length=scorer.max_length, buckets=scorer.buckets, protocol=scorer.protocol,
                  dtype=scorer.dtype, mesh=scorer.mesh)


def _forget_metrics(evaluate_qa, scorer, forget, ref_tr, generate: bool, max_new_tokens, log) -> dict[str, float]:
    """The :data:`FORGET_METRICS` of ``scorer`` on the forget rows (the QA evaluation restricted
    to them, forget quality against the same reference truth ratios)."""
    from simu_jax.evaluate.metrics import summary_metrics

    summary, _ = evaluate_qa(scorer, {"forget": list(forget)}, ref_tr, generate=generate,
                             max_new_tokens=max_new_tokens, log=log)
    metrics = summary_metrics(summary)
    return {k: metrics[k] for k in FORGET_METRICS if k in metrics}


def run_attacks(spec: AttackSpec, scorer, params: Mapping[str, Any], sets: Mapping[str, Sequence],
                summary: Mapping[str, Any], per_sample: Mapping[str, Any], *,
                evaluate_qa: Callable, target: tuple[Any, Mapping[str, Any]] | None = None, generate: bool = True,
                max_new_tokens: int | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Attack the evaluated model and measure the forget metrics again.

    ``scorer``: the evaluation's scorer of the unlearned model (its settings, dtype included,
    are kept: the quantizers act on its parameters, already cast to the evaluation dtype, as
    bitsandbytes quantizes the weights in the dtype they were loaded in); ``params``: the
    model's own parameters (relearning trains these, then the evaluation casts them);
    ``sets``, ``summary``, ``per_sample``: the evaluation's rows and results (the unlearned
    forget metrics are ``summary``'s; forget quality uses its reference truth ratios);
    ``target``: ``(graphdef, params)`` of the model before unlearning: its forget metrics
    are measured and each attack gets ``recovery`` per metric (:func:`recovery`).
    ``evaluate_qa``: the QA evaluation, :func:`simu_jax.evaluate.runner.evaluate_qa_benchmark`
    (passed in: this module sits below the runner, whose CLI calls it).

    Returns ``{"unlearned": {metric: v}, "target": {...} (with a target), "attacks": {name:
    {"forget": {metric: v}, "recovery": {metric: r} (with a target), "settings": {...}}}}``.
    """
    from simu_jax.data import TRAIN_BUCKETS, tokenize_qa

    log = log or (lambda _m: None)
    if not spec.names:
        return {}
    if "forget" not in sets:
        raise ValueError("the robustness attacks need the forget set")
    forget = list(sets["forget"])
    ref_tr = per_sample.get("reference_forget_truth_ratio")
    unlearned = {k: float(summary[k]) for k in FORGET_METRICS if k in summary and summary[k] is not None}
    out: dict[str, Any] = {"unlearned": unlearned, "attacks": {}}
    tgt = None
    if target is not None:
        t0 = time.perf_counter()
        tgt = _forget_metrics(evaluate_qa, _scorer_like(scorer, *target), forget, ref_tr, generate,
                              max_new_tokens, log)
        out["target"] = tgt
        log(f"  attack reference (target model): {time.perf_counter() - t0:.1f}s")
    for name in spec.names:
        t0 = time.perf_counter()
        if name in QUANTIZERS:
            qparams = quantize_params(scorer.params, name, group_size=spec.group_size, block_size=spec.block_size)
            attacked = _scorer_like(scorer, scorer.graphdef, qparams)
            settings: dict[str, Any] = {"bits": 4, "dtype": scorer.dtype,
                                        "quantized": quantized_paths(scorer.params),
                                        "relative_weight_change": _relative_change(scorer.params, qparams)}
            settings.update({"group_size": spec.group_size} if name == "int4" else {"block_size": spec.block_size})
        elif name == "relearn":
            recs = relearn_records(forget, spec.relearn_examples)
            # trained on the tokens the protocol scores (tofu: TOFU's joint tokenization, as training)
            arrays = tokenize_qa(scorer.tokenizer, recs, scorer.template, scorer.max_length, buckets=TRAIN_BUCKETS,
                                 style=scorer.protocol.tokenization)
            new_params, losses = relearn(scorer.graphdef, params, arrays, steps=spec.relearn_steps,
                                         learning_rate=spec.relearn_lr)
            attacked = _scorer_like(scorer, scorer.graphdef, new_params)
            settings = {"steps": spec.relearn_steps, "learning_rate": spec.relearn_lr,
                        "examples": len(recs), "questions": [str(r["question"]) for r in recs],
                        "losses": losses}
        else:
            raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
        after = _forget_metrics(evaluate_qa, attacked, forget, ref_tr, generate, max_new_tokens, log)
        res: dict[str, Any] = {"forget": after, "settings": settings}
        if tgt is not None:
            res["recovery"] = {k: recovery(v, unlearned.get(k), tgt.get(k)) for k, v in after.items()}
        out["attacks"][name] = res
        log(f"  attack {name}: {time.perf_counter() - t0:.1f}s")
    return out


def attack_table(robustness: Mapping[str, Any]) -> list[tuple[str, dict[str, float], dict[str, float]]]:
    """Rows ``(label, values, recovery)`` of one evaluation's ``robustness`` result: the
    unlearned model, the target (when measured), then each attack."""
    rows = [("unlearned", dict(robustness.get("unlearned", {})), {})]
    if robustness.get("target") is not None:
        rows.append(("target", dict(robustness["target"]), {}))
    for name, res in robustness.get("attacks", {}).items():
        rows.append((name, dict(res.get("forget", {})), dict(res.get("recovery") or {})))
    return rows


def format_attacks(robustness: Mapping[str, Any]) -> str:
    """A text table of :func:`attack_table`'s rows: each forget metric after the attack, and
    its recovery in parentheses when a target was measured."""
    rows = attack_table(robustness)
    cols = [k for k in FORGET_METRICS if any(k in v for _, v, _ in rows)]
    lines = ["robustness attacks (forget metrics; recovery in parentheses)",
             "  ".join([f"{'model':<10}"] + [f"{c:>26}" for c in cols])]
    for label, vals, rec in rows:
        cells = []
        for c in cols:
            v = vals.get(c)
            cell = "-" if v is None else f"{v:.4g}"
            if c in rec and rec[c] is not None and math.isfinite(rec[c]):
                cell += f" ({rec[c]:+.2f})"
            cells.append(f"{cell:>26}")
        lines.append("  ".join([f"{label:<10}"] + cells))
    return "\n".join(lines)


def spec_from_cli(names: str | None, **kw) -> AttackSpec:
    """An :class:`AttackSpec` from ``--attack int4,nf4,relearn`` and the numeric options, checked
    as the config loader would (one-line ``ValueError``)."""
    from simu_jax.config import from_dict

    listed = tuple(n.strip() for n in (names or "").split(",") if n.strip())
    unknown = [n for n in listed if n not in ATTACKS]
    if unknown:
        raise ValueError(f"--attack: unknown attack {unknown[0]!r}; expected a comma-separated list of "
                         f"{', '.join(ATTACKS)}")
    values = {"names": list(listed), **{k: v for k, v in kw.items() if v is not None}}
    try:
        spec = from_dict(AttackSpec, values)
        spec.check()
    except ValueError as e:  # config wording -> the CLI's option names
        msg = str(e)
        for k in ("group_size", "block_size", "relearn_steps", "relearn_examples", "relearn_lr", "names"):
            flag = {"group_size": "--attack-group-size", "block_size": "--attack-block-size",
                    "names": "--attack"}.get(k, "--" + k.replace("_", "-"))
            msg = msg.replace(f"config key '{k}'", flag)
        raise ValueError(msg) from None
    return spec

