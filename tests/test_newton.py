"""Newton-type steps: Steihaug-Toint CG, the trust-region iteration, the Gauss-Newton product, the
influence step, and their wiring in the engine and `simu-jax unlearn` (docs/method.md#newton)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simu_jax import curvature as C
from simu_jax import optim as O

sys.path.insert(0, str(Path(__file__).parent))


# ----------------------------------------------------------------------------- dense references


def model_value(A, g, p):
    return float(g @ p + 0.5 * p @ A @ p)


def cauchy_point(A, g, radius):
    """Nocedal & Wright (4.11)-(4.12)."""
    gn = np.linalg.norm(g)
    gAg = g @ A @ g
    tau = 1.0 if gAg <= 0 else min(gn**3 / (radius * gAg), 1.0)
    return -tau * radius / gn * g


def steihaug_reference(A, g, radius, tol=1e-10, maxiter=None):
    """Algorithm 7.2 of Nocedal & Wright in numpy, line by line."""
    n = len(g)
    maxiter = n if maxiter is None else maxiter
    z, r, d = np.zeros(n), g.copy(), -g.copy()
    eps = tol * np.linalg.norm(g)
    if np.linalg.norm(r) <= eps:
        return z, 0

    def boundary_roots(z, d):
        a, b, c = d @ d, 2 * z @ d, z @ z - radius**2
        disc = np.sqrt(b * b - 4 * a * c)
        return (-b - disc) / (2 * a), (-b + disc) / (2 * a)

    for _ in range(maxiter):
        dAd = d @ A @ d
        if dAd <= 0:
            taus = boundary_roots(z, d)
            return min((z + t * d for t in taus), key=lambda p: model_value(A, g, p)), 1
        alpha = (r @ r) / dAd
        z_new = z + alpha * d
        if np.linalg.norm(z_new) >= radius:
            return z + boundary_roots(z, d)[1] * d, 2
        r_new = r + alpha * A @ d
        if np.linalg.norm(r_new) <= eps:
            return z_new, 0
        d = -r_new + (r_new @ r_new) / (r @ r) * d
        z, r = z_new, r_new
    return z, 3


def random_problem(seed, n=8, negative=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eig = rng.uniform(0.5, 4.0, size=n)
    eig[:negative] = -rng.uniform(0.5, 4.0, size=negative)
    return (q * eig) @ q.T, rng.normal(size=n)


@functools.partial(jax.jit, static_argnames=("tol", "maxiter"))
def _steihaug(A, g, radius, damping, tol, maxiter):
    return C.steihaug_cg(lambda v: A @ v, g, radius, damping=damping, tol=tol, maxiter=maxiter)


def solve(A, g, radius, damping=0.0, tol=1e-10, maxiter=None):
    """Steihaug CG on a dense matrix (one compile per (shape, tol, maxiter))."""
    p, info = _steihaug(jnp.asarray(A), jnp.asarray(g), radius, damping, tol, len(g) if maxiter is None else maxiter)
    return np.asarray(p), info


# ----------------------------------------------------------------------------- Steihaug CG


def test_negative_curvature_of_minus_g_goes_to_the_boundary_along_it(x64):
    A = np.diag([-1.0, 2.0, 3.0])
    g = np.array([0.3, 0.0, 0.0])  # -g is a negative-curvature direction
    p, info = solve(A, g, 2.0)
    np.testing.assert_allclose(p, [-2.0, 0.0, 0.0], atol=1e-12)  # to the boundary, downhill
    assert int(info.exit_code) == C.CG_NEGATIVE_CURVATURE and int(info.iterations) == 1
    np.testing.assert_allclose(float(info.model_value), model_value(A, g, p), rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_negative_curvature_later_follows_d_k_to_the_boundary(seed, x64):
    """Indefinite quadratics: the step equals the dense reference of Alg. 7.2, lies on the
    boundary, and beats the Cauchy point; where CG met negative curvature after the first
    iteration the step is not the (scaled) gradient."""
    A, g = random_problem(seed, n=8, negative=3)
    radius = 3.0
    p, info = solve(A, g, radius)
    ref, code = steihaug_reference(A, g, radius)
    assert int(info.exit_code) == code and code in (C.CG_NEGATIVE_CURVATURE, C.CG_BOUNDARY)
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.linalg.norm(p), radius, rtol=1e-10)
    assert model_value(A, g, p) <= model_value(A, g, cauchy_point(A, g, radius)) + 1e-12
    if int(info.iterations) > 1:
        assert abs(p @ -g) / (np.linalg.norm(p) * np.linalg.norm(g)) < 0.999


def test_finds_some_negative_curvature_after_the_first_iteration(x64):
    """The case the old truncated CG got wrong (it returned z_k, strictly inside): negative
    curvature met at iteration k > 0 still ends on the boundary."""
    hits = 0
    for seed in range(40):
        A, g = random_problem(seed, n=8, negative=2)
        p, info = solve(A, g, 50.0)
        if int(info.exit_code) == C.CG_NEGATIVE_CURVATURE and int(info.iterations) > 1:
            hits += 1
            np.testing.assert_allclose(np.linalg.norm(p), 50.0, rtol=1e-10)
            np.testing.assert_allclose(p, steihaug_reference(A, g, 50.0)[0], rtol=1e-8, atol=1e-10)
    assert hits >= 5


@pytest.mark.parametrize("seed", range(4))
def test_interior_step_is_the_newton_step(seed, x64):
    A, g = random_problem(seed, n=8, negative=0)
    newton = np.linalg.solve(A, -g)
    p, info = solve(A, g, 10 * np.linalg.norm(newton), tol=1e-12, maxiter=50)
    assert int(info.exit_code) == C.CG_CONVERGED
    np.testing.assert_allclose(p, newton, rtol=1e-8, atol=1e-10)
    # damping: (A + lambda I) p = -g
    p, info = solve(A, g, 1e3, damping=0.7, tol=1e-12, maxiter=50)
    np.testing.assert_allclose(p, np.linalg.solve(A + 0.7 * np.eye(8), -g), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_definite_small_radius_stops_on_the_boundary(seed, x64):
    A, g = random_problem(seed, n=8, negative=0)
    radius = 0.3 * np.linalg.norm(np.linalg.solve(A, -g))
    p, info = solve(A, g, radius)
    ref, code = steihaug_reference(A, g, radius)
    assert int(info.exit_code) == C.CG_BOUNDARY == code
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(np.linalg.norm(p), radius, rtol=1e-10)


@pytest.mark.parametrize("negative", [0, 1, 4])
def test_at_least_the_cauchy_decrease(negative, x64):
    for seed in range(10):
        A, g = random_problem(100 + seed, n=10, negative=negative)
        for radius in (0.05, 0.5, 5.0):
            for maxiter in (1, 3, 20):
                p, info = solve(A, g, radius, maxiter=maxiter)
                assert np.linalg.norm(p) <= radius * (1 + 1e-10)
                assert model_value(A, g, p) <= model_value(A, g, cauchy_point(A, g, radius)) + 1e-10
                np.testing.assert_allclose(float(info.model_value), model_value(A, g, p), rtol=1e-8, atol=1e-12)


def test_max_iterations_and_zero_gradient(x64):
    A, g = random_problem(3, n=8, negative=0)
    p, info = solve(A, g, 1e6, maxiter=2, tol=1e-14)
    assert int(info.exit_code) == C.CG_MAX_ITERATIONS and int(info.iterations) == 2
    np.testing.assert_allclose(p, steihaug_reference(A, g, 1e6, tol=1e-14, maxiter=2)[0], rtol=1e-9)
    p, info = solve(A, np.zeros(8), 1.0)
    assert int(info.exit_code) == C.CG_CONVERGED and int(info.iterations) == 0 and not p.any()


# ----------------------------------------------------------------------------- Lanczos (GLTR) and saddle-free


def trust_region_reference(A, g, radius):
    """The global minimizer of g.p + p.A p / 2 on ||p|| <= radius (More & Sorensen; N&W Thm 4.1),
    dense: eigendecomposition and the secular equation ||p(sigma)|| = radius by scipy's brentq."""
    from scipy.optimize import brentq

    theta, U = np.linalg.eigh(A)
    c = U.T @ g
    if theta[0] > 0 and np.linalg.norm(c / theta) <= radius:
        return -U @ (c / theta)
    lo = max(0.0, -theta[0])
    f = lambda s: np.linalg.norm(c / (theta + s)) - radius  # noqa: E731
    sigma = brentq(f, lo + 1e-12 * (1 + lo), lo + np.linalg.norm(c) / radius + 1.0, xtol=1e-15, rtol=1e-15)
    return -U @ (c / (theta + sigma))


@functools.partial(jax.jit, static_argnames=("solver", "k"))
def _krylov(A, g, radius, damping, solver, k):
    fn = C.lanczos_trust_region if solver == "lanczos" else C.saddle_free_step
    return fn(lambda v: A @ v, g, radius, damping=damping, num_iters=k, tol=1e-10)


def krylov_solve(A, g, radius, damping=0.0, solver="lanczos", k=None):
    p, info = _krylov(jnp.asarray(A), jnp.asarray(g), radius, damping, solver, len(g) if k is None else k)
    return np.asarray(p), info


@pytest.mark.parametrize("seed", range(4))
def test_lanczos_trust_region_is_the_exact_subproblem_solution(seed, x64):
    """With the whole space (k = n) GLTR is the global trust-region minimizer, on indefinite
    quadratics at every radius and on definite ones (interior: the Newton step)."""
    A, g = random_problem(seed, n=8, negative=3)
    for radius in (0.05, 1.0, 30.0):
        p, info = krylov_solve(A, g, radius)
        np.testing.assert_allclose(p, trust_region_reference(A, g, radius), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(np.linalg.norm(p), radius, rtol=1e-9)  # indefinite: always on the boundary
        assert int(info.exit_code) == C.CG_NEGATIVE_CURVATURE and int(info.iterations) == 8
        np.testing.assert_allclose(float(info.model_value), model_value(A, g, p), rtol=1e-9)
        # the global minimizer beats Steihaug's point (same problem, same radius)
        assert model_value(A, g, p) <= model_value(A, g, steihaug_reference(A, g, radius)[0]) + 1e-12
    A, g = random_problem(seed, n=8, negative=0)
    newton = np.linalg.solve(A, -g)
    p, info = krylov_solve(A, g, 2 * np.linalg.norm(newton))
    np.testing.assert_allclose(p, newton, rtol=1e-8, atol=1e-10)
    assert int(info.exit_code) == C.CG_CONVERGED and float(info.residual_norm) < 1e-8
    p, info = krylov_solve(A, g, 0.5 * np.linalg.norm(newton), damping=0.3)  # damped, on the boundary
    np.testing.assert_allclose(p, trust_region_reference(A + 0.3 * np.eye(8), g, 0.5 * np.linalg.norm(newton)),
                               rtol=1e-8, atol=1e-10)
    assert int(info.exit_code) == C.CG_BOUNDARY


@pytest.mark.parametrize("negative", [0, 2, 5])
def test_lanczos_trust_region_in_a_small_krylov_space(negative, x64):
    """k < n: at least the Cauchy decrease, at least Steihaug's decrease with as many products
    (Steihaug's point lies in the same Krylov space), and the step leaves the gradient direction
    when -g has negative curvature (where Steihaug returns the scaled -g)."""
    for seed in range(8):
        A, g = random_problem(200 + seed, n=20, negative=negative)
        for radius in (0.1, 1.0, 10.0):
            for k in (1, 3, 6):
                p, info = krylov_solve(A, g, radius, k=k)
                assert np.linalg.norm(p) <= radius * (1 + 1e-9)
                m = model_value(A, g, p)
                np.testing.assert_allclose(float(info.model_value), m, rtol=1e-8, atol=1e-12)
                assert m <= model_value(A, g, cauchy_point(A, g, radius)) + 1e-10
                assert m <= model_value(A, g, steihaug_reference(A, g, radius, maxiter=k)[0]) + 1e-10
    A = np.diag([-6.0, 1.0, 3.0, 0.5])
    g = np.array([1.0, 1.0, 1.0, 1.0])
    assert g @ A @ g < 0  # -g has negative curvature: Steihaug = -g to the boundary
    p_st, info_st = solve(A, g, 1.0)
    assert int(info_st.iterations) == 1 and abs(-(p_st @ g) / (np.linalg.norm(p_st) * 2.0) - 1) < 1e-12
    p, info = krylov_solve(A, g, 1.0)
    cos = -(p @ g) / (np.linalg.norm(p) * np.linalg.norm(g))
    assert cos < 0.9 and model_value(A, g, p) < model_value(A, g, p_st) - 0.1
    np.testing.assert_allclose(p, trust_region_reference(A, g, 1.0), rtol=1e-8, atol=1e-10)


def test_tridiagonal_trust_region_hard_case(x64):
    """The hard case (More & Sorensen): the rhs has no component on the lowest eigenvector, so
    sigma = -lambda_min and the remaining length goes along that eigenvector. T = diag(2, -1, 3)
    (decoupled), rhs gamma e_0, gamma = 0.6, radius 1: h = (-0.6 / 3, +-sqrt(1 - 0.04), 0)."""
    h, sigma, model, boundary, mu_min = C.tridiagonal_trust_region(
        jnp.array([2.0, -1.0, 3.0]), jnp.array([0.0, 0.0]), 0.6, 1.0)
    np.testing.assert_allclose(float(sigma), 1.0, rtol=1e-9)
    np.testing.assert_allclose(np.abs(np.asarray(h)), [0.2, np.sqrt(0.96), 0.0], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(float(model), 0.6 * -0.2 + 0.5 * (2 * 0.04 - 0.96), rtol=1e-7)
    assert bool(boundary) and float(mu_min) == pytest.approx(-1.0)
    # rows past num_valid are ignored (a Lanczos breakdown): the same as the 2 x 2 problem
    h2, *_ = C.tridiagonal_trust_region(jnp.array([2.0, 1.5, -9.0]), jnp.array([0.5, 0.0]), 0.6, 0.1, num_valid=2)
    T = np.array([[2.0, 0.5], [0.5, 1.5]])
    np.testing.assert_allclose(np.asarray(h2)[:2], trust_region_reference(T, np.array([0.6, 0.0]), 0.1), rtol=1e-8)
    assert float(h2[2]) == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_saddle_free_step_is_minus_abs_hessian_inverse_g(seed, x64):
    """k = n: p = -(|A| + lambda I)^-1 g (|A| = U |theta| U^T, dense), scaled to the radius when
    longer; the model of A decreases along it (every eigen-direction descended)."""
    A, g = random_problem(seed, n=8, negative=3)
    theta, U = np.linalg.eigh(A)
    want = -U @ ((U.T @ g) / (np.abs(theta) + 0.1))
    p, info = krylov_solve(A, g, 1e3, damping=0.1, solver="saddle_free")
    np.testing.assert_allclose(p, want, rtol=1e-8, atol=1e-10)
    assert g @ p < 0 and model_value(A + 0.1 * np.eye(8), g, p) < 0
    np.testing.assert_allclose(float(info.model_value), model_value(A + 0.1 * np.eye(8), g, p), rtol=1e-8)
    p, info = krylov_solve(A, g, 0.2, damping=0.1, solver="saddle_free")
    np.testing.assert_allclose(p, want * 0.2 / np.linalg.norm(want), rtol=1e-8, atol=1e-10)
    assert int(info.exit_code) == C.CG_NEGATIVE_CURVATURE and model_value(A, g, p) < 0


# ----------------------------------------------------------------------------- trust region (Alg. 4.1)


def quartic(A, b, c):
    A, b = jnp.asarray(A), jnp.asarray(b)
    return lambda x: b @ x + 0.5 * x @ A @ x + c * jnp.sum(x * x) ** 2  # Hessian at 0 is A


def tr_step(f, x, radius, damping=0.0, **kw):
    state = O.TrustRegionState(jnp.asarray(0, jnp.int32), jnp.asarray(radius, jnp.float64),
                               jnp.asarray(damping, jnp.float64))
    return jax.jit(lambda x, s: O.newton_tr_step(f, x, s, **kw))(x, state)


def test_rejected_step_shrinks_the_radius(x64):
    A, g = random_problem(0, n=6, negative=2)
    x = jnp.zeros(6)
    new, state, info = tr_step(quartic(A, g, 50.0), x, 1.0)
    assert float(info["rho"]) < 0.1 and float(info["accepted"]) == 0.0
    assert np.array_equal(np.asarray(new), np.asarray(x))  # rejected: x_{k+1} = x_k
    assert float(state.radius) == pytest.approx(0.25)  # Delta / 4
    np.testing.assert_allclose(float(info["actual_decrease"]), float(info["predicted_decrease"]) - 50.0, rtol=1e-9)


def test_very_good_step_at_the_boundary_grows_the_radius(x64):
    A, g = random_problem(1, n=6, negative=2)
    x = jnp.zeros(6)
    new, state, info = tr_step(quartic(A, g, 0.0), x, 1.0, max_radius=1.5)
    assert float(info["rho"]) == pytest.approx(1.0, rel=1e-9)  # the model is exact
    assert int(info["cg_exit"]) in (C.CG_NEGATIVE_CURVATURE, C.CG_BOUNDARY)
    assert float(info["accepted"]) == 1.0 and float(state.radius) == pytest.approx(1.5)  # min(2 Delta, max)
    np.testing.assert_allclose(np.asarray(new), steihaug_reference(A, g, 1.0)[0], rtol=1e-9)
    # interior (converged) very good step: the radius stays
    A, g = random_problem(1, n=6, negative=0)
    _, state, info = tr_step(quartic(A, g, 0.0), x, 100.0, tol=1e-12, maxiter=30)
    assert int(info["cg_exit"]) == C.CG_CONVERGED and float(state.radius) == pytest.approx(100.0)


def test_rho_uses_the_undamped_model_and_lm_adjusts_damping(x64):
    A, g = random_problem(2, n=6, negative=0)
    x = jnp.zeros(6)
    f = quartic(A, g, 0.0)
    new, state, info = tr_step(f, x, 100.0, damping=2.0, tol=1e-12, maxiter=30, adapt_damping=True)
    p = np.linalg.solve(A + 2.0 * np.eye(6), -g)
    np.testing.assert_allclose(np.asarray(new), p, rtol=1e-9)
    np.testing.assert_allclose(float(info["predicted_decrease"]), -model_value(A, g, p), rtol=1e-9)
    assert float(info["rho"]) == pytest.approx(1.0, rel=1e-9)
    assert float(state.damping) == pytest.approx(2.0 * O.LM_DOWN)
    _, state, _ = tr_step(quartic(A, g, 1e3), x, 100.0, damping=2.0, adapt_damping=True)
    assert float(state.damping) == pytest.approx(2.0 * O.LM_UP)


# ----------------------------------------------------------------------------- GGN and influence


def tiny_net(seed=0, n_in=3, hidden=4, classes=5, batch=6):
    rng = np.random.default_rng(seed)
    params = {"w1": jnp.asarray(rng.normal(size=(n_in, hidden))), "w2": jnp.asarray(rng.normal(size=(hidden, classes)))}
    x = jnp.asarray(rng.normal(size=(batch, n_in)))
    y = jnp.asarray(rng.integers(0, classes, size=batch))
    logits_fn = lambda p: jnp.tanh(x @ p["w1"]) @ p["w2"]  # noqa: E731
    ce = lambda z: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, y))  # noqa: E731
    return params, logits_fn, ce


def dense_ggn(params, logits_fn, loss_of_logits):
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    J = jax.jacfwd(lambda f: logits_fn(unravel(f)).ravel())(flat)
    z = logits_fn(params)
    H = jax.hessian(lambda zf: loss_of_logits(zf.reshape(z.shape)))(z.ravel())
    return np.asarray(J.T @ H @ J), unravel


def test_ggn_product_equals_dense_jt_h_j(x64):
    params, logits_fn, ce = tiny_net()
    G, unravel = dense_ggn(params, logits_fn, ce)
    assert np.linalg.eigvalsh(G).min() > -1e-12  # PSD for a softmax cross entropy
    rng = np.random.default_rng(1)
    z, mv, jt = C.ggn_operator(logits_fn, ce, params)
    for _ in range(3):
        v = rng.normal(size=G.shape[0])
        want = G @ v
        got = jax.flatten_util.ravel_pytree(mv(unravel(jnp.asarray(v))))[0]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
        got = jax.flatten_util.ravel_pytree(C.ggn_vp(logits_fn, ce, params, unravel(jnp.asarray(v))))[0]
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
    # J^T of the logit gradient is the gradient
    grad = jax.grad(lambda p: ce(logits_fn(p)))(params)
    for a, b in zip(jax.tree.leaves(jt(jax.grad(ce)(z))), jax.tree.leaves(grad)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)


def test_influence_step_equals_dense_solve(x64):
    params, logits_fn, ce_retain = tiny_net(0)
    _, _, ce_forget = tiny_net(1)  # other labels
    G, unravel = dense_ggn(params, logits_fn, ce_retain)
    flat = jax.flatten_util.ravel_pytree(params)[0]
    lam = 0.05
    forget = lambda p: ce_forget(logits_fn(p))  # noqa: E731
    objective = lambda p: -forget(p) + ce_retain(logits_fn(p))  # noqa: E731
    b = jax.grad(forget)(params)
    want = np.linalg.solve(G + lam * np.eye(len(flat)), np.asarray(jax.flatten_util.ravel_pytree(b)[0]))
    _, mv, _ = C.ggn_operator(logits_fn, ce_retain, params)
    state = O.TrustRegionState(jnp.asarray(0), jnp.asarray(1.0), jnp.asarray(lam))
    new, state, info = O.influence_step(objective, params, state, jax.grad(objective)(params), b, mv,
                                        loss=objective(params), maxiter=200, tol=1e-13)
    got = np.asarray(jax.flatten_util.ravel_pytree(new)[0] - flat)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)
    assert int(info["cg_exit"]) == C.CG_CONVERGED and int(state.count) == 1
    # scaled and capped
    new, _, info = O.influence_step(objective, params, state, jax.grad(objective)(params), b, mv,
                                    loss=objective(params), scale=0.5, max_norm=1e-3, maxiter=200, tol=1e-13)
    np.testing.assert_allclose(np.linalg.norm(jax.flatten_util.ravel_pytree(new)[0] - flat), 1e-3, rtol=1e-9)


# ----------------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def memorized():
    """The tiny LLaMA of test_unlearn_core trained to memorize one forget and one retain batch
    (the unlearning starting point: both losses near zero), and its IG mask."""
    from test_unlearn_core import CFG, make_batch
    from simu_jax.attribution import build_mask, neuron_scores
    from simu_jax.losses import token_mean_nll
    from simu_jax.models import apply, init_model, split_params

    graphdef, params = split_params(init_model(CFG, seed=0))
    batch = {"forget": make_batch(0), "retain": make_batch(100)}

    def nll(p):
        return sum(token_mean_nll(apply(graphdef, p, b["input_ids"], b["attention_mask"]), b["labels"])
                   for b in batch.values())

    tx = optax.adam(2e-2)

    @jax.jit
    def train(p, s):
        g = jax.grad(nll)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for _ in range(80):
        params, state = train(params, state)
    assert float(nll(params)) < 0.05
    mask = build_mask(neuron_scores(graphdef, params, [batch["forget"]], steps=3),
                      neuron_scores(graphdef, params, [batch["retain"]], steps=3), threshold=0.3)
    return graphdef, params, mask, batch


def run_method(memorized, method, steps, **optim):
    from simu_jax.engine import StepSettings, Unlearner, get_method
    from simu_jax.optim import OptimSpec

    graphdef, params, mask, batch = memorized
    u = Unlearner(graphdef, params, get_method(method), StepSettings(optim=OptimSpec(**optim)), selected=mask.selected)
    rows = [{k: float(v) for k, v in u.step(batch, jax.random.key(i)).items()} for i in range(steps)]
    return u, rows


@pytest.fixture(scope="module")
def newton_lanczos(memorized):
    """simu_newton with the default solver (lanczos), 8 Krylov vectors, the extreme eigenvalues
    every 2nd step: shared by the two tests below (one compile). The diagnostics do not touch the
    step: its first 4 rows equal a run without them bit for bit."""
    return run_method(memorized, "simu_newton", 5, damping=1e-3, trust_radius=0.5, cg_iters=8, lanczos_every=2,
                      lanczos_iters=8)


def test_ggn_trust_region_steps_are_not_gradient_steps(memorized):
    """Trust region on the PSD Gauss-Newton matrix, small damping: CG runs several iterations
    and the step is not the gradient direction on most steps (measured over 10 steps: cosines
    0.29-0.90, 20 CG iterations, every step accepted, rho 1.4-3.8), and the forget loss rises."""
    u, rows = run_method(memorized, "simu_ggn", 6, damping=1e-3, trust_radius=1.0)
    cos = np.array([r["newton/cos_neg_grad"] for r in rows])
    its = np.array([r["newton/cg_iterations"] for r in rows])
    assert np.mean(cos < 0.99) > 0.5 and np.mean(its > 1) > 0.5, (cos, its)
    assert all(0.0 < c <= 1.0 + 1e-6 for c in cos)  # still a descent direction (PSD model)
    assert all(r["newton/accepted"] in (0.0, 1.0) and np.isfinite(r["newton/rho"]) for r in rows)
    assert rows[-1]["loss/forget"] < rows[0]["loss/forget"]  # -NLL(forget) went down: forgetting
    assert int(u.opt_state.count) == 6


def test_exact_newton_steps_are_not_gradient_steps(memorized, newton_lanczos):
    """The exact, indefinite Hessian: -g itself mostly has negative curvature, so Steihaug CG
    stops at its first direction and the step is the scaled gradient (cosine 1, one product);
    the default solver (GLTR in the Krylov space, optim.tr_solver resolves to lanczos for
    newton) builds the whole space and leaves the gradient direction."""
    from simu_jax.optim import OptimSpec

    assert OptimSpec().resolved("newton").tr_solver == "lanczos"
    assert OptimSpec().resolved("ggn").tr_solver == "steihaug"
    rows = newton_lanczos[1][:4]
    cos = np.array([r["newton/cos_neg_grad"] for r in rows])
    its = np.array([r["newton/cg_iterations"] for r in rows])
    assert np.mean(cos < 0.99) > 0.5 and np.all(its == 8), (cos, its)
    assert all(r["newton/predicted_decrease"] > 0 for r in rows)
    _, rows = run_method(memorized, "simu_newton", 4, damping=1e-3, trust_radius=0.5, cg_iters=8,
                         tr_solver="steihaug")
    assert np.mean([r["newton/cos_neg_grad"] > 0.999 for r in rows]) > 0.5  # the Steihaug failure mode here
    _, rows = run_method(memorized, "simu_newton", 2, damping=1e-3, trust_radius=0.5, cg_iters=8,
                         tr_solver="saddle_free")
    assert all(r["newton/predicted_decrease"] > 0 and r["newton/cos_neg_grad"] > 0 for r in rows)


def test_lanczos_solver_in_the_trust_region_iteration(x64):
    """On a quadratic the model is exact: rho = 1, and the step is the exact subproblem solution."""
    A, g = random_problem(4, n=6, negative=2)
    new, state, info = tr_step(quartic(A, g, 0.0), jnp.zeros(6), 1.0, max_radius=1.5, solver="lanczos", maxiter=6)
    assert float(info["rho"]) == pytest.approx(1.0, rel=1e-9) and float(info["accepted"]) == 1.0
    np.testing.assert_allclose(np.asarray(new), trust_region_reference(A, g, 1.0), rtol=1e-8, atol=1e-10)
    assert int(info["cg_exit"]) == C.CG_NEGATIVE_CURVATURE and float(state.radius) == pytest.approx(1.5)


def test_exact_newton_trust_region_state_and_metrics(newton_lanczos):
    """The exact-Hessian trust region carries (radius, lambda) in opt_state; every step logs the
    diagnostics; a rejected step leaves the parameters unchanged; lanczos_every gives
    an indefinite spectrum (GradDiff's Hessian) on its steps and NaN on the others."""
    u, rows = newton_lanczos
    for r in rows:
        for k in ("rho", "cg_exit", "cg_iterations", "step_norm", "radius", "damping", "accepted", "cos_neg_grad",
                  "predicted_decrease", "actual_decrease"):
            assert f"newton/{k}" in r
        assert r["newton/predicted_decrease"] > 0 and r["newton/cg_exit"] in (0, 1, 2, 3)
        assert r["newton/step_norm"] <= r["newton/radius"] * (1 + 1e-5)
    for prev, cur in zip(rows, rows[1:]):
        assert cur["newton/radius"] == pytest.approx(prev["newton/next_radius"])  # carried across steps
    assert float(u.opt_state.radius) == pytest.approx(rows[-1]["newton/next_radius"])
    assert rows[0]["newton/lambda_min"] < 0 < rows[0]["newton/lambda_max"] and np.isnan(rows[1]["newton/lambda_min"])


def test_influence_and_all_parameter_variants_run(memorized):
    for method in ("simu_influence", "so_newton", "so_ggn"):  # so_influence: simu_influence's path, mask None
        _, rows = run_method(memorized, method, 2, damping=1e-2, trust_radius=0.5, cg_iters=5)
        for r in rows:
            assert np.isfinite(r["loss"]) and np.isfinite(r["newton/rho"]) and r["newton/step_norm"] > 0, method
        assert rows[1]["loss/forget"] < rows[0]["loss/forget"], method


def test_trust_region_state_checkpoints_and_resumes(memorized, tmp_path):
    """One step, checkpoint, two more from the restored state == three uninterrupted steps."""
    from simu_jax.checkpoint import Checkpointer
    from simu_jax.engine import StepSettings, Unlearner, get_method
    from simu_jax.optim import OptimSpec

    graphdef, params, mask, batch = memorized
    settings = StepSettings(optim=OptimSpec(damping=1e-3, trust_radius=2.0, tr_adapt_damping=True, cg_iters=5))
    make = lambda: Unlearner(graphdef, params, get_method("simu_newton"), settings, selected=mask.selected)  # noqa
    full = make()
    for i in range(3):
        full.step(batch, jax.random.key(i))
    part = make()
    part.step(batch, jax.random.key(0))
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(1, {"trainable": part.trainable, "opt_state": part.opt_state, "step": 1})
        fresh = make()
        restored = ck.restore(target={"trainable": fresh.trainable, "opt_state": fresh.opt_state, "step": 0})
    assert isinstance(restored["opt_state"], O.TrustRegionState)
    fresh.trainable, fresh.opt_state, fresh.step_count = restored["trainable"], restored["opt_state"], 1
    for i in range(1, 3):
        fresh.step(batch, jax.random.key(i))
    for a, b in zip(jax.tree.leaves((full.trainable, full.opt_state)), jax.tree.leaves((fresh.trainable, fresh.opt_state))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- simu-jax unlearn


# The end-to-end check (a `simu-jax unlearn` run of simu_newton writes rho / cg_exit / cos per step;
# --dry-run plans every Newton-type method) reuses the quick demo's runs: tests/test_demo_unlearn.py.
