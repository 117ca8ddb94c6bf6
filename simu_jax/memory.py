"""A memory model of one unlearning run: bytes by part, whole model and per device.

:func:`memory_estimate` builds the run's real trees without allocating anything (the abstract
model, the trainable subset of :class:`simu_jax.selection.Partition`, the optimizer state of
``engine.build_optimizer`` via ``jax.eval_shape``), so params, gradients and optimizer /
curvature state are exact counts; activations, the step's largest transient and the
attribution phase come from the formulas below (docs/scaling.md#memory, measured against
XLA's ``memory_analysis`` in tests/test_memory.py). :func:`per_device` divides each tree leaf
by the shards the sharding rules give it (``param_partition_specs``) and the activations by
the batch axes that divide the rows (``logical_to_spec(("batch", "length"), ...)``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from simu_jax.sharding.mesh import DEFAULT_RULES, MESH_AXES, logical_to_spec, param_partition_specs, parse_mesh_spec

__all__ = [
    "param_counts",
    "activation_bytes_per_row",
    "memory_estimate",
    "per_device",
    "mesh_sizes",
    "memory_table",
    "print_memory_table",
    "PRESETS",
    "LLAMA2_7B",
    "LLAMA2_70B",
    "OLMO_1B",
    "OLMO_7B",
]


def _cfg(**kw):
    from simu_jax.models import ModelConfig

    return ModelConfig(**kw)


def _presets():
    return {
        "LLaMA-2-7B": _cfg(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                           max_position_embeddings=4096),
        "LLaMA-2-70B": _cfg(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                            num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                            max_position_embeddings=4096),
        "OLMo-1B": _cfg(model_type="olmo", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                        max_position_embeddings=4096, tie_word_embeddings=True),
        # OLMo-7B: mlp_hidden_size 22016 is the fused gate+up width, so 11008 per SwiGLU half
        "OLMo-7B": _cfg(model_type="olmo", vocab_size=50304, hidden_size=4096, intermediate_size=11008,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128),
    }


PRESETS = _presets()
LLAMA2_7B, LLAMA2_70B, OLMO_1B, OLMO_7B = PRESETS.values()

F32_BYTES = 4  # attention scores / softmax, logits, attribution buffers: float32 whatever the compute dtype


def param_counts(cfg) -> dict[str, int]:
    """Parameter counts by group: embed, lm_head, attention, mlp_gate_up, mlp_down, norms, total."""
    h, i, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = n_layers * (2 * h * qd + 2 * h * kvd)
    if cfg.model_type == "llama":
        norms = n_layers * 2 * h + h
    elif cfg.model_type == "olmo2":
        norms = n_layers * (2 * h + qd + kvd) + h
    else:  # OLMo-1: LayerNorm without parameters
        norms = 0
    counts = {
        "embed": cfg.vocab_size * h,
        "lm_head": 0 if cfg.tie_word_embeddings else h * cfg.vocab_size,
        "attention": attention,
        "mlp_gate_up": n_layers * 2 * h * i,
        "mlp_down": n_layers * i * h,
        "norms": norms,
    }
    counts["total"] = sum(counts.values())
    return counts


# ----------------------------------------------------------------------------
# Activations (per row of T tokens)
# ----------------------------------------------------------------------------


def activation_bytes_per_row(cfg, seq_len: int, compute_bytes: int, remat: str = "none", trainable=None,
                             neuron_rows: int = 0) -> int:
    """Bytes one row of ``seq_len`` = T tokens keeps for the backward pass (b = compute dtype
    bytes; what ``jax.ad_checkpoint.print_saved_residuals`` lists for a layer, less what XLA
    fuses away, measured in tests/test_memory.py). ``trainable``: the method's
    ``selection.TrainableSpec`` (default all): a frozen matmul keeps no copy of its input.

        layer   T*b*(2H + Hq*D + 2*KV*D + 5I)    the layer input and the mid residual; q and k
                                                 after RoPE, v; gate, up and three silu values
              + T*b*(3H + Hq*D)                  attention trained: the [tokens, H] view each of
                                                 the q, k, v matmuls saves of its input, and the
                                                 attention output (o_proj's input)
              + T*b*(2H + I)                     MLP trained (full): gate's and up's input views,
                                                 down's input (the product); ``down``: I only;
              + T*b*K                            ``masked`` (SIMU): the K trained neurons' values
              + T*4*2H                           the two norms' float32 normalized values
              + Hq*T*T*(2*4 + b if b != 4)       float32 masked scores and softmax output (+ the
                                                 probabilities' cast to the compute dtype)
        head    T*(b*H + 3*4*V)                  final norm output; float32 logits, log-softmax
                                                 and their gradient (an upper bound for the
                                                 unlearning steps, which take the head at the P
                                                 label positions only: P*(...) there)
        none    L * layer + head
        full    L * T*b*H + layer + head         the layer inputs; one layer recomputed at a time
        dots    L * T*b*(3H + Hq*D + 2*KV*D + 2I) + layer + head
                    the 2-D matmul outputs (q, k, v, o, gate, up, down: what
                    ``dots_with_no_batch_dims_saveable`` keeps) and the layer input, one layer
                    recomputed at a time (XLA recomputes more cleverly: an upper bound)
    """
    b, t = compute_bytes, seq_len
    h, i, n_layers, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    qd, kvd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    attention = trainable is None or trainable.attention == "full"
    mlp = "full" if trainable is None else trainable.mlp
    saved = (2 * h + qd + 2 * kvd + 5 * i + (3 * h + qd if attention else 0)
             + {"full": 2 * h + i, "down": i, "masked": neuron_rows, "frozen": 0}[mlp])
    scores = cfg.num_attention_heads * t * t * (2 * F32_BYTES + (b if b != F32_BYTES else 0))
    layer = t * b * saved + t * F32_BYTES * 2 * h + scores
    head = t * (b * h + 3 * F32_BYTES * v)
    if remat == "none":
        return n_layers * layer + head
    if remat == "full":
        return n_layers * t * b * h + layer + head
    if remat == "dots":
        return n_layers * t * b * (3 * h + qd + 2 * kvd + 2 * i) + layer + head
    raise ValueError(f"remat={remat!r}; allowed: none, full, dots")


# ----------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What :func:`per_device` needs to redo the count on a mesh."""

    model_config: Any
    params: Any  # the step's params: trainable + frozen trees (abstract)
    trainable: Any  # the trainable subset (abstract, param dtype)
    source: Any  # the loaded leaves the run keeps besides the Unlearner's own copies (abstract)
    model: Any  # the loaded model (abstract): what the attribution phase holds
    opt_state: Any  # abstract optimizer state
    tx: Any
    batch_size: int  # rows of each part (forget, retain) the step back-propagates through
    seq_len: int
    row_bytes: int  # activation_bytes_per_row
    vectors: tuple[int, int]  # transient trainable-sized vectors: (float32 ones, param-dtype ones)
    residual_sets: int  # transient: extra sets of the step's activations (HVP linearization residuals)
    attribution_rows: int | None
    attribution_steps: int
    attribution_row_bytes: tuple[int, int]  # per row: the alpha = 1 pass, a suffix run
    compute_bytes: int


def _nbytes(x) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _transient_counts(method, optim_spec) -> tuple[tuple[int, int], int]:
    """The step's largest transient beyond gradients and activations: ``((f32 vectors,
    param-dtype vectors), residual sets)``, vectors the size of the trainable subset, residual
    sets the size of the step's activations.

    adamw               nothing (m and v are updated in place)
    sophia fisher       1 f32: g*g
    sophia gnb          1 f32 + 1 param: the sampled loss's gradient and its square (its
                        forward/backward runs after the step's, in the same activation space)
    sophia hutchinson   1 f32 + 2 param: the running sum, probe u and H u; + 3 residual sets
    newton              tr_solver steihaug: 5 f32, Steihaug-CG's g, z, r, d and B d; lanczos /
                        saddle_free (newton's default): cg_iters + 4 f32, the Lanczos basis and
                        v_prev, v, w and the flat g; + 3 residual sets
    ggn                 as newton, by its tr_solver (default steihaug)
    influence           6 f32: CG's b, x, r, p, A p and grad L_F

    Residual sets: linearizing the gradient map (hutchinson, newton) keeps the forward's and
    the backward's values and the tangent pass works through them (measured 2.6-2.9 sets of
    the activations on a tiny LLaMA, docs/scaling.md#memory); ggn / influence linearize the
    model's forward, whose residuals are the activations themselves, and transpose it (measured:
    no extra set).
    """
    if method.optimizer == "adamw":
        return (0, 0), 0
    if method.optimizer == "sophia":
        return {"fisher": ((1, 0), 0), "gnb": ((1, 1), 0), "hutchinson": ((1, 2), 3)}[optim_spec.estimator]
    if method.optimizer == "influence":
        return (6, 0), 0
    solver = optim_spec.resolved(method.optimizer).tr_solver
    vectors = 5 if solver == "steihaug" else optim_spec.cg_iters + 4
    return (vectors, 0), (3 if method.optimizer == "newton" else 0)


def memory_estimate(model_config, method, *, settings=None, batch_size: int = 8, seq_len: int = 256,
                    dtype: str = "float32", compute_dtype: str | None = None, remat: str = "none",
                    mlp_fraction: float = 0.05, neuron_rows: int | None = None,
                    attribution_batch_size: int | None = None, attribution_steps: int = 3) -> dict[str, Any]:
    """Bytes of one unlearning run by part, whole model (before sharding).

    ``method``: an ``engine.METHODS`` name (``simu_graddiff``, ``so_npo``, ...) or an
    ``engine.Method``; ``settings``: its ``engine.StepSettings`` (default: the defaults), whose
    optimizer and curvature estimator the state and the transient follow (Hutchinson's probes
    run one at a time: ``num_probes`` does not change the memory). A step sees
    ``batch_size`` forget + ``batch_size`` retain rows of ``seq_len`` tokens. ``dtype`` /
    ``compute_dtype`` / ``remat`` as in :class:`simu_jax.models.spec.ModelSpec` (float32 by
    default, as there). Masked methods (SIMU) train ``neuron_rows`` (K) down_proj rows per
    layer, default ``ceil(mlp_fraction * I)``. ``attribution_batch_size``: the IG attribution
    phase's batch (None = no attribution, e.g. a given mask), ``attribution_steps`` its m.

    Returns ``params`` (the step's trainable + frozen trees: the model, plus SIMU's compact
    [L, K, H] rows), ``source_params`` (the loaded leaves the run keeps besides the
    Unlearner's private copies: its trainable leaves and, for SIMU, the original down_proj),
    ``gradients`` (trainable, param dtype), ``optimizer_state`` (AdamW m + v, Sophia m,
    Newton-type scalars), ``curvature_state`` (Sophia's h), ``activations``, ``transient``
    (the step's largest extra: the curvature estimate's buffers and HVP residuals),
    ``step`` (their sum), ``attribution`` (the IG phase's buffers, besides the loaded model),
    ``attribution_phase`` (loaded model + those), ``peak`` = max(step, attribution_phase)
    (attribution runs before the step; its buffers are freed first); plus ``trainable`` and
    ``total_params`` counts and ``layout`` (for :func:`per_device`).
    """
    from simu_jax.engine import StepSettings, build_optimizer, get_method, resolve_settings
    from simu_jax.models import abstract_model, split_params
    from simu_jax.models.spec import jnp_dtype
    from simu_jax.selection import DOWN, Partition, TrainableSpec, count_trainable, get_path

    method = get_method(method) if isinstance(method, str) else method
    settings = settings if settings is not None else StepSettings()
    if settings.total_steps is None:  # a linear schedule needs a horizon; memory does not depend on it
        settings = dataclasses.replace(settings, total_steps=1)
    settings = resolve_settings(method, settings)
    compute_bytes = np.dtype(jnp_dtype(compute_dtype or dtype)).itemsize
    _, model = split_params(abstract_model(model_config, param_dtype=jnp_dtype(dtype)))
    n_layers, width = model_config.num_hidden_layers, model_config.intermediate_size
    selected, k = None, 0
    if method.trainable.mlp == "masked":
        k = neuron_rows if neuron_rows is not None else math.ceil(mlp_fraction * width)
        if not 1 <= k <= width:
            raise ValueError(f"neuron_rows must be in [1, {width}], got {k}")
        selected = np.zeros((n_layers, width), bool)
        selected[:, :k] = True
    part = Partition(model, method.trainable, selected)
    trainable = jax.eval_shape(part.take, model)
    frozen = part.frozen_from(model)  # the zeroed down_proj has down_proj's shape
    source = {part.leaf_key(p): get_path(model, p) for p in part.paths}
    if part.row_index is not None:
        source[part.leaf_key(DOWN)] = get_path(model, DOWN)
    tx = build_optimizer(method, settings, part.optimizer_mask(trainable))
    opt_state = jax.eval_shape(tx.init, trainable) if tx is not None else ()
    vectors, residual_sets = _transient_counts(method, settings.optim)
    # attribution differentiates the MLP activations only (no weight: no matmul input saved); its
    # suffix runs keep the matmul outputs of each layer (dots remat in CausalLM.run's lax.switch)
    no_weights = TrainableSpec(attention="frozen", mlp="frozen", rest="frozen")
    attribution_row_bytes = (activation_bytes_per_row(model_config, seq_len, compute_bytes, remat, no_weights),
                             activation_bytes_per_row(model_config, seq_len, compute_bytes,
                                                      "full" if remat == "full" else "dots"))
    layout = _Layout(model_config=model_config, params={"trainable": trainable, "frozen": frozen},
                     trainable=trainable, source=source, model=model, opt_state=opt_state, tx=tx,
                     batch_size=batch_size, seq_len=seq_len,
                     row_bytes=activation_bytes_per_row(model_config, seq_len, compute_bytes, remat,
                                                        method.trainable, k),
                     vectors=vectors, residual_sets=residual_sets, attribution_rows=attribution_batch_size,
                     attribution_steps=attribution_steps, attribution_row_bytes=attribution_row_bytes,
                     compute_bytes=compute_bytes)
    est = _parts(layout, {})
    est["trainable"] = count_trainable(part, trainable)
    est["total_params"] = param_counts(model_config)["total"]
    est["layout"] = layout
    return est


def _shards(spec, sizes: Mapping[str, int]) -> int:
    """How many pieces a PartitionSpec cuts an array into on a mesh of ``sizes``."""
    axes = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(sizes.get(a, 1) for a in axes)


def _row_shards(rows: int, seq_len: int, sizes: Mapping[str, int]) -> int:
    """The batch axes that divide ``rows`` (the rule every batch placement uses)."""
    return _shards(logical_to_spec(("batch", "length"), (rows, seq_len), sizes, DEFAULT_RULES), sizes)


def _parts(layout: _Layout, sizes: Mapping[str, int]) -> dict[str, int]:
    """The parts of :func:`memory_estimate` on a mesh of ``sizes`` (``{}``: the whole model)."""
    import optax.tree_utils as otu
    from jax.sharding import PartitionSpec

    from simu_jax.optim import SophiaState

    cfg = layout.model_config
    is_spec = lambda s: isinstance(s, PartitionSpec)  # noqa: E731

    def specs(tree):
        return param_partition_specs(tree, DEFAULT_RULES, sizes, cfg)

    def tree_bytes(tree):  # each leaf's bytes over its shard count (norms replicated, odd dims counted right)
        return sum(_nbytes(x) // _shards(s, sizes)
                   for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(specs(tree), is_leaf=is_spec)))

    # optimizer state: every params-shaped leaf sharded like its trainable leaf, the rest (counts) whole
    state = 0
    curvature = 0
    if layout.tx is not None:
        per_leaf = otu.tree_map_params(layout.tx, lambda x, s: _nbytes(x) // _shards(s, sizes), layout.opt_state,
                                       specs(layout.trainable), transform_non_params=_nbytes, is_leaf=is_spec)
        state = sum(jax.tree.leaves(per_leaf))
        sophia = [s for s in jax.tree.leaves(per_leaf, is_leaf=lambda s: isinstance(s, SophiaState))
                  if isinstance(s, SophiaState)]
        curvature = sum(jax.tree.leaves(sophia[0].hessian)) if sophia else 0
    gradients = tree_bytes(layout.trainable)  # the gradient has the trainable leaves' shapes and dtype
    param_bytes = np.dtype(jax.tree.leaves(layout.trainable)[0].dtype).itemsize
    trainable_elements = gradients // param_bytes
    # forget and retain are placed (and split over the batch axes) separately, batch_size rows each
    activations = 2 * layout.row_bytes * (layout.batch_size // _row_shards(layout.batch_size, layout.seq_len, sizes))
    f32_vectors, param_vectors = layout.vectors
    transient = (trainable_elements * (F32_BYTES * f32_vectors + param_bytes * param_vectors)
                 + layout.residual_sets * activations)
    out = {
        "params": tree_bytes(layout.params),
        "source_params": tree_bytes(layout.source),
        "gradients": gradients,
        "optimizer_state": state - curvature,
        "curvature_state": curvature,
        "activations": activations,
        "transient": transient,
    }
    out["step"] = sum(out.values())
    out["attribution"] = _attribution_bytes(layout, sizes)
    out["attribution_phase"] = tree_bytes(layout.model) + out["attribution"] if out["attribution"] else 0
    out["peak"] = max(out["step"], out["attribution_phase"])
    return out


def _attribution_bytes(layout: _Layout, sizes: Mapping[str, int]) -> int:
    """The IG phase's buffers (``attribution._ig_scores``) on B rows (split over the batch axes
    that divide B), besides the loaded model; b = compute bytes, m = steps:

        held     L*B*T*(4*I + b*I + b*H)   dLL/da at alpha = 1 (float32), the MLP activations
                                           and the mid residuals, kept for the whole batch,
                 + m*2*b*L*B*T*KV*D        and the alpha = 1 pass's keys and values, once and
                                           tiled m-1 times for the suffix runs (when answers
                                           start late enough to cut a prefix: counted always)
        alpha 1  B rows' activations        one forward + backward of all layers, no weight
                                            trained (``activation_bytes_per_row``, all frozen)
        m > 1    (m-1)*B rows' activations  per layer, sequentially (lax.map): a suffix run on
                                            the m-1 other alphas stacked on the batch axis,
                                            saving the matmul outputs (the ``dots`` formula;
                                            on T columns, an upper bound for the cut suffix),
                 + 2*4*(m-1)*B*T*I          its float32 scaled neurons [(m-1)B, T, I] and their
                                            gradient, and
                 + 4*L*B*T*I                lax.map's stacked per-layer sums
        (the logits of the answer positions only: the per-row formula's T positions bound them)
        total    held + max(alpha 1, m > 1)
    """
    if not layout.attribution_rows:
        return 0
    c, t, m = layout.model_config, layout.seq_len, layout.attribution_steps
    n_layers, width, h, b = c.num_hidden_layers, c.intermediate_size, c.hidden_size, layout.compute_bytes
    rows = layout.attribution_rows // _row_shards(layout.attribution_rows, t, sizes)
    kv = 2 * b * n_layers * rows * t * c.num_key_value_heads * c.head_dim
    held = n_layers * rows * t * (F32_BYTES * width + b * width + b * h) + (m if m > 1 else 0) * kv
    first_row, suffix_row = layout.attribution_row_bytes
    suffix = 0
    if m > 1:
        suffix = ((m - 1) * rows * suffix_row + 2 * F32_BYTES * (m - 1) * rows * t * width
                  + F32_BYTES * n_layers * rows * t * width)
    return held + max(rows * first_row, suffix)


def mesh_sizes(mesh) -> dict[str, int]:
    """A Mesh, a ``{axis: size}`` dict or a spec string -> ``{axis: size}``."""
    if isinstance(mesh, jax.sharding.Mesh):
        return {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}
    if isinstance(mesh, str):  # the sizes give the device count; a -1 axis takes this host's devices
        fixed = [int(p.split("=", 1)[1]) for p in mesh.split(",") if "=" in p]
        return parse_mesh_spec(mesh, None if -1 in fixed else math.prod(fixed))
    return {a: int(mesh.get(a, 1)) for a in MESH_AXES}


def per_device(estimate: Mapping[str, Any], mesh) -> dict[str, Any]:
    """The parts of ``estimate`` on one device of ``mesh`` (a Mesh, ``{axis: size}`` or a spec
    like ``"data=2,fsdp=4"``) under :data:`DEFAULT_RULES`: each param / gradient / state leaf
    over the shards its PartitionSpec gives it, activations and the HVP residuals over the
    batch axes that divide ``batch_size`` (each part's rows: forget and retain are placed
    separately; the mesh step keeps them there, ``sharding.activation_sharding``: measured
    against XLA's per-device temp bytes in tests/test_sharding.py), the attribution buffers over those dividing its batch (rows that divide no
    axis are counted whole: replicated). Tensor parallelism's split of the attention / MLP
    activations is not counted (an upper bound). Adds ``devices``."""
    sizes = mesh_sizes(mesh)
    out = _parts(estimate["layout"], sizes)
    out["devices"] = math.prod(sizes.values())
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


TABLE_PARTS = ("params", "source_params", "gradients", "optimizer_state", "curvature_state", "activations",
               "transient", "attribution_phase", "peak")


def memory_table(models: Mapping[str, Any] | None = None, meshes: Sequence[str] = ("fsdp=8",),
                 methods: Sequence[str] = ("fo_graddiff", "so_graddiff", "simu_graddiff"), **kwargs) -> str:
    """A markdown table of :func:`per_device` (GiB per device) for each model x mesh x method;
    ``kwargs`` go to :func:`memory_estimate` (masked methods get ``attribution_batch_size=8``
    unless given)."""
    from simu_jax.engine import get_method

    models = PRESETS if models is None else models
    lines = ["| model | mesh | method | " + " | ".join(TABLE_PARTS).replace("_", " ") + " |",
             "|---|---|---|" + "---:|" * len(TABLE_PARTS)]
    for name, cfg in models.items():
        for method in methods:
            kw = dict(kwargs)
            if get_method(method).trainable.mlp == "masked":
                kw.setdefault("attribution_batch_size", 8)
            est = memory_estimate(cfg, method, **kw)
            for mesh in meshes:
                dev = per_device(est, mesh)
                lines.append(f"| {name} | {mesh} | {method} | " + " | ".join(_gib(dev[k]) for k in TABLE_PARTS) + " |")
    return "\n".join(lines)


def print_memory_table(models: Mapping[str, Any] | None = None, meshes: Sequence[str] = ("fsdp=8",),
                       methods: Sequence[str] = ("fo_graddiff", "so_graddiff", "simu_graddiff"), **kwargs) -> None:
    print(memory_table(models, meshes, methods, **kwargs))
