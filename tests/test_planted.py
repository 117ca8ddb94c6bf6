"""The planted-localization benchmark: planting learns the forget answers and leaves every other
parameter bit-identical; attribution-vs-truth metrics against scipy and hand counts."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from simu_jax.attribution import NeuronMask, localization_metrics, roc_auc
from simu_jax.base import ConfigError
from simu_jax.data import SyntheticConfig
from simu_jax.planted import PlantedConfig, choose_neurons, evaluate_sets, make_planted, plant, trainable_tree
from simu_jax.models import ModelConfig, init_model, split_params
from simu_jax.models.convert import load_params

TINY = dict(model_type="llama", num_hidden_layers=2, hidden_size=32, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, initializer_range=0.3)


def bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_frozen_outside(before: dict, after: dict, trainable: dict) -> int:
    """Every entry outside ``trainable`` is bit-identical; returns how many inside changed."""
    changed = 0
    masks = leaves(trainable)
    for key, old in leaves(before).items():
        new, inside = leaves(after)[key], np.broadcast_to(masks[key], old.shape)
        np.testing.assert_array_equal(bits(new)[~inside], bits(old)[~inside], err_msg=key)
        changed += int((bits(new) != bits(old))[inside].sum())
    return changed


def facts(seed: int, rows: int = 8, width: int = 16, vocab: int = 64) -> dict:
    """Rows of random "question" tokens whose answer half repeats one row-specific token (a fact
    a random model does not know and training can write)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(rows, width)).astype(np.int32)
    answer = np.arange(width) >= width // 2
    ids = np.where(answer, rng.integers(1, vocab, size=(rows, 1)), ids).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.where(answer, ids, -100)}


@pytest.mark.parametrize("attention", [False, True])
def test_plant_learns_forget_and_freezes_the_rest(attention):
    """Only the planted neurons' gate/up columns and down rows (and, in the attention variant,
    the attention projections) move; they alone learn the forget answers."""
    graphdef, params = split_params(init_model(ModelConfig(vocab_size=64, **TINY), seed=0))
    truth = choose_neurons(2, 128, 16, layers=(1,), seed=3)
    assert truth.sum() == 16 and not truth[0].any()
    trainable = trainable_tree(params, truth, attention)
    forget = facts(0)
    before = evaluate_sets(graphdef, params, {"forget": forget})["forget"]
    planted, history = plant(graphdef, params, forget, trainable, steps=40, learning_rate=3e-2)
    after = evaluate_sets(graphdef, planted, {"forget": forget})["forget"]
    assert after["nll"] < 0.25 * before["nll"] and after["accuracy"] > 0.9
    assert len(history) == 40 and history[-1] < history[0]
    changed = assert_frozen_outside(params, planted, trainable)
    n_neuron_params = 3 * TINY["hidden_size"] * 16
    n_attention = sum(np.prod(params["model"]["layers"]["self_attn"][p]["kernel"].shape)
                      for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert changed > 0.9 * (n_neuron_params + (n_attention if attention else 0))
    mlp = params["model"]["layers"]["mlp"]
    new_mlp = planted["model"]["layers"]["mlp"]
    assert (bits(new_mlp["down_proj"]["kernel"])[truth] != bits(mlp["down_proj"]["kernel"])[truth]).any(axis=-1).all()


def test_trainable_tree_refuses_other_shapes():
    _, params = split_params(init_model(ModelConfig(vocab_size=64, **TINY), seed=0))
    with pytest.raises(ValueError, match=r"planted neurons have shape \(2, 64\)"):
        trainable_tree(params, np.zeros((2, 64), bool))
    with pytest.raises(ConfigError, match="layers"):
        PlantedConfig(model=TINY, layers=(2,))
    with pytest.raises(ConfigError, match="neurons_per_layer"):
        PlantedConfig(model=TINY, neurons_per_layer=129)


@pytest.mark.slow  # a BPE tokenizer, a base finetune run, planting, two saves: ~100 s on a busy 2-core host
def test_make_planted_end_to_end(tmp_path):
    """Base model on retain + general, then planting; the saved planted model differs from the
    saved base model only inside the planted neurons, and the truth loads as a mask."""
    cfg = PlantedConfig(synthetic=SyntheticConfig(num_people=6, facts_per_person=2, num_general=4,
                                                  forget_fraction=0.34, holdout_fraction=0.0),
                        model=dict(TINY), max_length=64, base_epochs=3, base_batch_size=8,
                        neurons_per_layer=16, plant_steps=40, plant_learning_rate=3e-2)
    info = make_planted(tmp_path / "p", cfg, quiet=True)
    out = tmp_path / "p"
    assert (out / "COMPLETE").is_file() and json.loads((out / "planted.json").read_text()) == info
    # a base model of 3 epochs (seconds) knows little; the planted neurons still take the forget
    # NLL down by more than half (measured: 7.6 -> 3.0); test_plant_learns_... checks learning itself
    assert info["after"]["forget"]["nll"] < 0.5 * info["before"]["forget"]["nll"]
    assert info["unlearn"]["reference"] == str((out / "base" / "model").resolve())

    mask = NeuronMask.load(out / "truth", shape=(2, 128))
    np.testing.assert_array_equal(mask.selected, choose_neurons(2, 128, 16, seed=0))
    assert mask.counts == [16, 16] == info["per_layer_planted"]

    base, planted = load_params(out / "base" / "model"), load_params(out / "model")
    changed = assert_frozen_outside(base, planted, trainable_tree(base, mask.selected))
    assert changed > 0.9 * info["trained_parameters"] == 0.9 * 3 * 32 * 32

    assert make_planted(out, cfg, quiet=True) == info  # complete: reused
    with pytest.raises(ValueError, match="another config"):
        make_planted(out, dataclasses.replace(cfg, seed=1), quiet=True)


def test_roc_auc_against_mann_whitney_and_pairs():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(3, 40)).astype(float)  # many ties
    truth = rng.random((3, 40)) < 0.2
    pos, neg = scores[truth], scores[~truth]
    pairs = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    u = mannwhitneyu(pos, neg).statistic  # U of the first sample
    assert roc_auc(scores, truth) == pytest.approx(pairs, abs=1e-12) == pytest.approx(u / (pos.size * neg.size))
    assert roc_auc(scores, np.zeros_like(truth)) is None


def test_localization_metrics_hand_counts():
    scores = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 4.0, -1.0]])
    truth = np.array([[True, False, True, False], [False, False, False, True]])
    m = localization_metrics(scores, truth, threshold=0.5)
    layer0, layer1 = m["per_layer"]
    # layer 0: true {3, 1} vs other {2, 0}: 3 of 4 pairs ordered; mask (> 1.5) = {3, 2}; top-2 = {3, 2}
    assert layer0["auc"] == 0.75 and layer0["top_k"] == 0.5
    assert layer0["threshold"] == {"selected": 2, "precision": 0.5, "recall": 0.5}
    # layer 1: the one true neuron scores lowest; mask (> 2.5) = {5, 4}
    assert layer1["auc"] == 0.0 and layer1["top_k"] == 0.0
    assert layer1["threshold"] == {"selected": 2, "precision": 0.0, "recall": 0.0}
    # pooled: true {3, 1, -1} vs {2, 0, 0, 5, 4}: 3 > 2, 0, 0; 1 > 0, 0; -1 > none -> 5 of 15
    o = m["overall"]
    assert o["auc"] == pytest.approx(5 / 15) and o["mean_layer_auc"] == 0.375
    assert o["threshold"] == {"selected": 4, "precision": 0.25, "recall": 1 / 3} and o["top_k"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="same"):
        localization_metrics(scores, truth[:1])
