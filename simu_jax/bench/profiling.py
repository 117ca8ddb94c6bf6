"""`--profile-only`: where the time of a step goes, per kind of XLA op (jax.profiler, XLA:CPU
per-op trace events) and per aten op of the torch peer's SO step (torch.profiler)."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from simu_jax.bench.harness import block
from simu_jax.bench.peer import PeerServer
from simu_jax.bench.problems import attribution_jobs, make_batch, second_order_size, step_jobs, step_setup
from simu_jax.bench.profiles import Profile

__all__ = ["PROFILE_XLA_FLAGS", "op_category", "profile_call", "profile_run"]

PROFILE_XLA_FLAGS = "--xla_cpu_enable_xprof_traceme=true"  # per-op trace events on XLA:CPU


def op_category(kind: str) -> str:
    if kind.startswith(("ynn_fusion", "xnn_fusion", "dot", "onednn", "custom-call")) or "convolution" in kind:
        return "matmul"
    if kind.startswith(("copy_", "transpose_")) or "transpose" in kind:
        return "elementwise with a layout change (copy_*/transpose_* fusions)"
    if kind == "copy" or kind.startswith("copy"):
        return "copies"
    if any(k in kind for k in ("dynamic-slice", "dynamic-update-slice", "slice", "pad", "concatenate")):
        return "slices / updates (scan stacking)"
    if kind.startswith(("while", "conditional", "call", "SlinkyThreadPool", "end:")):
        return "loops / sync"
    return "other fusions (elementwise, reductions, scatter)"


def profile_call(fn: Callable[[], Any], calls: int = 3) -> dict[str, Any]:
    """Trace `calls` runs of fn with jax.profiler; op time per kind, summed over XLA's CPU threads."""
    import collections
    import glob
    import re

    from jax.profiler import ProfileData

    block(fn())
    with tempfile.TemporaryDirectory(prefix="simu-bench-prof-") as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(calls):
            block(fn())
        wall = (time.perf_counter() - t0) / calls
        jax.profiler.stop_trace()
        data = ProfileData.from_file(sorted(glob.glob(f"{d}/**/*.xplane.pb", recursive=True))[-1])
        kinds: collections.Counter = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):
                    continue
                for ev in line.events:
                    if not ev.name.startswith("ThunkExecutor"):
                        kinds[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns / 1e6 / calls
    cats: collections.Counter = collections.Counter()
    for k, v in kinds.items():
        cats[op_category(k)] += v
    total = sum(kinds.values())
    return {"wall_ms": wall * 1e3, "op_ms_total": total,
            "by_category_ms": dict(cats.most_common()),
            "by_category_share": {k: v / total for k, v in cats.most_common()} if total else {},
            "top_kinds_ms": dict(kinds.most_common(10))}


def profile_run(result: dict[str, Any], log) -> dict[str, Any]:
    """Profile the step config's programs (gradient, HVP, SO, Sophia-H and SIMU steps, IG attribution)
    and the torch SO step."""
    fields = {f.name for f in dataclasses.fields(Profile)}  # a field an older bench had is left out
    profile = Profile(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["profile"].items() if k in fields}
                      | {"sizes": tuple(map(tuple, result["profile"]["sizes"]))})
    profile = dataclasses.replace(profile, methods=tuple(m for m in ("so_graddiff", "so_graddiff_hutchinson",
                                                                     "simu_graddiff") if m in profile.methods),
                                  hvp_variants=(), remat_compare=(), layer_loop_compare=())
    hidden, inter = profile.sizes[profile.step_size]
    batch = jax.tree.map(jnp.asarray, make_batch(profile, seed=0))
    _, jobs = second_order_size(dataclasses.replace(profile, ops=tuple(o for o in ("forward", "grad", "hvp")
                                                                       if o in profile.ops)), hidden, inter, batch)
    setup = step_setup(profile)
    programs = {j.name.rsplit("/", 1)[1]: j.fn for j in jobs}
    programs |= {f"step/{label}": job.fn for label, _, _, job in step_jobs(profile, setup)}
    programs |= {j.name: j.fn for j in attribution_jobs(profile) if j.name == "attribution/ig"}
    out: dict[str, Any] = {"config": f"hidden {hidden}, intermediate {inter}, {profile.layers} layers (the steps' "
                                     "config)", "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": {}}
    traceme = "xprof_traceme=true" in os.environ.get("XLA_FLAGS", "")
    for name, fn in programs.items():
        out["jax"][name] = profile_call(fn)
        if not traceme:
            out["jax"][name]["note"] = "XLA_FLAGS lacks --xla_cpu_enable_xprof_traceme=true: no per-op events"
        cats = out["jax"][name]["by_category_share"]
        log(f"  {name}: {out['jax'][name]['wall_ms']:.0f} ms/call; " +
            ", ".join(f"{k.split(' (')[0]} {v:.0%}" for k, v in list(cats.items())[:4]))
    peer = PeerServer(profile, setup["model"], setup["batch"], result["machine"]["jax_threads"],
                      host_allocator=result["machine"].get("host_allocator", "system"))
    try:
        out["torch_so_step"] = peer.call("profile_so_step")["out"]
    finally:
        peer.close()
    ops = out["torch_so_step"]["self_cpu_ms_per_step"]
    mm = sum(v for k, v in ops.items() if k in ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul"))
    out["torch_so_step"]["matmul_share"] = mm / out["torch_so_step"]["total_self_cpu_ms_per_step"]
    log(f"  torch SO step: {out['torch_so_step']['total_self_cpu_ms_per_step']:.0f} ms self CPU/step, "
        f"matmul {out['torch_so_step']['matmul_share']:.0%}")
    return out
