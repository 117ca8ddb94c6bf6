"""Optimizers for selective unlearning: Sophia with triple masking, AdamW, Newton-CG.

Sophia, per coordinate (Liu et al. 2023; docs/method.md#sophia):

    m <- b1 * m + (1 - b1) * g                                  (every step)
    h <- b2 * h + (1 - b2) * h_hat      if count % update_interval == 0
    theta <- theta - lr * wd * theta
                   - lr * clip(m / max(rho * batch_scale * h, eps), -c, c)

Reference code, followed exactly: ``SophiaG`` in ``Liuhong99/Sophia/sophia.py``
steps ``param.mul_(1 - lr*wd)`` then ``param -= lr * sign(m) * min(|m| / (rho*bs*h +
1e-15), 1)``. For ``h >= 0`` (Fisher / GNB estimates) that is our update with
``clip_threshold=1`` and ``batch_scale=bs``, except that we divide by ``max(rho*bs*h,
eps)`` rather than ``rho*bs*h + eps`` -- the paper's form (Alg. 3). The two differ by
at most ``eps = 1e-15`` in the denominator, and ``max`` is also right for Hutchinson
estimates, which can be negative: SophiaG's ``+ eps`` would then flip the sign of
the step and leave it unclipped (SophiaH in the same file uses ``relu(h)`` for this).
SOUL (Jia et al., OPTML-Group/SOUL) builds a ``SophiaG`` with betas (0.9, 0.95),
rho 0.04, weight decay 0.1 (``configs/TOFU/SO_GradDiff.json``) and calls a bare
``optimizer.step()`` (HF Trainer loop), i.e. SophiaG's default ``bs=5120``. Its
own ``src/optim/sophia.py`` is published only as bytecode; per docs/method.md#soul-optimizer its
curvature is the ``g*g`` of the unlearning loss at every step. So SOUL =
``sophia(lr, b1=0.9, b2=0.95, rho=0.04, batch_scale=5120, weight_decay=0.1,
update_interval=1)`` with the ``"fisher"`` estimator.
Sophia-G (paper) = ``gnb_diagonal`` (which already multiplies by the token count
``B``) with ``batch_scale=1``.

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

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from simu_jax import curvature as C

PyTree = Any
ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

__all__ = [
    "OptimSpec",
    "SophiaState",
    "sophia",
    "masked",
    "masked_apply",
    "adamw",
    "state_in_fp32",
    "make_curvature_estimator",
    "curvature_on_schedule",
    "sophia_count",
    "newton_cg_step",
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
) -> optax.GradientTransformationExtraArgs:
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
                "sophia.update needs hessian_estimate= (a pytree like the params; see "
                "make_curvature_estimator / curvature_on_schedule). It is only read on "
                "curvature steps, count % update_interval == 0."
            )
        if weight_decay and params is None:
            raise ValueError("sophia with weight_decay needs params in update().")
        count = state.count
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        refresh = (count % update_interval) == 0

        # m <- b1 m + (1 - b1) g
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(m.dtype), state.mu, updates)
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
    weight_decay_mask: Optional[PyTree] = None,
) -> optax.GradientTransformationExtraArgs:
    """Sophia as an optax transformation; the step is the full update (already * -lr).

    ``update(grads, state, params, *, hessian_estimate)``: ``hessian_estimate`` is
    a pytree like the params (``fisher_diagonal``, ``gnb_diagonal``,
    ``hutchinson_diagonal``; see :func:`make_curvature_estimator`); it is required
    on every call but only read when ``count % update_interval == 0``.

    Args:
      learning_rate: float or optax schedule (evaluated at the pre-update count).
      b1, b2: EMA rates of the gradient and the curvature (SOUL: 0.9, 0.95).
      rho: clipping scale (gamma in the paper's Alg. 3); SOUL/SophiaG use 0.04.
      batch_scale: multiplies ``rho`` (SophiaG's ``bs``; SOUL's 5120).
      weight_decay: decoupled, ``-lr * wd * theta`` (SophiaG's ``mul_(1 - lr*wd)``).
      eps: floor of the denominator.
      clip_threshold: per-coordinate clip of the preconditioned momentum (1 in
        SophiaG).
      update_interval: k, refresh the curvature EMA every k steps.
      mask: element-wise trainable mask (see module doc); None = all trainable.
      weight_decay_mask: pytree of booleans (per leaf or broadcastable) where weight
        decay applies; None = everywhere (inside ``mask``).

    State: ``SophiaState(count, mu, hessian)``; ``mu`` and ``hessian`` are float32
    whatever the param dtype (float64 for float64 params). Updates come back in
    the param dtype.
    """
    if update_interval < 1:
        raise ValueError("update_interval must be >= 1")
    tx = _scale_by_sophia(
        learning_rate, b1, b2, rho, batch_scale, weight_decay, eps, clip_threshold, update_interval, weight_decay_mask
    )
    return masked(tx, mask) if mask is not None else tx


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
) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw`` with Sophia's element-wise trainable ``mask`` (see :func:`masked`).

    ``weight_decay_mask`` is optax.adamw's own ``mask`` (per-leaf booleans: which
    leaves get decay). Outside ``mask``: zero update, ``mu``/``nu`` unchanged. ``mu`` and
    ``nu`` are float32 whatever the param dtype (float64 for float64 params; see
    :func:`state_in_fp32`); updates come back in the param dtype.
    """
    tx = state_in_fp32(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                                   mask=weight_decay_mask))
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
    g, h_lin = jax.linearize(grad_fn, params)  # g = grad, h_lin(v) = H v
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


@dataclass(frozen=True)
class OptimSpec:
    """The optimizer's hyper-parameters (``optim:`` in an unlearn config; hashable, part of the
    step's jit cache key). Sophia: ``b1``, ``b2``, ``rho``, ``batch_scale``, ``clip_threshold``,
    ``update_interval``, curvature ``estimator`` and ``num_probes`` (docs/method.md#sophia);
    AdamW: ``b1``, ``adam_b2``, ``adam_eps``; both: ``learning_rate``, ``weight_decay``;
    Newton-CG: ``damping``, ``trust_radius``, ``cg_iters``, ``cg_tol`` (docs/method.md#newton)."""

    learning_rate: float = field(default=1e-4, metadata={"range": (0.0, None, "()")})
    b1: float = field(default=0.9, metadata={"range": (0.0, 1.0, "[)")})
    b2: float = field(default=0.95, metadata={"range": (0.0, 1.0, "[)")})
    rho: float = field(default=0.04, metadata={"range": (0.0, None, "()")})
    batch_scale: float = field(default=5120.0, metadata={"range": (0.0, None, "()")})
    weight_decay: float = field(default=0.0, metadata={"range": (0.0, None)})
    clip_threshold: float = field(default=1.0, metadata={"range": (0.0, None, "()")})
    update_interval: int = field(default=1, metadata={"range": (1, None)})
    estimator: Literal["fisher", "gnb", "hutchinson"] = "fisher"
    num_probes: int = field(default=1, metadata={"range": (1, None)})
    adam_b2: float = field(default=0.999, metadata={"range": (0.0, 1.0, "[)")})
    adam_eps: float = field(default=1e-8, metadata={"range": (0.0, None, "()")})
    damping: float = field(default=1e-2, metadata={"range": (0.0, None)})
    trust_radius: float = field(default=0.5, metadata={"range": (0.0, None, "()")})
    cg_iters: int = field(default=20, metadata={"range": (1, None)})
    cg_tol: float = field(default=1e-5, metadata={"range": (0.0, None, "()")})
