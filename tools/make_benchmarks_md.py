#!/usr/bin/env python
"""Regenerate docs/benchmarks.md (tables) and docs/benchmarks.png (plot) from `simu-jax bench` JSON.

    simu-jax bench --json docs/benchmarks.json
    python tools/make_benchmarks_md.py [--json docs/benchmarks.json] [--md docs/benchmarks.md]
                                       [--png docs/benchmarks.png]

Everything on the page, the "what limits it" notes included, is computed from the JSON, so the
page always describes the run it names. The targets are the package's (`simu_jax.bench.TARGETS`),
checked on the JSON's figures: a result of an older bench shows the figures it lacks as "–".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout: the targets are the package's own

from simu_jax.bench.harness import check_targets  # noqa: E402
from simu_jax.bench.profiles import UNTARGETED  # noqa: E402


def ms(x) -> str:
    if x is None:
        return "–"
    return f"{x * 1e3:.1f}" if x * 1e3 < 1000 else f"{x * 1e3:,.0f}"


def num(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def mib(b) -> str:
    return f"{b / 2**20:.2f}"


def _t(d, *path):
    for k in path:
        if d is None or k not in d:
            return None
        d = d[k]
    return d


def machine_line(r: dict) -> str:
    m = r["machine"]
    peer = r.get("peer", {}).get("machine", {})
    load = ""
    if m.get("loadavg_start"):
        busy = max(m["loadavg_start"][0], (m.get("loadavg_end") or [0])[0]) > m["cores_available"]
        load = (f" Load average (1/5/15 min) {m['loadavg_start']} at the start, {m.get('loadavg_end')} at the end"
                + (" — **the machine was shared with other jobs during the run: absolute times are inflated and "
                   "ratios are noisier than on an idle machine.**" if busy else "."))
    return (f"**Machine.** {m['cpu_model']}, {m['cores_available']} cores available ({m['cpu_count']} logical CPUs), "
            f"{m.get('memory_gib')} GiB RAM; {m['platform']}; Python {m['python']}. JAX {m['jax']} / jaxlib "
            f"{m['jaxlib']} (backend `{m['backend']}`, device `{m['device']}`), Flax {m['flax']}, Optax {m['optax']}; "
            f"PyTorch {m['torch']}, transformers {m['transformers']}. Threads: XLA CPU pool {m['jax_threads']}, "
            f"`torch.set_num_threads({m.get('torch_threads')})` (inter-op {m.get('torch_interop_threads')}, "
            f"`OMP_WAIT_POLICY={peer.get('omp_wait_policy', '?')}`). XLA_FLAGS: `{m['xla_flags'] or '(none)'}`."
            + (f" Host allocator: `{m['host_allocator']}` (`simu_jax.host_memory`; the main PyTorch peer "
               f"`{peer.get('host_allocator', '?')}`, the default-environment one glibc's defaults)."
               if "host_allocator" in m else "")
            + load)


def targets(r: dict) -> dict:
    """The package's targets checked on this JSON's figures (missing ones: value / met None)."""
    return check_targets(r)


def targets_table(r: dict) -> list[str]:
    rows = ["| figure | value | target | met |", "|---|---|---|---|"]
    for key, t in targets(r).items():
        ref = (f" (`{t['bound_from']}`" + (f" + {t['slack']:g}" if t["slack"] else "") + ")") if t["bound_from"] else ""
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        rows.append(f"| `{key}`: {t['what']} | {num(t['value'], 4)} | {t['op']} {num(t['bound'], 4)}{ref} | {met} |")
    for key, why in UNTARGETED.items():
        rows.append(f"| `{key}` | {num(r.get(key), 4)} | {why} (here `hvp_flops_over_grad` = "
                    f"{num(r.get('hvp_flops_over_grad'), 3)}) | – |")
    return rows


def second_order_table(r: dict) -> list[str]:
    so = r["second_order"]
    ops = [op for op in ("forward", "grad", "hvp", "ggn_vp", "hutchinson", "grad_simu", "hvp_simu")
           if op in so["sizes"][0]["times"]]
    names = {"forward": "forward (loss)", "grad": "gradient", "hvp": "exact HVP", "ggn_vp": "GN product",
             "hutchinson": "Hutchinson diag (1 probe)", "grad_simu": "gradient, SIMU subset",
             "hvp_simu": "HVP, SIMU subset"}
    head = "| model (hidden / intermediate, params) | " + " | ".join(names[o] for o in ops) + " |"
    rows = [head, "|---" * (len(ops) + 1) + "|"]
    for s in so["sizes"]:
        g = s["times"]["grad"]["median_s"]
        cells = [f"{ms(s['times'][o]['median_s'])} ms ({s['times'][o]['median_s'] / g:.2f}x)" for o in ops]
        rows.append(f"| {s['hidden']} / {s['intermediate']}, {s['num_params'] / 1e6:.2f} M "
                    f"(SIMU {s['num_params_simu'] / 1e6:.2f} M) | " + " | ".join(cells) + " |")
    return rows


METHOD_NAMES = {
    "fo_graddiff": "`fo_graddiff` (AdamW, all params)",
    "so_graddiff": "`so_graddiff` (Sophia, g*g, all params; SOUL)",
    "so_graddiff_hutchinson": "`so_graddiff` + Hutchinson (Sophia-H, one exact HVP)",
    "simu_graddiff": "`simu_graddiff` (Sophia on the SIMU subset)",
    "simu_newton": "`simu_newton` (trust-region Newton, exact Hessian, Lanczos solver, SIMU subset)",
    "simu_ggn": "`simu_ggn` (trust-region Gauss-Newton, Steihaug CG, SIMU subset)",
    "simu_influence": "`simu_influence` (influence step, CG on the retain GGN, SIMU subset)",
}


def steps_table(r: dict) -> list[str]:
    rows = ["| method | step (ms) | tokens/s | loss + gradient (ms) | rest of the step (ms) | trainable params | "
            "optimizer + curvature state (MiB) | per-parameter state bytes / trainable param | scalar state "
            "bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for label, m in r["steps"]["methods"].items():
        param_bytes = m.get("state_param_bytes", m["state_bytes"])
        per = param_bytes / m["num_trainable"] if m["num_trainable"] else 0
        rows.append(f"| {METHOD_NAMES.get(label, label)} | {ms(m['median_s'])} | {m['tokens_per_s']:,.0f} | "
                    f"{ms(m.get('grad_s'))} | {ms(m.get('rest_of_step_s'))} | {m['num_trainable']:,} | "
                    f"{mib(m['state_bytes'])} | {per:.4f} | {m.get('state_scalar_bytes', '–')} |")
    return rows


def hvp_table(r: dict) -> list[str]:
    """Exact HVP formulations and XLA's flop counts, per size (where the JSON has them)."""
    sizes = [s for s in r["second_order"]["sizes"] if s.get("hvp_analysis")]
    if not sizes:
        return []
    rows = ["| model | forward / grad: time (flops) | HVP fwd-over-rev / grad: time (flops) | "
            "rev-over-rev / grad: time (flops) | linearized, per product of 4 / grad: time (flops) | "
            "linearized, marginal product / grad: time (flops) | HVP flop ratio / time ratio |",
            "|---|---|---|---|---|---|---|"]

    def cell(a, op):
        t, f = a["time_over_grad"].get(op), a["flops_over_grad"].get(op)
        if t is None:
            return "–"
        return f"{t:.2f}" + (f" ({f:.2f})" if f is not None else "")

    for s in sizes:
        a = s["hvp_analysis"]
        rows.append(f"| {s['hidden']} / {s['intermediate']}, {s['num_params'] / 1e6:.2f} M | {cell(a, 'forward')} | "
                    f"{cell(a, 'hvp')} | {cell(a, 'hvp_revrev')} | {cell(a, 'hvp_lin4_per_product')} | "
                    f"{cell(a, 'hvp_linearized_marginal')} | {num(a.get('hvp_flop_efficiency'))} |")
    return rows


def remat_table(r: dict) -> list[str]:
    rm = r.get("remat")
    if not rm:
        return ["Not measured in this run (the full profile measures it)."]
    loop = f", default layer loop `{rm['default_layer_loop']}`" if rm.get("default_layer_loop") else ""
    rows = [f"{rm['what']}; default policy `{rm['default_policy']}`{loop}.", "",
            "| program | default (ms) | " + " | ".join(f"`{p}` (ms) | `{p}` / default" for p in
                                                    sorted({k.split('/')[0] for k in rm['ratios_to_default']})) + " |"]
    policies = sorted({k.split("/")[0] for k in rm["ratios_to_default"]})
    rows.append("|---|---|" + "---|---|" * len(policies))
    for op in ("grad", "hvp"):
        if f"default/{op}" not in rm["times"]:
            continue
        cells = [f"{ms(rm['times'][f'{p}/{op}']['median_s'])} | {rm['ratios_to_default'][f'{p}/{op}']:.3f}"
                 for p in policies]
        rows.append(f"| {op} | {ms(rm['times'][f'default/{op}']['median_s'])} | " + " | ".join(cells) + " |")
    return rows


PEER_NAMES = {
    "so_step": "SO-GradDiff step (Sophia, g*g every step; SOUL)",
    "sophia_h_step": "Sophia-H step (one Hutchinson HVP)",
    "forward": "forward (GradDiff loss, no grad)",
    "grad": "gradient (forward + backward)",
    "hvp": "exact HVP (gradient + HVP; torch: double backward)",
}


def peer_table(r: dict) -> list[str]:
    rows = ["| per call, same config / batch / threads, run in turns | JAX (ms) | PyTorch, `OMP_WAIT_POLICY=PASSIVE` "
            "(ms) | PyTorch, torch's default OpenMP environment (ms) | JAX / PyTorch at its faster setting | faster "
            "setting |", "|---|---|---|---|---|---|"]
    for name, c in r["peer"]["calls"].items():
        j, t, d = c["jax"]["median_s"], c["torch"]["median_s"], _t(c, "torch_default_env", "median_s")
        rows.append(f"| {PEER_NAMES.get(name, name)} | {ms(j)} | {ms(t)} | {ms(d)} | {j / min(t, d or t):.3f} | "
                    f"{c.get('torch_fastest_env', 'PASSIVE (the only one measured)')} |")
    return rows


def attribution_table(r: dict) -> list[str]:
    a = r.get("attribution")
    if not a:
        return ["Not measured in this run (a bench older than issue 15)."]
    t = a["times"]
    return [f"{a['what']}: {a['layers']} layers, m = {a['ig_steps']}, {a['rows']} rows of {a['seq']} tokens, median of "
            f"{a['repeats']} runs.", "",
            "| IG attribution (ms) | gradient, same rows (ms) | IG / gradient | first calls (s): IG, gradient |",
            "|---|---|---|---|",
            f"| {ms(t['ig']['median_s'])} | {ms(t['grad']['median_s'])} | "
            f"{t['ig']['median_s'] / t['grad']['median_s']:.2f} | {t['ig']['first_call_s']:.1f}, "
            f"{t['grad']['first_call_s']:.1f} |"]


def scale_section(r: dict) -> list[str]:
    sc = r.get("scale")
    if not sc:
        return ["Not measured in this run (a bench older than issue 18)."]
    sp, ck, ld, sv, st = sc["spec"], sc["checkpoint"], sc["load"], sc["save"], sc["step_memory"]
    c = st["config"]
    n = sc["devices"]
    return [
        f"A random LLaMA of {ck['parameters'] / 1e6:.3g} M parameters (hidden {sp['hidden']}, MLP {sp['mlp']}, "
        f"{sp['layers']} layers, {sp['heads']} / {sp['kv_heads']} KV heads, vocabulary {sp['vocab']}) written as "
        f"{ck['files']} bf16 safetensors files + index ({ck['file_bytes'] / 1e6:.3g} MB), then, each in a fresh "
        f"process with {n} simulated CPU devices (`simu_jax/bench/scale.py`): loaded onto `{sc['mesh']}` by "
        f"`simu_jax.load_pretrained` as {ld['dtype']}, saved from there by `simu_jax.save_pretrained` (in the "
        f"source's {sv['dtype']}; cold: its gather programs compile inside the call), and the `simu_graddiff` "
        f"step of the steps' config ({c['hidden']} hidden, {c['intermediate']} intermediate, {c['layers']} "
        f"layers, {st['batch_per_part']} + {st['batch_per_part']} rows of {st['seq']} tokens) compiled on one device "
        f"and on `{sc['mesh']}`. Peak RSS: `VmHWM` after a reset, minus the RSS at the reset (on CPU the devices' "
        "arrays are host memory, so a load's peak includes the arrays it builds; the save starts with them "
        "resident). Per-device bytes: each live array's shard on each device (the save's: the largest, sampled "
        f"after each tensor's gather). Section wall time {sc['wall_s']:.0f} s.",
        "",
        "| phase | seconds | peak host RSS | / model | largest device | / (model / N) |",
        "|---|---:|---:|---:|---:|---:|",
        f"| load ({ld['dtype']}) | {ld['seconds']:.1f} | {ld['peak_rss_bytes'] / 1e6:.4g} MB | "
        f"{ld['peak_rss_over_model']:.3f} (of {ld['model_bytes'] / 1e6:.4g} MB) | {max(ld['device_bytes']) / 1e6:.4g} MB | "
        f"{ld['max_device_share_over_model_per_device']:.3f} |",
        f"| save (to {sv['dtype']}) | {sv['seconds']:.1f} | {sv['peak_rss_bytes'] / 1e6:.4g} MB | "
        f"{sv['peak_rss_over_written']:.3f} (of {sv['written_bytes'] / 1e6:.4g} MB written) | "
        f"{max(sv['device_bytes']) / 1e6:.4g} MB | {sv['max_device_share_over_params_per_device']:.3f} (params "
        "+ the gathered tensor) |",
        "",
        "| SIMU step, XLA temp bytes | one device | per device, " + sc["mesh"] + " | ratio (1/8 = 0.125) |",
        "|---|---:|---:|---:|",
        f"| {st['method']} | {st['one_device_temp_bytes'] / 2**20:.1f} MiB | {st['fsdp8_temp_bytes'] / 2**20:.1f} MiB | "
        f"{st['fsdp8_over_one_device']:.3f} |",
    ]


def compile_table(r: dict) -> list[str]:
    rows = ["| layers | trace + lower + compile (s) | trace (s) | lower to StableHLO (s) | XLA compile (s) |",
            "|---|---|---|---|---|"]
    for n, c in r["compile"]["layers"].items():
        rows.append(f"| {n} | {c['median_s']:.2f} | {c['trace_s']:.2f} | {c['lower_s']:.2f} | {c['xla_compile_s']:.2f} |")
    return rows


CATS = (("matmul", "matmul"),
        ("elementwise with a layout change (copy_*/transpose_* fusions)", "elementwise + layout change"),
        ("copies", "copies"),
        ("slices / updates (scan stacking)", "slices / updates"),
        ("other fusions (elementwise, reductions, scatter)", "other fusions"),
        ("loops / sync", "loops / sync"))


def profile_section(r: dict) -> list[str]:
    pr = r.get("profile_run")
    if not pr:
        return ["No profile in this JSON (`simu-jax bench --profile-only --json docs/benchmarks.json` adds one)."]
    rows = [f"`simu-jax bench --profile-only` on {pr['config']}: `jax.profiler` traces with XLA:CPU per-op "
            "events (`--xla_cpu_enable_xprof_traceme=true`), op time summed over XLA's CPU threads per call, by "
            "kind of XLA op; and `torch.profiler` on the peer's SO step (self CPU time per step).", "",
            "| program | traced wall (ms/call) | op time (ms) | " + " | ".join(short for _, short in CATS) + " |",
            "|---" * (3 + len(CATS)) + "|"]
    for name, d in pr["jax"].items():
        share = d.get("by_category_share", {})
        rows.append(f"| JAX `{name}` | {d['wall_ms']:.0f} | {d['op_ms_total']:.0f} | "
                    + " | ".join(f"{share.get(c, 0):.0%}" for c, _ in CATS) + " |")
    t = pr.get("torch_so_step")
    if t:
        top = ", ".join(f"{k} {v:.0f} ms" for k, v in list(t["self_cpu_ms_per_step"].items())[:5])
        rows += ["", f"PyTorch SO step: {t['total_self_cpu_ms_per_step']:.0f} ms self CPU per step, "
                     f"{t['matmul_share']:.0%} in matmuls (top ops: {top})."]
    return rows


def _share(r, prog, cat):
    return _t(r, "profile_run", "jax", prog, "by_category_share", cat)


def _profile_ratio_note(r: dict) -> str:
    g, h = _t(r, "profile_run", "jax", "grad"), _t(r, "profile_run", "jax", "hvp")
    if not g or not h:
        return ""
    parts = []
    for cat, short in CATS[:3]:
        a, b = g["by_category_ms"].get(cat, 0), h["by_category_ms"].get(cat, 0)
        if a > 0:
            parts.append(f"{short} {b / a:.1f}x")
    text = (f" Profile at the steps' config: HVP op time {h['op_ms_total']:.0f} ms vs gradient "
            f"{g['op_ms_total']:.0f} ms; by kind, HVP / gradient: " + ", ".join(parts))
    timed = r["second_order"]["sizes"][r["profile"]["step_size"]]["times"]
    off = {op: x["wall_ms"] / (timed[op]["median_s"] * 1e3) for op, x in (("grad", g), ("hvp", h)) if op in timed}
    if any(not 2 / 3 <= v <= 1.5 for v in off.values()):  # the profile's calls are few and not in turns
        text += (" (rough: under the profiler " + ", ".join(f"the {'gradient' if op == 'grad' else 'HVP'} ran "
                                                           f"{v:.2f}x its timed median" for op, v in off.items())
                 + ")")
    return text + "."


def _profile_grad_note(r: dict) -> str:
    g, f, t = (_t(r, "profile_run", "jax", "grad"), _t(r, "profile_run", "jax", "forward"),
               _t(r, "profile_run", "torch_so_step"))
    if not g:
        return ""
    sh = g["by_category_share"]
    note = (f" Profile of the JAX gradient: {1 - sh.get(CATS[0][0], 0):.0%} of its op time is outside matmuls: "
            f"{sh.get(CATS[1][0], 0):.0%} in elementwise fusions that also change the layout of their output "
            f"(`copy_*`/`transpose_*` fusions: the attention heads' transposes and their cotangents'), "
            f"{sh.get(CATS[2][0], 0) + sh.get(CATS[3][0], 0):.0%} in copies and slices / updates "
            "(the per-layer slices of the stacked weights and the stacking of their gradients), "
            f"{sh.get(CATS[4][0], 0):.0%} in other elementwise fusions and reductions (norms, rope, SwiGLU, "
            "softmax and the loss, forward and backward)")
    if f:
        note += (f"; in the forward {1 - f['by_category_share'].get(CATS[0][0], 0):.0%} "
                 "is outside matmuls")
    so = _t(r, "profile_run", "jax", "step/so_graddiff")
    if so:
        note += (f". In the profile run the SO step takes {so['wall_ms']:.0f} ms against the gradient's "
                 f"{g['wall_ms']:.0f} ms (the Sophia update and g*g: the difference)")
    if t:
        note += (f". PyTorch's SO step spends {t['matmul_share']:.0%} of its self CPU time in MKL matmuls, its "
                 "backward kernels work in place on the natural layouts")
    rm = r.get("remat")
    if rm and rm.get("ratios_to_default"):
        note += (f". Model variants against the default (remat `{rm['default_policy']}`, layer loop "
                 f"`{rm.get('default_layer_loop', 'scan')}`; Remat section): "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in rm["ratios_to_default"].items()))
    return note + "."


def _profile_mix(r: dict, prog: str) -> str:
    """One program's op time by kind, from the profile run (empty if the JSON has none)."""
    d = _t(r, "profile_run", "jax", prog)
    if not d:
        return ""
    sh = d["by_category_share"]
    return (f" Profile of `{prog}`: {d['op_ms_total']:.0f} ms op time per call, "
            + ", ".join(f"{short} {sh.get(cat, 0):.0%}" for cat, short in CATS) + ".")


def _gflop(cost: dict) -> float:
    """A program's flops: the matmul flops of every layer (older results: XLA's count)."""
    return cost.get("matmul_gflop", cost["gflop"])


def _simu_flops_note(r: dict) -> str:
    key = f"h{r['steps']['config']['hidden']}"
    row = next((s for s in r["second_order"]["sizes"] if f"h{s['hidden']}" == key), None)
    ca = (row or {}).get("cost_analysis", {})
    if "grad" not in ca or "grad_simu" not in ca:
        return ""
    t = row["times"]
    return (f" Flops at this config: the SIMU-subset gradient does "
            f"{_gflop(ca['grad_simu']) / _gflop(ca['grad']):.2f}x the full gradient's and takes "
            f"{t['grad_simu']['median_s'] / t['grad']['median_s']:.2f}x its time (the elementwise work of every "
            "layer, the activation backward down to layer 0 and the vocab-sized loss do not shrink with the "
            "mask).")


def _simu_profile_note(r: dict, value: float, slack: float = 0.03) -> str:
    """The two steps' wall time in the profile run (another run of the same programs), and whether
    their ratio there differs from the steps section's ``value`` by more than the target's slack."""
    so, simu = _t(r, "profile_run", "jax", "step/so_graddiff"), _t(r, "profile_run", "jax", "step/simu_graddiff")
    if not so or not simu:
        return ""
    ratio = simu["wall_ms"] / so["wall_ms"]
    text = (f" In the profile run (the same programs, minutes later, not in turns) SIMU {simu['wall_ms']:.0f} ms vs "
            f"SO {so['wall_ms']:.0f} ms, {ratio:.2f}x")
    if abs(ratio - value) > slack:
        text += ": the two runs' ratios differ by more than the target's slack of 0.03"
    return text + "."


def _hvp_note(r: dict, t: dict) -> str:
    """Why the exact HVP costs what it does (largest size)."""
    so2 = r["second_order"]["sizes"]
    ratios = ", ".join(f"{s['hidden']}: {s['times']['hvp']['median_s'] / s['times']['grad']['median_s']:.2f}x"
                       for s in so2)
    a = so2[-1].get("hvp_analysis") or {}
    fl, tm = a.get("flops_over_grad", {}), a.get("time_over_grad", {})
    text = (f"- **`hvp_flop_efficiency` = {num(t['hvp_flop_efficiency']['value'])}, `hvp_marginal_lin_over_grad` = "
            f"{num(t['hvp_marginal_lin_over_grad']['value'])}** (exact HVP / gradient time by hidden size: {ratios}). "
            "Forward-over-reverse runs the primal forward and backward (3 forward-matmul units, the gradient) plus "
            "their tangents: 2 matmuls per projection in the tangent forward and 4 in the tangent backward (6 units), "
            "so about 3x the gradient's matmul flops.")
    if "hvp" in fl:
        text += (f" Counted in the two programs (largest size): the HVP does {fl['hvp']:.2f}x the gradient's flops "
                 f"in {tm['hvp']:.2f}x its time (flop ratio / time ratio {a['hvp_flop_efficiency']:.2f}, "
                 f"its inverse `hvp_time_over_flops` {a['hvp_time_ratio_over_flop_ratio']:.2f}).")
    if "hvp_revrev" in tm:
        text += (f" Reverse-over-reverse: {tm['hvp_revrev']:.2f}x"
                 + (f" ({fl['hvp_revrev']:.2f}x flops)" if "hvp_revrev" in fl else "") + ", no cheaper.")
    if "hvp_linearized_marginal" in tm:
        text += (f" One `curvature.linearize` of the gradient map reused for 4 chained products (a Lanczos loop): "
                 f"{tm['hvp_lin4_per_product']:.2f}x "
                 f"the gradient per product, each product after the first {tm['hvp_linearized_marginal']:.2f}x"
                 + (f" ({fl['hvp_linearized_marginal']:.2f}x flops: the tangent passes only)"
                    if "hvp_linearized_marginal" in fl else "")
                 + "; that is the cost of a CG iteration or a Hutchinson probe here.")
    th, tg = _t(r, "peer", "calls", "hvp", "torch", "median_s"), _t(r, "peer", "calls", "grad", "torch", "median_s")
    if th and tg:
        text += f" PyTorch's double-backward HVP is {th / tg:.2f}x its gradient at the steps' config."
    return text + _profile_ratio_note(r)


GRAD_WORK = (" Already done: 2-D [tokens, features] projections (`transformer.dense`), the label shift on the "
             "labels and a one-hot pick in the loss (no [B, T, V] slice or scatter), softmax by its closed-form "
             "derivative, the layers unrolled up to 8 layers (`layer_loop: auto`, the Remat section's "
             "`layer_loop=scan` row), the head and the loss at the label positions only (the step batches' "
             "scored view, `data.with_scored_positions`; the bench's rows label their second half, so the head "
             "runs on 64 of 128 positions: a standalone gradient measured 0.89x in turns, not in this JSON), XLA:CPU's "
             "temp buffer kept mapped between executions (`simu_jax.host_memory`, `SIMU_JAX_HOST_ALLOCATOR=keep`: "
             "the bench's default and its main PyTorch peer's, opt-in for `simu-jax` since it slows compile-heavy "
             "short runs; glibc otherwise maps the bench gradient's 136 MB temp block fresh every call and faults "
             "in its 35k pages; 0.74x the gradient's time in turns in one process, not in this JSON). "
             "Tried and not kept (prototypes, not in this JSON): q/k/v and gate/up as one matmul each (1.00-1.06x), "
             "XLA's Eigen dots instead of YNNPACK (0.93x on an Intel Xeon, 1.07x on an AMD EPYC). Next: the XLA:CPU "
             "threads' idle time (see the profile run) and the same step on the GPU check (`tools/gpu_check.sh`).")


def _peer_note(r: dict, t: dict) -> str:
    p, steps = r["peer"], r["steps"]["methods"]
    ph, c = p.get("so_step_phases", {}), p["calls"]

    def pair(name):
        best = min(x for x in (_t(c, name, "torch", "median_s"), _t(c, name, "torch_default_env", "median_s")) if x)
        return _t(c, name, "jax", "median_s"), best

    (js, ts), (jg, tg) = pair("so_step"), pair("grad")
    text = (f"- **`jax_over_torch_so_step` = {num(t['jax_over_torch_so_step']['value'])}, `jax_over_torch_grad` = "
            f"{num(t['jax_over_torch_grad']['value'])}**. In turns with PyTorch at its faster thread setting: SO step "
            f"JAX {ms(js)} ms vs {ms(ts)} ms; gradient alone {ms(jg)} vs {ms(tg)} ms")
    if _t(c, "forward", "jax"):
        jf, tf = c["forward"]["jax"]["median_s"], c["forward"]["torch"]["median_s"]
        text += (f"; forward alone {ms(jf)} vs {ms(tf)} ms (PASSIVE). Gradient minus forward: JAX {ms(jg - jf)} ms, "
                 f"PyTorch {ms(tg - tf)} ms")
    so = steps["so_graddiff"]
    text += (f". The optimizer is not it: PyTorch's SophiaG phase takes {ms(ph.get('optimizer_s'))} ms of its step, "
             f"and JAX's Sophia update + g*g is the step minus the gradient in the steps section "
             f"({ms(so.get('rest_of_step_s'))} ms).")
    return text + _profile_grad_note(r) + " The work done so far is listed under the JAX / PyTorch table."


def notes(r: dict) -> list[str]:
    """What limits each missed target, from this run's own breakdowns."""
    out = []
    t = targets(r)
    missed = {k for k, v in t.items() if v["met"] is False}
    steps = r["steps"]["methods"]
    if missed & {"jax_over_torch_so_step", "jax_over_torch_grad"}:
        out.append(_peer_note(r, t))
    if "simu_over_so_step" in missed:
        s, m = steps["so_graddiff"], steps["simu_graddiff"]
        out.append(
            f"- **`simu_over_so_step` = {num(t['simu_over_so_step']['value'])}** against "
            f"{num(t['simu_over_so_step']['bound'])}. Loss + gradient: SIMU {ms(m.get('grad_s'))} ms vs SO "
            f"{ms(s.get('grad_s'))} ms; the rest of the step (Sophia update, curvature, masking): SIMU "
            f"{ms(m.get('rest_of_step_s'))} ms vs SO {ms(s.get('rest_of_step_s'))} ms. The masked step still runs "
            "the full forward and the full activation backward through every layer (attention is trained in all "
            "layers, so the backward reaches layer 0); it only skips the weight gradients of gate/up/down, the "
            "embeddings and lm_head." + _simu_flops_note(r)
            + _simu_profile_note(r, t["simu_over_so_step"]["value"]))
    if "sophia_h_over_so_step" in missed:
        h, s = steps["so_graddiff_hutchinson"], steps["so_graddiff"]
        out.append(f"- **`sophia_h_over_so_step` = {num(t['sophia_h_over_so_step']['value'])}**: Sophia-H "
                   f"{ms(h['median_s'])} ms vs SO {ms(s['median_s'])} ms per step; the step is one `jax.jvp` of "
                   "the gradient map in the Hutchinson probe's direction, which gives the gradient and the probe's "
                   "HVP together (`curvature.grad_and_hutchinson`): the primal forward and backward plus their tangents, "
                   "about 3x the gradient's matmul flops, so it costs what one exact HVP costs (the second-order "
                   "section's HVP / gradient below) plus the optimizer's update."
                   + _profile_mix(r, "step/so_graddiff_hutchinson"))
    if missed & {"hvp_flop_efficiency", "hvp_marginal_lin_over_grad"}:
        out.append(_hvp_note(r, t))
    if "attribution_over_grad" in missed:
        a = r["attribution"]
        layers, m = a["layers"], a["ig_steps"]
        out.append(f"- **`attribution_over_grad` = {num(t['attribution_over_grad']['value'])}** ({layers} layers, "
                   f"m = {m}): one forward + activation backward at alpha = 1, then per layer l a suffix run "
                   f"of layers l..L-1 on the m - 1 = {m - 1} other alphas' rows (columns from the first answer "
                   "on), about (m - 1)(L + 1)/2 network passes of the batch's rows; the IG definition needs "
                   "them all."
                   + _profile_mix(r, "attribution/ig"))
    if "compile_16_over_4" in missed:
        c = r["compile"]["layers"]
        out.append(f"- **`compile_16_over_4` = {num(t['compile_16_over_4']['value'])}**: XLA compile "
                   f"{c['4']['xla_compile_s']:.2f} s -> {c['16']['xla_compile_s']:.2f} s, trace "
                   f"{c['4']['trace_s']:.2f} s -> {c['16']['trace_s']:.2f} s.")
    if "simu_state_bytes_over_so" in missed:
        s, m = steps["so_graddiff"], steps["simu_graddiff"]
        mp, sp = m.get("state_param_bytes", m["state_bytes"]), s.get("state_param_bytes", s["state_bytes"])
        out.append(
            f"- **`simu_state_bytes_over_so` = {t['simu_state_bytes_over_so']['value']:.8f}** against a "
            f"trainable fraction of {t['simu_state_bytes_over_so']['bound']:.8f}: SIMU keeps "
            f"{mp / m['num_trainable']:.5f} per-parameter state bytes per trainable parameter, SO "
            f"{sp / s['num_trainable']:.5f}. With a mask whose per-layer neuron counts differ, the compact "
            "[L, K, H] rows add padding up to the largest layer's K.")
    scale_missed = sorted(k for k in missed if k.startswith("scale_"))
    if scale_missed:
        sc = r["scale"]
        out.append("- **" + ", ".join(f"`{k}` = {num(t[k]['value'], 4)}" for k in scale_missed) + "**: the scale "
                   f"section's checkpoint has {sc['checkpoint']['parameters'] / 1e6:.1f} M parameters"
                   + (" (the --quick profile's tiny model: its RSS ratios are allocator noise over a model of "
                      f"{sc['load']['model_bytes'] / 1e6:.1f} MB)" if r["profile"]["name"] == "quick" else "") + ".")
    if "bench_wall_s" in missed:
        w = t["bench_wall_s"]
        out.append(f"- **`bench_wall_s` = {w['value']:.0f} s** against {w['bound']:.0f} s; by phase: " + ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in r.get("phases", {}).items()) + ".")
    if not missed:
        out.append("- Every target with a figure in this run was met.")
    return out


def extra_notes(r: dict) -> list[str]:
    out = []
    if "simu_state_bytes_over_so_raw" in r:
        st = r["steps"]["methods"]
        out.append(f"- State bytes: `simu_state_bytes_over_so` compares the per-parameter state (float32 momentum + "
                   f"curvature per trainable coordinate); the scalar leaves (Sophia's step counter: "
                   f"{st['so_graddiff'].get('state_scalar_bytes')} bytes in each method) are left out. With them, "
                   f"the raw ratio is {r['simu_state_bytes_over_so_raw']:.8f} "
                   f"(`simu_state_bytes_over_so_raw`).")
    par = r.get("parity")
    if par:
        out.append(f"- Same weights and batch on both sides: first GradDiff loss JAX {par['jax_so_first_loss']:.7f}, "
                   f"PyTorch {par['torch_so_first_loss']:.7f} (|diff| {par['abs_diff']:.1e}).")
    n = r["steps"]["methods"].get("simu_newton")
    if n and "cg_iterations" in n:
        out.append(f"- `simu_newton`: {n['cg_iterations']} Lanczos products (`cg_iters` "
                   f"{r['steps']['config']['settings']['cg_iters']}; the Lanczos trust-region solver always takes "
                   f"them all), {ms(n['per_cg_iter_s'])} ms per product = step / products"
                   + (f" = {n['per_cg_iter_over_grad']:.2f}x the SIMU-subset gradient" if "per_cg_iter_over_grad" in n
                      else "")
                   + (f"; one full HVP on the SIMU subset alone: {ms(n['hvp_simu_s'])} ms (a product reuses "
                      "one linearization, so it costs less)" if "hvp_simu_s" in n else "")
                   + ".")
    so2 = r["second_order"]["sizes"]
    if "grad_simu" in so2[0]["times"]:
        out.append("- Masked savings in the products themselves (SIMU subset / all parameters): gradient "
                   + ", ".join(f"{s['hidden']}: {s['times']['grad_simu']['median_s'] / s['times']['grad']['median_s']:.2f}x"
                               for s in so2)
                   + ("; HVP " + ", ".join(
                       f"{s['hidden']}: {s['times']['hvp_simu']['median_s'] / s['times']['hvp']['median_s']:.2f}x"
                       for s in so2) if "hvp_simu" in so2[0]["times"] else "") + ".")
    return out


def render(r: dict, png_name: str) -> str:
    p, cfg = r["profile"], r["steps"]["config"]
    lines = [
        "# Benchmarks",
        "",
        f"Regenerated by `python tools/make_benchmarks_md.py` from `docs/benchmarks.json`, which "
        f"`simu-jax bench{' --quick' if p['name'] == 'quick' else ''} --json docs/benchmarks.json` wrote "
        f"({p['name']} profile, {r.get('timestamp_utc', '?')}, {r['wall_s'] / 60:.1f} min wall). Do not edit by hand.",
        "",
        machine_line(r),
        "",
        f"**How.** Every time is the median of {p['repeats']} timed runs after {p['warmup']} warm-up run(s), "
        "each blocked on its outputs; first (compiling) calls are kept apart. Same config, batch and thread "
        f"count on both sides: LLaMA-style models, {p['layers']} layers, head dim {p['head_dim']}, vocab "
        f"{p['vocab']}, {p['batch']} forget + {p['batch']} retain sequences of {p['seq']} tokens (loss on the "
        f"second half), float32; SIMU trains attention + {p['neuron_fraction']:.0%} of the down_proj rows "
        "(a random mask with equal per-layer counts). The PyTorch peer is transformers `LlamaForCausalLM` "
        "(eager attention) with the same weights, in its own process (`simu_jax/bench/torch_peer.py`). The programs of "
        "one table run in turns (A B C, C B A, ...), so ratios within a table compare runs under the same load; "
        "the sections ran minutes apart, so on a shared machine compare across tables with care (load average "
        "per section: " + ", ".join(f"{k} {v['loadavg_before'][0]:.1f}→{v['loadavg_after'][0]:.1f}"
                                    for k, v in r.get("phases", {}).items() if k not in ("setup",)) + ").",
        "",
        "## Targets (issues 15 and 18)",
        "",
        *targets_table(r),
        "",
        "## Second-order cost (GradDiff loss, all parameters; time and ratio to the gradient)",
        "",
        *second_order_table(r),
        "",
        *(["### Exact HVP: formulations and flop counts (ratios to the gradient; flop ratio in parentheses: the "
           "matmul flops of every layer, `matmul_gflop`; results older than issue 15: XLA's cost analysis, which "
           "counts the layer scan once)", "", *hvp_table(r), ""] if hvp_table(r) else []),
        f"## Unlearning steps ({cfg['hidden']} hidden, {cfg['intermediate']} intermediate, {cfg['layers']} layers, "
        f"{cfg['num_params'] / 1e6:.2f} M params)",
        "",
        "Loss + gradient: the gradient program of the same config on the method's trainable set (all "
        "parameters, or the SIMU subset), timed in the same turns as the steps; the rest is the optimizer, "
        "the curvature estimate and the masking (and, for Newton, the CG solve). The two are separate "
        "programs timed in turns, so a small negative rest is noise.",
        "",
        *steps_table(r),
        "",
        "## JAX against the PyTorch peer (same config as the steps)",
        "",
        *peer_table(r),
        "",
        "What the JAX gradient's speed comes from (issue 15):" + GRAD_WORK,
        "",
        "## IG attribution against the gradient",
        "",
        *attribution_table(r),
        "",
        "## Scale: a sharded checkpoint and true FSDP on 8 simulated devices (issue 18)",
        "",
        *scale_section(r),
        "",
        "## Remat policy and layer loop (steps' config)",
        "",
        *remat_table(r),
        "",
        "## Compile time of the SIMU step "
        f"({r['compile']['hidden']} hidden, {r['compile']['intermediate']} intermediate)",
        "",
        f"Measured: {r['compile']['measure']}.",
        "",
        *compile_table(r),
        "",
        "## Profile",
        "",
        *profile_section(r),
        "",
        "## What limits each missed target",
        "",
        *notes(r),
        "",
        "## Other observations",
        "",
        *extra_notes(r),
        "",
        f"![benchmarks]({png_name})",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    m = r["machine"]
    fig.suptitle(f"simu-jax bench ({r['profile']['name']}) — {m['cpu_model']}, {m['cores_available']} cores, "
                 f"JAX {m['jax']} / torch {m['torch']}, {m['jax_threads']} threads", fontsize=11)

    ax = axes[0, 0]
    sizes = r["second_order"]["sizes"]
    ops = [o for o in ("forward", "hvp", "ggn_vp", "hutchinson", "grad_simu", "hvp_simu") if o in sizes[0]["times"]]
    x = np.arange(len(sizes))
    w = 0.8 / max(len(ops), 1)
    for i, o in enumerate(ops):
        ax.bar(x + i * w, [s["times"][o]["median_s"] / s["times"]["grad"]["median_s"] for s in sizes], w, label=o)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(x + w * (len(ops) - 1) / 2, [f"h={s['hidden']}" for s in sizes])
    ax.set_ylabel("time / gradient time")
    ax.set_title("second-order cost, ratio to the gradient")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    st = r["steps"]["methods"]
    calls = r["peer"]["calls"]
    names = list(calls)
    y = np.arange(len(names))
    ax.barh(y - 0.27, [calls[n]["jax"]["median_s"] * 1e3 for n in names], 0.27, label="JAX", color="tab:blue")
    ax.barh(y, [calls[n]["torch"]["median_s"] * 1e3 for n in names], 0.27, label="PyTorch, OMP_WAIT_POLICY=PASSIVE",
            color="tab:orange")
    ax.barh(y + 0.27, [(_t(calls[n], "torch_default_env", "median_s") or 0) * 1e3 for n in names], 0.27,
            label="PyTorch, default OpenMP env", color="tab:red")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("ms per call (median, JAX and PyTorch in turns)")
    ax.set_title("JAX vs the PyTorch peer, same config / batch / threads")
    ax.legend(fontsize=8)

    ax = axes[1, 0]
    comp = r["compile"]["layers"]
    ls = list(comp)
    bottom = np.zeros(len(ls))
    for part in ("trace_s", "lower_s", "xla_compile_s"):
        v = np.array([comp[n][part] for n in ls])
        ax.bar(ls, v, bottom=bottom, label=part.replace("_s", ""))
        bottom += v
    ax.set_xlabel("layers")
    ax.set_ylabel("seconds")
    ax.set_title("compile time of the SIMU step")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    ax.bar(list(st), [st[k]["state_bytes"] / 2**20 for k in st], color="tab:green")
    ax.set_ylabel("MiB")
    ax.set_title("optimizer + curvature state")
    ax.tick_params(axis="x", rotation=20, labelsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "benchmarks.png")
    args = ap.parse_args(argv)
    r = json.loads(args.json.read_text())
    args.md.parent.mkdir(parents=True, exist_ok=True)
    plot(r, args.png)
    args.md.write_text(render(r, args.png.name))
    print(f"wrote {args.md} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
