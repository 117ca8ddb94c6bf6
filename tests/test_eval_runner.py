"""The evaluation runner against independent computations.

A tiny LLaMA (transformers + torch) with a BPE tokenizer trained on the synthetic
benchmark, briefly fitted so that it emits EOS and prefers some answers. Each test
compares the runner with a computation done here by hand: torch forward passes for
the per-sample numbers, and numpy / scipy / rouge-score for the aggregates.
"""

from __future__ import annotations

import json
import statistics
import zlib

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from scipy import stats
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from simu_jax.data import QATemplate, SyntheticConfig, make_synthetic, train_bpe_tokenizer
from simu_jax.evaluate.runner import (
    Scorer,
    cli_main,
    evaluate_lume,
    evaluate_qa_benchmark,
    forget_truth_ratios,
    mmlu_accuracy,
    reference_forget_truth_ratios,
)
from simu_jax.models import split_params
from simu_jax.models.convert import load_pretrained

TOL = 1e-4
TEMPLATE = QATemplate()
BOS, EOS, PAD = 1, 2, 0
NEW = 12  # max_new_tokens everywhere: one compiled generation program
BUCKETS = (128,)  # one padded length for every sequence here: few compiled programs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bench():
    return make_synthetic(SyntheticConfig(seed=0, num_people=5, facts_per_person=3, num_general=5))




@pytest.fixture(scope="module")
def hf(tmp_path_factory, bench):
    """(model_dir, torch model, tokenizer): tiny LLaMA fitted for a few steps on forget+retain+general."""
    root = tmp_path_factory.mktemp("runner")
    model_dir = root / "model"
    train_bpe_tokenizer(bench.texts() + make_synthetic().texts()[:400], model_dir, vocab_size=384)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.05, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg).float()
    seqs = [[BOS] + ids(tok, TEMPLATE.text(r["question"], r["answer"])) + [EOS] for r in bench.train_set()]
    T = max(map(len, seqs))
    x = torch.tensor([s + [PAD] * (T - len(s)) for s in seqs])
    m = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    labels = torch.where(m == 1, x, -100)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model(input_ids=x, attention_mask=m, labels=labels).loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(model_dir)
    return model_dir, model, tok


@pytest.fixture(scope="module")
def scorer(hf):
    model_dir, _, tok = hf
    graphdef, params = split_params(load_pretrained(model_dir))
    return Scorer(graphdef, params, tok, batch_size=4, buckets=BUCKETS)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def torch_logp(model, seq):
    with torch.no_grad():
        logits = model(torch.tensor([seq])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()  # [T, V]


def torch_answer_nll(model, tok, question, answer):
    """Mean NLL of the answer tokens + EOS, gathered by hand from the HF forward pass."""
    prompt = [BOS] + ids(tok, TEMPLATE.prompt(question))
    seq = prompt + ids(tok, answer) + [EOS]
    lp = torch_logp(model, seq)
    return -np.mean([lp[t - 1, seq[t]] for t in range(len(prompt), len(seq))])


def hf_greedy(model, tok, prompt_text, max_new):
    seq = [BOS] + ids(tok, prompt_text)
    with torch.no_grad():
        out = model.generate(torch.tensor([seq]), attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    new = out[0, len(seq):].tolist()
    if EOS in new:
        new = new[: new.index(EOS)]
    return tok.decode(new, skip_special_tokens=True).strip()


def pairwise_auc(pos, neg):
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def rouge_recall(gen, ref):
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, gen)["rougeL"].recall


class ScriptedScorer(Scorer):
    """Generation replaced by fixed strings (the true answer, a cut one, or junk) so that ROUGE
    and so Model Utility are not trivially 0; everything else is the real model."""

    def generate_answers(self, records, max_new_tokens=200):
        out = []
        for i, r in enumerate(records):
            words = str(r["answer"]).split()
            out.append([" ".join(words), " ".join(words[: max(1, len(words) // 2)]), "zzz qqq"][i % 3])
        return out


# --------------------------------------------------------------------------- per-sample numbers


def test_answer_mean_nll_matches_torch(hf, scorer, bench):
    _, model, tok = hf
    recs = bench.forget + bench.retain[:4] + bench.general[:2]
    for key in ("answer", "paraphrased_answer"):
        ours = scorer.answer_mean_nll(recs, answer_key=key)
        ref = [torch_answer_nll(model, tok, r["question"], r[key]) for r in recs]
        assert ours.shape == (len(recs),)
        np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    # token accuracy: teacher-forced argmax over the same positions
    acc = scorer.token_accuracy(recs[:3])
    for a, r in zip(acc, recs[:3]):
        prompt = [BOS] + ids(tok, TEMPLATE.prompt(r["question"]))
        seq = prompt + ids(tok, r["answer"]) + [EOS]
        lp = torch_logp(model, seq)
        hits = [lp[t - 1].argmax() == seq[t] for t in range(len(prompt), len(seq))]
        assert a == pytest.approx(np.mean(hits))


def test_perturbed_mean_nll_matches_torch(hf, scorer, bench):
    _, model, tok = hf
    recs = bench.forget
    pert = scorer.perturbed_mean_nll(recs)
    assert pert.shape == (len(recs), len(recs[0]["perturbed_answer"])) == (3, 5)
    r = recs[1]
    ref = [torch_answer_nll(model, tok, r["question"], a) for a in r["perturbed_answer"]]
    np.testing.assert_allclose(pert[1], ref, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="different numbers"):
        scorer.perturbed_mean_nll([r, {**r, "perturbed_answer": r["perturbed_answer"][:2]}])


def test_generate_answers_match_hf_greedy(hf, scorer, bench):
    """7 prompts in batches of 4 (the last one filled up): each equals HF greedy on that prompt alone."""
    _, model, tok = hf
    recs = bench.forget + bench.holdout + bench.general[:1]
    ours = scorer.generate_answers(recs, max_new_tokens=NEW)
    ref = [hf_greedy(model, tok, TEMPLATE.prompt(r["question"]), NEW) for r in recs]
    assert ours == ref
    assert sum(bool(o) for o in ours) >= 4  # the fitted model says something


def test_token_logprobs_and_minkpp_moments_match_torch(hf, scorer, bench):
    _, model, tok = hf
    texts = [bench.retain[0]["answer"], "Paris is the capital of France, said nobody in particular."]
    st = scorer.token_logprobs(texts, with_stats=True)
    for i, t in enumerate(texts):
        seq = [BOS] + ids(tok, t)
        lp = torch_logp(model, seq)[:-1]
        p = np.exp(lp)
        mu = (p * lp).sum(-1)
        sigma = np.sqrt((p * lp * lp).sum(-1) - mu**2)
        picked = lp[np.arange(len(seq) - 1), seq[1:]]
        np.testing.assert_allclose(st["token_logprobs"][i], picked, atol=TOL, rtol=0)
        np.testing.assert_allclose(st["mu"][i], mu, atol=TOL, rtol=0)
        np.testing.assert_allclose(st["sigma"][i], sigma, atol=TOL, rtol=0)
        assert st["mean_nll"][i] == pytest.approx(-picked.mean(), abs=TOL)
    assert st["texts"] == texts


def test_short_last_batch_equals_batch_size_one(hf, scorer, bench):
    _, _, tok = hf
    recs = bench.forget + bench.holdout + bench.general[:1]  # 7 rows: batches of 4 + 3 (filled up)
    one = Scorer(scorer.graphdef, scorer.params, tok, batch_size=1, buckets=BUCKETS)
    a, b = scorer.answer_mean_nll(recs), one.answer_mean_nll(recs)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scorer.perturbed_mean_nll(recs[:5]), one.perturbed_mean_nll(recs[:5]), atol=1e-5)


# --------------------------------------------------------------------------- aggregates


def _truth_ratio(para, pert):
    return np.exp(np.asarray(para) - np.asarray(pert).mean(axis=1))


def _min_k(values, k=0.2):
    v = np.sort(np.asarray(values))
    return v[: max(1, int(len(v) * k))].mean()


def test_qa_summary_equals_independent_recomputation(hf, scorer, bench):
    _, _, tok = hf
    sc = ScriptedScorer(scorer.graphdef, scorer.params, tok, batch_size=4, buckets=BUCKETS)
    sets = {"forget": bench.forget, "retain": bench.retain, "general": bench.general, "holdout": bench.holdout}
    ref_R = np.random.default_rng(0).lognormal(0.0, 0.5, size=7)
    summary, ps = evaluate_qa_benchmark(sc, sets, reference_forget_truth_ratios=ref_R)

    f, r, g, h = ps["forget"], ps["retain"], ps["general"], ps["holdout"]
    # per-sample generations / ROUGE are what was generated, scored with rouge-score directly
    for rec_set, p in ((bench.forget, f), (bench.retain, r), (bench.general, g)):
        assert p["generation"] == sc.generate_answers(rec_set)
        expected = [rouge_recall(x, y["answer"]) for x, y in zip(p["generation"], rec_set)]
        np.testing.assert_allclose(p["rougeL_recall"], expected)
    R_f = _truth_ratio(f["paraphrased_mean_nll"], f["perturbed_mean_nll"])
    R_r = _truth_ratio(r["paraphrased_mean_nll"], r["perturbed_mean_nll"])
    R_g = _truth_ratio(g["answer_mean_nll"], g["perturbed_mean_nll"])  # world-facts rule: true answer in the slot
    np.testing.assert_allclose(f["truth_ratio"], R_f, rtol=1e-12)
    expect = {
        "forget_prob": np.mean(np.exp(-np.asarray(f["answer_mean_nll"]))),
        "retain_prob": np.mean(np.exp(-np.asarray(r["answer_mean_nll"]))),
        "general_prob": np.mean([np.exp(-a) / (np.exp(-a) + np.exp(-np.asarray(p)).sum())
                                 for a, p in zip(g["answer_mean_nll"], g["perturbed_mean_nll"])]),
        "forget_rouge": np.mean(f["rougeL_recall"]),
        "retain_rouge": np.mean(r["rougeL_recall"]),
        "general_rouge": np.mean(g["rougeL_recall"]),
        "forget_truth_ratio": np.mean(np.minimum(R_f, 1 / R_f)),
        "retain_truth_ratio": np.mean(np.maximum(0, 1 - R_r)),
        "general_truth_ratio": np.mean(np.maximum(0, 1 - R_g)),
        "forget_quality": stats.ks_2samp(1 / R_f, 1 / ref_R).pvalue,
    }
    expect["model_utility"] = stats.hmean([expect[f"{s}_{m}"] for s in ("retain", "general")
                                           for m in ("prob", "rouge", "truth_ratio")])
    assert expect["model_utility"] > 0
    for k, v in expect.items():
        assert summary[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert summary["Model Utility"] == summary["model_utility"]
    assert summary["General Prob"] == summary["general_prob"]

    # MIA: forget (members) vs holdout, answer tokens + EOS; Min-K% variants drop the EOS position
    def scores(p, answers):
        lp = [np.asarray(x) for x in p["token_logprobs"]]
        z = [(np.asarray(x) - np.asarray(m)) / np.maximum(np.asarray(s), 1e-3)
             for x, m, s in zip(lp, p["mu"], p["sigma"])]
        return {
            "loss": [x.mean() for x in lp],
            "zlib": [x.mean() / len(zlib.compress(a.encode())) for x, a in zip(lp, answers)],
            "min_k": [_min_k(x[:-1]) for x in lp],
            "min_k_pp": [_min_k(x[:-1]) for x in z],
        }

    sm, sn = scores(f, f["answer"]), scores(h, h["answer"])
    for attack in ("loss", "zlib", "min_k", "min_k_pp"):
        assert summary[f"mia_auc_{attack}"] == pytest.approx(pairwise_auc(sm[attack], sn[attack]), abs=1e-12)
    np.testing.assert_allclose(sm["loss"], -np.asarray(f["answer_mean_nll"]), atol=1e-5)
    assert [len(x) for x in f["token_logprobs"]] == [len(ids(tok, a)) + 1 for a in f["answer"]]
    assert set(forget_truth_ratios((summary, ps))) == set(R_f)


def test_tofu_roles_model_utility_and_reference(hf, scorer, bench):
    """real_authors / world_facts: TOFU's 9-number utility; reference = same model -> FQ 1."""
    model_dir, _, tok = hf
    sc = ScriptedScorer(scorer.graphdef, scorer.params, tok, batch_size=4, buckets=BUCKETS)
    sets = {"forget": bench.forget, "retain": bench.retain[:4], "real_authors": bench.general[:3],
            "world_facts": bench.general[3:]}
    ref_R = reference_forget_truth_ratios(scorer, bench.forget)
    summary, ps = evaluate_qa_benchmark(sc, sets, reference_forget_truth_ratios=ref_R)
    keys = [f"{s}_{m}" for s in ("retain", "real_authors", "world_facts") for m in ("prob", "rouge", "truth_ratio")]
    assert summary["model_utility"] == pytest.approx(stats.hmean([summary[k] for k in keys]), rel=1e-12)
    assert summary["forget_quality"] == 1.0 and summary["ks_test_forget"] == 0.0
    assert "mia_auc_loss" not in summary and any("holdout" in n for n in summary["notes"])
    with pytest.raises(ValueError, match="either 'general'"):
        evaluate_qa_benchmark(sc, {**sets, "general": bench.general})
    with pytest.raises(ValueError, match="paraphrased_answer"):
        evaluate_qa_benchmark(sc, {"forget": [{k: v for k, v in bench.forget[0].items() if k != "paraphrased_answer"}]})
    nogen, _ = evaluate_qa_benchmark(scorer, {"forget": bench.forget[:2]}, generate=False)
    assert "forget_rouge" not in nogen and "forget_prob" in nogen


def test_lume_summary_equals_independent_recomputation(hf, scorer, bench):
    _, model, tok = hf
    forget = [
        {"id": '"d1"sc1', "input": "Question: " + bench.forget[0]["question"], "output": bench.forget[0]["answer"],
         "task": "Task1"},
        {"id": '"d1"qa0', "input": bench.forget[1]["question"], "output": "Lisbon", "task": "Task1"},
        {"id": "d2sc1", "input": bench.forget[2]["question"], "output": bench.forget[2]["answer"], "task": "Task2"},
    ]
    retain = [
        {"id": "d3qa0", "input": bench.retain[0]["question"], "output": "x", "task": "Task1", "kind": "qa"},
        {"id": "d4sc1", "input": bench.retain[1]["question"], "output": bench.retain[1]["answer"], "task": "Task1"},
    ]
    members = [{"id": str(i), "document": TEMPLATE.text(r["question"], r["answer"])}
               for i, r in enumerate(bench.forget)]
    nonmembers = [TEMPLATE.text(r["question"], r["answer"]) for r in bench.holdout]
    summary, ps = evaluate_lume(scorer, forget, retain, members, nonmembers, max_new_tokens=NEW)

    rows = ps["rows"]
    assert [r["id"] for r in rows] == [r["id"] for r in forget + retain]
    # generations are plain continuations of the input (no template): HF greedy on the raw text
    assert rows[0]["prediction"] == hf_greedy(model, tok, forget[0]["input"], NEW)
    cells = {}
    for row, src in zip(rows, forget + retain):
        kind = "sc" if src["id"][:-1].endswith("sc") else "qa"
        score = (rouge_recall(row["prediction"], src["output"]) if kind == "sc"
                 else float(src["output"].strip().lower() == row["prediction"].strip().lower()))
        assert row["score"] == pytest.approx(score)
        cells.setdefault((row["split"], src["task"], kind), []).append(score)
    terms = [1 - np.mean(v) if s == "forget" else np.mean(v) for (s, _, _), v in sorted(cells.items())]
    assert summary["task_aggregate"] == pytest.approx(statistics.harmonic_mean(terms) if min(terms) > 0 else 0.0)
    sc_f = [v for (s, _, k), vs in cells.items() if s == "forget" and k == "sc" for v in vs]
    assert summary["forget_regurgitation"] == pytest.approx(np.mean(sc_f))
    # document MIA: loss attack on the mean NLL over every token after BOS, HF style
    nll_m = [torch_doc_nll(model, tok, d["document"]) for d in members]
    nll_n = [torch_doc_nll(model, tok, d) for d in nonmembers]
    np.testing.assert_allclose(ps["mia"]["member"]["nll"], nll_m, atol=TOL)
    auc = pairwise_auc(-np.asarray(ps["mia"]["member"]["nll"]), -np.asarray(ps["mia"]["nonmember"]["nll"]))
    assert summary["mia_auc"] == summary["mia_auc_loss"] == pytest.approx(auc)
    assert summary["mia_score"] == pytest.approx(1 - 2 * abs(auc - 0.5))
    assert summary["semeval"]["complete"] is False


def torch_doc_nll(model, tok, text):
    seq = [BOS] + ids(tok, text)
    lp = torch_logp(model, seq)
    return -np.mean([lp[t - 1, seq[t]] for t in range(1, len(seq))])


# --------------------------------------------------------------------------- CLI


def test_cli_writes_summary_json(hf, tmp_path, capsys):
    model_dir, _, _ = hf
    out = tmp_path / "eval"
    rc = cli_main(["--model", str(model_dir), "--benchmark", "synthetic", "--limit", "3", "--out", str(out),
                   "--reference", str(model_dir), "--max-new-tokens", str(NEW), "--batch-size", "4",
                   "--method", "target",
                   "--buckets", ",".join(map(str, BUCKETS))])
    assert rc == 0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["method"] == "target" and doc["benchmark"] == "synthetic"
    metrics = doc["metrics"]
    for key in ("forget_rouge", "retain_rouge", "forget_prob", "retain_prob", "forget_truth_ratio",
                "model_utility", "forget_quality", "general_prob", "mia_auc_loss", "mia_auc_zlib",
                "mia_auc_min_k", "mia_auc_min_k_pp"):
        assert isinstance(metrics[key], float), key
    assert metrics["forget_quality"] == 1.0  # the reference is the model itself
    assert all(" " not in k for k in metrics)
    per = json.loads((out / "per_sample.json").read_text())
    assert len(per["forget"]["generation"]) == 3 and len(per["holdout"]["answer"]) == 3
    assert per["meta"]["protocol"] == "tofu" and doc["settings"]["protocol"] == "tofu"  # the synthetic default (DEFAULT_PROTOCOL)
    # no temp files left; the per-row results also in TOFU's eval-log layout
    assert sorted(p.name for p in out.iterdir()) == ["eval_log_aggregated.json", "per_sample.json", "summary.json"]
    tofu_log = json.loads((out / "eval_log_aggregated.json").read_text())
    assert {"eval_log.json", "eval_log_forget.json", "eval_general.json"} <= set(tofu_log)
    forget_log = tofu_log["eval_log_forget.json"]
    assert sorted(forget_log["avg_gt_loss"]) == ["0", "1", "2"]
    np.testing.assert_allclose([forget_log["avg_gt_loss"][str(i)] for i in range(3)],
                               per["forget"]["answer_mean_nll"], rtol=1e-12)
    assert forget_log["generated_text"]["0"][1] == per["forget"]["generation"][0]
    assert "forget_rouge" in capsys.readouterr().out

    # that log is a forget-quality reference: the model against its own log -> FQ 1
    out2 = tmp_path / "eval2"
    rc = cli_main(["--model", str(model_dir), "--benchmark", "synthetic", "--limit", "3", "--out", str(out2),
                   "--reference-log", str(out / "eval_log_aggregated.json"), "--max-new-tokens", str(NEW),
                   "--batch-size", "4", "--buckets", ",".join(map(str, BUCKETS)), "--no-generate"])
    doc2 = json.loads((out2 / "summary.json").read_text())
    assert doc2["metrics"]["forget_quality"] == 1.0 and doc2["reference_log"].endswith("eval_log_aggregated.json")


def test_cli_bad_model_dirs_give_one_line_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        cli_main(["--model", str(missing), "--benchmark", "synthetic"])
    assert str(missing) in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as e:
        cli_main(["--model", str(empty), "--benchmark", "synthetic"])
    assert "no weights" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="lume"):
        cli_main(["--model", str(empty), "--benchmark", "lume", "--reference", str(empty)])
    with pytest.raises(ValueError, match="not both"):
        cli_main(["--model", str(empty), "--benchmark", "tofu", "--reference", str(empty),
                  "--reference-log", str(empty)])
    with pytest.raises(FileNotFoundError, match="TOFU eval log"):
        cli_main(["--model", str(empty), "--benchmark", "synthetic", "--reference-log", str(missing)])
    with pytest.raises(ValueError, match="'tofu' does not apply to the lume benchmark"):
        cli_main(["--model", str(empty), "--benchmark", "lume", "--protocol", "tofu"])
    with pytest.raises(ValueError, match="'semeval' does not apply to the synthetic benchmark"):
        cli_main(["--model", str(empty), "--benchmark", "synthetic", "--protocol", "semeval"])
    with pytest.raises(ValueError, match="--mmlu applies to the lume benchmark"):
        cli_main(["--model", str(empty), "--benchmark", "synthetic", "--mmlu", str(empty)])
    with pytest.raises(ValueError, match="--template must be"):
        cli_main(["--model", str(empty), "--benchmark", "synthetic", "--template", "Q:"])


def test_tofu_without_data_reads_the_local_copy_or_else_the_hub(tmp_path, monkeypatch):
    """`--benchmark tofu` without --data: the copy under the data root when there, else every
    split from the hub dataset locuslab/TOFU (datasets.load_dataset faked: no network here);
    an explicit --data that is missing is a one-line error; LUME has no hub copy to fall back on."""
    import datasets

    from simu_jax.data import TOFU_HUB_NAME, load_benchmark
    from simu_jax.data import benchmark as bench_mod
    from simu_jax.evaluate import runner

    args = runner.build_parser().parse_args(["--model", "m", "--benchmark", "tofu", "--tofu-split", "forget05"])
    spec = runner._data_spec(args)
    assert spec.source is None and spec.forget == "forget05" and spec.holdout == "holdout05"

    calls = []

    def fake_load_dataset(name, config, split):
        calls.append((name, config, split))
        row = {"question": f"{config}?", "answer": "a", "paraphrased_answer": "a", "perturbed_answer": ["b"]}
        return [row, row]

    monkeypatch.setattr(bench_mod, "default_data_dir", lambda: tmp_path)  # no tofu/ under the data root
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bench = load_benchmark(spec)
    assert {c[0] for c in calls} == {TOFU_HUB_NAME} and {c[2] for c in calls} == {"train"}
    assert [c[1] for c in calls] == ["forget05_perturbed", "retain95", "holdout05", "retain_perturbed",
                                     "real_authors_perturbed", "world_facts_perturbed"]
    assert bench.forget[0]["question"] == "forget05_perturbed?" and bench.info["source"] == TOFU_HUB_NAME

    with pytest.raises(FileNotFoundError, match="TOFU data directory not found") as e:
        runner._data_spec(runner.build_parser().parse_args(["--model", "m", "--benchmark", "tofu",
                                                     "--data", str(tmp_path / "nope")]))
    assert "\n" not in str(e.value)
    import simu_jax.data as data_pkg

    monkeypatch.setattr(data_pkg, "default_data_dir", lambda: tmp_path)  # what _data_spec imports
    with pytest.raises(FileNotFoundError, match="not on the Hugging Face hub") as e:
        runner._data_spec(runner.build_parser().parse_args(["--model", "m", "--benchmark", "lume"]))
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- unlearn's final evaluation


def torch_grad_norm(model, tok, question, answer):
    """open-unlearning's GradNorm statistic restated on the HF model: mean over the parameter
    tensors of the 2-norm of the gradient of the mean NLL of the answer tokens (the EOS
    prediction dropped, as ``tokenwise_logprobs``)."""
    prompt = [BOS] + ids(tok, TEMPLATE.prompt(question))
    seq = prompt + ids(tok, answer)
    model.zero_grad()
    logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
    nll = -torch.stack([logp[t - 1, seq[t]] for t in range(len(prompt), len(seq))]).mean()
    nll.backward()
    g = torch.stack([q.grad.norm(p=2) for q in model.parameters() if q.grad is not None]).mean().item()
    model.zero_grad()
    return g


def test_unlearn_evaluation_reports_the_evaluate_suite(hf, bench, tmp_path):
    """`simu-jax unlearn`'s final evaluation (evaluate_run) with a reference model and a holdout
    set: the reference-based MIA keys, privleak against the reference's Min-K% AUC, and with
    eval.gradnorm the GradNorm AUC, each against a computation here; all in summary.json, the
    returned metrics and the report table."""
    from simu_jax.config import load_config
    from simu_jax.evaluate import metrics as M
    from simu_jax.evaluate.report import format_table, load_run
    from simu_jax.unlearn import UnlearnConfig, evaluate_run, prepare

    _, fitted, tok = hf

    def random_model(seed, d):
        torch.manual_seed(seed)
        m_ = LlamaForCausalLM(fitted.config).float().eval()
        m_.save_pretrained(d)
        tok.save_pretrained(d)
        return m_

    # Two random models as target and reference: the fitted model's forget-vs-holdout AUCs are all
    # 1, for which privleak is -100 whatever the reference AUC.
    model_dir, ref_dir = tmp_path / "target", tmp_path / "reference"
    model, ref_model = random_model(1, model_dir), random_model(3, ref_dir)
    cfg = load_config(UnlearnConfig, None, [
        f"model.path={model_dir}", f"reference={ref_dir}", "data.synthetic.num_people=5",
        "data.synthetic.facts_per_person=3", "data.synthetic.num_general=5", "eval.generate=false",
        "eval.gradnorm=true", "eval.batch_size=4",
        "data.tokenization=split"])  # scored as trained: the `simu` protocol, which the references below restate
    prep = prepare(cfg)
    assert [r["question"] for r in prep.bench.holdout] == [r["question"] for r in bench.holdout]
    out = tmp_path / "run"
    metrics = evaluate_run(cfg, prep, prep.params, out)

    doc = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "per_sample.json").read_text())["meta"]["protocol"] == "simu"  # from data.tokenization
    for key in ("mia_auc_reference", "reference_mia_auc_min_k", "privleak", "mia_auc_gradnorm",
                "forget_extraction_strength", "forget_exact_memorization", "forget_quality"):
        assert np.isfinite(doc["metrics"][key]) and metrics[key] == doc["metrics"][key], key
    m = doc["metrics"]
    assert m["privleak"] == pytest.approx(M.privleak(m["mia_auc_min_k"], m["reference_mia_auc_min_k"]), rel=1e-12)
    assert m["privleak"] != pytest.approx(M.privleak(m["mia_auc_min_k"]))  # not against the default 0.5
    # reference attack: AUC of ref_nll - target_nll, members = forget, non-members = holdout
    def ref_minus_target(recs):
        return [torch_answer_nll(ref_model, tok, r["question"], r["answer"])
                - torch_answer_nll(model, tok, r["question"], r["answer"]) for r in recs]

    assert m["mia_auc_reference"] == pytest.approx(pairwise_auc(ref_minus_target(bench.forget),
                                                                ref_minus_target(bench.holdout)))
    # GradNorm: lower gradient norm = member
    g_f = [torch_grad_norm(model, tok, r["question"], r["answer"]) for r in bench.forget]
    g_h = [torch_grad_norm(model, tok, r["question"], r["answer"]) for r in bench.holdout]
    per = json.loads((out / "per_sample.json").read_text())
    np.testing.assert_allclose(per["forget"]["grad_norm"] + per["holdout"]["grad_norm"], g_f + g_h, rtol=1e-3)
    assert m["mia_auc_gradnorm"] == pytest.approx(pairwise_auc(-np.asarray(g_f), -np.asarray(g_h)))
    # forget quality came from the same reference scorer's truth ratios
    assert len(per["reference_forget_truth_ratio"]) == len(bench.forget)
    table = format_table([load_run(out)])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    order = ["forget_exact_memorization", "forget_extraction_strength", "mia_auc_min_k", "mia_auc_reference",
             "mia_auc_gradnorm", "reference_mia_auc_min_k", "privleak"]
    assert [c for c in header if c in order] == sorted(order, key=M.METRIC_ORDER.index)


# --------------------------------------------------------------------------- LUME under SemEval's protocol


def test_semeval_protocol_cleans_up_decoded_spaces_and_scores_in_bfloat16(hf, scorer, bench):
    """``--protocol semeval`` (LUME's default): generations decoded as transformers 4.x's
    ``decode(..., clean_up_tokenization_spaces=True)`` (evaluate_generations.py:114-117), the
    parameters in bfloat16 (:313); ``simu`` keeps the plain decode and the model's dtype."""
    import jax
    import jax.numpy as jnp

    from simu_jax.evaluate.protocol import default_protocol

    model_dir, model, tok = hf
    assert default_protocol("lume") == "semeval"
    sem = Scorer(scorer.graphdef, scorer.params, tok, batch_size=4, buckets=BUCKETS, protocol="semeval")
    old = Scorer(scorer.graphdef, scorer.params, tok, batch_size=4, buckets=BUCKETS, protocol="simu")
    text = "Lisbon , in Portugal . It is n't far"
    toks = ids(tok, text)
    assert tok.decode(toks) == text  # byte-level BPE: transformers' own decode keeps the spaces
    assert old._decode(toks) == text
    assert sem._decode(toks) == "Lisbon, in Portugal. It isn't far"
    # the same generations, decoded either way (float32 both, so only the decode differs)
    sem32 = Scorer(scorer.graphdef, scorer.params, tok, batch_size=4, buckets=BUCKETS, protocol="semeval",
                   dtype="float32")
    prompts = [r["question"] + " ," for r in bench.forget]
    assert sem32.generate_continuations(prompts, NEW) == [
        tok.clean_up_tokenization(g) for g in old.generate_continuations(prompts, NEW)]
    # bfloat16: parameters cast, document NLLs those of HF's bf16 model, not the float32 numbers
    assert sem.dtype == "bfloat16" and old.dtype is None
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(sem.params))
    docs = [TEMPLATE.text(r["question"], r["answer"]) for r in bench.forget]
    got = sem.token_logprobs(docs)["mean_nll"]
    bf16 = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        expect = [bf16(torch.tensor([[BOS] + ids(tok, d)]), labels=torch.tensor([[BOS] + ids(tok, d)])).loss.item()
                  for d in docs]
    f32 = [torch_doc_nll(model, tok, d) for d in docs]
    np.testing.assert_allclose(got, expect, rtol=5e-2)
    assert not np.allclose(got, f32, rtol=1e-4)


# --------------------------------------------------------------------------- MMLU


MMLU_TEST = {
    "high_school_geography": [
        ("Which city is the capital of Portugal?", "Madrid", "Lisbon", "Porto", "Faro", "B"),
        ("Which river flows through Paris?", "Seine", "Thames", "Rhine", "Danube", "A"),
        ("Which is a continent?", "Lisbon", "Paris", "Africa", "Seine", "C"),
    ],
    "astronomy": [
        ("Which planet is closest to the sun?", "Venus", "Earth", "Mars", "Mercury", "D"),
        ("What is the sun?", "a planet", "a star", "a moon", "a comet", "B"),
        ("How many moons has the Earth?", "1", "2", "0", "4", "A"),
    ],
}
MMLU_DEV = {
    "high_school_geography": [("Which country is Lisbon in?", "Spain", "Portugal", "France", "Italy", "B"),
                              ("Is the sea salty?", "yes", "no", "never", "dry", "A")],
    "astronomy": [("What orbits the Earth?", "the Moon", "Mars", "the Sun", "Venus", "A")],
}


def _write_mmlu(root, test=MMLU_TEST, dev=MMLU_DEV):
    import csv

    for split, data in (("test", test), ("dev", dev)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for subject, rows in data.items():
            with open(root / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows(rows)
    return root


def test_mmlu_accuracy_equals_independent_computation(hf, scorer, bench, tmp_path):
    """5-shot MMLU as open-instruct's eval/mmlu/run_eval.py (the metrics.json SemEval's scorer
    reads): the prompt written out here, the argmax over " A".." D" of the HF model's last-position
    logits; accuracy = mean over all rows; it completes the SemEval final score."""
    from simu_jax.data import load_mmlu

    _, model, tok = hf
    data = load_mmlu(_write_mmlu(tmp_path / "mmlu"))
    assert list(data) == ["astronomy", "high_school_geography"]  # sorted, as run_eval.py:176-182
    acc, per = mmlu_accuracy(scorer, data)
    cand = [ids(tok, " " + c)[-1] for c in "ABCD"]
    correct, preds = [], []
    for subject in ("astronomy", "high_school_geography"):
        words = {"astronomy": " astronomy", "high_school_geography": " high school geography"}[subject]
        shots = "".join(f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {y}\n\n"
                        for q, a, b, c, d, y in MMLU_DEV[subject])
        for q, a, b, c, d, y in MMLU_TEST[subject]:
            prompt = (f"The following are multiple choice questions (with answers) about {words}.\n\n" + shots
                      + f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")
            with torch.no_grad():
                logits = model(torch.tensor([[BOS] + ids(tok, prompt)])).logits[0, -1].numpy()
            preds.append("ABCD"[int(np.argmax(logits[cand]))])
            correct.append(preds[-1] == y)
    assert per["prediction"] == preds
    assert acc == pytest.approx(np.mean(correct)) and 0 < acc < 1  # some right, some wrong
    assert per["per_subject"]["astronomy"] == pytest.approx(np.mean(correct[:3]))
    # through the LUME evaluation: summary["mmlu"] and the final score's MMLU term
    members = [TEMPLATE.text(r["question"], r["answer"]) for r in bench.forget]
    nonmembers = [TEMPLATE.text(r["question"], r["answer"]) for r in bench.holdout]
    rows = [{"id": "d1sc1", "input": bench.forget[0]["question"], "output": bench.forget[0]["answer"],
             "task": "Task1"}]
    summary, _ = evaluate_lume(scorer, rows, rows, members, nonmembers, max_new_tokens=NEW, mmlu=data)
    assert summary["mmlu"] == acc and summary["semeval"]["mmlu"] == acc and summary["semeval"]["complete"]
    assert summary["semeval"]["final_score"] == pytest.approx(
        np.mean([summary["task_aggregate"], summary["mia_score"], acc]))
    no_mmlu, _ = evaluate_lume(scorer, rows, rows, members, nonmembers, max_new_tokens=NEW)
    assert not no_mmlu["semeval"]["complete"] and any("MMLU" in n for n in no_mmlu["notes"])


@pytest.mark.parametrize("bad", ["Which moon?,Io,Europa,Titan,B", "Which moon?,Io,Europa,Titan,Rhea,B,extra",
                                 "Which moon?,Io,Europa,Titan,Rhea,E"])
def test_mmlu_malformed_row_is_refused_naming_the_file(tmp_path, bad):
    from simu_jax.data import load_mmlu

    root = _write_mmlu(tmp_path / "mmlu")
    path = root / "test" / "astronomy_test.csv"
    path.write_text(path.read_text() + bad + "\n")
    with pytest.raises(ValueError) as e:
        load_mmlu(root)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
