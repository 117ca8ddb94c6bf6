"""Evaluation protocols against independent computations written from the official code.

A tiny random LLaMA (transformers + torch) with a byte-level BPE tokenizer trained on TOFU's text.
Under ``--protocol tofu`` each of TOFU's five choices is checked against code restated here
from ``locuslab/tofu`` @ bdc209e (``data_module.py``, ``evaluate_util.py``,
``config/eval_everything.yaml``); under ``open-unlearning`` the MIA's k and texts against
``locuslab/open-unlearning`` @ d3d7cf9 (``src/data/utils.py``, ``src/evals/metrics/utils.py``,
``src/evals/metrics/mia/*.py``, ``configs/eval/tofu_metrics/mia_min_k.yaml``).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from simu_jax.data import DataSpec, load_benchmark, train_bpe_tokenizer
from simu_jax.data.tokenize import QATemplate, tokenize_qa, tokenize_qa_joint
from simu_jax.evaluate.metrics import exact_memorization as M_EM
from simu_jax.evaluate.metrics import extraction_strength as M_ES
from simu_jax.evaluate.protocol import PROTOCOLS, get_protocol
from simu_jax.evaluate.runner import Scorer, check_template, evaluate_qa_benchmark, evaluation_sets, parse_template
from simu_jax.models import split_params
from simu_jax.models.convert import load_pretrained

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.skipif(not (DATA / "tofu" / "forget10_perturbed.json").is_file(), reason="TOFU data not found")]
# TOFU config/model_config.yaml, phi (and stablelm / pythia): the Question/Answer template
QS, QE, AT = "Question: ", "\n", "Answer: "
TEMPLATE = QATemplate(QS, QE, AT)
BUCKETS = (256,)




@pytest.fixture(scope="module")
def bench():
    return load_benchmark(DataSpec(benchmark="tofu", source=str(DATA / "tofu"), forget="forget10",
                                   holdout="holdout10"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory, bench):
    """(model_dir, torch model, tokenizer) of a random tiny LLaMA (wide argmax margins)."""
    d = tmp_path_factory.mktemp("tofu_protocol")
    texts = [TEMPLATE.text(r["question"], r["answer"]) for r in bench.forget + bench.retain_eval[:200]]
    train_bpe_tokenizer(texts, d, vocab_size=512)
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).float().eval()
    model.save_pretrained(d)
    return d, model, tok


def make_scorer(hf, protocol, batch_size=16, dtype="float32"):
    d, _, tok = hf
    graphdef, params = split_params(load_pretrained(d))
    return Scorer(graphdef, params, tok, TEMPLATE, batch_size=batch_size, buckets=BUCKETS, protocol=protocol,
                  dtype=dtype)


# ------------------------------------------------- TOFU's code, restated (locuslab/tofu @ bdc209e)


def tofu_convert(tokenizer, max_length, question, answer):
    """data_module.py:8-32 convert_raw_data_to_model_format."""
    new_question = QS + question + QE
    new_answer = AT + answer
    full_text = new_question + new_answer
    num_question_tokens = len(tokenizer.tokenize(new_question, add_special_tokens=True))
    encoded = tokenizer(full_text, add_special_tokens=True, max_length=max_length, truncation=True)
    pad_length = max_length - len(encoded.input_ids)
    pad_input_ids = encoded["input_ids"] + [tokenizer.eos_token_id] * pad_length
    pad_attention_mask = encoded["attention_mask"] + [0] * pad_length
    if len(encoded.input_ids) == max_length:
        label = encoded.input_ids
    else:
        label = encoded["input_ids"] + [tokenizer.eos_token_id] + [-100] * (pad_length - 1)
    for i in range(num_question_tokens):
        label[i] = -100
    return torch.tensor(pad_input_ids), torch.tensor(label), torch.tensor(pad_attention_mask)


def get_batch_loss(output, labels):
    """data_module.py:174-182."""
    shifted_labels = labels[..., 1:].contiguous()
    output = output[..., :-1, :].contiguous()
    loss_function = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")
    return loss_function(output.transpose(-1, -2), shifted_labels).sum(dim=-1)


def tofu_avg_gt_loss(model, tokenizer, records, answer_key="answer"):
    """evaluate_util.py:171-173: gt_loss / num_token_gt, max_length = generation.max_length = 200."""
    rows = [tofu_convert(tokenizer, 200, r["question"], r[answer_key]) for r in records]
    ids, labels, mask = (torch.stack(x) for x in zip(*rows))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    loss = get_batch_loss(logits, labels)
    return (loss.float() / (labels != -100).sum(-1)).numpy(), ids, labels


def tofu_run_generation(model, tokenizer, input_ids):
    """evaluate_util.py:304-332 run_generation (model_family phi: split at 'Answer: ')."""
    input_strings = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
    split_symbol = "Answer: "
    ground_truth = [s.split(split_symbol)[1] for s in input_strings]
    input_strings = [s.split(split_symbol)[0] for s in input_strings]
    left_pad_tokenizer = tokenizer
    left_pad_tokenizer.padding_side = "left"
    left_pad_tokenizer.pad_token = left_pad_tokenizer.eos_token
    inputs = left_pad_tokenizer(input_strings, add_special_tokens=True, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(inputs.input_ids, attention_mask=inputs.attention_mask, max_length=200,
                             max_new_tokens=None, do_sample=False, use_cache=True,
                             pad_token_id=left_pad_tokenizer.eos_token_id)
    strs = left_pad_tokenizer.batch_decode(out[:, inputs.input_ids.shape[-1]:], skip_special_tokens=True)
    return input_strings, strs, ground_truth, out[:, inputs.input_ids.shape[-1]:]


# ------------------------------------------------- 1. rows


def test_rows_first_300(bench):
    sets = evaluation_sets(bench, protocol="tofu")
    assert {k: len(v) for k, v in sets.items()} == {"forget": 300, "retain": 300, "real_authors": 100,
                                                   "world_facts": 117, "holdout": 300}
    # evaluate_util.py:130-133: data.select(range(min(ds_size, len(data)))) -- the first rows, in order
    for name, full in (("forget", bench.forget), ("retain", bench.retain_eval)):
        assert sets[name] == list(full[:300])
    # ... which are exactly the rows of TOFU's published phi log, in order
    log = json.loads((DATA / "tofu_eval_logs" / "phi_full.json").read_text())
    for name, key in (("forget", "eval_log_forget.json"), ("retain", "eval_log.json")):
        gt = log[key]["generated_text"]
        assert [gt[str(i)][0] for i in range(300)] == [QS + r["question"] + QE for r in sets[name]]
    # --limit keeps the first rows under tofu / open-unlearning, a seeded draw under simu
    assert evaluation_sets(bench, 5, seed=3, protocol="tofu")["forget"] == bench.forget[:5]
    assert len(evaluation_sets(bench, protocol="open-unlearning")["forget"]) == 400
    assert evaluation_sets(bench, 5, seed=3, protocol="simu")["forget"] != bench.forget[:5]


# ------------------------------------------------- 2. + 3. scored tokens, joint tokenization


def test_scored_tokens_and_joint_tokenization(hf, bench):
    _, model, tok = hf
    recs = bench.forget[:12]
    expect, ids, labels = tofu_avg_gt_loss(model, tok, recs)
    ours = make_scorer(hf, "tofu").answer_scores(recs)
    np.testing.assert_allclose(ours["mean_nll"], expect, rtol=1e-4)
    np.testing.assert_array_equal(ours["count"], (labels != -100).sum(-1).numpy())
    # the scored tokens are "Answer: " + answer + EOS: the answer tag is in the labels
    for lab, r in zip(labels, recs):
        text = tok.decode([int(t) for t in lab[lab != -100]], skip_special_tokens=True)
        assert text == AT + r["answer"]
    # joint tokenization: the seam differs from encoding prompt and answer apart, and we follow it
    joint = tokenize_qa_joint(tok, recs, TEMPLATE, max_length=200, style="tofu", pad_to=200)
    np.testing.assert_array_equal(joint["labels"][:, :200], labels.numpy())
    split = tokenize_qa(tok, recs, TEMPLATE, pad_to=200)
    assert any(not np.array_equal(a[m == 1], b[n == 1]) for a, b, m, n in
               zip(joint["input_ids"], split["input_ids"], joint["attention_mask"], split["attention_mask"]))
    # the earlier protocol scores answer + EOS only: fewer tokens, other numbers
    simu = make_scorer(hf, "simu").answer_scores(recs)
    assert np.all(simu["count"] < ours["count"])
    assert not np.allclose(simu["mean_nll"], ours["mean_nll"], rtol=1e-3)


def test_perturbed_and_paraphrased_follow_the_same_tokenization(hf, bench):
    _, model, tok = hf
    recs = bench.forget[:4]
    sc = make_scorer(hf, "tofu")
    para, _, _ = tofu_avg_gt_loss(model, tok, recs, "paraphrased_answer")
    np.testing.assert_allclose(sc.answer_scores(recs, "paraphrased_answer")["mean_nll"], para, rtol=1e-4)
    flat = [{"question": r["question"], "answer": a} for r in recs for a in r["perturbed_answer"]]
    pert, _, _ = tofu_avg_gt_loss(model, tok, flat)
    np.testing.assert_allclose(sc.perturbed_mean_nll(recs), pert.reshape(len(recs), -1), rtol=1e-4)


def test_truncation_at_200_drops_eos(hf):
    _, model, tok = hf
    rec = {"question": "Who?", "answer": " ".join(["word"] * 400)}
    expect, _, labels = tofu_avg_gt_loss(model, tok, [rec])
    got = make_scorer(hf, "tofu").answer_scores([rec])
    assert int(got["count"][0]) == int((labels != -100).sum()) and labels[0, -1] != tok.eos_token_id
    np.testing.assert_allclose(got["mean_nll"], expect, rtol=1e-4)


# ------------------------------------------------- 4. generation: prompt and total budget of 200


def test_generation_prompt_and_total_budget(hf, bench):
    _, model, _ = hf
    d = hf[0]
    tok = AutoTokenizer.from_pretrained(d)  # run_generation mutates its tokenizer
    recs = bench.forget[:32]  # TOFU's batches of 30: rows 0-29 and 30-31
    theirs_prompts, theirs, theirs_gt, theirs_ids = [], [], [], []
    for s in range(0, len(recs), 30):  # eval_everything.yaml batch_size: 30
        ids = torch.stack([tofu_convert(tok, 200, r["question"], r["answer"])[0] for r in recs[s:s + 30]])
        p, g, t, new = tofu_run_generation(model, tok, ids)
        theirs_prompts += p
        theirs += g
        theirs_gt += t
        theirs_ids += [row.tolist() for row in new]
    sc = make_scorer(hf, "tofu")
    proto = sc.protocol
    assert (proto.generation_total, proto.generation_batch, proto.generation_prompt) == (200, 30, "question")
    assert theirs_prompts == [QS + r["question"] + QE for r in recs] == \
        [sc.generation_template().prompt(r["question"]) for r in recs]
    assert theirs_gt == [r["answer"] for r in recs]
    budgets = sc.generation_budgets(recs, 200, 30)
    # HF generate(max_length=200) on a left-padded batch: 200 - the batch's longest prompt
    lens = sc.prompt_lengths(recs)
    assert budgets == [200 - max(lens[:30])] * 30 + [200 - max(lens[30:])] * 2
    assert [len(x) for x in theirs_ids] == [200 - max(lens[:30])] * 30 + [200 - max(lens[30:])] * 2
    ours = sc.generate_answers(recs, budgets)
    eos = tok.eos_token_id
    for i, (a, b, new) in enumerate(zip(ours, theirs, theirs_ids)):
        assert a == b.strip(), i
        n = new.index(eos) if eos in new else len(new)
        assert n <= budgets[i]
    # open-unlearning / simu generate from the prompt with the answer tag, 200 new tokens
    assert get_protocol("open-unlearning").generation_prompt == "prompt"
    assert make_scorer(hf, "open-unlearning").generation_template().prompt("q") == QS + "q" + QE + AT


def test_end_to_end_tofu_protocol(hf, bench):
    sets = {k: v[:3] for k, v in evaluation_sets(bench, protocol="tofu").items()}
    summary, per = evaluate_qa_benchmark(make_scorer(hf, "tofu", batch_size=4), sets, max_new_tokens=8)
    assert per["meta"]["protocol"] == "tofu" and per["meta"]["mia_k"] == 0.4
    assert per["forget"]["prompt"][0] == QS + sets["forget"][0]["question"] + QE
    assert all(len(x) == 3 for x in (per["forget"]["rouge1_recall"], per["forget"]["answer_num_tokens"]))
    assert {"model_utility", "mia_auc_min_k", "forget_rouge"} <= set(summary)


# ------------------------------------------------- 5. MIA under open-unlearning (k = 0.4, label texts)


def ou_preprocess(tokenizer, question, answer, max_length=512):
    """src/data/utils.py:92-124 (apply_chat_template False; TOFU template of configs/model/phi-1_5.yaml)."""
    wrapped_prompt = QS + question + QE + AT
    chat_ids = tokenizer(wrapped_prompt + answer, add_special_tokens=True, max_length=max_length,
                         truncation=True)["input_ids"]
    prompt_ids = tokenizer(wrapped_prompt, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"]
    if chat_ids[-1] != tokenizer.eos_token_id:
        chat_ids += [tokenizer.eos_token_id]
    len_matched = len(prompt_ids)
    labels = [-100] * len_matched + chat_ids[len_matched:]
    return chat_ids, labels


def ou_scores(model, tokenizer, records, k):
    """min_k.py, min_k_plus_plus.py, zlib.py, loss.py on utils.py's tokenwise_logprobs /
    tokenwise_vocab_logprobs / evaluate_probability, one sample at a time."""
    out = {"min_k": [], "min_k++": [], "zlib": [], "loss": []}
    for r in records:
        ids, labels = ou_preprocess(tokenizer, r["question"], r["answer"])
        ids_t, lab_t = torch.tensor([ids]), torch.tensor(labels)
        with torch.no_grad():
            logits = model(input_ids=ids_t).logits[0]
        log_probs = torch.log_softmax(logits, -1)[:-1]
        target = torch.gather(log_probs, 1, ids_t[0, 1:, None])[:, 0]
        actual = (lab_t != -100).nonzero(as_tuple=True)[0][:-1]  # -1: ignore the EOS prediction
        s, e = actual[0].item(), actual[-1].item()
        lp, vlp = target[s - 1:e].numpy(), log_probs[s - 1:e]
        num_k = max(1, int(len(lp) * k))
        out["min_k"].append(-np.mean(np.sort(lp)[:num_k]))
        mu = (torch.exp(vlp) * vlp).sum(-1)
        sigma = torch.clamp((torch.exp(vlp) * torch.square(vlp)).sum(-1) - torch.square(mu), min=1e-6)
        z = (torch.tensor(lp) - mu) / torch.sqrt(sigma)
        out["min_k++"].append(-np.mean(sorted(z.numpy())[:num_k]))
        loss = nn.CrossEntropyLoss(ignore_index=-100, reduction="none")(logits[:-1], lab_t[1:]).sum()
        avg_loss = (loss / (lab_t != -100).sum()).item()
        text = tokenizer.decode(lab_t[lab_t != -100].tolist(), skip_special_tokens=True)
        out["zlib"].append(avg_loss / len(zlib.compress(text.encode("utf-8"))))
        out["loss"].append(avg_loss)
    return {key: np.array(v) for key, v in out.items()}


@pytest.mark.parametrize("protocol", ["open-unlearning", "simu"])
def test_mia_k_and_texts(hf, bench, protocol):
    _, model, tok = hf
    sets = {"forget": bench.forget[:5], "holdout": bench.holdout[:5]}
    summary, per = evaluate_qa_benchmark(make_scorer(hf, protocol, batch_size=4), sets, generate=False)
    k = per["meta"]["mia_k"]
    assert k == {"open-unlearning": 0.4, "simu": 0.2}[protocol]
    assert PROTOCOLS["open-unlearning"].mia_k == 0.4  # configs/eval/tofu_metrics/mia_min_k.yaml:7
    if protocol != "open-unlearning":
        return
    for name in ("forget", "holdout"):
        ref = ou_scores(model, tok, sets[name], k=0.4)
        got = per[name]["mia_scores"]
        # our scores are "higher = member"; open-unlearning's are negated (mia/utils.py labels forget 0)
        np.testing.assert_allclose(got["min_k"], -ref["min_k"], rtol=1e-4)
        np.testing.assert_allclose(got["min_k++"], -ref["min_k++"], rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(got["zlib"], -ref["zlib"], rtol=1e-4)
        np.testing.assert_allclose(got["loss"], -ref["loss"], rtol=1e-4)
    # zlib compresses the decoded label tokens (here the answer as the joint text tokenizes it)
    sc = make_scorer(hf, "open-unlearning")
    assert sc.label_texts(sets["forget"][:1]) == [tok.decode(
        [t for t in ou_preprocess(tok, sets["forget"][0]["question"], sets["forget"][0]["answer"])[1] if t != -100],
        skip_special_tokens=True)]


# ------------------------------------------------- templates


def test_templates(hf):
    _, _, tok = hf
    assert parse_template("llama2") == QATemplate("[INST] ", " [/INST]", "")
    assert parse_template("A: |\\n|B: ") == QATemplate("A: ", "\n", "B: ")
    check_template(tok, parse_template("tofu"))
    with pytest.raises(ValueError, match="must be one of"):
        parse_template("only|two")
    with pytest.raises(ValueError, match="run together"):
        parse_template("Q: ||")

    class NoBrackets:  # a tokenizer whose vocabulary lacks '[': encodes it to <unk>
        unk_token_id = 3

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 if c == "[" else 10 for c in text]}

        def decode(self, ids, **kw):
            return "x" * len(ids)

    with pytest.raises(ValueError, match="does not fit the tokenizer") as e:
        check_template(NoBrackets(), parse_template("llama2"))
    assert "\n" not in str(e.value)


# ------------------------------------------------- open-unlearning's extra metrics on the model


def ou_hits(model, tokenizer, r):
    """memorization.py:184-205 on utils.py:149-190 tokenwise_vocab_logprobs (one sample)."""
    ids, labels = ou_preprocess(tokenizer, r["question"], r["answer"])
    lab_t = torch.tensor(labels)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    log_probs = torch.log_softmax(logits, -1)[:-1]
    actual = (lab_t != -100).nonzero(as_tuple=True)[0][:-1]
    s, e = actual[0].item(), actual[-1].item()
    preds = torch.argmax(log_probs[s - 1:e], dim=-1)
    return preds, lab_t[actual]


def test_extraction_strength_and_exact_memorization_match_open_unlearning(hf, bench):
    _, model, tok = hf
    sc = make_scorer(hf, "open-unlearning", batch_size=4)
    q = bench.forget[0]["question"]
    # the model's own greedy answer as the label: "memorised", so EM and ES are far from 0
    recs = bench.forget[:4] + [{"question": "Who?", "answer": "Hi"},
                               {"question": q, "answer": sc.generate_answers([q], 8)[0]}]
    hits = sc.token_hits(recs)
    got_es, got_em = M_ES(hits), M_EM(hits)
    for i, r in enumerate(recs):
        preds, labels = ou_hits(model, tok, r)
        n = len(labels)
        em = ((preds == labels).sum() / n).item()
        for k in range(n):
            if torch.equal(preds[k:], labels[k:]):
                break
        assert got_em[i] == pytest.approx(em, rel=1e-12)
        assert got_es[i] == pytest.approx(1 - k / n, rel=1e-12)
    # (the joint re-tokenization of "Answer: " + the generation moves the seam, so not all 1)
    assert got_em[-1] >= 0.5 > max(got_em[:5]), got_em


def test_gradnorm_matches_open_unlearning(hf, bench):
    _, model, tok = hf
    recs = bench.forget[:2]
    got = make_scorer(hf, "open-unlearning").grad_norms(recs)
    for g, r in zip(got, recs):  # mia/gradnorm.py:19-34 on tokenwise_logprobs (utils.py:106-146)
        ids, labels = ou_preprocess(tok, r["question"], r["answer"])
        ids_t, lab_t = torch.tensor([ids]), torch.tensor(labels)
        model.zero_grad()
        log_probs = torch.log_softmax(model(input_ids=ids_t).logits[0], -1)[:-1]
        target = torch.gather(log_probs, 1, ids_t[0, 1:, None])[:, 0]
        actual = (lab_t != -100).nonzero(as_tuple=True)[0][:-1]
        (-torch.mean(target[actual[0].item() - 1:actual[-1].item()])).backward()
        norms = [p.grad.detach().norm(p=2) for p in model.parameters() if p.grad is not None]
        assert g == pytest.approx(torch.stack(norms).mean().item(), rel=1e-3)
    model.zero_grad()


def test_reference_attack_and_privleak(hf, bench, tmp_path):
    _, model, tok = hf
    sets = {"forget": bench.forget[:4], "holdout": bench.holdout[:4]}
    sc = make_scorer(hf, "open-unlearning", batch_size=4)
    summary, per = evaluate_qa_benchmark(sc, sets, generate=False, reference_scorer=sc, gradnorm=True)
    # the model as its own reference: every reference score is 0 -> AUC 0.5; privleak 0 (same AUC)
    assert summary["mia_auc_reference"] == 0.5
    assert summary["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= summary["mia_auc_gradnorm"] <= 1.0 and len(per["forget"]["grad_norm"]) == 4
    alone, _ = evaluate_qa_benchmark(sc, sets, generate=False)
    assert alone["privleak"] == pytest.approx((0.5 - alone["mia_auc_min_k"]) / 0.5 * 100, rel=1e-6)
    assert 0 <= alone["forget_extraction_strength"] <= 1 and 0 <= alone["forget_exact_memorization"] <= 1


# ------------------------------------------------- precision: TOFU evaluates in bfloat16


def test_tofu_scores_in_bfloat16(hf, bench):
    d, model, tok = hf
    sc = make_scorer(hf, "tofu", dtype="protocol")  # the protocol's dtype
    assert sc.dtype == "bfloat16" and get_protocol("tofu").dtype == "bfloat16"  # evaluate_util.py:237
    import jax
    import jax.numpy as jnp

    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(sc.params))
    assert make_scorer(hf, "open-unlearning", dtype="protocol").dtype is None
    recs = bench.forget[:6]
    got = sc.answer_scores(recs)["mean_nll"]
    bf16 = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    expect, _, _ = tofu_avg_gt_loss(bf16, tok, recs)  # TOFU's computation on the bf16 model
    f32, _, _ = tofu_avg_gt_loss(model, tok, recs)
    np.testing.assert_allclose(got, expect, rtol=5e-2)
    assert not np.allclose(got, f32, rtol=1e-4)  # it is not the float32 number
    with pytest.raises(ValueError, match="dtype"):
        make_scorer(hf, "tofu", dtype="int-ish")


def test_default_protocol_per_benchmark():
    # TOFU and the synthetic benchmark (whose targets finetune trains TOFU-style by default) are
    # evaluated as TOFU's code does; a model trained with another tokenization is scored on the
    # tokens it was trained on.
    from simu_jax.data import DataSpec
    from simu_jax.evaluate.protocol import default_protocol, get_protocol

    assert default_protocol("tofu") == "tofu" and get_protocol(None, default_protocol("tofu")).name == "tofu"
    assert default_protocol("synthetic") == "tofu" and default_protocol("lume") == "semeval"
    assert [DataSpec(benchmark=b).tokenization_style() for b in ("synthetic", "tofu", "lume")] == ["tofu", "tofu",
                                                                                                  "split"]
    assert default_protocol("synthetic", "split") == "simu" and default_protocol("tofu", "open-unlearning") == \
        "open-unlearning"
    assert default_protocol("lume", "split") == "semeval"


def test_training_tokenization_is_tofus(hf, bench):
    # TOFU trains (finetune.py / forget.py: TextDatasetQA, TextForgetDatasetQA) with the same
    # convert_raw_data_to_model_format it evaluates with: data.tokenization tofu gives its rows.
    _, _, tok = hf
    recs = bench.forget[:10]
    ours = tokenize_qa(tok, recs, TEMPLATE, 200, style="tofu", pad_to=200)
    for i, r in enumerate(recs):
        ids, labels, mask = tofu_convert(tok, 200, r["question"], r["answer"])
        np.testing.assert_array_equal(ours["labels"][i], labels.numpy())
        n = int(mask.sum())  # TOFU's attended tokens; ours also attend to the appended EOS
        np.testing.assert_array_equal(ours["input_ids"][i, :n], ids[:n].numpy())
        assert ours["attention_mask"][i].sum() == n + 1 and ours["input_ids"][i, n] == tok.eos_token_id
    # training's truncation rule applies: a cut row is reported (warn) or refused (error)
    long = [{"question": "Who?", "answer": " ".join(["word"] * 400)}]
    with pytest.warns(UserWarning, match="longer than 64 tokens"):
        cut = tokenize_qa(tok, long, TEMPLATE, 64, style="tofu")
    assert cut["attention_mask"].sum() == 64 and (cut["labels"] != -100).sum() == 64 - len(
        tok.tokenize(QS + "Who?" + QE, add_special_tokens=True))
    with pytest.raises(ValueError, match="longer than 64 tokens"):
        tokenize_qa(tok, long, TEMPLATE, 64, truncation="error", style="tofu")
