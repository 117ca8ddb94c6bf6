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
  aggregate and the document-level MIA.
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
  ``mia_auc_min_k_pp`` (with a holdout set).  The TOFU display names
  (``"Forget Prob"``, ``"Model Utility"``, ...) from
  :func:`~simu_jax.evaluate.metrics.tofu_summary` are kept alongside.
* LUME: ``forget_regurgitation``, ``forget_knowledge``, ``retain_regurgitation``,
  ``retain_knowledge`` (the official ``overall-*-score``: means over rows),
  ``task_aggregate``, and with MIA documents ``mia_auc_loss`` (= ``mia_auc``,
  the official loss attack), ``mia_auc_zlib``, ``mia_auc_min_k``,
  ``mia_auc_min_k_pp`` and ``mia_score``.  Nested extras: ``per_task``,
  ``semeval``.
* ``notes``: a list of strings saying what was skipped and why.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simu_jax.data.tokenize import (
    DEFAULT_BUCKETS,
    QATemplate,
    _bos_prefix,
    tokenize_prompts,
    tokenize_qa,
    tokenize_texts,
)
from simu_jax.evaluate import metrics as M
from simu_jax.evaluate import mia as MIA
from simu_jax.losses import token_logprobs as _label_logprobs
from simu_jax.models.transformer import apply, merge_params

__all__ = [
    "QA_SETS",
    "Scorer",
    "cli_main",
    "build_parser",
    "evaluate_lume",
    "evaluate_qa_benchmark",
    "forget_truth_ratios",
    "load_model_and_tokenizer",
    "reference_forget_truth_ratios",
    "summary_metrics",
    "write_results",
]

# QA evaluation sets in report order; "general" is the synthetic benchmark's world-knowledge set.
QA_SETS: tuple[str, ...] = ("forget", "retain", "real_authors", "world_facts", "general")
_SET_DISPLAY = {**M.TOFU_SET_NAMES, "general": "General"}
_METRIC_SUFFIX = {"Prob": "prob", "ROUGE": "rouge", "Truth Ratio": "truth_ratio"}
_MIA_KEYS = {"loss": "mia_auc_loss", "zlib": "mia_auc_zlib", "min_k": "mia_auc_min_k", "min_k++": "mia_auc_min_k_pp"}
_PLAIN = QATemplate(question_start="", question_end="", answer_start="")  # prompt = the text itself


# --------------------------------------------------------------------------- jit-compiled passes


@functools.partial(jax.jit, static_argnames=("graphdef", "with_stats"))
def _label_pass(graphdef, params, input_ids, attention_mask, labels, with_stats=False):
    """Per-example answer statistics from one forward pass (labels -100 = not scored).

    Returns ``mean_nll`` [B] (0 where no label), ``count`` [B] label tokens, ``hits`` [B]
    teacher-forced argmax hits; with ``with_stats`` also ``logp``/``valid`` [B, T-1] and the
    Min-K%++ moments ``mu``/``sigma`` [B, T-1] of the next-token distribution, computed here so
    that the [B, T, V] logits never leave the device.
    """
    logits = apply(graphdef, params, input_ids, attention_mask)
    logp, valid = _label_logprobs(logits, labels)
    count = jnp.sum(valid, axis=-1)
    out = {
        "mean_nll": -jnp.sum(logp, axis=-1) / jnp.maximum(count, 1),
        "count": count,
        "hits": jnp.sum((jnp.argmax(logits[:, :-1], axis=-1) == labels[:, 1:]) & valid, axis=-1),
    }
    if with_stats:
        lsm = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        p = jnp.exp(lsm)
        mu = jnp.sum(p * lsm, axis=-1)
        var = jnp.sum(p * lsm * lsm, axis=-1) - mu * mu
        out.update(logp=logp, valid=valid, mu=mu, sigma=jnp.sqrt(jnp.maximum(var, 0.0)))
    return out


def _fill_rows(arrays: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Fill a short batch up to ``rows`` with copies of its last row (outputs are dropped)."""
    out = {}
    for k, v in arrays.items():
        short = rows - v.shape[0]
        out[k] = np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) if short > 0 else v
    return out


# --------------------------------------------------------------------------- Scorer


class Scorer:
    """Batched, jit-compiled scoring and generation for one model + tokenizer.

    Args:
        graphdef, params: from :func:`simu_jax.models.split_params`.
        tokenizer: a Hugging Face tokenizer (the one the model was trained with).
        template: how a question becomes a prompt (default: TOFU's format).
        batch_size: rows per compiled batch; every batch has exactly this many rows.
        max_length: token limit for scored sequences and prompts (default: the model's
            ``max_position_embeddings``). Longer QA sequences lose their end (a warning).
        buckets: padded lengths (each batch is padded to the smallest bucket that fits it);
            fewer buckets = fewer compiled programs, more buckets = less padding.

    Rows are processed longest-first so a batch holds rows of similar length; outputs come
    back in input order.
    """

    def __init__(self, graphdef, params, tokenizer, template: QATemplate = QATemplate(), batch_size: int = 16,
                 max_length: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.graphdef = graphdef
        self.params = params
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = int(batch_size)
        self.buckets = tuple(int(b) for b in buckets)
        self.config = merge_params(graphdef, params).config
        self.max_length = int(max_length) if max_length is not None else int(self.config.max_position_embeddings)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        eos = tokenizer.eos_token_id
        self.eos_token_id = int(eos) if eos is not None else None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self.pad_token_id = int(pad) if pad is not None else None

    @classmethod
    def from_model(cls, model, tokenizer, **kwargs) -> "Scorer":
        """Scorer for an NNX ``CausalLM``."""
        from simu_jax.models.transformer import split_params

        graphdef, params = split_params(model)
        return cls(graphdef, params, tokenizer, **kwargs)

    # ----------------------------------------------------------------- batching

    def _batches(self, lengths: Sequence[int]) -> list[np.ndarray]:
        order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def _labelled(self, n: int, lengths: Sequence[int], encode: Callable[[np.ndarray], dict],
                  with_stats: bool) -> list[dict[str, np.ndarray]]:
        """Run :func:`_label_pass` over ``n`` rows; ``encode(idx)`` tokenizes the rows ``idx``."""
        rows: list[dict[str, np.ndarray] | None] = [None] * n
        for idx in self._batches(lengths):
            arrays = _fill_rows(encode(idx), self.batch_size)
            out = jax.device_get(_label_pass(
                self.graphdef, self.params, jnp.asarray(arrays["input_ids"]),
                jnp.asarray(arrays["attention_mask"]), jnp.asarray(arrays["labels"]), with_stats=with_stats))
            for j, i in enumerate(idx):
                rows[i] = {k: np.asarray(v[j]) for k, v in out.items()}
        return rows  # type: ignore[return-value]

    def _qa_rows(self, records: Sequence[Mapping[str, Any]], answer_key: str, with_stats: bool):
        records = list(records)
        for r in records:
            if answer_key not in r or r[answer_key] is None:
                raise ValueError(f"record without {answer_key!r}: question={str(r.get('question'))[:60]!r}")

        def encode(idx):
            return tokenize_qa(self.tokenizer, [records[i] for i in idx], self.template, max_length=self.max_length,
                               answer_key=answer_key, buckets=self.buckets)

        lengths = [len(str(r["question"])) + len(str(r[answer_key])) for r in records]
        return self._labelled(len(records), lengths, encode, with_stats)

    @staticmethod
    def _mean_nll(rows) -> np.ndarray:
        nll = np.array([float(r["mean_nll"]) for r in rows], dtype=np.float64)
        count = np.array([int(r["count"]) for r in rows])
        return np.where(count > 0, nll, np.nan)  # no scored token (truncated away): NaN, not 0

    # ----------------------------------------------------------------- QA scoring

    def answer_mean_nll(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer") -> np.ndarray:
        """[N] mean NLL of ``record[answer_key]`` given the question, over answer tokens + EOS.

        TOFU's ``avg_gt_loss`` (``gt_loss / num_token_gt``). NaN for a row whose answer was
        truncated away entirely.
        """
        if not records:
            return np.zeros((0,), np.float64)
        return self._mean_nll(self._qa_rows(records, answer_key, with_stats=False))

    def perturbed_mean_nll(self, records: Sequence[Mapping[str, Any]], key: str = "perturbed_answer") -> np.ndarray:
        """[N, K] mean NLL of each of the K perturbed answers (``record[key]``, a list).

        All records must have the same K (TOFU: 5 on forget/retain, 3-4 elsewhere).
        """
        flat, ks = [], set()
        for r in records:
            answers = r.get(key)
            if answers is None:
                raise ValueError(f"record without {key!r}: question={str(r.get('question'))[:60]!r}")
            answers = [answers] if isinstance(answers, str) else list(answers)
            if not answers:
                raise ValueError(f"empty {key!r}: question={str(r.get('question'))[:60]!r}")
            ks.add(len(answers))
            flat += [{"question": r["question"], "answer": a} for a in answers]
        if len(ks) > 1:
            raise ValueError(f"records have different numbers of {key!r} entries: {sorted(ks)}")
        if not records:
            return np.zeros((0, 0), np.float64)
        return self.answer_mean_nll(flat).reshape(len(records), ks.pop())

    def token_accuracy(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer") -> np.ndarray:
        """[N] teacher-forced accuracy: fraction of answer tokens (+ EOS) that are the argmax."""
        rows = self._qa_rows(records, answer_key, with_stats=False)
        hits = np.array([float(r["hits"]) for r in rows])
        count = np.array([float(r["count"]) for r in rows])
        return np.where(count > 0, hits / np.maximum(count, 1), np.nan)

    @staticmethod
    def _stats(rows, texts: Sequence[str], with_stats: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "token_logprobs": [r["logp"][r["valid"]].astype(np.float64) for r in rows],
            "texts": list(texts),
            "mean_nll": Scorer._mean_nll(rows),
        }
        if with_stats:
            out["mu"] = [r["mu"][r["valid"]].astype(np.float64) for r in rows]
            out["sigma"] = [r["sigma"][r["valid"]].astype(np.float64) for r in rows]
        return out

    def qa_token_logprobs(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer",
                          with_stats: bool = True) -> dict[str, Any]:
        """Per-token log-probs of the answer tokens (+ EOS) given the question.

        Returns ``{"token_logprobs": [N ragged arrays], "mu", "sigma" (with_stats),
        "texts": answers, "mean_nll": [N]}``: the stats mapping :func:`mia.mia_aucs` takes.
        """
        rows = self._qa_rows(records, answer_key, with_stats=True)
        return self._stats(rows, [str(r[answer_key]) for r in records], with_stats)

    def token_logprobs(self, texts: Sequence[str], with_stats: bool = False) -> dict[str, Any]:
        """Per-token log-probs of plain documents (every token after the first, as HF ``out.loss``).

        Documents longer than ``max_length`` tokens keep their start. Returns
        ``{"token_logprobs": [N ragged arrays], "mu", "sigma" (with_stats), "texts", "mean_nll"}``;
        ``mu``/``sigma`` are the Min-K%++ moments of each next-token distribution, computed
        inside the jit-compiled pass from the logits.
        """
        texts = [str(t) for t in texts]
        if not texts:
            return self._stats([], [], with_stats)

        def encode(idx):
            return tokenize_texts(self.tokenizer, [texts[i] for i in idx], max_length=self.max_length,
                                  buckets=self.buckets)

        rows = self._labelled(len(texts), [len(t) for t in texts], encode, with_stats=True)
        # A truncated document is scored (and zlib-compressed) on the part that was kept.
        prefix = 1 if _bos_prefix(self.tokenizer) else 0
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        scored = [t if prefix + len(i) <= self.max_length else
                  self.tokenizer.decode(i[: self.max_length - prefix], skip_special_tokens=True)
                  for t, i in zip(texts, ids)]
        return self._stats(rows, scored, with_stats)

    # ----------------------------------------------------------------- generation

    def _generate(self, prompts: Sequence[Any], template: QATemplate, max_new_tokens: int) -> list[str]:
        from simu_jax.models.generate import generate

        prompts = list(prompts)
        if not prompts:
            return []
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = self.max_length - max_new_tokens if self.max_length > max_new_tokens else self.max_length
        texts = [p["question"] if isinstance(p, Mapping) else str(p) for p in prompts]
        out: list[str | None] = [None] * len(texts)
        for idx in self._batches([len(t) for t in texts]):
            enc = tokenize_prompts(self.tokenizer, [texts[i] for i in idx], template, max_length=limit,
                                   buckets=self.buckets)
            enc = _fill_rows(enc, self.batch_size)
            new = np.asarray(generate(
                (self.graphdef, self.params), enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id))
            for j, i in enumerate(idx):
                out[i] = self._decode(new[j])
        return out  # type: ignore[return-value]

    def _decode(self, ids: np.ndarray) -> str:
        ids = [int(t) for t in ids]
        if self.eos_token_id is not None and self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_answers(self, records: Sequence[Mapping[str, Any] | str], max_new_tokens: int = 200) -> list[str]:
        """Greedy answers to the questions (records or strings) under the QA template.

        Decoded up to the first EOS, special tokens skipped, surrounding whitespace stripped.
        """
        return self._generate(records, self.template, max_new_tokens)

    def generate_continuations(self, prompts: Sequence[str], max_new_tokens: int = 256) -> list[str]:
        """Greedy continuations of plain-text prompts (no template; LUME / SemEval style)."""
        return self._generate(prompts, _PLAIN, max_new_tokens)


# --------------------------------------------------------------------------- QA benchmarks


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
    max_new_tokens: int = 200,
    *,
    mia_k: float = 0.2,
    perturbed_mean: str = "geometric",
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """TOFU-style evaluation of one model on QA sets.

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
    :func:`forget_truth_ratios` of its own evaluation); adds Forget Quality (KS p-value).

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
        if name == "forget" and "holdout" in sets:
            mia_member = scorer.qa_token_logprobs(recs, with_stats=True)
            st["answer_mean_nll"] = mia_member["mean_nll"]
        else:
            st["answer_mean_nll"] = scorer.answer_mean_nll(recs)
        if name in ("forget", "retain"):
            st["paraphrased_mean_nll"] = scorer.answer_mean_nll(recs, "paraphrased_answer")
        st["perturbed_mean_nll"] = scorer.perturbed_mean_nll(recs)
        gens = scorer.generate_answers(recs, max_new_tokens) if generate else None
        if gens is not None:
            st["rougeL_recall"] = M.rouge_l_recall(gens, [str(r["answer"]) for r in recs])
        else:
            st["rougeL_recall"] = np.full(len(recs), np.nan)
        per_set_stats["world_facts" if name == "general" else name] = st
        para = st.get("paraphrased_mean_nll", st["answer_mean_nll"])
        R = M.truth_ratio(para, st["perturbed_mean_nll"], perturbed_mean=perturbed_mean)
        ps: dict[str, Any] = {
            "question": [str(r["question"]) for r in recs],
            "answer": [str(r["answer"]) for r in recs],
            "generation": gens,
            "answer_mean_nll": st["answer_mean_nll"],
            "answer_prob": np.exp(-st["answer_mean_nll"]),
            "perturbed_mean_nll": st["perturbed_mean_nll"],
            "truth_ratio": R,
            "rougeL_recall": st["rougeL_recall"] if generate else None,
        }
        if "paraphrased_mean_nll" in st:
            ps["paraphrased_mean_nll"] = st["paraphrased_mean_nll"]
        per_sample[name] = ps
        log(f"  {name}: {len(recs)} records in {time.perf_counter() - t0:.1f}s")

    ref = None
    if reference_forget_truth_ratios is not None:
        ref = np.asarray(reference_forget_truth_ratios, dtype=np.float64).ravel()
        if ref.size == 0:
            raise ValueError("reference_forget_truth_ratios is empty")
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
        log(f"  holdout / MIA: {len(hold)} records in {time.perf_counter() - t0:.1f}s")
    elif "forget" in sets:
        notes.append("no holdout set: MIA not computed")
    summary["notes"] = notes
    per_sample["meta"] = {"mia_k": mia_k, "perturbed_mean": perturbed_mean, "generate": bool(generate),
                          "max_new_tokens": int(max_new_tokens), "counts": {k: len(v) for k, v in sets.items()}}
    return summary, per_sample


def reference_forget_truth_ratios(scorer: Scorer, forget_records: Sequence[Mapping[str, Any]],
                                  perturbed_mean: str = "geometric") -> np.ndarray:
    """Raw truth ratios R of a (retain-only reference) model on the forget records (no generation)."""
    _check_set("forget", forget_records)
    para = scorer.answer_mean_nll(forget_records, "paraphrased_answer")
    pert = scorer.perturbed_mean_nll(forget_records)
    return M.truth_ratio(para, pert, perturbed_mean=perturbed_mean)


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
    mia_k: float = 0.2,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """LUME / SemEval-2025 Task 4 evaluation (official ``evaluate_generations.py``).

    Rows (from :func:`simu_jax.data.load_lume`) carry ``id``, ``input``, ``output``, ``task``
    and ``kind`` (``sc``/``qa``, else taken from the id). The model continues ``input`` as
    plain text (no QA template; greedy, ``max_new_tokens`` = 256 as the official script);
    ``sc`` rows score ROUGE-L recall of the continuation against ``output`` (regurgitation),
    ``qa`` rows exact match (knowledge); then :func:`metrics.lume_summary`.

    ``member_docs`` / ``nonmember_docs`` (dicts with ``document``, or strings) give the
    document-level MIA: the official loss attack (mean NLL over all tokens) as ``mia_auc`` /
    ``mia_auc_loss`` and ``mia_score = 1 - 2|AUC - 0.5|``, plus zlib, Min-K% and Min-K%++.
    Documents longer than ``scorer.max_length`` tokens are scored on their start.
    MMLU is not computed here; ``summary["semeval"]`` is :func:`metrics.semeval_final_score`
    without it (flagged incomplete).
    """
    log = log or _noop
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
    if "task_aggregate" in summary:
        summary["semeval"] = M.semeval_final_score(summary["task_aggregate"], mia_s, None)
    summary["notes"] = notes
    per_sample["meta"] = {"mia_k": mia_k, "generate": bool(generate), "max_new_tokens": int(max_new_tokens)}
    return summary, per_sample


# --------------------------------------------------------------------------- output


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The snake_case numeric entries of a summary (what ``summary.json["metrics"]`` holds)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool) and k == k.lower() \
                and " " not in k:
            out[k] = float(v)
    return out


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
    ``per_sample.json`` into ``out_dir``, each via a temporary file and ``os.replace``.

    NaN / inf become ``null``. The non-numeric parts of the summary (TOFU display names,
    ``per_task``, ``notes``, ...) go under ``"details"``; ``extra`` adds top-level keys.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = summary_metrics(summary)
    details = {k: v for k, v in summary.items() if k not in metrics and k != "notes"}
    doc = {"method": method, "metrics": metrics, **extra, "details": details, "notes": list(summary.get("notes", []))}
    _atomic_write_json(out / "per_sample.json", per_sample)
    _atomic_write_json(out / "summary.json", doc)
    return out


def format_summary(summary: Mapping[str, Any]) -> str:
    """A two-column text table of the snake_case metrics (report order first)."""
    from simu_jax.evaluate.report import METRIC_ORDER

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


# --------------------------------------------------------------------------- CLI


def load_model_and_tokenizer(model_dir: str | os.PathLike):
    """``(CausalLM, tokenizer)`` from an HF directory; one-line errors for bad directories."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {path}")
    if not ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        raise FileNotFoundError(
            f"no weights in model directory {path} (expected model.safetensors or model.safetensors.index.json)")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise ValueError(f"no tokenizer files in model directory {path} (expected tokenizer.json or tokenizer.model)")
    from transformers import AutoTokenizer

    from simu_jax.models.convert import load_pretrained

    model = load_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def build_parser(prog: str = "simu-jax evaluate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a model on an unlearning benchmark.")
    p.add_argument("--model", required=True, help="HF model directory (config.json, safetensors, tokenizer)")
    p.add_argument("--benchmark", required=True, choices=("synthetic", "tofu", "lume"))
    p.add_argument("--reference", help="retain-only model directory, for TOFU forget quality (synthetic/tofu)")
    p.add_argument("--data", help="data directory (tofu/ or lume/ folder, or the shared data root); "
                                  "default: the shared data directory")
    p.add_argument("--mia-data", help="LUME: folder with member.jsonl / nonmember.jsonl "
                                      "(default: found under the data root)")
    p.add_argument("--out", help="output directory for summary.json and per_sample.json (default: print only)")
    p.add_argument("--method", help="method name written to summary.json (default: the model directory name)")
    p.add_argument("--limit", type=int, help="evaluate at most N records per set (a seeded random subset)")
    p.add_argument("--no-generate", action="store_true", help="skip greedy generation (no ROUGE / LUME task scores)")
    p.add_argument("--seed", type=int, default=0, help="seed for the --limit subset (default 0)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic benchmark (default 0)")
    p.add_argument("--tofu-split", default="forget10", choices=("forget01", "forget05", "forget10"),
                   help="TOFU forget split; its holdout split is the MIA non-member set (default forget10)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, help="generation length (default: synthetic 64, tofu 200, lume 256)")
    p.add_argument("--max-length", type=int, help="token limit (default: the model's max_position_embeddings)")
    p.add_argument("--buckets", help="comma-separated padded lengths, e.g. 128,512 (default: 32,64,128,...); "
                                     "each batch is padded to the smallest that fits, one compilation per length")
    return p


def _subset(records: list, limit: int | None, seed: int, salt: int) -> list:
    if limit is None or len(records) <= limit:
        return list(records)
    idx = np.sort(np.random.default_rng([seed, salt]).choice(len(records), limit, replace=False))
    return [records[i] for i in idx]


def _tofu_dir(data: str | None) -> Path:
    from simu_jax.data import default_data_dir

    base = Path(data).expanduser() if data else default_data_dir() / "tofu"
    if not base.is_dir():
        raise FileNotFoundError(f"TOFU data directory not found: {base}")
    if not (base / "retain_perturbed.json").is_file() and (base / "tofu").is_dir():
        base = base / "tofu"
    return base


def _load_sets(args) -> dict[str, list]:
    from simu_jax.data import SyntheticConfig, load_tofu, make_synthetic

    if args.benchmark == "synthetic":
        bench = make_synthetic(SyntheticConfig(seed=args.synthetic_seed))
        sets = {"forget": bench.forget, "retain": bench.retain, "general": bench.general, "holdout": bench.holdout}
    else:
        d = _tofu_dir(args.data)
        pct = args.tofu_split[len("forget"):]
        sets = {
            "forget": load_tofu(f"{args.tofu_split}_perturbed", d),
            "retain": load_tofu("retain_perturbed", d),
            "real_authors": load_tofu("real_authors_perturbed", d),
            "world_facts": load_tofu("world_facts_perturbed", d),
            "holdout": load_tofu(f"holdout{pct}", d),
        }
    return {k: _subset(v, args.limit, args.seed, i) for i, (k, v) in enumerate(sets.items())}


def _load_lume(args, notes: list[str]):
    from simu_jax.data import default_data_dir, load_lume, load_mia_documents

    forget = _subset(load_lume("forget", args.data), args.limit, args.seed, 0)
    retain = _subset(load_lume("retain", args.data), args.limit, args.seed, 1)
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
        return forget, retain, None, None
    member = _subset(load_mia_documents("member", mia_src), args.limit, args.seed, 2)
    nonmember = _subset(load_mia_documents("nonmember", mia_src), args.limit, args.seed, 3)
    return forget, retain, member, nonmember


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

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    model_dir = Path(args.model).expanduser()
    ref_dir = Path(args.reference).expanduser() if args.reference else None
    for d in [model_dir] + ([ref_dir] if ref_dir else []):  # fail fast, before the slow loads
        if not d.is_dir():
            raise FileNotFoundError(f"model directory not found: {d}")
    notes: list[str] = []
    if args.benchmark == "lume":
        lume_data = _load_lume(args, notes)
    else:
        sets = _load_sets(args)
    log(f"loading {model_dir}")
    model, tokenizer = load_model_and_tokenizer(model_dir)
    from simu_jax.models.transformer import split_params

    graphdef, params = split_params(model)
    scorer = Scorer(graphdef, params, tokenizer, batch_size=args.batch_size, max_length=args.max_length,
                    buckets=buckets)
    default_new = {"synthetic": 64, "tofu": 200, "lume": 256}[args.benchmark]
    max_new = args.max_new_tokens or default_new

    if args.benchmark == "lume":
        forget, retain, member, nonmember = lume_data
        log(f"evaluating LUME: {len(forget)} forget rows, {len(retain)} retain rows")
        summary, per_sample = evaluate_lume(scorer, forget, retain, member, nonmember, max_new,
                                            generate=not args.no_generate, log=log)
    else:
        ref_R = None
        if ref_dir is not None:
            log(f"reference model {ref_dir}: forget-set truth ratios")
            ref_model, ref_tok = load_model_and_tokenizer(ref_dir)
            rg, rp = split_params(ref_model)
            ref_scorer = Scorer(rg, rp, ref_tok, batch_size=args.batch_size, max_length=args.max_length,
                                buckets=buckets)
            ref_R = reference_forget_truth_ratios(ref_scorer, sets["forget"])
        log(f"evaluating {args.benchmark}: " + ", ".join(f"{k} {len(v)}" for k, v in sets.items()))
        summary, per_sample = evaluate_qa_benchmark(scorer, sets, ref_R, generate=not args.no_generate,
                                                    max_new_tokens=max_new, log=log)
        if ref_R is not None:
            per_sample["reference_forget_truth_ratio"] = ref_R
    summary["notes"] = notes + list(summary.get("notes", []))
    print(format_summary(summary), flush=True)
    if args.out:
        method = args.method or model_dir.resolve().name
        out = write_results(args.out, method, summary, per_sample, benchmark=args.benchmark,
                            model=str(model_dir.resolve()), reference=str(ref_dir.resolve()) if ref_dir else None,
                            settings={"limit": args.limit, "seed": args.seed, "synthetic_seed": args.synthetic_seed,
                                      "max_new_tokens": max_new, "batch_size": args.batch_size,
                                      "generate": not args.no_generate},
                            elapsed_s=round(time.perf_counter() - t_start, 2))
        log(f"wrote {out / 'summary.json'} and {out / 'per_sample.json'}")
    return 0
