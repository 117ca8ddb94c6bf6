"""`simu-jax bench`: second-order cost, masked savings, JAX against the PyTorch peer, compile time.

One run, one machine, one config per section, the same threads and batch on both sides.
Every time is the **median** of ``repeats`` timed runs after ``warmup`` runs, each blocked on
its outputs (``jax.block_until_ready``). The programs compared within a section run in turns
(A B C, C B A, ...: ``round_robin``), the JAX and PyTorch calls of the peer section included,
so a ratio compares runs made under the same machine load. The first (compiling) call of
every program is kept apart: ``first_call_s`` and the trace / lower / XLA-compile seconds JAX
reports for it (``jax.monitoring`` compile events). Sections:

* ``second_order``: at three model sizes, on all parameters and the GradDiff loss
  (``-NLL(forget) + NLL(retain)``): forward (loss value), gradient, exact HVP
  (``curvature.hvp``, forward-over-reverse), Gauss-Newton product (``curvature.ggn_vp``) and a
  one-probe Hutchinson diagonal (``curvature.hutchinson_diagonal``), with ratios to the
  gradient; plus the gradient and HVP on the SIMU subset (attention + selected ``down_proj``
  rows, the rest closed over) to show what the mask saves. At the largest size also two other
  exact HVP formulations: reverse-over-reverse (``hvp_revrev``) and one ``jax.linearize`` of the
  gradient map reused for 4 products (``hvp_lin4``, what Newton-CG and Hutchinson do); for every
  program, XLA's cost analysis (flops, bytes) of the compiled executable; ``hvp_analysis`` puts
  time ratios next to flop ratios (is the HVP flop-bound?).
* ``remat``: the gradient and HVP of the step config with models built with another remat
  policy (``dots``), in turns with the default model's.
* ``steps``: one ``Unlearner.step`` of ``fo_graddiff`` (AdamW), ``so_graddiff`` (Sophia, SOUL's
  g*g curvature, all params), ``so_graddiff_hutchinson`` (Sophia-H: one exact HVP per step),
  ``simu_graddiff`` and ``simu_newton`` (time per CG iteration = step time / CG iterations
  done; the HVP on the SIMU subset timed alone is in ``second_order``), with the
  optimizer + curvature state bytes of each method and a breakdown (loss + gradient on the
  method's trainable subset, taken from ``second_order`` at the same config, vs the rest).
  State bytes are split into per-parameter leaves and scalar leaves (the step counter):
  ``simu_state_bytes_over_so`` compares the per-parameter state (what scales with the trainable
  set, the quantity the trainable fraction bounds); ``simu_state_bytes_over_so_raw`` is the
  ratio of all bytes.
* ``peer``: ``tools/torch_peer.py --serve`` in a subprocess: transformers ``LlamaForCausalLM``
  (eager attention) with the same weights (``models.convert.save_pretrained``) and batch, a
  SOUL-style SophiaG step (g*g every step), a Sophia-H step (double-backward HVP), and the
  forward / gradient / HVP alone, each in turns with the JAX program doing the same work, with
  ``torch.set_num_threads`` = the size of XLA's CPU thread pool (``OMP_WAIT_POLICY=PASSIVE``;
  the full run also measures torch's default OpenMP environment).
* ``compile``: trace + lower + XLA compile of the ``simu_graddiff`` step at 4, 8 and 16 layers,
  measured on the first call of a fresh ``Unlearner`` after ``jax.clear_caches()`` (the
  persistent compilation cache is off), from JAX's own compile events.

Compiles of the second-order and step programs run first, ``cores`` at a time in threads (XLA
compiles on one thread each and releases the GIL); all timed runs then run one at a time, and
the compile section runs alone at the end. ``--quick`` (tiny sizes, one model size, the
programs the headline keys need, 2 repeats, the peer and the compile section overlapped with
the rest) is what the test suite runs: it checks that the JSON is complete, never speed.
``--profile-only --json FILE`` adds ``profile_run`` to an existing result: where the step
config's gradient, HVP, SO and SIMU steps spend their time per kind of XLA op (jax.profiler,
XLA:CPU per-op trace events) and the torch SO step per aten op (torch.profiler).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SUMMARY_KEYS = (
    "hvp_over_grad",
    "simu_over_so_step",
    "jax_over_torch_so_step",
    "torch_over_jax_so_step",
    "jax_over_torch_hvp",
    "torch_over_jax_hvp",
    "jax_over_torch_hvp_raw",
    "compile_s_4_layers",
    "compile_s_8_layers",
    "compile_s_16_layers",
    "compile_16_over_4",
    "simu_state_bytes_over_so",
    "simu_state_bytes_over_so_raw",
    "trainable_fraction_simu",
    "newton_per_cg_iter_s",
)

# (summary key, bound: a number or another summary key, what it means). All are "value <= bound".
TARGETS = (
    ("hvp_over_grad", 2.0, "exact HVP time / gradient time (largest size, all params)"),
    ("simu_over_so_step", 0.75, "SIMU step / SO-GradDiff step (JAX)"),
    ("jax_over_torch_so_step", 0.8, "JAX SO-GradDiff step / PyTorch SOUL SophiaG step"),
    ("compile_16_over_4", 1.5, "SIMU step compile time, 16 layers / 4 layers"),
    ("simu_state_bytes_over_so", "trainable_fraction_simu",
     "SIMU per-parameter optimizer+curvature bytes / SO's (scalar leaves such as the step counter "
     "excluded), no larger than the trainable fraction"),
)

SECOND_ORDER_OPS = ("forward", "grad", "hvp", "ggn_vp", "hutchinson", "grad_simu", "hvp_simu")
STEP_METHODS = {  # label -> (registry name, StepSettings overrides)
    "fo_graddiff": ("fo_graddiff", {}),
    "so_graddiff": ("so_graddiff", {}),
    "so_graddiff_hutchinson": ("so_graddiff", {"estimator": "hutchinson"}),
    "simu_graddiff": ("simu_graddiff", {}),
    "simu_newton": ("simu_newton", {}),
}


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    vocab: int
    sizes: tuple[tuple[int, int], ...]  # (hidden, intermediate) of the second-order section
    head_dim: int
    layers: int
    seq: int
    batch: int  # per part: a step sees `batch` forget + `batch` retain sequences of `seq` tokens
    step_size: int  # index into sizes: the config of the step and peer sections
    compile_dims: tuple[int, int]  # (hidden, intermediate) of the compile-time models
    compile_layers: tuple[int, ...]
    repeats: int
    warmup: int
    compile_repeats: int
    ops: tuple[str, ...] = SECOND_ORDER_OPS
    peer_default_env: bool = True  # also run the peer with torch's default OpenMP environment
    methods: tuple[str, ...] = tuple(STEP_METHODS)
    neuron_fraction: float = 0.1
    cg_iters: int = 8
    overlap: bool = False  # --quick: peer and compile section overlap the rest (wall time only)
    # at the largest size only: other exact HVP formulations (reverse-over-reverse; one
    # linearization reused for 4 products, as Newton-CG and Hutchinson do)
    hvp_variants: tuple[str, ...] = ("hvp_revrev", "hvp_lin4")
    # at the step size: the gradient and HVP of models built with these remat policies, in
    # turns with the default model's (the model default is remat="none")
    remat_compare: tuple[str, ...] = ("dots",)


FULL = Profile(name="full", vocab=4096, sizes=((128, 384), (256, 768), (512, 1536)), head_dim=64, layers=4,
               seq=128, batch=4, step_size=1, compile_dims=(128, 384), compile_layers=(4, 8, 16), repeats=5,
               warmup=1, compile_repeats=2)
# --quick: one size, which is also the 4-layer compile model (its simu_graddiff step's compile is
# the 4-layer figure), so it builds 8 XLA programs; XLA:CPU spends ~5-15 CPU-s on each.
QUICK = Profile(name="quick", vocab=256, sizes=((32, 64),), head_dim=16, layers=4, seq=32, batch=2, step_size=0,
                compile_dims=(32, 64), compile_layers=(4, 8, 16), repeats=2, warmup=1, compile_repeats=1,
                ops=("grad", "hvp"),
                methods=("so_graddiff", "so_graddiff_hutchinson", "simu_graddiff", "simu_newton"),
                cg_iters=4, overlap=True, peer_default_env=False, hvp_variants=(), remat_compare=())
# --quick in a fresh process also compiles with LLVM optimizations off (compile CPU ~40% lower;
# its timings are not meaningful anyway). Recorded in machine.xla_flags.
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"


# ---------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def xla_cpu_threads() -> int | None:
    """Threads of XLA's CPU (Eigen) pool in this process, counted from /proc (None off Linux)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    count = 0
    for t in tasks:
        try:
            if "XLAEigen" in Path(f"/proc/self/task/{t}/comm").read_text():
                count += 1
        except OSError:
            pass
    return count or None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    dev = jax.devices()[0]
    return {
        "cpu_model": _cpu_model(),
        "cores_available": available_cores(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "backend": jax.default_backend(),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '?')}",
        "num_devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # XLA's CPU runtime sizes its intra-op (Eigen) pool to the schedulable cores; this is
        # the pool counted from the thread names after a first computation.
        "jax_threads": xla_cpu_threads() or available_cores(),
        "loadavg_start": loadavg(),
    }


# ---------------------------------------------------------------------------------------
# Timing: compile events, jobs
# ---------------------------------------------------------------------------------------

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


def _block(x):
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
            _block(self.fn())
            self.first_call_s = time.perf_counter() - t0
        self.compile = acc

    def once(self) -> float:
        t0 = time.perf_counter()
        _block(self.fn())
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


def _stats(runs: list[float], **extra) -> dict[str, Any]:
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
    return {n: _stats(runs[n]) for n in names}


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


def make_batch(p: Profile, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Paired forget / retain batches of random tokens; the loss is on the second half (the answer)."""
    rng = np.random.default_rng(seed)
    out = {}
    for part in ("forget", "retain"):
        ids = rng.integers(3, p.vocab, size=(p.batch, p.seq)).astype(np.int32)
        labels = np.where(np.arange(p.seq)[None] >= p.seq // 2, ids, -100).astype(np.int32)
        out[part] = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels}
    return out


def random_neuron_mask(layers: int, intermediate: int, fraction: float, seed: int = 0) -> np.ndarray:
    """The same number of random neurons in every layer (so the compact rows have no padding)."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(fraction * intermediate)))
    selected = np.zeros((layers, intermediate), bool)
    for layer in range(layers):
        selected[layer, rng.choice(intermediate, size=k, replace=False)] = True
    return selected


def _graddiff(graphdef, params, batch, kwargs=None):
    from simu_jax.losses import unlearning_loss
    from simu_jax.models import apply

    kwargs = kwargs or {}
    fn = lambda b: apply(graphdef, params, b["input_ids"], b["attention_mask"], **kwargs)  # noqa: E731
    return unlearning_loss("graddiff", fn, batch, gamma=1.0)[0]


def _count(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def _settings(p: Profile, **overrides):
    from simu_jax.engine import StepSettings

    # SOUL's Sophia (betas 0.9/0.95, rho 0.04, bs 5120, wd 0.1, g*g every step); the torch peer
    # gets exactly these numbers. Newton-CG: the GradDiff Hessian is indefinite, and with a small
    # damping CG stops at its first negative-curvature direction (after 1 iteration here); a
    # damping of 10 and tol 1e-12 keep CG to its iteration cap, so the step does a fixed,
    # known number of HVPs (this section measures cost, not the solve).
    base = dict(learning_rate=1e-5, gamma=1.0, b1=0.9, b2=0.95, rho=0.04, batch_scale=5120.0, weight_decay=0.1,
                update_interval=1, estimator="fisher", damping=10.0, trust_radius=0.5, cg_iters=p.cg_iters,
                cg_tol=1e-12)
    base.update(overrides)
    return StepSettings(**base)


# ---------------------------------------------------------------------------------------
# Sections: jobs
# ---------------------------------------------------------------------------------------


def second_order_jobs(p: Profile) -> list[tuple[dict[str, Any], list[Job]]]:
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    return [_second_order_size(p, hidden, inter, batch) for hidden, inter in p.sizes]


def _second_order_size(p: Profile, hidden: int, inter: int, batch) -> tuple[dict[str, Any], list[Job]]:
    """The programs of one model size (one function scope per size: the jitted closures trace later)."""
    from simu_jax import curvature as C
    from simu_jax.losses import token_mean_nll
    from simu_jax.models import apply
    from simu_jax.selection import SIMU, Partition

    key = jax.random.key(0)
    cfg = model_config(p, hidden, inter)
    graphdef, params = init_params(cfg, seed=0)
    rng = np.random.default_rng(1)
    v = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)
    loss = functools.partial(_graddiff, graphdef)
    nb = p.batch

    def logits_all(prm, b):  # forget and retain as one [2B, T] batch
        ids = jnp.concatenate([b["forget"]["input_ids"], b["retain"]["input_ids"]])
        mask = jnp.concatenate([b["forget"]["attention_mask"], b["retain"]["attention_mask"]])
        return apply(graphdef, prm, ids, mask)

    def loss_of_logits(z, b):
        return -token_mean_nll(z[:nb], b["forget"]["labels"]) + token_mean_nll(z[nb:], b["retain"]["labels"])

    # the SIMU subset: differentiate only attention + the selected down_proj rows
    selected = random_neuron_mask(cfg.num_hidden_layers, inter, p.neuron_fraction, seed=0)
    part = Partition(params, SIMU, selected)
    trainable, frozen = part.split(params)
    v_sub = jax.tree.map(lambda x: jnp.full(x.shape, 0.01, x.dtype), trainable)

    def loss_sub(tr, fr, b):
        full, kwargs = part.combine(tr, fr)
        return _graddiff(graphdef, full, b, kwargs)

    def hvp_revrev(prm, vv, b):  # reverse-over-reverse: grad_p <grad f(p), v>
        return jax.grad(lambda q: C.tree_vdot(jax.grad(loss)(q, b), vv))(prm)

    def hvp_lin4(prm, vs, b):  # one linearization of the gradient map, 4 products (as CG / Hutchinson use it)
        _, h = jax.linearize(lambda q: jax.grad(loss)(q, b), prm)
        return [h(vv) for vv in vs]

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
            elif op == "hvp_lin4":
                vs = [v] + [jax.tree.map(lambda x, i=i: jnp.asarray(np.random.default_rng(10 + i).standard_normal(
                    x.shape, np.float32)), params) for i in range(3)]
                programs[op] = (hvp_lin4, (params, vs, batch))
            else:
                raise ValueError(f"unknown HVP variant {op!r}")
            ops.append(op)
    jobs = []
    for op in ops:
        fn, args = programs[op]
        jobs.append(Job(f"second_order/h{hidden}/{op}", AotCall(fn, *args)))
    row = {"hidden": hidden, "intermediate": inter, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
           "heads": cfg.num_attention_heads, "num_params": _count(params), "num_params_simu": _count(trainable),
           "tokens_per_call": 2 * p.batch * p.seq}
    return row, jobs


def remat_jobs(p: Profile) -> list[Job]:
    """Gradient and exact HVP at the step config with models built with `p.remat_compare`'s policies."""
    from flax import nnx

    from simu_jax import curvature as C
    from simu_jax.models import abstract_model

    if not p.remat_compare:
        return []
    hidden, inter = p.sizes[p.step_size]
    cfg = model_config(p, hidden, inter)
    _, params = init_params(cfg, seed=0)
    rng = np.random.default_rng(1)  # the second-order section's v
    v = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), params)
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    jobs = []
    for policy in p.remat_compare:
        graphdef, _ = nnx.split(abstract_model(cfg, remat=policy))
        loss = functools.partial(_graddiff, graphdef)
        jobs.append(Job(f"remat/{policy}/grad", AotCall(jax.grad(loss), params, batch)))
        jobs.append(Job(f"remat/{policy}/hvp", AotCall(lambda prm, vv, b, loss=loss: C.hvp(loss, prm, vv, b),
                                                        params, v, batch)))
    return jobs


def _default_remat() -> str:
    import inspect

    from simu_jax.models import init_model

    return inspect.signature(init_model).parameters["remat"].default


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
    from simu_jax.engine import Unlearner, get_method

    batch = jax.tree.map(jnp.asarray, setup["batch"])
    base_key = jax.random.key(0)
    out = []
    for label in p.methods:
        name, overrides = STEP_METHODS[label]
        is_simu = name.startswith("simu")
        u = Unlearner(setup["graphdef"], setup["params"], get_method(name), _settings(p, **overrides),
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
    u = Unlearner(graphdef, params, get_method("simu_graddiff"), _settings(p), selected=selected)
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    key = jax.random.key(0)
    return Job(f"compile/{layers}", lambda: u.step(batch, key)["loss"])


def find_peer_script() -> Path:
    for base in (Path(__file__).resolve().parent.parent, Path.cwd()):
        path = base / "tools" / "torch_peer.py"
        if path.is_file():
            return path
    raise FileNotFoundError("tools/torch_peer.py not found (run from the simu-jax repository)")


class PeerServer:
    """tools/torch_peer.py --serve in a subprocess, on the step config's weights (HF dir) and batch.

    `call(name)` runs one of the peer's calls (so_step, sophia_h_step, forward, grad, hvp) and
    returns the seconds the peer measured around it, so the bench can alternate JAX and PyTorch
    runs of the same work.
    """

    def __init__(self, p: Profile, model, batch: dict, threads: int, omp_wait_policy: str | None = "PASSIVE"):
        from simu_jax.models.convert import save_pretrained

        s = _settings(p)
        self._tmp = tempfile.TemporaryDirectory(prefix="simu-bench-")
        tmp = Path(self._tmp.name)
        save_pretrained(model, tmp / "model")
        np.savez(tmp / "batch.npz", **{f"{part}__{k}": np.asarray(v) for part, d in batch.items()
                                        for k, v in d.items()})
        self.cmd = [sys.executable, str(find_peer_script()), "--serve", "--model", str(tmp / "model"), "--batch",
                    str(tmp / "batch.npz"), "--threads", str(threads), "--lr", str(s.learning_rate), "--gamma",
                    str(s.gamma), "--b1", str(s.b1), "--b2", str(s.b2), "--rho", str(s.rho), "--bs",
                    str(s.batch_scale), "--weight-decay", str(s.weight_decay)]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        # PASSIVE: idle OpenMP threads sleep instead of spinning. On a dedicated machine that
        # changes nothing; on a shared one the spinning threads of torch's default policy fight
        # the other processes and the step gets several times slower (the full run also
        # measures the peer with the default environment).
        if omp_wait_policy:
            self.env["OMP_WAIT_POLICY"] = omp_wait_policy
        else:
            self.env.pop("OMP_WAIT_POLICY", None)
        self.omp_wait_policy = omp_wait_policy or "default"
        self.proc = None
        self.info: dict[str, Any] | None = None

    def start(self) -> "PeerServer":
        if self.proc is None:
            self._err = open(Path(self._tmp.name) / "stderr.txt", "w+")
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                         text=True, env=self.env, bufsize=1)
        return self

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self._err.seek(0)
            raise RuntimeError(f"torch peer exited ({self.proc.poll()}):\n{self._err.read()[-4000:]}")
        return line

    def ready(self) -> dict[str, Any]:
        self.start()
        while self.info is None:
            line = self._line()
            if line.startswith("READY "):
                self.info = json.loads(line[6:])
                self.info["machine"]["omp_wait_policy"] = self.omp_wait_policy
        return self.info

    def call(self, name: str) -> dict[str, Any]:
        self.ready()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        while True:
            line = self._line()
            if line.startswith("{"):
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"torch peer: {reply['error']}")
                return reply

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._err.close()
        self._tmp.cleanup()


# ---------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------


def summarize(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
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
    targets = {}
    for key, bound, what in TARGETS:
        b = summary[bound] if isinstance(bound, str) else bound
        targets[key] = {"value": summary[key], "op": "<=", "bound": b,
                        "bound_from": bound if isinstance(bound, str) else None,
                        "met": bool(summary[key] <= b), "what": what}
    return summary, targets


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


PEER_CALLS = (  # torch peer call -> the JAX program doing the same work (same config and batch)
    ("so_step", "steps/so_graddiff"),
    ("sophia_h_step", "steps/so_graddiff_hutchinson"),
    ("forward", "second_order/{step}/forward"),
    ("grad", "second_order/{step}/grad"),
    ("hvp", "second_order/{step}/hvp"),
)


def run(profile: Profile, log=print) -> dict[str, Any]:
    jax.config.update("jax_enable_compilation_cache", False)
    t_start = time.perf_counter()
    _block(jnp.ones((256, 256)) @ jnp.ones((256, 256)))  # start XLA's thread pool before counting it
    machine = machine_info()
    threads = machine["jax_threads"]
    workers = machine["cores_available"]
    log(f"simu-jax bench ({profile.name}) on {machine['cpu_model']}, {machine['cores_available']} cores, "
        f"backend {machine['backend']}, JAX threads {threads}, load average {machine['loadavg_start']}")
    result: dict[str, Any] = {
        "profile": dataclasses.asdict(profile), "machine": machine,
        "method": ("medians of `repeats` timed runs after `warmup` runs; the programs compared in a section run in "
                   "turns (A B C, C B A, ...), JAX and the PyTorch peer included, so they see the same machine "
                   "load; the first (compiling) call of each program is reported apart (first_call_s, compile)"),
    }
    phases: dict[str, Any] = {}
    recorder = CompileRecorder()

    @contextlib.contextmanager
    def phase(name):
        log(name)
        before, t0 = loadavg(), time.perf_counter()
        yield
        phases[name] = {"wall_s": time.perf_counter() - t0, "loadavg_before": before, "loadavg_after": loadavg()}

    peers: list[PeerServer] = []
    try:
        with phase("setup"):
            setup = step_setup(profile)
            peer = PeerServer(profile, setup["model"], setup["batch"], threads)
            peers.append(peer)
            peer.start()  # imports torch and loads the model while JAX compiles
            so_rows = second_order_jobs(profile)
            st_jobs = step_jobs(profile, setup)
            rm_jobs = remat_jobs(profile)
            comp_jobs: dict[int, Job] = {}
            if profile.overlap:
                for n in profile.compile_layers:
                    if n == profile.layers and profile.compile_dims == profile.sizes[profile.step_size] \
                            and "simu_graddiff" in profile.methods:
                        comp_jobs[n] = next(j for label, *_, j in st_jobs if label == "simu_graddiff")
                    else:
                        comp_jobs[n] = compile_job(profile, n)
        by_name = ({j.name: j for _, js in so_rows for j in js} | {j.name: j for *_, j in st_jobs}
                   | {j.name: j for j in rm_jobs})
        with phase("compile_programs"):
            jobs = list(by_name.values()) + [j for j in comp_jobs.values() if j not in by_name.values()]
            heavy = ("newton", "hutchinson", "hvp", "ggn")  # longest compiles first: the pool ends together
            jobs.sort(key=lambda j: not any(h in j.name for h in heavy))
            first_calls(jobs, recorder, workers)
            log(f"  {len(jobs)} programs compiled ({workers} at a time)")

        with phase("second_order"):
            sizes = []
            for row, js in so_rows:
                times = round_robin({j.name.rsplit("/", 1)[1]: j.once for j in js}, profile.repeats, profile.warmup)
                for j in js:
                    times[j.name.rsplit("/", 1)[1]].update(first_call_s=j.first_call_s, compile=j.compile)
                row["times"] = times
                g = times["grad"]["median_s"]
                row["ratios_to_grad"] = {n: t["median_s"] / g for n, t in times.items() if n != "grad"}
                row["cost_analysis"] = {j.name.rsplit("/", 1)[1]: j.fn.cost for j in js
                                        if isinstance(j.fn, AotCall) and j.fn.cost}
                if "hvp" in times:
                    row["hvp_analysis"] = hvp_analysis(row)
                log(f"  h={row['hidden']}: " + ", ".join(f"{n} {t['median_s'] * 1e3:.1f} ms" for n, t in times.items()))
                sizes.append(row)
            result["second_order"] = {"loss": "graddiff (-NLL forget + NLL retain); all parameters, *_simu: the "
                                              "SIMU subset (attention + selected down_proj rows)",
                                      "hutchinson_probes": 1, "sizes": sizes,
                                      "hvp_variants": ("hvp_revrev: reverse-over-reverse, grad of <grad f, v>; "
                                                       "hvp_lin4: jax.linearize of the gradient map once, then 4 "
                                                       "products (Newton-CG and Hutchinson reuse it this way); "
                                                       "cost_analysis: XLA's flop / byte count of the compiled "
                                                       "program")}

        if rm_jobs:
            with phase("remat"):
                step_key = f"second_order/h{profile.sizes[profile.step_size][0]}"
                entries = {f"default/{op}": by_name[f"{step_key}/{op}"].once for op in ("grad", "hvp")
                           if f"{step_key}/{op}" in by_name}
                entries |= {j.name.split("/", 1)[1]: j.once for j in rm_jobs}
                times = round_robin(entries, profile.repeats, profile.warmup)
                ratios = {}
                for policy in profile.remat_compare:
                    for op in ("grad", "hvp"):
                        if f"default/{op}" in times:
                            ratios[f"{policy}/{op}"] = (times[f"{policy}/{op}"]["median_s"]
                                                        / times[f"default/{op}"]["median_s"])
                result["remat"] = {
                    "what": ("gradient and exact HVP at the steps' config of models built with another remat policy "
                             "(jax.checkpoint of the scanned layer), in turns with the default model's; ratios: "
                             "policy / default"),
                    "default_policy": _default_remat(), "times": times, "ratios_to_default": ratios}
                log("  " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))

        with phase("steps"):
            # the gradients of the same config run in the same turns: the loss + gradient part of each step
            step_key = f"second_order/h{profile.sizes[profile.step_size][0]}"
            grads = {f"{step_key}/{g}": by_name[f"{step_key}/{g}"] for g in ("grad", "grad_simu")
                     if f"{step_key}/{g}" in by_name}
            times = round_robin({label: job.once for label, _, _, job in st_jobs}
                                | {name.rsplit("/", 1)[1]: j.once for name, j in grads.items()},
                                profile.repeats, profile.warmup)
            same = {k: times[k] for k in ("grad", "grad_simu") if k in times}
            methods = {}
            for label, u, box, job in st_jobs:
                t = {**times[label], "first_call_s": job.first_call_s, "compile": job.compile}
                m = jax.device_get(box["m"])
                is_simu = u.method.trainable.mlp == "masked"
                grad_t = same.get("grad_simu" if is_simu else "grad")
                row = {"method": STEP_METHODS[label][0], "settings": dict(STEP_METHODS[label][1]), "times": t,
                       "median_s": t["median_s"], "state_bytes": u.state_bytes(), **state_bytes_split(u.opt_state),
                       "num_trainable": u.num_trainable,
                       "first_loss": float(jax.device_get(box["first_loss"])), "last_loss": float(m["loss"]),
                       "tokens_per_s": 2 * profile.batch * profile.seq / t["median_s"]}
                if grad_t is not None:  # loss + gradient on the same trainable set, config and batch
                    row["grad_s"] = grad_t["median_s"]
                    row["rest_of_step_s"] = t["median_s"] - grad_t["median_s"]
                if "cg_iterations" in m:
                    row["cg_iterations"] = int(m["cg_iterations"])
                    row["per_cg_iter_s"] = t["median_s"] / max(row["cg_iterations"], 1)
                    hvp_simu = result["second_order"]["sizes"][profile.step_size]["times"].get("hvp_simu")
                    if hvp_simu is not None:
                        row["hvp_simu_s"] = hvp_simu["median_s"]  # one HVP, from the second-order section
                    if grad_t is not None:
                        row["per_cg_iter_over_grad"] = row["per_cg_iter_s"] / grad_t["median_s"]
                log(f"  {label}: {t['median_s'] * 1e3:.1f} ms, state {row['state_bytes'] / 2**20:.2f} MiB")
                methods[label] = row
            cfg = setup["cfg"]
            result["steps"] = {
                "gradients_in_turns": {k: v for k, v in same.items()},
                "config": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                           "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "heads": cfg.num_attention_heads,
                           "seq": profile.seq, "batch_per_part": profile.batch, "num_params": _count(setup["params"]),
                           "neuron_fraction": profile.neuron_fraction,
                           "settings": dataclasses.asdict(_settings(profile))},
                "methods": methods}

        with phase("peer"):
            step_key = f"h{profile.sizes[profile.step_size][0]}"
            pairs = [(name, prog.format(step=step_key)) for name, prog in PEER_CALLS
                     if prog.format(step=step_key) in by_name]
            info = peer.ready()
            first = {name: peer.call(name) for name, _ in pairs}  # so_step first: at the shared initial weights
            entries = {}
            for name, prog in pairs:
                entries[f"jax/{name}"] = by_name[prog].once
                entries[f"torch/{name}"] = functools.partial(lambda n: peer.call(n)["s"], name)
            phase_runs: list[dict] = []

            def so_torch():
                reply = peer.call("so_step")
                phase_runs.append(reply["phases"])
                return reply["s"]

            entries["torch/so_step"] = so_torch
            times = round_robin(entries, profile.repeats, profile.warmup)
            timed_phases = phase_runs[-profile.repeats:]
            calls = {name: {"jax_program": prog, "jax": times[f"jax/{name}"],
                            "torch": {**times[f"torch/{name}"], "first_call_s": first[name]["s"]}}
                     for name, prog in pairs}
            pm = {"machine": info["machine"], "num_params": info["num_params"],
                  "model": "transformers LlamaForCausalLM, attn_implementation=eager, float32",
                  "first_loss": first["so_step"]["out"], "calls": calls,
                  "so_step_phases": {k: statistics.median(r[k] for r in timed_phases) for k in timed_phases[0]}}
            peer.close()
            result["peer"] = pm
            log("  " + ", ".join(f"{n}: JAX {c['jax']['median_s'] * 1e3:.1f} ms / torch "
                                 f"{c['torch']['median_s'] * 1e3:.1f} ms" for n, c in calls.items()))
            if profile.peer_default_env:
                pd = PeerServer(profile, setup["model"], setup["batch"], threads, omp_wait_policy=None)
                peers.append(pd)
                pd.ready()
                pd.call("so_step")
                t = round_robin({"jax": by_name["steps/so_graddiff"].once, "torch": lambda: pd.call("so_step")["s"]},
                                profile.repeats, profile.warmup)
                pd.close()
                result["peer_default_env"] = {
                    "what": "the SO step of the same peer with torch's default OpenMP environment (idle threads "
                            "spin), in turns with the JAX SO step", "so_step": t,
                    "jax_over_torch_so_step": t["jax"]["median_s"] / t["torch"]["median_s"]}
                log(f"  default OpenMP env: JAX {t['jax']['median_s'] * 1e3:.1f} ms / torch "
                    f"{t['torch']['median_s'] * 1e3:.1f} ms")
        machine["torch_threads"] = pm["machine"]["torch_threads"]
        machine["torch_interop_threads"] = pm["machine"]["torch_interop_threads"]
        jax_loss = result["steps"]["methods"]["so_graddiff"]["first_loss"]
        result["parity"] = {"jax_so_first_loss": jax_loss, "torch_so_first_loss": pm["first_loss"],
                            "abs_diff": abs(jax_loss - pm["first_loss"]),
                            "what": "GradDiff loss at the shared initial weights and batch, JAX vs transformers"}

        with phase("compile"):
            rows = {}
            for n, job in comp_jobs.items():  # --quick: measured in compile_programs
                rows[str(n)] = {"layers": n, "runs": [{**job.compile, "first_call_s": job.first_call_s}]}
            if not comp_jobs:
                for n in profile.compile_layers:
                    runs = []
                    for _ in range(profile.compile_repeats):
                        jax.clear_caches()
                        job = compile_job(profile, n)
                        job.first(recorder)
                        runs.append({**job.compile, "first_call_s": job.first_call_s})
                    rows[str(n)] = {"layers": n, "runs": runs}
            for n, r in rows.items():
                for k in ("total_s", "trace_s", "lower_s", "xla_compile_s"):
                    r[k if k != "total_s" else "median_s"] = statistics.median(run[k] for run in r["runs"])
                log(f"  {n} layers: {r['median_s']:.2f} s (trace {r['trace_s']:.2f}, lower {r['lower_s']:.2f}, "
                    f"XLA {r['xla_compile_s']:.2f})")
            result["compile"] = {
                "hidden": profile.compile_dims[0], "intermediate": profile.compile_dims[1], "layers": rows,
                "measure": ("trace + lower + XLA compile seconds (jax.monitoring compile events) of the first step "
                            "of a fresh simu_graddiff Unlearner after jax.clear_caches(); persistent cache off"
                            + ("; --quick: overlapped with the other compiles (the 4-layer one is the steps "
                               "section's simu_graddiff)" if profile.overlap else ""))}
    finally:
        recorder.close()
        for pr in peers:
            pr.close()

    machine["loadavg_end"] = loadavg()
    result["phases"] = phases
    summary, targets = summarize(result)
    result.update(summary)
    result["targets"] = targets
    result["wall_s"] = time.perf_counter() - t_start
    result["timestamp_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return result


# ---------------------------------------------------------------------------------------
# Profile (--profile-only): where the time of a step goes, per XLA op kind and per torch op
# ---------------------------------------------------------------------------------------

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

    _block(fn())
    with tempfile.TemporaryDirectory(prefix="simu-bench-prof-") as d:
        jax.profiler.start_trace(d)
        t0 = time.perf_counter()
        for _ in range(calls):
            _block(fn())
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
    """Profile the step config's programs (gradient, HVP, SO and SIMU steps) and the torch SO step."""
    profile = Profile(**{k: tuple(v) if isinstance(v, list) and k != "sizes" else v
                         for k, v in result["profile"].items()} | {"sizes": tuple(map(tuple, result["profile"]["sizes"]))})
    profile = dataclasses.replace(profile, methods=tuple(m for m in ("so_graddiff", "simu_graddiff")
                                                         if m in profile.methods), hvp_variants=(),
                                  remat_compare=())
    hidden, inter = profile.sizes[profile.step_size]
    batch = jax.tree.map(jnp.asarray, make_batch(profile, seed=0))
    _, jobs = _second_order_size(dataclasses.replace(profile, ops=tuple(o for o in ("forward", "grad", "hvp")
                                                                        if o in profile.ops)), hidden, inter, batch)
    setup = step_setup(profile)
    programs = {j.name.rsplit("/", 1)[1]: j.fn for j in jobs}
    programs |= {f"step/{label}": job.fn for label, _, _, job in step_jobs(profile, setup)}
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
    peer = PeerServer(profile, setup["model"], setup["batch"], result["machine"]["jax_threads"])
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


def _parser():
    try:
        from simu_jax.cli import ArgumentParser
    except Exception:  # noqa: BLE001 - the CLI module is optional here
        ArgumentParser = argparse.ArgumentParser
    ap = ArgumentParser(prog="simu-jax bench",
                        description="Benchmarks: second-order cost, masked steps, JAX vs PyTorch, compile time.")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (< 60 s; run by the tests)")
    ap.add_argument("--json", type=Path, default=None, help="write the full results here")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (the median is reported)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--profile-only", action="store_true",
                    help="no timing run: profile the step config of the existing --json result (jax.profiler op "
                         "kinds of the gradient, HVP, SO and SIMU steps; torch.profiler of the peer's SO step) and "
                         "add it there as `profile_run` (run it in a fresh process: it turns on XLA's per-op trace events)")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            ap.error("--repeats must be >= 1")
        profile = dataclasses.replace(profile, repeats=args.repeats)
    log = (lambda *a, **k: None) if args.quiet else functools.partial(print, file=sys.stderr, flush=True)
    if args.profile_only:
        if args.json is None or not args.json.is_file():
            ap.error("--profile-only needs --json FILE, an existing result of `simu-jax bench`")
        if not _backend_initialized():
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PROFILE_XLA_FLAGS}".strip()
        result = json.loads(args.json.read_text())
        log(f"profiling the step config of {args.json}")
        result["profile_run"] = profile_run(result, log)
        _write_json(args.json, result)
        return 0
    if args.quick and not _backend_initialized():
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
    result = run(profile, log)
    if args.json is not None:
        _write_json(args.json, result)
    print(json.dumps({"headline": {k: result[k] for k in SUMMARY_KEYS},
                      "targets_met": {k: v["met"] for k, v in result["targets"].items()},
                      "wall_s": round(result["wall_s"], 1)}, indent=2))
    return 0


def _write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API: assume initialized (flags left alone)
        return True


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o)}")


if __name__ == "__main__":
    raise SystemExit(cli_main())
