"""The unlearning engine: method registry, the jit-compiled step, and the loop.

Every method is one configuration of one mechanism (objective x optimizer x trainable set):

    fo_*     AdamW,  all parameters            (first-order baseline)
    so_*     Sophia, all parameters            (SOUL: fisher curvature g*g)
    simu_*   Sophia, attention + critical down_proj rows (SIMU)
    simu_newton  trust-region Newton (Steihaug CG, exact HVPs) on the SIMU subset
    simu_ggn, simu_influence, so_newton, so_ggn, so_influence   Gauss-Newton / influence steps
                 (docs/method.md#newton)

with objectives graddiff | npo | idk (| ga). The step differentiates only the trainable
subset (`selection.Partition`); Sophia's state lives on that subset only.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simu_jax import optim
from simu_jax.base import IGNORE_INDEX
from simu_jax.curvature import ggn_operator, lanczos, rademacher_like, tree_norm
from simu_jax.curvature import acc_dtype, fold_transposed_dots, grad_and_hutchinson, linearize
from simu_jax.losses import (LossSpec, kl_at_targets, logit_positions, nll_term, scored_targets, token_mean_nll,
                             unlearning_loss)
from simu_jax.optim import OptimSpec
from simu_jax.models import apply
from simu_jax.selection import (ALL_PARAMS, DOWN, SIMU, Partition, TrainableSpec, count_trainable, get_path,
                                gather_rows, scatter_rows)
from simu_jax.sharding import (DEFAULT_RULES, activation_sharding, device_put_tree, hashable_rules,
                               opt_state_shardings, param_shardings, place_batch, replicated, shard_mask)


@dataclasses.dataclass(frozen=True)
class Method:
    objective: str  # graddiff | npo | idk | ga
    optimizer: str  # adamw | sophia | newton | ggn | influence
    trainable: TrainableSpec


METHODS: dict[str, Method] = {}
for _obj in ("graddiff", "npo", "idk"):
    METHODS[f"fo_{_obj}"] = Method(_obj, "adamw", ALL_PARAMS)
    METHODS[f"so_{_obj}"] = Method(_obj, "sophia", ALL_PARAMS)
    METHODS[f"simu_{_obj}"] = Method(_obj, "sophia", SIMU)
METHODS["fo_ga"] = Method("ga", "adamw", ALL_PARAMS)
METHODS["simu_newton"] = Method("graddiff", "newton", SIMU)
# Newton-type steps (docs/method.md#newton): trust-region Newton on the exact Hessian ("newton"),
# on the PSD Gauss-Newton matrix G_F + gamma G_R ("ggn"), and the influence step
# (G_R + lambda I)^-1 grad L_F ("influence"); on the SIMU subset and on all parameters
METHODS["simu_ggn"] = Method("graddiff", "ggn", SIMU)
METHODS["simu_influence"] = Method("graddiff", "influence", SIMU)
METHODS["so_newton"] = Method("graddiff", "newton", ALL_PARAMS)
METHODS["so_ggn"] = Method("graddiff", "ggn", ALL_PARAMS)
METHODS["so_influence"] = Method("graddiff", "influence", ALL_PARAMS)


def get_method(name: str, trainable: TrainableSpec | None = None) -> Method:
    if name not in METHODS:
        raise ValueError(f"method={name!r}; allowed: {', '.join(sorted(METHODS))}")
    method = METHODS[name]
    return dataclasses.replace(method, trainable=trainable) if trainable is not None else method


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Hyper-parameters of the step (hashable: part of the jit cache key): the run config's own
    ``optim`` (:class:`simu_jax.optim.OptimSpec`) and ``loss`` (:class:`simu_jax.losses.LossSpec`)
    objects, the run's number of steps (``total_steps``: the horizon of a ``linear`` learning-rate
    schedule, ``UnlearnConfig.steps``; None when there is no schedule) and a debugging knob:
    multiply the loss by NaN at this 0-based step (tests the NaN guard; -1 = off). Fields left
    unset in ``optim`` / ``loss`` are filled by :func:`resolve_settings` (the :class:`Unlearner`
    does it; docs/method.md#soul-optimizer)."""

    optim: OptimSpec = OptimSpec()
    loss: LossSpec = LossSpec()
    inject_nan_at_step: int = -1
    total_steps: int | None = None


def resolve_settings(method: Method, s: StepSettings) -> StepSettings:
    """``s`` with every unset ``optim`` / ``loss`` field filled for ``method``
    (``OptimSpec.resolved``, ``LossSpec.resolved``: the Sophia preset, ``preset=None`` = the
    paper's ``sophia`` values; ``simu-jax unlearn`` picks ``soul`` first). Idempotent."""
    o = s.optim.resolved(method.optimizer, s.total_steps)
    loss = s.loss.resolved(method.objective, o.preset if method.optimizer == "sophia" else None)
    if o is s.optim and loss is s.loss:
        return s
    return dataclasses.replace(s, optim=o, loss=loss)


def _learning_rate(s: StepSettings):
    """The learning rate, or the HF linear warmup + decay schedule of the step count."""
    o = s.optim
    if o.schedule != "linear":
        return o.learning_rate
    if s.total_steps is None or o.warmup_steps is None:
        raise ValueError("optim.schedule='linear' needs the run's length: StepSettings(total_steps=...) "
                         "(simu-jax unlearn passes its `steps`), or set optim.schedule='constant'")
    return optim.hf_linear_schedule(o.learning_rate, o.warmup_steps, s.total_steps)


def build_optimizer(method: Method, s: StepSettings, mask) -> optax.GradientTransformationExtraArgs | None:
    s = resolve_settings(method, s)
    o = s.optim
    decay_mask = optim.hf_decay_mask if o.weight_decay_mask == "no_norm_bias" else None
    if method.optimizer == "adamw":
        return optim.adamw(_learning_rate(s), b1=o.b1, b2=o.adam_b2, eps=o.adam_eps, weight_decay=o.weight_decay,
                           mask=mask, weight_decay_mask=decay_mask, grad_clip_norm=o.grad_clip_norm)
    if method.optimizer == "sophia":
        return optim.sophia(_learning_rate(s), b1=o.b1, b2=o.b2, rho=o.rho, batch_scale=o.batch_scale,
                            weight_decay=o.weight_decay, clip_threshold=o.clip_threshold,
                            update_interval=o.update_interval, mask=mask, weight_decay_mask=decay_mask,
                            momentum=o.momentum, grad_clip_norm=o.grad_clip_norm)
    if method.optimizer in optim.NEWTON_OPTIMIZERS:  # trust radius + damping, carried and checkpointed
        return optim.trust_region_state(s.optim.trust_radius, s.optim.damping)
    return None


def _init_split(partition: Partition, leaves: dict, down, rows):
    """The only new arrays of the split: a private copy of the trainable leaves (the step
    donates it, and the caller's params / the reference model may alias them) with the
    compact SIMU rows gathered, and down_proj with those rows zeroed (the frozen side)."""
    trainable = {k: jnp.copy(v) for k, v in leaves.items()}  # copy_p: never forwarded as an input buffer
    if rows is not None:
        index, valid = rows
        trainable["down_rows"] = gather_rows(down, index, valid)
        down = partition.zero_rows(down, rows)
    return trainable, down


_init_split_jit = jax.jit(_init_split, static_argnums=0)


class Unlearner:
    """Holds the partitioned params, the optimizer state and the compiled step.

    Memory: the Unlearner keeps the frozen tree (aliases of ``params``' non-trainable leaves,
    plus one new down_proj with the trained rows zeroed when SIMU trains neuron rows), its
    own copy of the trainable leaves, the optimizer state and ``ref`` (only for NPO / KL
    retain, where it is the reference model). It keeps no other reference to ``params``:
    :meth:`params` writes the trained values into the frozen tree.

    ``mesh`` (a ``sharding.make_mesh`` mesh): build directly on the mesh. ``params`` (and
    ``ref_params``) are placed with ``sharding.param_shardings`` first (free when they already
    are, e.g. from ``sharding.shard_params``); the trainable copy, the zeroed down_proj and the
    optimizer state are then created by ``jax.jit`` with ``out_shardings``, so nothing new is
    ever created unsharded; the neuron-row masks are sharded like the rows they gate;
    the step is a jit whose ``out_shardings`` keep that layout, batches are placed with
    ``sharding.place_batch`` (a host batch is the whole global batch, the same on every
    process; global arrays are used as they are) and Hutchinson probes are constrained to the
    params' shardings. ``rules`` / ``model_config`` as in ``sharding.param_shardings``.
    :func:`shard_unlearner` moves an Unlearner built on one device onto a mesh.
    """

    def __init__(self, graphdef, params: dict, method: Method, settings: StepSettings,
                 selected: np.ndarray | None = None, ref_params: dict | None = None, *, mesh=None,
                 rules=None, model_config=None):
        settings = resolve_settings(method, settings)  # unset optim / loss fields filled (presets)
        self.graphdef, self.method, self.settings = graphdef, method, settings
        self.mesh = None
        self.partition = part = Partition(params, method.trainable, selected)
        needs_ref = method.objective == "npo" or settings.loss.retain_loss == "kl"
        if mesh is not None:
            rules = DEFAULT_RULES if rules is None else rules
            cache: dict = {}  # one placement per distinct array: ref_params aliasing params stays an alias
            params = device_put_tree(params, param_shardings(params, mesh, rules, model_config), cache)
            if needs_ref and ref_params is not None:
                ref_params = device_put_tree(ref_params, param_shardings(ref_params, mesh, rules, model_config),
                                             cache)
            if part.row_index is not None:
                part.row_index = shard_mask(part.row_index, mesh, rules)
                part.row_valid = shard_mask(part.row_valid, mesh, rules)
        self.ref = (ref_params if ref_params is not None else params) if needs_ref else None

        # trainable copy + zeroed down_proj, created in place (on a mesh: already sharded)
        leaves = {part.leaf_key(p): get_path(params, p) for p in part.paths}
        down = get_path(params, DOWN) if part.row_index is not None else None
        split = functools.partial(_init_split_jit, part)  # one device: compiled once per partition structure
        tr_sh = None
        if mesh is not None:
            tr_sh = param_shardings(jax.eval_shape(functools.partial(_init_split, part), leaves, down, part.rows)[0],
                                    mesh, rules, model_config)
            split = jax.jit(functools.partial(_init_split, part),
                            out_shardings=(tr_sh, None if down is None else down.sharding))
        self.trainable, zeroed = split(leaves, down, part.rows)
        self.frozen = part.frozen_from(params, zeroed)
        del params, leaves, down, zeroed

        self.mask = part.optimizer_mask(self.trainable)
        if mesh is not None and self.mask is not None:
            self.mask = shard_mask(self.mask, mesh, rules)
        self.tx = build_optimizer(method, settings, self.mask)
        self.opt_state = ()
        opt_sh = ()
        if self.tx is not None:
            if mesh is not None:
                # zeros created sharded: full Sophia / AdamW state never exists on one device
                opt_sh = opt_state_shardings(jax.eval_shape(self.tx.init, self.trainable), tr_sh, mesh, tx=self.tx)
                self.opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(self.trainable)
            else:
                # keep_unused: the state then comes back committed like the trainable params (init
                # reads only their shapes, and a jit whose used inputs are all uncommitted returns
                # uncommitted arrays); the step's outputs are committed, and committed vs
                # uncommitted arguments are different jit cache entries: step 2 would compile again.
                self.opt_state = jax.jit(self.tx.init, keep_unused=True)(self.trainable)
        self.step_count = 0
        self._step_fn = functools.partial(compiled_step, graphdef, part, method, settings)
        self._scatter = None  # params(): the default jitted scatter
        if mesh is not None:
            self.bind_mesh(mesh, rules, tr_sh, opt_sh)

    def bind_mesh(self, mesh, rules, tr_sh, opt_sh):
        """Compile the step (and the row scatter of `params()`) for `mesh`, with `out_shardings`
        pinning the new trainable params and optimizer state to `tr_sh` / `opt_sh` (the
        shardings the state already has: `Unlearner(..., mesh=)` and `shard_unlearner` place
        it first). Batches given to `step` go through `sharding.place_batch` (`rules`)."""
        compiled = _mesh_step(self.graphdef, self.partition, self.method, self.settings, mesh, hashable_rules(rules),
                              *_hashable(tr_sh), *_hashable(opt_sh))

        def sharded_step(trainable, opt_state, frozen, ref, rows, batch, key, step_count):
            return compiled(trainable, opt_state, frozen, ref, rows, place_batch(batch, mesh, rules=rules), key,
                            step_count)

        def lower(trainable, opt_state, frozen, ref, rows, batch, key, step_count):
            return compiled.lower(trainable, opt_state, frozen, ref, rows, place_batch(batch, mesh, rules=rules), key,
                                  step_count)

        sharded_step.compiled = compiled  # for inspection (lower / cost analysis)
        sharded_step.lower = lower
        self._step_fn = sharded_step
        if self.partition.row_index is not None:
            self._scatter = jax.jit(scatter_rows, out_shardings=get_path(self.frozen, DOWN).sharding)
        self.mesh = mesh

    @property
    def num_trainable(self) -> int:
        return count_trainable(self.partition, self.trainable)

    def state_bytes(self) -> int:
        """Bytes of optimizer + curvature state (on the trainable subset only)."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.opt_state)))

    def step(self, batch: dict, key: jax.Array) -> dict[str, float]:
        self.trainable, self.opt_state, metrics = self._step_fn(
            self.trainable, self.opt_state, self.frozen, self.ref, self.partition.rows, batch, key,
            jnp.int32(self.step_count))
        self.step_count += 1
        return metrics

    def lower_step(self, batch: dict, key: jax.Array | None = None):
        """The step on ``batch`` traced and lowered, not run: a ``jax.stages.Lowered`` whose
        ``.compile()`` gives XLA's ``memory_analysis()`` (per device on a mesh) and
        ``cost_analysis()``. The same program as :meth:`step` (on a mesh the batch is placed first)."""
        args = (self.trainable, self.opt_state, self.frozen, self.ref, self.partition.rows, batch,
                jax.random.key(0) if key is None else key, jnp.int32(self.step_count))
        if self.mesh is not None:
            return self._step_fn.lower(*args)
        return _jitted_step().lower(self.graphdef, self.partition, self.method, self.settings, *args)

    def params(self) -> dict:
        """The full parameter tree with the unlearned values written in (into the frozen tree:
        trainable leaves set, the compact SIMU rows scattered back into down_proj)."""
        return self.partition.merge_back(self.trainable, self.frozen, scatter=self._scatter)


def build_unlearner(graphdef, params, method, settings, mesh: jax.sharding.Mesh, selected=None, ref_params=None,
                    rules=DEFAULT_RULES, model_config=None) -> Unlearner:
    """An :class:`Unlearner` built directly on ``mesh``: ``Unlearner(..., mesh=mesh)``.

    ``params`` are placed with ``sharding.param_shardings`` first (free if
    ``sharding.shard_params`` already did), then the trainable copy, the zeroed down_proj and
    the optimizer state are created by ``jax.jit`` with ``out_shardings``: nothing new is
    created unsharded.
    """
    return Unlearner(graphdef, params, method, settings, selected=selected, ref_params=ref_params, mesh=mesh,
                     rules=rules, model_config=model_config)


def shard_unlearner(unlearner: Unlearner, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES,
                    model_config=None) -> Unlearner:
    """Move an already built :class:`Unlearner` onto ``mesh`` (in place; returns it).

    Places ``trainable``, ``frozen`` and ``ref`` (each distinct array once, so aliases stay
    aliases), ``opt_state`` (like the params it mirrors, dtypes unchanged) and the neuron-row
    masks (like the rows they gate), then binds the same mesh step as :func:`build_unlearner`
    (:meth:`Unlearner.bind_mesh`: ``jax.jit`` of :func:`step_impl` with ``out_shardings``;
    batches placed by ``sharding.place_batch``; one executable shared with a mesh-built
    Unlearner of the same configuration).

    Arrays are copied from wherever they are: the Unlearner was built on one device, so this
    only suits models whose params and state fit one device. Otherwise build on the mesh
    (:func:`build_unlearner`).
    """
    cache: dict = {}
    tr_sh = param_shardings(unlearner.trainable, mesh, rules, model_config)
    unlearner.trainable = device_put_tree(unlearner.trainable, tr_sh, cache)
    unlearner.frozen = device_put_tree(unlearner.frozen, param_shardings(unlearner.frozen, mesh, rules, model_config),
                                       cache)
    if unlearner.ref is not None:
        unlearner.ref = device_put_tree(unlearner.ref, param_shardings(unlearner.ref, mesh, rules, model_config), cache)

    # neuron-row index / validity and the optimizer's element mask, sharded like the rows
    part = unlearner.partition
    if part.row_index is not None:
        part.row_index = shard_mask(part.row_index, mesh, rules)
        part.row_valid = shard_mask(part.row_valid, mesh, rules)
    if unlearner.mask is not None:
        unlearner.mask = shard_mask(unlearner.mask, mesh, rules)
        unlearner.tx = build_optimizer(unlearner.method, unlearner.settings, unlearner.mask)

    opt_sh = ()
    if unlearner.tx is not None:
        opt_sh = opt_state_shardings(unlearner.opt_state, tr_sh, mesh, tx=unlearner.tx)
        unlearner.opt_state = device_put_tree(unlearner.opt_state, opt_sh, cache)
    unlearner.bind_mesh(mesh, rules, tr_sh, opt_sh)
    return unlearner


def _hashable(tree):
    """A tree of shardings as a hashable (treedef, leaves) pair (a cache key)."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return treedef, tuple(leaves)


@functools.lru_cache(maxsize=32)
def _mesh_step(graphdef, partition, method, settings, mesh, rules, tr_def, tr_leaves, opt_def, opt_leaves):
    """`step_impl` jitted for a mesh; cached, so Unlearners of one configuration (e.g. one built
    on the mesh and one moved there by `shard_unlearner`) share one executable. The model's
    activations are laid out on the mesh (`sharding.activation_sharding`, traced inside this
    jit: `rules` is part of the cache key) and the Hutchinson probes (HVP tangents) are
    constrained to the trainable params' shardings."""
    tr_sh = jax.tree.unflatten(tr_def, tr_leaves)
    opt_sh = jax.tree.unflatten(opt_def, opt_leaves)
    step = functools.partial(step_impl, graphdef, partition, method, settings, probe_shardings=tr_sh)

    def mesh_step(*args):
        with activation_sharding(mesh, dict(rules)):
            return step(*args)

    donate = (0, 1) if jax.default_backend() != "cpu" else ()
    return jax.jit(mesh_step, out_shardings=(tr_sh, opt_sh, replicated(mesh)), donate_argnums=donate)


def part_logits(graphdef, params, part: dict, **kwargs) -> jax.Array:
    """The logits a loss scores for one batch part (``input_ids`` / ``attention_mask`` / ...): at
    its scored positions when it has a scored view (`data.with_scored_positions`, as `run_unlearn`'s
    step batches do), else at every position (`losses.logit_positions`); ``kwargs`` go to `apply`."""
    return apply(graphdef, params, part["input_ids"], part["attention_mask"], logits_at=logit_positions(part),
                 **kwargs)


def _loss(graphdef, partition: Partition, method: Method, s: StepSettings, rows, trainable, frozen, ref, batch, step):
    params, kwargs = partition.combine(trainable, frozen, rows)
    # the head and the loss on the label tokens only when the batch has a scored view (part_logits)
    logits_fn = lambda b: part_logits(graphdef, params, b, **kwargs)  # noqa: E731
    ref_fn = None
    if ref is not None:
        ref_fn = lambda b: part_logits(graphdef, ref, b)  # noqa: E731
    loss, terms = unlearning_loss(method.objective, logits_fn, batch, gamma=s.loss.gamma, beta=s.loss.beta,
                                  retain_loss=s.loss.retain_loss, ref_logits_fn=ref_fn,
                                  normalization=s.loss.normalization or "token")
    if s.inject_nan_at_step >= 0:
        poison = jnp.where(step == s.inject_nan_at_step, jnp.nan, 1.0)
        terms = {**terms, "forget": terms["forget"] * poison}
        loss = loss * poison
    return loss, terms


def step_impl(graphdef, partition, method, s, trainable, opt_state, frozen, ref, rows, batch, key, step,
              probe_shardings=None):
    """One unlearning step (see `compiled_step`). `probe_shardings`: the trainable params'
    shardings on a mesh (Hutchinson probes are constrained to them), else None."""
    s = resolve_settings(method, s)  # a no-op for an Unlearner's own (already resolved) settings
    mask = partition.optimizer_mask(trainable, rows)
    tx = build_optimizer(method, s, mask)
    loss_fn = functools.partial(_loss, graphdef, partition, method, s, rows)
    if method.optimizer in optim.NEWTON_OPTIMIZERS:
        return _newton_type_step(graphdef, partition, method, s, trainable, opt_state, frozen, ref, rows, batch, key,
                                 step, mask)

    args = (frozen, ref, batch, step)
    extra = {}
    if method.optimizer == "sophia" and s.optim.estimator == "hutchinson":
        # Sophia-H: the gradient and the probes' HVPs from one linearization of the gradient map
        (loss, terms), grads, extra["hessian_estimate"] = _grad_and_hutchinson(
            loss_fn, s, trainable, key, step, args, probe_shardings)
    else:
        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, *args)
        if method.optimizer == "sophia" and s.optim.estimator == "fisher":
            extra["hessian_estimate"] = optim.FISHER  # g*g of the gradient Sophia sees (masked, clipped)
        elif method.optimizer == "sophia":
            estimate = _estimator(graphdef, partition, s, rows, loss_fn)
            extra["hessian_estimate"] = optim.curvature_on_schedule(
                estimate, step, s.optim.update_interval, trainable, key, grads, *args)
    updates, opt_state = tx.update(grads, opt_state, trainable, **extra)
    trainable = optim.masked_apply(trainable, updates, mask)
    metrics = {"loss": loss, "grad_norm": tree_norm(grads), **{f"loss/{k}": v for k, v in terms.items()}}
    if method.optimizer == "sophia":  # sophia/clip_fraction, sophia/update_over_lr_median, ...
        metrics.update(optim.sophia_diagnostics(opt_state, rho=s.optim.rho, batch_scale=s.optim.batch_scale,
                                                clip_threshold=s.optim.clip_threshold, mask=mask))
    return trainable, opt_state, metrics


def _grad_and_hutchinson(loss_fn, s: StepSettings, trainable, key, step, args, probe_shardings=None):
    """``((loss, terms), grads, h_hat)`` for Sophia-H: on curvature steps one
    ``jax.linearize`` of the gradient map gives the gradient and the HVPs of the Hutchinson
    probes (``curvature.grad_and_hutchinson``); on the others (``update_interval > 1``) a plain
    gradient and zeros (``lax.cond``: only the taken branch runs)."""
    def scalar(tr, *a):
        loss, terms = loss_fn(tr, *a)
        return loss, (loss, terms)

    def curvature_step():
        grads, aux, h_hat = grad_and_hutchinson(scalar, trainable, key, s.optim.num_probes, *args, has_aux=True,
                                                shardings=probe_shardings)
        return aux, grads, h_hat

    if s.optim.update_interval == 1:
        return curvature_step()

    def plain_step():
        aux, grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, *args)
        zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), acc_dtype(jnp.result_type(p))), trainable)
        return aux, grads, zeros

    return jax.lax.cond(step % s.optim.update_interval == 0, curvature_step, plain_step)


# Per-step diagnostics of the Newton-type steps, logged as "newton/<key>" (docs/method.md#newton).
# newton/cg_exit: 0 converged (interior step), 1 negative curvature (followed to the boundary),
# 2 boundary (CG crossed the trust radius), 3 max iterations (curvature.CG_* codes).
NEWTON_METRICS = ("rho", "cg_exit", "cg_iterations", "cg_residual", "step_norm", "radius", "damping", "next_radius",
                  "next_damping", "accepted", "cos_neg_grad", "predicted_decrease", "actual_decrease", "trial_loss")


def _where_mask(mask, tree):
    """Zero outside the optimizer mask (``jnp.where``; None = everything trainable)."""
    if mask is None:
        return tree
    return jax.tree.map(lambda m, x: jnp.where(m, x, jnp.zeros((), x.dtype)), mask, tree)


def _logit_losses(graphdef, partition, method, s, rows, frozen, ref, batch, step):
    """GradDiff as a function of the logits, for the Gauss-Newton steps.

    Returns ``(logits_fn, objective, forget_nll, retain_term)``: ``logits_fn(trainable)`` the
    forget and retain logits ``{"forget": z_F, "retain": z_R}``; ``objective(z) -> (loss,
    terms)`` the unlearning loss on them (``losses.unlearning_loss``, with `_loss`'s NaN
    debugging poison); ``forget_nll(z) = L_F`` and ``retain_term(z) = R`` (retain NLL, or KL to
    the reference), both convex in the logits, so their Gauss-Newton matrices are PSD."""
    if method.objective != "graddiff":
        raise ValueError(f"the {method.optimizer} step is defined for GradDiff only, not {method.objective!r}")
    parts = ("forget", "retain")

    def logits_fn(tr):
        params, kwargs = partition.combine(tr, frozen, rows)
        return {k: part_logits(graphdef, params, batch[k], **kwargs) for k in parts}

    ref_z = None
    if ref is not None and s.loss.retain_loss == "kl":
        ref_z = {k: jax.lax.stop_gradient(part_logits(graphdef, ref, batch[k])) for k in parts}
    which = {id(batch[k]): k for k in parts}  # unlearning_loss asks for the logits of batch["forget"] / ["retain"]

    def objective(z):
        loss, terms = unlearning_loss(method.objective, lambda b: z[which[id(b)]], batch, gamma=s.loss.gamma,
                                      beta=s.loss.beta, retain_loss=s.loss.retain_loss,
                                      normalization=s.loss.normalization or "token",
                                      ref_logits_fn=None if ref_z is None else (lambda b: ref_z[which[id(b)]]))
        if s.inject_nan_at_step >= 0:
            poison = jnp.where(step == s.inject_nan_at_step, jnp.nan, 1.0)
            terms = {**terms, "forget": terms["forget"] * poison}
            loss = loss * poison
        return loss, terms

    def forget_nll(z):
        return nll_term(z["forget"], scored_targets(batch["forget"]))

    def retain_term(z):
        if s.loss.retain_loss == "kl":
            return kl_at_targets(z["retain"], ref_z["retain"], scored_targets(batch["retain"]))
        return nll_term(z["retain"], scored_targets(batch["retain"]))

    return logits_fn, objective, forget_nll, retain_term


def _newton_type_step(graphdef, partition, method, s, trainable, opt_state, frozen, ref, rows, batch, key, step,
                      mask):
    """The Newton-type steps on the trainable subset (docs/method.md#newton), ``opt_state`` a
    ``optim.TrustRegionState``:

    * ``newton``: trust-region Newton (N&W Alg. 4.1, ``optim.trust_region_step``; subproblem by
      ``optim.tr_solver``, default the Lanczos / GLTR solver) on the exact Hessian of the
      unlearning loss (``jax.linearize`` of its gradient);
    * ``ggn``: the same trust region on the PSD Gauss-Newton matrix ``G_F + gamma G_R`` of
      GradDiff (``-G_F + gamma G_R`` with the forget term's sign flipped), ``curvature.ggn_operator``;
    * ``influence``: ``theta + s (G_R + lambda I)^-1 grad L_F`` (``optim.influence_step``).
    """
    o = s.optim
    loss_fn = functools.partial(_loss, graphdef, partition, method, s, rows)
    args = (frozen, ref, batch, step)
    scalar = lambda tr, *a: loss_fn(tr, *a)[0]  # noqa: E731
    forget_grad = None
    if method.optimizer == "newton":
        def value_and_grad(tr):
            (value, terms), g = jax.value_and_grad(loss_fn, has_aux=True)(tr, *args)
            return g, (value, terms)

        g, curvature, (loss, terms) = linearize(fold_transposed_dots(value_and_grad), trainable, has_aux=True)
    else:
        logits_fn, objective, forget_nll, retain_term = _logit_losses(graphdef, partition, method, s, rows, frozen,
                                                                      ref, batch, step)
        if method.optimizer == "ggn":
            psd = lambda z: forget_nll(z) + s.loss.gamma * retain_term(z)  # noqa: E731
        else:
            psd = retain_term
        z, curvature, j_transpose = ggn_operator(logits_fn, psd, trainable)
        (loss, terms), dz = jax.value_and_grad(objective, has_aux=True)(z)
        g = j_transpose(dz)
        if method.optimizer == "influence":
            forget_grad = _where_mask(mask, j_transpose(jax.grad(forget_nll)(z)))
    g = _where_mask(mask, g)
    matvec = lambda v: _where_mask(mask, curvature(_where_mask(mask, v)))  # noqa: E731
    if method.optimizer == "influence":
        new, opt_state, info = optim.influence_step(scalar, trainable, opt_state, g, forget_grad, matvec, *args,
                                                    loss=loss, mask=mask, scale=o.influence_scale,
                                                    max_norm=o.trust_radius, maxiter=o.cg_iters, tol=o.cg_tol)
    else:
        new, opt_state, info = optim.trust_region_step(scalar, trainable, opt_state, g, matvec, *args, loss=loss,
                                                       mask=mask, max_radius=o.tr_max_radius, eta=o.tr_eta,
                                                       maxiter=o.cg_iters, tol=o.cg_tol,
                                                       adapt_damping=o.tr_adapt_damping,
                                                       solver=o.tr_solver)
    metrics = {"loss": loss, "grad_norm": info["grad_norm"], "cg_iterations": info["cg_iterations"],
               "step_norm": info["step_norm"], **{f"newton/{k}": info[k] for k in NEWTON_METRICS},
               **{f"loss/{k}": v for k, v in terms.items()}}
    if o.lanczos_every:
        # extreme eigenvalues of the (undamped) curvature the step used, on the trainable subset
        # (padding slots of the compact rows add zero eigenvalues)
        def extremes():
            v0 = _where_mask(mask, rademacher_like(key, trainable))
            r = lanczos(matvec, v0, o.lanczos_iters)
            return r.min_eigenvalue.astype(jnp.float32), r.max_eigenvalue.astype(jnp.float32)

        nan = jnp.asarray(jnp.nan, jnp.float32)
        metrics["newton/lambda_min"], metrics["newton/lambda_max"] = jax.lax.cond(
            step % o.lanczos_every == 0, extremes, lambda: (nan, nan))
    return new, opt_state, metrics


# Compiled once per (model, partition structure, method, settings, shapes): Unlearners that differ
# only in the mask's values (same row count) share one executable.
# Built on first use, not at import: asking for the backend starts XLA, and a multi-process run
# must call jax.distributed.initialize() before that (the CLI imports this module first).
@functools.cache
def _jitted_step():
    return jax.jit(step_impl, static_argnums=(0, 1, 2, 3),
                   donate_argnums=(4, 5) if jax.default_backend() != "cpu" else ())


def compiled_step(*args):
    return _jitted_step()(*args)


def _gnb_logits(graphdef, partition, rows, trainable, frozen, batch):
    """``(logits [N, V], weights [N])`` Sophia-G's GNB estimator samples labels from: the forget
    and retain parts' logits as one list of rows (at their scored positions when the batch has a
    scored view; their widths may differ), weight 1 where the position has a next-token label."""
    params, kwargs = partition.combine(trainable, frozen, rows)
    logits, weights = [], []
    for part in ("forget", "retain"):
        x = batch[part]
        z = part_logits(graphdef, params, x, **kwargs)
        logits.append(z.reshape(-1, z.shape[-1]))
        weights.append((scored_targets(x) != IGNORE_INDEX).astype(jnp.float32).reshape(-1))
    return jnp.concatenate(logits), jnp.concatenate(weights)


def _estimator(graphdef, partition, s, rows, loss_fn):
    """The scheduled curvature estimator of Sophia-G (`gnb`). `fisher` (the gradient's g*g) and
    `hutchinson` (one linearization with the gradient, `_grad_and_hutchinson`) are built in
    `step_impl` itself."""
    if s.optim.estimator == "gnb":
        # Gauss-Newton-Bartlett of the model's own next-token distribution on the forget and
        # retain inputs (answer tokens): curvature of the output, independent of the
        # unlearning objective's sign, as in Sophia-G.
        def logits_fn(tr, fr, rf, b, st):
            return _gnb_logits(graphdef, partition, rows, tr, fr, b)
        return optim.make_curvature_estimator("gnb", logits_fn=logits_fn)
    raise ValueError(f"estimator={s.optim.estimator!r}; allowed: fisher, gnb, hutchinson")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def eval_losses(graphdef, params, batch):
    """Teacher-forced mean answer NLL of one batch."""
    logits = apply(graphdef, params, batch["input_ids"], batch["attention_mask"])
    return token_mean_nll(logits, batch["labels"])


def paired_batches(forget_iter: Iterator[dict], retain_iter: Iterator[dict],
                   idk_iter: Iterator[dict] | None = None) -> Iterator[dict]:
    """Zip forget / retain (/ refusal-relabelled forget) batches into the step's batch dict."""
    while True:
        batch = {"forget": next(forget_iter), "retain": next(retain_iter)}
        if idk_iter is not None:
            batch["forget_idk"] = next(idk_iter)
        yield jax.tree.map(jnp.asarray, batch)


def with_refusals(records: list[dict], refusals: list[str], seed: int) -> list[dict]:
    """Forget records relabelled with refusal answers (IdK), chosen deterministically from the seed."""
    if not refusals:
        raise ValueError("IdK unlearning needs a non-empty list of refusal answers")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(refusals), size=len(records))
    return [{**r, "answer": refusals[i]} for r, i in zip(records, picks)]


def run_loop(unlearner: Unlearner, batches: Iterator[dict], steps: int, *, seed: int = 0,
             on_step: Callable[[int, dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
             start_step: int = 0) -> int:
    """Run `steps` unlearning steps (from `start_step`); returns the number of the last step done + 1."""
    base = jax.random.key(seed)
    step = start_step
    for step in range(start_step, steps):
        metrics = unlearner.step(next(batches), jax.random.fold_in(base, step))
        if on_step is not None:
            on_step(step, metrics)
        if should_stop is not None and should_stop():
            return step + 1
    return steps


def host_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}
