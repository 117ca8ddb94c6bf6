"""Tests for simu_jax.curvature: every estimator against an exact dense reference."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from simu_jax import curvature as C


# ----------------------------------------------------------------------------
# A small nonconvex problem: 2-layer tanh MLP with softmax cross entropy.
# ----------------------------------------------------------------------------

D_IN, HID, V, B = 3, 4, 3, 6


def _mlp_problem(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w1": jnp.asarray(rng.normal(size=(D_IN, HID)), dtype),
        "b1": jnp.asarray(rng.normal(size=(HID,)) * 0.1, dtype),
        "w2": jnp.asarray(rng.normal(size=(HID, V)), dtype),
        "b2": jnp.asarray(rng.normal(size=(V,)) * 0.1, dtype),
    }
    x = jnp.asarray(rng.normal(size=(B, D_IN)), dtype)
    y = jnp.asarray(rng.integers(0, V, size=(B,)))
    return params, x, y


def _logits(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _ce_of_logits(z, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))


def _loss(params, x, y):
    return _ce_of_logits(_logits(params, x), y)


@jax.jit
def _dense_hessian_jit(params, x, y):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: _loss(unravel(f), x, y))(flat)


def _dense_hessian(params, x, y):
    return np.asarray(_dense_hessian_jit(params, x, y))


def _flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


# ----------------------------------------------------------------------------
# Products
# ----------------------------------------------------------------------------


def test_hvp_matches_finite_differences_and_dense_hessian(x64):
    params, x, y = _mlp_problem()
    flat, unravel = ravel_pytree(params)
    v = unravel(jnp.asarray(np.random.default_rng(1).normal(size=flat.shape)))
    hv = _flat(jax.jit(C.hvp, static_argnums=0)(_loss, params, v, x, y))

    # Exact: dense Hessian (jax.hessian) times v.
    np.testing.assert_allclose(hv, _dense_hessian(params, x, y) @ _flat(v), rtol=1e-12, atol=1e-12)

    # Central differences of the gradient: error O(eps^2 * |g'''|) + O(1e-16 / eps).
    grad = jax.jit(jax.grad(_loss))
    eps = 1e-5
    gp = _flat(grad(jax.tree.map(lambda p, t: p + eps * t, params, v), x, y))
    gm = _flat(grad(jax.tree.map(lambda p, t: p - eps * t, params, v), x, y))
    np.testing.assert_allclose(hv, (gp - gm) / (2 * eps), rtol=1e-7, atol=1e-8)


def _jaxprs(jaxpr):
    """A jaxpr and all its sub-jaxprs (jit, scan, remat, cond, ...)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    yield jaxpr
    for e in jaxpr.eqns:
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            yield from _jaxprs(sub)


def _transposes_fed_by(jaxpr, primitive):
    """How many transposes, at any depth, take the output of a `primitive` equation."""
    count = 0
    for j in _jaxprs(jaxpr):
        made_by = {v: e.primitive.name for e in j.eqns for v in e.outvars}
        count += sum(e.primitive.name == "transpose" and made_by.get(e.invars[0]) == primitive for e in j.eqns)
    return count


def _layered_loss(p, x, y):
    """Two stacked tanh layers in a scan (one of them under remat), a jitted head, a batched
    einsum and a cond: every place `fold_transposed_dots` must reach."""
    def layer(h, w):
        return jax.checkpoint(lambda h, w: jnp.tanh(h @ w))(h, w), None

    h, _ = jax.lax.scan(layer, x @ p["w_in"], p["w_layers"])
    h = jnp.einsum("bij,bjk->bik", h.reshape(B, 2, 2), p["w_batched"]).reshape(B, 4)
    z = jax.jit(lambda h, w: h @ w)(h, p["w_out"])
    z = jax.lax.cond(jnp.sum(z) > -1e9, lambda z: z * 1.5, lambda z: z, z)
    return _ce_of_logits(z, y)


def test_fold_transposed_dots_rewrites_every_weight_cotangent(x64):
    """The folded gradient map equals the original; its weight cotangents are dots in the kernels'
    layout (no transpose of a dot left, at any depth), and its tangent (the linearized HVP)
    has no transpose of a sum, the pattern XLA:CPU cannot fold."""
    rng = np.random.default_rng(0)
    p = {"w_in": jnp.asarray(rng.normal(size=(D_IN, 4))), "w_layers": jnp.asarray(rng.normal(size=(2, 4, 4)) * 0.5),
         "w_batched": jnp.asarray(rng.normal(size=(B, 2, 2))), "w_out": jnp.asarray(rng.normal(size=(4, V)))}
    _, x, y = _mlp_problem()
    grad_map = lambda q: jax.grad(_layered_loss)(q, x, y)  # noqa: E731
    folded = C.fold_transposed_dots(grad_map)

    before, after = jax.make_jaxpr(grad_map)(p), jax.make_jaxpr(folded)(p)
    assert _transposes_fed_by(before, "dot_general") >= 4  # w_in, the scanned w_layers, w_batched, w_out
    assert _transposes_fed_by(after, "dot_general") == 0
    for k in p:
        np.testing.assert_allclose(folded(p)[k], grad_map(p)[k], rtol=1e-12, atol=1e-14)

    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    (_, lin), (_, lin_f) = jax.linearize(grad_map, p), jax.linearize(folded, p)
    assert _transposes_fed_by(jax.make_jaxpr(lin)(v), "add_any") >= 1
    assert _transposes_fed_by(jax.make_jaxpr(lin_f)(v), "add_any") == 0
    flat, unravel = ravel_pytree(p)
    dense = np.asarray(jax.hessian(lambda f: _layered_loss(unravel(f), x, y))(flat))
    np.testing.assert_allclose(_flat(lin_f(v)), dense @ _flat(v), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_flat(jax.jit(C.hvp, static_argnums=0)(_layered_loss, p, v, x, y)), dense @ _flat(v),
                               rtol=1e-10, atol=1e-12)


def _scanned_loss(p, x, y, unroll):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x @ p["w_in"], p["w_layers"], unroll=unroll)
    return _ce_of_logits(h @ p["w_out"], y)


def _count_eqns(jaxpr, name: str) -> int:
    """Equations named ``name`` in ``jaxpr`` and every sub-jaxpr."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for e in jaxpr.eqns:
        total += e.primitive.name == name
        for sub in jax.extend.core.jaxprs_in_params(e.params):
            total += _count_eqns(sub, name)
    return total


@pytest.mark.parametrize("unroll", [True, 1])
def test_linearize_splits_unrolled_scan_residuals_and_keeps_the_products(x64, unroll):
    """`curvature.linearize`: three chained products of its linear map in a `fori_loop` (as Lanczos
    runs them) equal H^3 v of the dense Hessian; with an unrolled layer scan the map re-stacks
    per-layer residual pieces (`stack` equations that jax.linearize's map lacks), with a rolled scan it
    is jax.linearize's map (nothing re-stacked, which would cost a copy per product there)."""
    rng = np.random.default_rng(1)
    p = {"w_in": jnp.asarray(rng.normal(size=(D_IN, 4))), "w_layers": jnp.asarray(rng.normal(size=(3, 4, 4)) * 0.5),
         "w_out": jnp.asarray(rng.normal(size=(4, V)))}
    _, x, y = _mlp_problem()
    v = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), p)
    grad_map = lambda q: jax.grad(_scanned_loss)(q, x, y, unroll)  # noqa: E731

    def products(linearize, q, u):
        lin = linearize(grad_map, q)[1]
        return jax.lax.fori_loop(0, 3, lambda _, w: lin(w), u)

    ours = jax.jit(lambda q, u: products(C.linearize, q, u))
    flat, unravel = ravel_pytree(p)
    dense = np.asarray(jax.hessian(lambda f: _scanned_loss(unravel(f), x, y, unroll))(flat))
    np.testing.assert_allclose(_flat(ours(p, v)), dense @ dense @ dense @ _flat(v), rtol=1e-10, atol=1e-12)

    def restacks(linearize):  # stack equations of the one-product program
        return _count_eqns(jax.make_jaxpr(lambda q, u: linearize(grad_map, q)[1](u))(p, v), "stack")

    if unroll is True:
        assert restacks(C.linearize) > restacks(jax.linearize)
    else:
        assert restacks(C.linearize) == restacks(jax.linearize)


def test_linearize_with_an_integer_primal_is_jax_linearize():
    """Integer primals take float0 tangents: nothing is split, the map is jax.linearize's."""
    f = lambda p: jnp.sum(jnp.sin(p["w"]) * p["n"])  # noqa: E731
    p = {"w": jnp.arange(3.0), "n": jnp.arange(3)}
    u = {"w": jnp.ones(3), "n": np.zeros(3, jax.dtypes.float0)}
    (y, lin), (y_ref, lin_ref) = jax.jit(lambda q: C.linearize(f, q))(p), jax.linearize(f, p)
    assert float(y) == pytest.approx(float(y_ref))
    assert float(lin(u)) == pytest.approx(float(lin_ref(u)), rel=1e-6)


def test_ggn_vp_matches_dense_jacobian_product(x64):
    params, x, y = _mlp_problem()
    flat, unravel = ravel_pytree(params)
    v = unravel(jnp.asarray(np.random.default_rng(2).normal(size=flat.shape)))
    logits_fn = lambda p: _logits(p, x)  # noqa: E731
    loss_of_logits = lambda z: _ce_of_logits(z, y)  # noqa: E731

    gv = _flat(jax.jit(C.ggn_vp, static_argnums=(0, 1))(logits_fn, loss_of_logits, params, v))

    z = logits_fn(params)
    jac = np.asarray(jax.jit(jax.jacfwd(lambda f: logits_fn(unravel(f)).ravel()))(flat))  # [B*V, n]
    h_l = np.asarray(jax.jit(jax.hessian(lambda zf: loss_of_logits(zf.reshape(z.shape))))(z.ravel()))
    G = jac.T @ h_l @ jac
    np.testing.assert_allclose(gv, G @ _flat(v), rtol=1e-12, atol=1e-13)
    # The MLP's Hessian is not its Gauss-Newton matrix: the test can tell them apart.
    assert not np.allclose(G, _dense_hessian(params, x, y), atol=1e-3)


def test_ggn_equals_hessian_for_a_linear_model(x64):
    """Logits linear in the parameters: J^T H_L J is the full Hessian."""
    params, x, y = _mlp_problem()
    lin = {"w": params["w2"][:D_IN], "b": params["b2"]}
    logits_fn = lambda p: x @ p["w"] + p["b"]  # noqa: E731
    loss_of_logits = lambda z: _ce_of_logits(z, y)  # noqa: E731
    v = jax.tree.map(lambda p: jnp.cos(3.0 * p), lin)
    np.testing.assert_allclose(
        _flat(jax.jit(lambda p, v: C.ggn_vp(logits_fn, loss_of_logits, p, v))(lin, v)),
        _flat(jax.jit(lambda p, v: C.hvp(lambda q: loss_of_logits(logits_fn(q)), p, v))(lin, v)),
        rtol=1e-12,
        atol=1e-14,
    )


# ----------------------------------------------------------------------------
# Diagonal estimators
# ----------------------------------------------------------------------------


def test_rademacher_probes_shapes_dtypes_values():
    tree = {"a": jnp.zeros((3, 4), jnp.bfloat16), "b": [jnp.zeros((5,), jnp.float32)]}
    u = jax.jit(C.rademacher_like)(jax.random.key(0), tree)
    assert jax.tree.structure(u) == jax.tree.structure(tree)
    for p, leaf in zip(jax.tree.leaves(tree), jax.tree.leaves(u)):
        assert leaf.shape == p.shape and leaf.dtype == p.dtype
        vals = np.asarray(leaf, np.float32)
        assert set(np.unique(vals)) == {-1.0, 1.0}
    # Different leaves get different keys.
    u2 = C.rademacher_like(jax.random.key(0), {"a": jnp.zeros(64), "b": jnp.zeros(64)})
    assert not np.array_equal(np.asarray(u2["a"]), np.asarray(u2["b"]))


def test_hutchinson_converges_like_one_over_sqrt_probes(x64):
    params, x, y = _mlp_problem()
    H = _dense_hessian(params, x, y)
    exact = np.diag(H)
    # Rademacher: Var[u_i (Hu)_i] = sum_{j != i} H_ij^2  ->  E|err|^2 = that sum / n.
    per_probe_var = np.sum(H**2, axis=1) - exact**2
    est = jax.jit(C.hutchinson_diagonal, static_argnums=(0, 3))

    errs = {}
    for n in (10, 1000):
        d = _flat(est(_loss, params, jax.random.key(n), n, x, y))
        err = np.linalg.norm(d - exact)
        predicted = np.sqrt(per_probe_var.sum() / n)
        # A norm over 31 coordinates concentrates well: within a factor 2 of its rms.
        assert 0.5 * predicted < err < 2.0 * predicted, (n, err, predicted)
        errs[n] = err
    # 100x more probes: error down by ~10x.
    assert 4.0 < errs[10] / errs[1000] < 25.0


def test_hutchinson_is_exact_for_a_diagonal_hessian(x64):
    """Off-diagonals zero => u_i^2 = 1 makes one probe exact (kills a missing u factor)."""
    c = jnp.asarray([0.5, -2.0, 3.0])
    f = lambda p: jnp.sum(c * p["a"] ** 2) + jnp.sum(jnp.cos(p["b"]))  # noqa: E731
    p = {"a": jnp.asarray([1.0, 2.0, 3.0]), "b": jnp.asarray([0.3, -0.7])}
    d = jax.jit(lambda p, k: C.hutchinson_diagonal(f, p, k, 1))(p, jax.random.key(0))
    np.testing.assert_allclose(d["a"], 2 * c, rtol=1e-14)
    np.testing.assert_allclose(d["b"], -np.cos(np.asarray(p["b"])), rtol=1e-14)


def test_hutchinson_returns_float32_for_bf16_params():
    params, x, y = _mlp_problem(np.float32)
    p16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    f = lambda p, x, y: _loss(p, x.astype(jnp.bfloat16), y)  # noqa: E731
    d = jax.jit(lambda p, k: C.hutchinson_diagonal(f, p, k, 2, x, y))(p16, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(d))
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(d))


def test_gnb_expectation_matches_gauss_newton_diagonal(x64):
    rng = np.random.default_rng(3)
    params, _, _ = _mlp_problem()
    xs = jnp.asarray(rng.normal(size=(2, 4, D_IN)))  # [batch, seq, d]
    weights = jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 0]], jnp.float64)  # answer-token mask, 5 tokens
    logits_fn = lambda p: _logits(p, xs)  # noqa: E731  [2, 4, V]

    # Exact Gauss-Newton diagonal of the weighted-mean CE: diag(J^T H_L J).
    flat, unravel = ravel_pytree(params)
    z = logits_fn(params)
    jac = np.asarray(jax.jit(jax.jacfwd(lambda f: logits_fn(unravel(f)).reshape(-1, V)))(flat))  # [T, V, n]
    p = np.asarray(jax.nn.softmax(z).reshape(-1, V))
    w = np.asarray(weights).ravel()
    ggn = np.zeros((flat.shape[0], flat.shape[0]))
    for t in range(p.shape[0]):
        h_t = w[t] / w.sum() * (np.diag(p[t]) - np.outer(p[t], p[t]))
        ggn += jac[t].T @ h_t @ jac[t]
    exact = np.diag(ggn)

    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    samples = jax.jit(jax.vmap(lambda k: ravel_pytree(C.gnb_diagonal(logits_fn, params, k, weights))[0]))(keys)
    samples = np.asarray(samples)
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(n)
    assert np.all(np.abs(mean - exact) <= 5 * se + 1e-12), np.max(np.abs(mean - exact) / (se + 1e-30))
    # The check has power: sampling error is small against the signal (a missing B
    # factor = 5x, or the wrong labels, would fail it).
    assert np.median(se / exact) < 0.05

    # scale_by_tokens=False is the same estimate divided by B = sum(weights) (SophiaG code).
    k = jax.random.key(7)
    gnb = jax.jit(lambda k, s: C.gnb_diagonal(logits_fn, params, k, weights, scale_by_tokens=s), static_argnums=1)
    a, b = _flat(gnb(k, True)), _flat(gnb(k, False))
    np.testing.assert_allclose(a, 5.0 * b, rtol=1e-14)


def test_gnb_unweighted_uses_token_count():
    params, x, _ = _mlp_problem(np.float32)
    k = jax.random.key(1)
    a = _flat(jax.jit(lambda k: C.gnb_diagonal(lambda p: _logits(p, x), params, k))(k))
    b = _flat(jax.jit(lambda k: C.gnb_diagonal(lambda p: _logits(p, x), params, k, jnp.ones((B,))))(k))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert a.dtype == np.float32


def test_fisher_diagonal_is_g_squared():
    g = {"a": jnp.asarray([1.5, -2.0], jnp.bfloat16), "b": jnp.asarray([[3.0]], jnp.float32)}
    f = C.fisher_diagonal(g)
    assert f["a"].dtype == jnp.float32 and f["b"].dtype == jnp.float32
    np.testing.assert_array_equal(f["a"], [2.25, 4.0])
    np.testing.assert_array_equal(f["b"], [[9.0]])


# ----------------------------------------------------------------------------
# Conjugate gradients
# ----------------------------------------------------------------------------


def _spd(n, rng, eigs=None):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigs = rng.uniform(0.5, 50.0, size=n) if eigs is None else np.asarray(eigs, float)
    return (q * eigs) @ q.T


def test_cg_solves_spd_pytree_system_in_n_iterations(x64):
    rng = np.random.default_rng(0)
    n = 12
    A = _spd(n, rng)
    b_flat = rng.normal(size=n)
    b = {"u": jnp.asarray(b_flat[:5]), "v": jnp.asarray(b_flat[5:].reshape(7, 1))}
    _, unravel = ravel_pytree(b)
    Aj = jnp.asarray(A)
    matvec = lambda t: unravel(Aj @ ravel_pytree(t)[0])  # noqa: E731

    x, info = jax.jit(lambda b: C.conjugate_gradient(matvec, b, tol=1e-12))(b)
    assert jax.tree.structure(x) == jax.tree.structure(b)
    assert int(info.iterations) <= n and bool(info.converged) and not bool(info.negative_curvature)
    np.testing.assert_allclose(_flat(x), np.linalg.solve(A, b_flat), rtol=1e-9, atol=1e-10)
    assert float(info.residual_norm) <= 1e-12 * np.linalg.norm(b_flat)

    # Damping: (A + lambda I) x = b, and a warm start x0.
    lam = 3.0
    xd, info = C.conjugate_gradient(matvec, b, x0=x, damping=lam, tol=1e-12)
    np.testing.assert_allclose(_flat(xd), np.linalg.solve(A + lam * np.eye(n), b_flat), rtol=1e-9, atol=1e-10)


def test_cg_converges_in_k_iterations_for_k_distinct_eigenvalues(x64):
    """Krylov property of true CG: 3 distinct eigenvalues -> exact after 3 steps."""
    rng = np.random.default_rng(1)
    n = 30
    A = _spd(n, rng, eigs=np.repeat([1.0, 7.0, 40.0], 10))
    b = rng.normal(size=n)
    Aj = jnp.asarray(A)
    x, info = C.conjugate_gradient(lambda v: Aj @ v, jnp.asarray(b), tol=1e-10)
    assert int(info.iterations) == 3
    np.testing.assert_allclose(np.asarray(x), np.linalg.solve(A, b), rtol=1e-8)


def test_cg_maxiter_and_negative_curvature(x64):
    rng = np.random.default_rng(2)
    n = 20
    A = jnp.asarray(_spd(n, rng))
    b = jnp.asarray(rng.normal(size=n))
    _, info = C.conjugate_gradient(lambda v: A @ v, b, tol=1e-14, maxiter=4)
    assert int(info.iterations) == 4 and not bool(info.converged)

    # Indefinite: b along a negative eigenvector -> stops before updating x.
    D = jnp.diag(jnp.asarray([-1.0, 2.0, 3.0]))
    x, info = C.conjugate_gradient(lambda v: D @ v, jnp.asarray([1.0, 0.0, 0.0]))
    assert bool(info.negative_curvature) and int(info.iterations) == 0
    np.testing.assert_array_equal(np.asarray(x), np.zeros(3))


def test_cg_bf16_inputs_iterate_in_float32():
    diag = jnp.asarray([1.0, 2.0, 4.0, 8.0], jnp.bfloat16)
    b = {"a": jnp.asarray([1.0, -1.0, 2.0, 3.0], jnp.bfloat16)}
    seen = []

    def matvec(v):
        seen.append(v["a"].dtype)
        return {"a": diag * v["a"]}

    x, info = jax.jit(lambda b: C.conjugate_gradient(matvec, b, tol=1e-3))(b)
    assert x["a"].dtype == jnp.float32 and seen[0] == jnp.bfloat16
    # bf16 matvec rounding (eps 2^-8) limits the accuracy, not the iteration.
    np.testing.assert_allclose(np.asarray(x["a"]), [1.0, -0.5, 0.5, 0.375], rtol=2e-2)


# ----------------------------------------------------------------------------
# Lanczos
# ----------------------------------------------------------------------------


def test_lanczos_matches_eigvalsh_of_dense_hessian(x64):
    params, x, y = _mlp_problem()
    H = _dense_hessian(params, x, y)
    n = H.shape[0]
    eig = np.linalg.eigvalsh(H)
    assert eig[0] < 0 < eig[-1]  # nonconvex: both ends matter
    v0 = C.rademacher_like(jax.random.key(0), params)
    mv = lambda v: C.hvp(_loss, params, v, x, y)  # noqa: E731

    res = jax.jit(lambda v0: C.lanczos(mv, v0, n))(v0)
    scale = np.abs(eig).max()
    np.testing.assert_allclose([res.min_eigenvalue, res.max_eigenvalue], [eig[0], eig[-1]], atol=1e-9 * scale)

    # Softmax shift invariance gives H a multiple zero eigenvalue; Lanczos sees each
    # distinct eigenvalue once, then breaks down: the Krylov dimension is the number
    # of distinct eigenvalues, and the valid block of T has exactly those.
    distinct = np.concatenate([eig[np.abs(eig) > 1e-10 * scale], [0.0]])
    k = int(res.num_valid)
    assert k == distinct.size < n
    t = np.diag(np.asarray(res.alphas)[:k]) + np.diag(np.asarray(res.betas)[: k - 1], 1)
    ritz = np.linalg.eigvalsh(t + np.triu(t, 1).T)
    np.testing.assert_allclose(ritz, np.sort(distinct), atol=1e-9 * scale)
    # The filler rows past breakdown stay inside the spectrum.
    assert np.all(np.asarray(res.ritz_values) >= eig[0] - 1e-9 * scale)
    assert np.all(np.asarray(res.ritz_values) <= eig[-1] + 1e-9 * scale)


def test_lanczos_extremes_converge_before_the_interior(x64):
    rng = np.random.default_rng(4)
    n = 200
    # Well separated extremes (gap ratio ~0.5): Kaniel-Paige bound gives ~1e-9 after 25 steps.
    eigs = np.concatenate([[-10.0], rng.uniform(-1.0, 1.0, n - 2), [12.0]])
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = jnp.asarray((q * eigs) @ q.T)
    v0 = {"a": jnp.asarray(rng.normal(size=(n // 2,))), "b": jnp.asarray(rng.normal(size=(n // 2,)))}
    unravel = ravel_pytree(v0)[1]
    mv = lambda t: unravel(A @ ravel_pytree(t)[0])  # noqa: E731
    for reorth in (True, False):
        res = jax.jit(lambda v0: C.lanczos(mv, v0, 25, reorthogonalize=reorth))(v0)
        np.testing.assert_allclose(float(res.min_eigenvalue), -10.0, rtol=1e-7)
        np.testing.assert_allclose(float(res.max_eigenvalue), 12.0, rtol=1e-7)
        # Ritz values bound the spectrum from inside (interlacing).
        assert float(res.min_eigenvalue) >= -10.0 - 1e-9 and float(res.max_eigenvalue) <= 12.0 + 1e-9


def test_lanczos_breakdown_keeps_extremes():
    """Only 3 distinct eigenvalues: the Krylov space is invariant after 3 steps."""
    rng = np.random.default_rng(5)
    n = 40
    A = jnp.asarray(_spd(n, rng, eigs=np.repeat([-2.0, 1.0, 5.0], [10, 20, 10])), jnp.float32)
    res = jax.jit(lambda v0: C.lanczos(lambda v: A @ v, v0, 10))(jnp.asarray(rng.normal(size=n), jnp.float32))
    assert int(res.num_valid) == 3
    assert np.all(np.isfinite(np.asarray(res.ritz_values)))
    np.testing.assert_allclose([res.min_eigenvalue, res.max_eigenvalue], [-2.0, 5.0], rtol=1e-4)


# ----------------------------------------------------------------------------
# Dense Hessian on a subset of coordinates
# ----------------------------------------------------------------------------


def test_dense_hessian_and_diagonal_match_jax_hessian(x64):
    params, x, y = _mlp_problem()
    H = _dense_hessian(params, x, y)
    idx = np.asarray([0, 5, 13, 17, 30])
    sub = jax.jit(lambda p: C.dense_hessian(_loss, p, idx, x, y))(params)
    assert sub.shape == (5, 5)
    np.testing.assert_allclose(np.asarray(sub), H[np.ix_(idx, idx)], rtol=1e-12, atol=1e-14)
    # Chunked path and the jitted diagonal agree.
    sub2 = jax.jit(lambda p, i: C.dense_hessian(_loss, p, i, x, y, batch_size=2))(params, jnp.asarray(idx))
    np.testing.assert_allclose(np.asarray(sub2), np.asarray(sub), rtol=1e-14, atol=1e-15)
    diag = jax.jit(lambda p: C.hessian_diagonal_exact(_loss, p, idx, x, y))(params)
    np.testing.assert_allclose(np.asarray(diag), np.diag(H)[idx], rtol=1e-12, atol=1e-14)
