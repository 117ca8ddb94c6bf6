"""Model-independent unlearning metrics (TOFU and LUME / SemEval-2025 Task 4).

Everything here is a pure function of per-sample statistics (numpy / scipy /
rouge-score only, no JAX).  The model code computes the statistics; these
functions turn them into the numbers the benchmarks report.  Definitions follow
the official code; see ``docs/metrics.md`` for the formulas and sources:

* TOFU: ``locuslab/tofu`` ``aggregate_eval_stat.py`` (aggregation, truth ratio,
  forget quality, model utility) and ``evaluate_util.py`` (per-sample losses,
  ROUGE), ``data_module.py`` (``get_batch_loss``).
* open-unlearning: ``locuslab/open-unlearning`` ``src/evals/metrics/memorization.py``,
  ``src/evals/metrics/utils.py``, ``src/evals/metrics/utility.py``.
* SemEval-2025 Task 4 / LUME: the organisers' ``evaluate_generations.py``
  (distributed with the ``semeval25-unlearning-dataset-public`` data repository).

Conventions
-----------
A *mean NLL* is the per-token average negative log-likelihood of an answer
given its question, ``-(1/|a|) sum_t log p(a_t | q, a_<t)``, counted over the
answer (label) tokens only, exactly TOFU's ``avg_gt_loss`` /
``avg_paraphrased_loss`` / ``average_perturb_loss`` (``gt_loss / num_token_gt``).
``exp(-mean_nll)`` is therefore the length-normalised probability
``P(a|q)^(1/|a|)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as _stats

__all__ = [
    "METRIC_ORDER",
    "summary_metrics",
    "TOFU_SETS",
    "TOFU_SET_NAMES",
    "MODEL_UTILITY_KEYS",
    "answer_probability",
    "normalized_true_probability",
    "truth_ratio",
    "truth_ratio_score",
    "ks_test",
    "forget_quality",
    "rouge_l_recall",
    "rouge1_recall",
    "rouge_recalls",
    "exact_match",
    "harmonic_mean",
    "model_utility",
    "tofu_summary",
    "exact_memorization",
    "extraction_strength",
    "privleak",
    "lume_kind_from_id",
    "lume_summary",
    "mia_score",
    "semeval_final_score",
]

# TOFU evaluation sets, in the order the paper reports them.
TOFU_SETS: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts")
# Display names used in the metric keys returned by :func:`tofu_summary`.
TOFU_SET_NAMES: dict[str, str] = {
    "forget": "Forget",
    "retain": "Retain",
    "real_authors": "Real Authors",
    "world_facts": "World Facts",
}
# The nine numbers whose harmonic mean is TOFU's Model Utility.
MODEL_UTILITY_KEYS: tuple[str, ...] = tuple(
    f"{TOFU_SET_NAMES[s]} {m}"
    for s in ("retain", "real_authors", "world_facts")
    for m in ("Prob", "ROUGE", "Truth Ratio")
)

# Paper-like column order: forget scores, retain scores, other utility sets,
# utility, privacy, aggregates.  Metrics not listed follow in sorted order,
# before the trailing aggregate columns.
METRIC_ORDER: tuple[str, ...] = (
    "forget_prob",
    "forget_rouge",
    "forget_truth_ratio",
    "forget_regurgitation",
    "forget_knowledge",
    "forget_quality",
    "forget_extraction_strength",
    "forget_exact_memorization",
    "retain_prob",
    "retain_rouge",
    "retain_truth_ratio",
    "retain_regurgitation",
    "retain_knowledge",
    "real_authors_prob",
    "real_authors_rouge",
    "real_authors_truth_ratio",
    "world_facts_prob",
    "world_facts_rouge",
    "world_facts_truth_ratio",
    "model_utility",
    "mmlu",
    "mia_auc",
    "mia_score",
    "mia_auc_loss",
    "mia_auc_zlib",
    "mia_auc_min_k",
    "mia_auc_min_k_pp",
    "mia_auc_reference",
    "mia_auc_gradnorm",
    "reference_mia_auc_min_k",
    "privleak",
)


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {a.shape}")
    return a


def _as_2d(x: Any, name: str, n: int | None = None) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    if a.shape[1] == 0:
        raise ValueError(f"{name} must have at least one perturbed answer per sample")
    return a


# --------------------------------------------------------------------------- #
# TOFU per-sample quantities
# --------------------------------------------------------------------------- #
def answer_probability(mean_nll: Any) -> np.ndarray:
    """Per-sample length-normalised answer probability ``exp(-mean_nll)``.

    TOFU's "Prob." on the forget and retain sets is the mean over samples of
    this value (``aggregate_eval_stat.py``: ``np.exp(-1 * avg_gt_loss)``).

    Args:
        mean_nll: [N] mean answer-token NLL of the ground-truth answer.
    Returns:
        [N] float64 array in (0, 1].
    """
    return np.exp(-_as_1d(mean_nll, "mean_nll"))


def normalized_true_probability(true_mean_nll: Any, perturbed_mean_nll: Any) -> np.ndarray:
    """Per-sample normalised probability of the true answer (Real Authors / World Facts).

    ``p_true / (p_true + sum_k p_pert_k)`` with ``p = exp(-mean_nll)``, i.e. the
    *per-token-averaged* (length-normalised) probabilities, not total sequence
    probabilities: TOFU's ``aggregate_eval_stat.py`` exponentiates ``avg_gt_loss``
    and ``average_perturb_loss``, which are ``gt_loss / num_token_gt`` and
    ``perturb_loss / num_token_perturb`` in ``evaluate_util.py``.  TOFU reports
    the mean over samples as "Prob." for these two sets.

    Args:
        true_mean_nll: [N] mean NLL of the true answer (TOFU ``answer`` field).
        perturbed_mean_nll: [N, K] mean NLL of each of the K perturbed answers.
    Returns:
        [N] array in (0, 1).
    """
    t = _as_1d(true_mean_nll, "true_mean_nll")
    p = _as_2d(perturbed_mean_nll, "perturbed_mean_nll", len(t))
    p_true = np.exp(-t)
    p_pert = np.exp(-p)
    return p_true / (p_true + p_pert.sum(axis=1))


def truth_ratio(
    paraphrased_mean_nll: Any,
    perturbed_mean_nll: Any,
    perturbed_mean: str = "geometric",
) -> np.ndarray:
    """Per-sample raw truth ratio ``R = P_pert / P_para`` (length-normalised).

    Default (``perturbed_mean="geometric"``), exactly TOFU ``aggregate_eval_stat.py``
    and open-unlearning ``truth_ratio``: the K perturbed mean NLLs are averaged
    *in log space* before exponentiating::

        R = exp(para_nll - mean_k pert_nll_k)
          = geomean_k(P_pert_k^(1/|a_k|)) / P_para^(1/|a|)

    (TOFU computes ``curr_stat_1 = exp(mean_k pert_nll - para_nll) = 1/R``.)

    ``perturbed_mean="arithmetic"`` gives the formula printed in the TOFU paper
    and used by the unused ``get_model_utility`` in TOFU's ``utils.py``:
    ``R = mean_k(P_pert_k^(1/|a_k|)) / P_para^(1/|a|)``.

    Args:
        paraphrased_mean_nll: [N] mean NLL of the paraphrased answer (forget /
            retain); for Real Authors / World Facts TOFU uses the true answer
            here (``base_answer_key: answer`` in ``config/eval_everything.yaml``).
        perturbed_mean_nll: [N, K] mean NLL of the perturbed (wrong) answers.
        perturbed_mean: "geometric" (official aggregation, default) or "arithmetic".
    Returns:
        [N] array of R > 0.  R < 1 means the model prefers the correct answer.
    """
    para = _as_1d(paraphrased_mean_nll, "paraphrased_mean_nll")
    pert = _as_2d(perturbed_mean_nll, "perturbed_mean_nll", len(para))
    if perturbed_mean == "geometric":
        return np.exp(para - pert.mean(axis=1))
    if perturbed_mean == "arithmetic":
        return np.exp(-pert).mean(axis=1) / np.exp(-para)
    raise ValueError(f"perturbed_mean must be 'geometric' or 'arithmetic', got {perturbed_mean!r}")


def truth_ratio_score(R: Any, set_kind: str) -> float:
    """Aggregate per-sample truth ratios into TOFU's reported "Truth Ratio".

    * ``set_kind == "forget"``: ``mean(min(R, 1/R))`` (closer to 1 is better;
      TOFU ``aggregate_eval_stat.py`` ``np.minimum(curr_stat_1, 1/curr_stat_1)``,
      symmetric in R and 1/R; open-unlearning ``closer_to_1_better``).
    * ``"retain"``, ``"real_authors"``, ``"world_facts"``: ``mean(max(0, 1 - R))``
      (TOFU ``np.maximum(0, 1 - 1/curr_stat_1)`` with ``curr_stat_1 = 1/R``;
      open-unlearning ``true_better``; TOFU paper ``max(0, 1 - R_truth)``).

    Args:
        R: [N] raw truth ratios from :func:`truth_ratio`.
        set_kind: one of ``TOFU_SETS``.
    """
    r = _as_1d(R, "R")
    if set_kind == "forget":
        return float(np.mean(np.minimum(r, 1.0 / r)))
    if set_kind in ("retain", "real_authors", "world_facts"):
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    raise ValueError(f"set_kind must be one of {TOFU_SETS}, got {set_kind!r}")


def ks_test(unlearned_truth_ratios: Any, retain_model_truth_ratios: Any) -> tuple[float, float]:
    """Two-sample KS test used for Forget Quality; returns ``(statistic, pvalue)``.

    Runs ``scipy.stats.ks_2samp`` (default ``method="auto"``) on ``1/R``, the
    exact statistic TOFU passes (``exp(pert_nll - para_nll)``).  The KS
    statistic and p-value are invariant under the strictly monotone map
    ``R -> 1/R``, so this equals the test on ``R`` itself (what current
    open-unlearning passes) up to floating-point ties.
    """
    a = _as_1d(unlearned_truth_ratios, "unlearned_truth_ratios")
    b = _as_1d(retain_model_truth_ratios, "retain_model_truth_ratios")
    res = _stats.ks_2samp(1.0 / a, 1.0 / b)
    return float(res.statistic), float(res.pvalue)


def forget_quality(unlearned_truth_ratios: Any, retain_model_truth_ratios: Any) -> float:
    """TOFU Forget Quality: KS-test p-value between forget-set truth ratios.

    Both inputs are per-sample raw truth ratios R (:func:`truth_ratio`) on the
    *forget* set: one from the unlearned model, one from the reference model
    trained only on the retain split.  Higher p-value = distributions are
    indistinguishable = better forgetting.  Source: TOFU ``aggregate_eval_stat.py``
    ``get_forget_quality``.
    """
    return ks_test(unlearned_truth_ratios, retain_model_truth_ratios)[1]


# --------------------------------------------------------------------------- #
# text metrics
# --------------------------------------------------------------------------- #
_SCORERS: dict[tuple[bool, tuple[str, ...]], Any] = {}


def _rouge_scorer(use_stemmer: bool, types: tuple[str, ...] = ("rougeL",)):
    key = (bool(use_stemmer), tuple(types))
    if key not in _SCORERS:
        from rouge_score import rouge_scorer

        _SCORERS[key] = rouge_scorer.RougeScorer(list(types), use_stemmer=use_stemmer)
    return _SCORERS[key]


def rouge_recalls(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> dict[str, np.ndarray]:
    """Per-sample ROUGE-1 and ROUGE-L recall in one pass: ``{"rouge1_recall", "rougeL_recall"}``.

    Exactly TOFU ``evaluate_util.py`` ``eval_rouge_recall`` (lines 348-358):
    ``RougeScorer(['rouge1', 'rougeL'], use_stemmer=True).score(gt, gen)`` and the
    ``.recall`` of each; TOFU's eval logs carry both per row.
    """
    preds = list(predictions)
    refs = list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    scorer = _rouge_scorer(bool(use_stemmer), ("rouge1", "rougeL"))
    scores = [scorer.score(str(r), str(p)) for p, r in zip(preds, refs)]
    return {
        "rouge1_recall": np.array([s["rouge1"].recall for s in scores], dtype=np.float64),
        "rougeL_recall": np.array([s["rougeL"].recall for s in scores], dtype=np.float64),
    }


def rouge1_recall(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> np.ndarray:
    """Per-sample ROUGE-1 recall (unigram overlap / reference unigrams), TOFU's ``rouge1_recall``."""
    return rouge_recalls(predictions, references, use_stemmer)["rouge1_recall"]


def rouge_l_recall(
    predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True
) -> np.ndarray:
    """Per-sample ROUGE-L recall of a generation against its reference.

    ``RougeScorer(['rougeL'], use_stemmer=True).score(target=reference,
    prediction=generation)['rougeL'].recall``; TOFU (``evaluate_util.py``
    ``eval_rouge_recall``), open-unlearning (``eval_text_similarity``) and the
    SemEval-2025 scorer (``evaluate_generations.py``) all use ``use_stemmer=True``
    and recall (LCS length / reference length).  Note rouge-score's default
    tokenizer lower-cases and keeps only ``[a-z0-9]`` runs.

    Args:
        predictions: N generated strings.
        references: N ground-truth strings.
        use_stemmer: Porter stemming (default True, as all three sources).
    Returns:
        [N] float64 array in [0, 1].
    """
    preds = list(predictions)
    refs = list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    scorer = _rouge_scorer(bool(use_stemmer))
    return np.array(
        [scorer.score(str(r), str(p))["rougeL"].recall for p, r in zip(preds, refs)],
        dtype=np.float64,
    )


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-sample exact match, SemEval-2025 Task 4 normalisation.

    ``int(str(gt).strip().lower() == str(gen).strip().lower())`` (official
    ``evaluate_generations.py``): only surrounding whitespace and case are
    normalised; punctuation and articles are NOT stripped (unlike SQuAD EM).
    """
    preds = list(predictions)
    refs = list(references)
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions vs {len(refs)} references")
    return np.array(
        [float(str(r).strip().lower() == str(p).strip().lower()) for p, r in zip(preds, refs)],
        dtype=np.float64,
    )


# --------------------------------------------------------------------------- #
# aggregation
# --------------------------------------------------------------------------- #
def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean ``n / sum(1/v)`` of non-negative numbers.

    If any value is exactly 0 the result is 0 (the limit; this is also what
    ``scipy.stats.hmean``, used by TOFU / open-unlearning, and Python's
    ``statistics.harmonic_mean``, used by the SemEval scorer, return).  A NaN
    value gives NaN.  Negative values and an empty input raise ``ValueError``.
    """
    v = np.asarray(list(values), dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("harmonic_mean of an empty sequence")
    if np.isnan(v).any():
        return float("nan")
    if (v < 0).any():
        raise ValueError("harmonic_mean is only defined for non-negative values")
    if (v == 0).any():
        return 0.0
    return float(v.size / np.sum(1.0 / v))


def model_utility(values: Mapping[str, float]) -> float:
    """TOFU Model Utility: harmonic mean of the nine non-forget numbers.

    ``values`` must contain the keys ``MODEL_UTILITY_KEYS``:
    ``"{Retain,Real Authors,World Facts} {Prob,ROUGE,Truth Ratio}"`` (the
    output of :func:`tofu_summary` qualifies); other keys are ignored.  Source:
    TOFU ``aggregate_eval_stat.py`` ``get_model_utility`` (``hmean`` of every
    entry whose name does not contain "Forget"); open-unlearning ``hm_aggregate``.
    """
    missing = [k for k in MODEL_UTILITY_KEYS if k not in values]
    if missing:
        raise KeyError(f"model_utility needs keys {missing}")
    return harmonic_mean(float(values[k]) for k in MODEL_UTILITY_KEYS)


def tofu_summary(
    per_set_stats: Mapping[str, Mapping[str, Any]],
    retain_model_forget_truth_ratios: Any | None = None,
    perturbed_mean: str = "geometric",
) -> dict[str, float]:
    """All TOFU headline numbers from per-sample statistics.

    Input schema -- ``per_set_stats[set]`` for ``set`` in
    ``("forget", "retain", "real_authors", "world_facts")`` (a set that is
    absent is skipped; Model Utility needs the three non-forget sets), each a
    mapping with:

    * ``"answer_mean_nll"``: [N] mean NLL of the ground-truth ``answer``
      (TOFU ``avg_gt_loss``; question tokens masked).
    * ``"paraphrased_mean_nll"``: [N] mean NLL of ``paraphrased_answer``
      (TOFU ``avg_paraphrased_loss``).  Optional for real_authors /
      world_facts, where TOFU uses the true answer and it defaults to
      ``answer_mean_nll``; required for forget / retain.
    * ``"perturbed_mean_nll"``: [N, K] mean NLL of each ``perturbed_answer``
      (TOFU ``average_perturb_loss``; K=5 for forget/retain, 4 for RA/WF).
    * ``"rougeL_recall"``: [N] per-sample ROUGE-L recall of the greedy
      generation vs ``answer`` (:func:`rouge_l_recall`).

    ``retain_model_forget_truth_ratios``: [M] raw truth ratios R of the
    retain-only reference model on the forget set (:func:`truth_ratio`).  When
    given, "Forget Quality" (KS p-value) and "KS Test Forget" (statistic) are
    added; otherwise these keys are absent.

    Returns a dict with keys ``"{Set} Prob"``, ``"{Set} ROUGE"``,
    ``"{Set} Truth Ratio"`` for each set present (Set in Forget, Retain, Real
    Authors, World Facts), ``"Model Utility"`` (if the three non-forget sets are
    present) and the optional forget-quality keys.  "Prob" is
    :func:`answer_probability` on forget/retain and
    :func:`normalized_true_probability` on real_authors/world_facts.
    """
    unknown = set(per_set_stats) - set(TOFU_SETS)
    if unknown:
        raise KeyError(f"unknown TOFU sets {sorted(unknown)}; expected a subset of {TOFU_SETS}")
    out: dict[str, float] = {}
    forget_R = None
    for s in TOFU_SETS:
        if s not in per_set_stats:
            continue
        st = per_set_stats[s]
        name = TOFU_SET_NAMES[s]
        answer = _as_1d(st["answer_mean_nll"], f"{s}.answer_mean_nll")
        pert = _as_2d(st["perturbed_mean_nll"], f"{s}.perturbed_mean_nll")
        if s in ("forget", "retain"):
            if "paraphrased_mean_nll" not in st:
                raise KeyError(f"{s}: 'paraphrased_mean_nll' is required")
            para = st["paraphrased_mean_nll"]
            prob = float(np.mean(answer_probability(answer)))
        else:
            para = st.get("paraphrased_mean_nll", answer)
            prob = float(np.mean(normalized_true_probability(answer, pert)))
        R = truth_ratio(para, pert, perturbed_mean=perturbed_mean)
        rouge = _as_1d(st["rougeL_recall"], f"{s}.rougeL_recall")
        out[f"{name} Prob"] = prob
        out[f"{name} ROUGE"] = float(np.mean(rouge))
        out[f"{name} Truth Ratio"] = truth_ratio_score(R, s)
        if s == "forget":
            forget_R = R
    if all(k in out for k in MODEL_UTILITY_KEYS):
        out["Model Utility"] = model_utility(out)
    if retain_model_forget_truth_ratios is not None:
        if forget_R is None:
            raise KeyError("Forget Quality needs per_set_stats['forget']")
        stat, p = ks_test(forget_R, retain_model_forget_truth_ratios)
        out["Forget Quality"] = p
        out["KS Test Forget"] = stat
    return out


# --------------------------------------------------------------------------- #
# open-unlearning's extra TOFU metrics
# --------------------------------------------------------------------------- #
def _hit_rows(hits: Any) -> list[np.ndarray]:
    if isinstance(hits, np.ndarray) and hits.ndim == 1 and hits.dtype != object:
        hits = [hits]
    return [np.asarray(h, dtype=bool).ravel() for h in hits]


def exact_memorization(hits: Any) -> np.ndarray:
    """Per-sample Exact Memorization: the fraction of label tokens that are the argmax of the
    teacher-forced prediction, ``(argmax == label).sum() / n``.

    ``hits``: one bool array per sample over its label tokens *without the last one* (the EOS
    prediction), as open-unlearning's ``tokenwise_vocab_logprobs``
    (``src/evals/metrics/utils.py:173-175``) feeds ``exact_memorization``
    (``memorization.py:177-219``). A sample without tokens gives NaN (open-unlearning: None,
    left out of the mean).
    """
    return np.array([h.mean() if h.size else np.nan for h in _hit_rows(hits)], dtype=np.float64)


def extraction_strength(hits: Any) -> np.ndarray:
    """Per-sample Extraction Strength ``1 - k/n``: ``k`` is the first position from which every
    remaining label token is the argmax (the shortest correct suffix starts there).

    Exactly open-unlearning ``memorization.py:229-255``, including its loop's quirk: when even
    the last token is wrong the loop ends with ``k = n - 1`` (so ES = ``1/n``, not 0). ``hits``
    as for :func:`exact_memorization`; a sample without tokens gives 0 (as there).
    """
    out = []
    for h in _hit_rows(hits):
        n = h.size
        if n == 0:
            out.append(0.0)
            continue
        k = n - 1
        for j in range(n):
            if h[j:].all():
                k = j
                break
        out.append(1.0 - k / n)
    return np.array(out, dtype=np.float64)


def privleak(forget_auc: float, reference_auc: float = 0.5) -> float:
    """open-unlearning's ``privleak`` (``privacy.py:35-52``; MUSE's PrivLeak): the relative gap
    in percent between the unlearned model's MIA AUC and the retain model's,
    ``((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100``.

    ``forget_auc``: Min-K% AUC forget vs holdout (``configs/eval/tofu_metrics/privleak.yaml``:
    ``pre_compute: mia_min_k``; our ``mia_auc_min_k`` has open-unlearning's orientation, 1 =
    forget rows clearly members). ``reference_auc``: the retain model's AUC, default 0.5
    (``ref_value: 0.5``, used when no retain logs are given). 0 = like the retain model;
    negative = forget rows still recognisable as members.
    """
    score, ref = 1.0 - float(forget_auc), 1.0 - float(reference_auc)
    return (score - ref) / (ref + 1e-10) * 100.0


# --------------------------------------------------------------------------- #
# LUME / SemEval-2025 Task 4
# --------------------------------------------------------------------------- #
def lume_kind_from_id(sample_id: str) -> str:
    """'sc' / 'qa' from a SemEval sample id, as the official scorer decides it.

    The scorer tests ``id[:-1].endswith('sc')`` / ``id[:-1].endswith('qa')``
    (ids look like ``"<doc-id>sc1"``, ``"<doc-id>qa0"``).
    """
    stem = str(sample_id)[:-1]
    if stem.endswith("sc"):
        return "sc"
    if stem.endswith("qa"):
        return "qa"
    raise ValueError(f"cannot tell sc/qa from id {sample_id!r}")


def _row_score(row: Mapping[str, Any], use_stemmer: bool) -> float:
    if "score" in row and row["score"] is not None:
        return float(row["score"])
    if "prediction" in row and "reference" in row:
        if row["kind"] == "sc":
            return float(rouge_l_recall([row["prediction"]], [row["reference"]], use_stemmer)[0])
        return float(exact_match([row["prediction"]], [row["reference"]])[0])
    raise KeyError("each row needs 'score' (or 'prediction' and 'reference')")


def lume_summary(rows: Iterable[Mapping[str, Any]], use_stemmer: bool = True) -> dict[str, Any]:
    """LUME / SemEval-2025 Task 4 task-level scores and the task aggregate.

    Each row is a mapping with ``"task"`` (e.g. ``"Task1"``), ``"split"``
    (``"forget"`` | ``"retain"``), ``"kind"`` (``"sc"`` sentence completion |
    ``"qa"`` question answering) and ``"score"``: ROUGE-L recall
    (:func:`rouge_l_recall`) for sc rows, exact match (:func:`exact_match`) for
    qa rows.  Instead of ``"score"`` a row may carry ``"prediction"`` and
    ``"reference"`` strings, and the score is computed here.

    Official computation (``evaluate_generations.py`` ``compute_metrics``): per
    split, ``df.groupby('task')[['regurgitation-score','knowledge-score']].mean()``;
    forget values are inverted to ``1 - v``; the task aggregate is
    ``statistics.harmonic_mean`` of all the resulting values (3 tasks x 2
    kinds x 2 splits = 12).  A (split, task, kind) cell without rows is left
    out of the aggregate (the official pandas code would produce NaN).

    Returns::

        {"per_task": {split: {task: {"regurgitation": float, "knowledge": float}}},
         "overall": {split: {"regurgitation": float, "knowledge": float}},  # mean over rows
         "aggregated_terms": [float, ...],    # forget terms already inverted
         "task_aggregate": float}
    """
    cells: dict[tuple[str, str, str], list[float]] = {}
    for row in rows:
        split, kind, task = row["split"], row["kind"], str(row["task"])
        if split not in ("forget", "retain"):
            raise ValueError(f"split must be 'forget' or 'retain', got {split!r}")
        if kind not in ("sc", "qa"):
            raise ValueError(f"kind must be 'sc' or 'qa', got {kind!r}")
        cells.setdefault((split, task, kind), []).append(_row_score(row, use_stemmer))
    if not cells:
        raise ValueError("lume_summary needs at least one row")
    names = {"sc": "regurgitation", "qa": "knowledge"}
    per_task: dict[str, dict[str, dict[str, float]]] = {}
    overall: dict[str, dict[str, float]] = {}
    terms: list[float] = []
    for split in ("forget", "retain"):
        tasks = sorted({t for (s, t, _k) in cells if s == split})
        if not tasks:
            continue
        per_task[split] = {}
        for task in tasks:
            per_task[split][task] = {}
            for kind in ("sc", "qa"):
                vals = cells.get((split, task, kind))
                if not vals:
                    continue
                m = float(np.mean(vals))
                per_task[split][task][names[kind]] = m
                terms.append(1.0 - m if split == "forget" else m)
        overall[split] = {}
        for kind in ("sc", "qa"):
            allv = [v for (s, _t, k), vs in cells.items() if s == split and k == kind for v in vs]
            if allv:
                overall[split][names[kind]] = float(np.mean(allv))
    return {
        "per_task": per_task,
        "overall": overall,
        "aggregated_terms": terms,
        "task_aggregate": harmonic_mean(terms),
    }


def mia_score(auc: float) -> float:
    """SemEval MIA score ``1 - 2*|auc - 0.5|`` (1 at chance level, 0 at AUC 0 or 1).

    ``auc`` is the loss-attack ROC AUC with members = forget documents
    (:func:`simu_jax.evaluate.mia.auc` of ``loss_score``).  Official
    ``evaluate_generations.py``: ``mia_final_score = 1 - abs(auc - 0.5)*2``.
    """
    return 1.0 - abs(float(auc) - 0.5) * 2.0


def semeval_final_score(
    task_aggregate: float,
    mia_score: float | None,
    mmlu: float | None = None,
    mmlu_threshold: float | None = 0.371,
) -> dict[str, Any]:
    """SemEval-2025 Task 4 final score: arithmetic mean of the three components.

    Official (``evaluate_generations.py``):
    ``aggregate-score = statistics.mean([task_aggregate, mmlu_average, mia_final_score])``,
    only when both MMLU and MIA are available (otherwise the script reports -1).
    Note the task web page says "harmonic mean" of everything, but the script
    takes the harmonic mean only inside the task aggregate and the arithmetic
    mean of the three components; we follow the script.

    Here a missing component (``None``) is left out and the mean is taken over
    the components present; the output says so (``"complete": False`` and a
    ``"note"``), so such a number is NOT comparable to the leaderboard.

    ``mmlu_threshold``: the official script warns (and the challenge did not
    rank the model) when MMLU < 0.371 (75% of the 7B target model's MMLU);
    pass None to disable the warning note, or another value for other models.

    Returns ``{"final_score", "task_aggregate", "mia_score", "mmlu",
    "components_used": [names], "missing": [names], "complete": bool, "note": str}``.
    """
    comps = {"task_aggregate": task_aggregate, "mia_score": mia_score, "mmlu": mmlu}
    used = [k for k, v in comps.items() if v is not None]
    missing = [k for k, v in comps.items() if v is None]
    if not used:
        raise ValueError("semeval_final_score needs at least one component")
    final = float(sum(float(comps[k]) for k in used) / len(used))
    if missing:
        note = (
            f"missing {', '.join(missing)}: final_score is the mean of "
            f"{', '.join(used)} only (the official script reports -1 here)"
        )
    else:
        note = "mean of task_aggregate, mia_score and mmlu (official definition)"
    out: dict[str, Any] = {
        "final_score": final,
        "task_aggregate": None if task_aggregate is None else float(task_aggregate),
        "mia_score": None if mia_score is None else float(mia_score),
        "mmlu": None if mmlu is None else float(mmlu),
        "components_used": used,
        "missing": missing,
        "complete": not missing,
        "note": note,
    }
    if mmlu is not None and mmlu_threshold is not None and float(mmlu) < mmlu_threshold:
        out["note"] += (
            f"; MMLU below the {mmlu_threshold} threshold (official: 75% of the"
            " pre-unlearning model's MMLU): the challenge would not rank this model"
        )
    if not math.isfinite(final):
        out["note"] += "; non-finite component"
    return out


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The snake_case numeric entries of a summary (what ``summary.json["metrics"]`` holds)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and k == k.lower() \
                and " " not in k:
            out[k] = float(v)
    return out
