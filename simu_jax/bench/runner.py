"""One bench run: its steps (phases) in order, each writing its section of the result.

``run(profile)`` = setup (the step config, the torch peer started, every job built) ->
compile_programs (first calls, ``cores`` at a time) -> second_order -> remat -> steps ->
attribution -> peer -> parity -> compile -> scale -> summary. See the package docstring for
what each section measures. The scale section's child processes run alone at the end (in
--quick they start at setup, in a thread, and overlap the rest).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from simu_jax.bench.harness import AotCall, CompileRecorder, Job, block, first_calls, hvp_analysis, peer_fastest, \
    round_robin, state_bytes_split, summarize
from simu_jax.bench.machine import loadavg, machine_info
from simu_jax.bench.peer import DEFAULT_ENV_CALLS, PEER_CALLS, PeerServer
from simu_jax.bench.problems import attribution_jobs, compile_job, count_params, default_layer_loop, default_remat, \
    model_variants, remat_jobs, second_order_jobs, step_jobs, step_setup
from simu_jax.bench.profiles import STEP_METHODS, Profile, step_settings
from simu_jax.bench.scale import run_scale

__all__ = ["BenchRun", "run"]

METHOD_NOTE = ("medians of `repeats` timed runs after `warmup` runs; the programs compared in a section run in "
               "turns (A B C, C B A, ...), JAX and the PyTorch peer included, so they see the same machine "
               "load; the first (compiling) call of each program is reported apart (first_call_s, compile)")
# longest compiles first: the pool ends together
HEAVY_COMPILES = ("newton", "hutchinson", "hvp", "ggn", "attribution/ig")


def run(profile: Profile, log=print) -> dict[str, Any]:
    """The whole bench under `profile`: the result dict that `simu-jax bench --json` writes."""
    jax.config.update("jax_enable_compilation_cache", False)
    t_start = time.perf_counter()
    block(jnp.ones((256, 256)) @ jnp.ones((256, 256)))  # start XLA's thread pool before counting it
    bench = BenchRun(profile, log)
    try:
        bench.setup()
        bench.compile_programs()
        bench.second_order()
        bench.remat()
        bench.steps()
        bench.attribution()
        bench.peer()
        bench.parity()
        bench.compile()
        bench.scale()
    finally:
        bench.close()
    return bench.finish(t_start)


class BenchRun:
    """The state the steps of one run share; each step method is one phase of the run."""

    def __init__(self, profile: Profile, log):
        self.profile, self.log = profile, log
        self.machine = machine_info()
        self.threads = self.machine["jax_threads"]
        self.workers = self.machine["cores_available"]
        m = self.machine
        log(f"simu-jax bench ({profile.name}) on {m['cpu_model']}, {m['cores_available']} cores, "
            f"backend {m['backend']}, JAX threads {self.threads}, load average {m['loadavg_start']}")
        self.result: dict[str, Any] = {"profile": dataclasses.asdict(profile), "machine": self.machine,
                                       "method": METHOD_NOTE}
        self.phases: dict[str, Any] = {}
        self.recorder = CompileRecorder()
        self.peers: list[PeerServer] = []
        self.by_name: dict[str, Job] = {}
        self.comp_jobs: dict[int, Job] = {}
        self.scale_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.scale_future: concurrent.futures.Future | None = None

    @contextlib.contextmanager
    def phase(self, name: str):
        self.log(name)
        before, t0 = loadavg(), time.perf_counter()
        yield
        self.phases[name] = {"wall_s": time.perf_counter() - t0, "loadavg_before": before,
                             "loadavg_after": loadavg()}

    @property
    def step_key(self) -> str:
        """The second-order programs' prefix at the step config's size."""
        return f"second_order/h{self.profile.sizes[self.profile.step_size][0]}"

    # -- the steps, in order --------------------------------------------------------------

    def setup(self) -> None:
        """Build the step config, start the torch peer (it imports torch and loads the model while
        JAX compiles) and build every job (nothing is compiled yet)."""
        p = self.profile
        with self.phase("setup"):
            self.step_problem = step_setup(p)
            model, batch = self.step_problem["model"], self.step_problem["batch"]
            # the main peer runs with the JAX side's host allocator settings; the default-env peer
            # with torch's and glibc's defaults throughout
            self.main_peer = PeerServer(p, model, batch, self.threads, host_allocator=self.machine["host_allocator"])
            self.default_peer = PeerServer(p, model, batch, self.threads, omp_wait_policy=None)
            self.peers += [self.main_peer, self.default_peer]
            for peer in self.peers:
                peer.start()
            if p.overlap:  # --quick: the scale section's child processes run meanwhile
                self.scale_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
                self.scale_future = self.scale_pool.submit(run_scale, p.scale, dataclasses.asdict(p),
                                                           lambda *a, **k: None)
            self.so_rows = second_order_jobs(p)
            self.st_jobs = step_jobs(p, self.step_problem)
            self.rm_jobs = remat_jobs(p)
            self.att_jobs = attribution_jobs(p)
            if p.overlap:
                for n in p.compile_layers:
                    if n == p.layers and p.compile_dims == p.sizes[p.step_size] and "simu_graddiff" in p.methods:
                        self.comp_jobs[n] = next(j for label, *_, j in self.st_jobs if label == "simu_graddiff")
                    else:
                        self.comp_jobs[n] = compile_job(p, n)
        self.by_name = ({j.name: j for _, js in self.so_rows for j in js} | {j.name: j for *_, j in self.st_jobs}
                        | {j.name: j for j in self.rm_jobs + self.att_jobs})

    def compile_programs(self) -> None:
        """The first (compiling) call of every job, longest compiles first, `cores` at a time."""
        with self.phase("compile_programs"):
            jobs = list(self.by_name.values()) + [j for j in self.comp_jobs.values()
                                                  if j not in self.by_name.values()]
            jobs.sort(key=lambda j: not any(h in j.name for h in HEAVY_COMPILES))
            first_calls(jobs, self.recorder, self.workers)
            self.log(f"  {len(jobs)} programs compiled ({self.workers} at a time)")

    def second_order(self) -> None:
        """Per model size: the second-order programs in turns, ratios to the gradient, XLA's cost."""
        p = self.profile
        with self.phase("second_order"):
            sizes = []
            for row, js in self.so_rows:
                times = _in_turns(js, p.repeats, p.warmup)
                row["times"] = times
                g = times["grad"]["median_s"]
                row["ratios_to_grad"] = {n: t["median_s"] / g for n, t in times.items() if n != "grad"}
                row["cost_analysis"] = {j.name.rsplit("/", 1)[1]: j.fn.cost for j in js
                                        if isinstance(j.fn, AotCall) and j.fn.cost}
                if "hvp" in times:
                    row["hvp_analysis"] = hvp_analysis(row)
                self.log(f"  h={row['hidden']}: "
                         + ", ".join(f"{n} {t['median_s'] * 1e3:.1f} ms" for n, t in times.items()))
                sizes.append(row)
            self.result["second_order"] = {
                "loss": "graddiff (-NLL forget + NLL retain); all parameters, *_simu: the "
                        "SIMU subset (attention + selected down_proj rows)",
                "hutchinson_probes": 1, "sizes": sizes,
                "hvp_variants": ("hvp_revrev: reverse-over-reverse, grad of <grad f, v>; "
                                 "hvp_lin1 / hvp_lin4: curvature.linearize of the gradient map once, then 1 product / 4 "
                                 "products chained in a fori_loop, each normalized (as the Newton-type "
                                 "solvers' Lanczos and CG reuse it); the marginal product is "
                                 "(hvp_lin4 - hvp_lin1) / 3; "
                                 "cost_analysis: XLA's flop / byte count of the compiled "
                                 "program (gflop: XLA:CPU counts a loop body once, so the layer "
                                 "scan's flops are one layer's) and matmul_gflop, the dot_general "
                                 "flops of its jaxpr with every scan iteration counted (the flop "
                                 "ratios of hvp_analysis and simu_over_so_grad_flops)")}

    def remat(self) -> None:
        """Gradient and HVP of the other remat policies' models, in turns with the default model's."""
        p = self.profile
        if not self.rm_jobs:
            return
        with self.phase("remat"):
            entries = {f"default/{op}": self.by_name[f"{self.step_key}/{op}"].once for op in ("grad", "hvp")
                       if f"{self.step_key}/{op}" in self.by_name}
            entries |= {j.name.split("/", 1)[1]: j.once for j in self.rm_jobs}
            times = round_robin(entries, p.repeats, p.warmup)
            ratios = {}
            for policy in model_variants(p):
                for op in ("grad", "hvp"):
                    if f"default/{op}" in times:
                        ratios[f"{policy}/{op}"] = (times[f"{policy}/{op}"]["median_s"]
                                                    / times[f"default/{op}"]["median_s"])
            self.result["remat"] = {
                "what": ("gradient and exact HVP at the steps' config of models built with another remat policy "
                         "(jax.checkpoint of each layer) or layer loop (`layer_loop`: one scanned layer body, or "
                         "the layers unrolled), in turns with the default model's; ratios: variant / default"),
                "default_policy": default_remat(), "default_layer_loop": default_layer_loop(p.layers),
                "times": times, "ratios_to_default": ratios}
            self.log("  " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))

    def steps(self) -> None:
        """One step of every method in turns (with the gradients of the same config), state bytes."""
        p = self.profile
        with self.phase("steps"):
            # the gradients of the same config run in the same turns: the loss + gradient part of each step
            grads = {f"{self.step_key}/{g}": self.by_name[f"{self.step_key}/{g}"] for g in ("grad", "grad_simu")
                     if f"{self.step_key}/{g}" in self.by_name}
            times = round_robin({label: job.once for label, _, _, job in self.st_jobs}
                                | {name.rsplit("/", 1)[1]: j.once for name, j in grads.items()},
                                p.repeats, p.warmup)
            same = {k: times[k] for k in ("grad", "grad_simu") if k in times}
            methods = {label: self._step_row(label, u, box, job, times, same)
                       for label, u, box, job in self.st_jobs}
            cfg, params = self.step_problem["cfg"], self.step_problem["params"]
            self.result["steps"] = {
                "gradients_in_turns": {k: v for k, v in same.items()},
                "config": {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                           "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size, "heads": cfg.num_attention_heads,
                           "seq": p.seq, "batch_per_part": p.batch, "num_params": count_params(params),
                           "neuron_fraction": p.neuron_fraction,
                           "settings": _flat_settings(step_settings(p))},
                "methods": methods}

    def _step_row(self, label: str, u, box: dict, job: Job, times: dict, same: dict) -> dict[str, Any]:
        """The steps section's row of one method."""
        p = self.profile
        t = {**times[label], "first_call_s": job.first_call_s, "compile": job.compile}
        m = jax.device_get(box["m"])
        is_simu = u.method.trainable.mlp == "masked"
        grad_t = same.get("grad_simu" if is_simu else "grad")
        row = {"method": STEP_METHODS[label][0], "settings": dict(STEP_METHODS[label][1]), "times": t,
               "median_s": t["median_s"], "state_bytes": u.state_bytes(), **state_bytes_split(u.opt_state),
               "num_trainable": u.num_trainable,
               "first_loss": float(jax.device_get(box["first_loss"])), "last_loss": float(m["loss"]),
               "tokens_per_s": 2 * p.batch * p.seq / t["median_s"]}
        if grad_t is not None:  # loss + gradient on the same trainable set, config and batch
            row["grad_s"] = grad_t["median_s"]
            row["rest_of_step_s"] = t["median_s"] - grad_t["median_s"]
        if "cg_iterations" in m:
            row["cg_iterations"] = int(m["cg_iterations"])
            row["per_cg_iter_s"] = t["median_s"] / max(row["cg_iterations"], 1)
            hvp_simu = self.result["second_order"]["sizes"][p.step_size]["times"].get("hvp_simu")
            if hvp_simu is not None:
                row["hvp_simu_s"] = hvp_simu["median_s"]  # one HVP, from the second-order section
            if grad_t is not None:
                row["per_cg_iter_over_grad"] = row["per_cg_iter_s"] / grad_t["median_s"]
        self.log(f"  {label}: {t['median_s'] * 1e3:.1f} ms, state {row['state_bytes'] / 2**20:.2f} MiB")
        return row

    def attribution(self) -> None:
        """IG attribution of the forget rows in turns with the gradient on the same rows (same model)."""
        p = self.profile
        with self.phase("attribution"):
            times = _in_turns(self.att_jobs, p.attribution_repeats, p.warmup)
            self.result["attribution"] = {
                "what": ("simu_jax.attribution.neuron_scores(method='ig') of the steps' forget rows (one batch) on a "
                         "model with the steps' sizes and `layers` layers, in turns with jax.grad of the same rows' "
                         "token-mean NLL (GradDiff's forget half, all parameters) of that model"),
                "layers": p.attribution_layers, "ig_steps": p.attribution_steps, "rows": p.batch, "seq": p.seq,
                "repeats": p.attribution_repeats, "times": times}
            self.log(f"  IG {times['ig']['median_s'] * 1e3:.1f} ms, gradient {times['grad']['median_s'] * 1e3:.1f} ms")

    def peer(self) -> None:
        """Each peer call in turns with the JAX program doing the same work; the SO step and the
        gradient also with the peer in torch's default OpenMP environment, in the same turns."""
        p, peer, pd = self.profile, self.main_peer, self.default_peer
        with self.phase("peer"):
            step_key = f"h{p.sizes[p.step_size][0]}"
            pairs = [(name, prog.format(step=step_key)) for name, prog in PEER_CALLS
                     if prog.format(step=step_key) in self.by_name]
            info, info_default = peer.ready(), pd.ready()
            # so_step first: at the shared initial weights
            first = {name: peer.call(name) for name, _ in pairs}
            first_default = {name: pd.call(name) for name, _ in pairs if name in DEFAULT_ENV_CALLS}
            entries = {}
            for name, prog in pairs:
                entries[f"jax/{name}"] = self.by_name[prog].once
                entries[f"torch/{name}"] = functools.partial(lambda n: peer.call(n)["s"], name)
                if name in first_default:
                    entries[f"torch_default_env/{name}"] = functools.partial(lambda n: pd.call(n)["s"], name)
            phase_runs: list[dict] = []

            def so_torch():
                reply = peer.call("so_step")
                phase_runs.append(reply["phases"])
                return reply["s"]

            entries["torch/so_step"] = so_torch
            times = round_robin(entries, p.repeats, p.warmup)
            timed_phases = phase_runs[-p.repeats:]
            calls = {}
            for name, prog in pairs:
                c = calls[name] = {"jax_program": prog, "jax": times[f"jax/{name}"],
                                   "torch": {**times[f"torch/{name}"], "first_call_s": first[name]["s"]}}
                if name in first_default:
                    c["torch_default_env"] = {**times[f"torch_default_env/{name}"],
                                              "first_call_s": first_default[name]["s"]}
                    c["torch_fastest_env"] = peer_fastest(c)[0]
            self.result["peer"] = {
                "machine": info["machine"], "default_env_machine": info_default["machine"],
                "num_params": info["num_params"],
                "model": "transformers LlamaForCausalLM, attn_implementation=eager, float32",
                "envs": {"torch": "OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep), host allocator "
                                  f"{peer.host_allocator} (the JAX side's, simu_jax.host_memory)",
                         "torch_default_env": "torch's default OpenMP environment (idle threads spin), glibc's "
                                              "default allocator"},
                "first_loss": first["so_step"]["out"], "calls": calls,
                "so_step_phases": {k: statistics.median(r[k] for r in timed_phases) for k in timed_phases[0]}}
            for pr in (peer, pd):
                pr.close()
            self.log("  " + ", ".join(
                f"{n}: JAX {c['jax']['median_s'] * 1e3:.1f} ms / torch {c['torch']['median_s'] * 1e3:.1f} ms"
                + (f" (default env {c['torch_default_env']['median_s'] * 1e3:.1f} ms)" if "torch_default_env" in c
                   else "") for n, c in calls.items()))

    def parity(self) -> None:
        """The peer's threads into the machine block; the first GradDiff loss of both sides."""
        pm = self.result["peer"]
        self.machine["torch_threads"] = pm["machine"]["torch_threads"]
        self.machine["torch_interop_threads"] = pm["machine"]["torch_interop_threads"]
        jax_loss = self.result["steps"]["methods"]["so_graddiff"]["first_loss"]
        self.result["parity"] = {"jax_so_first_loss": jax_loss, "torch_so_first_loss": pm["first_loss"],
                                 "abs_diff": abs(jax_loss - pm["first_loss"]),
                                 "what": "GradDiff loss at the shared initial weights and batch, JAX vs transformers"}

    def compile(self) -> None:
        """Compile seconds of the simu_graddiff step per layer count (--quick: measured already, in
        compile_programs; else here, alone, after jax.clear_caches())."""
        p = self.profile
        with self.phase("compile"):
            rows = {}
            for n, job in self.comp_jobs.items():  # --quick: measured in compile_programs
                rows[str(n)] = {"layers": n, "runs": [{**job.compile, "first_call_s": job.first_call_s}]}
            if not self.comp_jobs:
                for n in p.compile_layers:
                    runs = []
                    for _ in range(p.compile_repeats):
                        jax.clear_caches()
                        job = compile_job(p, n)
                        job.first(self.recorder)
                        runs.append({**job.compile, "first_call_s": job.first_call_s})
                    rows[str(n)] = {"layers": n, "runs": runs}
            for n, r in rows.items():
                for k in ("total_s", "trace_s", "lower_s", "xla_compile_s"):
                    r[k if k != "total_s" else "median_s"] = statistics.median(run[k] for run in r["runs"])
                self.log(f"  {n} layers: {r['median_s']:.2f} s (trace {r['trace_s']:.2f}, lower {r['lower_s']:.2f}, "
                         f"XLA {r['xla_compile_s']:.2f})")
            self.result["compile"] = {
                "hidden": p.compile_dims[0], "intermediate": p.compile_dims[1], "layers": rows,
                "measure": ("trace + lower + XLA compile seconds (jax.monitoring compile events) of the first step "
                            "of a fresh simu_graddiff Unlearner after jax.clear_caches(); persistent cache off"
                            + ("; --quick: overlapped with the other compiles (the 4-layer one is the steps "
                               "section's simu_graddiff)" if p.overlap else ""))}

    def scale(self) -> None:
        """Sharded load / save of the scale checkpoint and the SIMU step's per-device temp bytes,
        each in a fresh 8-device process (`scale.run_scale`; --quick: started at setup)."""
        p = self.profile
        with self.phase("scale"):
            if self.scale_future is not None:
                self.result["scale"] = self.scale_future.result()
            else:
                self.result["scale"] = run_scale(p.scale, dataclasses.asdict(p), self.log)
            self.log(f"  scale section: {self.result['scale']['wall_s']:.1f} s")

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        self.recorder.close()
        for pr in self.peers:
            pr.close()
        if self.scale_pool is not None:
            self.scale_pool.shutdown(wait=True)

    def finish(self, t_start: float) -> dict[str, Any]:
        """The summary, the targets and the wall time, added to the result (returned)."""
        result = self.result
        self.machine["loadavg_end"] = loadavg()
        result["phases"] = self.phases
        result["wall_s"] = time.perf_counter() - t_start
        summary, targets = summarize(result)
        result.update(summary)
        result["targets"] = targets
        result["timestamp_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return result


def _in_turns(jobs: list[Job], repeats: int, warmup: int) -> dict[str, dict[str, Any]]:
    """`round_robin` over jobs, keyed by the last part of their names, with each job's first call."""
    times = round_robin({j.name.rsplit("/", 1)[1]: j.once for j in jobs}, repeats, warmup)
    for j in jobs:
        times[j.name.rsplit("/", 1)[1]].update(first_call_s=j.first_call_s, compile=j.compile)
    return times


def _flat_settings(s) -> dict:
    """The step's settings as one flat dict (optimizer and loss fields side by side)."""
    return {**dataclasses.asdict(s.optim), **dataclasses.asdict(s.loss), "inject_nan_at_step": s.inject_nan_at_step}
