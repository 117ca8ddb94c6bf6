"""SIMU core on a tiny model: attribution, compact neuron rows, masking, determinism, exact HVP vs torch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_fixtures import build_hf_model
from simu_jax.attribution import NeuronMask, build_mask, critical_neurons, neuron_scores, random_mask_like
from simu_jax.curvature import hvp
from simu_jax.engine import StepSettings, Unlearner, get_method
from simu_jax.losses import LossSpec
from simu_jax.optim import OptimSpec
from simu_jax.losses import mean_nll_per_example, token_mean_nll
from simu_jax.models import ModelConfig, apply, apply_with_aux, init_model, split_params
from simu_jax.models.convert import hf_tensors_from_params, load_pretrained
from simu_jax.selection import SIMU, Partition, TrainableSpec

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.1)
B, T = 4, 16


def make_batch(seed: int, answer_from: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[-1, 12:] = 0  # one right-padded row
    labels = np.where(np.arange(T)[None] >= answer_from, ids, -100).astype(np.int32)
    labels[mask == 0] = -100
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}


@pytest.fixture(scope="module")
def model():
    return split_params(init_model(CFG, seed=0))


@pytest.fixture(scope="module")
def mask(model):
    graphdef, params = model
    forget = neuron_scores(graphdef, params, [make_batch(0)], steps=3)
    retain = neuron_scores(graphdef, params, [make_batch(1)], steps=3)
    return build_mask(forget, retain, threshold=0.3)


def pair(seed):
    return {"forget": make_batch(seed), "retain": make_batch(seed + 100)}


def test_label_shift_losses_equal_sliced_log_softmax():
    """The losses shift the labels, not the logits: token log-probs, their gradient, accuracy and
    KL equal the textbook slice `logits[:, :-1]` + log_softmax computed in numpy (padding row and
    IGNORE labels included)."""
    from simu_jax.losses import kl_to_reference, token_accuracy, token_logprobs

    rng = np.random.default_rng(0)
    z, zr = (rng.standard_normal((B, T, CFG.vocab_size)).astype(np.float32) * 3 for _ in range(2))
    labels = np.asarray(make_batch(0)["labels"])

    def log_softmax(x):
        x = x.astype(np.float64)[:, :-1]
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    tgt, valid = labels[:, 1:], labels[:, 1:] != -100
    lsm = log_softmax(z)
    onehot = (tgt[..., None] == np.arange(CFG.vocab_size)) & valid[..., None]
    want = np.where(valid, (lsm * onehot).sum(-1), 0.0)
    logp, got_valid = token_logprobs(jnp.asarray(z), jnp.asarray(labels))
    np.testing.assert_array_equal(np.asarray(got_valid)[:, :-1], valid)
    assert not np.asarray(got_valid)[:, -1].any()
    np.testing.assert_allclose(np.asarray(logp)[:, :-1], want, rtol=1e-5, atol=1e-5)
    # d(sum log p)/dz = onehot - softmax at valid positions, 0 elsewhere (and at the last position)
    grad = jax.grad(lambda x: jnp.sum(token_logprobs(x, jnp.asarray(labels))[0]))(jnp.asarray(z))
    want_grad = np.zeros_like(z, dtype=np.float64)
    want_grad[:, :-1] = np.where(valid[..., None], onehot - np.exp(lsm), 0.0)
    np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-6)
    hits, count = token_accuracy(jnp.asarray(z), jnp.asarray(labels))
    assert int(hits) == int(((z[:, :-1].argmax(-1) == tgt) & valid).sum()) and int(count) == int(valid.sum())
    lq = log_softmax(zr)
    kl = (np.exp(lq) * (lq - lsm)).sum(-1)
    np.testing.assert_allclose(float(kl_to_reference(jnp.asarray(z), jnp.asarray(zr), jnp.asarray(labels))),
                               (kl * valid).sum() / valid.sum(), rtol=1e-5)


def scored(batch: dict, width: int | None = None) -> dict:
    """``batch`` (one part) with its scored view (`data.with_scored_positions`)."""
    from simu_jax.data import with_scored_positions

    return jax.tree.map(jnp.asarray, with_scored_positions(jax.tree.map(np.asarray, batch), width))


def test_scored_positions_by_hand():
    """The scored view lists, per row, the positions whose next token has a label, left-aligned,
    with those labels as targets; padding is position 0 / IGNORE; the width is a bucket, and a
    width too small for a row is refused."""
    from simu_jax.data import scored_positions, scored_width

    labels = np.array([[-100, -100, 7, 8, -100, -100],
                       [-100, 5, -100, -100, -100, -100],
                       [-100] * 6])
    positions, targets = scored_positions(labels, width=3)
    np.testing.assert_array_equal(positions, [[1, 2, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(targets, [[7, 8, -100], [5, -100, -100], [-100, -100, -100]])
    assert scored_width(labels) == 6  # the 16-bucket, cut to T = 6
    assert scored_width(np.full((2, 64), 3)) == 64 and scored_width(np.where(np.arange(64) >= 40, 3, -100)[None]) == 32
    with pytest.raises(ValueError, match="more than the scored width 1"):
        scored_positions(labels, width=1)


OBJECTIVES = [("ga", LossSpec()), ("graddiff", LossSpec(normalization="sequence", gamma=2.0)), ("npo", LossSpec()),
              ("idk", LossSpec()), ("graddiff", LossSpec(retain_loss="kl"))]


def test_scored_view_equals_every_position(model):
    """The unlearning loss from the logits at the scored positions only (`logits_at`, the step
    batches of `run_unlearn`) equals the loss from every position's logits, value and gradient, for
    every objective, both normalizations and the KL retain term: the head and the loss are per
    position, and the other positions have no label (a padded row and rows of different answer
    lengths included)."""
    from simu_jax.losses import logit_positions, unlearning_loss

    graphdef, params = model
    ref = jax.tree.map(lambda x: x * 1.1, params)
    batch = {"forget": make_batch(0, answer_from=5), "retain": make_batch(1), "forget_idk": make_batch(2, 11)}
    batch["retain"]["labels"] = batch["retain"]["labels"].at[1, 8:12].set(-100)

    @jax.jit
    def values_and_grads(prm, b):
        fn = lambda p_, x: apply(graphdef, p_, x["input_ids"], x["attention_mask"], logits_at=logit_positions(x))
        return [jax.value_and_grad(lambda q, o=o, ls=ls: unlearning_loss(
            o, lambda x: fn(q, x), b, gamma=ls.gamma or 1.0, beta=ls.beta, retain_loss=ls.retain_loss,
            ref_logits_fn=lambda x: fn(ref, x), normalization=ls.normalization or "token")[0])(prm)
                for o, ls in OBJECTIVES]

    view = {k: scored(v) for k, v in batch.items()}
    assert view["forget"]["positions"].shape == (B, 16)
    assert int((view["forget"]["targets"] >= 0).sum()) == 3 * 11 + 7  # labels 5..15, 5..11 on the padded row
    for (o, _), (want, want_grad), (got, got_grad) in zip(OBJECTIVES, values_and_grads(params, batch),
                                                          values_and_grads(params, view)):
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6, err_msg=o)
        for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6 * float(np.abs(b).max()),
                                       err_msg=o)


@pytest.mark.parametrize("name", ["simu_graddiff", "simu_ggn"])
def test_step_on_the_scored_view_equals_the_full_step(model, mask, name):
    """One step of Sophia-H and of the Gauss-Newton trust region (its losses of the logits), on the
    SIMU subset, lands on the same parameters from a scored batch as from the plain one, and Sophia-G's GNB estimator
    sees the same rows of logits with weight 1 (its sampled labels then follow the same law)."""
    from simu_jax import engine

    graphdef, params = model
    batch = pair(0)
    view = {k: scored(v, width=8) for k, v in batch.items()}  # 8 answer positions a row, of T = 16
    after = []
    for b in (batch, view):
        u = Unlearner(graphdef, params, get_method(name), StepSettings(optim=OptimSpec(learning_rate=1e-2)),
                      selected=mask.selected if name.startswith("simu") else None)
        metrics = u.step(b, jax.random.key(3))
        after.append((float(metrics["loss"]), u.params()))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(after[1][1]), jax.tree.leaves(after[0][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

    part = Partition(params, SIMU, mask.selected)
    trainable, frozen = part.split(params)
    (z_full, w_full), (z_view, w_view) = (engine._gnb_logits(graphdef, part, part.rows, trainable, frozen, b)
                                          for b in (batch, view))
    assert float(w_view.sum()) == float(w_full.sum()) > 0 and len(w_view) < len(w_full)
    np.testing.assert_allclose(np.asarray(z_view)[np.asarray(w_view) > 0], np.asarray(z_full)[np.asarray(w_full) > 0],
                               rtol=1e-5, atol=1e-5)


def test_ig_completeness(model):
    """Summed over all positions, IG attributions of a layer add up to LL(a) - LL(0 * a)."""
    graphdef, params = model
    batch = make_batch(3)

    def loglik(scale):
        logits = apply(graphdef, params, batch["input_ids"], batch["attention_mask"], mlp_scale=scale)
        return -float(jnp.sum(mean_nll_per_example(logits, batch["labels"])))

    ones = jnp.ones((CFG.num_hidden_layers, 1, 1, 1))
    fine_scores = neuron_scores(graphdef, params, [batch], steps=64, all_positions=True)  # [L, I], all layers
    coarse_scores = neuron_scores(graphdef, params, [batch], steps=2, all_positions=True)
    for layer in range(CFG.num_hidden_layers):
        exact = loglik(ones) - loglik(ones.at[layer].set(0.0))
        fine, coarse = fine_scores[layer].sum(), coarse_scores[layer].sum()
        assert abs(fine - exact) < 0.02 * abs(exact) + 1e-4
        assert abs(fine - exact) < abs(coarse - exact)  # the Riemann sum converges


def test_planted_neurons_rank_on_top(model):
    """Train ONLY a few planted neurons' down_proj rows on the forget batch: attribution finds them."""
    graphdef, params = model
    forget = make_batch(7)
    # a memorizable "fact": every answer token is the same token, the one the untrained model
    # finds least likely (so no unit supports it before planting)
    answer = forget["labels"] != -100
    logits = apply(graphdef, params, forget["input_ids"], forget["attention_mask"])
    fact = int(jnp.argmin(jnp.mean(logits[:, 7:], axis=(0, 1))))
    forget = {**forget, "input_ids": jnp.where(answer, fact, forget["input_ids"]),
              "labels": jnp.where(answer, fact, -100)}
    # plant in units that are active on these inputs (a silent unit cannot carry anything) and
    # that attribution does NOT rank high before planting: the 3 most active such units
    _, aux = apply_with_aux(graphdef, params, forget["input_ids"], forget["attention_mask"], return_mlp_acts=True)
    where = np.asarray(forget["labels"][:, 1:] != -100)
    activity = np.abs(np.asarray(aux["mlp_acts"][1])[:, :-1][where]).mean(0)
    before_top = set(np.argsort(-neuron_scores(graphdef, params, [forget], steps=3)[1])[:5].tolist())
    chosen = set([k for k in np.argsort(-activity).tolist() if k not in before_top][:3])
    planted = np.zeros((CFG.num_hidden_layers, CFG.intermediate_size), bool)
    planted[1, sorted(chosen)] = True
    spec = TrainableSpec(attention="frozen", mlp="masked", rest="frozen")
    learner = Unlearner(graphdef, params, get_method("fo_idk", spec), StepSettings(optim=OptimSpec(learning_rate=5e-2), loss=LossSpec(gamma=0.0)),
                        selected=planted)
    for i in range(40):  # idk objective with gamma=0 on the forget batch itself = plain NLL training
        learner.step({"forget": forget, "retain": forget, "forget_idk": forget}, jax.random.key(i))
    trained = learner.params()
    before = float(token_mean_nll(apply(graphdef, params, forget["input_ids"], forget["attention_mask"]), forget["labels"]))
    after = float(token_mean_nll(apply(graphdef, trained, forget["input_ids"], forget["attention_mask"]), forget["labels"]))
    assert after < before - 1.0  # the planted units alone learned the forget answers
    scores = neuron_scores(graphdef, trained, [forget], steps=3)
    assert set(np.argsort(-scores[1])[:3].tolist()) == chosen
    # (gradient x activation, m = 1, misses one of the three here: saturation, why IG uses m > 1)


def test_masks_threshold_topk_dual_random():
    scores = np.array([[1.0, 0.6, 0.4, -2.0], [0.1, 0.2, 0.3, 0.05]])
    np.testing.assert_array_equal(critical_neurons(scores, threshold=0.5),
                                  [[True, True, False, False], [False, True, True, False]])
    np.testing.assert_array_equal(critical_neurons(scores, top_fraction=0.25),
                                  [[True, False, False, False], [False, False, True, False]])
    retain = np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    inc = build_mask(scores, retain, threshold=0.5, dual="include")
    exc = build_mask(scores, retain, threshold=0.5, dual="exclude")
    assert inc.counts == [2, 2] and exc.counts == [1, 1]
    assert inc.summary()["per_layer_dual"] == [1, 1]
    big = build_mask(np.random.default_rng(0).random((2, 200)), threshold=0.8)
    rnd = random_mask_like(big, seed=0)
    assert rnd.counts == big.counts and not np.array_equal(rnd.selected, big.selected)
    with pytest.raises(ValueError, match=r"threshold t must be in \(0, 1\]"):
        critical_neurons(scores, threshold=1.5)


def test_mask_save_load(tmp_path, mask):
    mask.save(tmp_path / "m")
    back = NeuronMask.load(tmp_path / "m")
    np.testing.assert_array_equal(back.selected, mask.selected)
    np.testing.assert_array_equal(back.forget, mask.forget)
    assert (tmp_path / "m" / "mask_summary.json").read_text().count("per_layer_selected") == 1
    with pytest.raises(FileNotFoundError):
        NeuronMask.load(tmp_path / "nothing")


def test_compact_rows_equal_full_gradient(model, mask):
    """Loss and gradient through the compact [L, K, H] rows equal the full down_proj kernel's rows."""
    graphdef, params = model
    batch = pair(5)
    full = Partition(params, TrainableSpec(attention="full", mlp="down", rest="frozen"))
    simu = Partition(params, SIMU, mask.selected)

    def loss(partition, trainable, frozen):
        p, kw = partition.combine(trainable, frozen)
        lg = lambda b: apply(graphdef, p, b["input_ids"], b["attention_mask"], **kw)  # noqa: E731
        return -token_mean_nll(lg(batch["forget"]), batch["forget"]["labels"]) + token_mean_nll(
            lg(batch["retain"]), batch["retain"]["labels"])

    tf, ff = full.split(params)
    ts, fs = simu.split(params)
    lf, gf = jax.value_and_grad(lambda t: loss(full, t, ff))(tf)
    ls, gs = jax.value_and_grad(lambda t: loss(simu, t, fs))(ts)
    # the loss is a difference of two NLLs (~4 each): its float32 rounding is relative to the terms
    # (on an AMD EPYC the two programs differ by 4.8e-7, 5e-6 of the ~0.09 difference)
    terms = float(token_mean_nll(apply(graphdef, params, batch["forget"]["input_ids"], batch["forget"]["attention_mask"]),
                                 batch["forget"]["labels"]))
    np.testing.assert_allclose(float(ls), float(lf), atol=1e-6 * 2 * terms)
    down_grad = np.asarray(gf["model/layers/mlp/down_proj/kernel"])
    for layer in range(CFG.num_hidden_layers):
        ids = np.flatnonzero(mask.selected[layer])
        np.testing.assert_allclose(np.asarray(gs["down_rows"])[layer, : len(ids)], down_grad[layer, ids],
                                   rtol=1e-4, atol=1e-7)
        assert np.all(np.asarray(gs["down_rows"])[layer, len(ids):] == 0)  # padding slots get nothing
    np.testing.assert_allclose(np.asarray(gs["model/layers/self_attn/q_proj/kernel"]),
                               np.asarray(gf["model/layers/self_attn/q_proj/kernel"]), rtol=1e-4, atol=1e-7)
    assert "model/layers/mlp/up_proj/kernel" not in gs  # frozen: never differentiated


@pytest.mark.parametrize("method", ["simu_graddiff", "simu_npo", "simu_newton"])
def test_outside_mask_bit_identical(model, mask, method):
    graphdef, params = model
    u = Unlearner(graphdef, params, get_method(method), StepSettings(optim=OptimSpec(learning_rate=1e-2)), selected=mask.selected)
    state0 = jax.tree.map(np.asarray, u.opt_state)
    for i in range(4):
        u.step(pair(i), jax.random.key(i))
    new = u.params()
    for path in (("model", "embed_tokens", "embedding"), ("lm_head", "kernel"), ("model", "norm", "weight")):
        a, b = params, new
        for k in path:
            a, b = a[k], b[k]
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    for name in ("gate_proj", "up_proj"):
        assert np.array_equal(np.asarray(params["model"]["layers"]["mlp"][name]["kernel"]),
                              np.asarray(new["model"]["layers"]["mlp"][name]["kernel"]))
    d0 = np.asarray(params["model"]["layers"]["mlp"]["down_proj"]["kernel"])
    d1 = np.asarray(new["model"]["layers"]["mlp"]["down_proj"]["kernel"])
    assert np.array_equal(d0[~mask.selected], d1[~mask.selected])  # unselected rows: bit for bit
    assert (d0[mask.selected] != d1[mask.selected]).any(axis=-1).all()  # every selected row moved
    assert not np.array_equal(np.asarray(params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]),
                              np.asarray(new["model"]["layers"]["self_attn"]["q_proj"]["kernel"]))
    # optimizer state: padding row slots (outside the mask) keep their initial values bit for bit
    valid = np.asarray(u.partition.row_valid)
    for before, after in zip(jax.tree.leaves(state0), jax.tree.leaves(u.opt_state)):
        if np.shape(before)[:2] == valid.shape and np.ndim(before) == 3:
            assert np.array_equal(np.asarray(before)[~valid], np.asarray(after)[~valid])
            assert not np.array_equal(np.asarray(before)[valid], np.asarray(after)[valid])


def _leaf(tree, path):
    for k in path:
        tree = tree[k]
    return tree


DOWN_PATH = ("model", "layers", "mlp", "down_proj", "kernel")


def test_unlearner_keeps_no_copy_of_params(model, mask):
    """The Unlearner holds the frozen tree (aliases of the caller's arrays, down_proj with the
    trained rows zeroed), a private trainable copy and the state; params() writes the trained
    values into the frozen tree and equals writing them into the original params."""
    graphdef, params = model
    u = Unlearner(graphdef, params, get_method("simu_graddiff"), StepSettings(optim=OptimSpec(learning_rate=1e-2)),
                  selected=mask.selected)
    assert not hasattr(u, "original") and u.ref is None
    for path in (("model", "embed_tokens", "embedding"), ("lm_head", "kernel"),
                 ("model", "layers", "mlp", "gate_proj", "kernel")):
        assert _leaf(u.frozen, path) is _leaf(params, path), path  # aliases, not copies
    assert _leaf(u.frozen, ("model", "layers", "self_attn", "q_proj", "kernel")) is None
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert u.trainable["model/layers/self_attn/q_proj/kernel"].unsafe_buffer_pointer() != q.unsafe_buffer_pointer()
    zeroed = np.asarray(_leaf(u.frozen, DOWN_PATH))
    assert np.all(zeroed[mask.selected] == 0) and np.array_equal(zeroed[~mask.selected],
                                                                 np.asarray(_leaf(params, DOWN_PATH))[~mask.selected])
    for a, b in zip(jax.tree.leaves(u.params()), jax.tree.leaves(params)):  # before any step: the original
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for i in range(2):
        u.step(pair(i), jax.random.key(i))
    merged, into_original = u.params(), u.partition.merge_back(u.trainable, params)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(into_original)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_padding_slots_do_not_undo_row_zeroing(model):
    """Neuron 0 selected in a layer with fewer than K neurons: the padding slots (index 0) must
    not write the original row back into the frozen down_proj, or the model would count that
    row twice (frozen kernel + compact row)."""
    graphdef, params = model
    sel = np.zeros((CFG.num_hidden_layers, CFG.intermediate_size), bool)
    sel[0, [3, 7, 11, 20]] = True
    sel[1, [0, 5]] = True  # K = 4: layer 1 has two padding slots, pointing at row 0
    part = Partition(params, SIMU, sel)
    trainable, frozen = part.split(params)
    assert np.all(np.asarray(_leaf(frozen, DOWN_PATH))[1, 0] == 0)
    full, kw = part.combine(trainable, frozen)
    batch = make_batch(4)
    want = apply(graphdef, params, batch["input_ids"], batch["attention_mask"])
    got = apply(graphdef, full, batch["input_ids"], batch["attention_mask"], **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(part.merge_back(trainable, frozen)), jax.tree.leaves(params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_step_compiles_once(model, mask):
    """On params committed to a device (as loaded models are), the first step compiles the step
    and later steps reuse it: the optimizer state starts committed like the step's outputs (an
    uncommitted initial state is a different jit cache entry, so step 2 compiled the whole step
    again: once per run, 8-25 s of each of the quick demo's methods at -O0; every optimizer's
    state, the Newton methods' trust region included, is made by the same ``tx.init``). Counted
    with JAX's backend-compile events; a learning rate no other test uses, so step 1 is a fresh
    compile."""
    graphdef, params = model
    params = jax.device_put(params, jax.devices()[0])
    compiles = []

    def on_event(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    u = Unlearner(graphdef, params, get_method("simu_graddiff"), StepSettings(optim=OptimSpec(learning_rate=0.0123)),
                  selected=mask.selected)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        jax.block_until_ready(u.step(pair(0), jax.random.key(0)))
        first = len(compiles)
        for i in (1, 2):
            jax.block_until_ready(u.step(pair(i), jax.random.key(i)))
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    assert first >= 1  # the listener sees the step's compile
    assert len(compiles) == first, f"steps 2-3 compiled {len(compiles) - first} more programs"


def test_simu_state_is_a_fraction_of_so(model, mask):
    graphdef, params = model
    so = Unlearner(graphdef, params, get_method("so_graddiff"), StepSettings())
    simu = Unlearner(graphdef, params, get_method("simu_graddiff"), StepSettings(), selected=mask.selected)
    assert simu.num_trainable < so.num_trainable
    # Sophia keeps two fp32 arrays per trainable scalar (+ padding slots and a counter)
    assert simu.state_bytes() < 0.6 * so.state_bytes()
    assert so.state_bytes() >= 8 * so.num_trainable


def test_same_seed_same_mask_and_params(model):
    graphdef, params = model

    def run():
        f = neuron_scores(graphdef, params, [make_batch(0)], steps=3)
        r = neuron_scores(graphdef, params, [make_batch(1)], steps=3)
        m = build_mask(f, r, threshold=0.3)
        u = Unlearner(graphdef, params, get_method("simu_graddiff"),
                      StepSettings(optim=OptimSpec(learning_rate=1e-2, estimator="gnb", update_interval=2)), selected=m.selected)
        for i in range(3):
            u.step(pair(i), jax.random.key(i))
        return m, u.params()

    (m1, p1), (m2, p2) = run(), run()
    assert np.array_equal(m1.selected, m2.selected)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_unlearning_raises_forget_loss(model, mask):
    graphdef, params = model
    batch = pair(9)
    before = float(token_mean_nll(apply(graphdef, params, batch["forget"]["input_ids"]), batch["forget"]["labels"]))
    for method in ("simu_graddiff", "fo_graddiff", "so_graddiff"):
        u = Unlearner(graphdef, params, get_method(method), StepSettings(optim=OptimSpec(learning_rate=1e-2)), selected=mask.selected)
        for i in range(5):
            u.step(batch, jax.random.key(i))
        after = float(token_mean_nll(apply(graphdef, u.params(), batch["forget"]["input_ids"]), batch["forget"]["labels"]))
        assert after > before + 0.1, method


def test_hvp_matches_torch_double_backward(tmp_path):
    """Exact HVP of the HF model's loss (ours, forward-over-reverse) vs torch double backward."""
    torch_model = build_hf_model("llama_gqa_untied", tmp_path / "m")
    jmodel = load_pretrained(tmp_path / "m")
    graphdef, params = split_params(jmodel)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, 127, size=(2, 24))
    labels = np.where(np.arange(24)[None] >= 10, ids, -100)

    def f(p):
        return token_mean_nll(apply(graphdef, p, jnp.asarray(ids)), jnp.asarray(labels))

    v = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    ours = hf_tensors_from_params(jmodel.config, hvp(f, params, v))

    named = dict(torch_model.named_parameters())
    v_t = {k: torch.as_tensor(np.asarray(a)) for k, a in hf_tensors_from_params(jmodel.config, v).items()}
    out = torch_model(torch.as_tensor(ids), labels=torch.as_tensor(labels))
    # HF's loss is the same token-mean NLL over shifted labels
    np.testing.assert_allclose(out.loss.item(), float(f(params)), rtol=1e-5)
    names = list(v_t)
    grads = torch.autograd.grad(out.loss, [named[n] for n in names], create_graph=True)
    dot = sum((g * v_t[n]).sum() for g, n in zip(grads, names))
    hv = torch.autograd.grad(dot, [named[n] for n in names])
    num = sum(float(((torch.as_tensor(ours[n]) - h) ** 2).sum()) for n, h in zip(names, hv))
    den = sum(float((h**2).sum()) for h in hv)
    assert (num / den) ** 0.5 <= 1e-4
