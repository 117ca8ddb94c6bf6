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
from simu_jax.data.tokenize import (DEFAULT_BUCKETS, QATemplate, bos_prefix, tokenize_prompts, tokenize_qa,
                                    tokenize_qa_joint, tokenize_texts)
from simu_jax.evaluate.protocol import Protocol, get_protocol
from simu_jax.losses import next_token_targets
from simu_jax.losses import token_logprobs as label_logprobs
from simu_jax.models.transformer import apply, merge_params

__all__ = ["PLAIN_TEMPLATE", "Scorer"]

PLAIN_TEMPLATE = QATemplate(question_start="", question_end="", answer_start="")  # prompt = the text itself


# --------------------------------------------------------------------------- jit-compiled passes


@functools.partial(jax.jit, static_argnames=("graphdef", "with_stats"))
def _label_pass(graphdef, params, input_ids, attention_mask, labels, with_stats=False):
    """Per-example answer statistics from one forward pass (labels -100 = not scored).

    Returns ``mean_nll`` [B] (0 where no label), ``count`` [B] label tokens, ``hits`` [B]
    teacher-forced argmax hits; with ``with_stats`` also ``logp``/``valid`` [B, T] and the
    Min-K%++ moments ``mu``/``sigma`` [B, T] of the next-token distribution, computed here so
    that the [B, T, V] logits never leave the device.
    """
    logits = apply(graphdef, params, input_ids, attention_mask)
    logp, valid = label_logprobs(logits, labels)
    count = jnp.sum(valid, axis=-1)
    out = {
        "mean_nll": -jnp.sum(logp, axis=-1) / jnp.maximum(count, 1),
        "count": count,
        "hits": jnp.sum((jnp.argmax(logits, axis=-1) == next_token_targets(labels)[0]) & valid, axis=-1),
    }
    if with_stats:
        lsm = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        p = jnp.exp(lsm)
        mu = jnp.sum(p * lsm, axis=-1)
        var = jnp.sum(p * lsm * lsm, axis=-1) - mu * mu
        out.update(logp=logp, valid=valid, mu=mu, sigma=jnp.sqrt(jnp.maximum(var, 0.0)))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "p"))
def _grad_norm(graphdef, params, input_ids, attention_mask, labels, p=2.0):
    """Mean over the HF parameter tensors (a stacked ``layers`` leaf counts once per layer) of
    the p-norm of the gradient of the mean label-token NLL of one row."""

    def loss(prm):
        logp, valid = label_logprobs(apply(graphdef, prm, input_ids, attention_mask), labels)
        return -jnp.sum(logp) / jnp.maximum(jnp.sum(valid), 1)

    grads = jax.grad(loss)(params)
    norms = []
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g = g.astype(jnp.float32)
        stacked = any(getattr(k, "key", None) == "layers" for k in path)
        flat = g.reshape(g.shape[0], -1) if stacked else g.reshape(1, -1)
        if p == float("inf"):
            n = jnp.max(jnp.abs(flat), axis=1)
        elif p == 1.0:
            n = jnp.sum(jnp.abs(flat), axis=1)
        else:
            n = jnp.sqrt(jnp.sum(flat * flat, axis=1))
        norms.append(n)
    return jnp.mean(jnp.concatenate(norms))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _last_logits_pass(graphdef, params, input_ids, attention_mask, token_ids):
    """[B, C]: the logits of ``token_ids`` [C] at the last position of left-padded rows (the head
    runs on that position only)."""
    last = jnp.full((input_ids.shape[0], 1), input_ids.shape[1] - 1, jnp.int32)
    return apply(graphdef, params, input_ids, attention_mask, logits_at=last)[:, 0, :][:, token_ids]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hit_pass(graphdef, params, input_ids, attention_mask, labels):
    """[B, T-1]: teacher-forced argmax == next label (False where no label)."""
    logits = apply(graphdef, params, input_ids, attention_mask)
    return (jnp.argmax(logits[:, :-1], axis=-1) == labels[:, 1:]) & (labels[:, 1:] != -100)


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
        protocol: whose tokenization scored QA sequences follow and how label texts are taken
            (:mod:`simu_jax.evaluate.protocol`; default ``"simu"``: prompt and answer encoded
            apart, answer + EOS scored). ``"tofu"`` / ``"open-unlearning"``: joint tokenization
            (:func:`simu_jax.data.tokenize.tokenize_qa_joint`) capped at the protocol's length.
        dtype: the parameter dtype to score and generate in: ``"protocol"`` (default: the
            protocol's, bfloat16 under ``tofu`` as TOFU runs its models), ``None`` (the model's
            own) or a name (``"float32"``, ``"bfloat16"``). Logits are float32 either way.
        mesh: the device mesh ``params`` are laid out on (sharded, several processes included).
            Every batch is then placed as global arrays with its rows over the mesh's batch axes
            (:func:`simu_jax.sharding.place_batch`: replicated when the rows do not divide them)
            and every output is gathered to each host (:func:`simu_jax.sharding.to_host`), so
            all processes take part in each pass and get the same numbers; every process must
            make the same calls. The parameters stay where they are (cast in place under
            ``dtype``). Without a mesh, one device.

    Rows are processed longest-first so a batch holds rows of similar length; outputs come
    back in input order.
    """

    def __init__(self, graphdef, params, tokenizer, template: QATemplate = QATemplate(), batch_size: int = 16,
                 max_length: int | None = None, buckets: Sequence[int] = DEFAULT_BUCKETS,
                 protocol: str | Protocol = "simu", dtype: str | None = "protocol", mesh=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.graphdef = graphdef
        self.tokenizer = tokenizer
        self.template = template
        self.protocol = get_protocol(protocol)
        self.dtype = self.protocol.dtype if dtype == "protocol" else dtype
        if self.dtype is not None:
            try:
                dt = jnp.dtype(self.dtype)
            except TypeError:
                raise ValueError(f"dtype must be a floating dtype name such as 'bfloat16', got {self.dtype!r}") from None
            params = jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
        self.params = params
        self.mesh = mesh
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

    # ----------------------------------------------------------------- placement

    def _put(self, arrays: Mapping[str, np.ndarray], *keys: str) -> tuple:
        """The host arrays ``arrays[k]`` (rows first) on the devices: one device, or on the mesh
        with the rows over its batch axes."""
        if self.mesh is None:
            return tuple(jnp.asarray(arrays[k]) for k in keys)
        from simu_jax.sharding import place_batch

        placed = place_batch({k: np.asarray(arrays[k]) for k in keys}, self.mesh)
        return tuple(placed[k] for k in keys)

    def _host(self, tree):
        """A pass's outputs as numpy arrays (on a mesh: gathered from every process's devices)."""
        if self.mesh is None:
            return jax.device_get(tree)
        from simu_jax.sharding import to_host

        return to_host(tree)

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
            out = self._host(_label_pass(self.graphdef, self.params,
                                         *self._put(arrays, "input_ids", "attention_mask", "labels"),
                                         with_stats=with_stats))
            for j, i in enumerate(idx):
                rows[i] = {k: np.asarray(v[j]) for k, v in out.items()}
        return rows  # type: ignore[return-value]

    def _qa_rows(self, records: Sequence[Mapping[str, Any]], answer_key: str, with_stats: bool):
        records = list(records)
        for r in records:
            if answer_key not in r or r[answer_key] is None:
                raise ValueError(f"record without {answer_key!r}: question={str(r.get('question'))[:60]!r}")

        encode = functools.partial(self._encode_qa, records, answer_key)
        lengths = [len(str(r["question"])) + len(str(r[answer_key])) for r in records]
        return self._labelled(len(records), lengths, encode, with_stats)

    def _qa_limit(self) -> int:
        cap = self.protocol.qa_max_length
        return min(self.max_length, int(cap)) if cap is not None else self.max_length

    def _encode_qa(self, records, answer_key: str, idx) -> dict[str, np.ndarray]:
        """Tokenized rows ``idx`` of ``records`` under the protocol's QA tokenization."""
        rows = [records[i] for i in idx]
        if self.protocol.tokenization == "split":
            return tokenize_qa(self.tokenizer, rows, self.template, max_length=self._qa_limit(),
                               answer_key=answer_key, buckets=self.buckets)
        return tokenize_qa_joint(self.tokenizer, rows, self.template, max_length=self._qa_limit(),
                                 answer_key=answer_key, style=self.protocol.tokenization, buckets=self.buckets)

    def label_texts(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer") -> list[str]:
        """The decoded scored (label) tokens of each record, special tokens skipped: what
        open-unlearning compresses for zlib (``extract_target_texts_from_processed_data``)."""
        records = list(records)
        if not records:
            return []
        arr = self._encode_qa(records, answer_key, np.arange(len(records)))
        return [self.tokenizer.decode([int(t) for t in lab[lab != -100]], skip_special_tokens=True)
                for lab in arr["labels"]]

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

    def answer_scores(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer") -> dict[str, np.ndarray]:
        """``{"mean_nll": [N], "count": [N]}``: :meth:`answer_mean_nll` and the number of scored
        tokens (TOFU's ``num_token_gt``)."""
        if not records:
            return {"mean_nll": np.zeros((0,), np.float64), "count": np.zeros((0,), np.int64)}
        rows = self._qa_rows(records, answer_key, with_stats=False)
        return {"mean_nll": self._mean_nll(rows), "count": np.array([int(r["count"]) for r in rows], np.int64)}

    def perturbed_scores(self, records: Sequence[Mapping[str, Any]], key: str = "perturbed_answer") -> dict[str, np.ndarray]:
        """``{"mean_nll": [N, K], "count": [N, K]}`` of the K perturbed answers (TOFU's
        ``average_perturb_loss`` and ``num_token_perturb``)."""
        flat, k = self._flat_perturbed(records, key)
        if not records:
            return {"mean_nll": np.zeros((0, 0), np.float64), "count": np.zeros((0, 0), np.int64)}
        sc = self.answer_scores(flat)
        return {"mean_nll": sc["mean_nll"].reshape(len(records), k), "count": sc["count"].reshape(len(records), k)}

    @staticmethod
    def _flat_perturbed(records, key):
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
        return flat, (ks.pop() if ks else 0)

    def perturbed_mean_nll(self, records: Sequence[Mapping[str, Any]], key: str = "perturbed_answer") -> np.ndarray:
        """[N, K] mean NLL of each of the K perturbed answers (``record[key]``, a list).

        All records must have the same K (TOFU: 5 on forget/retain, 3-4 elsewhere).
        """
        flat, k = self._flat_perturbed(records, key)
        if not records:
            return np.zeros((0, 0), np.float64)
        return self.answer_mean_nll(flat).reshape(len(records), k)

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
        "texts", "mean_nll": [N]}``: the stats mapping :func:`mia.mia_aucs` takes. ``texts`` (for
        zlib) are the answers, or under a protocol with ``zlib_text="labels"`` the decoded label
        tokens (:meth:`label_texts`).
        """
        rows = self._qa_rows(records, answer_key, with_stats=True)
        if self.protocol.zlib_text == "labels":
            texts = self.label_texts(records, answer_key)
        else:
            texts = [str(r[answer_key]) for r in records]
        return self._stats(rows, texts, with_stats)

    def token_hits(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer") -> list[np.ndarray]:
        """Per row, a bool array over its label tokens without the last (the EOS prediction):
        whether the teacher-forced argmax is the label. The input of
        :func:`metrics.exact_memorization` / :func:`metrics.extraction_strength` (open-unlearning
        ``tokenwise_vocab_logprobs``, ``src/evals/metrics/utils.py:149-190``)."""
        records = list(records)
        out: list[np.ndarray | None] = [None] * len(records)
        for idx in self._batches([len(str(r["question"])) + len(str(r[answer_key])) for r in records]):
            arrays = _fill_rows(self._encode_qa(records, answer_key, idx), self.batch_size)
            hit = np.asarray(self._host(_hit_pass(self.graphdef, self.params,
                                                  *self._put(arrays, "input_ids", "attention_mask", "labels"))))
            valid = arrays["labels"][:, 1:] != -100
            for j, i in enumerate(idx):
                h = hit[j][valid[j]]
                out[i] = h[:-1].astype(bool)
        return out  # type: ignore[return-value]

    def grad_norms(self, records: Sequence[Mapping[str, Any]], answer_key: str = "answer", p: float = 2.0) -> np.ndarray:
        """[N] GradNorm attack statistic (open-unlearning ``mia/gradnorm.py:19-34``, one row at a
        time): the mean over parameter tensors of the p-norm (1, 2 or inf) of the gradient of
        the row's mean NLL over its label tokens without the last (``tokenwise_logprobs``)."""
        p = float(p)
        if p not in (1.0, 2.0, float("inf")):
            raise ValueError(f"p must be 1, 2 or inf, got {p}")
        out = []
        for i in range(len(records)):
            arrays = self._encode_qa(records, answer_key, [i])
            lab = arrays["labels"].copy()
            pos = np.nonzero(lab[0] != -100)[0]
            if pos.size:
                lab[0, pos[-1]] = -100  # drop the EOS prediction
            out.append(float(self._host(_grad_norm(self.graphdef, self.params,
                                                   *self._put({**arrays, "labels": lab}, "input_ids",
                                                              "attention_mask", "labels"), p=p))))
        return np.asarray(out, dtype=np.float64)

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

    def next_token_logits(self, prompts: Sequence[str], token_ids: Sequence[int]) -> np.ndarray:
        """[N, C] float32 logits of the candidate ``token_ids`` as the next token after each plain-text
        prompt (BOS first when the tokenizer adds one, as ``tokenizer(prompt)``; left-padded; a
        prompt over ``max_length`` tokens keeps its end, with a warning)."""
        prompts = [str(p) for p in prompts]
        cand = np.asarray(token_ids, np.int32)  # the same on every process: replicated
        out = np.zeros((len(prompts), len(token_ids)), np.float32)
        for idx in self._batches([len(p) for p in prompts]):
            enc = _fill_rows(tokenize_prompts(self.tokenizer, [prompts[i] for i in idx], PLAIN_TEMPLATE,
                                              max_length=self.max_length, buckets=self.buckets), self.batch_size)
            logits = np.asarray(self._host(_last_logits_pass(
                self.graphdef, self.params, *self._put(enc, "input_ids", "attention_mask"), cand)))
            out[idx] = logits[: len(idx)]
        return out

    # ----------------------------------------------------------------- generation

    def _generate(self, prompts: Sequence[Any], template: QATemplate, max_new_tokens: "int | Sequence[int]") -> list[str]:
        from simu_jax.models.generate import generate

        prompts = list(prompts)
        if not prompts:
            return []
        if isinstance(max_new_tokens, (int, np.integer)):
            budgets = [int(max_new_tokens)] * len(prompts)
            if budgets[0] < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        else:  # one budget per row (<= 0: nothing generated)
            budgets = [int(b) for b in max_new_tokens]
            if len(budgets) != len(prompts):
                raise ValueError(f"{len(budgets)} token budgets for {len(prompts)} prompts")
        most = max(max(budgets), 1)
        limit = self.max_length - most if self.max_length > most else self.max_length
        texts = [p["question"] if isinstance(p, Mapping) else str(p) for p in prompts]
        out: list[str | None] = [""] * len(texts)
        todo = [i for i, b in enumerate(budgets) if b >= 1]
        for part in self._batches([len(texts[i]) for i in todo]):
            idx = [todo[k] for k in part]
            # every batch generates the set's longest budget (one compiled program per prompt
            # bucket; the loop stops once all rows are done) and each row is cut to its own
            new_tokens = most
            enc = tokenize_prompts(self.tokenizer, [texts[i] for i in idx], template, max_length=limit,
                                   buckets=self.buckets)
            enc = _fill_rows(enc, self.batch_size)
            new = np.asarray(self._host(generate(
                (self.graphdef, self.params), *self._put(enc, "input_ids", "attention_mask"),
                max_new_tokens=new_tokens, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)))
            for j, i in enumerate(idx):
                out[i] = self._decode(new[j][: budgets[i]])
        return out  # type: ignore[return-value]

    def _decode(self, ids: np.ndarray) -> str:
        """Generated ids up to the first EOS as text: special tokens skipped, surrounding whitespace
        stripped; under a protocol with ``clean_up_spaces`` (``semeval``) HF's
        ``clean_up_tokenization`` is applied, as ``decode(..., clean_up_tokenization_spaces=True)``
        did in transformers 4.x for every tokenizer (transformers 5 skips it for BPE ones)."""
        ids = [int(t) for t in ids]
        if self.eos_token_id is not None and self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        if self.protocol.clean_up_spaces:
            text = self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
            return self.tokenizer.clean_up_tokenization(text).strip()
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generation_template(self, prompt: str | None = None) -> QATemplate:
        """The template generation prompts use: the QA template, or with ``prompt="question"``
        (TOFU's ``run_generation``) the same without the answer tag."""
        prompt = self.protocol.generation_prompt if prompt is None else prompt
        if prompt == "question":
            return QATemplate(self.template.question_start, self.template.question_end, "")
        if prompt != "prompt":
            raise ValueError(f"prompt must be 'prompt' or 'question', got {prompt!r}")
        return self.template

    def prompt_lengths(self, records: Sequence[Mapping[str, Any] | str], prompt: str | None = None) -> list[int]:
        """Token length (with BOS) of each generation prompt."""
        t = self.generation_template(prompt)
        qs = [r["question"] if isinstance(r, Mapping) else str(r) for r in records]
        if not qs:
            return []
        n = len(bos_prefix(self.tokenizer))
        return [n + len(ids) for ids in self.tokenizer([t.prompt(q) for q in qs], add_special_tokens=False)["input_ids"]]

    def generation_budgets(self, records: Sequence[Mapping[str, Any] | str], total: int, group: int | None = None,
                           max_new_tokens: int | None = None, prompt: str | None = None) -> list[int]:
        """New-token budget of each row under a *total* length budget (HF ``generate(max_length=total)``
        on left-padded batches): ``total`` minus the longest prompt among the ``group`` consecutive
        rows the row is batched with (``group=None``: its own prompt), capped at ``max_new_tokens``."""
        lengths = self.prompt_lengths(records, prompt)
        g = int(group) if group else 1
        out = []
        for i in range(len(lengths)):
            s = (i // g) * g
            b = int(total) - max(lengths[s:s + g])
            out.append(min(b, int(max_new_tokens)) if max_new_tokens is not None else b)
        return out

    def generate_answers(self, records: Sequence[Mapping[str, Any] | str], max_new_tokens: "int | Sequence[int]" = 200,
                         prompt: str | None = None) -> list[str]:
        """Greedy answers to the questions (records or strings) under the QA template.

        ``max_new_tokens``: one budget, or one per row (:meth:`generation_budgets`; a row with a
        budget <= 0 gets ``""``). ``prompt``: ``"prompt"`` (with the answer tag) or ``"question"``
        (without); default the protocol's. Decoded up to the first EOS, special tokens skipped,
        surrounding whitespace stripped.
        """
        return self._generate(records, self.generation_template(prompt), max_new_tokens)

    def generate_continuations(self, prompts: Sequence[str], max_new_tokens: int = 256) -> list[str]:
        """Greedy continuations of plain-text prompts (no template; LUME / SemEval style)."""
        return self._generate(prompts, PLAIN_TEMPLATE, max_new_tokens)


# --------------------------------------------------------------------------- QA benchmarks
