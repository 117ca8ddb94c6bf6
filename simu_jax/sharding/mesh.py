"""Device meshes, logical-axis sharding rules, and the shardings of params, state, masks and batches.

JAX's SPMD partitioner is the distributed engine: parameters, optimizer state and batches
are placed with ``jax.device_put(x, NamedSharding(mesh, spec))`` and the compiled step is a
``jax.jit`` whose ``out_shardings`` pin the new parameters and optimizer state to the same
layout, so a step never drifts to another one. No ``pjit``, no ``with mesh:``.

Mesh: three named axes, always in this order::

    data    pure data parallelism (parameters replicated over it)
    fsdp    data parallelism with parameters, gradients and optimizer state sharded over it
    tensor  tensor (model) parallelism: heads, MLP neurons and the vocabulary are split

built from a spec like ``"data=2,fsdp=4,tensor=1"`` (:func:`parse_mesh_spec`,
:func:`make_mesh`). The mesh axes are ``AxisType.Auto``: sharding is decided by the
shardings of the inputs and outputs of ``jax.jit`` and propagated through the model by
the compiler. ``Explicit`` axes would make every intermediate's sharding part of its type
and require the model code to resolve each ambiguous contraction itself (e.g. a matmul
over an fsdp-sharded hidden axis) with ``out_sharding=`` annotations; the model code is
written sharding-agnostic, so Auto is the deliberate choice (see docs/scaling.md).

Logical axes: every parameter dimension has a logical name (:func:`logical_axes`)::

    embed     the hidden size H           vocab    the vocabulary V
    q_heads   query heads x head_dim      kv_heads key/value heads x head_dim
    mlp       MLP neurons I (also the K compact SIMU rows, and neuron masks)
    layers    the stacked layer axis L    norm     norm weights (small: replicated)

and activations use ``batch`` and ``length``. ``rules`` map logical names to mesh axes
(:data:`DEFAULT_RULES`: FSDP over ``fsdp`` on the hidden axis, tensor parallelism on
heads / neurons / vocab, the batch over ``(data, fsdp)``).

Divisibility rule (one rule everywhere): a dimension mapped to mesh axes ``(a1, a2, ...)``
is sharded over the longest prefix ``(a1, ..., aj)`` whose size product divides the
dimension; if none does it is replicated. For ``q_heads`` / ``kv_heads`` the number of
heads (not heads x head_dim) must be divisible when a ``ModelConfig`` is given, so a head
is never split across devices. A mesh axis is used at most once per array (a later
dimension that maps to an axis already used is replicated). SIMU's compact rows
``down_rows`` [L, K, H] are sharded like ``down_proj``'s rows ([L, I, H] -> layers, mlp,
embed); K is whatever the mask gives, so with ``tensor=4`` and K = 6 the K dimension is
replicated and only H is sharded over ``fsdp``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "parse_mesh_spec",
    "make_mesh",
    "mesh_description",
    "replicated",
    "logical_axes",
    "logical_to_spec",
    "param_partition_specs",
    "param_shardings",
    "replication_problems",
    "check_layout",
    "device_put_tree",
    "shard_params",
    "opt_state_shardings",
    "shard_opt_state",
    "mask_partition_spec",
    "shard_mask",
    "batch_sharding",
    "batch_shardings",
    "logical_constraint",
    "activation_sharding",
    "hashable_rules",
    "constrain_like",
]

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis | tuple of mesh axes | None (replicated)
DEFAULT_RULES: dict[str, Any] = {
    # activations
    "batch": ("data", "fsdp"),
    "length": None,
    # parameters
    "embed": "fsdp",
    "vocab": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "norm": None,
}


# ----------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------


def parse_mesh_spec(spec: str | Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
    """``"data=2,fsdp=4,tensor=1"`` -> ``{"data": 2, "fsdp": 4, "tensor": 1}``.

    Axes not named get size 1; one axis may be ``-1`` ("the rest of the devices"). The
    sizes must multiply to ``num_devices`` (default: ``jax.device_count()``, all
    processes). Raises a one-line ``ValueError`` naming the spec and the device count.
    """
    if num_devices is None:
        num_devices = jax.device_count()
    text = spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in spec.items())

    def fail(why: str):
        raise ValueError(f"--mesh {text!r}: {why} (device count {num_devices}; "
                         f"axes {', '.join(MESH_AXES)}, e.g. 'data=2,fsdp=4,tensor=1', -1 = the rest)")

    sizes: dict[str, int] = {}
    items = spec.items() if isinstance(spec, Mapping) else (
        [tuple(p.split("=", 1)) if "=" in p else (p, None) for p in (s.strip() for s in text.split(",")) if p])
    for name, value in items:
        name = str(name).strip()
        if name not in MESH_AXES:
            fail(f"unknown axis {name!r}")
        if name in sizes:
            fail(f"axis {name!r} given twice")
        try:
            size = int(str(value).strip())
        except ValueError:
            fail(f"size of {name!r} is not an integer: {value!r}")
        if size == 0 or size < -1:
            fail(f"size of {name!r} must be positive or -1, got {size}")
        sizes[name] = size
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        fail("only one axis may be -1")
    known = math.prod(v for v in sizes.values() if v != -1)
    if rest:
        if num_devices % known:
            fail(f"the fixed axes multiply to {known}, which does not divide the device count")
        sizes[rest[0]] = num_devices // known
    out = {a: sizes.get(a, 1) for a in MESH_AXES}
    if math.prod(out.values()) != num_devices:
        fail(f"axis sizes multiply to {math.prod(out.values())}, not to the device count")
    return out


def make_mesh(spec: str | Mapping[str, int] = "fsdp=-1", devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A ``(data, fsdp, tensor)`` mesh over all devices (or ``devices``), Auto axis types.

    ``jax.make_mesh`` orders devices for the physical topology (ICI rings on TPU) with the
    last axis (``tensor``, the most communication-heavy) innermost.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_description(mesh: jax.sharding.Mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ----------------------------------------------------------------------------
# Logical axes of parameters
# ----------------------------------------------------------------------------

# parameter name (last two path components) -> logical axes of the unstacked array
_PARAM_AXES: dict[tuple[str, str], tuple[str, ...]] = {
    ("embed_tokens", "embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_proj", "kernel"): ("embed", "q_heads"),
    ("k_proj", "kernel"): ("embed", "kv_heads"),
    ("v_proj", "kernel"): ("embed", "kv_heads"),
    ("o_proj", "kernel"): ("q_heads", "embed"),
    ("gate_proj", "kernel"): ("embed", "mlp"),
    ("up_proj", "kernel"): ("embed", "mlp"),
    ("down_proj", "kernel"): ("mlp", "embed"),
}
# SIMU's compact neuron rows: rows of down_proj
_FLAT_AXES: dict[str, tuple[str, ...]] = {"down_rows": ("layers", "mlp", "embed")}


def _path_names(path) -> tuple[str, ...]:
    """Key path -> tuple of names; flat keys 'a/b/kernel' are split on '/'."""
    names: list[str] = []
    for k in path:
        if isinstance(k, str):
            name = k
        elif hasattr(k, "key"):  # DictKey
            name = k.key
        elif hasattr(k, "name"):  # GetAttrKey
            name = k.name
        elif hasattr(k, "idx"):  # SequenceKey
            name = str(k.idx)
        else:
            name = str(k)
        names.extend(str(name).split("/"))
    return tuple(names)


def logical_axes(path, ndim: int) -> tuple[str | None, ...]:
    """Logical axis names of the parameter at ``path`` (key path, tuple of names, or 'a/b/c').

    Stacked layer parameters get a leading ``layers`` axis. Raises ``KeyError`` for a name
    with no rule, so a new parameter kind gets an explicit sharding decision.
    """
    names = _path_names((path,) if isinstance(path, str) else path)
    if names and names[-1] in _FLAT_AXES:
        base = _FLAT_AXES[names[-1]]
    elif len(names) >= 2 and tuple(names[-2:]) in _PARAM_AXES:
        base = _PARAM_AXES[tuple(names[-2:])]
    elif names and names[-1] == "weight":  # RMSNorm / QK-norm weights
        base = ("norm",)
    else:
        raise KeyError(f"no logical axes for parameter {'/'.join(names)!r} (ndim {ndim})")
    if ndim == len(base) + 1:
        return ("layers",) + base
    if ndim == len(base):
        return base
    raise ValueError(f"parameter {'/'.join(names)!r}: ndim {ndim} does not fit logical axes {base}")


def _mesh_axes(rule) -> tuple[str, ...]:
    if rule is None:
        return ()
    if isinstance(rule, str):
        return (rule,)
    return tuple(rule)


def _axis_sizes(mesh) -> dict[str, int] | None:
    """Mesh (or AbstractMesh, or a {axis: size} dict) -> {axis: size}; None stays None."""
    if mesh is None:
        return None
    if isinstance(mesh, Mapping):
        return {str(k): int(v) for k, v in mesh.items()}
    return {str(k): int(v) for k, v in mesh.shape.items()}


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh=None,
                    rules: Mapping[str, Any] = DEFAULT_RULES,
                    divisors: Mapping[str, int] | None = None) -> PartitionSpec:
    """PartitionSpec for an array with logical axes ``names`` under ``rules`` (module doc's rule).

    ``mesh``: a ``Mesh`` or a ``{axis: size}`` dict (specs without devices, e.g. a dry run).
    ``divisors`` overrides the number that must be divisible for a logical name (e.g. the
    head count for ``q_heads``). Without a mesh no divisibility check is made and axes are
    kept as the rules say.
    """
    sizes = _axis_sizes(mesh)
    used: set[str] = set()
    entries: list[Any] = []
    for name, size in zip(names, shape):
        axes = () if name is None else _mesh_axes(rules.get(name))
        if sizes is not None:
            axes = tuple(a for a in axes if a in sizes)
        axes = tuple(a for a in axes if a not in used)
        if sizes is not None:
            n = (divisors or {}).get(name, size)
            while axes and n % math.prod(sizes[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


def _divisors(model_config) -> dict[str, int] | None:
    if model_config is None:
        return None
    return {"q_heads": model_config.num_attention_heads, "kv_heads": model_config.num_key_value_heads}


def param_partition_specs(params, rules: Mapping[str, Any] = DEFAULT_RULES, mesh=None, model_config=None):
    """PartitionSpecs (same tree) for a nested param dict, a flat trainable dict, or a mix.

    ``None`` leaves (the trainable slots of the frozen tree) stay ``None``. Leaves may be
    arrays or ``jax.ShapeDtypeStruct``.
    """
    div = _divisors(model_config)

    def one(path, x):
        shape = np.shape(x)
        return logical_to_spec(logical_axes(path, len(shape)), shape, mesh, rules, div)

    return jax.tree_util.tree_map_with_path(one, params)


# Dimensions whose fallback to replication is by design: SIMU's compact rows (K is whatever the
# mask gives, and [L, K, H] is small next to the kernels it stands for).
_REPLICATION_ALLOWED = {("down_rows", "mlp")}


def replication_problems(params, mesh, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None) -> list[str]:
    """Each parameter dimension that the rules put on mesh axes (of size > 1) it does not divide,
    so the divisibility rule replicates it over them (module doc): ``"<path> dim <d> (<logical>,
    <n>) does not divide <axes>"``; ``[]`` when every dimension gets the layout it asks for."""
    sizes = _axis_sizes(mesh)
    div = _divisors(model_config) or {}
    problems: list[str] = []

    def one(path, x):
        shape = np.shape(x)
        names = logical_axes(path, len(shape))
        spec = tuple(logical_to_spec(names, shape, mesh, rules, div)) + (None,) * len(shape)
        used: set[str] = set()
        for d, (name, size) in enumerate(zip(names, shape)):
            got = set(_mesh_axes(spec[d]))
            asked = [a for a in (() if name is None else _mesh_axes(rules.get(name)))
                     if sizes.get(a, 1) > 1 and a not in used]
            used.update(got)
            missing = [a for a in asked if a not in got]
            leaf = "/".join(_path_names(path))
            if missing and (_path_names(path)[-1], name) not in _REPLICATION_ALLOWED:
                what = f"{div[name]} heads" if name in div else str(size)
                problems.append(f"{leaf} dim {d} ({name}, {what}) does not divide "
                                + ",".join(f"{a}={sizes[a]}" for a in missing))

    jax.tree_util.tree_map_with_path(one, params)
    return problems


def check_layout(mesh, *, params=None, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None,
                 batch_sizes: Mapping[str, int] | None = None) -> None:
    """Refuse (``ValueError``, one line) a layout that would replicate silently: a parameter
    dimension that does not divide the mesh axes its rule names (:func:`replication_problems`),
    or a per-step batch whose rows do not divide the batch axes (every device of the missing
    axes would compute the same rows). ``batch_sizes``: ``{config key: rows}``; ``params``:
    the (abstract) params, by default those of ``model_config``'s model."""
    if params is None and model_config is not None:
        from simu_jax.models import abstract_model, split_params

        params = split_params(abstract_model(model_config))[1]
    sizes = _axis_sizes(mesh)
    spec = ",".join(f"{a}={n}" for a, n in sizes.items())
    batch_axes = [a for a in _mesh_axes(rules.get("batch")) if sizes.get(a, 1) > 1]
    n_batch = math.prod(sizes[a] for a in batch_axes)
    for key, rows in (batch_sizes or {}).items():
        if rows % n_batch:
            raise ValueError(f"{key} = {rows} rows do not divide the batch axes "
                             f"{' x '.join(f'{a}={sizes[a]}' for a in batch_axes)} = {n_batch} of the mesh {spec}: "
                             f"devices would compute the same rows; use a multiple of {n_batch}")
    if params is not None:
        problems = replication_problems(params, mesh, rules, model_config)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ValueError(f"mesh {spec}: {problems[0]}{more}, so it would be replicated there; choose axis "
                             "sizes that divide the model's dimensions")


def param_shardings(params, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None):
    """NamedShardings (same tree) for ``params``; see :func:`param_partition_specs`."""
    specs = param_partition_specs(params, rules, mesh, model_config)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def device_put_tree(tree, shardings, cache: dict | None = None):
    """``jax.device_put`` leaf by leaf (``shardings``: the same tree), placing each distinct
    array once: two leaves that are one array stay one array. Pass the same ``cache`` (a dict)
    to several calls to keep aliases between trees (e.g. a reference model that shares arrays
    with the params)."""
    cache = {} if cache is None else cache

    def one(x, s):
        key = (id(x), s)
        if key not in cache:
            cache[key] = (x, jax.device_put(x, s))
        return cache[key][1]

    return jax.tree.map(one, tree, shardings)


def shard_params(params, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None):
    """``params`` placed on ``mesh`` by the rules (dtype unchanged)."""
    return device_put_tree(params, param_shardings(params, mesh, rules, model_config))


# ----------------------------------------------------------------------------
# Optimizer / curvature state, masks, batches
# ----------------------------------------------------------------------------


def opt_state_shardings(opt_state, params_shardings, mesh: jax.sharding.Mesh, tx=None, params=None):
    """Shardings for an optax state: every params-shaped subtree like the params, the rest replicated.

    With ``tx`` (the optax transformation) the params-shaped subtrees are found with
    ``optax.tree_utils.tree_map_params``. Without it, a state leaf whose trailing dict keys
    name a parameter (``mu['model/layers/...']``, ``hessian['model']['layers']...``) and
    whose shape equals that parameter's (``params``, if given) gets its sharding; anything
    else (step counts, ...) is replicated.
    """
    rep = replicated(mesh)
    if tx is not None:
        import optax.tree_utils as otu

        return otu.tree_map_params(tx, lambda _, s: s, opt_state, params_shardings,
                                   transform_non_params=lambda _: rep,
                                   is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    by_path = {}
    for path, s in jax.tree_util.tree_flatten_with_path(
            params_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
        by_path[_path_names(path)] = s
    shapes = {}
    if params is not None:
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
            shapes[_path_names(path)] = np.shape(x)

    def one(path, x):
        keys = []
        for k in reversed(path):  # the trailing run of dict keys
            if not hasattr(k, "key"):
                break
            keys.insert(0, k)
        names = _path_names(keys)
        for i in range(len(names)):
            cand = names[i:]
            if cand in by_path and (not shapes or shapes.get(cand) == np.shape(x)):
                return by_path[cand]
        return rep

    return jax.tree_util.tree_map_with_path(one, opt_state)



def shard_opt_state(opt_state, params_shardings, mesh: jax.sharding.Mesh, tx=None, params=None):
    """``opt_state`` placed like the params it mirrors (dtypes unchanged: fp32 state stays fp32)."""
    return device_put_tree(opt_state, opt_state_shardings(opt_state, params_shardings, mesh, tx, params))


def mask_partition_spec(shape: Sequence[int], mesh=None,
                        rules: Mapping[str, Any] = DEFAULT_RULES) -> PartitionSpec:
    """A neuron mask is sharded like the rows it gates: [L, I] (or [L, K]) -> (layers, mlp),
    [L, I, 1] / [L, K, 1] (broadcast against down_proj / down_rows) -> (layers, mlp, None)."""
    names = ("layers", "mlp") + (None,) * (len(shape) - 2)
    return logical_to_spec(names[: len(shape)], shape, mesh, rules)


def shard_mask(mask, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """A neuron mask array (or a tree of them; Python bools are left alone) on ``mesh``."""

    def one(m):
        if isinstance(m, (bool, np.bool_)) or np.ndim(m) < 2:
            return m
        return jax.device_put(m, NamedSharding(mesh, mask_partition_spec(np.shape(m), mesh, rules)))

    return jax.tree.map(one, mask)


def batch_sharding(shape: Sequence[int], mesh: jax.sharding.Mesh, *, axis: int = 0,
                   rules: Mapping[str, Any] = DEFAULT_RULES) -> NamedSharding:
    """The sharding of one batch array of ``shape`` whose rows (examples) are along ``axis``:
    logical axes ``(None,) * axis + (batch, length, None, ...)``, so by default the rows go
    over ``(data, fsdp)``, the longest prefix of it whose size product divides the number of
    rows (module doc's rule), replicated if none does. ``axis=0`` for ``[B, T]``, ``axis=1``
    for ``[A, B, T]`` (gradient-accumulation micro-batches). An array with no ``axis``
    dimension is replicated."""
    shape = tuple(int(d) for d in shape)
    names = ((None,) * axis + ("batch", "length") + (None,) * len(shape))[: len(shape)]
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def batch_shardings(batch, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, *, axis: int = 0):
    """:func:`batch_sharding` for every leaf of ``batch`` (``[B, T, ...]`` by default: B over
    ``(data, fsdp)``)."""
    return jax.tree.map(lambda x: batch_sharding(np.shape(x), mesh, axis=axis, rules=rules), batch)


def logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: jax.sharding.Mesh,
                       rules: Mapping[str, Any] = DEFAULT_RULES) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` by logical names (for use inside a jitted function),
    e.g. ``logical_constraint(h, ("batch", "length", "embed"), mesh)``."""
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def activation_sharding(mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """A context manager that lays out the model's activations on ``mesh`` (true FSDP): while
    the model is traced inside it, the residual stream at every layer boundary, [B, T, H] with
    logical axes ``transformer.RESIDUAL_AXES`` = (batch, length, None), is pinned with
    :func:`logical_constraint`: its rows over the batch axes (``data`` x ``fsdp`` by
    :data:`DEFAULT_RULES`) by the divisibility rule, so a batch that divides only a prefix of
    them is split over that prefix and one that divides none (an evaluation set of odd size)
    is explicitly replicated, exactly as ``batch_sharding`` places it.

    Why: with Auto axes and the weights sharded over ``fsdp`` on their hidden axis, XLA's
    propagation lets the hidden-axis sharding of a weight win over the batch sharding of the
    input at some matmuls and all-gathers the [tokens, H] activations: the per-device temp
    memory of a SIMU step on ``fsdp=8`` was 0.60x one device's instead of about 1/8 at the
    bench's step config; with these constraints 0.13x (``simu-jax bench``'s scale section,
    ``scale_step_temp_fsdp8_over_one_device``; tests/test_sharding.py checks <= 1.5/8).

    Enter it inside the function being traced (``jax.jit(f)`` with ``f`` entering it), so the
    layout is part of that jit's cache key (the engine's mesh step is made per mesh and rules);
    a no-op for any model call outside it."""
    from simu_jax.models.transformer import activation_constraint

    return activation_constraint(lambda x, names: logical_constraint(x, names, mesh, rules))


def hashable_rules(rules: Mapping[str, Any]) -> tuple:
    """``rules`` as a sorted tuple of (name, axes) pairs (a cache key; ``dict(...)`` undoes it)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))


def constrain_like(tree, shardings):
    """``with_sharding_constraint`` leaf by leaf, inside a jitted function: e.g. Hutchinson
    probes / HVP tangents drawn inside the step, constrained to the parameters' shardings
    (``param_shardings(trainable, mesh)``) so they are generated and kept sharded. Random
    bits are generated shard-locally when ``jax_threefry_partitionable`` is on (the default
    in current JAX)."""
    return jax.tree.map(lambda x, s: x if s is None else jax.lax.with_sharding_constraint(x, s), tree, shardings)

