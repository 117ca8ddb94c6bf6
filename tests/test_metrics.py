"""Tests for simu_jax.evaluate.metrics and simu_jax.evaluate.mia.

Expected values are computed by hand (or by straightforward independent code
written here), never by calling the function under test.
"""

import itertools
import math
import zlib

import numpy as np
import pytest
from scipy.stats import ks_2samp

from simu_jax.evaluate import metrics as M
from simu_jax.evaluate import mia

LN2 = math.log(2.0)


# --------------------------------------------------------------------------- #
# TOFU per-sample quantities
# --------------------------------------------------------------------------- #
def test_answer_probability_hand():
    np.testing.assert_allclose(M.answer_probability([0.0, LN2, 2 * LN2]), [1.0, 0.5, 0.25])


def test_normalized_true_probability_hand():
    # p_true = 1/2, p_pert = 1/4, 1/8 -> (1/2) / (1/2 + 3/8) = 4/7
    # second sample: p_true = 1/4, p_pert = 1/4, 1/4 -> 1/3
    got = M.normalized_true_probability([LN2, 2 * LN2], [[2 * LN2, 3 * LN2], [2 * LN2, 2 * LN2]])
    np.testing.assert_allclose(got, [4 / 7, 1 / 3])


def test_truth_ratio_geometric_and_arithmetic_hand():
    # P_para = 1/2, P_pert = 1/4 and 1/16
    para = [LN2]
    pert = [[2 * LN2, 4 * LN2]]
    # geometric mean of perturbed = sqrt(1/64) = 1/8 -> R = (1/8)/(1/2) = 1/4
    np.testing.assert_allclose(M.truth_ratio(para, pert), [0.25])
    # arithmetic mean = (1/4 + 1/16)/2 = 5/32 -> R = 5/16
    np.testing.assert_allclose(M.truth_ratio(para, pert, perturbed_mean="arithmetic"), [5 / 16])
    with pytest.raises(ValueError):
        M.truth_ratio(para, pert, perturbed_mean="median")


def test_truth_ratio_matches_tofu_aggregate_expression():
    # TOFU aggregate_eval_stat.py: curr_stat_1 = exp(mean(pert) - para) and that is 1/R
    rng = np.random.default_rng(0)
    para = rng.uniform(0.1, 3, size=7)
    pert = rng.uniform(0.1, 3, size=(7, 5))
    curr_stat_1 = np.array([math.exp(sum(row) / len(row) - p) for p, row in zip(para, pert)])
    np.testing.assert_allclose(M.truth_ratio(para, pert), 1.0 / curr_stat_1, rtol=1e-12)


def test_truth_ratio_score_forms_hand():
    R = [0.25, 2.0, 1.0]
    # forget: mean(min(R, 1/R)) = mean(0.25, 0.5, 1) = 7/12
    assert M.truth_ratio_score(R, "forget") == pytest.approx(7 / 12)
    # retain-like: mean(max(0, 1-R)) = mean(0.75, 0, 0) = 0.25
    for kind in ("retain", "real_authors", "world_facts"):
        assert M.truth_ratio_score(R, kind) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        M.truth_ratio_score(R, "holdout")


# --------------------------------------------------------------------------- #
# forget quality
# --------------------------------------------------------------------------- #
def test_forget_quality_hand_case():
    # 1/R = {1,2,3} vs {4,5,6}: D = 1; exact two-sided p = 2 / C(6,3) = 0.1
    Ra = 1.0 / np.array([1.0, 2.0, 3.0])
    Rb = 1.0 / np.array([4.0, 5.0, 6.0])
    assert M.forget_quality(Ra, Rb) == pytest.approx(0.1)
    stat, p = M.ks_test(Ra, Rb)
    assert stat == pytest.approx(1.0) and p == pytest.approx(0.1)
    # identical samples: D = 0, p = 1
    assert M.forget_quality(Ra, Ra) == pytest.approx(1.0)


def test_forget_quality_against_scipy():
    rng = np.random.default_rng(1)
    Ra = rng.lognormal(0.0, 1.0, size=40)
    Rb = rng.lognormal(0.4, 0.8, size=55)
    fq = M.forget_quality(Ra, Rb)
    assert fq == pytest.approx(ks_2samp(1.0 / Ra, 1.0 / Rb).pvalue, rel=1e-12)
    # KS is invariant to the monotone map R -> 1/R (open-unlearning passes R)
    assert fq == pytest.approx(ks_2samp(Ra, Rb).pvalue, rel=1e-9)


# --------------------------------------------------------------------------- #
# text metrics
# --------------------------------------------------------------------------- #
def test_rouge_l_recall_hand():
    ref = "The cat sat on the mat"  # 6 tokens
    pred = "the cats sat on a mat"
    # with Porter stemming cats -> cat: LCS = the cat sat on mat = 5
    np.testing.assert_allclose(M.rouge_l_recall([pred], [ref]), [5 / 6])
    # without stemming: LCS = the sat on mat = 4
    np.testing.assert_allclose(M.rouge_l_recall([pred], [ref], use_stemmer=False), [4 / 6])
    # recall, not F1: prediction longer than reference and containing it -> 1
    np.testing.assert_allclose(M.rouge_l_recall(["x y the cat z"], ["the cat"]), [1.0])
    # empty generation -> 0
    np.testing.assert_allclose(M.rouge_l_recall([""], ["the cat"]), [0.0])


def test_rouge1_recall_hand():
    ref = "The cat sat on the mat"  # unigrams: the x2, cat, sat, on, mat
    pred = "mat on the cats"  # stemmed: mat, on, the, cat -> 4 of the 6 reference unigrams
    np.testing.assert_allclose(M.rouge1_recall([pred], [ref]), [4 / 6])
    # order does not matter for ROUGE-1 but does for ROUGE-L (LCS "on the"... = 2)
    both = M.rouge_recalls([pred], [ref])
    np.testing.assert_allclose(both["rouge1_recall"], [4 / 6])
    np.testing.assert_allclose(both["rougeL_recall"], M.rouge_l_recall([pred], [ref]))
    assert both["rougeL_recall"][0] == pytest.approx(2 / 6)
    # clipped counts: "the the the" matches "the" twice at most
    np.testing.assert_allclose(M.rouge1_recall(["the the the"], [ref]), [2 / 6])
    with pytest.raises(ValueError):
        M.rouge1_recall(["a"], [])


def test_exact_match_semeval_normalisation():
    got = M.exact_match([" Paris \n", "paris.", "The Paris", "PARIS"], ["paris", "paris", "paris", "Paris"])
    np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 1.0])


# --------------------------------------------------------------------------- #
# harmonic mean / model utility
# --------------------------------------------------------------------------- #
def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([0.5, 0.0, 0.9]) == 0.0
    assert math.isnan(M.harmonic_mean([0.5, float("nan")]))
    with pytest.raises(ValueError):
        M.harmonic_mean([])
    with pytest.raises(ValueError):
        M.harmonic_mean([0.5, -0.1])


def test_model_utility_hand():
    vals = {k: 0.5 for k in M.MODEL_UTILITY_KEYS}
    vals["World Facts ROUGE"] = 0.25
    vals["Forget ROUGE"] = 0.0  # forget numbers must be ignored
    # 9 / (8 * 2 + 4) = 0.45
    assert M.model_utility(vals) == pytest.approx(0.45)
    del vals["Retain Prob"]
    with pytest.raises(KeyError):
        M.model_utility(vals)


# --------------------------------------------------------------------------- #
# TOFU summary on a tiny fixture vs an independent computation
# --------------------------------------------------------------------------- #
def _fixture():
    rng = np.random.default_rng(7)

    def block(n, k, para=True):
        d = {
            "answer_mean_nll": rng.uniform(0.05, 2.5, size=n).tolist(),
            "perturbed_mean_nll": rng.uniform(0.5, 3.0, size=(n, k)).tolist(),
            "rougeL_recall": rng.uniform(0, 1, size=n).tolist(),
        }
        if para:
            d["paraphrased_mean_nll"] = rng.uniform(0.05, 2.5, size=n).tolist()
        return d

    stats = {
        "forget": block(6, 5),
        "retain": block(5, 5),
        "real_authors": block(4, 4, para=False),
        "world_facts": block(3, 4, para=False),
    }
    retain_model_R = rng.lognormal(0.0, 0.5, size=6).tolist()
    return stats, retain_model_R


def _independent_tofu(stats, retain_model_R):
    """Straightforward loop version of TOFU aggregate_eval_stat.py."""
    names = {"forget": "Forget", "retain": "Retain", "real_authors": "Real Authors",
             "world_facts": "World Facts"}
    out = {}
    inv_R_forget = None
    for s, st in stats.items():
        n = len(st["answer_mean_nll"])
        probs, trs = [], []
        for i in range(n):
            a = st["answer_mean_nll"][i]
            pert = st["perturbed_mean_nll"][i]
            if s in ("forget", "retain"):
                probs.append(math.exp(-a))
                para = st["paraphrased_mean_nll"][i]
            else:
                pt = math.exp(-a)
                probs.append(pt / (pt + sum(math.exp(-x) for x in pert)))
                para = a  # TOFU base_answer_key = answer for RA / WF
            stat1 = math.exp(sum(pert) / len(pert) - para)  # curr_stat_1
            trs.append(stat1)
            if s == "forget":
                pass
        if s == "forget":
            tr = sum(min(x, 1 / x) for x in trs) / n
            inv_R_forget = trs
        else:
            tr = sum(max(0.0, 1 - 1 / x) for x in trs) / n
        out[f"{names[s]} Prob"] = sum(probs) / n
        out[f"{names[s]} ROUGE"] = sum(st["rougeL_recall"]) / n
        out[f"{names[s]} Truth Ratio"] = tr
    nine = [v for k, v in out.items() if "Forget" not in k]
    assert len(nine) == 9
    out["Model Utility"] = len(nine) / sum(1 / v for v in nine)
    res = ks_2samp(inv_R_forget, [1 / r for r in retain_model_R])
    out["Forget Quality"] = res.pvalue
    out["KS Test Forget"] = res.statistic
    return out


def test_tofu_summary_matches_independent_computation():
    stats, retain_R = _fixture()
    got = M.tofu_summary(stats, retain_model_forget_truth_ratios=retain_R)
    want = _independent_tofu(stats, retain_R)
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-10, abs=1e-12), k


def test_tofu_summary_without_reference_and_partial_sets():
    stats, _ = _fixture()
    got = M.tofu_summary(stats)
    assert "Forget Quality" not in got and "Model Utility" in got
    only_forget = M.tofu_summary({"forget": stats["forget"]})
    assert "Model Utility" not in only_forget and "Forget ROUGE" in only_forget
    bad = {"forget": dict(stats["forget"])}
    del bad["forget"]["paraphrased_mean_nll"]
    with pytest.raises(KeyError):
        M.tofu_summary(bad)
    with pytest.raises(KeyError):
        M.tofu_summary({"holdout": stats["forget"]})


# --------------------------------------------------------------------------- #
# LUME / SemEval
# --------------------------------------------------------------------------- #
def test_lume_summary_hand_example():
    rows = []
    # forget: Task1 sc scores 0.2, 0.4 (mean .3), qa 1, 0 (mean .5)
    rows += [dict(task="Task1", split="forget", kind="sc", score=s) for s in (0.2, 0.4)]
    rows += [dict(task="Task1", split="forget", kind="qa", score=s) for s in (1, 0)]
    # forget Task2: sc .5, qa 0 ; Task3: sc .9 (via strings), qa 1
    rows += [dict(task="Task2", split="forget", kind="sc", score=0.5)]
    rows += [dict(task="Task2", split="forget", kind="qa", score=0)]
    rows += [dict(task="Task3", split="forget", kind="sc", score=0.9)]
    rows += [dict(task="Task3", split="forget", kind="qa", prediction=" Rome", reference="rome")]
    # retain: every cell 0.5 except Task2 qa = 0.25
    for t in ("Task1", "Task2", "Task3"):
        rows.append(dict(task=t, split="retain", kind="sc", score=0.5))
        rows.append(dict(task=t, split="retain", kind="qa", score=0.25 if t == "Task2" else 0.5))
    out = M.lume_summary(rows)
    assert out["per_task"]["forget"]["Task1"] == pytest.approx({"regurgitation": 0.3, "knowledge": 0.5})
    assert out["per_task"]["forget"]["Task3"]["knowledge"] == 1.0
    # inverted forget terms: .7 .5 .5 1 .1 0 ; retain: .5 .5 .5 .25 .5 .5 -> contains a 0
    assert sorted(out["aggregated_terms"]) == pytest.approx(
        sorted([0.7, 0.5, 0.5, 1.0, 0.1, 0.0, 0.5, 0.5, 0.5, 0.25, 0.5, 0.5])
    )
    assert out["task_aggregate"] == 0.0
    # overall = mean over rows: forget sc rows .2 .4 .5 .9 -> .5
    assert out["overall"]["forget"]["regurgitation"] == pytest.approx(0.5)
    assert out["overall"]["forget"]["knowledge"] == pytest.approx(0.5)

    # change forget Task3 qa to a miss -> term 1, aggregate is a plain harmonic mean
    rows2 = [r for r in rows if not (r["task"] == "Task3" and r["split"] == "forget" and r["kind"] == "qa")]
    rows2.append(dict(task="Task3", split="forget", kind="qa", score=0.0))
    terms = [0.7, 0.5, 0.5, 1.0, 0.1, 1.0, 0.5, 0.5, 0.5, 0.25, 0.5, 0.5]
    want = 12 / sum(1 / t for t in terms)
    assert M.lume_summary(rows2)["task_aggregate"] == pytest.approx(want)


def test_lume_kind_from_id():
    assert M.lume_kind_from_id("6de8a8f5-...sc1") == "sc"
    assert M.lume_kind_from_id("abcqa0") == "qa"
    with pytest.raises(ValueError):
        M.lume_kind_from_id("abc1")


def test_mia_score_and_final_score():
    assert M.mia_score(0.5) == 1.0
    assert M.mia_score(0.75) == pytest.approx(0.5)
    assert M.mia_score(0.1) == pytest.approx(0.2)
    full = M.semeval_final_score(0.6, 0.9, 0.3, mmlu_threshold=None)
    assert full["final_score"] == pytest.approx(0.6) and full["complete"]
    part = M.semeval_final_score(0.6, 0.9)
    assert part["final_score"] == pytest.approx(0.75)
    assert not part["complete"] and part["missing"] == ["mmlu"] and "mmlu" in part["note"]
    low = M.semeval_final_score(0.6, 0.9, 0.3)
    assert "threshold" in low["note"]


# --------------------------------------------------------------------------- #
# MIA
# --------------------------------------------------------------------------- #
def _brute_auc(pos, neg):
    tot = 0.0
    for p, n in itertools.product(pos, neg):
        tot += 1.0 if p > n else 0.5 if p == n else 0.0
    return tot / (len(pos) * len(neg))


def test_auc_hand_and_bruteforce_with_ties():
    # pairs: 3>2, 3>1, 2=2 (1/2), 2>1 -> 3.5 / 4
    assert mia.auc([3, 2], [2, 1]) == pytest.approx(0.875)
    rng = np.random.default_rng(3)
    for _ in range(20):
        pos = rng.integers(0, 5, size=rng.integers(1, 12))
        neg = rng.integers(0, 5, size=rng.integers(1, 12))
        assert mia.auc(pos, neg) == pytest.approx(_brute_auc(pos, neg))
    assert mia.auc([1, 1], [1, 1]) == 0.5
    with pytest.raises(ValueError):
        mia.auc([float("nan")], [1.0])


def test_loss_score_masked_mean():
    lp = [[-1.0, -2.0, -3.0, -100.0], [-0.5, -0.5, -7.0, -7.0]]
    mask = [[1, 1, 1, 0], [1, 1, 0, 0]]
    np.testing.assert_allclose(mia.loss_score(lp, mask), [-2.0, -0.5])
    assert mia.loss_score([-1.0, -3.0]) == pytest.approx(-2.0)
    # ragged list input
    np.testing.assert_allclose(mia.loss_score([[-1.0, -3.0], [-4.0]]), [-2.0, -4.0])
    with pytest.raises(ValueError):
        mia.loss_score(lp, [[0, 0, 0, 0], [1, 1, 1, 1]])


def test_zlib_score_uses_real_compressed_length():
    rep = "abc " * 200
    rnd = "".join(chr(33 + (i * 7919 % 90)) for i in range(800))
    # independent length computation
    assert mia.zlib_length(rep) == len(zlib.compress(rep.encode("utf-8")))
    assert mia.zlib_length(rep) < 40 < len(rep)  # really compressed, not the raw length
    assert mia.zlib_length("é") == len(zlib.compress("é".encode("utf-8")))
    lp = [[-2.0, -4.0], [-2.0, -4.0]]
    got = mia.zlib_score(lp, None, [rep, rnd])
    want = [-3.0 / len(zlib.compress(rep.encode())), -3.0 / len(zlib.compress(rnd.encode()))]
    np.testing.assert_allclose(got, want)
    # sign: same loss, more compressible text -> lower (less member-like) score
    assert got[0] < got[1]


def test_min_k_hand():
    lp = [-0.1, -5.0, -0.2, -3.0, -0.3, -1.0, -0.5, -2.0, -0.4, -4.0]
    assert mia.min_k_score(lp, k=0.2) == pytest.approx(-4.5)  # -5, -4
    assert mia.min_k_score(lp, k=0.3) == pytest.approx(-4.0)  # -5, -4, -3
    assert mia.min_k_score(lp, k=0.05) == pytest.approx(-5.0)  # max(1, int(0.5)) = 1 token
    mask = [1] + [0] + [1] * 8  # drop the -5 token: 9 tokens, int(1.8) = 1
    assert mia.min_k_score(lp, mask, k=0.2) == pytest.approx(-4.0)
    assert mia.min_k_score(lp, k=1.0) == pytest.approx(sum(lp) / 10)


def test_min_k_plus_plus_hand():
    lp = [-1.0, -2.0, -3.0, -4.0]
    mu = [-1.5, -1.0, -2.0, -2.0]
    sigma = [0.5, 1.0, 2.0, 4.0]
    # z = [1, -1, -0.5, -0.5]; lowest 50% (2 tokens): -1, -0.5
    assert mia.min_k_plus_plus_score(lp, mu, sigma, None, k=0.5) == pytest.approx(-0.75)
    assert mia.min_k_plus_plus_score(lp, mu, sigma, None, k=0.25) == pytest.approx(-1.0)
    # mask out the -1 token: z = [1, -0.5, -0.5] -> int(3*0.5)=1 -> -0.5
    assert mia.min_k_plus_plus_score(lp, mu, sigma, [1, 0, 1, 1], k=0.5) == pytest.approx(-0.5)


def test_token_stats_from_logits_hand():
    # p = [1/2, 1/4, 1/4]; log p = [-l, -2l, -2l] with l = ln 2
    # mu = -1.5 l ; E[(log p)^2] = 2.5 l^2 ; var = 0.25 l^2 ; sigma = 0.5 l
    logits = np.log([[0.5, 0.25, 0.25], [0.25, 0.25, 0.25]]) + 3.0  # unnormalised
    mu, sigma = mia.token_stats_from_logits(logits)
    np.testing.assert_allclose(mu, [-1.5 * LN2, -math.log(3)])
    np.testing.assert_allclose(sigma, [0.5 * LN2, 0.0], atol=1e-7)
    # -inf logits (masked vocab) do not produce NaN
    mu2, sig2 = mia.token_stats_from_logits([[0.0, 0.0, -np.inf]])
    np.testing.assert_allclose(mu2, [-LN2])
    np.testing.assert_allclose(sig2, [0.0], atol=1e-7)
    lp = mia.token_logprobs_from_logits(logits, [0, 2])
    np.testing.assert_allclose(lp, [-LN2, -math.log(3)])


def test_mia_aucs_all_attacks():
    member = {
        "token_logprobs": [[-0.1, -0.2, -3.0], [-0.3, -0.1, -0.2]],
        "mask": [[1, 1, 1], [1, 1, 1]],
        "texts": ["alpha beta", "gamma delta"],
        "mu": [[-1.0] * 3] * 2,
        "sigma": [[1.0] * 3] * 2,
    }
    nonmember = {
        "token_logprobs": [[-2.0, -2.5, -0.5], [-1.0, -4.0, -2.0], [-0.2, -0.2, -0.2]],
        "mask": [[1, 1, 1]] * 3,
        "texts": ["one", "two two", "three"],
        "mu": [[-1.0] * 3] * 3,
        "sigma": [[1.0] * 3] * 3,
    }
    out = mia.mia_aucs(member, nonmember, k=0.34)  # int(3*0.34) = 1 token
    assert set(out) == {"loss", "zlib", "min_k", "min_k++"}
    # hand scores: loss members -1.1, -0.2 ; non -5/3, -7/3, -0.2
    assert out["loss"] == pytest.approx(_brute_auc([-1.1, -0.2], [-5 / 3, -7 / 3, -0.2]))
    # min-k (lowest token): members -3, -0.3 ; non -2.5, -4, -0.2
    assert out["min_k"] == pytest.approx(_brute_auc([-3.0, -0.3], [-2.5, -4.0, -0.2]))
    # min-k++ with mu=-1, sigma=1: z = lp + 1 -> same ordering as min-k
    assert out["min_k++"] == pytest.approx(out["min_k"])
    zl = [len(zlib.compress(t.encode())) for t in member["texts"] + nonmember["texts"]]
    zs = [-1.1 / zl[0], -0.2 / zl[1], (-5 / 3) / zl[2], (-7 / 3) / zl[3], -0.2 / zl[4]]
    assert out["zlib"] == pytest.approx(_brute_auc(zs[:2], zs[2:]))
    # without optional inputs only loss and min_k are returned
    out2 = mia.mia_aucs({"token_logprobs": member["token_logprobs"]},
                        {"token_logprobs": nonmember["token_logprobs"]})
    assert set(out2) == {"loss", "min_k"}


# --------------------------------------------------------------------------- #
# open-unlearning's extra metrics, hand-computed
# --------------------------------------------------------------------------- #
def test_exact_memorization_and_extraction_strength_hand():
    T, F = True, False
    hits = [np.array([T, F, T, T]), np.array([F, T, T, T]), np.array([T, T, F]), np.array([T, T, T]),
            np.array([], bool)]
    np.testing.assert_allclose(M.exact_memorization(hits)[:4], [3 / 4, 3 / 4, 2 / 3, 1.0])
    assert np.isnan(M.exact_memorization(hits)[4])
    # ES = 1 - k/n, k = start of the all-correct suffix: [T,F,T,T] k=2 -> 0.5; [F,T,T,T] k=1 -> 0.75;
    # [T,T,F]: no correct suffix, open-unlearning's loop leaves k = n-1 = 2 -> 1/3; all right -> 1
    np.testing.assert_allclose(M.extraction_strength(hits), [0.5, 0.75, 1 / 3, 1.0, 0.0])


def test_privleak_hand():
    # unlearned AUC 0.8, retain model 0.6: ((1-0.8) - (1-0.6)) / (1-0.6) * 100 = -50
    assert M.privleak(0.8, 0.6) == pytest.approx(-50.0, rel=1e-8)
    # the default reference 0.5: AUC 0.3 -> (0.7 - 0.5) / 0.5 * 100 = 40
    assert M.privleak(0.3) == pytest.approx(40.0, rel=1e-8)
    assert M.privleak(0.6, 0.6) == pytest.approx(0.0, abs=1e-6)


def test_reference_and_gradnorm_scores_hand():
    np.testing.assert_allclose(mia.reference_score([1.0, 2.5], [1.5, 2.0]), [0.5, -0.5])
    # members: target NLL below the reference's -> AUC 1 (higher = member)
    assert mia.auc(mia.reference_score([0.1, 0.2], [1.0, 1.0]), mia.reference_score([1.0, 1.1], [1.0, 1.0])) == 1.0
    # smaller gradients = member
    assert mia.auc(mia.gradnorm_score([0.1, 0.3]), mia.gradnorm_score([0.2, 0.5])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        mia.reference_score([1.0], [1.0, 2.0])
