"""Device meshes, logical-axis sharding rules, multi-host helpers and a memory model.

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
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

__all__ = [
    "MESH_AXES",
    "DEFAULT_RULES",
    "parse_mesh_spec",
    "make_mesh",
    "mesh_description",
    "logical_axes",
    "logical_to_spec",
    "param_partition_specs",
    "param_shardings",
    "shard_params",
    "opt_state_shardings",
    "shard_opt_state",
    "mask_partition_spec",
    "shard_mask",
    "batch_shardings",
    "shard_batch",
    "global_batch",
    "batch_process_slice",
    "process_index_slice",
    "logical_constraint",
    "constrain_like",
    "replicated",
    "build_unlearner",
    "shard_unlearner",
    "initialize_distributed",
    "is_main_process",
    "process_slice",
    "to_host",
    "place_like",
    "any_process",
    "param_counts",
    "memory_estimate",
    "per_device",
    "memory_table",
    "print_memory_table",
    "LLAMA2_7B",
    "OLMO_1B",
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


def param_shardings(params, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None):
    """NamedShardings (same tree) for ``params``; see :func:`param_partition_specs`."""
    specs = param_partition_specs(params, rules, mesh, model_config)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, PartitionSpec))


def _put(tree, shardings, cache: dict | None = None):
    """device_put leaf by leaf, placing each distinct array once (aliases stay aliases)."""
    cache = {} if cache is None else cache

    def one(x, s):
        key = (id(x), s)
        if key not in cache:
            cache[key] = (x, jax.device_put(x, s))
        return cache[key][1]

    return jax.tree.map(one, tree, shardings)


def shard_params(params, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None):
    """``params`` placed on ``mesh`` by the rules (dtype unchanged)."""
    return _put(params, param_shardings(params, mesh, rules, model_config))


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
    return _put(opt_state, opt_state_shardings(opt_state, params_shardings, mesh, tx, params))


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


def batch_shardings(batch, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """Every leaf [B, T, ...] -> (batch, length, None...): B over (data, fsdp) by default."""

    def one(x):
        shape = np.shape(x)
        names = ("batch", "length") + (None,) * max(0, len(shape) - 2)
        return NamedSharding(mesh, logical_to_spec(names[: len(shape)], shape, mesh, rules))

    return jax.tree.map(one, batch)


def _is_global(x) -> bool:
    """A ``jax.Array`` spanning devices of other processes (built by ``make_array_from_process_local_data``)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def process_index_slice(sharding: jax.sharding.Sharding, global_shape: Sequence[int], axis: int = 0) -> slice:
    """The range of ``axis`` that this process's devices hold of an array of ``global_shape``
    laid out by ``sharding``: the rows a process must supply to
    ``jax.make_array_from_process_local_data`` (``slice(0, n)`` when the axis is replicated).

    Read from the sharding itself (``addressable_devices_indices_map``), so it is right
    whatever order the mesh puts the processes' devices in; in the usual layout (each
    process's devices adjacent along the batch axes) it equals
    ``process_slice(n, drop_remainder=True)``. Raises ``ValueError`` if the process's part is
    not one contiguous range.
    """
    global_shape = tuple(int(d) for d in global_shape)
    n = global_shape[axis]
    blocks = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        s = index[axis] if index is not None and axis < len(index) else slice(None)
        start, stop, _ = s.indices(n)
        blocks.add((start, stop))
    if not blocks:
        raise ValueError("this process holds no device of the sharding")
    blocks = sorted(blocks)
    start, stop = blocks[0]
    for a, b in blocks[1:]:
        if a > stop:
            raise ValueError(f"this process's part of axis {axis} is not contiguous: {blocks}")
        stop = max(stop, b)
    return slice(start, stop)


def batch_process_slice(global_rows: int, mesh: jax.sharding.Mesh,
                        rules: Mapping[str, Any] = DEFAULT_RULES) -> slice:
    """The rows of a global batch of ``global_rows`` this process feeds (:func:`shard_batch`
    with ``global_rows``): its share under the batch rule (``batch`` over ``(data, fsdp)``,
    the longest prefix whose size divides ``global_rows``); every row when the batch is
    replicated (then every process feeds the same whole batch). Single process: everything."""
    if jax.process_count() == 1:
        return slice(0, int(global_rows))
    spec = logical_to_spec(("batch",), (int(global_rows),), mesh, rules)
    return process_index_slice(NamedSharding(mesh, spec), (int(global_rows),))


def shard_batch(batch, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, *,
                global_rows: int | None = None):
    """Place a batch (leaves ``[B, T, ...]``) on ``mesh`` by :func:`batch_shardings`.

    * Single process: ``batch`` is the global batch; ``device_put`` splits it.
    * Global ``jax.Array`` leaves (e.g. the output of an earlier ``shard_batch`` on several
      processes) are only resharded to the batch layout if they are not in it already.
    * Several processes, host arrays: ``batch`` is this process's rows of the global batch,
      ``rows[batch_process_slice(global_rows, mesh)]``, and each leaf is assembled into one
      global array with ``jax.make_array_from_process_local_data``. ``global_rows`` (the
      global batch size) defaults to the local rows x the process count (an even split in
      process order). A wrong number of local rows is a ``ValueError``.
    """
    leaves = jax.tree.leaves(batch)
    if jax.process_count() == 1 or (leaves and all(_is_global(x) for x in leaves)):
        if global_rows is not None and jax.process_count() == 1:
            for x in leaves:
                if np.shape(x)[0] != global_rows:
                    raise ValueError(f"shard_batch: {np.shape(x)[0]} rows given, global_rows={global_rows}")
        return jax.device_put(batch, batch_shardings(batch, mesh, rules))

    def one(x):
        x = np.asarray(x)
        n = int(global_rows) if global_rows is not None else x.shape[0] * jax.process_count()
        global_shape = (n,) + x.shape[1:]
        names = ("batch", "length") + (None,) * max(0, x.ndim - 2)
        sharding = NamedSharding(mesh, logical_to_spec(names[: x.ndim], global_shape, mesh, rules))
        rows = process_index_slice(sharding, global_shape)
        if x.shape[0] != rows.stop - rows.start:
            raise ValueError(f"shard_batch: process {jax.process_index()} gave {x.shape[0]} rows; a global batch "
                             f"of {n} rows on mesh {mesh_description(mesh)} needs its rows {rows.start}:{rows.stop} "
                             f"({rows.stop - rows.start} rows)")
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)


def global_batch(batch, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES):
    """A host batch every process holds whole (e.g. a fixed evaluation set) as global arrays:
    each process contributes only its rows (:func:`batch_process_slice`) to
    :func:`shard_batch`."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        return batch
    n = int(np.shape(leaves[0])[0])
    rows = batch_process_slice(n, mesh, rules)
    return shard_batch(jax.tree.map(lambda x: np.asarray(x)[rows], batch), mesh, rules, global_rows=n)


def logical_constraint(x: jax.Array, names: Sequence[str | None], mesh: jax.sharding.Mesh,
                       rules: Mapping[str, Any] = DEFAULT_RULES) -> jax.Array:
    """``jax.lax.with_sharding_constraint`` by logical names (for use inside a jitted function),
    e.g. ``logical_constraint(h, ("batch", "length", "embed"), mesh)``."""
    spec = logical_to_spec(names, x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def constrain_like(tree, shardings):
    """``with_sharding_constraint`` leaf by leaf, inside a jitted function: e.g. Hutchinson
    probes / HVP tangents drawn inside the step, constrained to the parameters' shardings
    (``param_shardings(trainable, mesh)``) so they are generated and kept sharded. Random
    bits are generated shard-locally when ``jax_threefry_partitionable`` is on (the default
    in current JAX)."""
    return jax.tree.map(lambda x, s: x if s is None else jax.lax.with_sharding_constraint(x, s), tree, shardings)


# ----------------------------------------------------------------------------
# The unlearning engine on a mesh
# ----------------------------------------------------------------------------


def build_unlearner(graphdef, params, method, settings, mesh: jax.sharding.Mesh, selected=None, ref_params=None,
                    rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None):
    """An ``engine.Unlearner`` built directly on ``mesh``: ``Unlearner(..., mesh=mesh)``.

    ``params`` are placed with :func:`param_shardings` first (free if :func:`shard_params`
    already did), then the trainable copy, the zeroed down_proj and the optimizer state are
    created by ``jax.jit`` with ``out_shardings``: nothing new is created unsharded.
    """
    from simu_jax.engine import Unlearner

    return Unlearner(graphdef, params, method, settings, selected=selected, ref_params=ref_params, mesh=mesh,
                     rules=rules, model_config=model_config)


def shard_unlearner(unlearner, mesh: jax.sharding.Mesh, rules: Mapping[str, Any] = DEFAULT_RULES, model_config=None):
    """Move an already built ``engine.Unlearner`` onto ``mesh`` (in place; returns it).

    Places ``trainable``, ``frozen`` and ``ref`` (each distinct array once, so aliases stay
    aliases), ``opt_state`` (like the params it mirrors, dtypes unchanged) and the neuron-row
    masks (like the rows they gate), then binds the same mesh step as
    :func:`build_unlearner` (``jax.jit`` of ``engine.step_impl`` with ``out_shardings``; batches
    split by :func:`shard_batch`; one executable shared with a mesh-built Unlearner of the same
    configuration).

    Arrays are copied from wherever they are: the Unlearner was built on one device, so this
    only suits models whose params and state fit one device. Otherwise build on the mesh
    (:func:`build_unlearner`).
    """
    cache: dict = {}
    tr_sh = param_shardings(unlearner.trainable, mesh, rules, model_config)
    unlearner.trainable = _put(unlearner.trainable, tr_sh, cache)
    unlearner.frozen = _put(unlearner.frozen, param_shardings(unlearner.frozen, mesh, rules, model_config), cache)
    if unlearner.ref is not None:
        unlearner.ref = _put(unlearner.ref, param_shardings(unlearner.ref, mesh, rules, model_config), cache)

    # neuron-row index / validity and the optimizer's element mask, sharded like the rows
    part = unlearner.partition
    if part.row_index is not None:
        part.row_index = shard_mask(part.row_index, mesh, rules)
        part.row_valid = shard_mask(part.row_valid, mesh, rules)
    if unlearner.mask is not None:
        from simu_jax import engine

        unlearner.mask = shard_mask(unlearner.mask, mesh, rules)
        unlearner.tx = engine.build_optimizer(unlearner.method, unlearner.settings, unlearner.mask)

    opt_sh = ()
    if unlearner.tx is not None:
        opt_sh = opt_state_shardings(unlearner.opt_state, tr_sh, mesh, tx=unlearner.tx)
        unlearner.opt_state = _put(unlearner.opt_state, opt_sh, cache)
    unlearner._bind_mesh(mesh, rules, tr_sh, opt_sh)
    return unlearner


# ----------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def _cluster_detected() -> bool:
    """A multi-process launcher JAX can auto-detect (SLURM, Open MPI, TPU pod slice)."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS", "SLURM_NPROCS") or 1) > 1:
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           auto: bool | None = None) -> bool:
    """``jax.distributed.initialize`` from arguments, environment, or cluster auto-detection.

    Call it first, before anything touches a device. Arguments default to the environment:
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``. With none of them, JAX's own cluster detection is used when a
    multi-process launcher is visible (SLURM with more than one task, Open MPI, a
    multi-host TPU slice) or when ``auto=True`` / ``SIMU_DISTRIBUTED=1``. A single process
    (``num_processes == 1``, or nothing detected) is a no-op. Returns whether JAX now runs
    as several processes (True also when it was already initialized).
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if auto is None:
        auto = os.environ.get("SIMU_DISTRIBUTED", "") in ("1", "true", "auto")
    if num_processes == 1:
        return False
    kwargs = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if coordinator is not None or num_processes is not None or process_id is not None:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
        return True
    if auto or _cluster_detected():
        jax.distributed.initialize(**kwargs)
        return True
    return False


def is_main_process() -> bool:
    """Process 0 writes logs, reports and metrics files (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def process_slice(n_items: int, *, process_index: int | None = None, process_count: int | None = None,
                  drop_remainder: bool = False) -> slice:
    """This process's contiguous share of ``n_items`` (e.g. ``records[process_slice(len(records))]``).

    Shares differ by at most one item (the first ``n % P`` processes get one more); with
    ``drop_remainder`` every process gets ``n // P`` (SPMD steps need equal local batches).
    """
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n_proc:
        raise ValueError(f"process_index {p} out of range for {n_proc} processes")
    base, extra = divmod(n_items, n_proc)
    if drop_remainder:
        return slice(p * base, (p + 1) * base)
    start = p * base + min(p, extra)
    return slice(start, start + base + (1 if p < extra else 0))


def to_host(tree):
    """numpy copies of the leaves of ``tree`` (arrays sharded over a mesh included). With
    several processes this is an all-gather every process must call (each gets the whole
    arrays: fine for what is written at the end of a run, not for a model larger than a
    host's memory)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, tree)


def place_like(host_tree, like):
    """Host arrays back onto the devices and shardings of ``like`` (same tree): each process
    places only the shards its devices hold (``jax.make_array_from_callback``), so it works
    with several processes as long as every process has the same host arrays."""

    def one(h, ref):
        sharding = getattr(ref, "sharding", None)
        if sharding is None:
            return h
        h = np.asarray(h)
        return jax.make_array_from_callback(h.shape, sharding, lambda index: h[index])

    return jax.tree.map(one, host_tree, like)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process (an all-gather of one int with several
    processes; every process must call it). Used to agree on stopping after a signal, which
    may reach the processes at different steps."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


# ----------------------------------------------------------------------------
# Memory model
# ----------------------------------------------------------------------------


def _cfg(**kw):
    from simu_jax.models import ModelConfig

    return ModelConfig(**kw)


def _presets():
    return {
        "LLaMA-2-7B": _cfg(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128),
        "OLMo-1B": _cfg(model_type="olmo", vocab_size=50304, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
                        tie_word_embeddings=True),
    }


LLAMA2_7B, OLMO_1B = _presets().values()

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _nbytes(dtype) -> int:
    name = jnp.dtype(dtype).name
    return _BYTES.get(name, jnp.dtype(dtype).itemsize)


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


def memory_estimate(model_config, method: str, trainable_fraction: float | None = None, *,
                    batch_tokens: int = 8 * 512, seq_len: int = 512, param_dtype="bfloat16",
                    state_dtype="float32", mlp_fraction: float = 0.05, remat: str = "none") -> dict[str, Any]:
    """Bytes of one unlearning step's memory, by part (whole model, before sharding).

    method: ``fo`` (AdamW on all params), ``so`` (Sophia on all params), ``simu`` (Sophia on
    all attention projections + ``mlp_fraction`` of the MLP neurons' ``down_proj`` rows,
    kept as a compact [L, K, H] copy). ``trainable_fraction`` (of all params) overrides the
    trainable count for any method.

    Returns ``params`` (all weights in ``param_dtype``, plus SIMU's compact rows),
    ``gradients`` (trainable, ``param_dtype``), ``optimizer_state`` (AdamW m and v / Sophia
    m, ``state_dtype``), ``curvature_state`` (Sophia's h; 0 for fo),
    ``activations_per_token`` (saved for the backward pass; see docs/scaling.md for the
    formula), ``activations`` (x ``batch_tokens``, forget + retain tokens of one step) and
    ``total``; plus ``trainable`` and ``total_params`` counts.
    """
    if method not in ("fo", "so", "simu"):
        raise ValueError(f"method={method!r}; allowed: fo, so, simu")
    if remat not in ("none", "full"):
        raise ValueError(f"remat={remat!r}; allowed: none, full")
    pb, sb = _nbytes(param_dtype), _nbytes(state_dtype)
    counts = param_counts(model_config)
    total = counts["total"]
    rows = 0
    if trainable_fraction is not None:
        if not 0 < trainable_fraction <= 1:
            raise ValueError(f"trainable_fraction must be in (0, 1], got {trainable_fraction}")
        trainable = int(round(trainable_fraction * total))
    elif method == "simu":
        rows = int(round(mlp_fraction * counts["mlp_down"]))
        trainable = counts["attention"] + rows
    else:
        trainable = total
    est = {
        "params": (total + rows) * pb,
        "gradients": trainable * pb,
        "optimizer_state": (2 if method == "fo" else 1) * trainable * sb,
        "curvature_state": 0 if method == "fo" else trainable * sb,
    }
    # activations saved for the backward pass, per token
    c = model_config
    h, i, n_layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    qd, kvd = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = pb * (4 * h + 3 * qd + 3 * kvd + 4 * i) + c.num_attention_heads * seq_len * (4 + pb)
    head = pb * h + 2 * 4 * c.vocab_size  # final norm output, fp32 logits and log-softmax
    if remat == "full":
        per_token = n_layers * pb * h + per_layer + head
    else:
        per_token = n_layers * per_layer + head
    est["activations_per_token"] = per_token
    est["activations"] = per_token * batch_tokens
    est["total"] = sum(est[k] for k in ("params", "gradients", "optimizer_state", "curvature_state", "activations"))
    est["trainable"] = trainable
    est["total_params"] = total
    return est


def per_device(estimate: Mapping[str, Any], mesh_shape) -> dict[str, Any]:
    """Per-device bytes under :data:`DEFAULT_RULES`: weights, gradients and states divided by
    fsdp x tensor (replicated over data), activations by data x fsdp (the batch split; tensor
    parallelism also splits the MLP/attention activations, ignored here: an upper bound)."""
    if isinstance(mesh_shape, jax.sharding.Mesh):
        sizes = {a: int(mesh_shape.shape.get(a, 1)) for a in MESH_AXES}
    elif isinstance(mesh_shape, str):  # a spec without -1: the sizes give the device count
        fixed = [int(p.split("=", 1)[1]) for p in mesh_shape.split(",") if "=" in p]
        if any(v < 1 for v in fixed):
            raise ValueError(f"per_device needs explicit axis sizes, got {mesh_shape!r}")
        sizes = parse_mesh_spec(mesh_shape, math.prod(fixed))
    else:
        sizes = {a: int(mesh_shape.get(a, 1)) for a in MESH_AXES}
    model = sizes["fsdp"] * sizes["tensor"]
    batch = sizes["data"] * sizes["fsdp"]
    out = dict(estimate)
    for k in ("params", "gradients", "optimizer_state", "curvature_state"):
        out[k] = -(-estimate[k] // model)
    out["activations"] = -(-estimate["activations"] // batch)
    out["total"] = sum(out[k] for k in ("params", "gradients", "optimizer_state", "curvature_state", "activations"))
    return out


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def memory_table(models: Mapping[str, Any] | None = None, methods: Sequence[str] = ("fo", "so", "simu"),
                 **kwargs) -> str:
    """A markdown table of :func:`memory_estimate` (GiB; activations per token in KiB)."""
    models = _presets() if models is None else models
    lines = ["| model | method | trainable params | params | gradients | optimizer state | curvature state "
             "| activations / token (KiB) | activations (batch) | total |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, cfg in models.items():
        for method in methods:
            e = memory_estimate(cfg, method, **kwargs)
            lines.append(f"| {name} | {method} | {e['trainable'] / 1e9:.3f} B | {_gib(e['params'])} | "
                         f"{_gib(e['gradients'])} | {_gib(e['optimizer_state'])} | {_gib(e['curvature_state'])} | "
                         f"{e['activations_per_token'] / 1024:.0f} | {_gib(e['activations'])} | {_gib(e['total'])} |")
    return "\n".join(lines)


def print_memory_table(models: Mapping[str, Any] | None = None, methods: Sequence[str] = ("fo", "so", "simu"),
                       **kwargs) -> None:
    print(memory_table(models, methods, **kwargs))
