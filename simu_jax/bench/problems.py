"""The problems a bench run times: models, batches, masks, and the jobs of each section.

Every model is LLaMA-style with random weights drawn with numpy; the batch is paired forget /
retain random tokens; the loss is GradDiff (``-NLL(forget) + NLL(retain)``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from simu_jax.base import IGNORE_INDEX
from simu_jax.bench.harness import AotCall, Job
from simu_jax.bench.profiles import STEP_METHODS, Profile, step_settings

__all__ = ["attribution_jobs", "compile_job", "count_params", "default_layer_loop", "default_remat",
           "graddiff_loss", "init_params",
           "make_batch", "model_config", "model_variants", "random_neuron_mask", "remat_jobs", "second_order_jobs",
           "second_order_size", "step_jobs", "step_setup"]


# ---------------------------------------------------------------------------------------
# Models, batches, masks
# ---------------------------------------------------------------------------------------


def model_config(p: Profile, hidden: int, intermediate: int, layers: int | None = None):
    from simu_jax.models import ModelConfig

    heads = max(1, hidden // p.head_dim)
    return ModelConfig(model_type="llama", vocab_size=p.vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers or p.layers, num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=p.head_dim, max_position_embeddings=max(2048, p.seq), initializer_range=0.02,
                       rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def init_params(cfg, seed: int = 0):
    """(graphdef, params) of a random model, drawn with numpy (no per-op XLA compiles).

    Kernels and embeddings ~ N(0, initializer_range^2), norm weights 1 (as `init_model`, with
    another random stream).
    """
    from flax import nnx

    from simu_jax.models import abstract_model

    graphdef, state = nnx.split(abstract_model(cfg))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if path[-1].key == "weight":  # RMSNorm
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray((cfg.initializer_range * rng.standard_normal(s.shape, np.float32)).astype(s.dtype))

    return graphdef, jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state))


def make_batch(p: Profile, seed: int = 0, scored: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Paired forget / retain batches of random tokens; the loss is on the second half (the answer).
    ``scored``: with the scored view (``positions`` / ``targets``, `data.with_scored_positions`)
    the unlearning loss computes the head at the label positions only, as `run_unlearn`'s steps do."""
    from simu_jax.data import with_scored_positions

    rng = np.random.default_rng(seed)
    out = {}
    for part in ("forget", "retain"):
        ids = rng.integers(3, p.vocab, size=(p.batch, p.seq)).astype(np.int32)
        labels = np.where(np.arange(p.seq)[None] >= p.seq // 2, ids, IGNORE_INDEX).astype(np.int32)
        out[part] = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
        if scored:
            out[part] = with_scored_positions(out[part])
    return out


def random_neuron_mask(layers: int, intermediate: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The same number of random neurons in every layer (so the compact rows have no padding)."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * intermediate)))
    selected = np.zeros((layers, intermediate), bool)
    for layer in range(layers):
        selected[layer, rng.choice(intermediate, size=k, replace=False)] = True
    return selected


def graddiff_loss(graphdef, params, batch, kwargs=None):
    """The GradDiff loss (gamma 1) of the model (graphdef, params) on a forget / retain batch."""
    from simu_jax.engine import part_logits
    from simu_jax.losses import unlearning_loss

    kwargs = kwargs or {}
    return unlearning_loss("graddiff", lambda b: part_logits(graphdef, params, b, **kwargs), batch, gamma=1.0)[0]


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------
# Sections: jobs
# ---------------------------------------------------------------------------------------


def second_order_jobs(p: Profile) -> list[tuple[dict[str, Any], list[Job]]]:
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    return [second_order_size(p, hidden, inter, batch) for hidden, inter in p.sizes]


def second_order_size(p: Profile, hidden: int, inter: int, batch) -> tuple[dict[str, Any], list[Job]]:
    """The programs of one model size (one function scope per size: the jitted closures trace later)."""
    from simu_jax import curvature as C
    from simu_jax.losses import nll_term
    from simu_jax.models import apply
    from simu_jax.selection import SIMU, Partition

    key = jax.random.key(0)
    cfg = model_config(p, hidden, inter)
    graphdef, params = init_params(cfg, seed=0)
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)
    loss = functools.partial(graddiff_loss, graphdef)
    nb = p.batch

    def logits_all(prm, b):  # forget and retain as one [2B, T] batch, the logits at their scored positions
        ids, mask, at = (jnp.concatenate([b["forget"][k], b["retain"][k]])
                         for k in ("input_ids", "attention_mask", "positions"))
        return apply(graphdef, prm, ids, mask, logits_at=at)

    def loss_of_logits(z, b):
        return -nll_term(z[:nb], b["forget"]["targets"]) + nll_term(z[nb:], b["retain"]["targets"])

    # the SIMU subset: differentiate only attention + the selected down_proj rows
    selected = random_neuron_mask(cfg.num_hidden_layers, inter, p.neuron_fraction, seed=0)
    part = Partition(params, SIMU, selected)
    trainable, frozen = part.split(params)
    v_sub = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), trainable)

    def loss_sub(tr, fr, b):
        full, kwargs = part.combine(tr, fr)
        return graddiff_loss(graphdef, full, b, kwargs)

    def hvp_revrev(prm, vv, b):  # reverse-over-reverse: grad_p <grad f(p), v>
        return jax.grad(lambda q: C.tree_vdot(jax.grad(loss)(q, b), vv))(prm)

    def linearized(prm, b):  # the gradient map linearized once, as the Newton-type solvers do
        return C.linearize(C.fold_transposed_dots(lambda q: jax.grad(loss)(q, b)), prm)[1]

    def hvp_lin1(prm, vv, b):  # the linearization and its first product
        return linearized(prm, b)(vv)

    def hvp_lin4(prm, vv, b):  # ... and 4 products in a loop, each on the last one's output, normalized (Lanczos)
        h = linearized(prm, b)

        def product(_, u):
            hu = h(u)
            norm = C.tree_norm(hu)
            return jax.tree.map(lambda x: x / norm.astype(x.dtype), hu)

        return jax.lax.fori_loop(0, 4, product, vv)

    programs = {
        "forward": (loss, (params, batch)),
        "grad": (jax.grad(loss), (params, batch)),
        "hvp": (lambda prm, vv, b: C.hvp(loss, prm, vv, b), (params, v, batch)),
        "ggn_vp": (lambda prm, vv, b: C.ggn_vp(lambda q: logits_all(q, b), lambda z: loss_of_logits(z, b), prm, vv),
                   (params, v, batch)),
        "hutchinson": (lambda prm, k, b: C.hutchinson_diagonal(loss, prm, k, 1, b), (params, key, batch)),
        "grad_simu": (jax.grad(loss_sub), (trainable, frozen, batch)),
        "hvp_simu": (lambda tr, vv, fr, b: C.hvp(loss_sub, tr, vv, fr, b), (trainable, v_sub, frozen, batch)),
    }
    ops = list(p.ops)
    if (hidden, inter) == tuple(p.sizes[-1]) and "grad" in ops and "hvp" in ops:
        for op in p.hvp_variants:
            if op == "hvp_revrev":
                programs[op] = (hvp_revrev, (params, v, batch))
            elif op in ("hvp_lin1", "hvp_lin4"):
                programs[op] = (hvp_lin1 if op == "hvp_lin1" else hvp_lin4, (params, v, batch))
            else:
                raise ValueError(f"unknown HVP variant {op!r}")
            ops.append(op)
    jobs = []
    for op in ops:
        fn, args = programs[op]
        jobs.append(Job(f"second_order/h{hidden}/{op}", AotCall(fn, *args)))
    row = {"hidden": hidden, "intermediate": inter, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
           "heads": cfg.num_attention_heads, "num_params": count_params(params),
           "num_params_simu": count_params(trainable), "tokens_per_call": 2 * p.batch * p.seq}
    return row, jobs


def attribution_jobs(p: Profile) -> list[Job]:
    """IG attribution (`attribution.neuron_scores`, m = `p.attribution_steps`) of the step config's
    forget rows on a `p.attribution_layers`-layer model (the step config's other sizes), and the
    gradient of the same rows' token-mean NLL (GradDiff's forget half; all parameters) of that model."""
    from simu_jax.attribution import neuron_scores
    from simu_jax.engine import part_logits
    from simu_jax.losses import nll_term, scored_targets

    cfg = model_config(p, *p.sizes[p.step_size], layers=p.attribution_layers)
    graphdef, params = init_params(cfg, seed=0)
    rows = jax.tree.map(jnp.asarray, make_batch(p, seed=0)["forget"])

    def nll(prm, b):  # as the unlearning loss computes it: the head at the scored positions
        return nll_term(part_logits(graphdef, prm, b), scored_targets(b))

    return [Job("attribution/ig", lambda: neuron_scores(graphdef, params, [rows], method="ig",
                                                        steps=p.attribution_steps)),
            Job("attribution/grad", AotCall(jax.grad(nll), params, rows))]


def model_variants(p: Profile) -> dict[str, dict[str, str]]:
    """name -> the `abstract_model` keywords of each model variant the remat section times: every
    policy of `p.remat_compare` (name: the policy) and every loop of `p.layer_loop_compare` (name
    ``layer_loop=<loop>``)."""
    return ({policy: {"remat": policy} for policy in p.remat_compare}
            | {f"layer_loop={loop}": {"layer_loop": loop} for loop in p.layer_loop_compare})


def remat_jobs(p: Profile) -> list[Job]:
    """Gradient and exact HVP at the step config with the models of `model_variants(p)`."""
    from flax import nnx

    from simu_jax import curvature as C
    from simu_jax.models import abstract_model

    if not model_variants(p):
        return []
    hidden, inter = p.sizes[p.step_size]
    cfg = model_config(p, hidden, inter)
    _, params = init_params(cfg, seed=0)
    rng = np.random.default_rng(1)  # the second-order section's v
    v = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    jobs = []
    for name, kwargs in model_variants(p).items():
        graphdef, _ = nnx.split(abstract_model(cfg, **kwargs))
        loss = functools.partial(graddiff_loss, graphdef)
        jobs.append(Job(f"remat/{name}/grad", AotCall(jax.grad(loss), params, batch)))
        jobs.append(Job(f"remat/{name}/hvp", AotCall(lambda prm, vv, b, loss=loss: C.hvp(loss, prm, vv, b),
                                                      params, v, batch)))
    return jobs


def default_remat() -> str:
    """The remat policy `init_model` builds models with when none is given."""
    import inspect

    from simu_jax.models import init_model

    return inspect.signature(init_model).parameters["remat"].default


def default_layer_loop(layers: int) -> str:
    """How `init_model`'s default layer loop runs a model of ``layers`` layers, e.g. ``auto: unrolled``."""
    import inspect

    from simu_jax.models import init_model
    from simu_jax.models.transformer import unrolls

    loop = inspect.signature(init_model).parameters["layer_loop"].default
    return f"{loop}: {'unrolled' if unrolls(loop, layers) else 'scan'}"


def step_setup(p: Profile) -> dict[str, Any]:
    """The step / peer config: model, params, batch and neuron mask."""
    from simu_jax.models import merge_params

    hidden, inter = p.sizes[p.step_size]
    cfg = model_config(p, hidden, inter)
    graphdef, params = init_params(cfg, seed=0)
    return {"cfg": cfg, "graphdef": graphdef, "params": params, "model": merge_params(graphdef, params),
            "batch": make_batch(p, seed=0),
            "selected": random_neuron_mask(cfg.num_hidden_layers, inter, p.neuron_fraction, seed=0)}


def step_jobs(p: Profile, setup: dict[str, Any]) -> list[tuple[str, Any, dict, Job]]:
    """(label, Unlearner, box, job) of each method of `p.methods`: the job runs one `step`; the box
    keeps its last metrics (``m``) and the loss of its first call (``first_loss``)."""
    from simu_jax.engine import Unlearner, get_method

    batch = jax.tree.map(jnp.asarray, setup["batch"])
    base_key = jax.random.key(0)
    out = []
    for label in p.methods:
        name, overrides = STEP_METHODS[label]
        is_simu = name.startswith("simu")
        u = Unlearner(setup["graphdef"], setup["params"], get_method(name), step_settings(p, **overrides),
                      selected=setup["selected"] if is_simu else None)
        box: dict[str, Any] = {}

        def call(u=u, box=box):
            box["m"] = u.step(batch, jax.random.fold_in(base_key, u.step_count))
            box.setdefault("first_loss", box["m"]["loss"])
            return u.trainable

        out.append((label, u, box, Job(f"steps/{label}", call)))
    return out


def compile_job(p: Profile, layers: int) -> Job:
    """The first call of a fresh simu_graddiff Unlearner at `layers` layers (compiles its step)."""
    from simu_jax.engine import Unlearner, get_method

    cfg = model_config(p, *p.compile_dims, layers=layers)
    graphdef, params = init_params(cfg, seed=0)
    selected = random_neuron_mask(layers, cfg.intermediate_size, p.neuron_fraction, seed=0)
    u = Unlearner(graphdef, params, get_method("simu_graddiff"), step_settings(p), selected=selected)
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    key = jax.random.key(0)
    return Job(f"compile/{layers}", lambda: u.step(batch, key)["loss"])
