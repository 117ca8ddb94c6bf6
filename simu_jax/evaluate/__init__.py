"""Evaluation: TOFU / LUME metrics, membership-inference attacks, reports.

``metrics`` and ``mia`` are numpy/scipy only; ``report`` (matplotlib) is
imported lazily on first use of :func:`write_report` / :func:`format_table`.
Definitions and their official sources: ``docs/metrics.md``.
"""

from simu_jax.evaluate.metrics import (
    MODEL_UTILITY_KEYS,
    TOFU_SET_NAMES,
    TOFU_SETS,
    answer_probability,
    exact_match,
    forget_quality,
    harmonic_mean,
    ks_test,
    lume_kind_from_id,
    lume_summary,
    mia_score,
    model_utility,
    normalized_true_probability,
    rouge_l_recall,
    semeval_final_score,
    tofu_summary,
    truth_ratio,
    truth_ratio_score,
)
from simu_jax.evaluate.mia import (
    auc,
    loss_score,
    mia_aucs,
    min_k_plus_plus_score,
    min_k_score,
    token_logprobs_from_logits,
    token_stats_from_logits,
    zlib_length,
    zlib_score,
)

_LAZY = {"write_report", "format_table", "load_run"}


def __getattr__(name):
    if name in _LAZY:
        from simu_jax.evaluate import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MODEL_UTILITY_KEYS",
    "TOFU_SETS",
    "TOFU_SET_NAMES",
    "answer_probability",
    "auc",
    "exact_match",
    "format_table",
    "forget_quality",
    "harmonic_mean",
    "ks_test",
    "load_run",
    "loss_score",
    "lume_kind_from_id",
    "lume_summary",
    "mia_aucs",
    "mia_score",
    "min_k_plus_plus_score",
    "min_k_score",
    "model_utility",
    "normalized_true_probability",
    "rouge_l_recall",
    "semeval_final_score",
    "token_logprobs_from_logits",
    "token_stats_from_logits",
    "tofu_summary",
    "truth_ratio",
    "truth_ratio_score",
    "write_report",
    "zlib_length",
    "zlib_score",
]
