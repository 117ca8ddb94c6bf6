"""Tokenization into fixed-shape numpy arrays, batching, and a small BPE tokenizer.

Conventions (Hugging Face style):

* ``labels[t] = input_ids[t]`` on tokens that carry loss, ``-100`` elsewhere; the
  loss function does the one-token shift.
* Padded lengths are rounded up to a "bucket" (32, 64, 128, ...) so ``jax.jit``
  compiles only a few shapes.
* QA pairs: the prompt and the answer are tokenized separately and their ids
  concatenated, so the answer boundary is exact and the prompt tokens are the same
  ones the model later sees at generation time (:func:`tokenize_prompts`): ``style="split"``.
  The official codebases (TOFU, open-unlearning) tokenize question and answer as one string
  instead, for training and evaluation alike: :func:`tokenize_qa_joint`, which
  ``tokenize_qa(style="tofu" | "open-unlearning")`` calls (``data.tokenization``; the
  default for the synthetic and TOFU benchmarks is ``"tofu"``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from simu_jax.base import IGNORE_INDEX

__all__ = [
    "DEFAULT_BUCKETS",
    "IGNORE_INDEX",
    "TRAIN_BUCKETS",
    "bos_prefix",
    "pad_to_length",
    "scored_positions",
    "scored_width",
    "SPECIAL_TOKENS",
    "sequence_lengths",
    "BatchIterator",
    "QATemplate",
    "batch_iterator",
    "bucket_length",
    "tokenize_prompts",
    "tokenize_qa",
    "tokenize_qa_joint",
    "tokenize_texts",
    "train_bpe_tokenizer",
    "with_scored_positions",
]

DEFAULT_BUCKETS: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
# Padded lengths of training sets: multiples of 16 up to 512 (less padding than powers of two),
# then powers of two.
TRAIN_BUCKETS: tuple[int, ...] = tuple(range(16, 513, 16)) + (1024, 2048, 4096, 8192)


def pad_to_length(arrays: Mapping[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad tokenized arrays ([N, T] input_ids / attention_mask / labels) to ``length``."""
    n, t = arrays["input_ids"].shape
    if t == length:
        return dict(arrays)
    fill = {"input_ids": pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    return {k: np.concatenate([v, np.full((n, length - t), fill[k], v.dtype)], axis=1) for k, v in arrays.items()}


def scored_width(labels: np.ndarray) -> int:
    """The width of a scored view (:func:`scored_positions`) that fits every row of ``labels``
    [N, T]: the most positions with a next-token label in one row, up to a `TRAIN_BUCKETS` width
    (a few shapes), at most T. Computed once for a whole tokenized set, it gives every batch of
    the set one shape (one compiled step)."""
    labels = np.asarray(labels)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(axis=1)
    return min(labels.shape[1], bucket_length(int(counts.max(initial=1)), TRAIN_BUCKETS))


def scored_positions(labels: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The positions whose next token carries a label, left-aligned per row and padded to
    ``width`` (default :func:`scored_width`), and their targets (``labels[t + 1]``; IGNORE on
    the padding, whose position is 0), both int32 [N, width]: a loss needs the logits there
    only (the model's ``logits_at``), a fraction of the [N, T, V] head and loss when the label
    tokens are an answer."""
    labels = np.asarray(labels)
    width = scored_width(labels) if width is None else int(width)
    scored = labels[:, 1:] != IGNORE_INDEX
    most = int(scored.sum(axis=1).max(initial=0))
    if most > width:
        raise ValueError(f"a row has {most} label tokens, more than the scored width {width}")
    positions = np.zeros((labels.shape[0], width), np.int32)
    targets = np.full((labels.shape[0], width), IGNORE_INDEX, np.int32)
    for i, row in enumerate(scored):
        where = np.flatnonzero(row)
        positions[i, : len(where)], targets[i, : len(where)] = where, labels[i, where + 1]
    return positions, targets


def with_scored_positions(part: Mapping[str, np.ndarray], width: int | None = None) -> dict[str, np.ndarray]:
    """``part`` (``input_ids`` / ``attention_mask`` / ``labels`` [B, T]) with its scored view
    ``positions`` and ``targets`` [B, width] (:func:`scored_positions`): the losses then take the
    logits at ``positions`` only (``losses.scored_targets``, ``losses.logit_positions``)."""
    positions, targets = scored_positions(part["labels"], width)
    return {**part, "positions": positions, "targets": targets}


@dataclasses.dataclass(frozen=True)
class QATemplate:
    """How a question/answer pair becomes text (default: TOFU's format).

    ``prompt = question_start + question + question_end + answer_start`` and the
    training text is ``prompt + answer`` (+ EOS token).
    """

    question_start: str = "Question: "
    question_end: str = "\n"
    answer_start: str = "Answer: "

    def prompt(self, question: str) -> str:
        return f"{self.question_start}{question}{self.question_end}{self.answer_start}"

    def text(self, question: str, answer: str) -> str:
        return self.prompt(question) + answer


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket >= ``n``; beyond the largest bucket, the next power of two."""
    for b in sorted(buckets):
        if b >= n:
            return int(b)
    return 1 << max(0, n - 1).bit_length()


# --------------------------------------------------------------------------- helpers


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither a pad nor an eos token")
    return int(pad)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token; pass add_eos=False")
    return int(tokenizer.eos_token_id)


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer adds a BOS token by itself, else ``[]``."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer.encode("a", add_special_tokens=True)
    return [int(bos)] if with_special[:1] == [bos] else []


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _target_length(lengths: Sequence[int], buckets, max_length, pad_to) -> int:
    if pad_to is not None:
        return int(pad_to)
    longest = max(lengths, default=1)
    length = bucket_length(max(longest, 1), buckets)
    return min(length, max_length) if max_length is not None else length


def _truncate(seqs: list[list[int]], limit: int | None, mode: str, what: str, *, keep: str = "start") -> list[list[int]]:
    """Cut sequences to ``limit`` tokens (keeping the start or the end); warn/raise/silent."""
    if mode not in ("warn", "error", "silent"):
        raise ValueError(f"truncation must be 'warn', 'error' or 'silent', got {mode!r}")
    if limit is None:
        return seqs
    too_long = [i for i, s in enumerate(seqs) if len(s) > limit]
    if not too_long:
        return seqs
    longest = max(len(seqs[i]) for i in too_long)
    msg = f"{len(too_long)} {what} longer than {limit} tokens (longest {longest}, first index {too_long[0]})"
    if mode == "error":
        raise ValueError(msg)
    if mode == "warn":
        warnings.warn(msg + f"; truncated (kept the {keep})", stacklevel=3)
    return [s[:limit] if keep == "start" else s[-limit:] for s in seqs]


def _as_question(item: Any, key: str) -> str:
    return item[key] if isinstance(item, Mapping) else str(item)


# --------------------------------------------------------------------------- tokenization


def tokenize_qa(
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    template: QATemplate = QATemplate(),
    max_length: int | None = None,
    answer_key: str = "answer",
    truncation: str = "warn",
    *,
    question_key: str = "question",
    add_eos: bool = True,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_to: int | None = None,
    style: str = "split",
) -> dict[str, np.ndarray]:
    """Tokenize QA records for training/loss evaluation.

    Returns int32 arrays ``input_ids``, ``attention_mask``, ``labels`` of shape [N, T],
    right-padded with the pad id (or EOS). ``T`` is the smallest bucket >= the longest
    sequence (capped at ``max_length``), or ``pad_to`` if given. Sequences longer than
    ``max_length`` (or ``pad_to``) lose their end: a warning by default, ``ValueError`` with
    ``truncation="error"``.

    ``style``: ``"split"`` (prompt and answer encoded apart, ids concatenated; labels cover
    exactly the answer tokens and the EOS token) or an official codebase's joint tokenization,
    ``"tofu"`` / ``"open-unlearning"`` (:func:`tokenize_qa_joint`: TOFU trains and evaluates
    with the same ``convert_raw_data_to_model_format``, so its labels also cover the answer
    tag; ``add_eos`` is then the codebase's own rule).
    """
    if style != "split":
        limit = min((x for x in (max_length, pad_to) if x is not None), default=None)
        return tokenize_qa_joint(tokenizer, records, template, limit, answer_key, style=style,
                                 question_key=question_key, buckets=buckets, pad_to=pad_to, truncation=truncation)
    prefix = bos_prefix(tokenizer)
    eos = [_eos_id(tokenizer)] if add_eos else []
    prompts = _encode(tokenizer, [template.prompt(r[question_key]) for r in records])
    answers = _encode(tokenizer, [str(r[answer_key]) for r in records])
    seqs = [prefix + p + a + eos for p, a in zip(prompts, answers)]
    starts = [len(prefix) + len(p) for p in prompts]

    limit = min((x for x in (max_length, pad_to) if x is not None), default=None)
    seqs = _truncate(seqs, limit, truncation, "QA sequences")
    T = _target_length([len(s) for s in seqs], buckets, max_length, pad_to)

    n = len(seqs)
    input_ids = np.full((n, T), _pad_id(tokenizer), dtype=np.int32)
    attention_mask = np.zeros((n, T), dtype=np.int32)
    labels = np.full((n, T), IGNORE_INDEX, dtype=np.int32)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1
        labels[i, start : len(s)] = s[start:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize_qa_joint(
    tokenizer,
    records: Sequence[Mapping[str, Any]],
    template: QATemplate = QATemplate(),
    max_length: int | None = None,
    answer_key: str = "answer",
    *,
    style: str = "tofu",
    question_key: str = "question",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_to: int | None = None,
    truncation: str = "silent",
) -> dict[str, np.ndarray]:
    """Tokenize QA records the way an official benchmark does, for training and evaluation:
    question and answer encoded as one string (so the seam tokens are the ones the joint text
    gives).

    ``style="tofu"`` (``locuslab/tofu`` ``data_module.py:8-32``
    ``convert_raw_data_to_model_format``): ``new_question = question_start + question +
    question_end``, ``new_answer = answer_start + answer``; ``ids = tokenizer(new_question +
    new_answer, add_special_tokens=True)`` cut to ``max_length``; labels are ``ids + [eos]``
    (``ids`` alone when the cut hit ``max_length``) with the first
    ``len(tokenizer.tokenize(new_question, add_special_tokens=True))`` positions masked, so the
    answer tag, the answer and the EOS are scored.

    ``style="open-unlearning"`` (``src/data/utils.py:92-124`` ``preprocess_chat_instance``):
    ``prompt = template.prompt(question)`` (with the answer tag); ``ids = tokenizer(prompt +
    answer, add_special_tokens=True)`` cut to ``max_length``, EOS appended unless already last;
    the first ``len(tokenizer(prompt, add_special_tokens=True))`` positions masked: the answer
    and the EOS are scored.

    Returns int32 ``input_ids``, ``attention_mask``, ``labels`` [N, T] like :func:`tokenize_qa`
    (right-padded; ``T`` a bucket, or ``pad_to``). The cut at ``max_length`` is silent, as in
    both codebases (``truncation=True``); ``truncation="warn"`` / ``"error"`` report the rows it
    cuts (training: :func:`tokenize_qa`'s rule).

    TOFU pads its inputs with EOS at attention 0 and puts the appended EOS in the labels only;
    here that EOS is an attended input token. The losses agree: the EOS label is predicted
    from the last answer token, and under a causal mask the extra position changes no earlier
    logit.
    """
    if style not in ("tofu", "open-unlearning"):
        raise ValueError(f"style must be 'tofu' or 'open-unlearning', got {style!r}")
    eos = _eos_id(tokenizer)
    seqs, labs = [], []
    # question + answer as one string (TOFU: new_question + new_answer; open-unlearning: prompt +
    # answer), encoded once, cut to max_length keeping the start (both codebases' truncation=True);
    # _truncate also reports the rows it cuts under warn / error
    texts = [template.text(str(r[question_key]), str(r[answer_key])) for r in records]
    full_ids = [list(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]] if texts else []
    for r, ids in zip(records, _truncate(full_ids, max_length, truncation, "QA sequences")):
        q = str(r[question_key])
        if style == "tofu":
            new_question = f"{template.question_start}{q}{template.question_end}"
            n_mask = len(tokenizer.tokenize(new_question, add_special_tokens=True))
            label = list(ids) if max_length is not None and len(ids) == max_length else ids + [eos]
            seq = label if len(label) > len(ids) else ids
        else:
            p_ids = list(tokenizer(template.prompt(q), add_special_tokens=True)["input_ids"])
            if max_length is not None:
                p_ids = p_ids[:max_length]
            if ids[-1] != eos:
                ids = ids + [eos]
            n_mask = len(p_ids)
            seq = label = ids
        label = [IGNORE_INDEX] * min(n_mask, len(label)) + label[n_mask:]
        seqs.append(seq)
        labs.append(label)
    T = _target_length([len(s) for s in seqs], buckets, None, pad_to)
    if any(len(s) > T for s in seqs):
        raise ValueError(f"QA sequences longer than pad_to={T}")
    n = len(seqs)
    input_ids = np.full((n, T), _pad_id(tokenizer), dtype=np.int32)
    attention_mask = np.zeros((n, T), dtype=np.int32)
    labels = np.full((n, T), IGNORE_INDEX, dtype=np.int32)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1
        labels[i, : len(lab)] = lab
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def tokenize_prompts(
    tokenizer,
    questions: Sequence[str | Mapping[str, Any]],
    template: QATemplate = QATemplate(),
    *,
    max_length: int | None = None,
    truncation: str = "warn",
    question_key: str = "question",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Left-padded prompts (``input_ids``, ``attention_mask``, int32 [N, T]) for generation.

    ``questions`` are strings or records with a ``question`` key. Over-long prompts
    keep their *end* (so they still finish with ``answer_start``).
    """
    prefix = bos_prefix(tokenizer)
    seqs = [prefix + p for p in _encode(tokenizer, [template.prompt(_as_question(q, question_key)) for q in questions])]
    limit = min((x for x in (max_length, pad_to) if x is not None), default=None)
    seqs = _truncate(seqs, limit, truncation, "prompts", keep="end")
    T = _target_length([len(s) for s in seqs], buckets, max_length, pad_to)

    input_ids = np.full((len(seqs), T), _pad_id(tokenizer), dtype=np.int32)
    attention_mask = np.zeros((len(seqs), T), dtype=np.int32)
    for i, s in enumerate(seqs):
        if s:
            input_ids[i, T - len(s) :] = s
            attention_mask[i, T - len(s) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def tokenize_texts(
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    *,
    add_eos: bool = False,
    truncation: str = "silent",
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_to: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize plain documents (e.g. for MIA): right-padded, labels on every real token.

    Documents longer than ``max_length`` are cut at the end, silently by default
    (``truncation="warn"``/``"error"`` to be told).
    """
    prefix = bos_prefix(tokenizer)
    eos = [_eos_id(tokenizer)] if add_eos else []
    seqs = [prefix + ids + eos for ids in _encode(tokenizer, list(texts))]
    limit = min((x for x in (max_length, pad_to) if x is not None), default=None)
    seqs = _truncate(seqs, limit, truncation, "texts")
    T = _target_length([len(s) for s in seqs], buckets, max_length, pad_to)

    n = len(seqs)
    input_ids = np.full((n, T), _pad_id(tokenizer), dtype=np.int32)
    attention_mask = np.zeros((n, T), dtype=np.int32)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# --------------------------------------------------------------------------- batching


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Deterministic, resumable iterator over fixed-size batches of row-aligned arrays.

    Epoch ``e`` visits the rows in the order ``default_rng([seed, e]).permutation(N)``
    (or ``0..N-1`` without shuffling), independent of earlier epochs, so the position
    ``(epoch, index)`` (``index`` = batch number within the epoch) fully determines
    what comes next: save :meth:`state_dict`, later :meth:`load_state_dict` (or pass
    ``start``) and the run continues exactly.

    A short last batch is filled up with padding rows: ``labels`` = -100, other keys 0
    (``input_ids`` = ``pad_id``), in particular ``attention_mask`` = 0. Shapes never
    change. With ``drop_remainder=True`` the short batch is skipped instead.

    Length grouping (``group_by_length=True``, like Hugging Face Trainer's
    ``group_by_length``): the epoch's permutation is cut into chunks of ``group_chunk``
    batches, each chunk is sorted by sequence length (longest first, stable), cut into
    batches, and the order of all the epoch's batches is shuffled with the same seeded
    generator. Every row is still visited exactly once per epoch, and batches hold rows of
    similar length. Only the epoch's last chunk can leave a short batch (padded as above,
    or dropped with ``drop_remainder``). Without ``shuffle`` the rows keep their order
    before the sort and the batches are not shuffled (``group_chunk`` >= the number of
    batches then sorts the whole set: useful for evaluation).

    Trimming (``trim_buckets``, a sequence of lengths): each batch's sequence axis (axis 1
    of the 2-D+ arrays) is cut to ``bucket_length(longest row in the batch, trim_buckets)``,
    never beyond the arrays' width, so a batch has one of a few shapes and no real token is
    ever cut. Row lengths come from ``lengths`` or else from ``attention_mask`` (last
    non-zero position + 1, so left-padded rows are never trimmed). Both options change
    only which rows form a batch and its width; the position ``(epoch, index)`` still
    determines everything, so :meth:`state_dict` resumes exactly.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        epochs: int | None = None,
        drop_remainder: bool = False,
        start: tuple[int, int] | Mapping[str, int] | None = None,
        pad_id: int = 0,
        group_by_length: bool = False,
        group_chunk: int = 50,
        trim_buckets: Sequence[int] | None = None,
        lengths: np.ndarray | None = None,
    ):
        if not arrays:
            raise ValueError("arrays is empty")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: v.shape[0] for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays have different numbers of rows: {sizes}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.num_rows = next(iter(sizes.values()))
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.epochs = epochs
        self.drop_remainder = drop_remainder
        self.pad_id = pad_id
        if drop_remainder:
            self.steps_per_epoch = self.num_rows // self.batch_size
        else:
            self.steps_per_epoch = math.ceil(self.num_rows / self.batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"no batches: {self.num_rows} rows, batch_size {self.batch_size}, drop_remainder={drop_remainder}"
            )
        if group_chunk < 1:
            raise ValueError("group_chunk must be >= 1")
        self.group_by_length = bool(group_by_length)
        self.group_chunk = int(group_chunk)
        self.trim_buckets = tuple(int(b) for b in trim_buckets) if trim_buckets is not None else None
        self.lengths = None
        if self.group_by_length or self.trim_buckets is not None:
            if lengths is None:
                if "attention_mask" not in self.arrays:
                    raise ValueError("group_by_length / trim_buckets need `lengths` or an 'attention_mask' array")
                lengths = sequence_lengths(self.arrays["attention_mask"])
            self.lengths = np.asarray(lengths, dtype=np.int64)
            if self.lengths.shape != (self.num_rows,):
                raise ValueError(f"lengths has shape {self.lengths.shape}, expected ({self.num_rows},)")
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = -1, None
        self._batches_epoch, self._batches = -1, None
        if start is not None:
            self.load_state_dict(start if isinstance(start, Mapping) else {"epoch": start[0], "index": start[1]})

    @property
    def position(self) -> tuple[int, int]:
        """``(epoch, index)`` of the next batch."""
        return self.epoch, self.index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if "seed" in state and int(state["seed"]) != self.seed:
            raise ValueError(f"state was saved with seed {state['seed']}, iterator has seed {self.seed}")
        if epoch < 0 or not 0 <= index < self.steps_per_epoch:
            raise ValueError(f"invalid position {(epoch, index)} (steps_per_epoch={self.steps_per_epoch})")
        self.epoch, self.index = epoch, index

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def _pad_value(self, key: str) -> int:
        return {"labels": IGNORE_INDEX, "input_ids": self.pad_id}.get(key, 0)

    def __iter__(self) -> "BatchIterator":
        return self

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The row indices of every batch of ``epoch``, in order (``steps_per_epoch`` of them)."""
        if self._batches_epoch != epoch:
            order = self._epoch_order(epoch)
            bs = self.batch_size
            if not self.group_by_length:
                batches = [order[i * bs : (i + 1) * bs] for i in range(self.steps_per_epoch)]
            else:
                chunk = self.group_chunk * bs
                batches = []
                for s in range(0, self.num_rows, chunk):
                    part = order[s : s + chunk]
                    part = part[np.argsort(-self.lengths[part], kind="stable")]
                    batches.extend(part[i : i + bs] for i in range(0, len(part), bs))
                if self.drop_remainder:
                    batches = [b for b in batches if len(b) == bs]
                if self.shuffle:
                    # a generator of its own per epoch (not the row permutation's), so the
                    # row order above is exactly the ungrouped one
                    perm = np.random.default_rng([self.seed, epoch, 1]).permutation(len(batches))
                    batches = [batches[i] for i in perm]
                assert len(batches) == self.steps_per_epoch
            self._batches_epoch, self._batches = epoch, batches
        return self._batches

    def batch_width(self, rows: np.ndarray) -> int:
        """The sequence length a batch of ``rows`` is trimmed to (the full width without trimming)."""
        widths = {v.shape[1] for v in self.arrays.values() if v.ndim >= 2}
        full = max(widths) if widths else 0
        if self.trim_buckets is None or not widths:
            return full
        longest = int(self.lengths[rows].max()) if len(rows) else 1
        return min(bucket_length(max(longest, 1), self.trim_buckets), full)

    def epoch_widths(self, epoch: int = 0) -> np.ndarray:
        """The sequence length of each batch of ``epoch`` (what :meth:`__next__` returns)."""
        return np.asarray([self.batch_width(rows) for rows in self.epoch_batches(epoch)], dtype=np.int64)

    def __next__(self) -> dict[str, np.ndarray]:
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        rows = self.epoch_batches(self.epoch)[self.index]
        width = self.batch_width(rows) if self.trim_buckets is not None else None
        batch = {}
        for key, value in self.arrays.items():
            part = value[rows]
            if width is not None and value.ndim >= 2:
                part = part[:, :width]
            if len(rows) < self.batch_size:
                filler = np.full((self.batch_size - len(rows),) + part.shape[1:], self._pad_value(key), value.dtype)
                part = np.concatenate([part, filler])
            batch[key] = part
        self.index += 1
        if self.index == self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return batch


def batch_iterator(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    epochs: int | None = None,
    drop_remainder: bool = False,
    start: tuple[int, int] | Mapping[str, int] | None = None,
    pad_id: int = 0,
    group_by_length: bool = False,
    group_chunk: int = 50,
    trim_buckets: Sequence[int] | None = None,
    lengths: np.ndarray | None = None,
) -> BatchIterator:
    """A :class:`BatchIterator` (``epochs=None`` = endless; ``start=(epoch, index)`` resumes;
    ``group_by_length`` / ``trim_buckets``: length-grouped batches trimmed to a bucket)."""
    return BatchIterator(
        arrays, batch_size, seed=seed, shuffle=shuffle, epochs=epochs,
        drop_remainder=drop_remainder, start=start, pad_id=pad_id,
        group_by_length=group_by_length, group_chunk=group_chunk, trim_buckets=trim_buckets, lengths=lengths,
    )


def sequence_lengths(attention_mask: np.ndarray) -> np.ndarray:
    """Per row, the last position with a non-zero mask + 1 (0 for an all-zero row): the
    width a right-padded row can be cut to without losing a real token."""
    m = np.asarray(attention_mask) != 0
    if m.ndim != 2:
        raise ValueError(f"attention_mask must be [N, T], got shape {m.shape}")
    t = m.shape[1]
    return np.where(m.any(axis=1), t - np.argmax(m[:, ::-1], axis=1), 0).astype(np.int64)


# --------------------------------------------------------------------------- BPE tokenizer

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def train_bpe_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1024,
    *,
    min_frequency: int = 2,
    add_bos: bool = True,
    model_max_length: int | None = None,
):
    """Train a byte-level BPE tokenizer on ``texts`` and save it to ``out_dir``.

    Special tokens: ``<pad>`` (id 0), ``<s>`` (bos, 1), ``</s>`` (eos, 2), ``<unk>`` (3).
    With ``add_bos`` the tokenizer prepends ``<s>`` when ``add_special_tokens=True``.
    Byte-level, so any text encodes. The result is deterministic for the same texts and
    loads with ``transformers.AutoTokenizer.from_pretrained(out_dir)``; it is returned too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )

    kwargs = {"model_max_length": model_max_length} if model_max_length is not None else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>", **kwargs
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    # Name the generic fast class so older transformers (v4) load the directory as well.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return fast
