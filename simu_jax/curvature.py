"""Exact and stochastic second-order math on arbitrary pytrees.

Everything here is a pure function of pytrees and works under ``jax.jit``:

* products: :func:`hvp` (exact Hessian-vector product, forward-over-reverse),
  :func:`ggn_vp` (Gauss-Newton product ``J^T H_L J v``); :func:`fold_transposed_dots`, which
  every gradient map that is differentiated again goes through;
* diagonal estimators used as Sophia's ``h_hat``: :func:`hutchinson_diagonal`
  (Sophia-H), :func:`gnb_diagonal` (Gauss-Newton-Bartlett, Sophia-G),
  :func:`fisher_diagonal` (empirical Fisher ``g*g``, what SOUL's code uses);
* solvers / inspection: :func:`conjugate_gradient` (damped CG),
  :func:`lanczos` (extreme eigenvalues), :func:`dense_hessian` and
  :func:`hessian_diagonal_exact` (exact Hessian on a few flat coordinates), so a
  user can measure how far a diagonal estimate is from the truth.

Dtypes: products (``hvp``, ``ggn_vp``) come back in the dtype of the
parameters, as JAX's autodiff produces them. Everything that is *accumulated*
(diagonal estimates, CG / Lanczos scalars) is computed in float32, or float64 when
the inputs are float64. Pass float32 parameters for second-order passes of a bf16
model (docs/method.md#precision: "keep losses and curvature in float32").
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.extend import core as jex_core
from jax.flatten_util import ravel_pytree

PyTree = Any

# optax renamed a few tree helpers across 0.2.x; take whichever this install has.
_tree_norm = getattr(otu, "tree_norm", None) or getattr(otu, "tree_l2_norm")
_tree_add_scale = getattr(otu, "tree_add_scale", None) or getattr(otu, "tree_add_scalar_mul")

__all__ = [
    "hessian_rows",
    "acc_dtype",
    "to_acc_dtype",
    "tree_vdot",
    "tree_norm",
    "tree_add_scale",
    "fold_transposed_dots",
    "linearize",
    "hvp",
    "ggn_vp",
    "rademacher_like",
    "hutchinson_diagonal",
    "grad_and_hutchinson",
    "hutchinson_from_hvp",
    "gnb_diagonal",
    "fisher_diagonal",
    "CGInfo",
    "conjugate_gradient",
    "LanczosResult",
    "lanczos",
    "dense_hessian",
    "hessian_diagonal_exact",
    "SteihaugInfo",
    "steihaug_cg",
    "tridiagonal_trust_region",
    "lanczos_trust_region",
    "saddle_free_step",
    "ggn_operator",
]


# ----------------------------------------------------------------------------
# Tree helpers (thin aliases over optax.tree_utils)
# ----------------------------------------------------------------------------


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def _tree_acc_dtype(tree: PyTree) -> jnp.dtype:
    leaves = jax.tree.leaves(tree)
    if any(jnp.dtype(jnp.result_type(x)) == jnp.float64 for x in leaves):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def tree_vdot(x: PyTree, y: PyTree) -> jax.Array:
    """<x, y> summed over all leaves (``optax.tree_utils.tree_vdot``)."""
    return otu.tree_vdot(x, y)


def tree_norm(x: PyTree) -> jax.Array:
    """Euclidean norm over all leaves (``optax.tree_utils.tree_norm``)."""
    return _tree_norm(x)


def tree_add_scale(x: PyTree, s, y: PyTree) -> PyTree:
    """x + s * y (``optax.tree_utils.tree_add_scale``)."""
    return _tree_add_scale(x, s, y)


def to_acc_dtype(tree: PyTree) -> PyTree:
    """Cast every leaf to its accumulation dtype (float32; float64 stays float64)."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(acc_dtype(jnp.result_type(x))), tree)


def _cast_tree(tree: PyTree, like: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)), tree, like)


# ----------------------------------------------------------------------------
# Products
# ----------------------------------------------------------------------------


def fold_transposed_dots(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every ``transpose(dot_general(a, b))`` that only swaps the two operands' free
    dimensions written as ``dot_general(b, a)``: the same values (up to the matmul's summation
    order), for the gradient maps that the second-order code differentiates again.

    Why: JAX's transpose rule of ``dot_general`` computes a weight's cotangent as
    ``transpose(dot_general(g, x))`` (the cotangent first, then the transpose back to the
    kernel's [in, out] layout; ``jax/_src/lax/lax.py``, ``_dot_general_transpose_lhs``). XLA folds
    that transpose into the dot in a gradient program, but the tangent of a gradient map is
    ``transpose(dot(dg, x) + dot(g, dx))``: the transpose sits on a sum, XLA keeps it, and on
    XLA:CPU it lands in a strided loop fusion with the forget / retain and per-layer sums
    (measured: 11-14% of a linearized HVP's op time at the bench's hidden 512). Folded before
    differentiating, the tangent is ``dot(dx, g) + dot(x, dg)`` in the kernel's layout; measured in
    turns there: the exact HVP 0.85-0.91x, linearize + one product 0.86-0.97x, a loop of 4 products 0.95x.

    ``fn`` is traced to a jaxpr (``jax.make_jaxpr``) on each call, rewritten, sub-jaxprs (jit,
    scan, remat, cond, custom rules' primal jaxprs) included, and evaluated; it composes with
    ``jax.jvp`` / ``jax.linearize`` / ``jax.jit`` like ``fn``. Dots with an explicit
    ``out_sharding`` are left alone.
    """

    def folded(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        closed = closed.replace(jaxpr=_fold_jaxpr(closed.jaxpr))
        out = jex_core.jaxpr_as_fun(closed)(*jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), out)

    return folded


def linearize(fn: Callable[..., Any], *primals, has_aux: bool = False):
    """``jax.linearize(fn, *primals, has_aux=has_aux)`` whose linear map reads an unrolled layer
    scan's residuals layer by layer: the same outputs, for a map applied many times in a loop
    (Lanczos, CG, Hutchinson probes).

    Why: partial evaluation of ``lax.scan`` (the model's layer loop, unrolled up to 8 layers,
    ``transformer.unrolls``) stacks each residual over the layers ([L, ...]) and the linear map's
    scan takes layer i's slice of each. Inside one program XLA folds those slices into the stack's
    producer; when the map runs in a ``while`` / ``scan`` body the stacks are loop constants and
    every product copies every layer's slice out of them (XLA:CPU: 395 of 5170 op-ms of 4 chained
    products at the bench's hidden 512, against 31 of 1859 for one). Here each such residual is
    unstacked once, outside any loop, and the linear map re-stacks the pieces (``jnp.stack``)
    right before its scan slices them; XLA's simplifier cancels a slice of a concatenate that is
    exactly one of its pieces, so the loop reads each layer's residual in place (our reading of
    the profile of the same 4 products: slices 77 op-ms; wall time 0.92-0.99x in turns over four
    runs, one product 0.98-1.0x; the bench's simu_newton step: 10.8x the SO step, 11.8x before).

    Only constants whose every use is a stacked input (``xs``) of a fully unrolled scan of the
    linear map are split: a rolled scan slices its inputs with a dynamic index in a loop, which
    XLA cannot cancel against a concatenate, so it would copy a re-stacked array per product. The
    constants are those ``jax.closure_convert`` hoists, i.e. traced values: under ``jax.jit``
    (outside it the map is returned as ``jax.linearize`` gives it).
    """
    out = jax.linearize(fn, *primals, has_aux=has_aux)
    return (out[0], _per_layer_residuals(out[1], primals), *out[2:])


def _per_layer_residuals(linear_fn: Callable[..., Any], primals: tuple) -> Callable[..., Any]:
    if not all(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(primals)):
        return linear_fn  # integer primals take float0 tangents: the primals are no example of them
    converted, consts = jax.closure_convert(linear_fn, *primals)
    if not consts:
        return linear_fn
    jaxpr = jax.make_jaxpr(converted)(*primals, *consts).jaxpr
    const_vars = jaxpr.invars[len(jaxpr.invars) - len(consts):]
    split = _unrolled_scan_inputs(jaxpr, const_vars)
    if not split:
        return linear_fn
    pieces = [list(jnp.unstack(c)) if i in split else c for i, c in enumerate(consts)]

    def linear_map(*tangents):
        return converted(*tangents, *[jnp.stack(c) if i in split else c for i, c in enumerate(pieces)])

    return linear_map


def _unrolled_scan_inputs(jaxpr, candidates) -> set[int]:
    """Indices into ``candidates`` (variables of ``jaxpr``) of those used only as stacked inputs
    of fully unrolled ``scan`` equations at the top level of ``jaxpr``."""
    index = {v: i for i, v in enumerate(candidates)}
    ok, bad = set(), set()
    for e in jaxpr.eqns:
        unrolled_scan = e.primitive.name == "scan" and e.params["unroll"] >= e.params["length"] > 1
        first_x = e.params["num_consts"] + e.params["num_carry"] if unrolled_scan else len(e.invars)
        for pos, v in enumerate(e.invars):
            if isinstance(v, jex_core.Var) and v in index:
                (ok if pos >= first_x else bad).add(index[v])
    bad |= {index[v] for v in jaxpr.outvars if isinstance(v, jex_core.Var) and v in index}
    return ok - bad


def _swapped_dot_permutation(dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> tuple[int, ...]:
    """The permutation of ``dot_general(a, b)``'s output ([batch, a free, b free]) that gives
    ``dot_general(b, a)``'s ([batch, b free, a free])."""
    (lc, _), (lb, _) = dimension_numbers
    nb = len(lb)
    a_free, b_free = lhs_ndim - len(lc) - nb, rhs_ndim - len(lc) - nb
    return tuple(range(nb)) + tuple(range(nb + a_free, nb + a_free + b_free)) + tuple(range(nb, nb + a_free))


def _fold_sub(x):
    if isinstance(x, jex_core.ClosedJaxpr):
        return x.replace(jaxpr=_fold_jaxpr(x.jaxpr))
    if isinstance(x, jex_core.Jaxpr):
        return _fold_jaxpr(x)
    if isinstance(x, tuple) and x and all(isinstance(y, (jex_core.ClosedJaxpr, jex_core.Jaxpr)) for y in x):
        return tuple(_fold_sub(y) for y in x)
    return x


def _fold_jaxpr(jaxpr):
    uses: dict = {}
    for v in [v for e in jaxpr.eqns for v in e.invars] + list(jaxpr.outvars):
        if isinstance(v, jex_core.Var):
            uses[v] = uses.get(v, 0) + 1
    producer = {v: i for i, e in enumerate(jaxpr.eqns) for v in e.outvars}
    eqns, folded = list(jaxpr.eqns), set()
    for i, e in enumerate(eqns):
        params = {k: _fold_sub(v) for k, v in e.params.items()}
        if any(params[k] is not e.params[k] for k in params):
            eqns[i] = e = e.replace(params=params)
        x = e.invars[0] if e.primitive.name == "transpose" else None
        j = producer.get(x) if isinstance(x, jex_core.Var) and uses.get(x) == 1 else None
        if j is None or eqns[j].primitive.name != "dot_general" or eqns[j].params.get("out_sharding") is not None:
            continue
        dot = eqns[j]
        a, b = dot.invars
        dims = dot.params["dimension_numbers"]
        if tuple(e.params["permutation"]) != _swapped_dot_permutation(dims, np.ndim(a.aval), np.ndim(b.aval)):
            continue
        (lc, rc), (lb, rb) = dims
        eqns[i] = dot.replace(invars=[b, a], outvars=e.outvars,
                              params={**dot.params, "dimension_numbers": ((rc, lc), (rb, lb))})
        folded.add(j)
    return jaxpr.replace(eqns=[e for k, e in enumerate(eqns) if k not in folded])


def hvp(f: Callable[..., jax.Array], params: PyTree, v: PyTree, *args) -> PyTree:
    """Exact Hessian-vector product ``H(params) v`` of the scalar ``f(params, *args)``.

    Forward-over-reverse: ``d/dt grad f(params + t v) |_{t=0}``, i.e.
    ``jax.jvp(grad f, (params,), (v,))`` (the gradient map with :func:`fold_transposed_dots`).
    Costs the gradient plus its tangent (XLA counts 3x the gradient's matmul flops).
    ``v`` must have the structure and dtypes of ``params``.
    """
    return jax.jvp(fold_transposed_dots(lambda p: jax.grad(f)(p, *args)), (params,), (v,))[1]


def ggn_vp(
    logits_fn: Callable[[PyTree], jax.Array],
    loss_of_logits: Callable[[jax.Array], jax.Array],
    params: PyTree,
    v: PyTree,
) -> PyTree:
    """Generalized Gauss-Newton product ``G v = J^T H_L J v``.

    ``J`` is the Jacobian of ``logits_fn`` at ``params`` and ``H_L`` the Hessian of
    ``loss_of_logits`` at ``z = logits_fn(params)``. One linearization of the model
    (forward pass), its transpose for ``J^T``, and an exact HVP in logit space.
    For a softmax cross entropy ``H_L`` is PSD, hence so is ``G``.
    """
    z, j_fn = jax.linearize(logits_fn, params)  # z, v -> J v
    jv = j_fn(v)
    hjv = hvp(loss_of_logits, z, jv)  # H_L (J v)
    (g,) = jax.linear_transpose(j_fn, params)(hjv)  # J^T H_L J v
    return g


# ----------------------------------------------------------------------------
# Diagonal curvature estimators (Sophia's h_hat)
# ----------------------------------------------------------------------------


def rademacher_like(key: jax.Array, tree: PyTree, shardings: Optional[PyTree] = None) -> PyTree:
    """Rademacher (+-1) probes with each leaf's shape and dtype.

    One key per leaf (``optax.tree_utils.tree_random_like``, which also passes
    the leaf's sharding as ``out_sharding`` where the sampler accepts it; that only
    helps under Explicit mesh axes, where the sharding is part of the type).
    ``shardings`` (a tree like ``tree`` of ``jax.sharding.Sharding``, or None leaves):
    inside ``jit`` on an Auto-axes mesh the probes are pinned to them with
    ``with_sharding_constraint``, so they are generated sharded (with
    ``jax_threefry_partitionable``, on by default, each device computes only its own
    random bits and they do not depend on the layout) rather than left to propagation.
    """
    u = otu.tree_random_like(key, tree, sampler=jax.random.rademacher)
    return constrain(u, shardings)


def constrain(tree: PyTree, shardings: Optional[PyTree]) -> PyTree:
    """``with_sharding_constraint`` leaf by leaf (None: no constraint, for the tree or a leaf)."""
    if shardings is None:
        return tree
    return jax.tree.map(lambda s, x: x if s is None else jax.lax.with_sharding_constraint(x, s), shardings, tree,
                        is_leaf=lambda s: s is None)


def hutchinson_diagonal(
    f: Callable[..., jax.Array], params: PyTree, key: jax.Array, num_probes: int = 1, *args,
    shardings: Optional[PyTree] = None,
) -> PyTree:
    """Hutchinson estimate of ``diag(H)``: mean over probes of ``u * (H u)`` (Sophia-H).

    ``u`` is Rademacher, so ``E[u_i (H u)_i] = H_ii`` and the variance of one probe
    in coordinate i is ``sum_{j != i} H_ij^2``: the error falls like
    ``1/sqrt(num_probes)``. One probe is one forward-over-reverse ``jax.jvp``; more
    linearize the gradient map once and each probe costs one linear HVP, summed
    sequentially (``lax.scan``), so memory does not grow with ``num_probes``
    (:func:`grad_and_hutchinson`, whose gradient this discards). Returns float32 (float64
    for f64 params).
    The estimate may be negative: Sophia's ``max(rho*h, eps)`` handles that.

    Scale: the diagonal of the Hessian of ``f`` itself; for a mean loss (the unlearning
    losses are token or sequence means) that is already per-token / per-sequence, so Sophia
    takes it with ``batch_scale=1`` (docs/method.md#curvature-estimators).
    :func:`grad_and_hutchinson` returns the gradient from the same linearization.

    ``shardings``: the params' shardings (a tree like ``params``; see
    :func:`rademacher_like`). The probe ``u`` (the HVP's tangent), ``H u`` and the
    running sum are constrained to them, so on a mesh nothing probe-sized is replicated.
    """
    return grad_and_hutchinson(f, params, key, num_probes, *args, shardings=shardings)[2]


def grad_and_hutchinson(
    f: Callable[..., Any], params: PyTree, key: jax.Array, num_probes: int = 1, *args, has_aux: bool = False,
    shardings: Optional[PyTree] = None,
) -> tuple[PyTree, Any, PyTree]:
    """``(grad, aux, h_hat)`` from ONE forward-over-reverse pass of the gradient map (Sophia-H's step).

    The gradient is the primal output of differentiating the gradient map, so a Hutchinson
    curvature step costs no separate gradient pass. One probe (Sophia-H's default): one
    ``jax.jvp`` of the gradient map in the probe's direction gives ``g`` and ``H u`` together
    (no stored linearization, no loop).
    ``num_probes > 1``: ``jax.linearize`` once, then one linear HVP per probe
    (:func:`hutchinson_from_hvp`). The gradient map is :func:`fold_transposed_dots`'d.
    ``f(params, *args)`` returns a scalar, or ``(scalar, aux)`` with ``has_aux`` (``aux`` is
    returned, not differentiated; None without). The probes are those of
    :func:`hutchinson_from_hvp` for the same key, so ``h_hat`` does not depend on the path.
    """
    grad_map = fold_transposed_dots(lambda p: jax.grad(f, has_aux=has_aux)(p, *args))
    if num_probes == 1:
        u = rademacher_like(jax.random.split(key, 1)[0], params, shardings)
        if has_aux:
            grads, hu, aux = jax.jvp(grad_map, (params,), (u,), has_aux=True)
        else:
            (grads, hu), aux = jax.jvp(grad_map, (params,), (u,)), None
        dtype = _tree_acc_dtype(params)
        hu = constrain(hu, shardings)
        return grads, aux, constrain(jax.tree.map(lambda a, b: a.astype(dtype) * b.astype(dtype), u, hu), shardings)
    if has_aux:
        grads, hvp_lin, aux = linearize(grad_map, params, has_aux=True)
    else:
        (grads, hvp_lin), aux = linearize(grad_map, params), None
    return grads, aux, hutchinson_from_hvp(hvp_lin, params, key, num_probes, shardings=shardings)


def hutchinson_from_hvp(
    hvp_lin: Callable[[PyTree], PyTree], params: PyTree, key: jax.Array, num_probes: int = 1,
    shardings: Optional[PyTree] = None,
) -> PyTree:
    """Mean over ``num_probes`` Rademacher probes ``u`` of ``u * hvp_lin(u)`` (``lax.scan``);
    ``hvp_lin`` is a linear ``v -> H v`` (e.g. from ``jax.linearize`` of the gradient map)."""
    dtype = _tree_acc_dtype(params)

    def body(total, k):
        u = rademacher_like(k, params, shardings)
        hu = constrain(hvp_lin(u), shardings)
        total = jax.tree.map(lambda t, a, b: t + a.astype(dtype) * b.astype(dtype), total, u, hu)
        return constrain(total, shardings), None

    zeros = constrain(jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), dtype), params), shardings)
    total, _ = jax.lax.scan(body, zeros, jax.random.split(key, num_probes))
    return jax.tree.map(lambda t: t / num_probes, total)


def gnb_diagonal(
    logits_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    weights: Optional[jax.Array] = None,
    *,
    scale_by_tokens: bool = True,
) -> PyTree:
    """Gauss-Newton-Bartlett estimate of ``diag(G)`` (Sophia-G, Liu et al. 2023, Alg. 2).

    ``logits_fn(params)`` returns logits ``[..., V]``; ``weights`` (shape ``[...]``,
    e.g. the answer-token mask) selects the tokens. What we do, exactly:

    1. sample ``y_b ~ softmax(z_b)`` per token with ``jax.random.categorical`` on
       ``stop_gradient(z)`` (labels are integers: nothing flows through them);
    2. ``L_hat = sum_b w_b CE(z_b, y_b) / B`` with ``B = sum_b w_b`` (the mean CE over
       the weighted tokens; ``B`` = number of tokens when ``weights`` is None);
    3. return ``B * grad(L_hat) ** 2`` (float32).

    Why ``B``: with ``g = (1/B) sum_b w_b J_b^T (p_b - e_{y_b})`` and independent
    labels, ``E[g g^T] = (1/B^2) sum_b w_b^2 J_b^T (diag p_b - p_b p_b^T) J_b``, so for
    0/1 weights ``B * E[g*g] = diag((1/B) sum_b w_b J_b^T H_b J_b)``: the Gauss-Newton
    diagonal of the weighted-mean CE (what the tests check). Weights are meant to be
    0/1; fractional weights give a biased estimate.

    The SophiaG reference code (``Liuhong99/Sophia``, ``train_sophiag.py`` +
    ``SophiaG.update_hessian``) stores the EMA of the plain ``g*g`` and puts the
    token count into the step instead (``rho * bs * h`` with ``bs`` = tokens per
    step). ``scale_by_tokens=False`` returns that plain ``g*g``; then pass the
    token count as ``sophia(batch_scale=...)``. The two agree when the curvature
    batch has ``bs`` tokens.

    Scale: with ``scale_by_tokens`` (the default) the result estimates the Gauss-Newton
    diagonal of the *mean* CE, the token count is already in it, so Sophia takes it with
    ``batch_scale=1``; a further ``batch_scale`` (e.g. SOUL's 5120) scales it twice
    (docs/method.md#curvature-estimators; ``optim.OptimSpec.check`` refuses that).
    """
    def sampled_loss(p):
        z = logits_fn(p).astype(_tree_acc_dtype(p))
        y = jax.random.categorical(key, jax.lax.stop_gradient(z), axis=-1)
        ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
        if weights is None:
            count = jnp.asarray(ce.size, ce.dtype)
            return jnp.mean(ce), count
        w = jnp.asarray(weights, ce.dtype)
        count = jnp.sum(w)
        return jnp.sum(w * ce) / jnp.maximum(count, 1.0), count

    g, count = jax.grad(sampled_loss, has_aux=True)(params)
    dtype = _tree_acc_dtype(params)
    scale = count.astype(dtype) if scale_by_tokens else jnp.asarray(1.0, dtype)
    return jax.tree.map(lambda x: scale * jnp.square(x.astype(dtype)), g)


def fisher_diagonal(grads: PyTree) -> PyTree:
    """Empirical Fisher diagonal ``g * g`` (float32; what the SOUL code feeds Sophia).

    Scale: ``g`` is the gradient of a mean loss, so ``g*g`` is about ``1/N`` of the per-example
    Fisher (N examples or tokens in the mean): it needs the batch constant, SOUL/SophiaG's
    ``bs`` = 5120 (``sophia(batch_scale=...)``; SOUL ``src/optim/sophia.py:85``)."""
    return jax.tree.map(lambda g: jnp.square(g.astype(acc_dtype(g.dtype))), grads)


# ----------------------------------------------------------------------------
# Conjugate gradients
# ----------------------------------------------------------------------------


class CGInfo(NamedTuple):
    iterations: jax.Array  # completed CG updates
    residual_norm: jax.Array  # ||b - (A + damping I) x||, recursively updated
    converged: jax.Array  # residual_norm <= max(tol * ||b||, atol)
    negative_curvature: jax.Array  # stopped on p^T (A + damping I) p <= 0


def conjugate_gradient(
    matvec: Callable[[PyTree], PyTree],
    b: PyTree,
    x0: Optional[PyTree] = None,
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
    atol: float = 0.0,
) -> tuple[PyTree, CGInfo]:
    """Solve ``(A + damping I) x = b`` by conjugate gradients on pytrees.

    ``matvec(v) = A v`` must be symmetric; CG needs ``A + damping I`` positive
    definite. Stops when ``||r|| <= max(tol * ||b||, atol)`` (relative tolerance
    like scipy's ``rtol``), after ``maxiter`` updates (default: the number of
    unknowns, where exact arithmetic converges), or -- for an indefinite operator,
    e.g. the Hessian of a nonconvex loss -- on the first direction with
    ``p^T (A + damping I) p <= 0``; then the current iterate is returned and
    ``info.negative_curvature`` is set (truncated CG, as in Newton-CG).

    Iteration (Hestenes-Stiefel): ``alpha = r.r / p.Ap``, ``x += alpha p``,
    ``r -= alpha Ap``, ``p = r_new + (r_new.r_new / r.r) p``. Runs in a
    ``lax.while_loop``. The iterates are kept in float32 (float64 for f64 inputs),
    so ``x`` is float32 for a bf16 ``b``; ``matvec`` is called with ``b``'s dtypes.
    """
    # Iterate in float32 (float64 for f64 inputs); matvec sees b's own dtypes.
    b_in = b
    b = to_acc_dtype(b)

    def op(v):
        av = to_acc_dtype(matvec(_cast_tree(v, b_in)))
        return tree_add_scale(av, damping, v) if damping else av

    if x0 is not None:
        x0 = to_acc_dtype(x0)
    if x0 is None:
        x0 = otu.tree_zeros_like(b)
        r0 = b
    else:
        r0 = otu.tree_sub(b, op(x0))
    if maxiter is None:
        maxiter = otu.tree_size(b)

    threshold = jnp.maximum(tol * tree_norm(b), atol)
    rs0 = tree_vdot(r0, r0)

    def cond(carry):
        k, _, _, _, rs, neg = carry
        return (k < maxiter) & (rs > threshold**2) & ~neg

    def body(carry):
        k, x, r, p, rs, _ = carry
        ap = op(p)
        pap = tree_vdot(p, ap)
        neg = ~(pap > 0)  # also catches NaN
        alpha = jnp.where(neg, 0.0, rs / jnp.where(neg, 1.0, pap))
        x_new = tree_add_scale(x, alpha, p)
        r_new = tree_add_scale(r, -alpha, ap)
        rs_new = tree_vdot(r_new, r_new)
        p_new = tree_add_scale(r_new, rs_new / rs, p)
        keep = lambda new, old: otu.tree_where(neg, old, new)  # noqa: E731
        return (
            k + jnp.where(neg, 0, 1),
            keep(x_new, x),
            keep(r_new, r),
            keep(p_new, p),
            jnp.where(neg, rs, rs_new),
            neg,
        )

    init = (jnp.asarray(0, jnp.int32), x0, r0, r0, rs0, jnp.asarray(False))
    k, x, _, _, rs, neg = jax.lax.while_loop(cond, body, init)
    res = jnp.sqrt(rs)
    return x, CGInfo(iterations=k, residual_norm=res, converged=res <= threshold, negative_curvature=neg)


# ----------------------------------------------------------------------------
# Lanczos
# ----------------------------------------------------------------------------


class LanczosResult(NamedTuple):
    ritz_values: jax.Array  # [num_iters] eigenvalues of T, ascending
    min_eigenvalue: jax.Array  # smallest Ritz value (upper bound on lambda_min(A))
    max_eigenvalue: jax.Array  # largest Ritz value (lower bound on lambda_max(A))
    alphas: jax.Array  # diagonal of T
    betas: jax.Array  # off-diagonal of T
    num_valid: jax.Array  # Krylov dimension reached (< num_iters after breakdown)
    # with reorthogonalize: the Lanczos vectors as rows, [num_iters, n] (rows >= num_valid are 0),
    # and beta_next = ||w|| of the last residual, A V^T = V^T T + beta_next v_next e_k^T
    basis: Optional[jax.Array] = None
    beta_next: Optional[jax.Array] = None


def lanczos(
    matvec: Callable[[PyTree], PyTree],
    v0: PyTree,
    num_iters: int,
    reorthogonalize: bool = True,
) -> LanczosResult:
    """Lanczos tridiagonalization ``V^T A V = T``; Ritz values = ``eigh(T)``.

    Works on ``ravel_pytree(v0)``; ``matvec`` sees pytrees shaped like ``v0``.
    With ``reorthogonalize`` every new vector is Gram-Schmidt'ed (twice) against
    all previous ones: memory ``num_iters x n`` but no ghost eigenvalues. Without
    it only two vectors are kept (cheap, but duplicate Ritz values may appear).

    The extreme Ritz values converge first to the extreme eigenvalues of ``A``
    (and bound them: ``min_eigenvalue >= lambda_min``, ``max_eigenvalue <=
    lambda_max``). On breakdown (the Krylov space is invariant, ``beta ~ 0``) the
    loop stops; the unused rows of ``T`` are decoupled and filled with
    ``alpha_0 = v0^T A v0 / |v0|^2``, which lies inside the Ritz range, so the
    extremes are unaffected (``ritz_values`` then repeats ``alpha_0``).
    """
    flat0, unravel = ravel_pytree(v0)
    in_dtype = flat0.dtype
    dtype = acc_dtype(in_dtype)
    n = flat0.shape[0]
    m = int(num_iters)
    if m < 1:
        raise ValueError("num_iters must be >= 1")
    breakdown_tol = 100 * jnp.finfo(dtype).eps

    def mv(x):
        out, _ = ravel_pytree(matvec(unravel(x.astype(in_dtype))))
        return out.astype(dtype)

    def orth(w, basis):  # classical Gram-Schmidt, twice ("twice is enough")
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        return w

    v = flat0.astype(dtype)
    v = v / jnp.linalg.norm(v)
    w = mv(v)
    alpha0 = jnp.vdot(v, w)
    w = w - alpha0 * v
    basis = jnp.zeros((m, n), dtype).at[0].set(v) if reorthogonalize else None
    if reorthogonalize:
        w = orth(w, basis)
    alphas = jnp.full((m,), alpha0, dtype)
    betas = jnp.zeros((max(m - 1, 0),), dtype)
    scale = jnp.abs(alpha0)

    def cond(c):
        j, done = c[0], c[-1]
        return (j < m) & ~done

    def body(c):
        j, v_prev, v, w, alphas, betas, basis, scale, _ = c
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, beta)
        broke = beta <= breakdown_tol * scale
        v_new = w / jnp.where(broke, 1.0, beta)
        w_new = mv(v_new) - beta * v
        alpha = jnp.vdot(v_new, w_new)
        w_new = w_new - alpha * v_new
        if reorthogonalize:
            basis_new = basis.at[j].set(v_new)
            w_new = orth(w_new, basis_new)
            basis = jnp.where(broke, basis, basis_new)
        scale = jnp.maximum(scale, jnp.abs(alpha))
        alphas = jnp.where(broke, alphas, alphas.at[j].set(alpha))
        betas = jnp.where(broke, betas, betas.at[j - 1].set(beta))
        return (j + jnp.where(broke, 0, 1), v, v_new, w_new, alphas, betas, basis, scale, broke)

    init = (jnp.asarray(1, jnp.int32), jnp.zeros_like(v), v, w, alphas, betas, basis, scale, jnp.asarray(False))
    if m > 1:
        j, _, _, w, alphas, betas, basis, _, broke = jax.lax.while_loop(cond, body, init)
    else:  # one vector: T = [alpha_0] (the body, indexing betas, is not even traced)
        j, _, _, w, alphas, betas, basis, _, broke = init

    ritz = jnp.linalg.eigh(_tridiagonal(alphas, betas))[0]
    return LanczosResult(
        ritz_values=ritz,
        min_eigenvalue=ritz[0],
        max_eigenvalue=ritz[-1],
        alphas=alphas,
        betas=betas,
        num_valid=j,
        basis=basis,
        beta_next=jnp.where(broke, 0.0, jnp.linalg.norm(w)),
    )


# ----------------------------------------------------------------------------
# Exact Hessian on a few coordinates
# ----------------------------------------------------------------------------


def hessian_rows(f, params, indices, args=(), batch_size=8):
    """``(rows, indices)``: rows ``H[indices, :]`` of the Hessian of ``f(params, *args)`` (flat
    coordinates), from HVPs with one-hot vectors, ``batch_size`` at a time."""
    flat, unravel = ravel_pytree(params)
    indices = jnp.asarray(indices, jnp.int32)
    k = indices.shape[0]
    onehots = jnp.zeros((k, flat.shape[0]), flat.dtype).at[jnp.arange(k), indices].set(1)

    def row(e):  # H e_i = column i = row i (H symmetric)
        return ravel_pytree(hvp(f, params, unravel(e), *args))[0]

    rows = jax.lax.map(row, onehots, batch_size=batch_size) if batch_size else jax.vmap(row)(onehots)
    return rows, indices


def dense_hessian(f, params: PyTree, indices, *args, batch_size: Optional[int] = None) -> jax.Array:
    """Exact Hessian of ``f(params, *args)`` restricted to flat coordinates ``indices``.

    Flat coordinates index ``ravel_pytree(params)[0]``. Returns ``H[indices][:,
    indices]`` of shape ``[k, k]``, built from ``k`` exact HVPs with one-hot vectors
    (vmapped, or ``lax.map`` in chunks of ``batch_size`` to bound memory).
    """
    rows, indices = hessian_rows(f, params, indices, args, batch_size)
    return rows[:, indices]


def hessian_diagonal_exact(f, params: PyTree, indices, *args, batch_size: Optional[int] = None) -> jax.Array:
    """Exact ``H_ii`` for the flat coordinates ``indices`` (shape ``[k]``)."""
    rows, indices = hessian_rows(f, params, indices, args, batch_size)
    return rows[jnp.arange(indices.shape[0]), indices]


# ----------------------------------------------------------------------------
# Trust-region subproblem: Steihaug-Toint CG; the linearized Gauss-Newton operator
# ----------------------------------------------------------------------------

# exit codes of steihaug_cg (logged as newton/cg_exit; docs/method.md#newton)
CG_CONVERGED = 0  # ||r|| <= max(tol * ||g||, atol): an interior (inexact) Newton step
CG_NEGATIVE_CURVATURE = 1  # d^T B d <= 0: followed d to the trust-region boundary
CG_BOUNDARY = 2  # the next iterate would leave the region: stopped on the boundary
CG_MAX_ITERATIONS = 3  # maxiter directions done, still inside


class SteihaugInfo(NamedTuple):
    iterations: jax.Array  # CG directions processed (= products with B), the one that ended the run included
    exit_code: jax.Array  # int32, CG_CONVERGED | CG_NEGATIVE_CURVATURE | CG_BOUNDARY | CG_MAX_ITERATIONS
    residual_norm: jax.Array  # ||g + B p|| at the returned p (recursively updated)
    step_norm: jax.Array  # ||p||
    model_value: jax.Array  # m(p) - m(0) = g.p + p.B p / 2, B the (damped) operator CG used


def steihaug_cg(
    matvec: Callable[[PyTree], PyTree],
    g: PyTree,
    radius,
    damping: float = 0.0,
    tol: float = 1e-6,
    maxiter: Optional[int] = None,
    atol: float = 0.0,
) -> tuple[PyTree, SteihaugInfo]:
    """Approximately minimize ``m(p) = g.p + p.B p / 2`` subject to ``||p|| <= radius``.

    ``B = A + damping I`` with ``matvec(v) = A v`` symmetric, possibly indefinite.
    CG-Steihaug, Nocedal & Wright, *Numerical Optimization* (2nd ed.), Algorithm 7.2, as
    stated there (z_0 = 0, r_0 = g, d_0 = -r_0):

    * if ``d_j.B d_j <= 0`` (negative curvature): return ``p = z_j + tau d_j`` with ``tau``
      the root of ``||z_j + tau d_j|| = radius`` that minimizes ``m`` (of the two roots,
      the one with the lower model value; exit ``CG_NEGATIVE_CURVATURE``);
    * ``alpha_j = r_j.r_j / d_j.B d_j``, ``z_{j+1} = z_j + alpha_j d_j``; if
      ``||z_{j+1}|| >= radius``: return ``p = z_j + tau d_j``, ``tau >= 0`` on the boundary
      (exit ``CG_BOUNDARY``);
    * ``r_{j+1} = r_j + alpha_j B d_j``; if ``||r_{j+1}|| <= max(tol ||g||, atol)``: return
      ``z_{j+1}`` (exit ``CG_CONVERGED``);
    * ``d_{j+1} = -r_{j+1} + (r_{j+1}.r_{j+1} / r_j.r_j) d_j``.

    After ``maxiter`` directions the last iterate is returned (``CG_MAX_ITERATIONS``).
    ``g = 0`` returns ``p = 0`` with 0 iterations, exit ``CG_CONVERGED``. The first iterate
    is the Cauchy point and ``m`` decreases monotonically along the iterates (N&W Thm 7.3),
    so ``m(p) <= m(p_Cauchy)``. ``r = g + B z`` is carried along, so ``B p = r - g`` gives the
    model value without an extra product. Runs in a ``lax.while_loop``; iterates in float32
    (float64 for f64 ``g``); ``matvec`` sees ``g``'s own dtypes.
    """
    g_in = g
    g = to_acc_dtype(g)
    dtype = _tree_acc_dtype(g)

    def op(v):  # damping may be traced (a trust-region / Levenberg-Marquardt state)
        av = to_acc_dtype(matvec(_cast_tree(v, g_in)))
        return av if isinstance(damping, (int, float)) and damping == 0 else tree_add_scale(av, damping, v)

    if maxiter is None:
        maxiter = otu.tree_size(g)
    radius = jnp.asarray(radius, dtype)
    gnorm = tree_norm(g)
    threshold = jnp.maximum(tol * gnorm, atol)
    rr0 = tree_vdot(g, g)
    running = jnp.asarray(-1, jnp.int32)

    def cond(c):
        j, _, _, _, _, code = c
        return (code == running) & (j < maxiter)

    def body(c):
        j, z, r, d, rr, _ = c
        bd = op(d)
        dbd = tree_vdot(d, bd)
        neg = ~(dbd > 0)  # also catches NaN
        # the two roots of ||z + tau d|| = radius (tau_neg <= 0 <= tau_pos while ||z|| <= radius)
        zd, dd, zz = tree_vdot(z, d), tree_vdot(d, d), tree_vdot(z, z)
        dd_safe = jnp.where(dd > 0, dd, 1.0)
        disc = jnp.sqrt(jnp.maximum(zd * zd + dd * (radius * radius - zz), 0.0))
        tau_pos, tau_neg = (-zd + disc) / dd_safe, (-zd - disc) / dd_safe
        rd = tree_vdot(r, d)  # m(z + tau d) - m(z) = tau r.d + tau^2 d.Bd / 2
        q = lambda t: t * rd + 0.5 * t * t * dbd  # noqa: E731
        tau_nc = jnp.where(q(tau_neg) < q(tau_pos), tau_neg, tau_pos)
        alpha = rr / jnp.where(neg, 1.0, dbd)
        z_try = tree_add_scale(z, alpha, d)
        cross = ~neg & (tree_norm(z_try) >= radius)
        step = jnp.where(neg, tau_nc, jnp.where(cross, tau_pos, alpha))
        z_new = tree_add_scale(z, step, d)
        r_new = tree_add_scale(r, step, bd)  # g + B z_new, by linearity
        rr_new = tree_vdot(r_new, r_new)
        conv = jnp.sqrt(rr_new) <= threshold
        code = jnp.where(neg, CG_NEGATIVE_CURVATURE,
                         jnp.where(cross, CG_BOUNDARY, jnp.where(conv, CG_CONVERGED, running))).astype(jnp.int32)
        beta = rr_new / jnp.where(rr > 0, rr, 1.0)
        d_new = tree_add_scale(otu.tree_scale(-1.0, r_new), beta, d)
        return j + 1, z_new, r_new, d_new, rr_new, code

    code0 = jnp.where(jnp.sqrt(rr0) <= threshold, CG_CONVERGED, running).astype(jnp.int32)
    init = (jnp.asarray(0, jnp.int32), otu.tree_zeros_like(g), g, otu.tree_scale(-1.0, g), rr0, code0)
    j, p, r, _, rr, code = jax.lax.while_loop(cond, body, init)
    code = jnp.where(code == running, CG_MAX_ITERATIONS, code).astype(jnp.int32)
    model = 0.5 * (tree_vdot(g, p) + tree_vdot(p, r))  # g.p + p.(r - g)/2, B p = r - g
    return p, SteihaugInfo(iterations=j, exit_code=code, residual_norm=jnp.sqrt(rr), step_norm=tree_norm(p),
                           model_value=model)



def tridiagonal_trust_region(alphas: jax.Array, betas: jax.Array, gamma, radius, damping=0.0,
                             num_valid=None, bisection_iters: int = 100):
    """Exact solution of ``min_h gamma h_0 + h.(T + damping I) h / 2`` s.t. ``||h|| <= radius``.

    ``T`` is the symmetric tridiagonal ``diag(alphas) + diag(betas, +-1)`` (k x k, possibly
    indefinite; rows ``>= num_valid`` are ignored). The global minimizer (More & Sorensen 1983;
    Nocedal & Wright Thm 4.1) is ``h = -(T + (damping + sigma) I)^-1 gamma e_0`` with
    ``sigma >= max(0, -lambda_min(T + damping I))`` and ``sigma (radius - ||h||) = 0``. With
    ``T = U diag(theta) U^T`` and ``c = gamma U^T e_0``: ``h(sigma) = -U c / (theta + damping +
    sigma)``; ``||h(sigma)||`` decreases on ``(-lambda_min, inf)``, so the boundary ``sigma`` is
    found by bisection on ``[max(0, -mu_min), max(0, -mu_min) + |c| / radius]`` (where
    ``||h|| <= radius``). Hard case (``c`` has no component on the lowest eigenvector, so
    ``||h|| < radius`` at ``sigma = -mu_min``): ``h`` plus a multiple of that eigenvector up to the
    boundary. Returns ``(h, sigma, model_value, boundary, min_eigenvalue)``, ``model_value`` =
    the objective at ``h`` (``<= 0``), ``min_eigenvalue`` of ``T + damping I`` (valid rows).
    """
    dtype = alphas.dtype
    big = 10.0 * (jnp.max(jnp.abs(alphas)) + 2.0 * jnp.max(jnp.abs(betas), initial=0.0) + jnp.abs(damping) + 1.0)
    # decoupled invalid rows: eigenvalues far above the rest, and c = 0 there
    theta, u = jnp.linalg.eigh(_tridiagonal(alphas, betas, num_valid, fill=big))
    mu = theta + damping
    c = gamma * u[0, :]
    mu_min = mu[0]
    radius = jnp.asarray(radius, dtype)

    def norm_at(sigma):
        den = mu + sigma
        y = jnp.where(den > 0, -c / jnp.where(den > 0, den, 1.0), 0.0)
        return jnp.linalg.norm(y), y

    interior_ok = mu_min > 0
    n0, y0 = norm_at(0.0)
    interior = interior_ok & (n0 <= radius)
    lo = jnp.maximum(0.0, -mu_min)
    hi = lo + jnp.linalg.norm(c) / radius + jnp.finfo(dtype).tiny

    def bisect(_, bounds):
        a, b = bounds
        mid = 0.5 * (a + b)
        too_long = norm_at(mid)[0] > radius
        return jnp.where(too_long, mid, a), jnp.where(too_long, b, mid)

    _, sigma_b = jax.lax.fori_loop(0, bisection_iters, bisect, (lo, hi))
    nb, yb = norm_at(sigma_b)
    # hard case: even at sigma -> -mu_min the step is shorter than the radius; the lowest
    # eigenvector's slot (den = 0 there, y = 0) takes the remaining length
    hard = (nb < radius * (1 - 1e-3)) & (sigma_b <= lo * (1 + 1e-6) + jnp.finfo(dtype).tiny)
    tau = jnp.sqrt(jnp.maximum(radius * radius - nb * nb, 0.0))
    yb = jnp.where(hard, yb.at[0].add(tau), yb)
    y = jnp.where(interior, y0, yb)
    sigma = jnp.where(interior, 0.0, sigma_b)
    model = jnp.vdot(c, y) + 0.5 * jnp.vdot(y, mu * y)
    return u @ y, sigma, model, ~interior, mu_min


def _tridiagonal(alphas, betas, num_valid=None, fill=0.0):
    """``diag(alphas) + diag(betas, +-1)``, rows ``>= num_valid`` decoupled with ``fill`` on the diagonal."""
    k = alphas.shape[0]
    valid = jnp.arange(k) < (k if num_valid is None else num_valid)
    tri = jnp.diag(jnp.where(valid, alphas, fill))
    if k > 1:
        off = jnp.where(valid[1:], betas, 0.0)
        tri = tri + jnp.diag(off, 1) + jnp.diag(off, -1)
    return tri


def _krylov_step(matvec, g, num_iters, tol, solve) -> tuple[PyTree, SteihaugInfo]:
    """Lanczos from ``g`` (full reorthogonalization); ``solve(lanczos_result, |g|)`` gives the small
    problem's ``(h, on_boundary, model_value, lambda_min of T + damping)``; ``p = V^T h`` back in
    ``g``'s pytree shape (float32 / float64) and the :class:`SteihaugInfo` of the two Krylov
    solvers (exit codes and residual as documented in :func:`lanczos_trust_region`)."""
    g_acc = to_acc_dtype(g)
    flat, unravel = ravel_pytree(g_acc)
    res = lanczos(lambda v: matvec(_cast_tree(v, g)), g_acc, num_iters, reorthogonalize=True)
    gamma = jnp.linalg.norm(flat)
    h, on_boundary, model, mu_min = solve(res, gamma)
    residual = jnp.abs(res.beta_next * h[jnp.maximum(res.num_valid - 1, 0)])
    code = jnp.where(on_boundary, jnp.where(mu_min > 0, CG_BOUNDARY, CG_NEGATIVE_CURVATURE),
                     jnp.where(residual <= tol * gamma, CG_CONVERGED, CG_MAX_ITERATIONS))
    zero = gamma == 0
    p = jax.tree.map(lambda x: jnp.where(zero, 0.0, x).astype(x.dtype), unravel(res.basis.T @ h))
    return p, SteihaugInfo(iterations=jnp.where(zero, 0, res.num_valid).astype(jnp.int32),
                           exit_code=jnp.where(zero, CG_CONVERGED, code).astype(jnp.int32),
                           residual_norm=jnp.where(zero, 0.0, residual), step_norm=tree_norm(p),
                           model_value=jnp.where(zero, 0.0, model))


def lanczos_trust_region(
    matvec: Callable[[PyTree], PyTree],
    g: PyTree,
    radius,
    damping=0.0,
    num_iters: int = 20,
    tol: float = 1e-6,
) -> tuple[PyTree, SteihaugInfo]:
    """The trust-region subproblem ``min m(p) = g.p + p.B p / 2``, ``||p|| <= radius``, solved
    exactly in the Krylov space ``K_k(B, g)`` (GLTR: Gould, Lucidi, Roma & Toint 1999, "Solving
    the trust-region subproblem using the Lanczos method", SIAM J. Optim. 9(2)).

    ``B = A + damping I``, ``matvec(v) = A v`` symmetric, possibly indefinite. ``k = num_iters``
    Lanczos steps from ``g`` give ``V`` (rows orthonormal) and tridiagonal ``T = V A V^T``; in
    that basis ``m(V^T h) = |g| h_0 + h.(T + damping I) h / 2``, solved exactly by
    :func:`tridiagonal_trust_region`. Same Krylov space as Steihaug-Toint CG (:func:`steihaug_cg`),
    so ``m(p) <=`` Steihaug's value at ``k`` directions, and its first iterate is the Cauchy point:
    at least the Cauchy decrease. Unlike Steihaug it does not stop at the first direction of
    negative curvature (for GradDiff that is often ``-g`` itself, which makes Steihaug a
    normalized gradient step): it keeps building the space and returns the subspace's global
    minimizer on the boundary. Memory: ``k`` vectors of ``g``'s size (the basis).

    ``info`` as :func:`steihaug_cg`'s: ``iterations`` = Krylov dimension (products with A),
    ``exit_code`` ``CG_NEGATIVE_CURVATURE`` (``T + damping I`` indefinite, boundary solution),
    ``CG_BOUNDARY`` (positive definite, boundary), ``CG_CONVERGED`` (interior, residual <=
    ``tol |g|``) or ``CG_MAX_ITERATIONS`` (interior, residual above); ``residual_norm`` =
    ``||g + (B + sigma I) p||`` = ``beta_next |h_{k-1}|`` (the Lanczos relation; 0 on
    breakdown, where the space is invariant and the solution exact); ``model_value`` = ``m(p)``.
    """

    def solve(res, gamma):
        h, _, model, boundary, mu_min = tridiagonal_trust_region(res.alphas, res.betas, gamma, radius, damping,
                                                                 res.num_valid)
        return h, boundary, model, mu_min

    return _krylov_step(matvec, g, num_iters, tol, solve)


def saddle_free_step(
    matvec: Callable[[PyTree], PyTree],
    g: PyTree,
    radius,
    damping=0.0,
    num_iters: int = 20,
    tol: float = 1e-6,
) -> tuple[PyTree, SteihaugInfo]:
    """Saddle-free Newton (Dauphin et al. 2014, "Identifying and attacking the saddle point
    problem": the step ``-|H|^-1 g``) restricted to the Krylov space: ``p = -V^T U (|theta| +
    damping)^-1 U^T V g`` with ``T = V A V^T = U diag(theta) U^T`` from ``num_iters`` Lanczos steps
    from ``g``, i.e. ``-(|A| + damping I)^-1 g`` restricted to ``K_k(A, g)``, scaled down to
    ``||p|| <= radius``. Every eigen-direction is descended (a negative-curvature direction with
    the step of its ``|theta|``), so the decrease of the model of ``B = A + damping I`` itself is
    positive: with ``y = -s c / (|theta| + damping)``, ``0 < s <= 1``, ``-(c.y + y.(theta +
    damping) y / 2) = sum c_i^2 (s - s^2 (theta_i + damping) / (2 (|theta_i| + damping))) /
    (|theta_i| + damping) >= sum s c_i^2 / (2 (|theta_i| + damping)) > 0``.
    ``info`` as :func:`lanczos_trust_region`'s (``CG_BOUNDARY`` when scaled down,
    ``CG_NEGATIVE_CURVATURE`` when scaled down with an indefinite ``T``); ``residual_norm`` =
    ``beta_next |h_{k-1}|``, the Lanczos tail (how far ``K_k`` is from invariant along the
    step); ``model_value`` = ``m(p)`` of ``B``, the model the trust region's ratio test uses.
    """
    def solve(res, gamma):
        theta, u = jnp.linalg.eigh(_tridiagonal(res.alphas, res.betas, res.num_valid))
        c = gamma * u[0, :]
        den = jnp.abs(theta) + damping
        y = jnp.where(den > 0, -c / jnp.where(den > 0, den, 1.0), 0.0)
        ny = jnp.linalg.norm(y)
        scale = jnp.minimum(1.0, radius / jnp.where(ny > 0, ny, 1.0))
        y = scale * y
        model = jnp.vdot(c, y) + 0.5 * jnp.vdot(y, (theta + damping) * y)
        return u @ y, scale < 1, model, theta[0] + damping

    return _krylov_step(matvec, g, num_iters, tol, solve)


def ggn_operator(
    logits_fn: Callable[[PyTree], PyTree],
    loss_of_logits: Callable[[PyTree], jax.Array],
    params: PyTree,
) -> tuple[PyTree, Callable[[PyTree], PyTree], Callable[[PyTree], PyTree]]:
    """The Gauss-Newton operator of ``loss_of_logits(logits_fn(params))``, linearized once.

    Returns ``(z, ggn_mv, j_transpose)``: ``z = logits_fn(params)`` (any pytree of logits),
    ``ggn_mv(v) = J^T H_L J v`` (as :func:`ggn_vp`, but the model and the logit-space
    gradient are linearized once, so each product costs one forward-mode and one
    transposed pass, no new forward) and ``j_transpose(c) = J^T c`` (gradients of any
    function of the logits: ``j_transpose(grad(h)(z))``).
    """
    z, j_fn = linearize(logits_fn, params)
    _, h_lin = jax.linearize(jax.grad(loss_of_logits), z)
    jt = jax.linear_transpose(j_fn, params)

    def j_transpose(c):
        return jt(c)[0]

    def ggn_mv(v):
        return j_transpose(h_lin(j_fn(v)))

    return z, ggn_mv, j_transpose
