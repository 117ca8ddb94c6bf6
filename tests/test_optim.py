"""Tests for simu_jax.optim: Sophia vs a numpy reference, bit-exact masking, Newton-CG."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from simu_jax import curvature as C
from simu_jax import optim as O


def _bits(x):
    """Raw bit pattern, so -0.0 != +0.0 and NaN payloads count."""
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def _bit_equal(a, b):
    return np.array_equal(_bits(a), _bits(b))


# ----------------------------------------------------------------------------
# Sophia against a hand-written numpy reference
# ----------------------------------------------------------------------------

# Toy problem: L(p) = sum(0.5 * a * p^2 + sin(p)); the gradient depends on p, so
# the 10 steps feed back through the parameters.
A_COEF = {"u": np.array([0.5, 2.0, -1.0]), "w": np.array([[3.0, 0.1], [1.0, 4.0]])}
H_SCALE = {"u": np.array([1e-3, 5.0, 50.0]), "w": np.array([[0.02, 20.0], [1e-4, 8.0]])}


def _toy_grad(p):
    return {k: A_COEF[k] * p[k] + np.cos(p[k]) for k in p}


def _toy_hhat(p, step):
    """A positive, step- and param-dependent curvature estimate spanning 5 decades."""
    return {k: H_SCALE[k] * (1.0 + 0.5 * np.sin(p[k] + step)) for k in p}


def _sophia_reference(p0, steps, lr_fn, b1, b2, rho, bs, wd, eps, clip, k):
    p = {n: v.copy() for n, v in p0.items()}
    m = {n: np.zeros_like(v) for n, v in p0.items()}
    h = {n: np.zeros_like(v) for n, v in p0.items()}
    clipped = unclipped = 0
    for t in range(steps):
        g = _toy_grad(p)
        hh = _toy_hhat(p, t)
        lr = lr_fn(t)
        for n in p:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            if t % k == 0:
                h[n] = b2 * h[n] + (1 - b2) * hh[n]
            ratio = m[n] / np.maximum(rho * bs * h[n], eps)
            clipped += int(np.sum(np.abs(ratio) > clip))
            unclipped += int(np.sum(np.abs(ratio) < clip))
            p[n] = p[n] - lr * wd * p[n] - lr * np.clip(ratio, -clip, clip)
    return p, m, h, clipped, unclipped


def test_sophia_matches_numpy_reference(x64):
    hp = dict(b1=0.9, b2=0.95, rho=0.04, bs=10.0, wd=0.1, eps=1e-15, clip=1.0, k=2)
    lr_fn = lambda t: 0.05 * (1.0 - t / 20.0)  # noqa: E731  linear decay
    p0 = {"u": np.array([0.3, -1.2, 2.0]), "w": np.array([[0.5, -0.4], [1.5, -2.5]])}

    ref_p, ref_m, ref_h, clipped, unclipped = _sophia_reference(p0, 10, lr_fn, **hp)
    assert clipped > 0 and unclipped > 0  # both regimes exercised

    # A schedule (callable of the count). optax's own schedules compute in float32
    # even under x64, so a float64 one keeps this comparison at float64 precision.
    tx = O.sophia(
        lambda count: 0.05 * (1.0 - count / 20.0),
        b1=hp["b1"], b2=hp["b2"], rho=hp["rho"], batch_scale=hp["bs"], weight_decay=hp["wd"],
        eps=hp["eps"], clip_threshold=hp["clip"], update_interval=hp["k"],
    )  # fmt: skip
    params = jax.tree.map(jnp.asarray, p0)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        p_np = params  # traced; mirror the reference with jnp
        g = {k: A_COEF[k] * p_np[k] + jnp.cos(p_np[k]) for k in p_np}
        hh = {k: H_SCALE[k] * (1.0 + 0.5 * jnp.sin(p_np[k] + state.count)) for k in p_np}
        upd, state = tx.update(g, state, params, hessian_estimate=hh)
        return optax.apply_updates(params, upd), state

    for _ in range(10):
        params, state = step(params, state)

    assert int(state.count) == 10
    for n in p0:
        np.testing.assert_allclose(np.asarray(params[n]), ref_p[n], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(state.mu[n]), ref_m[n], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(state.hessian[n]), ref_h[n], rtol=1e-12, atol=1e-14)


def test_sophia_hessian_only_refreshed_on_curvature_steps():
    tx = O.sophia(0.1, b2=0.5, update_interval=3)
    p = {"a": jnp.zeros(2)}
    s = tx.init(p)
    seen = []
    for t in range(7):
        _, s = tx.update({"a": jnp.ones(2)}, s, p, hessian_estimate={"a": jnp.full(2, float(t + 1))})
        seen.append(float(s.hessian["a"][0]))
    # refresh at t = 0, 3, 6 with h_hat = 1, 4, 7
    h0 = 0.5 * 1.0
    h3 = 0.5 * h0 + 0.5 * 4.0
    h6 = 0.5 * h3 + 0.5 * 7.0
    np.testing.assert_allclose(seen, [h0, h0, h0, h3, h3, h3, h6], rtol=1e-6)


def test_sophia_negative_curvature_gives_clipped_sign_step():
    """max(rho*h, eps) (paper), not SophiaG's rho*h + eps: h < 0 -> full clipped step along -sign(m)."""
    tx = O.sophia(0.1, rho=1.0, update_interval=1)
    p = {"a": jnp.zeros(3)}
    s = tx.init(p)
    g = {"a": jnp.asarray([2.0, -3.0, 1e-3])}
    upd, _ = tx.update(g, s, p, hessian_estimate={"a": jnp.asarray([-5.0, -5.0, -5.0])})
    np.testing.assert_allclose(np.asarray(upd["a"]), [-0.1, 0.1, -0.1], rtol=1e-6)


def test_sophia_state_float32_for_bf16_params_and_requires_estimate():
    p = {"a": jnp.ones((2, 3), jnp.bfloat16)}
    tx = O.sophia(1e-2, weight_decay=0.1)
    s = tx.init(p)
    assert s.mu["a"].dtype == jnp.float32 and s.hessian["a"].dtype == jnp.float32
    upd, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p, hessian_estimate=C.fisher_diagonal(p))
    assert upd["a"].dtype == jnp.bfloat16 and s.mu["a"].dtype == jnp.float32
    with pytest.raises(ValueError, match="hessian_estimate"):
        tx.update(p, s, p)


def _float_leaves(state):
    return [x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]


@pytest.mark.parametrize("kind", ["adamw", "sophia"])
@pytest.mark.parametrize("use_mask", [False, True])
def test_state_float32_for_bf16_params(kind, use_mask):
    """Every float leaf of the optimizer state (AdamW's mu *and* nu, Sophia's m and h) is float32
    under bf16 params, after init (also under jit, as the engine builds it) and after updates;
    the updates come back in bf16."""
    p = {"a": jnp.linspace(-1, 1, 6, dtype=jnp.bfloat16).reshape(2, 3), "b": jnp.ones((4,), jnp.bfloat16)}
    mask = {"a": jnp.asarray([[True], [False]]), "b": True} if use_mask else None
    tx = (O.adamw(1e-2, weight_decay=0.1, mask=mask) if kind == "adamw"
          else O.sophia(1e-2, weight_decay=0.1, mask=mask, update_interval=1))
    for s in (tx.init(p), jax.jit(tx.init)(p)):
        assert len(_float_leaves(s)) == 4  # two params-shaped moments x two leaves
        assert all(x.dtype == jnp.float32 for x in _float_leaves(s))
    extra = {"hessian_estimate": C.fisher_diagonal(p)} if kind == "sophia" else {}
    g = jax.tree.map(lambda x: (0.3 * x + 0.01).astype(jnp.bfloat16), p)
    for _ in range(2):
        upd, s = tx.update(g, s, p, **extra)
        assert all(x.dtype == jnp.float32 for x in _float_leaves(s))
        assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(upd))


def test_adamw_bf16_computes_in_fp32():
    """AdamW on bf16 params/grads equals optax.adamw on the same values in fp32, with the update
    rounded to bf16 once at the end (bit for bit): nothing is rounded to bf16 in between
    (plain optax would keep nu, hence g**2, in bf16)."""
    p = {"a": jnp.asarray([0.5, -1.25, 3.0, 1e-3], jnp.bfloat16)}
    g = {"a": jnp.asarray([1e-3, -2.0, 0.07, 5.0], jnp.bfloat16)}
    tx = O.adamw(1e-2, weight_decay=0.1)
    ref = optax.adamw(1e-2, weight_decay=0.1)
    p32, g32 = jax.tree.map(lambda x: x.astype(jnp.float32), (p, g))
    s, r = tx.init(p), ref.init(p32)
    for _ in range(3):
        upd, s = tx.update(g, s, p)
        want, r = ref.update(g32, r, p32)
        assert _bit_equal(upd["a"], want["a"].astype(jnp.bfloat16))
    assert _bit_equal(s[0].mu["a"], r[0].mu["a"]) and _bit_equal(s[0].nu["a"], r[0].nu["a"])


def test_sophia_in_chain_receives_hessian_estimate():
    tx = optax.chain(optax.clip_by_global_norm(1.0), O.sophia(0.1, update_interval=1))
    p = {"a": jnp.asarray([1.0, 2.0])}
    s = tx.init(p)
    _, s = tx.update({"a": jnp.asarray([3.0, 4.0])}, s, p, hessian_estimate={"a": jnp.asarray([2.0, 6.0])})
    np.testing.assert_allclose(np.asarray(s[1].hessian["a"]), [0.1, 0.3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s[1].mu["a"]), [0.06, 0.08], rtol=1e-6)  # clipped grads
    assert int(O.sophia_count(s)) == 1


# ----------------------------------------------------------------------------
# Triple masking: bit-exact outside the mask
# ----------------------------------------------------------------------------


def _masked_problem():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(2, 3, 4)).astype(np.float32)
    kernel[0, 1, :2] = -0.0  # frozen neuron: -0.0 would become +0.0 under p + 0.0
    neuron_mask = np.array([[[True], [False], [True]], [[False], [False], [True]]])  # [L, I, 1]
    params = {
        "kernel": jnp.asarray(kernel),
        "frozen": jnp.asarray(np.array([-0.0, 1.0, -2.5, 3.0], np.float32)),
        "free": jnp.asarray(rng.normal(size=(3,)).astype(np.float32)),
    }
    mask = {"kernel": jnp.asarray(neuron_mask), "frozen": False, "free": True}
    full_mask = {
        "kernel": np.broadcast_to(neuron_mask, kernel.shape),
        "frozen": np.zeros(4, bool),
        "free": np.ones(3, bool),
    }
    return params, mask, full_mask


def _grads_and_junk_curvature(params, full_mask, t):
    # Nonzero gradients everywhere; curvature NaN/inf outside the mask.
    g = jax.tree.map(lambda p: jnp.cos(p + t) + 0.5, params)
    h = jax.tree.map(
        lambda p, m: jnp.where(m, jnp.abs(jnp.sin(p)) + 0.1, jnp.nan), params, full_mask
    )
    h = {**h, "frozen": jnp.full((4,), jnp.inf)}
    return g, h


def _check_masked_run(p0, params, states, full_mask):
    for name, m in full_mask.items():
        start, end = np.asarray(p0[name]), np.asarray(params[name])
        assert _bit_equal(start[~m], end[~m]), name  # frozen: bit for bit
        assert np.all(start[m] != end[m]), name  # trainable: all moved
        for tree in states:
            leaf = np.asarray(tree[name])
            assert _bit_equal(leaf[~m], np.zeros_like(leaf[~m])), name  # still +0.0
            assert np.all(leaf[m] != 0), name


def test_sophia_triple_mask_is_bit_exact_outside():
    params, mask, full_mask = _masked_problem()
    p0 = jax.tree.map(np.asarray, params)
    lr = optax.warmup_cosine_decay_schedule(0.0, 0.05, 2, 6)
    tx = O.sophia(lr, rho=0.04, batch_scale=2.0, weight_decay=0.1, update_interval=2, mask=mask)
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        g, h = _grads_and_junk_curvature(params, full_mask, t)
        upd, state = tx.update(g, state, params, hessian_estimate=h)
        return O.masked_apply(params, upd, mask), state, upd

    for t in range(6):
        params, state, upd = step(params, state, jnp.float32(t))
        for name, m in full_mask.items():  # updates exactly +0.0 outside
            assert _bit_equal(np.asarray(upd[name])[~m], np.zeros(int((~m).sum()), np.float32))
    assert int(state.count) == 6
    _check_masked_run(p0, params, [state.mu, state.hessian], full_mask)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves((params, state)))


def test_adamw_mask_is_bit_exact_outside():
    params, mask, full_mask = _masked_problem()
    p0 = jax.tree.map(np.asarray, params)
    tx = O.adamw(0.05, weight_decay=0.1, mask=mask)
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        g, _ = _grads_and_junk_curvature(params, full_mask, t)
        g = {**g, "frozen": jnp.full((4,), jnp.nan)}  # junk gradient on a frozen leaf
        upd, state = tx.update(g, state, params)
        return O.masked_apply(params, upd, mask), state

    for t in range(6):
        params, state = step(params, state, jnp.float32(t))
    adam_state = state[0]
    assert int(adam_state.count) == 6
    _check_masked_run(p0, params, [adam_state.mu, adam_state.nu], full_mask)

    # Inside the mask it is plain optax.adamw.
    ref_tx = optax.adamw(0.05, weight_decay=0.1)
    ref_p, ref_s = jax.tree.map(jnp.asarray, p0), ref_tx.init(p0)
    for t in range(6):
        g, _ = _grads_and_junk_curvature(ref_p, full_mask, jnp.float32(t))
        u, ref_s = ref_tx.update(g, ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
    np.testing.assert_allclose(np.asarray(params["free"]), np.asarray(ref_p["free"]), rtol=1e-6)


def test_masked_preserves_previous_state_not_zero():
    """A mask change mid-run: entries leaving the mask keep their momentum, not decay it."""
    p = {"a": jnp.zeros(2)}
    tx_all = O.sophia(0.1, update_interval=1, mask={"a": jnp.asarray([True, True])})
    tx_half = O.sophia(0.1, update_interval=1, mask={"a": jnp.asarray([True, False])})
    s = tx_all.init(p)
    g, h = {"a": jnp.ones(2)}, {"a": jnp.ones(2)}
    _, s = tx_all.update(g, s, p, hessian_estimate=h)
    mu1, h1 = np.asarray(s.mu["a"]), np.asarray(s.hessian["a"])
    _, s = tx_half.update(g, s, p, hessian_estimate=h)
    assert _bit_equal(np.asarray(s.mu["a"])[1], mu1[1]) and _bit_equal(np.asarray(s.hessian["a"])[1], h1[1])
    assert np.asarray(s.mu["a"])[0] != mu1[0]


# ----------------------------------------------------------------------------
# Curvature estimators plugged into Sophia
# ----------------------------------------------------------------------------


def test_curvature_estimators_and_schedule():
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=5))
    wts = jnp.asarray([1.0, 0.0, 1.0, 1.0, 0.0])
    loss_fn = lambda p, x, y: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"], y))  # noqa: E731
    logits_fn = lambda p, x, y: (x @ p["w"], wts)  # noqa: E731
    key = jax.random.key(3)
    grads = jax.jit(jax.grad(loss_fn))(params, x, y)

    fisher = O.make_curvature_estimator("fisher")
    hutch = O.make_curvature_estimator("hutchinson", loss_fn=loss_fn, num_probes=3)
    gnb = O.make_curvature_estimator("gnb", logits_fn=logits_fn)
    np.testing.assert_array_equal(fisher(params, key, grads, x, y)["w"], np.asarray(grads["w"]) ** 2)
    np.testing.assert_array_equal(
        jax.jit(hutch)(params, key, grads, x, y)["w"],
        jax.jit(lambda p, k: C.hutchinson_diagonal(loss_fn, p, k, 3, x, y))(params, key)["w"],
    )
    np.testing.assert_array_equal(
        jax.jit(gnb)(params, key, grads, x, y)["w"],
        jax.jit(lambda p, k: C.gnb_diagonal(lambda q: x @ q["w"], p, k, wts))(params, key)["w"],
    )
    with pytest.raises(ValueError):
        O.make_curvature_estimator("newton")

    sched = jax.jit(lambda step: O.curvature_on_schedule(gnb, step, 4, params, key, grads, x, y))
    # same computation compiled inside a cond: equal up to float32 rounding
    np.testing.assert_allclose(sched(8)["w"], jax.jit(gnb)(params, key, grads, x, y)["w"], rtol=1e-6)
    np.testing.assert_array_equal(sched(9)["w"], np.zeros((3, 4), np.float32))


def test_sophia_training_loop_decreases_loss():
    """End to end: jit loop with GNB curvature on a schedule, loss goes down."""
    rng = np.random.default_rng(2)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)) * 0.1, jnp.float32), "b": jnp.zeros(4)}
    x = jnp.asarray(rng.normal(size=(64, 3)), jnp.float32)
    y = jnp.argmax(x @ jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), -1)
    loss_fn = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y))  # noqa: E731
    est = O.make_curvature_estimator("gnb", logits_fn=lambda p: (x @ p["w"] + p["b"], None))
    tx = O.sophia(0.05, rho=0.04, update_interval=5)
    state = tx.init(params)

    @jax.jit
    def step(params, state, key):
        loss, g = jax.value_and_grad(loss_fn)(params)
        h = O.curvature_on_schedule(est, O.sophia_count(state), 5, params, key, g)
        upd, state = tx.update(g, state, params, hessian_estimate=h)
        return optax.apply_updates(params, upd), state, loss

    losses = []
    for i in range(40):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------
# Newton-CG
# ----------------------------------------------------------------------------


def _quadratic(n=8, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = (q * rng.uniform(0.5, 10.0, n)) @ q.T
    b = rng.normal(size=n)
    params = {"x": jnp.asarray(rng.normal(size=(3,))), "y": jnp.asarray(rng.normal(size=(n - 3,)))}
    Aj, bj = jnp.asarray(A), jnp.asarray(b)

    def loss(p):
        v = ravel_pytree(p)[0]
        return 0.5 * v @ Aj @ v - bj @ v

    return A, b, params, loss


def test_newton_cg_reaches_quadratic_minimizer_in_one_step(x64):
    A, b, params, loss = _quadratic()
    step = jax.jit(lambda p: O.newton_cg_step(loss, p, damping=0.0, trust_radius=1e6, maxiter=8, tol=1e-13))
    new, info = step(params)
    np.testing.assert_allclose(ravel_pytree(new)[0], np.linalg.solve(A, b), rtol=1e-10, atol=1e-12)
    assert float(info["step_scale"]) == 1.0 and int(info["cg_iterations"]) <= 8
    # Quadratic model is exact: predicted decrease = actual decrease.
    np.testing.assert_allclose(float(info["predicted_decrease"]), float(loss(params) - loss(new)), rtol=1e-10)


def test_newton_cg_trust_radius_caps_step(x64):
    A, b, params, loss = _quadratic()
    x0 = np.asarray(ravel_pytree(params)[0])
    newton = jax.jit(lambda p: O.newton_cg_step(loss, p, damping=0.0, trust_radius=0.1, maxiter=8, tol=1e-13))
    new, info = newton(params)
    step = np.asarray(ravel_pytree(new)[0]) - x0
    np.testing.assert_allclose(np.linalg.norm(step), 0.1, rtol=1e-12)
    full = np.linalg.solve(A, b) - x0  # direction of the full Newton step
    np.testing.assert_allclose(step, 0.1 * full / np.linalg.norm(full), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(info["step_norm"]), 0.1, rtol=1e-12)


def test_newton_cg_damping_and_mask(x64):
    A, b, params, loss = _quadratic()
    x0 = np.asarray(ravel_pytree(params)[0])
    g = A @ x0 - b
    lam = 0.5
    # Damped: d = (A + lam I)^-1 g.
    new, _ = O.newton_cg_step(loss, params, damping=lam, trust_radius=1e6, maxiter=8, tol=1e-13)
    np.testing.assert_allclose(ravel_pytree(new)[0], x0 - np.linalg.solve(A + lam * np.eye(8), g), rtol=1e-10)

    # Masked: solve on the subspace S only; the rest stays bit for bit.
    mask = {"x": jnp.asarray([True, False, True]), "y": jnp.asarray([False, True, True, False, True])}
    s = np.asarray(ravel_pytree(mask)[0]).astype(bool)
    new, _ = O.newton_cg_step(loss, params, damping=0.0, trust_radius=1e6, maxiter=8, tol=1e-13, mask=mask)
    xn = np.asarray(ravel_pytree(new)[0])
    expected = x0.copy()
    expected[s] = x0[s] - np.linalg.solve(A[np.ix_(s, s)], g[s])
    np.testing.assert_allclose(xn, expected, rtol=1e-10)
    assert _bit_equal(xn[~s], x0[~s])


def test_newton_cg_negative_curvature_falls_back_to_gradient(x64):
    params = {"x": jnp.asarray([1.0, 0.0])}
    loss = lambda p: -0.5 * p["x"][0] ** 2 + p["x"][1] ** 2  # noqa: E731  g = (-1, 0), H = diag(-1, 2)
    new, info = O.newton_cg_step(loss, params, damping=0.0, trust_radius=0.25)
    assert bool(info["negative_curvature"])
    np.testing.assert_allclose(np.asarray(new["x"]), [1.25, 0.0], rtol=1e-12)  # -0.25 * g / |g|


def test_newton_cg_bf16_params_keep_dtype():
    params = {"x": jnp.asarray([1.0, -2.0], jnp.bfloat16)}
    loss = lambda p: jnp.sum(jnp.asarray([2.0, 4.0]) * p["x"].astype(jnp.float32) ** 2)  # noqa: E731  min at 0
    new, info = jax.jit(lambda p: O.newton_cg_step(loss, p, damping=0.0, trust_radius=10.0))(params)
    assert new["x"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new["x"], np.float32), [0.0, 0.0], atol=2e-2)
    assert info["d_norm"].dtype == jnp.float32
