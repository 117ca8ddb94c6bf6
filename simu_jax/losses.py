"""Losses for fine-tuning and unlearning, all in float32.

Batches are dicts with `input_ids`, `attention_mask` and `labels` [B, T] (HF convention:
labels[t] is the token at t, -100 where no loss; the shift is done here, logits at t
predict the label at t+1).

Unlearning objectives (minimized):
  GA        -NLL(forget)
  GradDiff  -NLL(forget) + gamma * R(retain)
  NPO       (2/beta) * mean_i softplus(beta * (log pi(y_i|x_i) - log pi_ref(y_i|x_i))) + gamma * R(retain)
            (Zhang et al. 2024, eq. 3: -(2/beta) log sigmoid(-beta log(pi/pi_ref)))
  IdK       NLL(forget questions -> refusal answers) + gamma * R(retain)
where R is the retain NLL, or the KL(pi_ref || pi) on retain tokens (`retain_loss="kl"`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from simu_jax.base import IGNORE_INDEX as IGNORE

F32 = jnp.float32


@dataclass(frozen=True)
class LossSpec:
    """The unlearning objective's hyper-parameters (``loss:`` in an unlearn config; hashable,
    part of the step's jit cache key): ``gamma`` the retain weight, ``beta`` NPO's
    temperature, ``retain_loss`` the retain term R (``nll`` or ``kl`` to the reference),
    ``normalization`` how an NLL term averages its tokens (:data:`NORMALIZATIONS`).

    ``gamma`` and ``normalization`` left unset (None) take the optimizer preset's values
    (:meth:`resolved`; docs/method.md#soul-optimizer): SOUL's for ``preset="soul"``, else 1 and
    ``token``."""

    gamma: float | None = field(default=None, metadata={"range": (0.0, None)})
    beta: float = field(default=0.1, metadata={"range": (0.0, None, "()")})
    retain_loss: Literal["nll", "kl"] = "nll"
    normalization: Literal["token", "sequence"] | None = None

    def resolved(self, objective: str, preset: str | None = None) -> "LossSpec":
        """Unset fields filled for ``objective`` under the optimizer ``preset``; explicit values kept.

        ``soul``: gamma 2 for GradDiff (SOUL ``configs/TOFU/SO_GradDiff.json:15-16``), 5 for
        IdK (SOUL's PO = ``CL+FT``, refusal labels + gamma x retain NLL,
        ``configs/TOFU/SO_PO.json:21-22``, ``src/unlearn/CL.py:36-70``), 1 otherwise (SOUL has
        no TOFU NPO config); normalization ``sequence``. Otherwise gamma 1, ``token``."""
        soul = preset == "soul"
        fill = {}
        if self.gamma is None:
            fill["gamma"] = SOUL_GAMMA.get(objective, 1.0) if soul else 1.0
        if self.normalization is None:
            fill["normalization"] = "sequence" if soul else "token"
        return dataclasses.replace(self, **fill) if fill else self


# How an NLL term of the objective averages over a batch of sequences:
#   token     sum of the token NLLs / number of answer tokens in the batch (HF's causal-LM loss
#             over the whole batch at once)
#   sequence  mean over the batch's sequences of each sequence's token-mean NLL: SOUL's, whose
#             Trainer runs batch_size 1 (configs/TOFU/SO_GradDiff.json:31) x 4 accumulation
#             steps (:13): each micro-batch loss is one sequence's HF loss
#             (src/unlearn/GA.py:49-52, outputs.loss), passed to `accelerator.backward`
#             (src/unlearn/base.py:779), which under the Trainer's gradient accumulation divides
#             it by the 4 steps (Accelerate's behaviour, not read in its source here), and the
#             gradients add up
NORMALIZATIONS = ("token", "sequence")
SOUL_GAMMA = {"graddiff": 2.0, "idk": 5.0}


def next_token_targets(labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The label the logits at each position predict (labels[:, t+1]; IGNORE at the last
    position) and its validity, both [B, T]: the shift is on the labels, so the [B, T, V]
    logits are used unsliced (a `logits[:, :-1]` slice is a copy of them, and its gradient
    a pad of the cotangent)."""
    targets = jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE)], axis=1)
    return targets, targets != IGNORE


def token_logprobs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each next-token label and its validity mask, both [B, T] (the last position
    never valid, see :func:`next_token_targets`).

    log p(y) = z_y - logsumexp(z), z_y picked by a one-hot select: its gradient is elementwise
    and fuses with the softmax's, where a `take_along_axis` of `log_softmax(z)` scatters into a
    zeroed [B, T, V] buffer (the loss gradient alone: 32 -> 8 ms at [8, 128, 4096] on CPU).
    """
    targets, valid = next_token_targets(labels)
    return label_logprobs(logits, targets), valid


def label_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(targets) under ``logits`` [..., V] at each position whose target is not IGNORE,
    0 elsewhere; ``targets`` already aligned with the logits (see :func:`token_logprobs`)."""
    z = logits.astype(F32)
    hit = targets[..., None] == jnp.arange(z.shape[-1])
    picked = jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    return jnp.where(targets != IGNORE, picked - jax.nn.logsumexp(z, axis=-1), 0.0)


def target_nll(logits, targets) -> tuple[jax.Array, jax.Array]:
    """Per-example summed NLL of the ``targets`` (aligned with ``logits`` [B, P, V], IGNORE where
    none) and their count, both [B]."""
    return -jnp.sum(label_logprobs(logits, targets), axis=-1), jnp.sum(targets != IGNORE, axis=-1)


def sequence_nll(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Per-example summed NLL over label tokens and the token count, both [B]."""
    return target_nll(logits, next_token_targets(labels)[0])


def mean_nll_per_example(logits, labels) -> jax.Array:
    """Per-example mean NLL over label tokens [B] (0 for rows without labels, e.g. padding rows)."""
    total, count = sequence_nll(logits, labels)
    return total / jnp.maximum(count, 1)


def reduce_nll(total: jax.Array, count: jax.Array, normalization: str = "token") -> jax.Array:
    """Per-example summed NLLs and token counts [B] averaged under ``normalization``
    (:data:`NORMALIZATIONS`); 0 when no example has a label token.

    token     HF's causal-LM loss over the whole batch: sum(total) / sum(count);
    sequence  SOUL's: the mean over the sequences with at least one label token of each one's
              token-mean NLL (one sequence per micro-batch, micro-batch losses averaged)."""
    if normalization == "token":
        return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)
    if normalization == "sequence":
        real = count > 0
        per_example = total / jnp.maximum(count, 1)
        return jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.maximum(jnp.sum(real), 1)
    raise ValueError(f"normalization={normalization!r}; allowed: {', '.join(NORMALIZATIONS)}")


def nll_term(logits, targets, normalization: str = "token") -> jax.Array:
    """The NLL term of an objective: ``targets`` aligned with ``logits`` (:func:`scored_targets`),
    averaged under ``normalization`` (:func:`reduce_nll`)."""
    return reduce_nll(*target_nll(logits, targets), normalization)


def token_mean_nll(logits, labels) -> jax.Array:
    """Mean NLL over all label tokens of the batch (HF's causal-LM loss). 0 if there are none."""
    return reduce_nll(*sequence_nll(logits, labels), "token")


def token_accuracy(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced argmax hits and label-token count (scalars)."""
    targets, valid = next_token_targets(labels)
    return jnp.sum((jnp.argmax(logits, axis=-1) == targets) & valid), jnp.sum(valid)


def kl_at_targets(logits, ref_logits, targets) -> jax.Array:
    """Mean over the positions with a target (not IGNORE) of KL(p_ref || p) of the next-token
    distributions; ``logits`` and ``ref_logits`` aligned with ``targets``."""
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    logq = jax.nn.log_softmax(ref_logits.astype(F32), axis=-1)
    kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def kl_to_reference(logits, ref_logits, labels) -> jax.Array:
    """Mean over label positions of KL(p_ref || p) of the next-token distributions."""
    return kl_at_targets(logits, ref_logits, next_token_targets(labels)[0])


def npo_term(logits, ref_logits, targets, beta: float) -> jax.Array:
    """NPO over examples with at least one target (padding rows excluded); ``targets`` aligned
    with both logits (:func:`scored_targets`)."""
    nll, count = target_nll(logits, targets)
    ref_nll, _ = target_nll(ref_logits, targets)
    log_ratio = ref_nll - nll  # log pi - log pi_ref
    per_example = (2.0 / beta) * jax.nn.softplus(beta * log_ratio)
    real = count > 0
    return jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.maximum(jnp.sum(real), 1)


def scored_targets(part: dict) -> jax.Array:
    """The targets of one batch part, aligned with the logits a loss gets for it: with a scored
    view (``positions`` / ``targets``, :func:`simu_jax.data.with_scored_positions`) the logits
    are those at ``positions`` [B, P] and the targets ``part["targets"]``; without one, the
    logits at every position and the shifted labels (:func:`next_token_targets`)."""
    if "positions" in part:
        return part["targets"]
    return next_token_targets(part["labels"])[0]


def logit_positions(part: dict) -> jax.Array | None:
    """The positions a loss needs the logits of for this batch part (the model's ``logits_at``):
    the scored view's ``positions``, or None (every position)."""
    return part.get("positions")


UNLEARN_OBJECTIVES = ("ga", "graddiff", "npo", "idk")


def unlearning_loss(
    objective: str,
    logits_fn: Callable[[dict], jax.Array],
    batch: dict,
    *,
    gamma: float = 1.0,
    beta: float = 0.1,
    retain_loss: str = "nll",
    ref_logits_fn: Callable[[dict], jax.Array] | None = None,
    normalization: str = "token",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, terms) for one paired batch {'forget': ..., 'retain': ..., ['forget_idk': ...]}.

    `logits_fn(b)` runs the model being unlearned; `ref_logits_fn(b)` the frozen reference
    (needed by NPO and by the KL retain loss); both return the logits at `logit_positions(b)`
    (all positions when the part has no scored view), scored against `scored_targets(b)`. Terms are returned for logging and NaN reports.
    `normalization` (`token` | `sequence`, see `NORMALIZATIONS`) applies to the NLL terms (GA /
    GradDiff forget, IdK forget, the `nll` retain term); NPO is a mean over sequences and the KL
    retain term a mean over tokens either way.
    """
    if objective not in UNLEARN_OBJECTIVES:
        raise ValueError(f"objective={objective!r}; allowed: {', '.join(UNLEARN_OBJECTIVES)}")
    forget = batch["forget"]
    terms: dict[str, jax.Array] = {}
    if objective == "idk":
        idk = batch["forget_idk"]
        terms["forget"] = nll_term(logits_fn(idk), scored_targets(idk), normalization)
    else:
        forget_logits = logits_fn(forget)
        if objective == "npo":
            ref = jax.lax.stop_gradient(ref_logits_fn(forget))
            terms["forget"] = npo_term(forget_logits, ref, scored_targets(forget), beta)
        else:
            terms["forget"] = -nll_term(forget_logits, scored_targets(forget), normalization)
    loss = terms["forget"]
    if objective != "ga" and gamma > 0:
        retain = batch["retain"]
        retain_logits = logits_fn(retain)
        if retain_loss == "kl":
            ref = jax.lax.stop_gradient(ref_logits_fn(retain))
            terms["retain"] = kl_at_targets(retain_logits, ref, scored_targets(retain))
        elif retain_loss == "nll":
            terms["retain"] = nll_term(retain_logits, scored_targets(retain), normalization)
        else:
            raise ValueError(f"retain_loss={retain_loss!r}; allowed: nll, kl")
        loss = loss + gamma * terms["retain"]
    return loss, terms
