"""Optimizers for selective unlearning: Sophia with triple masking, AdamW, Newton-CG.

Sophia, per coordinate (Liu et al. 2023; docs/method.md#sophia):

    m <- b1 * m + (1 - b1) * g                                  (every step; twice for SOUL)
    h <- b2 * h + (1 - b2) * h_hat      if count % update_interval == 0
    theta <- theta - lr * wd * theta
                   - lr * clip(m / max(rho * batch_scale * h, eps), -c, c)

The step is SophiaG's (``Liuhong99/Sophia/sophia.py``, the same code as SOUL's
``src/optim/sophia.py:213-234``): ``param.mul_(1 - lr*wd)`` then ``param -= lr * sign(m) *
min(|m| / (rho*bs*h + 1e-15), 1)``. For ``h >= 0`` (Fisher / GNB estimates) that is our update
with ``clip_threshold=1`` and ``batch_scale=bs``, except that we divide by ``max(rho*bs*h,
eps)`` rather than ``rho*bs*h + eps`` -- the paper's form (Alg. 3). The two differ by at most
``eps = 1e-15`` in the denominator, and ``max`` is also right for Hutchinson estimates, which
can be negative: SophiaG's ``+ eps`` would then flip the sign of the step and leave it
unclipped (SophiaH in the same file uses ``relu(h)`` for this).

SOUL (Jia et al., OPTML-Group/SOUL) publishes its optimizer as source, ``src/optim/sophia.py``,
and it is not the paper's Sophia in one respect: ``step()`` calls ``update_hessian()``
(``h <- b2 h + (1-b2) g*g``, line 69) and ``update_exp_avg()`` (line 82, called at 95), and
``_single_tensor_sophiag`` updates ``exp_avg`` again (line 220), so the momentum is
``m <- b1^2 m + (1 - b1^2) g`` (0.81 for b1 = 0.9): ``sophia(momentum="double")``. ``bs`` is
``step()``'s default 5120 (line 85; the Trainer calls a bare ``optimizer.step()``,
``src/unlearn/base.py:604``). Around it the HF Trainer clips the gradient to global norm 1.0
before the step (``base.py:586-602``, :func:`clip_by_global_norm`), so the ``g*g`` is of the
clipped gradient (``hessian_estimate="fisher"``), and runs the linear warmup/decay schedule
(:func:`hf_linear_schedule`); weight decay 0.1 skips norms and biases (:func:`hf_decay_mask`).
:data:`SOPHIA_PRESETS` ``"soul"`` is all of that (docs/method.md#soul-optimizer), ``"sophia"``
the paper's Sophia. Sophia-G (paper) = ``gnb_diagonal`` (which already multiplies by the
token count ``B``) with ``batch_scale=1``; the Hutchinson estimate (Sophia-H) also takes
``batch_scale=1`` (:data:`ESTIMATOR_BATCH_SCALE`).

Ordering: the curvature EMA is updated *before* the step that uses it, and step 0
is a curvature step, so ``h`` is never used at its zero initialization. The
reference GPT-2 loop updates ``h`` after the optimizer step on every k-th
iteration; both start every window of k steps with a fresh estimate.

Triple masking (docs/method.md#triple-masking): ``mask`` is a pytree like the params whose leaves are
booleans broadcastable to the leaf (a ``[L, I, 1]`` mask for a ``[L, I, H]``
kernel, a Python ``False`` for a frozen leaf). Outside the mask the momentum and
the curvature keep their previous values bit for bit and the update is exactly
zero; this is done with ``jnp.where`` (never a multiplication), so NaN/inf in a
gradient or curvature estimate outside the mask cannot leak in. Apply updates with
:func:`masked_apply` (``where(mask, p + u, p)``) to keep frozen parameters
bit-identical; ``optax.apply_updates`` adds ``0.0``, which is exact except that
it turns a ``-0.0`` parameter into ``+0.0``.

How a training loop drives Sophia::

    tx = sophia(lr, rho=0.04, batch_scale=1.0, update_interval=10, mask=mask)
    estimate = make_curvature_estimator("gnb", loss_fn, logits_fn=logits_fn)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, step, key, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        # compute h_hat only on curvature steps (zeros otherwise; ignored anyway)
        h_hat = curvature_on_schedule(estimate, step, 10, params, key, grads, batch)
        updates, opt_state = tx.update(grads, opt_state, params, hessian_estimate=h_hat)
        return masked_apply(params, updates, mask), opt_state, loss

``step`` must equal the optimizer's count (``sophia_count(opt_state)``): both
start at 0 and advance by one per update.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from simu_jax import curvature as C
from simu_jax.base import ConfigError

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = [
    "OptimSpec",
    "SOPHIA_PRESETS",
    "ESTIMATOR_BATCH_SCALE",
    "soul_warmup_steps",
    "SophiaState",
    "sophia",
    "FISHER",
    "MOMENTUM_RULES",
    "clip_by_global_norm",
    "hf_linear_schedule",
    "hf_decay_mask",
    "sophia_state",
    "sophia_diagnostics",
    "masked",
    "masked_apply",
    "adamw",
    "state_in_fp32",
    "make_curvature_estimator",
    "curvature_on_schedule",
    "sophia_count",
    "newton_cg_step",
    "NEWTON_OPTIMIZERS",
    "TrustRegionState",
    "trust_region_state",
    "trust_region_step",
    "newton_tr_step",
    "influence_step",
]


def _where_tree(mask: Optional[PyTree], x: PyTree, y: PyTree) -> PyTree:
    """Leafwise ``where(mask, x, y)``; ``mask`` leaves broadcast against each leaf."""
    if mask is None:
        return x
    return jax.tree.map(lambda m, a, b: jnp.where(m, a, b), mask, x, y)


def _zeros_outside(mask: Optional[PyTree], x: PyTree) -> PyTree:
    if mask is None:
        return x
    return jax.tree.map(lambda m, a: jnp.where(m, a, jnp.zeros((), a.dtype)), mask, x)


def _state_dtype(dtype) -> jnp.dtype:
    return C.acc_dtype(dtype)


# ----------------------------------------------------------------------------
# Element-wise masking of any optax transformation
# ----------------------------------------------------------------------------


def masked(inner: optax.GradientTransformation, mask: PyTree) -> optax.GradientTransformationExtraArgs:
    """Restrict ``inner`` to the entries where ``mask`` is True, element by element.

    Unlike ``optax.masked`` (whole leaves, pass-through updates) this masks inside
    leaves: gradients are zeroed outside the mask before ``inner`` sees them, the
    returned updates are exactly 0 there, and every part of ``inner``'s state that
    is shaped like the params (momenta, curvature) keeps its previous value there
    (found with ``optax.tree_utils.tree_map_params``). Scalar state such as step
    counts advances normally. Extra args (``hessian_estimate``) pass through.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        grads = _zeros_outside(mask, updates)
        new_updates, new_state = inner.update(grads, state, params, **extra_args)
        new_updates = _zeros_outside(mask, new_updates)
        # State tree with the mask in place of every params-shaped subtree, None elsewhere.
        state_mask = otu.tree_map_params(
            inner, lambda _, m: m, new_state, mask, transform_non_params=lambda _: None
        )
        new_state = jax.tree.map(
            lambda m, new, old: new if m is None else jnp.where(m, new, old),
            state_mask,
            new_state,
            state,
            is_leaf=lambda x: x is None,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def masked_apply(params: PyTree, updates: PyTree, mask: Optional[PyTree] = None) -> PyTree:
    """``params + updates`` inside the mask; outside, the old parameter bit for bit."""
    new = optax.apply_updates(params, updates)
    return _where_tree(mask, new, params)


# ----------------------------------------------------------------------------
# Sophia
# ----------------------------------------------------------------------------


class SophiaState(NamedTuple):
    count: jax.Array  # int32 number of updates done
    mu: PyTree  # EMA of gradients (float32; float64 for f64 params)
    hessian: PyTree  # EMA of the diagonal curvature estimate (same dtype as mu)


def _scale_by_sophia(
    learning_rate: ScalarOrSchedule,
    b1: float,
    b2: float,
    rho: float,
    batch_scale: float,
    weight_decay: float,
    eps: float,
    clip_threshold: float,
    update_interval: int,
    weight_decay_mask: Optional[PyTree],
    momentum: str = "single",
) -> optax.GradientTransformationExtraArgs:
    if momentum not in MOMENTUM_RULES:
        raise ValueError(f"momentum={momentum!r}; allowed: {', '.join(MOMENTUM_RULES)}")
    updates_per_step = 2 if momentum == "double" else 1

    def init_fn(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), _state_dtype(jnp.result_type(p)))  # noqa: E731
        return SophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree.map(zeros, params),
            hessian=jax.tree.map(zeros, params),
        )

    def update_fn(updates, state, params=None, *, hessian_estimate=None, **extra_args):
        del extra_args
        if hessian_estimate is None:
            raise ValueError(
                "sophia.update needs hessian_estimate= (a pytree like the params, or \"fisher\"; see "
                "make_curvature_estimator / curvature_on_schedule). It is only read on "
                "curvature steps, count % update_interval == 0."
            )
        if isinstance(hessian_estimate, str):
            if hessian_estimate != FISHER:
                raise ValueError(f"hessian_estimate={hessian_estimate!r}: a pytree or {FISHER!r}")
            # g*g of the gradient this transformation receives (after masking and clipping), as
            # SOUL's update_hessian squares p.grad after the Trainer clipped it (sophia.py:69)
            hessian_estimate = C.fisher_diagonal(updates)
        if weight_decay and params is None:
            raise ValueError("sophia with weight_decay needs params in update().")
        count = state.count
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        refresh = (count % update_interval) == 0

        # m <- b1 m + (1 - b1) g, once ("single") or twice ("double": SOUL's step() calls
        # update_exp_avg() (sophia.py:95, :82) and _single_tensor_sophiag updates exp_avg again
        # (sophia.py:220), so m <- b1^2 m + (1 - b1^2) g)
        mu = state.mu
        for _ in range(updates_per_step):
            mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(m.dtype), mu, updates)
        # h <- b2 h + (1 - b2) h_hat on curvature steps, else unchanged
        hess = jax.tree.map(
            lambda h, e: jnp.where(refresh, b2 * h + (1 - b2) * e.astype(h.dtype), h),
            state.hessian,
            hessian_estimate,
        )

        # -lr * clip(m / max(rho * bs * h, eps), -c, c)
        def precond(m, h):
            return -lr * jnp.clip(m / jnp.maximum(rho * batch_scale * h, eps), -clip_threshold, clip_threshold)

        steps = jax.tree.map(precond, mu, hess)
        like = params if params is not None else updates
        if weight_decay:
            # decoupled decay: -lr * wd * theta
            wd_mask = weight_decay_mask if weight_decay_mask is not None else jax.tree.map(lambda _: True, params)
            if callable(wd_mask):
                wd_mask = wd_mask(params)
            steps = jax.tree.map(
                lambda s, p, m: jnp.where(m, s - lr * weight_decay * p.astype(s.dtype), s),
                steps,
                params,
                wd_mask,
            )
        steps = jax.tree.map(lambda s, p: s.astype(jnp.result_type(p)), steps, like)
        return steps, SophiaState(count=count + 1, mu=mu, hessian=hess)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.95,
    rho: float = 0.04,
    batch_scale: float = 1.0,
    weight_decay: float = 0.0,
    eps: float = 1e-15,
    clip_threshold: float = 1.0,
    update_interval: int = 10,
    mask: Optional[PyTree] = None,
    weight_decay_mask: Optional[Union[PyTree, Callable[[PyTree], PyTree]]] = None,
    momentum: str = "single",
    grad_clip_norm: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Sophia as an optax transformation; the step is the full update (already * -lr).

    ``update(grads, state, params, *, hessian_estimate)``: ``hessian_estimate`` is
    a pytree like the params (``gnb_diagonal``, ``hutchinson_diagonal``; see
    :func:`make_curvature_estimator`), or the string ``"fisher"`` (:data:`FISHER`): the
    ``g*g`` of the gradient as this transformation receives it (masked, and clipped when
    ``grad_clip_norm`` is set; SOUL squares the clipped ``p.grad``). It is required on every
    call but only read when ``count % update_interval == 0``.

    Args:
      learning_rate: float or schedule of the pre-update count (e.g. :func:`hf_linear_schedule`).
      b1, b2: EMA rates of the gradient and the curvature (SOUL: 0.9, 0.95).
      rho: clipping scale (gamma in the paper's Alg. 3); SOUL/SophiaG use 0.04.
      batch_scale: multiplies ``rho`` (SophiaG's ``bs``; SOUL's 5120 for its ``g*g``). Only
        the ``fisher`` estimate needs it: GNB and Hutchinson are already on the loss's scale
        (docs/method.md#curvature-estimators).
      weight_decay: decoupled, ``-lr * wd * theta`` (SophiaG's ``mul_(1 - lr*wd)``).
      eps: floor of the denominator.
      clip_threshold: per-coordinate clip of the preconditioned momentum (1 in
        SophiaG).
      update_interval: k, refresh the curvature EMA every k steps.
      mask: element-wise trainable mask (see module doc); None = all trainable.
      weight_decay_mask: pytree of booleans (per leaf or broadcastable) where weight
        decay applies, or a function of the params returning one (e.g.
        :func:`hf_decay_mask`); None = everywhere (inside ``mask``).
      momentum: ``"single"`` (the paper: ``m <- b1 m + (1 - b1) g``) or ``"double"`` (SOUL's
        code: two such updates per step, ``m <- b1^2 m + (1 - b1^2) g``).
      grad_clip_norm: > 0: clip the gradient to this global norm first
        (:func:`clip_by_global_norm`, torch's formula; the norm is over the trainable
        coordinates only, since ``mask`` zeroes the rest before); 0: no clipping.

    State: ``SophiaState(count, mu, hessian)`` (inside a chain when ``grad_clip_norm`` is set;
    :func:`sophia_state` finds it); ``mu`` and ``hessian`` are float32 whatever the param
    dtype (float64 for float64 params). Updates come back in the param dtype.
    """
    if update_interval < 1:
        raise ValueError("update_interval must be >= 1")
    tx = _scale_by_sophia(
        learning_rate, b1, b2, rho, batch_scale, weight_decay, eps, clip_threshold, update_interval, weight_decay_mask,
        momentum,
    )
    if grad_clip_norm:
        tx = optax.chain(clip_by_global_norm(grad_clip_norm), tx)
    return masked(tx, mask) if mask is not None else tx


# SophiaState.mu update rules (sophia(momentum=...)); "double" is SOUL's code (sophia.py:82, :220)
MOMENTUM_RULES = ("single", "double")
# hessian_estimate=FISHER: g*g of the gradient Sophia receives (after masking and clipping)
FISHER = "fisher"


def clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
    """Scale the gradient by ``min(1, max_norm / (||g|| + eps))``, ``||g||`` the global L2 norm.

    torch's ``nn.utils.clip_grad_norm_`` formula (``clip_coef = max_norm / (total_norm +
    1e-6)``, clamped to 1), which the HF Trainer applies before every optimizer step
    (``max_grad_norm`` 1.0 by default; SOUL ``src/unlearn/base.py:586-602``). optax's own
    ``clip_by_global_norm`` has no ``eps``. The norm is accumulated in float32 (float64 for
    f64 gradients); the gradients keep their dtype.
    """

    def update_fn(updates, state, params=None):
        del params
        norm = C.tree_norm(C.to_acc_dtype(updates))
        scale = jnp.minimum(1.0, max_norm / (norm + eps))
        return jax.tree.map(lambda g: (g * scale.astype(g.dtype)).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def hf_linear_schedule(learning_rate: float, warmup_steps: int, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The HF Trainer's default schedule, ``get_linear_schedule_with_warmup``, of the step count.

    ``lr * t / max(1, W)`` for ``t < W``, then ``lr * max(0, (N - t) / max(1, N - W))``
    (transformers ``optimization._get_linear_schedule_with_warmup_lr_lambda``); ``t`` is the
    0-based optimizer step, so the first step has learning rate 0, as in the Trainer (the
    LambdaLR starts at ``lambda(0)``; ``lr_scheduler.step()`` follows each optimizer step,
    SOUL ``src/unlearn/base.py:604-612``). Computed in the default float dtype (float64
    under x64).
    """
    w, n = int(warmup_steps), int(total_steps)

    def schedule(count):
        t = jnp.asarray(count, jnp.result_type(float))
        warm = t / max(1, w)
        decay = jnp.maximum(0.0, (n - t) / max(1, n - w))
        return learning_rate * jnp.where(t < w, warm, decay)

    return schedule


def hf_decay_mask(params: PyTree) -> PyTree:
    """True where the HF Trainer decays a parameter: not a norm's, not a bias.

    SOUL's ``get_decay_parameter_names`` (``src/optim/__init__.py:7-16``):
    ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` minus names containing ``"bias"``;
    transformers registers ``LlamaRMSNorm`` in ``ALL_LAYERNORM_LAYERS``, so every RMSNorm
    weight is excluded. simu-jax's parameter paths carry the HF module names
    (``model/layers/input_layernorm/weight``, ``model/norm/weight``, OLMo-2's ``q_norm``),
    so a leaf is excluded when a component of its path (or its flat key) contains ``norm`` or
    ``bias``. Embeddings, ``lm_head`` and the compact ``down_rows`` are decayed.
    """

    def keep(path, _):
        names = []
        for k in path:
            name = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
            names.extend(str(name).split("/"))
        return not any("norm" in n.lower() or "bias" in n.lower() for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def sophia_state(opt_state: Any) -> SophiaState:
    """The (first) ``SophiaState`` inside ``opt_state`` (a chain, a masked wrapper)."""
    states = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SophiaState))
    for s in states:
        if isinstance(s, SophiaState):
            return s
    raise ValueError("no SophiaState in opt_state")


# at most this many coordinates enter the median of sophia_diagnostics (an evenly strided
# sample): the median is a sort, and sorting 2^20 floats cost 0.6 s per call on the bench's CPU
# (as much as the rest of an SO step); 2^14 costs 0.04 s and puts the sample median within
# about 1/(2 sqrt(2^14)) = 0.4% in rank of the exact one
MEDIAN_SAMPLE = 1 << 14


def sophia_diagnostics(opt_state: Any, *, rho: float, batch_scale: float, clip_threshold: float = 1.0,
                       eps: float = 1e-15, mask: Optional[PyTree] = None) -> dict[str, jax.Array]:
    """How second-order a Sophia step was, from the state it just produced (docs/method.md#sophia).

    With ``r = m / max(rho * batch_scale * h, eps)`` (``m``, ``h`` the momentum and curvature
    EMA the step used), over the trainable coordinates only (``mask``, as given to
    :func:`sophia`; None = all):

    * ``sophia/clip_fraction``: fraction with ``|r| >= clip_threshold``: they moved by
      ``lr * sign(m)``, a sign step, not a preconditioned one;
    * ``sophia/update_over_lr_median``: median of ``|clip(r, -c, c)|``, the Sophia step per
      unit learning rate (weight decay excluded; defined at lr 0 too). Exact up to
      :data:`MEDIAN_SAMPLE` coordinates, else over an evenly strided sample of about that many;
    * ``sophia/negative_curvature_fraction``: fraction with ``h < 0`` (only a Hutchinson
      estimate can be negative; the step then divides by ``eps``).
    """
    st = sophia_state(opt_state)
    mu, hess = st.mu, st.hessian
    full = jax.tree.map(lambda x: True, mu) if mask is None else mask
    dtype = _state_dtype(jnp.result_type(jax.tree.leaves(mu)[0]))
    total = sum(int(x.size) for x in jax.tree.leaves(mu))
    stride = max(1, -(-total // MEDIAN_SAMPLE))
    n = clipped = negative = jnp.zeros((), dtype)
    samples, valid = [], []
    for m, h, k in zip(jax.tree.leaves(mu), jax.tree.leaves(hess), jax.tree.leaves(full)):
        keep = jnp.broadcast_to(jnp.asarray(k, bool), m.shape)
        r = jnp.abs(m / jnp.maximum(rho * batch_scale * h, eps))
        n = n + jnp.sum(keep, dtype=dtype)
        clipped = clipped + jnp.sum(keep & (r >= clip_threshold), dtype=dtype)
        negative = negative + jnp.sum(keep & (h < 0), dtype=dtype)
        samples.append(jnp.minimum(r, clip_threshold).reshape(-1)[::stride])
        valid.append(keep.reshape(-1)[::stride])
    sample, ok = jnp.concatenate(samples), jnp.concatenate(valid)
    median = jnp.nanmedian(jnp.where(ok, sample, jnp.nan))
    denom = jnp.maximum(n, 1)
    return {"sophia/clip_fraction": clipped / denom, "sophia/update_over_lr_median": median,
            "sophia/negative_curvature_fraction": negative / denom}


def sophia_count(opt_state: Any) -> jax.Array:
    """The ``count`` of the (first) ``SophiaState`` inside ``opt_state`` (e.g. a chain)."""
    states = jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, SophiaState))
    for s in states:
        if isinstance(s, SophiaState):
            return s.count
    raise ValueError("no SophiaState in opt_state")


# ----------------------------------------------------------------------------
# Curvature estimators for Sophia
# ----------------------------------------------------------------------------


def make_curvature_estimator(
    kind: str,
    loss_fn: Optional[Callable[..., jax.Array]] = None,
    logits_fn: Optional[Callable[..., Any]] = None,
    num_probes: int = 1,
    shardings: Optional[PyTree] = None,
) -> Callable[..., PyTree]:
    """Return ``estimate(params, key, grads, *args) -> h_hat`` for Sophia.

    * ``"fisher"``: ``grads * grads`` (SOUL). ``key``, ``params`` unused.
    * ``"hutchinson"``: ``hutchinson_diagonal(loss_fn, params, key, num_probes, *args)``
      (Sophia-H); ``loss_fn(params, *args) -> scalar``.
    * ``"gnb"``: ``gnb_diagonal`` on ``logits_fn(params, *args) -> (logits, weights)``
      (``weights`` the token mask or None); returns ``B * g_sampled**2`` (Sophia-G,
      use ``batch_scale=1``).

    ``shardings`` (hutchinson only): a tree like the params of ``jax.sharding.Sharding``s
    (``sharding.param_shardings``); the Rademacher probes and their HVPs are constrained to
    them, so on a mesh each device draws and holds only its shard of every probe.

    All return float32 pytrees like the params.
    """
    if kind == "fisher":
        return lambda params, key, grads, *args: C.fisher_diagonal(grads)
    if kind == "hutchinson":
        if loss_fn is None:
            raise ValueError("hutchinson needs loss_fn(params, *args)")
        def hutchinson(params, key, grads, *args):
            return C.hutchinson_diagonal(loss_fn, params, key, num_probes, *args, shardings=shardings)

        return hutchinson
    if kind == "gnb":
        if logits_fn is None:
            raise ValueError("gnb needs logits_fn(params, *args) -> (logits, weights)")

        def gnb(params, key, grads, *args):
            _, weights = logits_fn(params, *args)  # weights do not depend on params
            return C.gnb_diagonal(lambda p: logits_fn(p, *args)[0], params, key, weights)

        return gnb
    raise ValueError(f"unknown curvature estimator {kind!r}: use fisher | gnb | hutchinson")


def curvature_on_schedule(
    estimate: Callable[..., PyTree], step, update_interval: int, params: PyTree, key, grads: PyTree, *args
) -> PyTree:
    """``estimate(...)`` when ``step % update_interval == 0``, else float32 zeros (``lax.cond``).

    Skips the estimator's cost on the steps where Sophia ignores it. Under
    ``jit`` only the taken branch runs.
    """
    if update_interval == 1:
        return estimate(params, key, grads, *args)
    dtype = lambda p: _state_dtype(jnp.result_type(p))  # noqa: E731

    def refresh():
        return jax.tree.map(lambda e, p: e.astype(dtype(p)), estimate(params, key, grads, *args), params)

    def skip():
        return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype(p)), params)

    return jax.lax.cond(step % update_interval == 0, refresh, skip)


# ----------------------------------------------------------------------------
# AdamW baseline
# ----------------------------------------------------------------------------


def _to_state_dtype(tree: PyTree) -> PyTree:
    """Every leaf cast to its state dtype (float32; float64 stays float64). A tree with no array
    leaves (e.g. optax's params placeholder in ``tree_map_params``) passes through unchanged."""
    return jax.tree.map(lambda x: x.astype(_state_dtype(jnp.result_type(x))), tree)


def state_in_fp32(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` in the state dtype: float32 state and arithmetic under bf16 params.

    ``init`` sees the params cast to float32, so every params-shaped state leaf (Adam's
    ``mu`` *and* ``nu``; optax's ``mu_dtype`` covers only ``mu``) is created float32; ``update``
    sees float32 gradients (so ``g**2`` is not rounded to bf16 before it enters ``nu``) and
    returns the updates in the gradients' own dtype, as Sophia does. Under ``jax.jit`` the
    cast in ``init`` is dead code (only shapes and dtypes are used).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return inner.init(_to_state_dtype(params))

    def update_fn(updates, state, params=None, **extra_args):
        new, state = inner.update(_to_state_dtype(updates), state, params, **extra_args)
        return jax.tree.map(lambda u, g: u.astype(jnp.result_type(g)), new, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Optional[PyTree] = None,
    weight_decay_mask: Optional[PyTree] = None,
    grad_clip_norm: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw`` with Sophia's element-wise trainable ``mask`` (see :func:`masked`).

    ``weight_decay_mask`` is optax.adamw's own ``mask`` (per-leaf booleans, or a function of
    the params such as :func:`hf_decay_mask`: which leaves get decay). Outside ``mask``: zero
    update, ``mu``/``nu`` unchanged. ``mu`` and ``nu`` are float32 whatever the param dtype
    (float64 for float64 params; see :func:`state_in_fp32`); updates come back in the param
    dtype. ``grad_clip_norm > 0`` clips the (masked) gradient to that global norm first
    (:func:`clip_by_global_norm`).
    """
    tx = state_in_fp32(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                   mask=weight_decay_mask))
    if grad_clip_norm:
        tx = optax.chain(clip_by_global_norm(grad_clip_norm), tx)
    return masked(tx, mask) if mask is not None else tx


# ----------------------------------------------------------------------------
# Exact (masked) Newton step
# ----------------------------------------------------------------------------


def newton_cg_step(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    *args,
    damping: float = 1e-3,
    trust_radius: float = 1.0,
    maxiter: int = 100,
    tol: float = 1e-6,
    mask: Optional[PyTree] = None,
) -> tuple[PyTree, dict]:
    """One damped Newton step with exact HVPs: ``theta - s * d``, ``(H + lambda I) d = g``.

    ``d`` comes from :func:`conjugate_gradient` on the exact Hessian at ``params``
    (the gradient map is linearized once; each CG iteration is one linear HVP).
    The step is scaled by ``s = min(1, trust_radius / ||d||)``. If CG meets
    negative curvature before its first update (``d = 0``), ``d = g`` is used (a
    gradient step capped by the trust radius).

    ``mask`` (optional, element-wise like Sophia's) restricts the solve to the
    subspace S: ``(M H M + lambda I) d = M g`` with ``M`` the 0/1 mask, and only
    masked coordinates move. This still costs full HVPs; for a cheaper masked step
    pass only the trainable subset as ``params`` (close over the frozen rest),
    the docs/method.md#compact-subset convention.

    Returns ``(new_params, info)``; ``info`` holds ``loss``, ``grad_norm``,
    ``cg_iterations``, ``cg_residual``, ``cg_converged``, ``negative_curvature``,
    ``d_norm``, ``step_scale`` (s), ``step_norm`` and ``predicted_decrease`` =
    ``s g.d - s^2/2 d.(H + lambda I) d``, the decrease of the damped quadratic
    model for the step taken (``g.d - d.(H+lambda I)d / 2`` when s = 1).
    """
    grad_fn = lambda p: jax.grad(loss_fn)(p, *args)  # noqa: E731
    loss = loss_fn(params, *args)
    g, h_lin = C.linearize(C.fold_transposed_dots(grad_fn), params)  # g = grad, h_lin(v) = H v
    if mask is not None:
        g = _zeros_outside(mask, g)
        matvec = lambda v: _zeros_outside(mask, h_lin(_zeros_outside(mask, v)))  # noqa: E731
    else:
        matvec = h_lin

    d, info = C.conjugate_gradient(matvec, g, damping=damping, tol=tol, maxiter=maxiter)  # float32 d
    g = C.to_acc_dtype(g)
    fallback = info.negative_curvature & (info.iterations == 0)
    d = otu.tree_where(fallback, g, d)

    d_norm = C.tree_norm(d)
    s = jnp.minimum(1.0, trust_radius / jnp.where(d_norm > 0, d_norm, 1.0))
    new_params = jax.tree.map(lambda p, di: (p - s * di).astype(jnp.result_type(p)), params, d)
    if mask is not None:
        new_params = _where_tree(mask, new_params, params)

    hd = C.to_acc_dtype(matvec(jax.tree.map(lambda x, p: x.astype(jnp.result_type(p)), d, params)))
    ad = C.tree_add_scale(hd, damping, d)  # (H + lambda I) d
    gd = C.tree_vdot(g, d)
    dad = C.tree_vdot(d, ad)
    stats = dict(
        loss=loss,
        grad_norm=C.tree_norm(g),
        cg_iterations=info.iterations,
        cg_residual=info.residual_norm,
        cg_converged=info.converged,
        negative_curvature=info.negative_curvature,
        d_norm=d_norm,
        step_scale=s,
        step_norm=s * d_norm,
        predicted_decrease=s * gd - 0.5 * s**2 * dad,
    )
    return new_params, stats


# ----------------------------------------------------------------------------
# Trust-region Newton (Steihaug-Toint CG), Gauss-Newton and influence steps
# ----------------------------------------------------------------------------

# Method.optimizer names of the Newton-type steps (engine.step_impl; docs/method.md#newton):
# "newton" trust region on the exact Hessian, "ggn" trust region on a PSD Gauss-Newton
# matrix, "influence" the influence step (G_R + lambda I)^-1 grad L_F.
NEWTON_OPTIMIZERS = ("newton", "ggn", "influence")
# trust-region subproblem solvers (optim.tr_solver): the default is lanczos for the exact,
# indefinite Hessian (Steihaug stops at the first negative curvature, for GradDiff often -g
# itself) and steihaug for the PSD Gauss-Newton matrix (CG to the boundary, 5 vectors of memory)
TR_SOLVERS = ("steihaug", "lanczos", "saddle_free")

# Alg. 4.1's constants (Nocedal & Wright): shrink below rho 1/4, expand above 3/4 at the boundary
TR_SHRINK_BELOW, TR_EXPAND_ABOVE, TR_SHRINK, TR_EXPAND = 0.25, 0.75, 0.25, 2.0
# Levenberg-Marquardt adjustment of lambda by the same ratio (Martens 2010, "Deep learning via
# Hessian-free optimization", Sec. 4.1): rho < 1/4 -> lambda * 3/2, rho > 3/4 -> lambda * 2/3
LM_UP, LM_DOWN = 1.5, 2.0 / 3.0


class TrustRegionState(NamedTuple):
    """State of the Newton-type steps, carried in the engine's ``opt_state`` (checkpointed)."""

    count: jax.Array  # int32 steps taken (accepted or not)
    radius: jax.Array  # Delta_k, the trust radius of the next step
    damping: jax.Array  # lambda_k, the damping of the next step (Levenberg-Marquardt state)


def _leaf_acc_dtype(tree: PyTree) -> jnp.dtype:
    dtypes = [jnp.dtype(x.dtype) for x in jax.tree.leaves(tree) if hasattr(x, "dtype")]
    return jnp.dtype(jnp.float64) if jnp.dtype(jnp.float64) in dtypes else jnp.dtype(jnp.float32)


def trust_region_state(radius: float, damping: float) -> optax.GradientTransformationExtraArgs:
    """The state holder of the Newton-type steps as an optax transformation (``init`` only:
    the step itself is :func:`trust_region_step` / :func:`influence_step`). ``init`` gives
    ``TrustRegionState(0, radius, damping)`` (float32; float64 for f64 params)."""

    def init_fn(params):
        dtype = _leaf_acc_dtype(params)
        return TrustRegionState(count=jnp.zeros([], jnp.int32), radius=jnp.asarray(radius, dtype),
                                damping=jnp.asarray(damping, dtype))

    def update_fn(updates, state, params=None, **extra_args):
        raise NotImplementedError("the Newton-type steps are taken by optim.trust_region_step / influence_step")

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _cosine(a: PyTree, b: PyTree) -> jax.Array:
    na, nb = C.tree_norm(a), C.tree_norm(b)
    return jnp.where((na > 0) & (nb > 0), C.tree_vdot(a, b) / jnp.where((na > 0) & (nb > 0), na * nb, 1.0), 0.0)


def _apply_step(params: PyTree, step: PyTree, mask: Optional[PyTree]) -> PyTree:
    new = jax.tree.map(lambda p, s: (p + s.astype(p.dtype)).astype(jnp.result_type(p)), params, step)
    return _where_tree(mask, new, params)


def trust_region_step(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    state: TrustRegionState,
    grad: PyTree,
    matvec: Callable[[PyTree], PyTree],
    *args,
    loss: jax.Array,
    mask: Optional[PyTree] = None,
    max_radius: float = 10.0,
    eta: float = 0.1,
    maxiter: int = 20,
    tol: float = 1e-5,
    adapt_damping: bool = False,
    solver: str = "steihaug",
) -> tuple[PyTree, TrustRegionState, dict]:
    """One iteration of the trust-region method, Nocedal & Wright Algorithm 4.1.

    ``loss = f(x_k)``, ``grad = g_k`` and ``matvec(v) = B_k v`` (the exact Hessian, or a
    Gauss-Newton matrix; masked outside ``mask`` by the caller) define the model
    ``m_k(p) = f + g.p + p.B p / 2``. With ``Delta = state.radius`` and
    ``lambda = state.damping``:

    1. ``p_k`` inside ``||p|| <= Delta`` on ``B + lambda I`` (``lambda`` regularizes the solve
       only), by ``solver`` (:data:`TR_SOLVERS`): ``steihaug``
       (:func:`simu_jax.curvature.steihaug_cg`, Alg. 7.2: stops at the first negative
       curvature), ``lanczos`` (:func:`simu_jax.curvature.lanczos_trust_region`, GLTR: the
       exact minimizer in the ``maxiter``-dimensional Krylov space) or ``saddle_free``
       (:func:`simu_jax.curvature.saddle_free_step`: ``-|B|^-1 g`` in that space);
    2. ``rho_k = (f(x_k) - f(x_k + p_k)) / (m_k(0) - m_k(p_k))``: actual over predicted
       decrease of the *undamped* model (one extra evaluation of ``loss_fn(x_k + p_k, *args)``,
       the same batch); ``m_k(0) - m_k(p_k) >= `` the damped model's decrease ``> 0`` for
       ``p != 0``; ``p = 0`` (``g = 0``) and a non-finite trial loss give ``rho = 0``;
    3. ``rho < 1/4``: ``Delta <- Delta / 4``; ``rho > 3/4`` and ``||p|| = Delta`` (Steihaug
       stopped on the boundary): ``Delta <- min(2 Delta, max_radius)``; else unchanged;
    4. ``rho > eta`` (``0 <= eta < 1/4``): ``x_{k+1} = x_k + p_k`` (accepted), else ``x_k``;
    5. ``adapt_damping``: Levenberg-Marquardt on the same ratio (Martens 2010, Sec. 4.1):
       ``rho < 1/4``: ``lambda * 3/2``; ``rho > 3/4``: ``lambda * 2/3`` (so ``lambda = 0``
       stays 0).

    Only coordinates inside ``mask`` move (``grad`` and ``matvec`` must already be zero
    outside it). Returns ``(new_params, new_state, info)``; ``info``: ``rho``, ``cg_exit``
    (curvature.CG_* codes), ``cg_iterations``, ``cg_residual``, ``step_norm`` (of the trial
    step, taken or not), ``radius`` and ``damping`` (used in this step), ``next_radius``,
    ``next_damping``, ``accepted`` (0/1), ``cos_neg_grad`` (cosine of the step to ``-g``),
    ``predicted_decrease``, ``actual_decrease``, ``trial_loss``, ``grad_norm``.
    """
    radius, lam = state.radius, state.damping
    if solver == "steihaug":
        p, info = C.steihaug_cg(matvec, grad, radius, damping=lam, tol=tol, maxiter=maxiter)
    elif solver == "lanczos":
        p, info = C.lanczos_trust_region(matvec, grad, radius, damping=lam, num_iters=maxiter, tol=tol)
    elif solver == "saddle_free":
        p, info = C.saddle_free_step(matvec, grad, radius, damping=lam, num_iters=maxiter, tol=tol)
    else:
        raise ValueError(f"solver must be one of {TR_SOLVERS}, got {solver!r}")
    g = C.to_acc_dtype(grad)
    step_norm = info.step_norm
    predicted = -(info.model_value - 0.5 * lam * step_norm**2)  # undamped: m(0) - m(p)
    trial = _apply_step(params, p, mask)
    trial_loss = loss_fn(trial, *args)
    actual = (loss - trial_loss).astype(predicted.dtype)
    ok = (predicted > 0) & jnp.isfinite(actual)
    rho = jnp.where(ok, actual / jnp.where(ok, predicted, 1.0), 0.0)
    at_boundary = (info.exit_code == C.CG_NEGATIVE_CURVATURE) | (info.exit_code == C.CG_BOUNDARY)
    shrink = ~(rho >= TR_SHRINK_BELOW)
    expand = (rho > TR_EXPAND_ABOVE) & at_boundary
    next_radius = jnp.where(shrink, TR_SHRINK * radius,
                            jnp.where(expand, jnp.minimum(TR_EXPAND * radius, max_radius), radius)).astype(radius.dtype)
    next_lam = lam
    if adapt_damping:
        next_lam = jnp.where(shrink, LM_UP * lam, jnp.where(rho > TR_EXPAND_ABOVE, LM_DOWN * lam, lam)).astype(lam.dtype)
    accepted = rho > eta
    new_params = jax.tree.map(lambda t, x: jnp.where(accepted, t, x), trial, params)
    stats = dict(
        rho=rho, cg_exit=info.exit_code, cg_iterations=info.iterations, cg_residual=info.residual_norm,
        step_norm=step_norm, radius=radius, damping=lam, next_radius=next_radius, next_damping=next_lam,
        accepted=accepted.astype(jnp.float32), cos_neg_grad=-_cosine(g, p), predicted_decrease=predicted,
        actual_decrease=actual, trial_loss=trial_loss, grad_norm=C.tree_norm(g),
    )
    return new_params, TrustRegionState(state.count + 1, next_radius, next_lam), stats


def newton_tr_step(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    state: TrustRegionState,
    *args,
    mask: Optional[PyTree] = None,
    **kwargs,
) -> tuple[PyTree, TrustRegionState, dict]:
    """:func:`trust_region_step` with the exact Hessian of ``loss_fn(params, *args)``: the
    gradient map is linearized once (``jax.linearize``), each CG iteration is one linear HVP.
    ``mask`` restricts the step to a subspace: ``M g`` and ``M H M`` (element-wise 0/1 mask)."""

    def value_and_grad(p):
        loss, g = jax.value_and_grad(loss_fn)(p, *args)
        return g, loss

    g, h_lin, loss = C.linearize(C.fold_transposed_dots(value_and_grad), params, has_aux=True)
    if mask is not None:
        g = _zeros_outside(mask, g)
        matvec = lambda v: _zeros_outside(mask, h_lin(_zeros_outside(mask, v)))  # noqa: E731
    else:
        matvec = h_lin
    new, state, info = trust_region_step(loss_fn, params, state, g, matvec, *args, loss=loss, mask=mask, **kwargs)
    return new, state, {"loss": loss, **info}


def influence_step(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    state: TrustRegionState,
    grad: PyTree,
    forget_grad: PyTree,
    matvec: Callable[[PyTree], PyTree],
    *args,
    loss: jax.Array,
    mask: Optional[PyTree] = None,
    scale: float = 1.0,
    max_norm: Optional[float] = None,
    maxiter: int = 20,
    tol: float = 1e-5,
) -> tuple[PyTree, TrustRegionState, dict]:
    """The influence-unlearning step ``theta + s * d``, ``(G + lambda I) d = grad L_F``.

    ``matvec(v) = G v`` is a PSD curvature of the retain loss (the engine passes the retain
    GGN ``G_R``), ``forget_grad = grad L_F`` (the forget NLL's gradient: ``d`` raises it, to
    first order, while ``G`` keeps the retain loss's curvature directions still),
    ``lambda = state.damping``. ``d`` by plain CG (``curvature.conjugate_gradient``; PSD plus
    ``lambda > 0`` is positive definite). ``s = scale`` (1: the influence step itself; one-shot
    influence unlearning is one such step), capped so ``||s d|| <= max_norm`` (None: no cap).
    Always taken; ``loss_fn(new, *args)`` is evaluated for the diagnostics only.

    ``info`` has the keys of :func:`trust_region_step`: ``cg_exit`` 0 converged, 1 negative
    curvature, 3 max iterations; ``predicted_decrease = -grad.step`` (the objective's
    first-order prediction, ``grad`` its gradient) and ``rho = actual / predicted`` against
    it; ``accepted`` is 1; ``radius`` is ``max_norm`` (inf without a cap).
    """
    lam = state.damping
    damped = lambda v: C.tree_add_scale(C.to_acc_dtype(matvec(v)), lam, C.to_acc_dtype(v))  # noqa: E731
    d, cg = C.conjugate_gradient(damped, forget_grad, tol=tol, maxiter=maxiter)
    d_norm = C.tree_norm(d)
    s = jnp.asarray(scale, d_norm.dtype)
    if max_norm is not None:
        s = jnp.minimum(s, max_norm / jnp.where(d_norm > 0, d_norm, 1.0))
    step = otu.tree_scale(s, d)
    new_params = _apply_step(params, step, mask)
    new_loss = loss_fn(new_params, *args)
    g = C.to_acc_dtype(grad)
    predicted = -C.tree_vdot(g, step)
    actual = (loss - new_loss).astype(predicted.dtype)
    ok = (predicted != 0) & jnp.isfinite(actual)
    rho = jnp.where(ok, actual / jnp.where(ok, predicted, 1.0), 0.0)
    code = jnp.where(cg.converged, C.CG_CONVERGED,
                     jnp.where(cg.negative_curvature, C.CG_NEGATIVE_CURVATURE, C.CG_MAX_ITERATIONS)).astype(jnp.int32)
    radius = jnp.asarray(jnp.inf if max_norm is None else max_norm, d_norm.dtype)
    stats = dict(
        rho=rho, cg_exit=code, cg_iterations=cg.iterations, cg_residual=cg.residual_norm, step_norm=s * d_norm,
        radius=radius, damping=lam, next_radius=radius, next_damping=lam, accepted=jnp.ones([], jnp.float32),
        cos_neg_grad=-_cosine(g, step), predicted_decrease=predicted, actual_decrease=actual, trial_loss=new_loss,
        grad_norm=C.tree_norm(g),
    )
    return new_params, state._replace(count=state.count + 1), stats


# Values a preset gives the OptimSpec fields left unset (None); docs/method.md#soul-optimizer.
# "soul": SOUL's code as it runs (OPTML-Group/SOUL): two momentum updates per step
# (src/optim/sophia.py:95 + :82 and :220), the HF Trainer's global-norm clipping at
# TrainingArguments.max_grad_norm = 1.0 (src/unlearn/base.py:586-602), its default linear
# schedule with warmup_steps = max(1, max_steps // 10) (src/model/unlearn.py:105-106; the
# Trainer builds the scheduler because SOUL passes optimizers=(optimizer, None), :133), weight
# decay 0.1 (configs/TOFU/SO_GradDiff.json:12) on all but norms and biases
# (src/optim/__init__.py:7-38). "sophia": the paper's Sophia (Liu et al. 2023), one momentum
# update with b1 as given, constant learning rate, no clipping, no weight decay. b1 0.9, b2 0.95,
# rho 0.04 (SO_GradDiff.json:20-22) are the fields' own defaults in both.
SOPHIA_PRESETS: dict[str, dict[str, Any]] = {
    "soul": dict(momentum="double", grad_clip_norm=1.0, schedule="linear", weight_decay=0.1,
                 weight_decay_mask="no_norm_bias"),
    "sophia": dict(momentum="single", grad_clip_norm=0.0, schedule="constant", weight_decay=0.0,
                   weight_decay_mask="all"),
}
# The batch_scale that goes with each estimator: SOUL/SophiaG multiply rho by bs = 5120 for their
# g*g (src/optim/sophia.py:85, :233); GNB and Hutchinson already estimate on the loss's own scale
# (curvature.gnb_diagonal, curvature.hutchinson_diagonal), so any other value double-scales them.
ESTIMATOR_BATCH_SCALE = {"fisher": 5120.0, "gnb": 1.0, "hutchinson": 1.0}


def soul_warmup_steps(total_steps: int) -> int:
    """SOUL's ``warmup_steps = max(1, max_steps // 10)`` (``src/model/unlearn.py:105``)."""
    return max(1, int(total_steps) // 10)


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer's hyper-parameters (``optim:`` in an unlearn config; hashable, part of the
    step's jit cache key). Sophia: ``b1``, ``b2``, ``rho``, ``batch_scale``, ``clip_threshold``,
    ``update_interval``, curvature ``estimator``, ``num_probes`` and ``momentum``
    (docs/method.md#sophia); AdamW: ``b1``, ``adam_b2``, ``adam_eps``; both: ``learning_rate``,
    ``weight_decay`` (+ ``weight_decay_mask``), ``grad_clip_norm``, ``schedule`` (+
    ``warmup_steps``); Newton-CG: ``damping``, ``trust_radius``, ``cg_iters``, ``cg_tol``
    (docs/method.md#newton).

    ``preset`` (Sophia methods only): ``soul`` or ``sophia`` (:data:`SOPHIA_PRESETS`); the
    fields left unset (None) take the preset's values, explicit values override
    (:meth:`resolved`). ``simu-jax unlearn`` defaults to ``soul`` for so_* / simu_* and writes
    the resolved values to the run's config.yaml; in Python, ``preset=None`` resolves to the
    ``sophia`` values. ``batch_scale`` unset follows the estimator
    (:data:`ESTIMATOR_BATCH_SCALE`); a config with a ``gnb`` / ``hutchinson`` estimator and
    ``batch_scale`` != 1 is refused by the loader (:meth:`check`): it would scale their
    curvature twice (a Python ``OptimSpec`` is taken as given)."""

    learning_rate: float = field(default=1e-4, metadata={"range": (0.0, None, "()")})
    b1: float = field(default=0.9, metadata={"range": (0.0, 1.0, "[)")})
    b2: float = field(default=0.95, metadata={"range": (0.0, 1.0, "[)")})
    rho: float = field(default=0.04, metadata={"range": (0.0, None, "()")})
    batch_scale: Optional[float] = field(default=None, metadata={"range": (0.0, None, "()")})
    weight_decay: Optional[float] = field(default=None, metadata={"range": (0.0, None)})
    clip_threshold: float = field(default=1.0, metadata={"range": (0.0, None, "()")})
    update_interval: int = field(default=1, metadata={"range": (1, None)})
    estimator: Literal["fisher", "gnb", "hutchinson"] = "fisher"
    num_probes: int = field(default=1, metadata={"range": (1, None)})
    # presets and the trainer-side parts (None = the preset's value; docs/method.md#soul-optimizer)
    preset: Optional[Literal["soul", "sophia"]] = None
    momentum: Optional[Literal["single", "double"]] = None
    grad_clip_norm: Optional[float] = field(default=None, metadata={"range": (0.0, None)})  # 0 = off
    schedule: Optional[Literal["constant", "linear"]] = None  # linear = HF warmup + linear decay
    warmup_steps: Optional[int] = field(default=None, metadata={"range": (0, None)})
    weight_decay_mask: Optional[Literal["all", "no_norm_bias"]] = None

    def check(self) -> None:
        """Refuse a double-scaled curvature: ``batch_scale`` != 1 with ``gnb`` / ``hutchinson``."""
        if self.batch_scale is not None and self.estimator != "fisher" and self.batch_scale != 1.0:
            raise ConfigError(
                f"is {self.batch_scale:g} with optim.estimator={self.estimator}, whose curvature is already on the "
                "loss's scale: batch_scale applies to the fisher (g*g) estimate only; leave optim.batch_scale unset "
                "or 1 (docs/method.md#curvature-estimators)", "batch_scale")

    def resolved(self, optimizer: str = "sophia", total_steps: Optional[int] = None) -> "OptimSpec":
        """Every unset field filled: from ``preset`` for a Sophia method (``None`` = ``sophia``),
        from the ``sophia`` values (no clipping, constant lr, no decay) otherwise; explicit values
        are kept, so resolving twice changes nothing. ``warmup_steps`` of a ``linear`` schedule
        is SOUL's ``max(1, total_steps // 10)`` when ``total_steps`` is known (else left None:
        ``engine.build_optimizer`` then asks for it); 0 for ``constant``."""
        if self.preset is not None and optimizer != "sophia":
            raise ConfigError(f"is {self.preset!r}, but presets apply to the Sophia methods (so_*, simu_*) only; "
                              f"this method's optimizer is {optimizer}: leave optim.preset unset", "optim.preset")
        values = SOPHIA_PRESETS[self.preset or "sophia"]
        fill = {k: v for k, v in values.items() if getattr(self, k) is None}
        if self.batch_scale is None:
            fill["batch_scale"] = ESTIMATOR_BATCH_SCALE[self.estimator]
        schedule = fill.get("schedule", self.schedule)
        if self.warmup_steps is None:
            if schedule == "constant":
                fill["warmup_steps"] = 0
            elif total_steps is not None:
                fill["warmup_steps"] = soul_warmup_steps(total_steps)
        if optimizer == "sophia" and self.preset is None:
            fill["preset"] = "sophia"
        if self.tr_solver is None and optimizer in ("newton", "ggn"):
            fill["tr_solver"] = "lanczos" if optimizer == "newton" else "steihaug"
        return replace(self, **fill) if fill else self

    adam_b2: float = field(default=0.999, metadata={"range": (0.0, 1.0, "[)")})
    adam_eps: float = field(default=1e-8, metadata={"range": (0.0, None, "()")})
    damping: float = field(default=1e-2, metadata={"range": (0.0, None)})
    trust_radius: float = field(default=0.5, metadata={"range": (0.0, None, "()")})
    cg_iters: int = field(default=20, metadata={"range": (1, None)})
    cg_tol: float = field(default=1e-5, metadata={"range": (0.0, None, "()")})
    # Newton-type steps (docs/method.md#newton): trust_radius is Delta_0 (influence: a length cap),
    # damping lambda_0; tr_max_radius Delta-hat, tr_eta the acceptance threshold (N&W Alg. 4.1),
    # tr_adapt_damping Levenberg-Marquardt on rho; influence_scale s of theta + s d;
    # lanczos_every: extreme eigenvalues of the step's curvature every N steps (0 = off)
    tr_max_radius: float = field(default=10.0, metadata={"range": (0.0, None, "()")})
    tr_eta: float = field(default=0.1, metadata={"range": (0.0, 0.25, "[)")})
    tr_adapt_damping: bool = False
    influence_scale: float = field(default=1.0, metadata={"range": (0.0, None, "()")})
    lanczos_every: int = field(default=0, metadata={"range": (0, None)})
    lanczos_iters: int = field(default=16, metadata={"range": (2, None)})
    # the trust-region subproblem's solver (TR_SOLVERS; None: lanczos for newton, steihaug for ggn);
    # lanczos / saddle_free take cg_iters Lanczos steps and keep that many vectors of the subset
    tr_solver: Optional[Literal["steihaug", "lanczos", "saddle_free"]] = None
