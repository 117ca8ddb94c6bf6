"""Membership-inference attacks (MIA) from per-token statistics, and ROC AUC.

Convention: every ``*_score`` returns one number per sample where **higher
means "more likely a member"** (seen in training).  With members = the forget
set and non-members = a holdout set, an AUC near 1 means the model still
separates the forgotten data from unseen data; ~0.5 is the target after
unlearning.  (open-unlearning returns the negated scores and labels the forget
set 0 / holdout 1 in ``roc_auc_score``; the AUC is the same number.)

Per-token inputs: ``token_logprobs[i, t] = log p(x_t | x_<t)`` of the *observed*
next token at each scored position, with ``mask[i, t]`` (bool / 0-1) marking
the positions that count (e.g. answer tokens; padding excluded).  Arrays are
``[N, T]`` (a single ``[T]`` sample returns a float), or a list of ``N``
ragged 1-D arrays, in which case ``mask`` may be omitted.

Sources: Min-K%++ official code ``zjysteven/mink-plus-plus`` ``run.py`` (loss,
zlib, Min-K%, Min-K%++ and the "larger for training data" sign convention);
open-unlearning ``src/evals/metrics/mia/{loss,zlib,min_k,min_k_plus_plus}.py``;
zlib ratio from Carlini et al. 2021 (USENIX Security, "Extracting Training Data
from Large Language Models"); SemEval-2025 Task 4 ``evaluate_generations.py``
(``compute_auc``: loss attack, score ``-nll``).  See ``docs/metrics.md``.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "auc",
    "loss_score",
    "zlib_score",
    "min_k_score",
    "min_k_plus_plus_score",
    "token_stats_from_logits",
    "token_logprobs_from_logits",
    "zlib_length",
    "mia_aucs",
    "reference_score",
    "gradnorm_score",
]


def auc(member_scores: Any, nonmember_scores: Any) -> float:
    """ROC AUC of ``member_scores`` (positives) vs ``nonmember_scores``.

    Equals ``P(s_member > s_nonmember) + 0.5 * P(s_member == s_nonmember)``,
    computed with average ranks (Mann-Whitney U).  Ties count one half, which
    is exactly ``sklearn.metrics.roc_auc_score`` / ``auc(roc_curve(...))``.
    NaN scores raise ``ValueError`` (the SemEval scorer asserts the same).
    """
    pos = np.asarray(member_scores, dtype=np.float64).ravel()
    neg = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auc needs at least one member and one non-member score")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("auc got NaN scores")
    ranks = rankdata(np.concatenate([pos, neg]), method="average")
    n1, n0 = pos.size, neg.size
    u = ranks[:n1].sum() - n1 * (n1 + 1) / 2.0
    return float(u / (n1 * n0))


# --------------------------------------------------------------------------- #
# input handling
# --------------------------------------------------------------------------- #
def _is_ragged(x: Any) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(np.ndim(r) == 1 for r in x) and (
        len({len(r) for r in x}) > 1
    )


def _pad(rows: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    n, t = len(rows), max(len(r) for r in rows)
    out = np.zeros((n, t), dtype=np.float64)
    m = np.zeros((n, t), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = np.asarray(r, dtype=np.float64)
        m[i, : len(r)] = True
    return out, m


def _prepare(token_logprobs: Any, mask: Any, *extra: Any):
    """-> (squeeze, lp[N,T], mask[N,T] bool, extras[N,T]...)."""
    if _is_ragged(token_logprobs):
        lp, auto_mask = _pad(token_logprobs)
        if mask is None:
            mask_arr = auto_mask
        else:
            mask_arr = _pad(mask)[0].astype(bool) & auto_mask
        ex = [None if e is None else _pad(e)[0] for e in extra]
        return False, lp, mask_arr, ex
    lp = np.asarray(token_logprobs, dtype=np.float64)
    squeeze = lp.ndim == 1
    if lp.ndim == 1:
        lp = lp[None, :]
    if lp.ndim != 2:
        raise ValueError(f"token_logprobs must be [N, T] or [T], got shape {lp.shape}")
    if mask is None:
        mask_arr = np.ones(lp.shape, dtype=bool)
    else:
        mask_arr = np.asarray(mask).astype(bool).reshape(lp.shape)
    ex = []
    for e in extra:
        if e is None:
            ex.append(None)
        else:
            ea = np.asarray(e, dtype=np.float64).reshape(lp.shape)
            ex.append(ea)
    return squeeze, lp, mask_arr, ex


def _check_nonempty(mask: np.ndarray) -> np.ndarray:
    n = mask.sum(axis=1)
    bad = np.flatnonzero(n == 0)
    if bad.size:
        raise ValueError(f"samples {bad.tolist()[:10]} have no scored tokens (mask all false)")
    return n


def _finish(scores: np.ndarray, squeeze: bool):
    return float(scores[0]) if squeeze else scores


def _mean_lowest_k(values: np.ndarray, mask: np.ndarray, k: float) -> np.ndarray:
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be a fraction in (0, 1], got {k}")
    n = _check_nonempty(mask)
    out = np.empty(values.shape[0], dtype=np.float64)
    for i in range(values.shape[0]):
        v = np.sort(values[i][mask[i]])
        num_k = max(1, int(n[i] * k))
        out[i] = v[:num_k].mean()
    return out


# --------------------------------------------------------------------------- #
# attacks
# --------------------------------------------------------------------------- #
def loss_score(token_logprobs: Any, mask: Any = None):
    """LOSS attack (Yeom et al. 2018): mean token log-likelihood ``= -mean NLL``.

    Same number as ``-out.loss`` of a HF causal LM on the masked tokens
    (mink-plus-plus ``run.py`` ``ll = -loss``; SemEval ``compute_auc`` uses ``-nll``).
    """
    squeeze, lp, m, _ = _prepare(token_logprobs, mask)
    n = _check_nonempty(m)
    return _finish(np.where(m, lp, 0.0).sum(axis=1) / n, squeeze)


def zlib_length(text: str) -> int:
    """Length in bytes of ``zlib.compress(text.encode('utf-8'))`` (default level)."""
    return len(zlib.compress(str(text).encode("utf-8")))


def zlib_score(token_logprobs: Any, mask: Any, texts: Sequence[str] | str):
    """zlib-ratio attack (Carlini et al. 2021): ``loss_score / zlib_length(text)``.

    Carlini et al. rank by ``log-perplexity / zlib entropy`` (low = memorised);
    with the higher-is-member sign this is ``mean log p / zlib bytes``, exactly
    mink-plus-plus ``run.py`` (``ll / len(zlib.compress(bytes(text, 'utf-8')))``)
    and the negation of open-unlearning's ``avg_loss / zlib_entropy``.  ``texts``
    must be the decoded text of the scored tokens (one string per sample).
    """
    squeeze, lp, m, _ = _prepare(token_logprobs, mask)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if len(texts) != lp.shape[0]:
        raise ValueError(f"{len(texts)} texts for {lp.shape[0]} samples")
    n = _check_nonempty(m)
    ll = np.where(m, lp, 0.0).sum(axis=1) / n
    z = np.array([zlib_length(t) for t in texts], dtype=np.float64)
    return _finish(ll / z, squeeze)


def min_k_score(token_logprobs: Any, mask: Any = None, k: float = 0.2):
    """Min-K% Prob (Shi et al. 2024): mean of the lowest ``k`` fraction of token log-probs.

    Uses ``max(1, int(n_tokens * k))`` tokens (open-unlearning ``min_k.py``; the
    mink-plus-plus ``run.py`` uses ``int(n*k)`` without the floor of 1, which
    gives NaN for very short texts).
    """
    squeeze, lp, m, _ = _prepare(token_logprobs, mask)
    return _finish(_mean_lowest_k(lp, m, k), squeeze)


def min_k_plus_plus_score(
    token_logprobs: Any,
    mu: Any,
    sigma: Any,
    mask: Any = None,
    k: float = 0.2,
    sigma_floor: float = 1e-3,
):
    """Min-K%++ (Zhang et al. 2024): Min-K% of ``(log p(x_t) - mu_t) / sigma_t``.

    ``mu_t = E_{z~p(.|x_<t)} log p(z)`` and ``sigma_t`` its standard deviation
    over the vocabulary, from the same next-token distribution that gave
    ``log p(x_t)`` (see :func:`token_stats_from_logits`).  ``sigma`` is floored
    at ``sigma_floor`` (= sqrt(1e-6), open-unlearning clamps the variance at
    1e-6; the official ``run.py`` has no floor and divides by 0 for one-hot
    distributions).
    """
    squeeze, lp, m, (mu_a, sig_a) = _prepare(token_logprobs, mask, mu, sigma)
    z = (lp - mu_a) / np.maximum(sig_a, sigma_floor)
    return _finish(_mean_lowest_k(z, m, k), squeeze)


def reference_score(target_mean_nll: Any, reference_mean_nll: Any) -> np.ndarray:
    """Reference-model attack: ``ref_nll - target_nll`` (higher = member: the target finds the
    text likelier than a reference model does). The negation of open-unlearning's
    ``target_loss - ref_loss`` (``mia/reference.py:23-25``, mean NLL over the label tokens,
    ``evaluate_probability``)."""
    t = np.asarray(target_mean_nll, dtype=np.float64)
    r = np.asarray(reference_mean_nll, dtype=np.float64)
    if t.shape != r.shape:
        raise ValueError(f"target and reference NLLs differ in shape: {t.shape} vs {r.shape}")
    return r - t


def gradnorm_score(grad_norms: Any) -> np.ndarray:
    """Gradient-norm attack: ``-gradnorm`` (higher = member: members have smaller gradients).
    open-unlearning ``mia/gradnorm.py:19-38`` scores the norm itself with members labelled 0,
    which gives the same AUC. ``grad_norms`` [N]: per sample, the mean over parameter tensors
    of each tensor's p-norm of the gradient of the mean label-token NLL (EOS dropped)."""
    return -np.asarray(grad_norms, dtype=np.float64)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mx = np.max(x, axis=-1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    s = x - mx
    return s - np.log(np.sum(np.exp(s), axis=-1, keepdims=True))


def token_stats_from_logits(logits: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-position mean and std of ``log p(z)`` under ``z ~ p``.

    Args:
        logits: [T, V] (or [..., T, V]) logits or log-softmax of the next-token
            distribution at each position (log-softmax is re-applied, which is
            idempotent on normalised log-probs).
    Returns:
        ``(mu, sigma)``, each [T] (or [..., T]):
        ``mu = sum_z p(z) log p(z)`` (negative entropy),
        ``sigma = sqrt(sum_z p(z) log p(z)^2 - mu^2)`` (as mink-plus-plus ``run.py``).
    """
    lsm = _log_softmax(logits)
    p = np.exp(lsm)
    safe = np.where(p > 0, lsm, 0.0)  # 0 * log 0 := 0 (masked vocabulary entries)
    plp = p * safe
    plp2 = p * safe * safe
    mu = plp.sum(axis=-1)
    var = plp2.sum(axis=-1) - mu * mu
    return mu, np.sqrt(np.maximum(var, 0.0))


def token_logprobs_from_logits(logits: Any, targets: Any) -> np.ndarray:
    """``log_softmax(logits)[..., t, targets[..., t]]``: [..., T, V], [..., T] -> [..., T].

    Alignment is the caller's job: ``logits[t]`` must be the distribution that
    predicts ``targets[t]`` (i.e. logits[:-1] with input_ids[1:]).
    """
    lsm = _log_softmax(logits)
    tg = np.asarray(targets, dtype=np.int64)
    return np.take_along_axis(lsm, tg[..., None], axis=-1)[..., 0]


def mia_aucs(
    member_stats: Mapping[str, Any], nonmember_stats: Mapping[str, Any], k: float = 0.2
) -> dict[str, float]:
    """AUCs of all attacks, members = forget set, non-members = holdout set.

    Each ``*_stats`` mapping holds:

    * ``"token_logprobs"`` (required): [N, T] or a list of N 1-D arrays.
    * ``"mask"`` (optional): [N, T] bool, positions to score.
    * ``"texts"`` (optional): N strings (decoded scored text), enables "zlib".
    * ``"mu"``, ``"sigma"`` (optional): [N, T] from :func:`token_stats_from_logits`,
      enables "min_k++".

    Returns ``{"loss", "min_k", ["zlib"], ["min_k++"]}`` -> AUC; an optional
    attack is included only when both sides provide its inputs.
    """

    def get(st, key):
        return st.get(key) if isinstance(st, Mapping) else None

    out: dict[str, float] = {}
    mem_lp, non_lp = member_stats["token_logprobs"], nonmember_stats["token_logprobs"]
    mem_m, non_m = get(member_stats, "mask"), get(nonmember_stats, "mask")
    out["loss"] = auc(
        np.atleast_1d(loss_score(mem_lp, mem_m)), np.atleast_1d(loss_score(non_lp, non_m))
    )
    if get(member_stats, "texts") is not None and get(nonmember_stats, "texts") is not None:
        out["zlib"] = auc(
            np.atleast_1d(zlib_score(mem_lp, mem_m, member_stats["texts"])),
            np.atleast_1d(zlib_score(non_lp, non_m, nonmember_stats["texts"])),
        )
    out["min_k"] = auc(
        np.atleast_1d(min_k_score(mem_lp, mem_m, k)), np.atleast_1d(min_k_score(non_lp, non_m, k))
    )
    if all(get(s, key) is not None for s in (member_stats, nonmember_stats) for key in ("mu", "sigma")):
        out["min_k++"] = auc(
            np.atleast_1d(
                min_k_plus_plus_score(mem_lp, member_stats["mu"], member_stats["sigma"], mem_m, k)
            ),
            np.atleast_1d(
                min_k_plus_plus_score(
                    non_lp, nonmember_stats["mu"], nonmember_stats["sigma"], non_m, k
                )
            ),
        )
    return out
