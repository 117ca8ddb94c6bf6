"""The timing harness: compile events, jobs, runs in turns, medians, and the ratios built on them.

Every time is the median of ``repeats`` timed runs after ``warmup`` runs, each blocked on its
outputs; the programs compared run in turns (``round_robin``); the first (compiling) call of a
job is kept apart (``Job.first``: its seconds and JAX's trace / lower / XLA-compile events).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import operator
import statistics
import threading
import time
from typing import Any, Callable

import jax
import jax.extend
import numpy as np

from simu_jax.bench.profiles import SUMMARY_KEYS, TARGETS

__all__ = ["COMPARE", "COMPILE_EVENTS", "PEER_ENVS", "AotCall", "CompileRecorder", "Job", "block", "check_targets",
           "first_calls", "hvp_analysis", "matmul_flops", "peer_fastest", "round_robin", "state_bytes_split", "stats",
           "summarize"]

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
    """`jax.jit(fn)` on fixed args, traced, lowered and compiled on the first call (the same
    compile events as a plain first call), so that the flops of the very program that is timed
    are known afterwards (`cost`: XLA's cost analysis, `gflop` and `gbytes_accessed`, and
    `matmul_gflop`, the dot_general flops of its jaxpr over every iteration of its scans; None
    if the backend has no cost analysis).

    XLA:CPU's cost analysis counts the body of a while loop once: the layer scan's flops are one
    layer's, so `gflop` undercounts a multi-layer model; `matmul_gflop` counts every layer.
    """

    def __init__(self, fn: Callable, *args):
        self.jitted, self.args = jax.jit(fn), args
        self.exe = None
        self.cost: dict[str, float] | None = None

    def __call__(self):
        if self.exe is None:
            traced = self.jitted.trace(*self.args)
            self.exe = traced.lower().compile()
            ca = None
            with contextlib.suppress(Exception):
                ca = self.exe.cost_analysis()
                ca = ca[0] if isinstance(ca, (list, tuple)) else ca
            if ca and "flops" in ca:
                self.cost = {"gflop": float(ca["flops"]) / 1e9,
                             "gbytes_accessed": float(ca.get("bytes accessed", float("nan"))) / 1e9,
                             "matmul_gflop": matmul_flops(traced.jaxpr) / 1e9}
        return self.exe(*self.args)


def matmul_flops(jaxpr) -> float:
    """Flops of the dot_generals of a (closed) jaxpr: 2 * batch * M * K * N each, a scan's body
    times its length, a cond's costliest branch, every other inner jaxpr once (a while loop's
    body too: its trip count is not known before it runs)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            (_, rc), (_, rb) = eqn.params["dimension_numbers"]
            free_rhs = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
            total += 2.0 * float(np.prod(lhs)) * float(np.prod(free_rhs))
            continue
        inner = [matmul_flops(j) for j in jax.extend.core.jaxprs_in_params(eqn.params)]
        if eqn.primitive.name == "scan":
            total += eqn.params["length"] * sum(inner)
        elif eqn.primitive.name == "cond":
            total += max(inner)
        else:
            total += sum(inner)
    return total


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
    """HVP cost against the gradient's, for one model size, in time and in matmul flops over all
    layers (`matmul_gflop`; XLA's own count has the layer scan once, see `AotCall`)."""
    t = {k: v["median_s"] for k, v in row["times"].items()}
    c = {k: v["matmul_gflop"] for k, v in row.get("cost_analysis", {}).items()}
    out: dict[str, Any] = {"time_over_grad": _hvp_ratios(t), "flops_over_grad": _hvp_ratios(c) if "grad" in c else {}}
    if "hvp" in out["flops_over_grad"]:
        # > 1: the HVP runs at a lower flop rate than the gradient (overhead); ~1: flop-bound
        out["hvp_time_ratio_over_flop_ratio"] = out["time_over_grad"]["hvp"] / out["flops_over_grad"]["hvp"]
        # its inverse: the HVP's matmul flops per second over the gradient's (the efficiency target)
        out["hvp_flop_efficiency"] = out["flops_over_grad"]["hvp"] / out["time_over_grad"]["hvp"]
    return out


def _hvp_ratios(x: dict[str, float]) -> dict[str, float]:
    """Each program's figure (seconds or flops) over the gradient's; the linearized variant per
    product and per product after the first: (4 products - 1 product) / 3, each with the linearization."""
    out = {op: x[op] / x["grad"] for op in ("forward", "hvp", "hvp_revrev", "hvp_lin1", "ggn_vp") if op in x}
    if "hvp_lin4" in x and "hvp_lin1" in x:
        out["hvp_lin4_per_product"] = x["hvp_lin4"] / 4 / x["grad"]
        out["hvp_linearized_marginal"] = (x["hvp_lin4"] - x["hvp_lin1"]) / 3 / x["grad"]
    return out


def state_bytes_split(opt_state) -> dict[str, int]:
    """Optimizer + curvature state bytes, split into per-parameter leaves (arrays of rank >= 1)
    and scalar leaves (rank 0: step counters and the like, the same few bytes whatever is trained)."""
    leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype")]
    scalar = [x for x in leaves if np.ndim(x) == 0]
    nbytes = lambda xs: int(sum(np.size(x) * np.dtype(x.dtype).itemsize for x in xs))  # noqa: E731
    return {"state_param_bytes": nbytes(leaves) - nbytes(scalar), "state_scalar_bytes": nbytes(scalar),
            "state_scalar_leaves": len(scalar)}


COMPARE = {"<=": operator.le, ">=": operator.ge}
PEER_ENVS = {"torch": "PASSIVE", "torch_default_env": "default"}  # peer call entry -> its OpenMP setting


def peer_fastest(call: dict[str, Any]) -> tuple[str, float]:
    """(OpenMP setting, median seconds) of the peer's faster thread setting for one call of the
    peer section (`OMP_WAIT_POLICY=PASSIVE`, and torch's default environment where measured)."""
    envs = {env: call[entry]["median_s"] for entry, env in PEER_ENVS.items() if entry in call}
    env = min(envs, key=envs.get)
    return env, envs[env]


def check_targets(values: dict[str, Any]) -> dict[str, Any]:
    """Each target of `TARGETS` on `values` (a summary, or a result holding the summary keys); a
    figure `values` lacks (a result of an older bench) has value, bound and met None."""
    targets = {}
    for key, op, bound, what in TARGETS:
        ref, slack = bound if isinstance(bound, tuple) else (None, 0.0)
        value = values.get(key)
        b = bound if ref is None else (values[ref] + slack if ref in values else None)
        targets[key] = {"value": value, "op": op, "bound": b, "bound_from": ref, "slack": slack,
                        "met": None if value is None or b is None else bool(COMPARE[op](value, b)), "what": what}
    return targets


def summarize(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The headline (`SUMMARY_KEYS`) of a result's sections, and each target of `TARGETS` on it."""
    sizes = result["second_order"]["sizes"]
    big, at_step = sizes[-1], sizes[result["profile"]["step_size"]]
    steps = result["steps"]["methods"]
    calls = result["peer"]["calls"]
    comp = result["compile"]["layers"]
    att = result["attribution"]["times"]
    scale = result["scale"]

    def jt(name):  # JAX / PyTorch at its faster thread setting, from the interleaved runs of the peer section
        return calls[name]["jax"]["median_s"] / peer_fastest(calls[name])[1]

    def step(label):
        return steps[label]["median_s"]

    summary = {
        "jax_over_torch_so_step": jt("so_step"),
        "jax_over_torch_grad": jt("grad"),
        "torch_over_jax_so_step": 1.0 / jt("so_step"),
        "jax_over_torch_hvp": jt("sophia_h_step"),
        "torch_over_jax_hvp": 1.0 / jt("sophia_h_step"),
        "jax_over_torch_hvp_raw": jt("hvp"),
        "simu_over_so_step": step("simu_graddiff") / step("so_graddiff"),
        "simu_over_so_grad_flops": (at_step["cost_analysis"]["grad_simu"]["matmul_gflop"]
                                    / at_step["cost_analysis"]["grad"]["matmul_gflop"]),
        "sophia_h_over_so_step": step("so_graddiff_hutchinson") / step("so_graddiff"),
        "hvp_over_grad": big["times"]["hvp"]["median_s"] / big["times"]["grad"]["median_s"],
        "hvp_flops_over_grad": big["hvp_analysis"]["flops_over_grad"]["hvp"],
        "hvp_time_over_flops": big["hvp_analysis"]["hvp_time_ratio_over_flop_ratio"],
        "hvp_flop_efficiency": big["hvp_analysis"]["hvp_flop_efficiency"],
        "hvp_marginal_lin_over_grad": big["hvp_analysis"]["time_over_grad"]["hvp_linearized_marginal"],
        "attribution_over_grad": att["ig"]["median_s"] / att["grad"]["median_s"],
        "compile_s_4_layers": comp["4"]["median_s"],
        "compile_s_8_layers": comp["8"]["median_s"],
        "compile_s_16_layers": comp["16"]["median_s"],
        "compile_16_over_4": comp["16"]["median_s"] / comp["4"]["median_s"],
        "simu_state_bytes_over_so": (steps["simu_graddiff"]["state_param_bytes"]
                                     / steps["so_graddiff"]["state_param_bytes"]),
        "simu_state_bytes_over_so_raw": steps["simu_graddiff"]["state_bytes"] / steps["so_graddiff"]["state_bytes"],
        "trainable_fraction_simu": steps["simu_graddiff"]["num_trainable"] / steps["so_graddiff"]["num_trainable"],
        "newton_per_cg_iter_s": steps["simu_newton"]["per_cg_iter_s"],
        "scale_parameters": scale["checkpoint"]["parameters"],
        "scale_load_rss_over_model": scale["load"]["peak_rss_over_model"],
        "scale_load_device_over_model_per_device": scale["load"]["max_device_share_over_model_per_device"],
        "scale_save_rss_over_written": scale["save"]["peak_rss_over_written"],
        "scale_save_device_over_params_per_device": scale["save"]["max_device_share_over_params_per_device"],
        "scale_step_temp_fsdp8_over_one_device": scale["step_memory"]["fsdp8_over_one_device"],
        "scale_wall_s": scale["wall_s"],
        "bench_wall_s": result["wall_s"],
        "bench_wall_budget_s": result["profile"]["wall_budget_s"],
    }
    assert tuple(summary) == SUMMARY_KEYS
    return summary, check_targets(summary)
