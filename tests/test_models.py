"""The Flax ports are the HF models: logits, save/load round trips, generation, strict configs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from hf_fixtures import VARIANTS, build_hf_model
from simu_jax.models import ModelConfig, UnsupportedConfigError, abstract_model, apply, apply_with_aux, split_params
from simu_jax.models.convert import WeightMismatchError, load_pretrained, save_pretrained
from simu_jax.models.generate import generate

TOL = 1e-4  # fp32 parity (Levanter's model-level tolerance)
LONG = 300  # >= 256 tokens: catches rope bugs that short prompts miss


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = build_hf_model(request.param, path)
    model = load_pretrained(path)
    graphdef, params = split_params(model)
    return request.param, path, torch_model, model, graphdef, params


def torch_logits(torch_model, ids, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.as_tensor(np.asarray(mask))
        if positions is not None:
            kw["position_ids"] = torch.as_tensor(np.asarray(positions))
        return torch_model(torch.as_tensor(np.asarray(ids)), **kw).logits.numpy()


def long_ids(seed=0, batch=2, length=LONG):
    return np.random.default_rng(seed).integers(2, 127, size=(batch, length)).astype(np.int64)


def test_long_prompt_logits_match_hf(variant):
    _, _, torch_model, _, graphdef, params = variant
    ids = long_ids()
    ours = np.asarray(apply(graphdef, params, jnp.asarray(ids)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_logits(torch_model, ids), atol=TOL, rtol=0)


def test_padded_batch_logits_match_hf(variant):
    """Left- and right-padded rows: real-token logits equal HF's with the same positions."""
    _, _, torch_model, _, graphdef, params = variant
    ids = long_ids(1, batch=3, length=40)
    mask = np.ones_like(ids)
    mask[1, :13] = 0  # left padding
    mask[2, 25:] = 0  # right padding
    ids[mask == 0] = 0
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    ours = np.asarray(apply(graphdef, params, jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(torch_model, ids, mask, positions)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=TOL, rtol=0)
    # each padded row equals that prompt alone, unpadded
    alone = np.asarray(apply(graphdef, params, jnp.asarray(ids[1:2, 13:])))
    np.testing.assert_allclose(ours[1, 13:], alone[0], atol=TOL, rtol=0)


# Each feature, switched off in our config, must move the logits far beyond the tolerance:
# otherwise the parity test above could not tell whether the feature is implemented.
# (QK-norm and GQA grouping have no config switch: test_structure_matters perturbs them.)
FEATURE_OFF = {
    "llama_mqa_tied_linear": dict(rope_type="default"),
    "llama_llama3_rope": dict(rope_type="default"),
    "olmo_clip_tied": dict(clip_qkv=None),
}


@pytest.mark.parametrize("name", sorted(FEATURE_OFF))
def test_features_matter(name, tmp_path):
    torch_model = build_hf_model(name, tmp_path / name)
    model = load_pretrained(tmp_path / name)
    _, params = split_params(model)
    ids = long_ids()
    g_off, _ = nnx.split(abstract_model(model.config.replace(**FEATURE_OFF[name])))
    off = np.asarray(apply(g_off, params, jnp.asarray(ids)))
    assert np.abs(off - torch_logits(torch_model, ids)).max() > 100 * TOL


def test_structure_matters(tmp_path):
    """QK-norm weights, GQA grouping and tying each change the logits."""
    torch_model = build_hf_model("olmo2_gqa", tmp_path / "o2")
    g, params = split_params(load_pretrained(tmp_path / "o2"))
    ids = jnp.asarray(long_ids(length=64))
    base = np.asarray(apply(g, params, ids))
    ref = torch_logits(torch_model, np.asarray(ids))
    np.testing.assert_allclose(base, ref, atol=TOL, rtol=0)
    bumped = jax.tree.map(lambda x: x, params)
    bumped["model"]["layers"]["self_attn"]["q_norm"]["weight"] = params["model"]["layers"]["self_attn"]["q_norm"]["weight"] * 2.0
    assert np.abs(np.asarray(apply(g, bumped, ids)) - ref).max() > 100 * TOL
    # swap the two kv heads' projections: if GQA grouping were wrong (heads paired with the wrong
    # kv head) parity would already fail; here we check the grouping is not symmetric.
    kp = params["model"]["layers"]["self_attn"]["k_proj"]["kernel"]
    swapped = jax.tree.map(lambda x: x, params)
    d = kp.shape[-1] // 2
    swapped["model"]["layers"]["self_attn"]["k_proj"]["kernel"] = jnp.concatenate([kp[..., d:], kp[..., :d]], -1)
    assert np.abs(np.asarray(apply(g, swapped, ids)) - ref).max() > 100 * TOL


def test_tied_embeddings_shared(tmp_path):
    build_hf_model("llama_mqa_tied_linear", tmp_path / "tied")
    model = load_pretrained(tmp_path / "tied")
    _, params = split_params(model)
    assert "lm_head" not in params
    build_hf_model("llama_gqa_untied", tmp_path / "untied")
    _, params = split_params(load_pretrained(tmp_path / "untied"))
    assert params["lm_head"]["kernel"].shape == (64, 128)


def test_save_then_transformers_load_same_logits(variant, tmp_path):
    name, _, torch_model, model, graphdef, params = variant
    out = save_pretrained(model, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = long_ids(2, length=64)
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(torch_model, ids), atol=TOL, rtol=0)
    # and our loader gives bit-identical params back
    again = split_params(load_pretrained(out))[1]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(params) == jax.tree.structure(again)


def test_greedy_generation_matches_hf(variant):
    _, _, torch_model, model, _, _ = variant
    rng = np.random.default_rng(3)
    prompts = rng.integers(2, 126, size=(3, 12)).astype(np.int64)
    mask = np.ones_like(prompts)
    mask[1, :5] = 0
    mask[2, :2] = 0
    prompts[mask == 0] = 0
    with torch.no_grad():
        ref = torch_model.generate(torch.as_tensor(prompts), attention_mask=torch.as_tensor(mask), max_new_tokens=32,
                                   do_sample=False, pad_token_id=0)[:, 12:].numpy()
    ours = np.asarray(generate(model, prompts, mask, max_new_tokens=32))
    assert ref.shape == (3, 32)
    np.testing.assert_array_equal(ours, ref)


def test_sampled_generation_reproducible_and_stops_at_eos(tmp_path):
    build_hf_model("llama_gqa_untied", tmp_path / "m")
    model = load_pretrained(tmp_path / "m")
    prompts = np.random.default_rng(0).integers(2, 126, size=(4, 8))
    a = np.asarray(generate(model, prompts, max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9, seed=1))
    b = np.asarray(generate(model, prompts, max_new_tokens=16, do_sample=True, top_k=20, top_p=0.9, seed=1))
    c = np.asarray(generate(model, prompts, max_new_tokens=16, do_sample=True, temperature=2.0, seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = np.asarray(generate(model, prompts, max_new_tokens=16))
    # force EOS = the first greedy token of row 0: that row must be EOS then all padding
    eos = int(greedy[0, 0])
    stopped = np.asarray(generate(model, prompts, max_new_tokens=16, eos_token_id=eos, pad_token_id=0))
    assert stopped[0, 0] == eos and (stopped[0, 1:] == 0).all()


def test_mlp_hook_scale_delta_and_acts(tmp_path):
    build_hf_model("llama_gqa_untied", tmp_path / "m")
    graphdef, params = split_params(load_pretrained(tmp_path / "m"))
    ids = jnp.asarray(long_ids(length=16))
    cfg = load_pretrained(tmp_path / "m").config
    L, I = cfg.num_hidden_layers, cfg.intermediate_size
    logits, aux = apply_with_aux(graphdef, params, ids, return_mlp_acts=True)
    acts = aux["mlp_acts"]
    assert acts.shape == (L, 2, 16, I)
    # scale 1 and delta 0 are the identity
    same, _ = apply_with_aux(graphdef, params, ids, mlp_scale=jnp.ones((L, 1, 1, I)),
                             mlp_delta=jnp.zeros((L, 2, 16, I)))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
    # zeroing layer 0's neurons equals zeroing down_proj's input rows of layer 0
    scale = jnp.ones((L, 1, 1, I)).at[0].set(0.0)
    zeroed = apply(graphdef, params, ids, mlp_scale=scale)
    p2 = jax.tree.map(lambda x: x, params)
    p2["model"]["layers"]["mlp"]["down_proj"]["kernel"] = params["model"]["layers"]["mlp"]["down_proj"]["kernel"].at[0].set(0.0)
    np.testing.assert_allclose(np.asarray(zeroed), np.asarray(apply(graphdef, p2, ids)), atol=1e-6)
    # d logits / d delta at 0 equals d logits / d activation, checked against a finite difference
    def f(delta):
        return apply(graphdef, params, ids, mlp_delta=delta)[0, -1, 5]
    delta0 = jnp.zeros((L, 2, 16, I))
    g = jax.grad(f)(delta0)
    e = delta0.at[1, 0, 10, 7].set(1e-2)
    fd = (f(e) - f(-e)) / 2e-2
    np.testing.assert_allclose(float(g[1, 0, 10, 7]), float(fd), rtol=2e-2, atol=1e-5)


def test_bf16_params_with_fp32_logits(tmp_path):
    torch_model = build_hf_model("llama_gqa_untied", tmp_path / "m")
    model = load_pretrained(tmp_path / "m", dtype=jnp.bfloat16)
    graphdef, params = split_params(model)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids = long_ids(length=32)
    logits = np.asarray(apply(graphdef, params, jnp.asarray(ids)))
    assert logits.dtype == np.float32
    ref = torch_logits(torch_model, ids)
    err = np.abs(logits - ref).max()
    assert err < 0.1 * np.abs(ref).max()  # bf16 rounding, not a different function
    assert err > TOL  # and really computed in bf16


def test_remat_gives_same_gradients(tmp_path):
    build_hf_model("olmo2_gqa", tmp_path / "m")
    g0, p = split_params(load_pretrained(tmp_path / "m"))
    g1, _ = split_params(load_pretrained(tmp_path / "m", remat="full"))
    ids = jnp.asarray(long_ids(length=16))
    loss = lambda g: jax.grad(lambda q: jnp.mean(apply(g, q, ids) ** 2))(p)
    for a, b in zip(jax.tree.leaves(loss(g0)), jax.tree.leaves(loss(g1))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_layer_loops_agree_with_hf_and_each_other(tmp_path):
    """The scanned and the unrolled layer loop are the same function: both match HF, and their
    gradients and returned MLP activations agree to float32 rounding."""
    from simu_jax.models.transformer import AUTO_UNROLL_MAX_LAYERS, unrolls

    torch_model = build_hf_model("olmo2_gqa", tmp_path / "m")
    ids = long_ids(length=16)
    ref = torch_logits(torch_model, ids)
    grads, acts = {}, {}
    for loop in ("scan", "unrolled"):
        g, p = split_params(load_pretrained(tmp_path / "m", layer_loop=loop))
        np.testing.assert_allclose(np.asarray(apply(g, p, jnp.asarray(ids))), ref, atol=TOL, rtol=0)
        grads[loop] = jax.grad(lambda q: jnp.mean(apply(g, q, jnp.asarray(ids)) ** 2))(p)
        acts[loop] = apply_with_aux(g, p, jnp.asarray(ids), return_mlp_acts=True)[1]["mlp_acts"]
    for a, b in zip(jax.tree.leaves(grads["scan"]), jax.tree.leaves(grads["unrolled"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(acts["scan"]), np.asarray(acts["unrolled"]), rtol=1e-5, atol=1e-6)
    assert unrolls("auto", AUTO_UNROLL_MAX_LAYERS) and not unrolls("auto", AUTO_UNROLL_MAX_LAYERS + 1)
    assert unrolls("unrolled", 64) and not unrolls("scan", 1)
    assert not unrolls("auto", 2, on_mesh=True) and unrolls("unrolled", 2, on_mesh=True)
    with pytest.raises(ValueError, match="layer_loop='loop'; allowed: auto, scan, unrolled"):
        load_pretrained(tmp_path / "m", layer_loop="loop")


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope_type='yarn'"),
        (dict(rope_scaling={"type": "dynamic", "factor": 2.0}, rope_parameters=None), "rope_type='dynamic'"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(sliding_window=4096), "sliding_window"),
        (dict(model_type="mistral"), "model_type='mistral'"),
    ],
)
def test_unsupported_config_is_rejected(change, needle):
    from transformers import LlamaConfig

    hf = LlamaConfig(**{k: v for k, v in VARIANTS["llama_gqa_untied"][1].items()}, vocab_size=32, hidden_size=16,
                     intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).to_dict()
    hf.update(change)
    with pytest.raises(UnsupportedConfigError, match=needle.replace("[", r"\[")) as err:
        ModelConfig.from_hf_dict(hf)
    assert "\n" not in str(err.value)


def test_v4_style_rope_keys_are_read():
    hf = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, rope_theta=5e5,
              rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    cfg = ModelConfig.from_hf_dict(hf)
    assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor) == ("llama3", 5e5, 8.0)
    assert cfg.num_key_value_heads == 2 and cfg.head_dim == 8


def test_bad_checkpoints_get_clear_errors(tmp_path):
    build_hf_model("llama_gqa_untied", tmp_path / "m")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        load_pretrained(tmp_path / "noweights")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "missing")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightMismatchError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight has shape \(\d+, \d+\)"):
        load_pretrained(tmp_path / "m")


def test_sharded_save_roundtrip(tmp_path):
    torch_model = build_hf_model("olmo2_gqa", tmp_path / "m")
    model = load_pretrained(tmp_path / "m")
    out = save_pretrained(model, tmp_path / "sharded", max_shard_bytes=60_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = long_ids(length=32)
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(torch_model, ids), atol=TOL, rtol=0)
    with pytest.raises(FileExistsError):
        save_pretrained(model, out)


def test_top_level_api_is_the_sharded_converter():
    import simu_jax
    from simu_jax.sharding import hf_io

    assert simu_jax.load_pretrained is hf_io.load_pretrained
    assert simu_jax.save_pretrained is hf_io.save_pretrained
    with pytest.raises(AttributeError):
        simu_jax.no_such_thing  # noqa: B018
