"""Batched, jit-compiled scoring of one model and tokenizer: :class:`Scorer`.

Every batch has the same number of rows (the last one is filled up with copies of its last
row, whose outputs are dropped) and a bucketed length, so XLA compiles one program per
(bucket, kind of pass), not one per batch. The metrics built on these statistics are in
:mod:`simu_jax.evaluate.runner` (suites) and :mod:`simu_jax.evaluate.metrics` (formulas).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simu_jax.base import pad_token_id
from simu_jax.data.tokenize import DEFAULT_BUCKETS, QATemplate, bos_prefix, tokenize_prompts, tokenize_qa, tokenize_texts
from simu_jax.losses import token_logprobs as label_logprobs
from simu_jax.models.transformer import apply, merge_params

__all__ = ["PLAIN_TEMPLATE", "Scorer"]

PLAIN_TEMPLATE = QATemplate(question_start="", question_end="", answer_start="")  # prompt = the text itself


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
    logp, valid = label_logprobs(logits, labels)
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
        pad = pad_token_id(tokenizer)
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
        prefix = 1 if bos_prefix(self.tokenizer) else 0
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
        return self._generate(prompts, PLAIN_TEMPLATE, max_new_tokens)


# --------------------------------------------------------------------------- QA benchmarks
