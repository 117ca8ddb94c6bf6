"""Evaluation: TOFU / LUME metrics, membership-inference attacks, reports.

``metrics`` and ``mia`` are numpy/scipy only; :mod:`simu_jax.evaluate.scoring` runs a model
(``Scorer``), :mod:`simu_jax.evaluate.runner` turns its statistics into the reported suites and
is ``simu-jax evaluate``; :mod:`simu_jax.evaluate.protocol` holds the evaluation protocols
(``tofu``, ``open-unlearning``, ``simu``, ``semeval``), :mod:`simu_jax.evaluate.tofu_log` TOFU's eval-log
layout; :mod:`simu_jax.evaluate.attacks` the robustness attacks (4-bit quantization, relearning);
:mod:`simu_jax.evaluate.report` (matplotlib) reads run directories.
Definitions and their official sources: ``docs/metrics.md``.
"""

from simu_jax.evaluate.metrics import (
    MODEL_UTILITY_KEYS,
    TOFU_SET_NAMES,
    TOFU_SETS,
    answer_probability,
    exact_match,
    exact_memorization,
    extraction_strength,
    forget_quality,
    harmonic_mean,
    ks_test,
    lume_kind_from_id,
    lume_summary,
    mia_score,
    model_utility,
    normalized_true_probability,
    privleak,
    rouge1_recall,
    rouge_l_recall,
    rouge_recalls,
    semeval_final_score,
    tofu_summary,
    truth_ratio,
    truth_ratio_score,
)
from simu_jax.evaluate.mia import (
    auc,
    gradnorm_score,
    loss_score,
    mia_aucs,
    min_k_plus_plus_score,
    min_k_score,
    reference_score,
    token_logprobs_from_logits,
    token_stats_from_logits,
    zlib_length,
    zlib_score,
)
