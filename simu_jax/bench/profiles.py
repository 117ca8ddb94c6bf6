"""What a bench run measures: the headline keys, the targets, the two profiles (full, --quick)
and the step settings both JAX and the PyTorch peer use."""

from __future__ import annotations

import dataclasses

__all__ = ["FULL", "QUICK", "QUICK_XLA_FLAGS", "SECOND_ORDER_OPS", "STEP_METHODS", "SUMMARY_KEYS", "TARGETS",
           "UNTARGETED", "Profile", "ScaleSpec", "step_settings"]

SUMMARY_KEYS = (
    "jax_over_torch_so_step",
    "jax_over_torch_grad",
    "torch_over_jax_so_step",
    "jax_over_torch_hvp",
    "torch_over_jax_hvp",
    "jax_over_torch_hvp_raw",
    "simu_over_so_step",
    "simu_over_so_grad_flops",
    "sophia_h_over_so_step",
    "hvp_over_grad",
    "hvp_flops_over_grad",
    "hvp_time_over_flops",
    "hvp_flop_efficiency",
    "hvp_marginal_lin_over_grad",
    "attribution_over_grad",
    "compile_s_4_layers",
    "compile_s_8_layers",
    "compile_s_16_layers",
    "compile_16_over_4",
    "simu_state_bytes_over_so",
    "simu_state_bytes_over_so_raw",
    "trainable_fraction_simu",
    "newton_per_cg_iter_s",
    "scale_parameters",
    "scale_load_rss_over_model",
    "scale_load_device_over_model_per_device",
    "scale_save_rss_over_written",
    "scale_save_device_over_params_per_device",
    "scale_step_temp_fsdp8_over_one_device",
    "scale_wall_s",
    "bench_wall_s",
    "bench_wall_budget_s",
)

# (summary key, comparison, bound, what it means); the bound is a number or (another summary
# key, slack): "value <= summary[key] + slack". Targets of issue 15 (and the state-bytes one).
TARGETS = (
    ("jax_over_torch_so_step", "<=", 0.8,
     "JAX SO-GradDiff step / PyTorch SOUL SophiaG step, the peer at its faster thread setting"),
    ("jax_over_torch_grad", "<=", 0.8,
     "JAX gradient / PyTorch gradient (forward + backward), the peer at its faster thread setting"),
    ("simu_over_so_step", "<=", ("simu_over_so_grad_flops", 0.03),
     "SIMU step / SO step (JAX), within 0.03 of the matmul-flop ratio of the SIMU-subset gradient to the full one"),
    ("sophia_h_over_so_step", "<=", 3.0, "Sophia-H step (one Hutchinson HVP) / SO step (JAX)"),
    # issue 15 wrote this target as "hvp_time_over_flops >= 0.95" and named it the HVP's flop
    # efficiency; time ratio / flop ratio is the inverse of an efficiency (below 1 the HVP does more
    # flops per second than the gradient), so the bound is on flop ratio / time ratio, the intent
    ("hvp_flop_efficiency", ">=", 0.95,
     "exact HVP / gradient: matmul-flop ratio / time ratio, the HVP's flop rate over the gradient's (largest size)"),
    ("hvp_marginal_lin_over_grad", "<=", 2.0,
     "each product after the first of one curvature.linearize of the gradient map, chained in a loop as Lanczos "
     "runs them / gradient (largest size)"),
    ("attribution_over_grad", "<=", 6.0,
     "IG attribution (m = 3, 8 layers) of the forget rows / the gradient on the same rows"),
    ("compile_16_over_4", "<=", 1.5, "SIMU step compile time, 16 layers / 4 layers"),
    ("simu_state_bytes_over_so", "<=", ("trainable_fraction_simu", 0.0),
     "SIMU per-parameter optimizer+curvature bytes / SO's (scalar leaves such as the step counter "
     "excluded), no larger than the trainable fraction"),
    # the scale section (issue 18): a sharded checkpoint on 8 simulated devices, fsdp=8
    ("scale_parameters", ">=", 3e8, "parameters of the scale section's sharded checkpoint (4 bf16 safetensors files)"),
    ("scale_load_rss_over_model", "<=", 1.2,
     "peak host RSS of load_pretrained onto fsdp=8 / the model's bytes in the target dtype (float32)"),
    ("scale_load_device_over_model_per_device", "<=", 1.05,
     "largest per-device share of the loaded model / (model / 8)"),
    ("scale_save_rss_over_written", "<=", 1.2,
     "peak host RSS of save_pretrained from the fsdp=8 params / the bytes written (bf16, the source's dtype)"),
    ("scale_save_device_over_params_per_device", "<=", 1.05,
     "largest per-device bytes during the save (params + the gathered tensor) / (params / 8)"),
    ("scale_step_temp_fsdp8_over_one_device", "<=", 1.5 / 8,
     "XLA temp bytes of the SIMU step per device on fsdp=8 / on one device (the steps' config, 8 + 8 rows)"),
    ("bench_wall_s", "<=", ("bench_wall_budget_s", 0.0), "wall seconds of this bench run, within its profile's budget"),
)
# Figures reported without a target, and why.
UNTARGETED = {
    "hvp_over_grad": "exact HVP time / gradient time (largest size): no target, no single exact HVP can be <= 2x "
                     "(it does `hvp_flops_over_grad` times the gradient's matmul flops); the targets are "
                     "`hvp_flop_efficiency` and `hvp_marginal_lin_over_grad`",
    "hvp_time_over_flops": "exact HVP / gradient: time ratio / matmul-flop ratio (largest size), "
                           "1 / `hvp_flop_efficiency`: below 1 the HVP does more flops per second than the "
                           "gradient, so a `>=` bound on it (issue 15's wording) would be met by a slower HVP; "
                           "the target is on `hvp_flop_efficiency`",
}

SECOND_ORDER_OPS = ("forward", "grad", "hvp", "ggn_vp", "hutchinson", "grad_simu", "hvp_simu")
STEP_METHODS = {  # label -> (registry name, StepSettings overrides)
    "fo_graddiff": ("fo_graddiff", {}),
    "so_graddiff": ("so_graddiff", {}),
    "so_graddiff_hutchinson": ("so_graddiff", {"estimator": "hutchinson"}),
    "simu_graddiff": ("simu_graddiff", {}),
    "simu_newton": ("simu_newton", {}),
    "simu_ggn": ("simu_ggn", {}),
    "simu_influence": ("simu_influence", {}),
}


@dataclasses.dataclass(frozen=True)
class ScaleSpec:
    """The checkpoint of the scale section (a random LLaMA) and the step-memory batch."""

    hidden: int = 1024
    mlp: int = 2816
    layers: int = 24
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 8
    files: int = 4
    load_dtype: str = "float32"
    step_batch: int = 8  # rows per part of the step-memory step: divides fsdp=8


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
    methods: tuple[str, ...] = tuple(STEP_METHODS)
    neuron_fraction: float = 0.1
    cg_iters: int = 8
    overlap: bool = False  # --quick: peer and compile section overlap the rest (wall time only)
    # at the largest size only: other exact HVP formulations (reverse-over-reverse; one
    # linearization of the gradient map with 1 and with 4 chained products, as the Newton-type
    # solvers run them: the marginal product is (lin4 - lin1) / 3)
    hvp_variants: tuple[str, ...] = ("hvp_revrev", "hvp_lin1", "hvp_lin4")
    # at the step size: the gradient and HVP of models built with these remat policies, in
    # turns with the default model's (the model default is remat="none")
    remat_compare: tuple[str, ...] = ("dots",)
    # ... and of models built with these layer loops (the default, "auto", unrolls up to 8 layers on one device)
    layer_loop_compare: tuple[str, ...] = ("scan",)
    # IG attribution (m = attribution_steps) of the step config's forget rows on a model with
    # attribution_layers layers (the step config's other sizes), in turns with the gradient on
    # the same rows; fewer repeats: one IG call costs several gradients
    attribution_layers: int = 8
    attribution_steps: int = 3
    attribution_repeats: int = 5
    wall_budget_s: float = 1200.0  # the bench_wall_s target
    # the scale section's checkpoint and step batch (scale.py): a >= 300M model in the full bench,
    # a tiny one in --quick (the same code path, the JSON complete; its ratios are not the targets')
    scale: ScaleSpec = ScaleSpec()


FULL = Profile(name="full", vocab=4096, sizes=((128, 384), (256, 768), (512, 1536)), head_dim=64, layers=4,
               seq=128, batch=4, step_size=1, compile_dims=(128, 384), compile_layers=(4, 8, 16), repeats=7,
               warmup=1, compile_repeats=2)
# --quick: one size, which is also the 4-layer compile model (its simu_graddiff step's compile is
# the 4-layer figure), the programs every headline key needs (12 XLA programs; XLA:CPU spends
# ~5-15 CPU-s on each).
QUICK = Profile(name="quick", vocab=256, sizes=((32, 64),), head_dim=16, layers=4, seq=32, batch=2, step_size=0,
                compile_dims=(32, 64), compile_layers=(4, 8, 16), repeats=2, warmup=1, compile_repeats=1,
                ops=("grad", "hvp", "grad_simu"),
                methods=("so_graddiff", "so_graddiff_hutchinson", "simu_graddiff", "simu_newton"),
                cg_iters=4, overlap=True, hvp_variants=("hvp_lin1", "hvp_lin4"), remat_compare=(),
                layer_loop_compare=(),
                attribution_repeats=2,
                wall_budget_s=180.0,
                scale=ScaleSpec(hidden=64, mlp=128, layers=2, vocab=512, heads=4, kv_heads=2))
# --quick in a fresh process also compiles with LLVM optimizations off (compile CPU ~40% lower;
# its timings are not meaningful anyway). Recorded in machine.xla_flags.
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"


def step_settings(p: Profile, **overrides):
    """The `StepSettings` of every step the bench times (the torch peer gets the same numbers)."""
    from simu_jax.engine import StepSettings
    from simu_jax.losses import LossSpec
    from simu_jax.optim import OptimSpec

    # SOUL's Sophia (betas 0.9/0.95, rho 0.04, bs 5120, wd 0.1, g*g every step); the torch peer
    # gets exactly these numbers. Newton-type steps: simu_newton's Lanczos solver always takes
    # cg_iters products; for the CG solvers (simu_ggn's Steihaug, simu_influence's CG) a damping
    # of 10 and tol 1e-12 keep CG running (to its cap or the trust radius), so each step does a
    # known number of products (this section measures cost, not the solve).
    base = dict(learning_rate=1e-5, b1=0.9, b2=0.95, rho=0.04, batch_scale=5120.0, weight_decay=0.1,
                update_interval=1, estimator="fisher", damping=10.0, trust_radius=0.5, cg_iters=p.cg_iters,
                cg_tol=1e-12)
    base.update(overrides)
    if base["estimator"] != "fisher":  # SOUL's batch scale belongs to its g*g estimate only
        base["batch_scale"] = 1.0
    return StepSettings(optim=OptimSpec(**base), loss=LossSpec(gamma=1.0))
