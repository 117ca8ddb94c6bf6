"""Run a model over a benchmark and turn its outputs into the reported metrics.

This module is the model side of evaluation: it computes the per-sample
statistics (answer NLLs, greedy generations, per-token log-probs) with
jit-compiled JAX code, and hands them to the pure metric functions in
:mod:`simu_jax.evaluate.metrics` and :mod:`simu_jax.evaluate.mia` (definitions
and sources in ``docs/metrics.md``).

* :class:`Scorer`: batched, jit-compiled helpers for one model and tokenizer.
  Every batch has the same number of rows (the last one is filled up with
  copies of its last row, whose outputs are dropped) and a bucketed length, so
  XLA compiles one program per (bucket, kind of pass), not one per batch.
* :func:`evaluate_qa_benchmark`: TOFU-style evaluation (TOFU itself and the
  embedded synthetic benchmark): probability, ROUGE-L recall, truth ratio,
  model utility, forget quality against a reference model, and the MIA family
  (LOSS, zlib, Min-K%, Min-K%++) forget vs holdout.
* :func:`evaluate_lume`: LUME / SemEval-2025 Task 4: regurgitation (ROUGE-L
  recall on ``sc`` rows), knowledge (exact match on ``qa`` rows), the task
  aggregate, the document-level MIA and MMLU (:func:`mmlu_accuracy`).
* :func:`cli_main`: ``simu-jax evaluate``.

Summary keys
------------
Both evaluators return ``(summary, per_sample)``.  ``summary`` is a flat dict.
The numbers use snake_case keys, which are what ``summary.json`` (and so
``simu-jax report``) carries:

* QA benchmarks: ``{set}_prob``, ``{set}_rouge``, ``{set}_truth_ratio`` for each
  set present (``forget``, ``retain``, ``real_authors``, ``world_facts`` or
  ``general``), ``model_utility``, ``forget_quality`` and ``ks_test_forget``
  (with a reference), ``mia_auc_loss``, ``mia_auc_zlib``, ``mia_auc_min_k``,
  ``mia_auc_min_k_pp`` (with a holdout set), open-unlearning's ``forget_extraction_strength``,
  ``forget_exact_memorization``, ``privleak`` (with a holdout set), ``mia_auc_reference`` and
  ``reference_mia_auc_min_k`` (with a reference model), ``mia_auc_gradnorm`` (``--gradnorm``).
  The protocol (``--protocol``, :mod:`simu_jax.evaluate.protocol`) decides rows, scored tokens,
  tokenization, generation and MIA settings.  The TOFU display names
  (``"Forget Prob"``, ``"Model Utility"``, ...) from
  :func:`~simu_jax.evaluate.metrics.tofu_summary` are kept alongside.
* LUME: ``forget_regurgitation``, ``forget_knowledge``, ``retain_regurgitation``,
  ``retain_knowledge`` (the official ``overall-*-score``: means over rows),
  ``task_aggregate``, and with MIA documents ``mia_auc_loss`` (= ``mia_auc``,
  the official loss attack), ``mia_auc_zlib``, ``mia_auc_min_k``,
  ``mia_auc_min_k_pp`` and ``mia_score``, with MMLU data (``--mmlu``) ``mmlu``.  Nested
  extras: ``per_task``, ``semeval`` (the final score), ``mmlu_per_subject``.  The protocol
  ``semeval`` (LUME's default) runs in bfloat16 and decodes as SemEval's script.
* ``robustness`` (``--attack``, synthetic / tofu): the forget metrics after each robustness
  attack and their recovery (:func:`simu_jax.evaluate.attacks.run_attacks`); nested, so in
  ``summary.json`` under ``details``.
* ``notes``: a list of strings saying what was skipped and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simu_jax.data.tokenize import DEFAULT_BUCKETS
from simu_jax.evaluate import metrics as M
from simu_jax.evaluate import mia as MIA
from simu_jax.evaluate.metrics import METRIC_ORDER, summary_metrics
from simu_jax.evaluate.protocol import PROTOCOL_NAMES, check_protocol, default_protocol, get_protocol
from simu_jax.evaluate.scoring import Scorer

__all__ = [
    "QA_SETS",
    "Scorer",
    "cli_main",
    "TEMPLATES",
    "build_parser",
    "check_template",
    "parse_template",
    "evaluate_lume",
    "evaluate_qa_benchmark",
    "forget_truth_ratios",
    "evaluation_sets",
    "mmlu_accuracy",
    "subset",
    "reference_forget_truth_ratios",
    "summary_metrics",
    "write_results",
]

# QA evaluation sets in report order; "general" is the synthetic benchmark's world-knowledge set.
QA_SETS: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts", "general")
_SET_DISPLAY = {**M.TOFU_SET_NAMES, "general": "General"}
_METRIC_SUFFIX = {"Prob": "prob", "ROUGE": "rouge", "Truth Ratio": "truth_ratio"}
_MIA_KEYS = {"loss": "mia_auc_loss", "zlib": "mia_auc_zlib", "min_k": "mia_auc_min_k", "min_k++": "mia_auc_min_k_pp"}


def _check_set(name: str, records: Sequence[Mapping[str, Any]]) -> None:
    if not records:
        raise ValueError(f"evaluation set {name!r} is empty")
    need = ["question", "answer"]
    if name in QA_SETS:
        need.append("perturbed_answer")
    if name in ("forget", "retain"):
        need.append("paraphrased_answer")
    for i, r in enumerate(records):
        missing = [k for k in need if k not in r or r[k] is None]
        if missing:
            raise ValueError(f"set {name!r}, record {i}: missing {', '.join(missing)}")


def _noop(_msg: str) -> None:
    pass


def _mia_inputs(stats: Mapping[str, Any], drop_last: bool) -> dict[str, Any]:
    def cut(arrs):
        return [a[:-1] if len(a) > 1 else a for a in arrs] if drop_last else list(arrs)

    out: dict[str, Any] = {"token_logprobs": cut(stats["token_logprobs"])}
    if drop_last:
        out["mu"], out["sigma"] = cut(stats["mu"]), cut(stats["sigma"])
    else:
        out["texts"] = stats["texts"]
    return out


def _mia_family(member: Mapping[str, Any], nonmember: Mapping[str, Any], k: float, drop_last: bool):
    """AUCs and per-sample scores of the four attacks.

    LOSS and zlib use every scored token; Min-K% and Min-K%++ drop the last scored position
    when ``drop_last`` (the EOS prediction on QA answers, as open-unlearning's
    ``tokenwise_logprobs``; see docs/metrics.md).
    """
    full_m, full_n = _mia_inputs(member, False), _mia_inputs(nonmember, False)
    tok_m, tok_n = _mia_inputs(member, drop_last), _mia_inputs(nonmember, drop_last)
    if not drop_last:
        tok_m.update(mu=member["mu"], sigma=member["sigma"])
        tok_n.update(mu=nonmember["mu"], sigma=nonmember["sigma"])
    aucs = MIA.mia_aucs(full_m, full_n, k)
    aucs_k = MIA.mia_aucs(tok_m, tok_n, k)
    aucs["min_k"], aucs["min_k++"] = aucs_k["min_k"], aucs_k["min_k++"]

    def scores(full, tok):
        return {
            "loss": np.atleast_1d(MIA.loss_score(full["token_logprobs"])),
            "zlib": np.atleast_1d(MIA.zlib_score(full["token_logprobs"], None, full["texts"])),
            "min_k": np.atleast_1d(MIA.min_k_score(tok["token_logprobs"], None, k)),
            "min_k++": np.atleast_1d(
                MIA.min_k_plus_plus_score(tok["token_logprobs"], tok["mu"], tok["sigma"], None, k)),
        }

    return aucs, scores(full_m, tok_m), scores(full_n, tok_n)


def evaluate_qa_benchmark(
    scorer: Scorer,
    sets: Mapping[str, Sequence[Mapping[str, Any]]],
    reference_forget_truth_ratios: Any | None = None,
    generate: bool = True,
    max_new_tokens: int | None = None,
    *,
    mia_k: float | None = None,
    perturbed_mean: str = "geometric",
    log: Callable[[str], None] | None = None,
    reference_scorer: Scorer | None = None,
    gradnorm: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """TOFU-style evaluation of one model on QA sets.

    open-unlearning's extra metrics: ``forget_extraction_strength`` and
    ``forget_exact_memorization`` (means over the forget rows, :func:`metrics.extraction_strength`,
    :func:`metrics.exact_memorization`) always; with a holdout set ``privleak`` (against the
    retain model's Min-K% AUC when ``reference_scorer``, the retain-only model, is given, else
    open-unlearning's default 0.5), with ``reference_scorer`` also ``mia_auc_reference``
    (:func:`mia.reference_score`), and with ``gradnorm=True`` ``mia_auc_gradnorm`` (one gradient
    per row: slow on big models).

    The protocol is the scorer's (``scorer.protocol``, :mod:`simu_jax.evaluate.protocol`): it
    fixes the tokenization of scored sequences (in the scorer), the generation prompt and
    budget, and the MIA's ``k`` and zlib texts. ``max_new_tokens``: new-token budget (default:
    the protocol's, 200; under ``tofu`` the budget is TOFU's total length of 200 tokens per
    batch of 30 rows and ``max_new_tokens``, when given, caps it further). ``mia_k``: default the
    protocol's (0.4 under tofu / open-unlearning, 0.2 under simu). The rows are scored as given:
    :func:`evaluation_sets` makes the protocol's cut (TOFU: the first 300).

    ``sets`` maps set names to records (``question``, ``answer``, ``paraphrased_answer``,
    ``perturbed_answer`` list):

    * ``forget``, ``retain``: probability ``mean exp(-nll(answer))``, ROUGE-L recall of the
      greedy answer, truth ratio with the ``paraphrased_answer`` vs the perturbed answers.
    * ``real_authors``, ``world_facts`` (TOFU): probability normalised over the true and the
      perturbed answers, truth ratio with the true answer in the paraphrase slot (TOFU's
      ``base_answer_key: answer``). Model Utility = TOFU's harmonic mean of 9 numbers.
    * ``general`` (synthetic benchmark, instead of real_authors/world_facts): one "General"
      group evaluated exactly like TOFU's world_facts (its answers are bare values and its
      perturbed answers bare wrong values, as in TOFU's world_facts file).  **Model Utility is
      then the harmonic mean of the six numbers Retain {Prob, ROUGE, Truth Ratio} and General
      {Prob, ROUGE, Truth Ratio}**: every reported number counts once.  (Filling both TOFU
      roles with the same set would count General twice, i.e. give it weight 2/3.)
    * ``holdout`` (optional): non-member questions from the forget distribution; with it the
      MIA family (LOSS, zlib, Min-K%, Min-K%++) is computed on the answer tokens, members =
      forget, non-members = holdout.

    ``reference_forget_truth_ratios``: per-sample raw truth ratios R of the retain-only model
    on the same forget records (:func:`reference_forget_truth_ratios` or
    :func:`forget_truth_ratios` of its own evaluation, or a TOFU eval log's); adds Forget
    Quality (KS p-value). Without them, ``reference_scorer`` (the retain-only model) gives them
    (:func:`reference_forget_truth_ratios`), so one reference scorer yields forget quality and the
    reference-based MIA keys; the R used is ``per_sample["reference_forget_truth_ratio"]``.

    ``generate=False`` skips generation: the ROUGE numbers and Model Utility are left out
    (noted in ``summary["notes"]``).

    Returns ``(summary, per_sample)``: see the module docstring for the summary keys;
    ``per_sample[set]`` holds lists per record (``question``, ``answer``, ``generation``,
    ``answer_mean_nll``, ``answer_prob``, ``paraphrased_mean_nll``, ``perturbed_mean_nll``
    [N][K], ``truth_ratio`` (raw R), ``rougeL_recall``; forget/holdout with MIA also
    ``token_logprobs``, ``mu``, ``sigma``, ``mia_scores``).
    """
    log = log or _noop
    unknown = set(sets) - set(QA_SETS) - {"holdout"}
    if unknown:
        raise ValueError(f"unknown evaluation sets {sorted(unknown)}; expected {', '.join(QA_SETS)}, holdout")
    if "general" in sets and ({"real_authors", "world_facts"} & set(sets)):
        raise ValueError("pass either 'general' (synthetic) or 'real_authors'/'world_facts' (TOFU), not both")
    if not any(s in sets for s in QA_SETS):
        raise ValueError(f"no evaluation set given; expected some of {', '.join(QA_SETS)}")
    if "holdout" in sets and "forget" not in sets:
        raise ValueError("a holdout set is only used for MIA against the forget set; 'forget' is missing")
    if reference_forget_truth_ratios is not None and "forget" not in sets:
        raise ValueError("forget quality needs the 'forget' set")
    for name, recs in sets.items():
        _check_set(name, recs)

    proto = scorer.protocol
    if mia_k is None:
        mia_k = proto.mia_k
    if max_new_tokens is not None and int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    gen_template = scorer.generation_template()
    notes: list[str] = []
    per_set_stats: dict[str, dict[str, np.ndarray]] = {}
    per_sample: dict[str, Any] = {}
    mia_member = mia_nonmember = None
    for name in QA_SETS:
        if name not in sets:
            continue
        recs = list(sets[name])
        t0 = time.perf_counter()
        st: dict[str, np.ndarray] = {}
        counts: dict[str, Any] = {}
        if name == "forget" and "holdout" in sets:
            mia_member = scorer.qa_token_logprobs(recs, with_stats=True)
            ans = {"mean_nll": mia_member["mean_nll"],
                   "count": np.array([len(a) for a in mia_member["token_logprobs"]], np.int64)}
        else:
            ans = scorer.answer_scores(recs)
        st["answer_mean_nll"] = ans["mean_nll"]
        counts["answer_num_tokens"] = ans["count"]
        if name in ("forget", "retain"):
            para = scorer.answer_scores(recs, "paraphrased_answer")
            st["paraphrased_mean_nll"] = para["mean_nll"]
            counts["paraphrased_num_tokens"] = para["count"]
        pert = scorer.perturbed_scores(recs)
        st["perturbed_mean_nll"] = pert["mean_nll"]
        counts["perturbed_num_tokens"] = pert["count"]
        gens = rouge1 = None
        if generate:
            if proto.generation_total is not None:
                budget: Any = scorer.generation_budgets(recs, proto.generation_total, proto.generation_batch,
                                                        max_new_tokens)
            else:
                budget = int(max_new_tokens if max_new_tokens is not None else (proto.max_new_tokens or 200))
            gens = scorer.generate_answers(recs, budget)
            rouge = M.rouge_recalls(gens, [str(r["answer"]) for r in recs])
            st["rougeL_recall"], rouge1 = rouge["rougeL_recall"], rouge["rouge1_recall"]
        else:
            st["rougeL_recall"] = np.full(len(recs), np.nan)
        per_set_stats["world_facts" if name == "general" else name] = st
        para = st.get("paraphrased_mean_nll", st["answer_mean_nll"])
        R = M.truth_ratio(para, st["perturbed_mean_nll"], perturbed_mean=perturbed_mean)
        ps: dict[str, Any] = {
            "question": [str(r["question"]) for r in recs],
            "answer": [str(r["answer"]) for r in recs],
            "prompt": [gen_template.prompt(str(r["question"])) for r in recs],
            "generation": gens,
            "answer_mean_nll": st["answer_mean_nll"],
            "answer_prob": np.exp(-st["answer_mean_nll"]),
            "perturbed_mean_nll": st["perturbed_mean_nll"],
            "truth_ratio": R,
            "rougeL_recall": st["rougeL_recall"] if generate else None,
            "rouge1_recall": rouge1,
            **counts,
        }
        if "paraphrased_mean_nll" in st:
            ps["paraphrased_mean_nll"] = st["paraphrased_mean_nll"]
        per_sample[name] = ps
        log(f"  {name}: {len(recs)} records in {time.perf_counter() - t0:.1f}s")

    if "forget" in sets:  # open-unlearning's memorisation metrics on the forget rows
        hits = scorer.token_hits(list(sets["forget"]))
        es, em = M.extraction_strength(hits), M.exact_memorization(hits)
        per_sample["forget"]["extraction_strength"], per_sample["forget"]["exact_memorization"] = es, em
        extra = {"forget_extraction_strength": float(np.mean(es)),
                 "forget_exact_memorization": float(np.nanmean(em)) if np.isfinite(em).any() else float("nan")}
    else:
        extra = {}

    ref = None
    if reference_forget_truth_ratios is None and reference_scorer is not None and "forget" in sets:
        reference_forget_truth_ratios = _reference_truth_ratios(reference_scorer, list(sets["forget"]),
                                                                perturbed_mean)
    if reference_forget_truth_ratios is not None:
        ref = np.asarray(reference_forget_truth_ratios, dtype=np.float64).ravel()
        if ref.size == 0:
            raise ValueError("reference_forget_truth_ratios is empty")
        per_sample["reference_forget_truth_ratio"] = ref
    tofu = M.tofu_summary(per_set_stats, ref, perturbed_mean=perturbed_mean)
    if "general" in sets:
        tofu = {k.replace("World Facts", "General"): v for k, v in tofu.items()}
        six = [f"{_SET_DISPLAY[s]} {m}" for s in ("retain", "general") for m in ("Prob", "ROUGE", "Truth Ratio")]
        if all(k in tofu for k in six):
            tofu["Model Utility"] = M.harmonic_mean(tofu[k] for k in six)
    if not generate:
        tofu = {k: v for k, v in tofu.items() if not k.endswith(" ROUGE") and k != "Model Utility"}
        notes.append("generation skipped (--no-generate): ROUGE and Model Utility not computed")
    elif "Model Utility" not in tofu:
        notes.append("Model Utility needs retain and general (or retain, real_authors and world_facts)")

    summary: dict[str, Any] = dict(tofu)
    summary.update(extra)
    for name in QA_SETS:
        for metric, suffix in _METRIC_SUFFIX.items():
            key = f"{_SET_DISPLAY[name]} {metric}"
            if key in tofu:
                summary[f"{name}_{suffix}"] = tofu[key]
    if "Model Utility" in tofu:
        summary["model_utility"] = tofu["Model Utility"]
    if "Forget Quality" in tofu:
        summary["forget_quality"] = tofu["Forget Quality"]
        summary["ks_test_forget"] = tofu["KS Test Forget"]
    elif "forget" in sets:
        notes.append("no reference (retain-only) model: forget quality not computed")

    if "holdout" in sets:
        t0 = time.perf_counter()
        hold = list(sets["holdout"])
        mia_nonmember = scorer.qa_token_logprobs(hold, with_stats=True)
        aucs, s_mem, s_non = _mia_family(mia_member, mia_nonmember, mia_k, drop_last=True)
        for k, v in aucs.items():
            summary[_MIA_KEYS[k]] = v
        for ps_, stats, sc in ((per_sample["forget"], mia_member, s_mem), (None, mia_nonmember, s_non)):
            if ps_ is None:
                ps_ = per_sample["holdout"] = {
                    "question": [str(r["question"]) for r in hold],
                    "answer": [str(r["answer"]) for r in hold],
                    "answer_mean_nll": stats["mean_nll"],
                }
            ps_.update(token_logprobs=stats["token_logprobs"], mu=stats["mu"], sigma=stats["sigma"], mia_scores=sc)
        ref_auc = 0.5
        if reference_scorer is not None:
            fr = list(sets["forget"])
            r_mem = reference_scorer.qa_token_logprobs(fr, with_stats=True)
            r_non = reference_scorer.qa_token_logprobs(hold, with_stats=True)
            ref_auc = _mia_family(r_mem, r_non, mia_k, drop_last=True)[0]["min_k"]
            summary["mia_auc_reference"] = MIA.auc(MIA.reference_score(mia_member["mean_nll"], r_mem["mean_nll"]),
                                                   MIA.reference_score(mia_nonmember["mean_nll"], r_non["mean_nll"]))
            summary["reference_mia_auc_min_k"] = ref_auc
        else:
            notes.append("privleak against open-unlearning's default retain AUC 0.5 (no reference model)")
        summary["privleak"] = M.privleak(summary["mia_auc_min_k"], ref_auc)
        if gradnorm:
            g_mem = scorer.grad_norms(list(sets["forget"]))
            g_non = scorer.grad_norms(hold)
            summary["mia_auc_gradnorm"] = MIA.auc(MIA.gradnorm_score(g_mem), MIA.gradnorm_score(g_non))
            per_sample["forget"]["grad_norm"], per_sample["holdout"]["grad_norm"] = g_mem, g_non
        log(f"  holdout / MIA: {len(hold)} records in {time.perf_counter() - t0:.1f}s")
    elif "forget" in sets:
        notes.append("no holdout set: MIA not computed")
    summary["notes"] = notes
    per_sample["meta"] = {"protocol": proto.name, "mia_k": mia_k, "perturbed_mean": perturbed_mean,
                          "generate": bool(generate),
                          "max_new_tokens": int(max_new_tokens) if max_new_tokens is not None else proto.max_new_tokens,
                          "generation_total": proto.generation_total,
                          "counts": {k: len(v) for k, v in sets.items()}}
    return summary, per_sample


def _reference_truth_ratios(scorer: Scorer, forget_records: Sequence[Mapping[str, Any]],
                            perturbed_mean: str) -> np.ndarray:
    # the body of reference_forget_truth_ratios, under a name that evaluate_qa_benchmark's
    # parameter of that name does not shadow
    para = scorer.answer_mean_nll(forget_records, "paraphrased_answer")
    pert = scorer.perturbed_mean_nll(forget_records)
    return M.truth_ratio(para, pert, perturbed_mean=perturbed_mean)


def reference_forget_truth_ratios(scorer: Scorer, forget_records: Sequence[Mapping[str, Any]],
                                  perturbed_mean: str = "geometric") -> np.ndarray:
    """Raw truth ratios R of a (retain-only reference) model on the forget records (no generation)."""
    _check_set("forget", forget_records)
    return _reference_truth_ratios(scorer, forget_records, perturbed_mean)


def forget_truth_ratios(result: Any) -> np.ndarray:
    """The per-sample forget-set truth ratios R from an :func:`evaluate_qa_benchmark` result.

    Accepts the ``per_sample`` dict, the ``(summary, per_sample)`` tuple, or a per_sample
    dict read back from ``per_sample.json``. Pass the reference model's array as
    ``reference_forget_truth_ratios`` when evaluating an unlearned model.
    """
    if isinstance(result, tuple):
        result = result[1]
    try:
        return np.asarray(result["forget"]["truth_ratio"], dtype=np.float64)
    except (KeyError, TypeError):
        raise ValueError("no forget-set truth ratios in this result (was a 'forget' set evaluated?)") from None


# --------------------------------------------------------------------------- LUME


def _lume_kind(row: Mapping[str, Any]) -> str:
    return str(row["kind"]) if row.get("kind") else M.lume_kind_from_id(str(row["id"]))


def _doc_text(d: Any) -> str:
    return str(d["document"]) if isinstance(d, Mapping) else str(d)


def evaluate_lume(
    scorer: Scorer,
    forget_rows: Sequence[Mapping[str, Any]],
    retain_rows: Sequence[Mapping[str, Any]],
    member_docs: Sequence[Any] | None = None,
    nonmember_docs: Sequence[Any] | None = None,
    max_new_tokens: int = 256,
    *,
    generate: bool = True,
    mia_k: float | None = None,
    mmlu: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """LUME / SemEval-2025 Task 4 evaluation (official ``evaluate_generations.py``).

    Rows (from :func:`simu_jax.data.load_lume`) carry ``id``, ``input``, ``output``, ``task``
    and ``kind`` (``sc``/``qa``, else taken from the id). The model continues ``input`` as
    plain text (no QA template; greedy, ``max_new_tokens`` = 256 as the official script);
    ``sc`` rows score ROUGE-L recall of the continuation against ``output`` (regurgitation),
    ``qa`` rows exact match (knowledge); then :func:`metrics.lume_summary`. Dtype and decoding
    are the scorer's protocol's: ``semeval`` (the default for LUME) runs in bfloat16 and decodes
    with ``clean_up_tokenization_spaces=True`` as the official script; ``simu`` as before.

    ``member_docs`` / ``nonmember_docs`` (dicts with ``document``, or strings) give the
    document-level MIA: the official loss attack (mean NLL over all tokens) as ``mia_auc`` /
    ``mia_auc_loss`` and ``mia_score = 1 - 2|AUC - 0.5|``, plus zlib, Min-K% and Min-K%++
    (``mia_k``: default the protocol's, 0.2). Documents longer than ``scorer.max_length`` tokens
    are scored on their start.

    ``mmlu``: :func:`simu_jax.data.load_mmlu`'s data; its accuracy (:func:`mmlu_accuracy`) is
    ``summary["mmlu"]`` and the MMLU term of ``summary["semeval"]``
    (:func:`metrics.semeval_final_score`), which without it is flagged incomplete.
    """
    log = log or _noop
    if mia_k is None:
        mia_k = scorer.protocol.mia_k
    notes: list[str] = []
    summary: dict[str, Any] = {}
    per_sample: dict[str, Any] = {}
    rows_out: list[dict[str, Any]] = []
    if generate:
        for split, rows in (("forget", forget_rows), ("retain", retain_rows)):
            rows = list(rows)
            if not rows:
                continue
            t0 = time.perf_counter()
            kinds = [_lume_kind(r) for r in rows]
            gens = scorer.generate_continuations([str(r["input"]) for r in rows], max_new_tokens)
            refs = [str(r["output"]) for r in rows]
            for r, kind, gen, ref in zip(rows, kinds, gens, refs):
                score = (M.rouge_l_recall([gen], [ref])[0] if kind == "sc" else M.exact_match([gen], [ref])[0])
                rows_out.append({"id": str(r.get("id", "")), "task": str(r["task"]), "split": split, "kind": kind,
                                 "reference": ref, "prediction": gen, "score": float(score)})
            log(f"  {split}: {len(rows)} rows in {time.perf_counter() - t0:.1f}s")
        if rows_out:
            lume = M.lume_summary(rows_out)
            for split, vals in lume["overall"].items():
                for name, v in vals.items():
                    summary[f"{split}_{name}"] = v
            summary["task_aggregate"] = lume["task_aggregate"]
            summary["per_task"] = lume["per_task"]
            per_sample["aggregated_terms"] = lume["aggregated_terms"]
        else:
            notes.append("no forget/retain rows: task metrics not computed")
    else:
        notes.append("generation skipped (--no-generate): regurgitation/knowledge scores not computed")
    per_sample["rows"] = rows_out

    mia_s = None
    if member_docs is not None and nonmember_docs is not None and len(member_docs) and len(nonmember_docs):
        t0 = time.perf_counter()
        mem = scorer.token_logprobs([_doc_text(d) for d in member_docs], with_stats=True)
        non = scorer.token_logprobs([_doc_text(d) for d in nonmember_docs], with_stats=True)
        aucs, s_mem, s_non = _mia_family(mem, non, mia_k, drop_last=False)
        for k, v in aucs.items():
            summary[_MIA_KEYS[k]] = v
        summary["mia_auc"] = aucs["loss"]
        mia_s = M.mia_score(aucs["loss"])
        summary["mia_score"] = mia_s
        per_sample["mia"] = {
            "member": {"id": [str(d.get("id", "")) if isinstance(d, Mapping) else "" for d in member_docs],
                       "nll": mem["mean_nll"], "scores": s_mem},
            "nonmember": {"id": [str(d.get("id", "")) if isinstance(d, Mapping) else "" for d in nonmember_docs],
                          "nll": non["mean_nll"], "scores": s_non},
        }
        log(f"  MIA: {len(member_docs)} + {len(nonmember_docs)} documents in {time.perf_counter() - t0:.1f}s")
    else:
        notes.append("no member/nonmember documents: MIA not computed")
    if mmlu is not None:
        t0 = time.perf_counter()
        summary["mmlu"], per_sample["mmlu"] = mmlu_accuracy(scorer, mmlu)
        summary["mmlu_per_subject"] = per_sample["mmlu"]["per_subject"]
        log(f"  MMLU: {len(per_sample['mmlu']['answer'])} questions in {time.perf_counter() - t0:.1f}s")
    else:
        notes.append("MMLU not computed (--mmlu DIR / eval.mmlu): the SemEval final score is incomplete")
    if "task_aggregate" in summary:
        summary["semeval"] = M.semeval_final_score(summary["task_aggregate"], mia_s, summary.get("mmlu"))
    summary["notes"] = notes
    per_sample["meta"] = {"protocol": scorer.protocol.name, "dtype": scorer.dtype, "mia_k": mia_k,
                          "generate": bool(generate), "max_new_tokens": int(max_new_tokens)}
    return summary, per_sample


def mmlu_accuracy(scorer: Scorer, data: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    """MMLU accuracy as open-instruct's ``eval/mmlu/run_eval.py`` (``allenai/open-instruct`` @
    d05effeb4), whose ``metrics.json`` ``average_acc`` SemEval's scorer reads as its MMLU term
    (:mod:`simu_jax.data.mmlu` for the prompts): per test row the argmax of the next-token logits
    over the last token of ``" A"``, ``" B"``, ``" C"``, ``" D"`` (``run_eval.py:93-103``;
    ``eval/utils.py:140-159`` ``get_next_word_predictions``: ``tokenizer(prompts,
    add_special_tokens=True)``, left padding, ``logits[:, -1]``; the argmax of the softmax over
    the candidates is the argmax of their logits), right when it is the answer letter; the
    accuracy is the mean over all rows of all subjects (``run_eval.py:239``, ``average_acc``).

    Not reproduced: open-instruct loads the model with ``torch_dtype="auto"`` (``utils.py:259``,
    the checkpoint's dtype); here it runs in the scorer's dtype (bfloat16 under ``semeval``) with
    float32 logits. Returns ``(accuracy, per_sample)`` with per-row ``subject``, ``answer``,
    ``prediction``, ``logits`` [N, 4] and ``per_subject`` accuracies.
    """
    from simu_jax.data import MMLU_CHOICES, bos_prefix, mmlu_prompts

    tok = scorer.tokenizer
    rows = mmlu_prompts(data, tok, max_tokens=scorer.max_length - len(bos_prefix(tok)))
    if not rows:
        raise ValueError("the MMLU data has no test rows")
    cand = [tok.encode(" " + c, add_special_tokens=False)[-1] for c in MMLU_CHOICES]
    logits = scorer.next_token_logits([r["prompt"] for r in rows], cand)
    pred = [MMLU_CHOICES[i] for i in np.argmax(logits, axis=-1)]
    correct = np.array([p == r["answer"] for p, r in zip(pred, rows)])
    subjects = [r["subject"] for r in rows]
    per_subject = {s: float(np.mean([c for c, t in zip(correct, subjects) if t == s])) for s in dict.fromkeys(subjects)}
    return float(np.mean(correct)), {"subject": subjects, "answer": [r["answer"] for r in rows], "prediction": pred,
                                     "logits": logits, "per_subject": per_subject}


# --------------------------------------------------------------------------- output


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def _atomic_write_json(path: Path, obj: Any) -> None:
    from simu_jax.runio import write_text_atomic

    write_text_atomic(path, json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


def write_results(out_dir: str | os.PathLike, method: str, summary: Mapping[str, Any], per_sample: Any,
                  **extra: Any) -> Path:
    """Write ``summary.json`` (``{"method", "metrics": {snake_case: float}, ...}``) and
    ``per_sample.json`` into ``out_dir``, each via a temporary file and ``os.replace``; for a QA
    benchmark also ``eval_log_aggregated.json``, the per-row results in TOFU's eval-log layout
    (:mod:`simu_jax.evaluate.tofu_log`), readable as ``--reference-log``.

    NaN / inf become ``null``. The non-numeric parts of the summary (TOFU display names,
    ``per_task``, ``notes``, ...) go under ``"details"``; ``extra`` adds top-level keys.
    """
    from simu_jax.base import as_path

    out = as_path(out_dir)  # a local directory or a URL (gs://, ...: one object upload per file)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summary_metrics(summary)
    details = {k: v for k, v in summary.items() if k not in metrics and k != "notes"}
    doc = {"method": method, "metrics": metrics, **extra, "details": details, "notes": list(summary.get("notes", []))}
    _atomic_write_json(out / "per_sample.json", per_sample)
    if isinstance(per_sample, Mapping):
        from simu_jax.evaluate.tofu_log import write_tofu_log

        write_tofu_log(out, per_sample)  # QA benchmarks: eval_log_aggregated.json (TOFU's layout)
    _atomic_write_json(out / "summary.json", doc)
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """A two-column text table of the snake_case metrics (report order first)."""
    metrics = summary_metrics(summary)
    order = [k for k in METRIC_ORDER if k in metrics] + sorted(k for k in metrics if k not in METRIC_ORDER)
    width = max((len(k) for k in order), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for k in order:
        v = metrics[k]
        shown = f"{v:.3e}" if v != 0 and abs(v) < 5e-4 else f"{v:.4f}"
        lines.append(f"{k:<{width}}  {shown}")
    for note in summary.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation sets


def subset(records: Sequence, limit: int | None, seed: int | None, salt: int) -> list:
    """At most ``limit`` records: the first ones (``seed=None``) or a seeded random subset in
    their original order (``salt`` separates the sets drawn with one seed)."""
    if limit is None or len(records) <= limit:
        return list(records)
    if seed is None:
        return list(records[:limit])
    idx = np.sort(np.random.default_rng([seed, salt]).choice(len(records), limit, replace=False))
    return [records[i] for i in idx]


def evaluation_sets(bench, limit: int | None = None, seed: int | None = None,
                    protocol: Any | None = None) -> dict[str, list]:
    """The sets a benchmark is scored on, by name, in report order (the one path from a
    :class:`simu_jax.data.Benchmark` to its evaluation, used by ``simu-jax unlearn``,
    ``simu-jax evaluate``, the demo and the experiments).

    QA benchmarks: ``forget``, ``retain`` (``bench.retain_eval``), TOFU's ``real_authors`` and
    ``world_facts`` (from ``bench.general``) or the synthetic ``general`` set, and ``holdout``
    (the MIA non-members) when there is one. LUME: ``forget`` and ``retain`` (rows keep LUME's
    ``input``/``output`` fields). ``limit``/``seed``: see :func:`subset`; TOFU's real_authors and
    world_facts are never cut.

    ``protocol`` (QA benchmarks; :mod:`simu_jax.evaluate.protocol`): its row cut comes first
    (``tofu``: the first 300 rows of every set, TOFU ``evaluate_util.py:130-133``), and under a
    protocol without ``random_limit`` (tofu, open-unlearning) ``limit`` keeps the first rows
    (``seed`` is ignored), so TOFU's cut is reproduced."""
    if bench.name == "lume":
        sets = {"forget": bench.forget, "retain": bench.retain_eval}
    else:
        sets = {"forget": bench.forget, "retain": bench.retain_eval}
        if bench.name == "tofu":
            for name in ("real_authors", "world_facts"):
                sets[name] = [r for r in bench.general if r.get("general_set") == f"{name}_perturbed"]
        elif bench.general:
            sets["general"] = bench.general
        if bench.holdout:
            sets["holdout"] = bench.holdout
    proto = get_protocol(protocol) if protocol is not None and bench.name != "lume" else None
    if proto is not None:
        if proto.rows is not None:
            sets = {k: list(v)[: proto.rows] for k, v in sets.items()}
        if not proto.random_limit:
            seed = None
    uncut = ("real_authors", "world_facts") if seed is None else ()
    return {k: list(v) if k in uncut else subset(v, limit, seed, i) for i, (k, v) in enumerate(sets.items())}


# --------------------------------------------------------------------------- CLI


def build_parser(prog: str = "simu-jax evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a model on an unlearning benchmark.")
    p.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--benchmark", required=True, choices=("synthetic", "tofu", "lume"))
    p.add_argument("--reference", help="retain-only model directory, for TOFU forget quality (synthetic/tofu)")
    p.add_argument("--reference-log", help="a TOFU eval log (eval_log_aggregated.json, ours or TOFU's published "
                                           "one) of a retain-only model: its forget-set truth ratios are the "
                                           "forget-quality reference (instead of --reference)")
    p.add_argument("--protocol", choices=PROTOCOL_NAMES,
                   help="whose evaluation choices to follow (rows, scored tokens, tokenization, generation, MIA "
                        "k, dtype, decoding): tofu (TOFU's evaluate_util.py; the default for tofu and synthetic), "
                        "open-unlearning, simu (this project's earlier choices, for a model trained with "
                        "data.tokenization split), "
                        "semeval (SemEval-2025 Task 4's evaluate_generations.py: bfloat16, generations decoded "
                        "with clean_up_tokenization_spaces=True; lume only, its default); see docs/metrics.md")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "model"),
                   help="parameter dtype to score and generate in (default: the protocol's: bfloat16 under tofu "
                        "and semeval, as TOFU's and SemEval's scripts run their models; the model's own under "
                        "open-unlearning / simu)")
    p.add_argument("--mmlu", help="lume: MMLU data directory in Hendrycks' layout (test/<subject>_test.csv, "
                                  "dev/<subject>_dev.csv): its 5-shot accuracy is the MMLU term of the SemEval "
                                  "final score (open-instruct's eval/mmlu/run_eval.py, which SemEval's scorer reads)")
    p.add_argument("--template", help="QA template: 'tofu' (Question: q\\nAnswer: a, the default), 'llama2' "
                                      "([INST] q [/INST]a) or 'QUESTION_START|QUESTION_END|ANSWER_START' with "
                                      "\\n for a newline; refused when the tokenizer cannot encode it")
    p.add_argument("--data", help="data directory (tofu/ or lume/ folder, or the data root); default: the "
                                  "copy under $SIMU_JAX_DATA_DIR (or the checkout's ../shared/data) if there, "
                                  "else for tofu the hub dataset locuslab/TOFU")
    p.add_argument("--mia-data", help="LUME: folder with member.jsonl / nonmember.jsonl "
                                      "(default: found under the data root)")
    p.add_argument("--out", help="output directory for summary.json and per_sample.json (default: print only)")
    p.add_argument("--method", help="method name written to summary.json (default: the model directory name)")
    p.add_argument("--limit", type=int, help="evaluate at most N records per set (the first N; under "
                                             "--protocol simu a seeded random subset)")
    p.add_argument("--no-generate", action="store_true", help="skip greedy generation (no ROUGE / LUME task scores)")
    p.add_argument("--seed", type=int, default=0, help="seed for the --limit subset under --protocol simu "
                                                       "(default 0)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic benchmark (default 0)")
    p.add_argument("--tofu-split", default="forget10", choices=("forget01", "forget05", "forget10"),
                   help="TOFU forget split; its holdout split is the MIA non-member set (default forget10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gradnorm", action="store_true", help="also the GradNorm MIA (one gradient per forget / "
                                                           "holdout row; slow on large models)")
    p.add_argument("--max-new-tokens", type=int, help="generation length (default: --protocol tofu: TOFU's 200 "
                                                      "tokens in total, prompt included; open-unlearning 200; "
                                                      "simu: synthetic 64, tofu 200; lume 256); under tofu it "
                                                      "caps the total budget further")
    p.add_argument("--max-length", type=int, help="token limit (default: the model's max_position_embeddings)")
    p.add_argument("--buckets", help="comma-separated padded lengths, e.g. 128,512 (default: 32,64,128,...); "
                                     "each batch is padded to the smallest that fits, one compilation per length")
    a = p.add_argument_group("robustness attacks (synthetic / tofu; docs/metrics.md#robustness-attacks)")
    a.add_argument("--attack", help="comma-separated attacks after the evaluation, each followed by the forget "
                                    "metrics again: int4 (per-group round-to-nearest), nf4, fp4 (bitsandbytes' "
                                    "4-bit types), relearn (fine-tuning on a few forget pairs)")
    a.add_argument("--target", help="the model before unlearning: its forget metrics give each attack's "
                                    "recovery = (after - unlearned) / (target - unlearned)")
    a.add_argument("--attack-group-size", type=int, help="int4: input features per group (default 128; -1 = one "
                                                         "group per output channel)")
    a.add_argument("--attack-block-size", type=int, help="nf4 / fp4: elements per absmax block (default 64)")
    a.add_argument("--relearn-steps", type=int, help="relearn: AdamW steps (default 10)")
    a.add_argument("--relearn-examples", type=int, help="relearn: forget pairs trained on (default 2)")
    a.add_argument("--relearn-lr", type=float, help="relearn: learning rate (default 1e-3)")
    return p


def _data_spec(args):
    """The CLI's benchmark as a :class:`simu_jax.data.DataSpec` (``--data``: the benchmark's
    folder or the shared data root)."""
    from simu_jax.data import DataSpec, SyntheticConfig, default_data_dir

    if args.benchmark == "synthetic":
        return DataSpec(benchmark="synthetic", synthetic=SyntheticConfig(seed=args.synthetic_seed))
    if args.benchmark == "tofu":
        pct = args.tofu_split[len("forget"):]
        source = None  # as data.source: null: the local copy under the data root if there, else the hub
        if args.data:
            base = Path(args.data).expanduser()
            if not base.is_dir():
                raise FileNotFoundError(f"TOFU data directory not found: {base}")
            if not (base / "retain_perturbed.json").is_file() and (base / "tofu").is_dir():
                base = base / "tofu"
            source = str(base)
        return DataSpec(benchmark="tofu", source=source, forget=args.tofu_split, retain=f"retain{100 - int(pct)}",
                        holdout=f"holdout{pct}")  # TOFU's pairs: forget05 / retain95 / holdout05
    if args.data is None and not (default_data_dir() / "lume").is_dir():
        raise FileNotFoundError(
            f"LUME data not found under {default_data_dir()} (it is not on the Hugging Face hub: copy data/ of "
            "github.com/amazon-science/lume-llm-unlearning and pass --data DIR, or set SIMU_JAX_DATA_DIR)")
    return DataSpec(benchmark="lume", source=args.data)


TEMPLATES = {
    "tofu": ("Question: ", "\n", "Answer: "),  # TOFU config/model_config.yaml phi / stablelm / pythia
    "llama2": ("[INST] ", " [/INST]", ""),  # TOFU config/model_config.yaml llama2-7b
}


def parse_template(spec: str):
    """A :class:`~simu_jax.data.QATemplate` from ``--template``: a name in :data:`TEMPLATES` or
    ``QUESTION_START|QUESTION_END|ANSWER_START`` (``\\n`` / ``\\t`` stand for newline / tab)."""
    from simu_jax.data.tokenize import QATemplate

    if spec in TEMPLATES:
        return QATemplate(*TEMPLATES[spec])
    parts = str(spec).split("|")
    if len(parts) != 3:
        raise ValueError(f"--template must be one of {', '.join(TEMPLATES)} or 'QUESTION_START|QUESTION_END|"
                         f"ANSWER_START', got {spec!r}")
    parts = [x.replace("\\n", "\n").replace("\\t", "\t") for x in parts]
    if not parts[1] and not parts[2]:
        raise ValueError(f"--template {spec!r}: question end and answer start are both empty, so the question "
                         "and the answer would run together")
    return QATemplate(*parts)


def check_template(tokenizer, template) -> None:
    """Refuse (``ValueError``, one line) a template the tokenizer cannot carry: a tag that encodes
    to the unknown token, or that does not decode back to itself (TOFU's generation splits the
    decoded text at the answer tag)."""
    unk = tokenizer.unk_token_id
    for what, tag in (("question start", template.question_start), ("question end", template.question_end),
                      ("answer start", template.answer_start)):
        if not tag:
            continue
        ids = tokenizer(tag, add_special_tokens=False)["input_ids"]
        if not ids or (unk is not None and unk in ids):
            raise ValueError(f"template {what} {tag!r} does not fit the tokenizer (it encodes to the unknown token)")
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != tag:
            raise ValueError(f"template {what} {tag!r} does not fit the tokenizer (it decodes back as {back!r})")


def _mia_documents(args, notes: list[str]):
    """LUME's member / non-member documents (SemEval's document-level MIA), or (None, None)."""
    from simu_jax.data import default_data_dir, load_mia_documents

    mia_src = args.mia_data
    if mia_src is None:
        for cand in ([Path(args.data).expanduser(), Path(args.data).expanduser().parent] if args.data else []) + [
                default_data_dir() / "semeval25_task4"]:
            places = (cand, cand / "mia_data", cand / "semeval25_task4" / "mia_data")
            if any((c / "member.jsonl").is_file() for c in places):
                mia_src = cand
                break
    if mia_src is None:
        notes.append("MIA documents (member.jsonl / nonmember.jsonl) not found: pass --mia-data")
        return None, None
    member = subset(load_mia_documents("member", mia_src), args.limit, args.seed, 2)
    nonmember = subset(load_mia_documents("nonmember", mia_src), args.limit, args.seed, 3)
    return member, nonmember


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``simu-jax evaluate``: returns 0; bad input raises FileNotFoundError / ValueError (one line)."""
    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    buckets = DEFAULT_BUCKETS
    if args.buckets:
        try:
            buckets = tuple(int(b) for b in args.buckets.split(","))
        except ValueError:
            raise ValueError(f"--buckets must be comma-separated integers, got {args.buckets!r}") from None
        if not buckets or min(buckets) < 2:
            raise ValueError(f"--buckets must be integers >= 2, got {args.buckets!r}")
    if args.reference and args.benchmark == "lume":
        raise ValueError("--reference (forget quality) applies to the synthetic and tofu benchmarks, not lume")
    if args.reference_log and args.benchmark == "lume":
        raise ValueError("--reference-log (forget quality) applies to the synthetic and tofu benchmarks, not lume")
    if args.reference and args.reference_log:
        raise ValueError("pass --reference (a model) or --reference-log (its TOFU eval log), not both")
    if args.template and args.benchmark == "lume":
        raise ValueError("--template applies to the synthetic and tofu benchmarks; lume prompts are plain text")
    if args.mmlu and args.benchmark != "lume":
        raise ValueError("--mmlu applies to the lume benchmark (the SemEval final score)")
    if args.gradnorm and args.benchmark == "lume":
        raise ValueError("--gradnorm applies to the synthetic and tofu benchmarks (forget vs holdout rows)")
    from simu_jax.evaluate.attacks import spec_from_cli

    attack = spec_from_cli(args.attack, group_size=args.attack_group_size, block_size=args.attack_block_size,
                           relearn_steps=args.relearn_steps, relearn_examples=args.relearn_examples,
                           relearn_lr=args.relearn_lr)
    if attack.names and args.benchmark == "lume":
        raise ValueError("--attack applies to the synthetic and tofu benchmarks (QA forget metrics), not lume")
    if args.target and not attack.names:
        raise ValueError("--target (the model before unlearning) is only used by --attack")
    proto = check_protocol(args.protocol or default_protocol(args.benchmark), args.benchmark)
    template = parse_template(args.template) if args.template else None
    ref_log = None
    if args.reference_log:
        from simu_jax.evaluate.tofu_log import log_forget_truth_ratios, read_tofu_log

        ref_log = log_forget_truth_ratios(read_tofu_log(args.reference_log))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    from simu_jax.base import as_path, is_remote

    def absolute(p):  # a URL is absolute already (resolve() would make gs://b/x the local /cwd/gs:/b/x)
        return p if is_remote(p) else p.resolve()

    model_dir = absolute(as_path(args.model, "--model").expanduser())  # a local directory or a URL (gs://, ...)
    ref_dir = absolute(as_path(args.reference, "--reference").expanduser()) if args.reference else None
    target_dir = absolute(as_path(args.target, "--target").expanduser()) if args.target else None
    for d in [model_dir] + [x for x in (ref_dir, target_dir) if x]:  # fail fast, before the slow loads
        if not d.is_dir():
            raise FileNotFoundError(f"model directory not found: {d}")
    notes: list[str] = []
    from simu_jax.data import load_benchmark, qa_template
    from simu_jax.models.spec import load_model

    spec = _data_spec(args)
    if template is None:
        template = qa_template(spec) if args.benchmark != "lume" else parse_template("tofu")
    sets = evaluation_sets(load_benchmark(spec), args.limit, args.seed,
                           protocol=proto if args.benchmark != "lume" else None)
    mmlu = None
    if args.benchmark == "lume":
        member, nonmember = _mia_documents(args, notes)
        if args.mmlu:
            from simu_jax.data import load_mmlu

            mmlu = load_mmlu(args.mmlu, limit=args.limit)
    log(f"loading {model_dir}")
    loaded = load_model(model_dir)
    if args.template:
        check_template(loaded.tokenizer, template)
    dtype = "protocol" if args.dtype is None else (None if args.dtype == "model" else args.dtype)
    scorer = Scorer(loaded.graphdef, loaded.params, loaded.tokenizer, template, batch_size=args.batch_size,
                    max_length=args.max_length, buckets=buckets, protocol=proto, dtype=dtype)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    default_new = {"synthetic": 64, "tofu": 200, "lume": 256}[args.benchmark]
    if args.benchmark == "lume" or proto.name == "simu":
        max_new = args.max_new_tokens or default_new
    else:  # the protocol's budget (tofu: 200 tokens in total), capped by --max-new-tokens
        max_new = args.max_new_tokens

    if args.benchmark == "lume":
        forget, retain = sets["forget"], sets["retain"]
        log(f"evaluating LUME: {len(forget)} forget rows, {len(retain)} retain rows")
        summary, per_sample = evaluate_lume(scorer, forget, retain, member, nonmember, max_new,
                                            generate=not args.no_generate, mmlu=mmlu, log=log)
    else:
        if ref_log is not None and len(ref_log) != len(sets["forget"]):
            notes.append(f"--reference-log has {len(ref_log)} forget rows, this evaluation {len(sets['forget'])}: "
                         "forget quality compares different row sets")
        ref_scorer = None
        if ref_dir is not None:
            log(f"loading the reference model {ref_dir}")
            ref = load_model(ref_dir)
            ref_scorer = Scorer(ref.graphdef, ref.params, ref.tokenizer, template, batch_size=args.batch_size,
                                max_length=args.max_length, buckets=buckets, protocol=proto, dtype=dtype)
        log(f"evaluating {args.benchmark}: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
        summary, per_sample = evaluate_qa_benchmark(scorer, sets, ref_log, generate=not args.no_generate,
                                                    max_new_tokens=max_new, log=log, reference_scorer=ref_scorer,
                                                    gradnorm=args.gradnorm)
        if attack.names:
            from simu_jax.evaluate.attacks import run_attacks

            target = None
            if target_dir is not None:
                log(f"loading the target model {target_dir}")
                tgt = load_model(target_dir)
                target = (tgt.graphdef, tgt.params)
            summary["robustness"] = run_attacks(attack, scorer, loaded.params, sets, summary, per_sample,
                                                evaluate_qa=evaluate_qa_benchmark,
                                                target=target, generate=not args.no_generate,
                                                max_new_tokens=max_new, log=log)
    summary["notes"] = notes + list(summary.get("notes", []))
    print(format_summary(summary), flush=True)
    if summary.get("robustness"):
        from simu_jax.evaluate.attacks import format_attacks

        print(format_attacks(summary["robustness"]), flush=True)
    if args.out:
        method = args.method or model_dir.name
        out = write_results(args.out, method, summary, per_sample, benchmark=args.benchmark,
                            model=str(model_dir), reference=str(ref_dir) if ref_dir else None,
                            reference_log=str(Path(args.reference_log).expanduser().resolve())
                            if args.reference_log else None,
                            settings={"limit": args.limit, "seed": args.seed, "synthetic_seed": args.synthetic_seed,
                                      "max_new_tokens": max_new, "batch_size": args.batch_size,
                                      "generate": not args.no_generate, "protocol": proto.name,
                                      "dtype": scorer.dtype, "mmlu": str(Path(args.mmlu).expanduser().resolve())
                                      if args.mmlu else None,
                                      "template": [template.question_start, template.question_end,
                                                   template.answer_start],
                                      "attack": dataclasses.asdict(attack) if attack.names else None,
                                      "target": str(target_dir.resolve()) if target_dir else None},
                            elapsed_s=round(time.perf_counter() - t_start, 2))
        log(f"wrote {out / 'summary.json'} and {out / 'per_sample.json'}")
    return 0
