"""The timing harness: compile events, jobs, runs in turns, medians, and the ratios built on them.

Every time is the median of ``repeats`` timed runs after ``warmup`` runs, each blocked on its
outputs; the programs compared run in turns (``round_robin``); the first (compiling) call of a
job is kept apart (``Job.first``: its seconds and JAX's trace / lower / XLA-compile events).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import statistics
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from simu_jax.bench.profiles import SUMMARY_KEYS, TARGETS

__all__ = ["COMPILE_EVENTS", "AotCall", "CompileRecorder", "Job", "block", "first_calls", "hvp_analysis",
           "round_robin", "state_bytes_split", "stats", "summarize"]

COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "xla_compile_s",
}


class CompileRecorder:
    """Sums JAX's compile-duration events per thread while `track()` is active in that thread."""

    def __init__(self):
        self._active: dict[int, dict[str, float]] = {}
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_):
        name = COMPILE_EVENTS.get(event)
        if name is None:
            return
        with self._lock:
            acc = self._active.get(threading.get_ident())
            if acc is not None:
                acc[name] = acc.get(name, 0.0) + float(duration)

    @contextlib.contextmanager
    def track(self):
        acc = {v: 0.0 for v in COMPILE_EVENTS.values()}
        with self._lock:
            self._active[threading.get_ident()] = acc
        try:
            yield acc
        finally:
            with self._lock:
                self._active.pop(threading.get_ident(), None)
            acc["total_s"] = sum(acc[v] for v in COMPILE_EVENTS.values())

    def close(self):
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._on_event)


def block(x):
    return jax.block_until_ready(x)


@dataclasses.dataclass(eq=False)
class Job:
    """One program to time: `fn()` runs it once (its outputs are blocked on)."""

    name: str
    fn: Callable[[], Any]
    first_call_s: float | None = None
    compile: dict[str, float] | None = None

    def first(self, recorder: CompileRecorder):
        with recorder.track() as acc:
            t0 = time.perf_counter()
            block(self.fn())
            self.first_call_s = time.perf_counter() - t0
        self.compile = acc

    def once(self) -> float:
        t0 = time.perf_counter()
        block(self.fn())
        return time.perf_counter() - t0


class AotCall:
    """`jax.jit(fn)` on fixed args, lowered and compiled on the first call (the same compile
    events as a plain first call), so that XLA's cost analysis of the very program that is
    timed is available afterwards (`cost`: flops and bytes accessed, None if the backend has none)."""

    def __init__(self, fn: Callable, *args):
        self.jitted, self.args = jax.jit(fn), args
        self.exe = None
        self.cost: dict[str, float] | None = None

    def __call__(self):
        if self.exe is None:
            self.exe = self.jitted.lower(*self.args).compile()
            with contextlib.suppress(Exception):
                ca = self.exe.cost_analysis()
                ca = ca[0] if isinstance(ca, (list, tuple)) else ca
                if ca and "flops" in ca:
                    self.cost = {"gflop": float(ca["flops"]) / 1e9,
                                 "gbytes_accessed": float(ca.get("bytes accessed", float("nan"))) / 1e9}
        return self.exe(*self.args)


def stats(runs: list[float], **extra) -> dict[str, Any]:
    """The timing dict of a list of runs: median, min, max and the runs themselves."""
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs_s": runs, **extra}


def round_robin(entries: dict[str, Callable[[], float]], repeats: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Median seconds of each entry, measured in turns (A B C, C B A, A B C, ...).

    Every entry runs `warmup` untimed turns, then `repeats` timed ones, interleaved, so that
    programs whose times are compared see the same machine (load, clocks, caches) over the run.
    """
    names = list(entries)
    for _ in range(warmup):
        for n in names:
            entries[n]()
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            runs[n].append(entries[n]())
    return {n: stats(runs[n]) for n in names}


def first_calls(jobs: list[Job], recorder: CompileRecorder, workers: int) -> None:
    """The first (compiling) call of every job, `workers` at a time."""
    if workers <= 1:
        for j in jobs:
            j.first(recorder)
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(j.first, recorder) for j in jobs]:
            f.result()


# ---------------------------------------------------------------------------------------
# Ratios
# ---------------------------------------------------------------------------------------


def hvp_analysis(row: dict[str, Any]) -> dict[str, Any]:
    """HVP cost against the gradient's, in time and in XLA's flop count, for one model size."""
    t = {k: v["median_s"] for k, v in row["times"].items()}
    c = {k: v["gflop"] for k, v in row.get("cost_analysis", {}).items()}
    out: dict[str, Any] = {"time_over_grad": {}, "flops_over_grad": {}}
    for op in ("forward", "hvp", "hvp_revrev", "ggn_vp"):
        if op in t:
            out["time_over_grad"][op] = t[op] / t["grad"]
        if op in c and "grad" in c:
            out["flops_over_grad"][op] = c[op] / c["grad"]
    if "hvp_lin4" in t:
        out["time_over_grad"]["hvp_lin4_per_product"] = t["hvp_lin4"] / 4 / t["grad"]
        out["time_over_grad"]["hvp_linearized_marginal"] = (t["hvp_lin4"] - t["hvp"]) / 3 / t["grad"]
    if "hvp_lin4" in c and "hvp" in c and "grad" in c:
        out["flops_over_grad"]["hvp_lin4_per_product"] = c["hvp_lin4"] / 4 / c["grad"]
        out["flops_over_grad"]["hvp_linearized_marginal"] = (c["hvp_lin4"] - c["hvp"]) / 3 / c["grad"]
    if "hvp" in out["flops_over_grad"]:
        # > 1: the HVP runs at a lower flop rate than the gradient (overhead); ~1: flop-bound
        out["hvp_time_ratio_over_flop_ratio"] = out["time_over_grad"]["hvp"] / out["flops_over_grad"]["hvp"]
    return out


def state_bytes_split(opt_state) -> dict[str, int]:
    """Optimizer + curvature state bytes, split into per-parameter leaves (arrays of rank >= 1)
    and scalar leaves (rank 0: step counters and the like, the same few bytes whatever is trained)."""
    leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")]
    scalar = [x for x in leaves if np.ndim(x) == 0]
    nbytes = lambda xs: int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in xs))  # noqa: E731
    return {"state_param_bytes": nbytes(leaves) - nbytes(scalar), "state_scalar_bytes": nbytes(scalar),
            "state_scalar_leaves": len(scalar)}


def summarize(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The headline (`SUMMARY_KEYS`) of a result's sections, and each target of `TARGETS` on it."""
    big = result["second_order"]["sizes"][-1]["times"]
    steps = result["steps"]["methods"]
    calls = result["peer"]["calls"]
    comp = result["compile"]["layers"]

    def jt(name):  # JAX / PyTorch, from the interleaved runs of the peer section
        return calls[name]["jax"]["median_s"] / calls[name]["torch"]["median_s"]

    summary = {
        "hvp_over_grad": big["hvp"]["median_s"] / big["grad"]["median_s"],
        "simu_over_so_step": steps["simu_graddiff"]["median_s"] / steps["so_graddiff"]["median_s"],
        "jax_over_torch_so_step": jt("so_step"),
        "torch_over_jax_so_step": 1.0 / jt("so_step"),
        "jax_over_torch_hvp": jt("sophia_h_step"),
        "torch_over_jax_hvp": 1.0 / jt("sophia_h_step"),
        "jax_over_torch_hvp_raw": jt("hvp"),
        "compile_s_4_layers": comp["4"]["median_s"],
        "compile_s_8_layers": comp["8"]["median_s"],
        "compile_s_16_layers": comp["16"]["median_s"],
        "compile_16_over_4": comp["16"]["median_s"] / comp["4"]["median_s"],
        "simu_state_bytes_over_so": (steps["simu_graddiff"]["state_param_bytes"]
                                     / steps["so_graddiff"]["state_param_bytes"]),
        "simu_state_bytes_over_so_raw": steps["simu_graddiff"]["state_bytes"] / steps["so_graddiff"]["state_bytes"],
        "trainable_fraction_simu": steps["simu_graddiff"]["num_trainable"] / steps["so_graddiff"]["num_trainable"],
        "newton_per_cg_iter_s": steps["simu_newton"]["per_cg_iter_s"],
    }
    assert tuple(summary) == SUMMARY_KEYS
    targets = {}
    for key, bound, what in TARGETS:
        b = summary[bound] if isinstance(bound, str) else bound
        targets[key] = {"value": summary[key], "op": "<=", "bound": b,
                        "bound_from": bound if isinstance(bound, str) else None,
                        "met": bool(summary[key] <= b), "what": what}
    return summary, targets
