"""TOFU's published evaluation logs, reproduced with our metric functions.

The logs (``shared/data/tofu_eval_logs``, see its SOURCE.md) are what TOFU's ``evaluate_util.py``
wrote for Llama-2-7b-chat and Phi-1.5 fine-tuned on TOFU. From them:

* Model Utility, Forget Quality and the KS statistic of the official table (SOURCE.md, computed
  there with TOFU's ``aggregate_eval_stat.py``) come out of :func:`metrics.tofu_summary` to
  every printed digit (the table has 6 significant digits), and to 1e-12 relative against an
  independent copy of ``aggregate_eval_stat.py``'s two functions written here;
* every row's ``rougeL_recall`` and ``rouge1_recall`` is recomputed from its ``generated_text``
  with our ROUGE;
* our writer (:func:`tofu_log.to_tofu_log`) round-trips the layout, and a log serves as the
  forget-quality reference of ``simu-jax evaluate --reference-log``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from simu_jax.evaluate import metrics as M
from simu_jax.evaluate import tofu_log as TL

LOGS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu_eval_logs"
pytestmark = pytest.mark.skipif(not LOGS.is_dir(), reason=f"TOFU eval logs not found at {LOGS}")

# SOURCE.md's table: (checkpoint, retain reference) -> (Model Utility, Forget Quality, KS statistic)
TABLE = {
    ("llama2-7b_full", "llama2-7b_retain90"): ("0.622677", "1.83407e-21", "0.396667"),
    ("llama2-7b_retain90", "llama2-7b_retain90"): ("0.613745", "1", "0"),
    ("phi_full", "phi_retain90"): ("0.522074", "2.19427e-16", "0.346667"),
}
# SOURCE.md's sub-metrics of llama2-7b_full (ROUGE / Prob. / Truth Ratio per set)
SUB = {"Real Authors": (0.933, 0.455482, 0.596229), "World Facts": (0.882479, 0.418562, 0.539033),
       "Retain": (0.985655, 0.989527, 0.474699), "Forget": (0.98545, 0.990939, 0.515985)}


def load(name):
    return TL.read_tofu_log(LOGS / f"{name}.json")


# ---------------------------------------------------------------- independent TOFU aggregation
# aggregate_eval_stat.py (locuslab/tofu @ bdc209e) lines 10-79, restated here.


def tofu_forget_quality(unlearn_result, retain_result):
    u, r = unlearn_result["eval_log_forget.json"], retain_result["eval_log_forget.json"]
    u_para = np.array(list(u["avg_paraphrased_loss"].values()))
    u_pert = np.array(list(u["average_perturb_loss"].values())).mean(axis=-1)
    r_para = np.array(list(r["avg_paraphrased_loss"].values()))
    r_pert = np.array(list(r["average_perturb_loss"].values())).mean(axis=-1)
    res = ks_2samp(np.exp(u_pert - u_para), np.exp(r_pert - r_para))
    return res.pvalue, res.statistic


def tofu_model_utility(d):
    vals = []
    for k, v in d.items():
        if k == "eval_log_forget.json":
            continue
        gt = np.exp(-np.array(list(v["avg_gt_loss"].values())))
        if "eval_log" in k:
            prob = gt.mean()
        else:
            false = np.exp(-np.array(list(v["average_perturb_loss"].values())))
            prob = np.mean(gt / np.concatenate([gt[:, None], false], axis=1).sum(-1))
        rouge = np.array(list(v["rougeL_recall"].values())).mean()
        stat = np.exp(np.array(list(v["average_perturb_loss"].values())).mean(-1)
                      - np.array(list(v["avg_paraphrased_loss"].values())))
        tr = np.mean(np.maximum(0, 1 - 1 / stat))
        vals += [prob, rouge, tr]
    return hmean(vals)


# ---------------------------------------------------------------- the table


@pytest.mark.parametrize("ckpt,retain", list(TABLE))
def test_official_table_reproduced(ckpt, retain):
    mu_s, fq_s, ks_s = TABLE[(ckpt, retain)]
    got = TL.log_summary(load(ckpt), load(retain))
    # every printed digit of the official table
    assert f"{got['Model Utility']:.6g}" == mu_s
    assert f"{got['Forget Quality']:.6g}" == fq_s
    assert f"{got['KS Test Forget']:.6g}" == ks_s
    # and 1e-6 relative (here 1e-12) against TOFU's aggregation restated above
    d, r = json.loads((LOGS / f"{ckpt}.json").read_text()), json.loads((LOGS / f"{retain}.json").read_text())
    p, stat = tofu_forget_quality(d, r)
    assert got["Forget Quality"] == pytest.approx(p, rel=1e-12)
    assert got["KS Test Forget"] == pytest.approx(stat, rel=1e-12, abs=1e-15)
    assert got["Model Utility"] == pytest.approx(tofu_model_utility(d), rel=1e-12)
    for table_value, ours in zip((mu_s, fq_s, ks_s), ("Model Utility", "Forget Quality", "KS Test Forget")):
        # the table's 6 significant digits: within half a unit of the last digit
        t = float(table_value)
        assert abs(got[ours] - t) <= 0.5e-5 * max(abs(t), 1e-300) + (1e-12 if t == 0 else 0)


def test_sub_metrics_llama2_full():
    got = TL.log_summary(load("llama2-7b_full"))
    for s, (rouge, prob, tr) in SUB.items():
        assert f"{got[f'{s} ROUGE']:.6g}" == f"{rouge:.6g}"
        assert f"{got[f'{s} Prob']:.6g}" == f"{prob:.6g}"
        assert f"{got[f'{s} Truth Ratio']:.6g}" == f"{tr:.6g}"
    assert "Forget Quality" not in got


@pytest.mark.parametrize("name", sorted(p.stem for p in LOGS.glob("*.json")) if LOGS.is_dir() else [])
def test_every_row_rouge_recomputed(name):
    log = load(name)
    n = 0
    for key, v in log.items():
        idx = sorted(v["generated_text"], key=int)
        gens = [v["generated_text"][i][1] for i in idx]
        gts = [v["generated_text"][i][2] for i in idx]
        r = M.rouge_recalls(gens, gts)
        np.testing.assert_allclose(r["rougeL_recall"], [v["rougeL_recall"][i] for i in idx], rtol=0, atol=1e-12,
                                   err_msg=f"{name} {key} rougeL")
        np.testing.assert_allclose(r["rouge1_recall"], [v["rouge1_recall"][i] for i in idx], rtol=0, atol=1e-12,
                                   err_msg=f"{name} {key} rouge1")
        n += len(idx)
    assert n == sum(len(v["generated_text"]) for v in log.values()) > 0


def test_row_counts_are_tofus_cut():
    log = load("llama2-7b_full")
    counts = {k: len(v["avg_gt_loss"]) for k, v in log.items()}
    assert counts == {"eval_log.json": 300, "eval_log_forget.json": 300,
                      "eval_real_author_wo_options.json": 100, "eval_real_world_wo_options.json": 117}


# ---------------------------------------------------------------- our layout


def _per_sample_from_log(log, with_second_pass=True):
    """Our per_sample structure, filled from a TOFU log (as evaluate_qa_benchmark would)."""
    st = TL.log_set_stats(log)
    ps = {}
    for name, key in TL.TOFU_LOG_FILES.items():
        v = log[key]
        idx = sorted(v["avg_gt_loss"], key=int)
        g = st[name]
        ps[name] = {
            "question": [v["generated_text"][i][0] for i in idx],
            "answer": [v["generated_text"][i][2] for i in idx],
            "prompt": [v["generated_text"][i][0] for i in idx],
            "generation": [v["generated_text"][i][1] for i in idx],
            "answer_mean_nll": g["answer_mean_nll"],
            "answer_num_tokens": [v["num_token_gt"][i] for i in idx],
            "perturbed_mean_nll": g["perturbed_mean_nll"],
            "perturbed_num_tokens": [v["num_token_perturb"][i] for i in idx],
            "rougeL_recall": g["rougeL_recall"],
            "rouge1_recall": [v["rouge1_recall"][i] for i in idx],
        }
        if name in ("forget", "retain") or with_second_pass:
            ps[name]["paraphrased_mean_nll"] = g["paraphrased_mean_nll"]
            ps[name]["paraphrased_num_tokens"] = [v["num_token_paraphrased"][i] for i in idx]
    return ps


def test_write_read_roundtrip(tmp_path):
    log = load("phi_full")
    ps = _per_sample_from_log(log)
    path = TL.write_tofu_log(tmp_path, ps)
    assert path.name == "eval_log_aggregated.json"
    back = TL.read_tofu_log(tmp_path)  # a directory works too
    assert set(back) == set(log)
    for key, v in log.items():
        b = back[key]
        for stat in ("avg_gt_loss", "average_perturb_loss", "rougeL_recall", "rouge1_recall", "generated_text",
                     "num_token_gt", "num_token_perturb"):
            assert b[stat] == v[stat], (key, stat)
        np.testing.assert_allclose(list(b["gt_loss"].values()), list(v["gt_loss"].values()), rtol=1e-6)  # float32 sums
        np.testing.assert_allclose(list(b["truth_ratio"].values()), list(v["truth_ratio"].values()), rtol=1e-5)
        if "normalized_gt_loss" in v:
            np.testing.assert_allclose(list(b["normalized_gt_loss"].values()),
                                       list(v["normalized_gt_loss"].values()), rtol=1e-9)
    # on Real Authors / World Facts, TOFU's avg_paraphrased_loss is the answer's loss from a
    # second pass (equal up to bf16 batching noise); without one we write the answer loss itself
    ra = "eval_real_author_wo_options.json"
    one_pass = TL.to_tofu_log(_per_sample_from_log(log, with_second_pass=False))
    assert one_pass[ra]["avg_paraphrased_loss"] == back[ra]["avg_gt_loss"]
    np.testing.assert_allclose(list(one_pass[ra]["avg_paraphrased_loss"].values()),
                               list(log[ra]["avg_paraphrased_loss"].values()), rtol=5e-2)
    assert TL.log_summary(back, load("phi_retain90"))["Forget Quality"] == pytest.approx(
        float(TABLE[("phi_full", "phi_retain90")][1]), rel=1e-5)


def test_reference_truth_ratios():
    R = TL.log_forget_truth_ratios(load("llama2-7b_retain90"))
    v = load("llama2-7b_retain90")["eval_log_forget.json"]
    idx = sorted(v["avg_paraphrased_loss"], key=int)
    expect = np.exp(np.array([v["avg_paraphrased_loss"][i] for i in idx])
                    - np.array([np.mean(v["average_perturb_loss"][i]) for i in idx]))
    np.testing.assert_allclose(R, expect, rtol=1e-12)


def test_bad_logs(tmp_path):
    with pytest.raises(FileNotFoundError):
        TL.read_tofu_log(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON"):
        TL.read_tofu_log(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"eval_log.json": {"avg_gt_loss": {}}}))
    with pytest.raises(ValueError, match="lacks"):
        TL.read_tofu_log(tmp_path / "y.json")
    (tmp_path / "z.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="none of the TOFU"):
        TL.read_tofu_log(tmp_path / "z.json")
    (tmp_path / "w.json").write_text(json.dumps({"eval_log.json": {k: {} for k in TL._REQUIRED}}))
    with pytest.raises(ValueError, match="forget"):
        TL.log_forget_truth_ratios(TL.read_tofu_log(tmp_path / "w.json"))
