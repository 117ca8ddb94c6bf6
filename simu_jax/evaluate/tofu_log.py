"""TOFU's evaluation-log layout (``eval_log_aggregated.json``): read, aggregate, write.

TOFU's ``evaluate_util.py`` (``main``, lines 261-289) writes one JSON object per model,
``eval_log_aggregated.json``, keyed by the four evaluation files
(``eval_task`` in ``config/eval_everything.yaml``):

=========================================  =================  ==============================
file key                                   our set            rows (TOFU, ``ds_size: 300``)
=========================================  =================  ==============================
``eval_log.json``                          ``retain``         first 300 of retain_perturbed
``eval_real_author_wo_options.json``       ``real_authors``   100
``eval_real_world_wo_options.json``        ``world_facts``    117
``eval_log_forget.json``                   ``forget``         first 300 of forgetXX_perturbed
=========================================  =================  ==============================

Under each file, every statistic is a dict ``{row index as a string: value}``:
``avg_gt_loss``, ``gt_loss``, ``num_token_gt``, ``generated_text`` ([prompt, generation,
ground truth]), ``rouge1_recall``, ``rougeL_recall`` (``get_all_evals``, lines 175-190),
``average_perturb_loss`` ([K]), ``avg_paraphrased_loss``, ``truth_ratio``,
``paraphrased_loss``, ``perturb_loss``, ``num_token_paraphrased``, ``num_token_perturb``
(``eval_perturbation_ratio``, lines 74-95) and, on the two sets that are not ``eval_log*``,
``normalized_gt_loss`` (lines 193-205).

:func:`read_tofu_log` reads such a file, :func:`log_summary` turns it (and a retain model's
file) into TOFU's headline numbers with *our* metric functions
(:func:`simu_jax.evaluate.metrics.tofu_summary`), :func:`log_forget_truth_ratios` gives the
reference truth ratios for forget quality (``simu-jax evaluate --reference-log``), and
:func:`to_tofu_log` / :func:`write_tofu_log` write our per-sample results in the same layout.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from simu_jax.evaluate import metrics as M

__all__ = [
    "TOFU_LOG_FILES",
    "TOFU_LOG_NAME",
    "log_forget_truth_ratios",
    "log_set_stats",
    "log_summary",
    "read_tofu_log",
    "to_tofu_log",
    "write_tofu_log",
]

TOFU_LOG_NAME = "eval_log_aggregated.json"
# Our set name -> TOFU's eval-log file key (config/eval_everything.yaml `eval_task`).
TOFU_LOG_FILES: dict[str, str] = {
    "retain": "eval_log.json",
    "real_authors": "eval_real_author_wo_options.json",
    "world_facts": "eval_real_world_wo_options.json",
    "forget": "eval_log_forget.json",
}
# The synthetic benchmark's general set has no TOFU file; it is written under this key
# (TOFU's own aggregate_eval_stat.py knows only the four files above).
GENERAL_LOG_FILE = "eval_general.json"
_REQUIRED = ("avg_gt_loss", "average_perturb_loss", "avg_paraphrased_loss")


def read_tofu_log(path: str | os.PathLike) -> dict[str, Any]:
    """Load an ``eval_log_aggregated.json`` (or a directory holding one).

    Checks the layout: at least one of the four TOFU file keys, each with
    ``avg_gt_loss``, ``average_perturb_loss`` and ``avg_paraphrased_loss``. Raises
    ``FileNotFoundError`` / ``ValueError`` with one line otherwise.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / TOFU_LOG_NAME
    if not p.is_file():
        raise FileNotFoundError(f"TOFU eval log not found: {p}")
    try:
        log = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a JSON file ({e.__class__.__name__})") from None
    if not isinstance(log, Mapping):
        raise ValueError(f"{p}: expected a JSON object keyed by TOFU eval files")
    known = [k for k in list(TOFU_LOG_FILES.values()) + [GENERAL_LOG_FILE] if k in log]
    if not known:
        raise ValueError(f"{p}: none of the TOFU eval files {', '.join(TOFU_LOG_FILES.values())} in it")
    for k in known:
        missing = [s for s in _REQUIRED if s not in log[k]]
        if missing:
            raise ValueError(f"{p}: {k} lacks {', '.join(missing)}")
    return dict(log)


def _ordered(d: Mapping[str, Any]) -> list[Any]:
    """Values of a ``{row index string: value}`` dict in row order."""
    return [d[k] for k in sorted(d, key=lambda k: int(k))]


def log_set_stats(log: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """``per_set_stats`` for :func:`metrics.tofu_summary` from a TOFU log (rows in index order).

    ``paraphrased_mean_nll`` is TOFU's ``avg_paraphrased_loss`` on every set (on Real Authors
    / World Facts it is the true answer's loss from the second pass, ``base_answer_key:
    answer``, which is what ``aggregate_eval_stat.py`` line 61 reads).
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, key in TOFU_LOG_FILES.items():
        if key not in log:
            continue
        v = log[key]
        st = {
            "answer_mean_nll": np.asarray(_ordered(v["avg_gt_loss"]), np.float64),
            "paraphrased_mean_nll": np.asarray(_ordered(v["avg_paraphrased_loss"]), np.float64),
            "perturbed_mean_nll": np.asarray(_ordered(v["average_perturb_loss"]), np.float64),
        }
        if "rougeL_recall" in v:
            st["rougeL_recall"] = np.asarray(_ordered(v["rougeL_recall"]), np.float64)
        else:
            st["rougeL_recall"] = np.full(len(st["answer_mean_nll"]), np.nan)
        out[name] = st
    return out


def log_forget_truth_ratios(log: Mapping[str, Any]) -> np.ndarray:
    """Raw forget-set truth ratios ``R = exp(avg_paraphrased_loss - mean_k average_perturb_loss)``
    of the model that wrote ``log`` (the reference for forget quality)."""
    key = TOFU_LOG_FILES["forget"]
    if key not in log:
        raise ValueError(f"the TOFU eval log has no {key} (the forget set)")
    st = log_set_stats({key: log[key]})["forget"]
    return M.truth_ratio(st["paraphrased_mean_nll"], st["perturbed_mean_nll"])


def log_summary(log: Mapping[str, Any], retain_log: Mapping[str, Any] | None = None) -> dict[str, float]:
    """TOFU's headline numbers of a log with our formulas (:func:`metrics.tofu_summary`);
    ``retain_log`` (the retain-only model's log) adds Forget Quality and the KS statistic."""
    ref = log_forget_truth_ratios(retain_log) if retain_log is not None else None
    return M.tofu_summary(log_set_stats(log), ref)


# --------------------------------------------------------------------------- writing


def _num(x: Any) -> Any:
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_num(v) for v in x]
    if x is None:
        return None
    if isinstance(x, (np.integer, int)) and not isinstance(x, bool):
        return int(x)
    x = float(x)
    return x if math.isfinite(x) else None


def _indexed(values: Any) -> dict[str, Any]:
    return {str(i): _num(v) for i, v in enumerate(values)}


def to_tofu_log(per_sample: Mapping[str, Any]) -> dict[str, Any]:
    """Our per-sample results (:func:`simu_jax.evaluate.runner.evaluate_qa_benchmark`) in
    TOFU's ``eval_log_aggregated.json`` layout.

    Written per set: ``avg_gt_loss``, ``average_perturb_loss``, ``avg_paraphrased_loss`` (the
    true answer's loss on Real Authors / World Facts / General, as TOFU), ``truth_ratio``
    (raw R, TOFU's ``exp(para - mean pert)``, line 59), ``normalized_gt_loss`` on the sets that
    are not ``eval_log*`` (lines 198-203), ``rougeL_recall`` / ``rouge1_recall`` /
    ``generated_text`` ([prompt, generation, ground truth]) when generation ran, and the sums
    and token counts (``gt_loss``, ``num_token_gt``, ``paraphrased_loss``,
    ``num_token_paraphrased``, ``perturb_loss``, ``num_token_perturb``) when recorded.
    """
    out: dict[str, Any] = {}
    names = dict(TOFU_LOG_FILES, general=GENERAL_LOG_FILE)
    for name in ("retain", "real_authors", "world_facts", "general", "forget"):
        ps = per_sample.get(name)
        if not isinstance(ps, Mapping) or "answer_mean_nll" not in ps:
            continue
        gt = np.asarray(ps["answer_mean_nll"], np.float64)
        pert = np.asarray(ps["perturbed_mean_nll"], np.float64)
        para = np.asarray(ps.get("paraphrased_mean_nll", gt), np.float64)
        v: dict[str, Any] = {"avg_gt_loss": _indexed(gt)}
        if ps.get("answer_num_tokens") is not None:
            n = np.asarray(ps["answer_num_tokens"])
            v["gt_loss"] = _indexed(gt * n)
            v["num_token_gt"] = _indexed(n)
        gens = ps.get("generation")
        if gens is not None:
            prompts = ps.get("prompt") or [""] * len(gens)
            v["generated_text"] = {str(i): [str(p), str(g), str(a)]
                                   for i, (p, g, a) in enumerate(zip(prompts, gens, ps["answer"]))}
            if ps.get("rouge1_recall") is not None:
                v["rouge1_recall"] = _indexed(ps["rouge1_recall"])
            if ps.get("rougeL_recall") is not None:
                v["rougeL_recall"] = _indexed(ps["rougeL_recall"])
        v["average_perturb_loss"] = _indexed(pert)
        v["avg_paraphrased_loss"] = _indexed(para)
        v["truth_ratio"] = _indexed(M.truth_ratio(para, pert))
        para_n = ps.get("paraphrased_num_tokens", ps.get("answer_num_tokens") if name not in ("forget", "retain")
                        else None)
        if para_n is not None:
            v["paraphrased_loss"] = _indexed(para * np.asarray(para_n))
            v["num_token_paraphrased"] = _indexed(para_n)
        if ps.get("perturbed_num_tokens") is not None:
            pn = np.asarray(ps["perturbed_num_tokens"])
            v["perturb_loss"] = _indexed(pert * pn)
            v["num_token_perturb"] = _indexed(pn)
        if name not in ("forget", "retain"):
            all_p = np.concatenate([np.exp(-gt)[:, None], np.exp(-pert)], axis=1)
            v["normalized_gt_loss"] = _indexed(-np.log(np.exp(-gt) / all_p.sum(axis=1)))
        out[names[name]] = v
    return out


def write_tofu_log(out_dir: str | os.PathLike, per_sample: Mapping[str, Any]) -> Path | None:
    """Write :func:`to_tofu_log` as ``out_dir/eval_log_aggregated.json`` (atomically); ``None``
    (nothing written) when ``per_sample`` holds no QA set."""
    from simu_jax.runio import write_text_atomic

    log = to_tofu_log(per_sample)
    if not log:
        return None
    from simu_jax.base import as_path

    path = as_path(out_dir) / TOFU_LOG_NAME
    write_text_atomic(path, json.dumps(log, indent=1, allow_nan=False) + "\n")
    return path
