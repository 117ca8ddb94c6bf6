"""Integrated-gradients neuron attribution against the definition, written out plainly."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simu_jax.attribution import neuron_scores
from simu_jax.losses import mean_nll_per_example
from simu_jax.models import ModelConfig, apply, apply_with_aux, init_model, split_params

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, initializer_range=0.3)
LENGTHS = (16, 13, 10, 6)  # right-padded rows of different lengths
B, T = len(LENGTHS), 16


def padded_batch(seed: int, width: int = T) -> dict:
    """Rows of LENGTHS tokens, answers in their second half, right-padded to `width` columns."""
    ids = np.zeros((B, width), np.int32)
    ids[:, :T] = np.random.default_rng(seed).integers(1, TINY["vocab_size"], size=(B, T))
    pos = np.arange(width)[None]
    n = np.asarray(LENGTHS)[:, None]
    mask = (pos < n).astype(np.int32)
    labels = np.where((pos >= n // 2) & (pos < n), ids, -100).astype(np.int32)
    return {"input_ids": np.where(mask == 1, ids, 0), "attention_mask": mask, "labels": labels}


@functools.cache
def tiny_model(model_type: str):
    return split_params(init_model(ModelConfig(model_type=model_type, **TINY), seed=1))


@pytest.fixture(scope="module", params=["llama", "olmo2"])
def model(request):
    return tiny_model(request.param)


def answer_positions(labels) -> jax.Array:
    """[B, T]: position t predicts answer token t + 1 (the last position predicts nothing)."""
    return jnp.pad(labels[:, 1:] != -100, ((0, 0), (0, 1)))


def path_scale(layer, alpha, answer):
    """`mlp_scale` [L, B, T, 1] of the IG path: alpha on layer l's answer positions, 1 elsewhere."""
    is_layer = (jnp.arange(TINY["num_hidden_layers"]) == layer)[:, None, None, None]
    return jnp.where(is_layer & answer[None, ..., None], alpha, 1.0)


def loglik(graphdef, params, batch, scale, delta=None):
    """sum_i L_i: each row's mean answer-token log-likelihood, summed (full logits, plain loss)."""
    logits = apply(graphdef, params, batch["input_ids"], batch["attention_mask"], mlp_scale=scale, mlp_delta=delta)
    return -jnp.sum(mean_nll_per_example(logits, batch["labels"]))


@functools.partial(jax.jit, static_argnames="graphdef")
def naive_grad(graphdef, params, batch, layer, alpha):
    """jax.grad of sum_i L_i w.r.t. an additive delta on layer l's activations, with layer l's
    answer positions scaled by alpha and everything else untouched (one (layer, alpha) at a time)."""
    _, aux = apply_with_aux(graphdef, params, batch["input_ids"], batch["attention_mask"], return_mlp_acts=True)
    acts = aux["mlp_acts"]
    is_layer = (jnp.arange(acts.shape[0]) == layer)[:, None, None, None]
    scale = path_scale(layer, alpha, answer_positions(batch["labels"]))
    grad = jax.grad(lambda d: loglik(graphdef, params, batch, scale, jnp.where(is_layer, d[None], 0.0)))
    return acts[layer], grad(jnp.zeros(acts.shape[1:], jnp.float32))


def naive_scores(graphdef, params, batch, steps: int) -> np.ndarray:
    """Att(l, k) = sum over answer positions of a_l * (1/m) sum_{j=1..m} dLL/da_l at alpha_j = j/m."""
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    answer = np.asarray(answer_positions(batch["labels"]))
    out = []
    for layer in range(TINY["num_hidden_layers"]):
        grads = [naive_grad(graphdef, params, batch, layer, j / steps) for j in range(1, steps + 1)]
        acts = np.asarray(grads[0][0])
        out.append((acts * sum(np.asarray(g) for _, g in grads) / steps)[answer].sum(0))
    return np.stack(out)


# OLMo-2 m = 1 is left out (each case is one more compilation): its alpha = 1 pass is the
# plain network, the same program as LLaMA's, and it is the j = m term of OLMo-2's m = 3
@pytest.mark.parametrize("model_type, steps", [("llama", 1), ("llama", 3), ("olmo2", 3)])
def test_ig_equals_naive_definition(model_type, steps):
    graphdef, params = tiny_model(model_type)
    batch = padded_batch(0)
    got = neuron_scores(graphdef, params, [batch], method="ig" if steps > 1 else "grad_x_act", steps=steps)
    want = naive_scores(graphdef, params, batch, steps)
    # same float32 ops, summed in another order (alphas batched, a suffix rerun from the cached
    # layer input, the alpha sums regrouped): differences are rounding, ~1e-7 of the scale of the
    # summed terms; 1e-5 of each layer's largest score leaves two orders of margin
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale.max())
    assert np.all(np.abs(got - want) <= 1e-5 * scale)


def test_padding_columns_change_no_score(model):
    """Extra all-padding columns (trimmed to a bucket before scoring) leave the scores as they are."""
    graphdef, params = model
    narrow = neuron_scores(graphdef, params, [padded_batch(2)], steps=3)
    wide = neuron_scores(graphdef, params, [padded_batch(2, width=40)], steps=3)
    np.testing.assert_allclose(wide, narrow, rtol=1e-5, atol=1e-6 * np.abs(narrow).max())


def test_suffix_run_reproduces_forward(model):
    """run(start_layer=l, start_residual=r_l, start_neurons=a_l) from a full run's cached mid
    residuals and activations gives its logits; with the neurons scaled, the scaled full run's."""
    graphdef, params = model
    batch = padded_batch(1)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    logits, aux = jax.jit(lambda: apply_with_aux(graphdef, params, ids, mask, return_mlp_residuals=True,
                                                 return_mlp_acts=True))()
    n_layers = TINY["num_hidden_layers"]
    assert aux["mlp_residuals"].shape == (n_layers, B, T, TINY["hidden_size"])

    @jax.jit
    def suffix(layer, residual, neurons):
        return apply_with_aux(graphdef, params, ids, mask, start_layer=layer, start_residual=residual,
                              start_neurons=neurons, return_mlp_acts=True)

    # the same float32 function compiled as other programs (XLA fuses across the unrolled layers
    # differently): rounding, a few ulps of the logits' scale (~6 here); a wrong layer or a
    # missed scaling is O(1)
    atol = 1e-5 * float(jnp.abs(logits).max())
    for layer in range(n_layers):
        out, sub = suffix(layer, aux["mlp_residuals"][layer], aux["mlp_acts"][layer])
        np.testing.assert_allclose(np.asarray(out), np.asarray(logits), rtol=1e-5, atol=atol)
        np.testing.assert_allclose(np.asarray(sub["mlp_acts"][layer:]), np.asarray(aux["mlp_acts"][layer:]),
                                   rtol=1e-4, atol=1e-5)
        assert not np.asarray(sub["mlp_acts"][:layer]).any()  # the skipped layers did not run
        scale = jnp.where((jnp.arange(n_layers) == layer)[:, None, None, None], 0.5, 1.0)
        scaled = apply(graphdef, params, ids, mask, mlp_scale=scale)
        out, _ = suffix(layer, aux["mlp_residuals"][layer], 0.5 * aux["mlp_acts"][layer])
        np.testing.assert_allclose(np.asarray(out), np.asarray(scaled), rtol=1e-5, atol=atol)
    with pytest.raises(ValueError, match="start_layer, start_residual and start_neurons"):
        apply_with_aux(graphdef, params, ids, mask, start_layer=1)


@pytest.mark.parametrize("method, dual, scored", [("ig", "include", 2), ("random", "exclude", 2),
                                                  ("random", "include", 1)])
def test_compute_mask_scores_retain_only_when_used(monkeypatch, method, dual, scored):
    """Retain scores feed dual='exclude' and the summary's retain counts; a random mask with
    dual='include' keeps neither, so only the forget set is attributed."""
    import simu_jax.attribution as attribution
    from simu_jax.unlearn import AttributionSpec, Prepared, UnlearnConfig, compute_mask

    calls = []
    monkeypatch.setattr(attribution, "neuron_scores",
                        lambda *a, **k: calls.append(1) or np.random.default_rng(len(calls)).random((2, 8)))
    arrays = {k: padded_batch(0) for k in ("forget", "retain")}
    prep = Prepared(None, None, None, None, None, None, None, arrays)
    mask = compute_mask(UnlearnConfig(attribution=AttributionSpec(method=method, dual=dual)), prep)
    assert len(calls) == scored and mask.selected.shape == (2, 8)


def test_ig_completeness_on_answer_positions():
    """IG's completeness, per layer: the scores summed over neurons and answer positions are the
    right Riemann sum (1/m) sum_j f'(j/m) of f(alpha) = LL(layer l's answer-position neurons
    scaled by alpha), f' from jax.grad of the scalar alpha; so they converge to
    f(1) - f(0) = LL(a) - LL(those neurons zeroed), the error shrinking with m."""
    graphdef, params = tiny_model("llama")
    batch = {k: jnp.asarray(v) for k, v in padded_batch(3).items()}
    answer, layer = answer_positions(batch["labels"]), 1
    f = jax.jit(lambda alpha: loglik(graphdef, params, batch, path_scale(layer, alpha, answer)))
    df = jax.jit(jax.grad(lambda alpha: loglik(graphdef, params, batch, path_scale(layer, alpha, answer))))
    exact = float(f(1.0)) - float(f(0.0))
    errors = []
    for m in (1, 4, 16):
        got = float(neuron_scores(graphdef, params, [padded_batch(3)], method="ig", steps=m)[layer].sum())
        riemann = float(np.mean([df(j / m) for j in range(1, m + 1)]))
        # the same sum through the chain rule, regrouped: float32 rounding of terms of size ~|exact|
        assert abs(got - riemann) <= 1e-4 * abs(exact)
        errors.append(abs(got - exact))
    # the right Riemann sum's error is (f'(1) - f'(0)) / (2m) + O(1/m^2): ~4x smaller from m = 4 to
    # 16 (measured here: 0.66, 0.104, 0.030 for f(1) - f(0) = 0.143; this random tiny model's f is
    # far from linear, so m = 1 is off by more than the difference itself)
    first_order = abs(float(df(1.0)) - float(df(0.0))) / 2
    assert errors[0] > errors[1] > 2.5 * errors[2]
    assert errors[2] < 1.5 * first_order / 16


def test_ig_with_a_cached_prefix_equals_naive_definition():
    """Rows whose answers all start late: the suffix runs recompute only the columns from the
    first answer on (the earlier columns' keys and values from the alpha = 1 pass's cache), and
    the scores are still the definition's."""
    from simu_jax.attribution import _unscaled_prefix

    graphdef, params = tiny_model("llama")
    width, lengths, answer_from = 48, (48, 40, 33, 30), (30, 24, 25, 26)
    rng = np.random.default_rng(5)
    pos, n = np.arange(width)[None], np.asarray(lengths)[:, None]
    mask = (pos < n).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, TINY["vocab_size"], size=(len(lengths), width)), 0).astype(np.int32)
    labels = np.where((pos >= np.asarray(answer_from)[:, None]) & (pos < n), ids, -100).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # first scored column 23 (row 1 predicts its answer from there): suffix 25 -> bucket 32
    assert _unscaled_prefix(labels, all_positions=False) == 16
    assert _unscaled_prefix(labels, all_positions=True) == 0
    got = neuron_scores(graphdef, params, [batch], method="ig", steps=3)
    want = naive_scores(graphdef, params, batch, 3)
    scale = np.abs(want).max(axis=1, keepdims=True)  # as in test_ig_equals_naive_definition
    assert np.all(np.abs(got - want) <= 1e-5 * scale)
