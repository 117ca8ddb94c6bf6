"""The robustness attacks (simu_jax/evaluate/attacks.py) against independent computations.

Quantizers: hand-computed scales, zero points and values; the references' formulas restated in
numpy on HF's [out, in] weights (llm-awq's pseudo_quantize_tensor, bitsandbytes' blockwise
4-bit with the CUDA kernel's decision thresholds), round-trip error bounds and idempotence.
Model level: a tiny LLaMA (transformers + torch) whose forget NLL after quantization equals the
torch model with the numpy-quantized weights; relearning equals the plain optax loop the
experiments used; ``simu-jax evaluate --attack`` writes the recovery fields, checked against
torch forward passes.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from simu_jax.data import QATemplate, make_synthetic, train_bpe_tokenizer
from simu_jax.evaluate.attacks import (FP4_CODE, NF4_CODE, quantize_fp4, quantize_int4_rtn, quantize_nf4,
                                       quantize_params, quantized_paths, recovery, relearn, relearn_records)

TEMPLATE = QATemplate()
BOS, EOS, PAD = 1, 2, 0
GROUP = 32  # int4 group size of the model-level tests (the tiny model's inputs are 64 and 128 wide)
STEPS = 3  # relearning steps (the relearn test and the CLI test share the compiled step)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- references restated in numpy


def awq_rtn_hf(w_hf: np.ndarray, group: int) -> np.ndarray:
    """llm-awq quantizer.py:61-103 (n_bit=4, zero_point=True) on an HF [out, in] weight whose
    ``in`` is a multiple of ``group``: w.reshape(-1, group), per-row min/max."""
    x = w_hf.astype(np.float32).reshape(-1, group)
    hi, lo = x.max(1, keepdims=True), x.min(1, keepdims=True)
    scales = np.maximum(hi - lo, np.float32(1e-5)) / np.float32(15)
    zeros = np.clip(-np.round(lo / scales), 0, 15)
    return ((np.clip(np.round(x / scales) + zeros, 0, 15) - zeros) * scales).reshape(w_hf.shape)


# csrc/kernels.cu:110-152 dQuantizeNF4: "x > t" picks the upper half at each node
NF4_THRESHOLDS = np.array([-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                           -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                           0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                           0.5016634166240692, 0.6427869200706482, 0.8614784181118011], np.float32)
# csrc/kernels.cu:64-107 dQuantizeFP4 on |x| (sign apart): 0, 0.0625, 2, 3, 4, 6, 8, 12 (/ 12)
FP4_THRESHOLDS = np.array([0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], np.float32)
FP4_MAGNITUDES = np.array([0, 0.0625, 2, 3, 4, 6, 8, 12], np.float32) / 12


def bnb_4bit_hf(w_hf: np.ndarray, kind: str, block: int = 64) -> np.ndarray:
    """bitsandbytes' blockwise 4-bit quantize + dequantize of one HF weight, with the CUDA
    kernel's thresholds: flatten row-major, blocks of ``block`` (the last one shorter),
    x = w * (1 / absmax), the code by the decision tree, code * absmax."""
    flat = w_hf.astype(np.float32).reshape(-1)
    out = np.empty_like(flat)
    for s in range(0, flat.size, block):
        b = flat[s:s + block]
        absmax = np.abs(b).max()
        x = np.clip(b * (np.float32(1) / absmax), -1, 1)
        if kind == "nf4":
            code = np.asarray(NF4_CODE, np.float32)[(x[:, None] > NF4_THRESHOLDS[None]).sum(1)]
        else:
            code = np.where(x < 0, -1, 1) * FP4_MAGNITUDES[(np.abs(x)[:, None] > FP4_THRESHOLDS[None]).sum(1)]
        out[s:s + block] = code * absmax
    return out.reshape(w_hf.shape)


def hf(k: np.ndarray) -> np.ndarray:
    """Our [..., in, out] kernel as HF's [..., out, in]."""
    return np.swapaxes(np.asarray(k, np.float32), -1, -2)


# --------------------------------------------------------------------------- INT4 RTN


def test_int4_scales_zero_points_and_values_by_hand():
    # our layout [in=8, out=2]; groups of 4 inputs per output column
    col0 = [-1.0, 0.2, 0.75, 2.0, 0.3, -0.6, 0.9, 0.0]
    col1 = [1.0, 1.5, 2.0, 2.5, 0.0, 0.0, 0.0, 0.0]  # an all-positive group, then a constant one
    w = jnp.asarray(np.array([col0, col1], np.float32).T)
    q, scale, zero = quantize_int4_rtn(w, group_size=4, return_stats=True)
    # col 0, group 0: min -1, max 2: scale 3/15 = 0.2, zero -round(-5) = 5, q = round(w/0.2) + 5
    #   = [0, 6, 9 (3.75 -> 4), 15] -> (q - 5) * 0.2 = [-1, 0.2, 0.8, 2]
    # col 0, group 1: min -0.6, max 0.9: scale 0.1, zero 6 -> every value is on the grid
    # col 1, group 0: min 1, max 2.5: scale 0.1, zero clamp(-10, 0, 15) = 0, q = clamp([10, 15, 20, 25])
    #   = [10, 15, 15, 15] -> [1, 1.5, 1.5, 1.5] (llm-awq's clamp: a one-signed group loses its top)
    # col 1, group 1: constant 0: scale 1e-5 / 15 (the clamp), zero 0, values 0
    np.testing.assert_allclose(np.asarray(scale), [[0.2, 0.1], [0.1, 1e-5 / 15]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(zero), [[5, 0], [6, 0]])
    want = np.array([[-1.0, 0.2, 0.8, 2.0, 0.3, -0.6, 0.9, 0.0], [1.0, 1.5, 1.5, 1.5, 0.0, 0.0, 0.0, 0.0]]).T
    np.testing.assert_allclose(np.asarray(q), want, atol=1e-6)
    # stacked layers are independent: layer 1 = 2 x layer 0 has twice the scales (but the clamped
    # one of the constant group), the same zeros
    q2, s2, z2 = quantize_int4_rtn(jnp.stack([w, 2 * w]), group_size=4, return_stats=True)
    np.testing.assert_allclose(np.asarray(s2[1]), [[0.4, 0.2], [0.2, 1e-5 / 15]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(z2[1]), np.asarray(zero))
    np.testing.assert_allclose(np.asarray(q2[1]), 2 * want, atol=2e-6)


def test_int4_equals_llm_awq_formula_on_hf_layout_and_bounds_hold():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 96, 40)).astype(np.float32)  # [L, in, out]
    q, scale, zero = (np.asarray(a) for a in quantize_int4_rtn(jnp.asarray(w), group_size=GROUP, return_stats=True))
    want = np.stack([awq_rtn_hf(hf(w[i]), GROUP) for i in range(3)])  # [L, out, in]
    np.testing.assert_allclose(hf(q), want, atol=1e-6)
    # round trip: |w - q(w)| <= scale / 2 in every group (each group holds both signs here)
    groups = hf(w).reshape(3, 40, 96 // GROUP, GROUP)
    assert (groups.min(-1) < 0).all() and (groups.max(-1) > 0).all()
    err = np.abs(hf(q) - hf(w)).reshape(groups.shape)
    half = np.swapaxes(scale, -1, -2)[..., None] / 2  # [L, out, n_groups, 1]
    assert (err <= half * (1 + 1e-6)).all()
    assert err.max() > 0.9 * half.min()  # not trivially small
    assert max(len(np.unique(g)) for g in hf(q).reshape(-1, GROUP)) <= 16  # 4 bits per group
    # idempotent up to float rounding: q(q(w)) keeps every grid point (the rescale is within an ulp)
    qq = np.asarray(quantize_int4_rtn(jnp.asarray(q), group_size=GROUP))
    np.testing.assert_allclose(qq, q, atol=1e-6 * 16 * scale.max())
    # a shorter last group (in = 80: groups of 32, 32, 16) is quantized on its own, as GPTQ's slices
    w80 = w[:, :80]
    q80 = hf(np.asarray(quantize_int4_rtn(jnp.asarray(w80), group_size=GROUP)))
    for lo_, hi_ in ((0, 32), (32, 64), (64, 80)):
        part = hf(w80)[..., lo_:hi_]
        want = np.stack([awq_rtn_hf(part[i], hi_ - lo_) for i in range(3)])
        np.testing.assert_allclose(q80[..., lo_:hi_], want, atol=1e-6)
    # group_size -1: one group per output channel
    qc = hf(np.asarray(quantize_int4_rtn(jnp.asarray(w), group_size=-1)))
    np.testing.assert_allclose(qc, np.stack([awq_rtn_hf(hf(w[i]), 96) for i in range(3)]), atol=1e-6)
    # the dtype is kept
    assert quantize_int4_rtn(jnp.asarray(w, jnp.bfloat16), group_size=GROUP).dtype == jnp.bfloat16


# --------------------------------------------------------------------------- NF4 / FP4


def test_nf4_codes_are_bitsandbytes_normal_map():
    # functional.py:169-225 create_normal_map(offset=0.9677083, use_extra_value=True), restated
    offset = 0.9677083
    v1 = stats.norm.ppf(np.linspace(offset, 0.5, 9, dtype=np.float32)[:-1])
    v3 = -stats.norm.ppf(np.linspace(offset, 0.5, 8, dtype=np.float32)[:-1])
    values = np.sort(np.concatenate([v1, [0.0], v3]))
    values /= values.max()
    assert len(NF4_CODE) == 16 and list(NF4_CODE) == sorted(NF4_CODE)
    np.testing.assert_allclose(NF4_CODE, values, atol=2e-7)
    # FP4: bit-pattern table functional.py:823 over its absmax 12
    assert len(FP4_CODE) == 16
    np.testing.assert_allclose(sorted(FP4_CODE), sorted(np.r_[FP4_MAGNITUDES, -FP4_MAGNITUDES]), atol=1e-7)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_4bit_equals_bitsandbytes_kernel_and_bounds_hold(kind):
    fn = quantize_nf4 if kind == "nf4" else quantize_fp4
    code = np.asarray(NF4_CODE if kind == "nf4" else FP4_CODE, np.float32)
    rng = np.random.default_rng(1)
    for shape in ((2, 96, 40), (48, 5)):  # 3840 = 60 blocks; 240 = 3 blocks + a block of 48
        w = rng.normal(size=shape).astype(np.float32)
        q, absmax, idx = (np.asarray(a) for a in fn(jnp.asarray(w), return_stats=True))
        lead = shape[:-2]
        hw = hf(w).reshape(*lead, -1)
        want = np.stack([bnb_4bit_hf(h, kind) for h in hw.reshape(-1, hw.shape[-1])]).reshape(hw.shape)
        np.testing.assert_allclose(hf(q).reshape(hw.shape), want, rtol=0, atol=1e-7)
        # every value is a code value times its block's absmax
        n_blocks = -(-hw.shape[-1] // 64)
        assert absmax.shape == (*lead, n_blocks)
        am = np.repeat(absmax, 64, axis=-1)[..., :hw.shape[-1]]
        np.testing.assert_array_equal(hf(q).reshape(hw.shape), code[idx] * am)
        rows = hw.reshape(-1, hw.shape[-1])
        want_am = [[np.abs(b).max() for b in np.array_split(r, range(64, r.size, 64))] for r in rows]
        np.testing.assert_array_equal(absmax.reshape(len(rows), n_blocks), want_am)
        # round trip: at most half the widest gap between adjacent codes, times absmax
        bound = np.diff(np.unique(code)).max() / 2 * am
        assert (np.abs(hf(q).reshape(hw.shape) - hw) <= bound * (1 + 1e-6)).all()
        # idempotent, exactly: each block's absmax element maps to +-1
        np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(q))), q)
    with pytest.raises(ValueError, match="block_size"):
        fn(jnp.asarray(w), block_size=48)


# --------------------------------------------------------------------------- a tiny model




LIMIT = 4  # rows per set: `simu-jax evaluate --limit 4` scores these, the fixture trains on them


@pytest.fixture(scope="module")
def sets():
    """The rows `simu-jax evaluate --benchmark synthetic --limit 4` evaluates (simu protocol:
    a seeded subset of each set of the default synthetic benchmark)."""
    from simu_jax.data import DataSpec, load_benchmark
    from simu_jax.evaluate.runner import evaluation_sets

    return evaluation_sets(load_benchmark(DataSpec(benchmark="synthetic")), LIMIT, 0, protocol="simu")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def qa_seq(tok, r):
    prompt = [BOS] + ids(tok, TEMPLATE.prompt(r["question"]))
    return prompt, prompt + ids(tok, r["answer"]) + [EOS]


def torch_answer_nll(model, tok, r):
    """Mean NLL of the answer tokens + EOS (the simu protocol's scored tokens), by hand."""
    prompt, seq = qa_seq(tok, r)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1).numpy()
    return -np.mean([lp[t - 1, seq[t]] for t in range(len(prompt), len(seq))])


def batch(tok, recs):
    seqs = [qa_seq(tok, r) for r in recs]
    T = max(len(s) for _, s in seqs)
    x = torch.tensor([s + [PAD] * (T - len(s)) for _, s in seqs])
    m = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for _, s in seqs])
    lab = torch.full_like(x, -100)
    for i, (p, s) in enumerate(seqs):
        lab[i, len(p):len(s)] = x[i, len(p):len(s)]
    return x, m, lab


@pytest.fixture(scope="module")
def models(tmp_path_factory, sets):
    """(target dir, unlearned dir, target, unlearned, tokenizer): a tiny LLaMA fitted on the
    evaluated forget, retain and general rows, then unlearned by 8 gradient-ascent steps on
    the forget rows."""
    root = tmp_path_factory.mktemp("attacks")
    target_dir, unlearned_dir = root / "target", root / "unlearned"
    rows = [r for k in ("forget", "retain", "general", "holdout") for r in sets[k]]
    train_bpe_tokenizer([TEMPLATE.text(r["question"], r["answer"]) for r in rows] + make_synthetic().texts()[:400],
                        target_dir, vocab_size=384)
    tok = AutoTokenizer.from_pretrained(target_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.05, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg).float()
    x, m, lab = batch(tok, sets["forget"] + sets["retain"] + sets["general"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        model(input_ids=x, attention_mask=m, labels=lab).loss.backward()
        opt.step()
    model.eval().save_pretrained(target_dir)
    unlearned = LlamaForCausalLM(cfg).float()
    unlearned.load_state_dict(model.state_dict())
    xf, mf, lf = batch(tok, sets["forget"])
    opt = torch.optim.SGD(unlearned.parameters(), lr=2e-2)
    for _ in range(8):
        opt.zero_grad()
        (-unlearned(input_ids=xf, attention_mask=mf, labels=lf).loss).backward()
        opt.step()
    unlearned.eval().save_pretrained(unlearned_dir)
    tok.save_pretrained(unlearned_dir)
    return target_dir, unlearned_dir, model, unlearned, tok


def torch_quantized(model, fn):
    """A copy of ``model`` with ``fn`` applied to every decoder-block nn.Linear weight [out, in]."""
    q = LlamaForCausalLM(model.config).float().eval()
    q.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mod in q.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(torch.from_numpy(fn(mod.weight.numpy())))
    return q


def test_quantized_model_equals_torch_with_reference_quantizers(models, sets):
    from simu_jax.data import tokenize_qa
    from simu_jax.engine import eval_losses
    from simu_jax.models import split_params
    from simu_jax.models.convert import load_pretrained

    _, unlearned_dir, _, unlearned, tok = models
    graphdef, params = split_params(load_pretrained(unlearned_dir))
    names = quantized_paths(params)
    assert len(names) == 7 and all(n.startswith("model.layers.") for n in names)
    arrays = {k: jnp.asarray(v) for k, v in tokenize_qa(tok, sets["forget"], TEMPLATE, 256).items()}
    base = float(eval_losses(graphdef, params, arrays))
    for scheme, ref in (("int4", lambda w: awq_rtn_hf(w, GROUP)), ("nf4", lambda w: bnb_4bit_hf(w, "nf4")),
                        ("fp4", lambda w: bnb_4bit_hf(w, "fp4"))):
        qp = quantize_params(params, scheme, group_size=GROUP)
        # embeddings, norms and lm_head untouched (bitsandbytes skips the output embedding)
        for path in (("model", "embed_tokens", "embedding"), ("lm_head", "kernel"), ("model", "norm", "weight"),
                     ("model", "layers", "input_layernorm", "weight")):
            a, b = params, qp
            for k in path:
                a, b = a[k], b[k]
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        nll = float(eval_losses(graphdef, qp, arrays))
        tq = torch_quantized(unlearned, ref)
        x, m, lab = batch(tok, sets["forget"])
        with torch.no_grad():
            want = float(tq(input_ids=x, attention_mask=m, labels=lab).loss)
        assert nll == pytest.approx(want, abs=2e-4), scheme
        assert abs(nll - base) > 1e-3, scheme  # the quantized model is a different model


def test_relearn_equals_the_plain_adamw_loop_and_lowers_forget_nll(models, sets):
    import optax

    from simu_jax.data import TRAIN_BUCKETS, tokenize_qa
    from simu_jax.engine import eval_losses
    from simu_jax.losses import token_mean_nll
    from simu_jax.models import apply
    from simu_jax.models.spec import load_model

    _, unlearned_dir, _, unlearned, tok = models
    loaded = load_model(unlearned_dir)  # the CLI's graph and tokenization: its run reuses the compiled step
    graphdef, params = loaded.graphdef, loaded.params
    recs = relearn_records(sets["forget"], 2)
    assert recs == [sets["forget"][0], sets["forget"][2]]  # spread over the 4 rows
    arrays = tokenize_qa(tok, recs, TEMPLATE, 256, buckets=TRAIN_BUCKETS)
    new, losses = relearn(graphdef, params, arrays, steps=STEPS, learning_rate=1e-3)
    # the loss before step 0 is the torch model's token-mean NLL of those pairs
    x, m, lab = batch(tok, recs)
    with torch.no_grad():
        assert losses[0] == pytest.approx(float(unlearned(input_ids=x, attention_mask=m, labels=lab).loss), abs=1e-4)
    assert all(b < a for a, b in zip(losses, losses[1:]))
    # the loop the experiments ran before (experiments/study.py): optax.adamw, full batch
    b = {k: jnp.asarray(v) for k, v in arrays.items()}
    tx = optax.adamw(1e-3, weight_decay=0.0)

    def loss(p):
        return token_mean_nll(apply(graphdef, p, b["input_ids"], b["attention_mask"]), b["labels"])

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(STEPS):
        p, s = step(p, s)
    # The two sum the loss in different orders; Adam's g / sqrt(v) turns that rounding into a
    # visible change only where a gradient is near 0, whose sign rounding can flip: each step
    # moves a coordinate by <= lr (|m_hat / sqrt(v_hat)| <= 1 here), so two runs differ by at most
    # 2 * STEPS * lr anywhere (an AMD EPYC saw 3.7e-5, 1.2% of STEPS * lr, on a few coordinates);
    # all but 0.1% of the coordinates agree to float32 rounding, and so does the final loss.
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(c)).ravel()
                            for a, c in zip(jax.tree.leaves(new), jax.tree.leaves(p))])
    assert diffs.max() <= 2 * STEPS * 1e-3 and np.mean(diffs > 1e-6) < 1e-3
    assert float(loss(new)) == pytest.approx(float(loss(p)), rel=1e-5)
    # the whole forget set's NLL goes down (the relearned pairs and the others)
    fa = {k: jnp.asarray(v) for k, v in tokenize_qa(tok, sets["forget"], TEMPLATE, 256).items()}
    assert float(eval_losses(graphdef, new, fa)) < float(eval_losses(graphdef, params, fa))
    # params given in are unchanged
    np.testing.assert_array_equal(np.asarray(params["lm_head"]["kernel"]),
                                  np.asarray(load_model(unlearned_dir).params["lm_head"]["kernel"]))


def test_recovery_definition():
    assert recovery(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert recovery(0.2, 0.2, 0.8) == 0.0 and recovery(0.8, 0.2, 0.8) == 1.0
    assert recovery(0.1, 0.2, 0.8) == pytest.approx(-1 / 6)
    assert recovery(1e-3, 0.9, 1e-5) == pytest.approx((1e-3 - 0.9) / (1e-5 - 0.9))  # a metric that falls
    assert np.isnan(recovery(0.5, 0.4, 0.4)) and np.isnan(recovery(None, 0.4, 0.5))


def test_cli_attack_int4_writes_recovery_and_the_report_table(models, sets, tmp_path, capsys):
    from simu_jax.evaluate.report import write_report
    from simu_jax.evaluate.runner import cli_main

    target_dir, unlearned_dir, target, unlearned, tok = models
    out = tmp_path / "eval"
    rc = cli_main(["--model", str(unlearned_dir), "--benchmark", "synthetic", "--no-generate", "--batch-size", "4",
                   "--buckets", "128", "--protocol", "simu", "--out", str(out), "--target", str(target_dir),
                   "--attack", "int4,relearn",
                   "--attack-group-size", str(GROUP), "--relearn-steps", str(STEPS), "--limit", str(LIMIT)])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    rob = doc["details"]["robustness"]
    assert doc["settings"]["attack"]["names"] == ["int4", "relearn"] and doc["settings"]["target"]

    def prob(model):
        return float(np.mean([np.exp(-torch_answer_nll(model, tok, r)) for r in sets["forget"]]))

    unl = prob(unlearned)
    after = prob(torch_quantized(unlearned, lambda w: awq_rtn_hf(w, GROUP)))
    assert rob["unlearned"]["forget_prob"] == pytest.approx(doc["metrics"]["forget_prob"], rel=1e-12)
    assert rob["unlearned"]["forget_prob"] == pytest.approx(unl, abs=1e-5)
    assert rob["target"]["forget_prob"] == pytest.approx(prob(target), abs=1e-5)
    assert rob["attacks"]["int4"]["forget"]["forget_prob"] == pytest.approx(after, abs=1e-5)
    want = (after - unl) / (prob(target) - unl)
    assert rob["attacks"]["int4"]["recovery"]["forget_prob"] == pytest.approx(want, abs=1e-3)
    int4 = rob["attacks"]["int4"]
    assert int4["settings"]["group_size"] == GROUP and len(int4["settings"]["quantized"]) == 7
    assert set(int4["recovery"]) == set(int4["forget"]) >= {"forget_prob", "forget_truth_ratio",
                                                            "forget_extraction_strength"}
    rel = rob["attacks"]["relearn"]
    assert len(rel["settings"]["losses"]) == STEPS and rel["settings"]["examples"] == 2
    assert rel["forget"]["forget_prob"] > rob["unlearned"]["forget_prob"]  # relearning brings answers back
    assert "robustness attacks" in capsys.readouterr().out
    report = write_report([out], tmp_path / "report").read_text()
    assert "## Robustness attacks" in report
    row = next(line for line in report.splitlines() if line.startswith("| unlearned | int4 |"))
    assert f"({rob['attacks']['int4']['recovery']['forget_prob']:+.2f})" in row


def test_cli_attack_bad_options_are_one_line_errors(models, tmp_path):
    from simu_jax.evaluate.runner import cli_main

    _, unlearned_dir, _, _, _ = models
    base = ["--model", str(unlearned_dir), "--benchmark", "synthetic"]
    for extra, msg in ((["--attack", "int8"], "unknown attack 'int8'"),
                       (["--attack", "nf4", "--attack-block-size", "48"], "--attack-block-size must be one of"),
                       (["--attack", "int4", "--attack-group-size", "0"], "--attack-group-size must be"),
                       (["--attack", "relearn", "--relearn-steps", "0"], "--relearn-steps must be in"),
                       (["--target", str(unlearned_dir)], "--target .* only used by --attack")):
        with pytest.raises(ValueError, match=msg):
            cli_main(base + extra)
    with pytest.raises(ValueError, match="not lume"):
        cli_main(["--model", str(unlearned_dir), "--benchmark", "lume", "--attack", "int4"])
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        cli_main(base + ["--attack", "int4", "--target", str(tmp_path / "missing")])


def test_unlearn_evaluation_runs_the_configured_attacks(models, tmp_path):
    """`simu-jax unlearn`'s final evaluation (evaluate_run) with eval.attack: the target is
    model.path (the model before unlearning), the attacked model the run's parameters."""
    from simu_jax.base import ConfigError
    from simu_jax.config import load_config
    from simu_jax.models.spec import load_model
    from simu_jax.unlearn import UnlearnConfig, evaluate_run, prepare

    target_dir, unlearned_dir, target, unlearned, tok = models
    cfg = load_config(UnlearnConfig, None, [f"model.path={target_dir}", "eval.generate=false", "eval.batch_size=4",
                                            f"eval.limit={LIMIT}", "eval.attack.names=[nf4]",
                                            "data.tokenization=split"])  # the simu protocol, restated here
    prep = prepare(cfg)
    out = tmp_path / "run"
    metrics = evaluate_run(cfg, prep, load_model(unlearned_dir).params, out)
    rob = json.loads((out / "summary.json").read_text())["details"]["robustness"]
    rows = prep.bench.forget[:LIMIT]  # the simu protocol without a seed: the first rows

    def prob(model):
        return float(np.mean([np.exp(-torch_answer_nll(model, tok, r)) for r in rows]))

    assert rob["unlearned"]["forget_prob"] == pytest.approx(metrics["forget_prob"], rel=1e-12)
    assert rob["unlearned"]["forget_prob"] == pytest.approx(prob(unlearned), abs=1e-5)
    assert rob["target"]["forget_prob"] == pytest.approx(prob(target), abs=1e-5)
    after = prob(torch_quantized(unlearned, lambda w: bnb_4bit_hf(w, "nf4")))
    assert rob["attacks"]["nf4"]["forget"]["forget_prob"] == pytest.approx(after, abs=1e-5)
    assert rob["attacks"]["nf4"]["settings"]["block_size"] == 64
    with pytest.raises(ConfigError, match="eval.attack.names"):
        load_config(UnlearnConfig, None, ["data.benchmark=lume", "eval.attack.names=[int4]"])
    with pytest.raises(ConfigError, match="eval.attack.block_size"):
        load_config(UnlearnConfig, None, ["eval.attack.block_size=48"])
