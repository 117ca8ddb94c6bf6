"""`simu-jax bench`: second-order cost, masked savings, attribution, JAX against the PyTorch peer, compile time.

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
  exact HVP formulations: reverse-over-reverse (``hvp_revrev``) and one ``curvature.linearize`` of the
  (``curvature.fold_transposed_dots``) gradient map with its first product (``hvp_lin1``) and
  with 4 products chained in a loop, each normalized (``hvp_lin4``, as the Newton-type solvers'
  Lanczos / CG run them; the marginal product is (lin4 - lin1) / 3); for every program, XLA's
  cost analysis (flops, bytes) of the compiled executable and the
  matmul flops of its jaxpr over all layers (``harness.matmul_flops``: XLA:CPU counts the layer
  scan's body once); ``hvp_analysis`` puts time ratios next to flop ratios (is the HVP
  flop-bound?).
* ``remat``: the gradient and HVP of the step config with models built with another remat
  policy (``dots``), in turns with the default model's.
* ``steps``: one ``Unlearner.step`` of ``fo_graddiff`` (AdamW), ``so_graddiff`` (Sophia, SOUL's
  g*g curvature, all params), ``so_graddiff_hutchinson`` (Sophia-H: one exact HVP per step),
  ``simu_graddiff``, ``simu_newton``, ``simu_ggn`` and ``simu_influence`` (time per curvature
  product = step time / products done: Lanczos steps or CG iterations; the HVP on the SIMU
  subset timed alone is in ``second_order``), with the
  optimizer + curvature state bytes of each method and a breakdown (loss + gradient on the
  method's trainable subset, taken from ``second_order`` at the same config, vs the rest).
  State bytes are split into per-parameter leaves and scalar leaves (the step counter):
  ``simu_state_bytes_over_so`` compares the per-parameter state (what scales with the trainable
  set, the quantity the trainable fraction bounds); ``simu_state_bytes_over_so_raw`` is the
  ratio of all bytes.
* ``attribution``: IG attribution (``attribution.neuron_scores``, m = 3) of the step config's
  forget rows (one batch) on an 8-layer model with the step config's other sizes, in turns
  with the gradient of the same rows' token-mean NLL (all parameters) of that model
  (``attribution_over_grad``; fewer repeats, ``attribution_repeats``: one IG call costs several
  gradients).
* ``peer``: ``torch_peer.py --serve`` (in this package) in a subprocess: transformers ``LlamaForCausalLM``
  (eager attention) with the same weights (``models.convert.save_pretrained``) and batch, a
  SOUL-style SophiaG step (g*g every step), a Sophia-H step (double-backward HVP), and the
  forward / gradient / HVP alone, each in turns with the JAX program doing the same work, with
  ``torch.set_num_threads`` = the size of XLA's CPU thread pool and ``OMP_WAIT_POLICY=PASSIVE``.
  A second peer with torch's default OpenMP environment runs the SO step and the gradient
  (``DEFAULT_ENV_CALLS``) in the same turns; the headline JAX / PyTorch ratios of those two
  are against the faster setting (``peer_fastest``; the winner is ``torch_fastest_env``).
* ``compile``: trace + lower + XLA compile of the ``simu_graddiff`` step at 4, 8 and 16 layers,
  measured on the first call of a fresh ``Unlearner`` after ``jax.clear_caches()`` (the
  persistent compilation cache is off), from JAX's own compile events.

* ``scale``: a sharded checkpoint in and out and true FSDP's activation memory, on 8 simulated
  CPU devices, each measurement a fresh subprocess (``scale.py``; ``ScaleSpec``): a random
  LLaMA (349 M parameters in the full profile, a tiny one in --quick) written as 4 bf16
  safetensors shards + index; the peak host RSS and the largest per-device share of
  ``simu_jax.load_pretrained(path, mesh=fsdp=8, dtype=float32)`` and of
  ``simu_jax.save_pretrained`` from those params (bf16 out); and XLA's
  ``memory_analysis().temp_size_in_bytes`` of the ``simu_graddiff`` step of the steps' config
  with 8 + 8 rows, per device on fsdp=8 over one device's. Its result keys are listed in
  ``scale.py``'s docstring.

Compiles of the second-order and step programs run first, ``cores`` at a time in threads (XLA
compiles on one thread each and releases the GIL); all timed runs then run one at a time, and
the compile and scale sections run alone at the end. ``--quick`` (tiny sizes, one model size, the
programs the headline keys need, 2 repeats, the peer, the compile and the scale section overlapped
with the rest) is what the test suite runs: it checks that the JSON is complete, never speed.

The summary (``SUMMARY_KEYS``, computed from the sections by ``summarize``) holds the headline
ratios and ``bench_wall_s``; ``TARGETS`` (key, comparison ``<=`` / ``>=``, bound: a number or
another summary key + slack) are checked by ``check_targets``; ``UNTARGETED`` says why a figure
has no target. The run's wall time is ``bench_wall_s``, against its profile's ``wall_budget_s``.

``--profile-only --json FILE`` adds ``profile_run`` to an existing result: where the step
config's gradient, HVP, SO, Sophia-H and SIMU steps and the IG attribution spend their time per
kind of XLA op (jax.profiler, XLA:CPU per-op trace events) and the torch SO step per aten op
(torch.profiler).

Modules: ``profiles`` (what is measured: the full and --quick profiles, headline keys,
targets), ``machine`` (CPU, cores, versions, XLA's thread pool), ``harness`` (compile events,
jobs, runs in turns, medians, matmul flops, ``summarize``, ``check_targets``), ``problems`` (models, batches, masks, the jobs of
each section), ``scale`` (the scale section and its child processes), ``peer`` (drives the
PyTorch peer in a subprocess), ``torch_peer`` (the PyTorch
peer itself; run as a script, never imported here: torch stays optional), ``runner`` (``run``:
the phases in order), ``profiling`` (``--profile-only``) and ``cli`` (``cli_main``).
"""

from __future__ import annotations

from simu_jax.bench.cli import cli_main
from simu_jax.bench.harness import COMPARE, COMPILE_EVENTS, PEER_ENVS, AotCall, CompileRecorder, Job, \
    check_targets, first_calls, hvp_analysis, matmul_flops, peer_fastest, round_robin, state_bytes_split, summarize
from simu_jax.bench.machine import available_cores, loadavg, machine_info, xla_cpu_threads
from simu_jax.bench.peer import DEFAULT_ENV_CALLS, PEER_CALLS, PeerServer, find_peer_script, torch_missing
from simu_jax.bench.problems import attribution_jobs, compile_job, init_params, make_batch, model_config, \
    random_neuron_mask, remat_jobs, second_order_jobs, step_jobs, step_setup
from simu_jax.bench.profiles import FULL, QUICK, QUICK_XLA_FLAGS, SECOND_ORDER_OPS, STEP_METHODS, SUMMARY_KEYS, \
    TARGETS, UNTARGETED, Profile, ScaleSpec
from simu_jax.bench.profiling import PROFILE_XLA_FLAGS, op_category, profile_call, profile_run
from simu_jax.bench.runner import run
from simu_jax.bench.scale import device_bytes, run_scale

__all__ = [
    "COMPARE", "COMPILE_EVENTS", "DEFAULT_ENV_CALLS", "FULL", "PEER_CALLS", "PEER_ENVS", "PROFILE_XLA_FLAGS",
    "QUICK", "QUICK_XLA_FLAGS", "SECOND_ORDER_OPS", "STEP_METHODS", "SUMMARY_KEYS", "TARGETS", "UNTARGETED",
    "AotCall", "CompileRecorder", "Job", "PeerServer", "Profile", "ScaleSpec", "attribution_jobs", "available_cores",
    "check_targets", "cli_main", "compile_job", "device_bytes", "find_peer_script", "first_calls", "hvp_analysis",
    "init_params",
    "loadavg", "machine_info", "make_batch", "matmul_flops", "model_config", "op_category", "peer_fastest",
    "profile_call", "profile_run", "random_neuron_mask", "remat_jobs", "round_robin", "run", "run_scale",
    "second_order_jobs",
    "state_bytes_split", "step_jobs", "step_setup", "summarize", "torch_missing", "xla_cpu_threads",
]
