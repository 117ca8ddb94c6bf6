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
    temperature, ``retain_loss`` the retain term R (``nll`` or ``kl`` to the reference)."""

    gamma: float = field(default=1.0, metadata={"range": (0.0, None)})
    beta: float = field(default=0.1, metadata={"range": (0.0, None, "()")})
    retain_loss: Literal["nll", "kl"] = "nll"


def token_logprobs(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each next-token label and its validity mask, both [B, T-1]."""
    logits = logits[:, :-1].astype(F32)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, picked, 0.0), valid


def sequence_nll(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Per-example summed NLL over label tokens and the token count, both [B]."""
    logp, valid = token_logprobs(logits, labels)
    return -jnp.sum(logp, axis=-1), jnp.sum(valid, axis=-1)


def mean_nll_per_example(logits, labels) -> jax.Array:
    """Per-example mean NLL over label tokens [B] (0 for rows without labels, e.g. padding rows)."""
    total, count = sequence_nll(logits, labels)
    return total / jnp.maximum(count, 1)


def token_mean_nll(logits, labels) -> jax.Array:
    """Mean NLL over all label tokens of the batch (HF's causal-LM loss). 0 if there are none."""
    total, count = sequence_nll(logits, labels)
    return jnp.sum(total) / jnp.maximum(jnp.sum(count), 1)


def token_accuracy(logits, labels) -> tuple[jax.Array, jax.Array]:
    """Teacher-forced argmax hits and label-token count (scalars)."""
    pred = jnp.argmax(logits[:, :-1], axis=-1)
    targets = labels[:, 1:]
    valid = targets != IGNORE
    return jnp.sum((pred == targets) & valid), jnp.sum(valid)


def kl_to_reference(logits, ref_logits, labels) -> jax.Array:
    """Mean over label positions of KL(p_ref || p) of the next-token distributions."""
    valid = labels[:, 1:] != IGNORE
    logp = jax.nn.log_softmax(logits[:, :-1].astype(F32), axis=-1)
    logq = jax.nn.log_softmax(ref_logits[:, :-1].astype(F32), axis=-1)
    kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return jnp.sum(jnp.where(valid, kl, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def npo_loss(logits, ref_logits, labels, beta: float) -> jax.Array:
    """NPO over examples with at least one label token (padding rows excluded)."""
    nll, count = sequence_nll(logits, labels)
    ref_nll, _ = sequence_nll(ref_logits, labels)
    log_ratio = ref_nll - nll  # log pi - log pi_ref
    per_example = (2.0 / beta) * jax.nn.softplus(beta * log_ratio)
    real = count > 0
    return jnp.sum(jnp.where(real, per_example, 0.0)) / jnp.maximum(jnp.sum(real), 1)


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
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, terms) for one paired batch {'forget': ..., 'retain': ..., ['forget_idk': ...]}.

    `logits_fn(b)` runs the model being unlearned; `ref_logits_fn(b)` the frozen reference
    (needed by NPO and by the KL retain loss). Terms are returned for logging and NaN reports.
    """
    if objective not in UNLEARN_OBJECTIVES:
        raise ValueError(f"objective={objective!r}; allowed: {', '.join(UNLEARN_OBJECTIVES)}")
    forget = batch["forget"]
    terms: dict[str, jax.Array] = {}
    if objective == "idk":
        idk = batch["forget_idk"]
        terms["forget"] = token_mean_nll(logits_fn(idk), idk["labels"])
    else:
        forget_logits = logits_fn(forget)
        if objective == "npo":
            ref = jax.lax.stop_gradient(ref_logits_fn(forget))
            terms["forget"] = npo_loss(forget_logits, ref, forget["labels"], beta)
        else:
            terms["forget"] = -token_mean_nll(forget_logits, forget["labels"])
    loss = terms["forget"]
    if objective != "ga" and gamma > 0:
        retain = batch["retain"]
        retain_logits = logits_fn(retain)
        if retain_loss == "kl":
            ref = jax.lax.stop_gradient(ref_logits_fn(retain))
            terms["retain"] = kl_to_reference(retain_logits, ref, retain["labels"])
        elif retain_loss == "nll":
            terms["retain"] = token_mean_nll(retain_logits, retain["labels"])
        else:
            raise ValueError(f"retain_loss={retain_loss!r}; allowed: nll, kl")
        loss = loss + gamma * terms["retain"]
    return loss, terms
