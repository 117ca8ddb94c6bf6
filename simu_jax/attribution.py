"""Stage 1 of SIMU: which MLP neurons store the forget set.

A neuron is unit k of layer l's MLP, the k-th input of `down_proj` (`a = silu(gate) * up`).
Integrated-gradients attribution (docs/method.md#stage-1):

    Att(l, k) = sum_i sum_{t in ans(i)} a_{l,k,i,t} * (1/m) sum_{j=1..m} dL_i/da_{l,k,i,t} |_{a_l = (j/m) a_l}

L_i is sample i's mean next-token log-likelihood over its answer tokens (the negative of the
loss: a positive score means the neuron *supports* the answer, i.e. stores it; with the loss
itself the top scores would be the neurons that hurt the answer, the opposite of what the
mask is for); ans(i) are the positions whose next-token prediction is an answer token. The path
scales exactly the positions whose scores it sums: layer l's neurons at the answer positions go
from 0 to a_l (every other position and every other layer untouched), so IG's completeness
holds per layer, sum_k Att(l, k) -> LL(a) - LL(a with layer l's answer-position neurons zeroed)
as m grows, the error being the right Riemann sum's (tested). Gradients are taken w.r.t.
activations only (an additive zero `mlp_delta`), never weights, in 1 + L passes per batch
(`_ig_scores`):

- j = m (alpha = 1) is the unscaled network for every layer at once: one forward + backward
  gives dL/da_l for all l, and caches a_l and each layer's mid residual r_l (between its
  attention and its MLP);
- for j < m only layer l's down projection and the layers after it see the scaling, so
  layer l's m-1 points are one suffix run (`CausalLM.run(start_layer=l, start_residual=r_l,
  start_neurons=alpha_j a_l)`, the m-1 alphas stacked on the batch axis), differentiated
  w.r.t. its neuron input (the neurons at the unscored positions kept at a_l: at alpha_j they
  are constants of the path, as are all positions of the other layers);
- no path changes a column before the first scored one (attention is causal), so the suffix
  runs recompute only the columns from there on (`_unscaled_prefix`, cut to a bucket width),
  reading the earlier columns' keys and values from the alpha = 1 pass's KV cache: on answers
  in the second half of each row, about half the suffix work.

Measured on CPU (`simu-jax bench`, docs/benchmarks.md: LLaMA, 8 layers, hidden 256, 4 x 128
tokens, answers in the second half, m = 3): 4.45x the time of one weight-gradient step of the
same rows with the cached prefix and the unrolled layers (5.9x with suffix runs over every
column, 7.6x with those and the layers scanned; 16-19x with a full forward + backward per
(layer, step)).
Variants for ablations:
`grad_x_act` (m = 1), `grad_down` (|dL/dW_down| summed over each row), `random` (a random
mask with the same count per layer as a given mask).

A neuron is critical in layer l when Att(l, k) > t * max_k Att(l, k) (or among the top
fraction). Dual neurons (critical for forget and retain) are kept by default.

Against a known truth (the planted benchmark, :mod:`simu_jax.planted`): `localization_metrics`
(ROC AUC per layer and pooled, precision / recall of the t mask, top-|truth| precision).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from simu_jax.base import IGNORE_INDEX
from simu_jax.data.tokenize import TRAIN_BUCKETS, bucket_length, scored_positions, sequence_lengths
from simu_jax.losses import label_logprobs, mean_nll_per_example
from simu_jax.runio import write_bytes_atomic, write_json_atomic
from simu_jax.models import apply, apply_with_aux, merge_params
from simu_jax.models.layers import F32

SCORE_METHODS = ("ig", "grad_x_act", "grad_down")


def _answer_positions(labels: jax.Array) -> jax.Array:
    """[B, T] mask of positions t whose next token (t+1) is an answer token."""
    nxt = labels[:, 1:] != IGNORE_INDEX
    return jnp.concatenate([nxt, jnp.zeros_like(nxt[:, :1])], axis=1)


def _loglik(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """sum_i L_i: each sample's mean answer-token log-likelihood, summed over the batch, from the
    logits at the scored positions only and their targets [B, P] (IGNORE where padding)."""
    logp = label_logprobs(logits, targets)
    return jnp.sum(jnp.sum(logp, axis=-1) / jnp.maximum(jnp.sum(targets != IGNORE_INDEX, axis=-1), 1))


def _unscaled_prefix(labels: np.ndarray, all_positions: bool) -> int:
    """The columns [0, p) that no IG path changes: every scored position is >= p (the first
    answer position of any row, or 0 with `all_positions`), cut so the suffix T - p is a
    `TRAIN_BUCKETS` width (a few shapes). Under causal attention nothing before the first scaled
    position depends on the scaling, so suffix runs recompute columns [p, T) only."""
    t = labels.shape[1]
    answer = labels[:, 1:] != IGNORE_INDEX
    if all_positions or not answer.any():
        return 0
    first = int(np.argmax(answer.any(axis=0)))  # the first column scored in any row
    return t - min(t, bucket_length(t - first, TRAIN_BUCKETS))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "all_positions", "prefix"))
def _ig_scores(graphdef, params, batch, *, steps: int, all_positions: bool = False, prefix: int = 0):
    """IG scores [L, I] of every layer on one batch (module docstring: cost and equations).
    ``prefix``: the columns no path scales (`_unscaled_prefix`); the suffix runs take their keys
    and values from the alpha = 1 pass's KV cache and recompute columns [prefix, T) only."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    positions, targets = batch["positions"], batch["targets"]  # `data.scored_positions`
    (b, t), (n_layers, width, _) = ids.shape, params["model"]["layers"]["mlp"]["down_proj"]["kernel"].shape
    model = merge_params(graphdef, params)
    token_positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)  # what run() uses without a cache
    kv_shape = (n_layers, b, t, model.config.num_key_value_heads, model.config.head_dim)

    # alpha = 1 is the unscaled network for every layer at once: one forward + backward gives
    # g_l = dLL/da_l at a_l for all l, plus the activations a_l and mid residuals r_l to reuse
    # (and, with a prefix, every layer's keys and values: the suffix runs' prefix columns)
    def at_one(delta):
        cache = None if not prefix else (jnp.zeros(kv_shape, model.dtype), jnp.zeros(kv_shape, model.dtype))
        logits, aux = apply_with_aux(graphdef, params, ids, mask, token_positions, mlp_delta=delta,
                                     return_mlp_acts=True, return_mlp_residuals=True, logits_at=positions,
                                     cache=cache, cache_index=0)
        return _loglik(logits, targets), aux

    grads, aux = jax.grad(at_one, has_aux=True)(jnp.zeros((n_layers, b, t, width), F32))
    # the scored positions: the path scales these and only these (completeness, module docstring)
    where = (mask.astype(bool) if all_positions else _answer_positions(labels))[..., None]  # [B, T, 1]

    if steps > 1:  # alpha_j = j/m, j = 1..m-1, stacked on the batch axis: row block j has alpha_j
        alphas = jnp.repeat(jnp.arange(1, steps, dtype=F32) / steps, b)  # [(m-1) B]

        def rep(z, axis=0):  # the batch repeated once per alpha
            return jnp.concatenate([z] * (steps - 1), axis=axis)

        cache = None if not prefix else tuple(rep(z, axis=1) for z in aux["cache"])  # [L, (m-1) B, T, KV, D]
        cut = lambda z: z[:, prefix:]  # noqa: E731 - the recomputed columns

        def scaled_grad(layer):
            """sum_{j<m} dLL/da_l at (alpha_j a_l at the scored positions, the rest untouched)
            [B, T, I]: only layer l's down projection and the layers after it see the scaled
            neurons, so run just that (CausalLM.run's suffix run from the cached r_l, on the
            columns [prefix, T) with the earlier columns' keys and values from the cache) and
            differentiate w.r.t. its input."""
            def at_alphas(neurons):
                logits, _ = apply_with_aux(graphdef, params, rep(cut(ids)), rep(mask), rep(cut(token_positions)),
                                           cache=cache, cache_index=prefix, start_layer=layer,
                                           start_residual=rep(cut(aux["mlp_residuals"][layer])),
                                           start_neurons=neurons, logits_at=rep(jnp.maximum(positions - prefix, 0)))
                return _loglik(logits, rep(targets))

            acts = rep(cut(aux["mlp_acts"][layer].astype(F32)))
            scaled = jnp.where(rep(cut(where)), alphas[:, None, None] * acts, acts)  # [(m-1) B, T - prefix, I]
            g = jax.grad(at_alphas)(scaled).reshape(steps - 1, b, t - prefix, width).sum(0)
            return jnp.pad(g, ((0, 0), (prefix, 0), (0, 0)))  # no scored position before `prefix`

        grads = grads + jax.lax.map(scaled_grad, jnp.arange(n_layers))

    # Att(l, k) = sum over the scored positions of a_l * (1/m) sum_j g_l(alpha_j)
    acts = aux["mlp_acts"].astype(F32)
    return jnp.sum(jnp.where(where[None], acts * grads / steps, 0.0), axis=(1, 2))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _down_grad(graphdef, params, batch):
    def loss(down):
        p = {**params, "model": {**params["model"], "layers": {**params["model"]["layers"], "mlp": {
            **params["model"]["layers"]["mlp"], "down_proj": {"kernel": down}}}}}
        logits = apply(graphdef, p, batch["input_ids"], batch["attention_mask"])
        return jnp.sum(mean_nll_per_example(logits, batch["labels"]))

    return jax.grad(loss)(params["model"]["layers"]["mlp"]["down_proj"]["kernel"])


def _trimmed(batch: dict) -> dict:
    """The batch cut to the smallest `TRAIN_BUCKETS` width that keeps every real token and label
    (a few shapes, so a few compilations). Rows are right-padded (attention_mask 0, labels -100)
    and a real position attends only to earlier ones, so the cut columns change no score."""
    arrays = {k: np.asarray(batch[k]) for k in ("input_ids", "attention_mask", "labels")}
    width = arrays["input_ids"].shape[1]
    used = max(int(sequence_lengths(arrays["attention_mask"]).max(initial=0)),
               int(sequence_lengths(arrays["labels"] != IGNORE_INDEX).max(initial=0)))
    keep = min(width, bucket_length(used, TRAIN_BUCKETS))
    return {k: v[:, :keep] for k, v in arrays.items()}


def neuron_scores(graphdef, params, batches: Iterable[dict], *, method: str = "ig", steps: int = 3,
                  all_positions: bool = False, place=None) -> np.ndarray:
    """Attribution scores [L, I] summed over all batches (padding rows contribute nothing).

    The path scales the scored positions only, so IG's completeness holds for every layer:
    sum_k Att(l, k) -> LL(a) - LL(layer l's scored neurons zeroed) as m grows (tested). The
    scored positions are the answer positions, or with `all_positions` every real token.

    `place`: puts a host batch (a dict of numpy arrays, the same whole batch on every process)
    on the devices; default `jnp.asarray` (one device). On a mesh, with `params` sharded there,
    `functools.partial(sharding.place_batch, mesh=mesh)`: global arrays with the rows over the
    batch axes. Scores that span several processes are gathered to every host
    (`multihost_utils.process_allgather`), so every process gets the same scores, bit for bit.
    """
    if method not in SCORE_METHODS:
        raise ValueError(f"attribution method={method!r}; allowed: {', '.join(SCORE_METHODS)}")
    if steps < 1:
        raise ValueError(f"attribution steps m must be >= 1, got {steps}")
    total, down_grad = None, None
    for batch in batches:
        batch = _trimmed(batch)
        batch["positions"], batch["targets"] = scored_positions(batch["labels"])
        m = 1 if method == "grad_x_act" else steps
        prefix = _unscaled_prefix(batch["labels"], all_positions) if m > 1 else 0  # from the host rows
        batch = {k: jnp.asarray(v) for k, v in batch.items()} if place is None else place(batch)
        if method == "grad_down":
            g = _down_grad(graphdef, params, batch)
            down_grad = g if down_grad is None else down_grad + g
            continue
        per_layer = _ig_scores(graphdef, params, batch, steps=m, all_positions=all_positions, prefix=prefix)
        total = per_layer if total is None else total + per_layer
    if method == "grad_down":
        if down_grad is None:
            raise ValueError("attribution got no batches (empty data set)")
        total = jnp.sum(jnp.abs(down_grad.astype(jnp.float32)), axis=-1)
    if total is None:
        raise ValueError("attribution got no batches (empty data set)")
    if total.is_fully_addressable:
        return np.asarray(total)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(total, tiled=True))


def critical_neurons(scores: np.ndarray, *, threshold: float | None = None, top_fraction: float | None = None) -> np.ndarray:
    """Boolean [L, I]: score > t * (layer max), or the top fraction of each layer."""
    if (threshold is None) == (top_fraction is None):
        raise ValueError("give exactly one of threshold (t) or top_fraction")
    scores = np.asarray(scores, np.float64)
    if threshold is not None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold t must be in (0, 1], got {threshold}")
        layer_max = scores.max(axis=1, keepdims=True)
        return (scores > threshold * layer_max) & (layer_max > 0)
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    k = max(1, int(round(top_fraction * scores.shape[1])))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.zeros(scores.shape, bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """ROC AUC of ``scores`` for the boolean ``truth`` (same shape): the probability that a
    random true neuron scores above a random other one, ties counting 1/2, i.e. the
    Mann-Whitney U over n1 * n0, from the average ranks. ``None`` when one class is empty."""
    from scipy.stats import rankdata

    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(truth, bool).ravel()
    n1 = int(y.sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        return None
    return float((rankdata(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _precision_recall(selected: np.ndarray, truth: np.ndarray) -> dict:
    hits, n_sel, n_true = int((selected & truth).sum()), int(selected.sum()), int(truth.sum())
    return {"selected": n_sel, "precision": hits / n_sel if n_sel else None,
            "recall": hits / n_true if n_true else None}


def localization_metrics(scores: np.ndarray, truth: np.ndarray, *, threshold: float = 0.5) -> dict:
    """How well attribution scores [L, I] find the neurons that hold a set, ``truth`` [L, I]
    (e.g. a planted benchmark's, :mod:`simu_jax.planted`), per layer and over all layers:

    - ``auc``: :func:`roc_auc` (threshold-free); overall, pooled over every (layer, neuron),
      so it also asks whether scores compare across layers; ``mean_layer_auc`` does not;
    - ``threshold``: precision and recall of SIMU's mask, :func:`critical_neurons` at ``t``;
    - ``top_k``: precision of each layer's top |truth_l| neurons (= their recall); overall,
      the hits over all layers / |truth|.
    """
    scores, truth = np.asarray(scores, np.float64), np.asarray(truth, bool)
    if scores.shape != truth.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and truth {truth.shape} must be the same [layers, neurons] shape")
    chosen = critical_neurons(scores, threshold=threshold)
    top = np.zeros_like(truth)
    for layer, k in enumerate(truth.sum(axis=1)):
        top[layer, np.argsort(-scores[layer], kind="stable")[:k]] = True
    per_layer = []
    for layer in range(truth.shape[0]):
        k = int(truth[layer].sum())
        per_layer.append({"auc": roc_auc(scores[layer], truth[layer]), "true": k,
                          "threshold": _precision_recall(chosen[layer], truth[layer]),
                          "top_k": int((top[layer] & truth[layer]).sum()) / k if k else None})
    aucs = [m["auc"] for m in per_layer if m["auc"] is not None]
    overall = {"auc": roc_auc(scores, truth), "mean_layer_auc": float(np.mean(aucs)) if aucs else None,
               "true": int(truth.sum()), "threshold": _precision_recall(chosen, truth),
               "top_k": int((top & truth).sum()) / int(truth.sum()) if truth.any() else None}
    return {"overall": overall, "per_layer": per_layer, "threshold_t": threshold}


@dataclasses.dataclass
class NeuronMask:
    """Per-layer boolean neuron masks: forget-critical, retain-critical, and the selected set."""

    selected: np.ndarray  # [L, I] bool: the neurons whose down_proj rows are trained
    forget: np.ndarray | None = None
    retain: np.ndarray | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def counts(self) -> list[int]:
        return [int(c) for c in self.selected.sum(axis=1)]

    @property
    def num_selected(self) -> int:
        return int(self.selected.sum())

    def digest(self) -> str:
        return hashlib.sha256(np.packbits(self.selected).tobytes() + str(self.selected.shape).encode()).hexdigest()[:16]

    def summary(self) -> dict:
        out = {
            "num_layers": int(self.selected.shape[0]),
            "intermediate_size": int(self.selected.shape[1]),
            "num_selected": self.num_selected,
            "fraction_selected": self.num_selected / self.selected.size,
            "per_layer_selected": self.counts,
            "sha256_16": self.digest(),
            **self.meta,
        }
        if self.forget is not None:
            out["per_layer_forget"] = [int(c) for c in self.forget.sum(1)]
        if self.retain is not None:
            out["per_layer_retain"] = [int(c) for c in self.retain.sum(1)]
            if self.forget is not None:
                out["per_layer_dual"] = [int(c) for c in (self.forget & self.retain).sum(1)]
        return out

    def save(self, directory: str | Path) -> Path:
        """mask.npz (arrays) + mask_summary.json (readable counts), written atomically (a local
        directory or a URL: :func:`simu_jax.runio.write_bytes_atomic`)."""
        import io

        from simu_jax.base import as_path

        directory = as_path(directory, "mask directory")
        arrays = {"selected": self.selected}
        if self.forget is not None:
            arrays["forget"] = self.forget
        if self.retain is not None:
            arrays["retain"] = self.retain
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        write_bytes_atomic(directory / "mask.npz", buf.getvalue())
        write_json_atomic(directory / "mask_summary.json", self.summary())
        return directory / "mask.npz"

    @classmethod
    def load(cls, path: str | Path, shape: tuple[int, int] | None = None) -> "NeuronMask":
        """A mask saved by :meth:`save` (a directory holding mask.npz, or the .npz itself).

        ``shape``: the model's ``(num_hidden_layers, intermediate_size)``, to refuse a mask of
        another model. A file that is not a mask (not an .npz, no boolean ``selected`` [L, I]
        array, ``forget`` / ``retain`` of another shape, the wrong shape) raises a one-line
        ``ValueError`` naming the file.
        """
        import io

        from simu_jax.base import as_path, is_remote

        path = as_path(path, "attribution.mask_path")
        npz = path / "mask.npz" if path.is_dir() else path
        if not npz.is_file():
            raise FileNotFoundError(f"no neuron mask at {npz}")

        def bad(why: str):
            raise ValueError(f"{npz}: not a neuron mask ({why})")

        try:
            data = np.load(io.BytesIO(npz.read_bytes()) if is_remote(npz) else npz, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - pickles, text, broken zips: all "not an .npz"
            bad(f"not an .npz archive: {' '.join(str(e).split())[:100] or type(e).__name__}")
        if not isinstance(data, np.lib.npyio.NpzFile):
            bad("a single .npy array, not an .npz archive")
        with data:
            if "selected" not in data.files:
                bad(f"no 'selected' array; it has {', '.join(data.files) or 'no arrays'}")
            try:
                arrays = {k: np.asarray(data[k]) for k in ("selected", "forget", "retain") if k in data.files}
            except Exception as e:  # noqa: BLE001 - a corrupt member
                bad(f"unreadable array: {' '.join(str(e).split())[:100]}")
        selected = arrays["selected"]
        if selected.ndim != 2:
            bad(f"'selected' has shape {selected.shape}, expected [layers, neurons]")
        for k, a in arrays.items():
            if a.dtype != np.bool_ and not (np.issubdtype(a.dtype, np.integer) and np.isin(a, (0, 1)).all()):
                bad(f"'{k}' is {a.dtype}, not boolean")
            if a.shape != selected.shape:
                bad(f"'{k}' has shape {a.shape} but 'selected' {selected.shape}")
        if shape is not None and selected.shape != tuple(shape):
            bad(f"shape {selected.shape} (layers, neurons) does not fit the model's {tuple(shape)}")
        meta = {}
        summary = npz.with_name("mask_summary.json")
        if summary.is_file():
            try:
                meta = {k: v for k, v in json.loads(summary.read_text()).items() if not k.startswith("per_layer")
                        and k not in ("num_layers", "intermediate_size", "num_selected", "fraction_selected",
                                      "sha256_16")}
            except (ValueError, AttributeError, UnicodeDecodeError):
                raise ValueError(f"{summary}: not a mask summary (not a JSON object)") from None
        opt = {k: arrays[k].astype(bool) if k in arrays else None for k in ("forget", "retain")}
        return cls(selected=selected.astype(bool), meta=meta, **opt)


def build_mask(
    forget_scores: np.ndarray,
    retain_scores: np.ndarray | None = None,
    *,
    threshold: float | None = 0.5,
    top_fraction: float | None = None,
    dual: str = "include",
    meta: dict | None = None,
) -> NeuronMask:
    """Selected = forget-critical neurons; with dual='exclude', minus the retain-critical ones."""
    if dual not in ("include", "exclude"):
        raise ValueError(f"dual={dual!r}; allowed: include, exclude")
    forget = critical_neurons(forget_scores, threshold=threshold, top_fraction=top_fraction)
    retain = None
    if retain_scores is not None:
        retain = critical_neurons(retain_scores, threshold=threshold, top_fraction=top_fraction)
    selected = forget & ~retain if (dual == "exclude" and retain is not None) else forget.copy()
    return NeuronMask(selected=selected, forget=forget, retain=retain, meta=dict(meta or {}, dual=dual))


def random_mask_like(mask: NeuronMask, seed: int) -> NeuronMask:
    """A random mask with the same number of selected neurons in every layer (ablation)."""
    rng = np.random.default_rng(seed)
    selected = np.zeros_like(mask.selected)
    for layer, count in enumerate(mask.counts):
        selected[layer, rng.choice(selected.shape[1], size=count, replace=False)] = True
    return NeuronMask(selected=selected, meta=dict(mask.meta, random_seed=seed, method="random"))
