"""Run by tests/test_sharding.py in a subprocess with 8 CPU devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python tests/sharding_worker.py OUT.json TMPDIR

A SIMU unlearning step (simu_graddiff, Sophia) on a tiny random LLaMA, once on one device
and once on each mesh with the Unlearner built directly on the mesh (and once moved there
by `engine.shard_unlearner`); the shards each device holds, at construction and after the
steps; a Sophia-H (Hutchinson) step on a mesh, with the sharding the compiler gave the
probes; a checkpoint saved on one mesh and restored onto another; `sharding.place_batch` of
[B, T] and [A, B, T] batches whose rows do and do not divide the batch axes; XLA's per-device
temp bytes of the SIMU step on each mesh against one device's (and the memory model's), and the residual-stream
constraints of `sharding.activation_sharding` for batches that divide the batch axes, a
prefix of them or none. Writes its measurements as JSON; the assertions live in the test.
"""

from __future__ import annotations

import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from simu_jax import curvature as C
from simu_jax import memory as M
from simu_jax import sharding as S
from simu_jax.checkpoint import Checkpointer, abstract_like
from simu_jax.engine import StepSettings, Unlearner, build_unlearner, get_method, shard_unlearner
from simu_jax.optim import OptimSpec
from simu_jax.models import ModelConfig, apply, init_model, split_params

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=8, initializer_range=0.1)
B, T = 8, 16
MESHES = ("fsdp=8", "data=2,fsdp=4", "fsdp=2,tensor=4")
STEPS = 2


def make_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[-1, 12:] = 0
    labels = np.where(np.arange(T)[None] >= 6, ids, -100).astype(np.int32)
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def neuron_mask() -> np.ndarray:
    rng = np.random.default_rng(3)
    sel = np.zeros((CFG.num_hidden_layers, CFG.intermediate_size), bool)
    sel[0, rng.choice(CFG.intermediate_size, 6, replace=False)] = True  # K = 6: not divisible by tensor=4
    sel[1, rng.choice(CFG.intermediate_size, 3, replace=False)] = True
    return sel


def run(unlearner, batches):
    losses = []
    for i, b in enumerate(batches):
        m = unlearner.step(b, jax.random.fold_in(jax.random.key(0), i))
        losses.append(float(m["loss"]))
    return losses


def spec_entries(sharding, ndim):
    spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
    return [[] if e is None else [e] if isinstance(e, str) else list(e) for e in spec]


def shard_report(tree, mesh):
    """Per leaf: spec, global shape, the set of addressable shard shapes, expected shard shape."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(x, "addressable_shards"):
            continue
        entries = spec_entries(x.sharding, x.ndim)
        expected = [d // int(np.prod([mesh.shape[a] for a in e])) for d, e in zip(x.shape, entries)]
        out[jax.tree_util.keystr(path)] = {
            "spec": entries,
            "shape": list(x.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
            "n_shards": len(x.addressable_shards),
            "expected": expected,
            "dtype": str(x.dtype),
            "mesh_match": x.sharding.mesh.shape == mesh.shape if hasattr(x.sharding, "mesh") else False,
        }
    return out


def max_diff(a, b) -> float:
    """Max abs difference over all leaves of two trees of the same structure."""
    a, b = jax.device_get(a), jax.device_get(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return max([float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))] or [0.0])


def hutchinson_on_mesh(graphdef, params, sel, method, batches, mesh, fisher_unlearner) -> dict:
    """One Sophia-H step on one device and on `mesh` (built there); the shardings XLA chose for
    the Rademacher probes, seen with `jax.debug.inspect_array_sharding` at compile time."""
    settings = StepSettings(optim=OptimSpec(learning_rate=1e-3, estimator="hutchinson"))
    ref = Unlearner(graphdef, params, method, settings, selected=sel)
    init = jax.device_get(ref.trainable)
    ref_losses = run(ref, batches[:1])

    seen: dict = {}
    original = C.rademacher_like

    def spy(key, tree, shardings=None):
        u = original(key, tree, shardings)
        if shardings is not None:  # the mesh step (the single-device step has none)
            for k, x in u.items():
                jax.debug.inspect_array_sharding(x, callback=lambda s_, k=k: seen.__setitem__(k, s_))
        return u

    C.rademacher_like = spy
    try:
        u = build_unlearner(graphdef, params, method, settings, mesh, selected=sel, model_config=CFG)
        losses = run(u, batches[:1])
    finally:
        C.rademacher_like = original
    tr_sh = {k: x.sharding for k, x in u.trainable.items()}
    probes = {k: {"spec": str(tr_sh[k].spec), "seen": str(seen.get(k)),
                  "equal": k in seen and seen[k].is_equivalent_to(tr_sh[k], u.trainable[k].ndim)} for k in tr_sh}

    def constraints(unlearner) -> dict:  # sharding constraints in the lowered step (StableHLO / Shardy)
        args = (unlearner.trainable, unlearner.opt_state, unlearner.frozen, unlearner.ref, unlearner.partition.rows,
                S.place_batch(batches[0], mesh), jax.random.key(0), jnp.int32(0))
        text = unlearner._step_fn.compiled.lower(*args).as_text()
        types = re.findall(r"sharding_constraint .*?: (tensor<[^>]*>)", text)
        residual = f"tensor<{B}x{T}x{CFG.hidden_size}x"  # the residual stream at layer boundaries
        return {"activation": sum(t.startswith(residual) for t in types),
                "other": sum(not t.startswith(residual) for t in types)}

    return {"max_abs_diff": max_diff(u.trainable, ref.trainable),
            "opt_max_abs_diff": max_diff(u.opt_state, ref.opt_state),
            "moved": max_diff(ref.trainable, init), "loss_diff": abs(losses[0] - ref_losses[0]), "probes": probes,
            "sharded_leaves": sum(any(e is not None for e in sh.spec) for sh in tr_sh.values()),
            "n_trainable": len(tr_sh), "constraints": constraints(u),
            "fisher_constraints": constraints(fisher_unlearner)}


# (mesh, shape, rows axis): [B, T] on axis 0 and [A, B, T] on axis 1; B = 8 divides every
# mesh's batch axes (data x fsdp), B = 6 and 3 divide only a prefix of them, or none
PLACE_CASES = [("data=2,fsdp=4", (8, 5), 0), ("data=2,fsdp=4", (6, 5), 0), ("data=2,fsdp=4", (3, 5), 0),
               ("data=2,fsdp=4", (2, 8, 5), 1), ("data=2,fsdp=4", (2, 6, 5), 1), ("data=2,fsdp=4", (3, 3, 5), 1),
               ("fsdp=8", (8, 5), 0), ("fsdp=8", (6, 5), 0), ("fsdp=2,tensor=4", (6, 5), 0),
               ("fsdp=2,tensor=4", (2, 3, 5), 1)]


def place_batch_report() -> dict:
    """`S.place_batch` of each PLACE_CASES batch (int32 tokens, a float32 mask, a [.., B] row
    weight): its spec, shard shapes, whether the values and dtypes round-trip exactly; and a
    placed batch placed again."""
    out = {}
    for i, (spec, shape, axis) in enumerate(PLACE_CASES):
        mesh = S.make_mesh(spec)
        rng = np.random.default_rng(i)
        batch = {"input_ids": rng.integers(0, 1000, shape).astype(np.int32),
                 "attention_mask": (rng.random(shape) > 0.2).astype(np.float32),
                 "row_weight": rng.random(shape[: axis + 1]).astype(np.float32)}
        placed = S.place_batch(batch, mesh, axis=axis)
        x = placed["input_ids"]
        out[f"{spec} {list(shape)} axis={axis}"] = {
            "spec": spec_entries(x.sharding, x.ndim),
            "row_weight_spec": spec_entries(placed["row_weight"].sharding, placed["row_weight"].ndim),
            "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
            "n_devices": len(x.sharding.device_set),
            "mesh_match": x.sharding.mesh.shape == mesh.shape,
            "roundtrip": all(placed[k].dtype == v.dtype and placed[k].shape == v.shape and
                             np.array_equal(np.asarray(placed[k]), v) for k, v in batch.items()),
        }
    mesh = S.make_mesh("data=2,fsdp=4")
    b = {"input_ids": np.arange(6 * 4, dtype=np.int32).reshape(6, 4)}
    ref = S.place_batch(b, mesh)["input_ids"]
    again = S.place_batch({"input_ids": ref}, mesh)["input_ids"]
    out["already_placed"] = again.sharding == ref.sharding and np.array_equal(np.asarray(again), b["input_ids"])
    return out


def step_temp_bytes(unlearner, batch) -> int:
    """XLA's temp bytes (per device on a mesh) of the Unlearner's compiled step."""
    return int(unlearner.lower_step(batch).compile().memory_analysis().temp_size_in_bytes)


def activation_layout_report(graphdef, params) -> dict:
    """The forward under `sharding.activation_sharding` on data=2,fsdp=4, jitted, for batches whose
    rows divide data x fsdp (8), only data (6) or neither (3): the layout each residual-stream
    constraint asks for (read from the lowered program) and the logits' distance to the plain
    forward's (no constraint)."""
    mesh = S.make_mesh("data=2,fsdp=4")
    p = S.shard_params(params, mesh, model_config=CFG)
    out = {}
    for rows in (8, 6, 3):
        b = make_batch(rows)
        ids, mask = b["input_ids"][:rows], b["attention_mask"][:rows]

        def fwd(prm, i, m):
            with S.activation_sharding(mesh):
                return apply(graphdef, prm, i, m)

        placed = S.place_batch({"i": ids, "m": mask}, mesh)
        text = jax.jit(fwd).lower(p, placed["i"], placed["m"]).as_text()
        layouts = sorted(set(re.findall(r"sharding_constraint %\S+ <@mesh, (\[.*?\])>", text)))
        logits = jax.jit(fwd)(p, placed["i"], placed["m"])
        plain = jax.jit(lambda prm, i, m: apply(graphdef, prm, i, m))(params, ids, mask)
        out[str(rows)] = {"layouts": layouts, "count": len(re.findall("sharding_constraint", text)),
                          "max_abs_diff": max_diff(logits, plain)}
    return out


def main(out_path: str, tmp: str) -> None:
    t0 = time.perf_counter()
    res: dict = {"device_count": jax.device_count(), "meshes": {}}
    res["place_batch"] = place_batch_report()
    graphdef, params = split_params(init_model(CFG, seed=0))
    sel = neuron_mask()
    method = get_method("simu_graddiff")
    settings = StepSettings(optim=OptimSpec(learning_rate=1e-3))
    batches = [{"forget": make_batch(2 * i), "retain": make_batch(2 * i + 1)} for i in range(STEPS)]

    ref = Unlearner(graphdef, params, method, settings, selected=sel)
    init_tr, init_opt = jax.device_get(ref.trainable), jax.device_get(ref.opt_state)
    t = time.perf_counter()
    ref_losses = run(ref, batches)
    res["single_device_s"] = time.perf_counter() - t
    ref_tr = jax.device_get(ref.trainable)
    res["moved"] = max_diff(ref_tr, init_tr)
    res["ref_losses"] = ref_losses
    # the temp-bytes reference is the program the mesh steps run: the layers scanned (layer_loop
    # auto scans on a mesh; on one device it unrolls these 2 layers, which XLA schedules with
    # other buffers)
    scanned, _ = split_params(init_model(CFG, seed=0, layer_loop="scan"))
    res["ref_temp_bytes"] = step_temp_bytes(Unlearner(scanned, params, method, settings, selected=sel), batches[0])
    res["ref_temp_bytes_unrolled"] = step_temp_bytes(ref, batches[0])
    # the memory model's step working set (activations + gradients + transient), whole and per device
    est = M.memory_estimate(CFG, "simu_graddiff", settings=settings, batch_size=B, seq_len=T,
                            neuron_rows=int(sel.sum(axis=1).max()))
    res["memory_model"] = {spec: {k: d[k] for k in ("activations", "gradients", "transient")}
                           for spec, d in [("one", est), *((m, M.per_device(est, m)) for m in MESHES)]}
    res["activation_layout"] = activation_layout_report(graphdef, params)

    sharded = {}
    for spec in MESHES:
        t = time.perf_counter()
        mesh = S.make_mesh(spec)
        # built directly on the mesh; on one mesh from params the caller already sharded
        given = S.shard_params(params, mesh, model_config=CFG) if spec == "fsdp=8" else params
        u = build_unlearner(graphdef, given, method, settings, mesh, selected=sel, model_config=CFG)
        built = {"trainable_max_abs_diff": max_diff(u.trainable, init_tr),
                 "opt_max_abs_diff": max_diff(u.opt_state, init_opt),
                 "opt_structure_equal": jax.tree.structure(u.opt_state) == jax.tree.structure(ref.opt_state),
                 "no_original": not hasattr(u, "original")}
        if given is not params:  # the frozen tree aliases the caller's sharded arrays: no copies
            built["frozen_aliases"] = (u.frozen["model"]["embed_tokens"]["embedding"] is
                                       given["model"]["embed_tokens"]["embedding"])
        before = {"trainable": shard_report(u.trainable, mesh), "frozen": shard_report(u.frozen, mesh),
                  "opt_state": shard_report(u.opt_state, mesh),
                  "batch": shard_report(S.place_batch(batches[0], mesh), mesh),
                  "masks": shard_report({"selected": S.shard_mask(sel, mesh), "row_valid": u.partition.row_valid,
                                         "opt_mask": u.mask}, mesh)}
        losses = run(u, batches)
        after = {"trainable": shard_report(u.trainable, mesh), "opt_state": shard_report(u.opt_state, mesh)}
        merged = u.params()
        res["meshes"][spec] = {
            "axis_types": [str(t_) for t_ in mesh.axis_types],
            "losses": losses,
            "built": built,
            "max_abs_diff": max_diff(u.trainable, ref_tr),
            "opt_max_abs_diff": max_diff(u.opt_state, ref.opt_state),
            "merged_max_abs_diff": max_diff(merged, ref.params()),
            "merged_down_proj_spec_kept": (merged["model"]["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec ==
                                           u.frozen["model"]["layers"]["mlp"]["down_proj"]["kernel"].sharding.spec),
            "before": before,
            "after": after,
            "temp_bytes": step_temp_bytes(u, batches[0]),
            "seconds": time.perf_counter() - t,
        }
        sharded[spec] = (mesh, u)

    # an Unlearner built on one device and moved by shard_unlearner: same step, same executable
    t = time.perf_counter()
    mesh, u = sharded["fsdp=8"]
    v = shard_unlearner(Unlearner(graphdef, params, method, settings, selected=sel), mesh, model_config=CFG)
    res["shard_unlearner"] = {"losses": run(v, batches), "max_abs_diff": max_diff(v.trainable, ref_tr),
                              "opt_max_abs_diff": max_diff(v.opt_state, ref.opt_state),
                              "same_executable": v._step_fn.compiled is u._step_fn.compiled,
                              "after": shard_report({"trainable": v.trainable, "opt_state": v.opt_state}, mesh),
                              "seconds": time.perf_counter() - t}

    t = time.perf_counter()
    mesh, u = sharded["fsdp=2,tensor=4"]
    res["hutchinson"] = hutchinson_on_mesh(graphdef, params, sel, method, batches, mesh, u)
    res["hutchinson"]["seconds"] = time.perf_counter() - t

    # checkpoint saved from one mesh, restored onto another
    t = time.perf_counter()
    mesh_a, ua = sharded["fsdp=8"]
    mesh_b, ub = sharded["fsdp=2,tensor=4"]
    state = {"params": ua.trainable, "opt_state": ua.opt_state, "step": ua.step_count, "data": {"index": 5}}
    with Checkpointer(f"{tmp}/ckpt", save_every=1, keep=1) as ck:
        ck.save(ua.step_count, state)
    target_sh = {"params": S.param_shardings(ub.trainable, mesh_b, model_config=CFG),
                 "opt_state": S.opt_state_shardings(ub.opt_state, S.param_shardings(ub.trainable, mesh_b,
                                                                                      model_config=CFG), mesh_b,
                                                    tx=ub.tx)}
    target = {"params": abstract_like(ua.trainable, target_sh["params"]),
              "opt_state": abstract_like(ua.opt_state, target_sh["opt_state"])}
    with Checkpointer(f"{tmp}/ckpt", save_every=1, keep=1) as ck:
        back = ck.restore(target=target)
    saved, restored = jax.device_get(state["params"]), jax.device_get(back["params"])
    res["checkpoint"] = {
        "max_abs_diff": max(float(np.max(np.abs(saved[k] - restored[k]))) for k in saved),
        "opt_max_abs_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                                zip(jax.tree.leaves(ua.opt_state), jax.tree.leaves(back["opt_state"]))),
        "same_structure": jax.tree.structure(back["opt_state"]) == jax.tree.structure(ua.opt_state),
        "step": back["step"],
        "data": back.get("data"),
        "restored": shard_report({"params": back["params"], "opt_state": back["opt_state"]}, mesh_b),
        "spec_equal": all(back["params"][k].sharding.spec == target_sh["params"][k].spec for k in saved),
        "seconds": time.perf_counter() - t,
    }
    # the restored state drives another step on mesh B, equal to continuing on mesh A
    ub.trainable, ub.opt_state, ub.step_count = back["params"], back["opt_state"], back["step"]
    extra = {"forget": make_batch(50), "retain": make_batch(51)}
    la = float(ua.step(extra, jax.random.key(9))["loss"])
    lb = float(ub.step(extra, jax.random.key(9))["loss"])
    ta, tb = jax.device_get(ua.trainable), jax.device_get(ub.trainable)
    res["resume_other_mesh"] = {"loss_diff": abs(la - lb),
                                "max_abs_diff": max(float(np.max(np.abs(ta[k] - tb[k]))) for k in ta)}
    res["total_s"] = time.perf_counter() - t0
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
