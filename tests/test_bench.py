"""`simu-jax bench --quick`: the JSON is complete and sane. Never checks speed.

The quick benchmark runs once, in a subprocess (a fresh JAX, so its thread pool and XLA flags
are its own), and the tests below read its JSON: every headline key present and a positive
finite number, every ratio equal to the raw medians it is made of, the machine block filled in,
the torch peer at the same thread count and on the same weights (same first loss), the
headline JAX / PyTorch ratios against the faster of the peer's two thread settings, and the
markdown / plot generator working on it (and on the committed docs/benchmarks.json of an older
bench). The package carries its PyTorch peer, never imports
torch itself, and says in one line when torch is missing.
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from simu_jax.bench import COMPARE, SUMMARY_KEYS, TARGETS

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = ("jax_over_torch_so_step", "jax_over_torch_grad", "simu_over_so_step", "simu_over_so_grad_flops",
            "sophia_h_over_so_step", "hvp_over_grad", "hvp_time_over_flops", "hvp_flop_efficiency",
            "hvp_marginal_lin_over_grad",
            "attribution_over_grad", "compile_16_over_4", "simu_state_bytes_over_so", "trainable_fraction_simu",
            "bench_wall_s")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "simu_jax.bench", "--quick", "--quiet", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    headline = json.loads(proc.stdout)  # stdout is the headline as JSON
    data = json.loads(out.read_text())
    assert headline["headline"] == {k: data[k] for k in SUMMARY_KEYS}
    return data


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _timings(tree, path=""):
    """Every timing dict (one with median_s and runs_s) in the result."""
    if isinstance(tree, dict):
        if "median_s" in tree and "runs_s" in tree:
            yield path, tree
        for k, v in tree.items():
            yield from _timings(v, f"{path}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _timings(v, f"{path}/{i}")


def test_headline_keys_complete(result):
    for key in REQUIRED + SUMMARY_KEYS:
        assert key in result, key
        assert _positive_finite(result[key]), (key, result[key])
    assert 0 < result["trainable_fraction_simu"] < 1
    assert 0 < result["simu_state_bytes_over_so"] < 1
    assert 0 < result["simu_over_so_grad_flops"] < 1
    assert result["bench_wall_s"] <= result["wall_s"]


def test_machine_block(result):
    m = result["machine"]
    for key in ("cpu_model", "cores_available", "jax", "jaxlib", "torch", "transformers", "backend",
                "jax_threads", "torch_threads", "torch_interop_threads"):
        assert m.get(key) not in (None, ""), key
    assert m["backend"] == "cpu" or m["backend"] in ("gpu", "tpu")
    assert m["torch_threads"] == m["jax_threads"]  # the peer runs at XLA's thread count
    assert result["peer"]["machine"]["torch_threads"] == m["jax_threads"]


def test_peer_pairs_run_the_same_jax_programs(result):
    calls = result["peer"]["calls"]
    assert {"so_step", "sophia_h_step", "hvp"} <= set(calls)
    steps = result["steps"]["methods"]
    assert calls["so_step"]["jax_program"] == "steps/so_graddiff"
    assert calls["sophia_h_step"]["jax_program"] == "steps/so_graddiff_hutchinson"
    for name, c in calls.items():
        assert c["jax"]["median_s"] > 0 and c["torch"]["median_s"] > 0, name
    assert set(result["peer"]["so_step_phases"]) == {"forward_s", "backward_s", "optimizer_s"}
    assert steps["so_graddiff"]["num_trainable"] == result["peer"]["num_params"]  # SOUL trains every parameter


def test_peer_both_thread_settings_in_the_same_turns(result):
    """The SO step and the gradient also ran on the peer in torch's default OpenMP environment; the
    headline ratio is against the faster setting, and the run says which one that was."""
    peer = result["peer"]
    assert peer["machine"]["omp_wait_policy"] == "PASSIVE"
    assert peer["default_env_machine"]["omp_wait_policy"] == "default"
    assert peer["default_env_machine"]["torch_threads"] == result["machine"]["jax_threads"]
    # the main peer runs with the JAX side's host allocator settings (simu_jax.host_memory), the
    # default-env one with glibc's defaults
    from simu_jax.host_memory import glibc_tunables

    assert result["machine"]["host_allocator"] == peer["machine"]["host_allocator"] == "keep"
    assert peer["machine"]["glibc_tunables"] == glibc_tunables()
    assert peer["default_env_machine"]["host_allocator"] == "system"
    assert peer["default_env_machine"]["glibc_tunables"] == ""
    for name, key in (("so_step", "jax_over_torch_so_step"), ("grad", "jax_over_torch_grad")):
        c = peer["calls"][name]
        passive, default = c["torch"]["median_s"], c["torch_default_env"]["median_s"]
        assert c["torch_fastest_env"] == ("PASSIVE" if passive <= default else "default"), name
        assert result[key] == pytest.approx(c["jax"]["median_s"] / min(passive, default), rel=1e-12), name
    assert "torch_default_env" not in peer["calls"]["hvp"]  # the other calls: the headline setting only


def test_summary_ratios_hand_computed():
    """`summarize` on round numbers whose ratios are known by hand (not the same formulas again)."""
    from simu_jax.bench import hvp_analysis, summarize

    t = lambda s: {"median_s": s}  # noqa: E731
    flops = lambda g: {"matmul_gflop": g, "gflop": g / 4}  # noqa: E731 - XLA's count is not the one used
    big = {"times": {"grad": t(2.0), "hvp": t(5.0), "hvp_lin1": t(5.5), "hvp_lin4": t(11.0)},
           "cost_analysis": {"grad": flops(4.0), "hvp": flops(12.0), "hvp_lin1": flops(12.0),
                             "hvp_lin4": flops(36.0)}}
    big["hvp_analysis"] = hvp_analysis(big)
    result = {
        "profile": {"step_size": 0, "wall_budget_s": 100.0},
        "wall_s": 90.0,
        "second_order": {"sizes": [{"times": {"grad": t(9.0), "hvp": t(1.0)},  # the step size
                                    "cost_analysis": {"grad": flops(10.0), "grad_simu": flops(7.0)}},
                                   big]},  # the largest size is last
        "steps": {"methods": {
            "so_graddiff": {"median_s": 4.0, "state_param_bytes": 800, "state_bytes": 804, "num_trainable": 100},
            "so_graddiff_hutchinson": {"median_s": 14.0},
            "simu_graddiff": {"median_s": 3.0, "state_param_bytes": 200, "state_bytes": 204, "num_trainable": 25},
            "simu_newton": {"per_cg_iter_s": 0.5}}},
        # so_step: the default environment is faster (2.0 < 4.0); grad: PASSIVE is (1.0 < 8.0)
        "peer": {"calls": {"so_step": {"jax": t(3.0), "torch": t(4.0), "torch_default_env": t(2.0)},
                           "grad": {"jax": t(1.5), "torch": t(1.0), "torch_default_env": t(8.0)},
                           "sophia_h_step": {"jax": t(6.0), "torch": t(3.0)},
                           "hvp": {"jax": t(1.0), "torch": t(2.0)}}},
        "attribution": {"times": {"ig": t(12.0), "grad": t(0.5)}},
        "compile": {"layers": {"4": t(2.0), "8": t(2.5), "16": t(3.0)}},
        "scale": {"checkpoint": {"parameters": 350_000_000}, "wall_s": 60.0,
                  "load": {"peak_rss_over_model": 1.1, "max_device_share_over_model_per_device": 1.001},
                  "save": {"peak_rss_over_written": 0.3, "max_device_share_over_params_per_device": 1.06},
                  "step_memory": {"fsdp8_over_one_device": 0.2}},
    }
    summary, targets = summarize(result)
    assert tuple(summary) == SUMMARY_KEYS
    expected = {"jax_over_torch_so_step": 1.5, "jax_over_torch_grad": 1.5, "torch_over_jax_so_step": 2 / 3,
                "jax_over_torch_hvp": 2.0, "torch_over_jax_hvp": 0.5, "jax_over_torch_hvp_raw": 0.5,
                "simu_over_so_step": 0.75, "simu_over_so_grad_flops": 0.7, "sophia_h_over_so_step": 3.5,
                "hvp_over_grad": 2.5, "hvp_flops_over_grad": 3.0, "hvp_time_over_flops": 2.5 / 3.0,
                "hvp_flop_efficiency": 3.0 / 2.5,
                "hvp_marginal_lin_over_grad": (11.0 - 5.5) / 3 / 2.0, "attribution_over_grad": 24.0,
                "compile_s_4_layers": 2.0, "compile_s_8_layers": 2.5, "compile_s_16_layers": 3.0,
                "compile_16_over_4": 1.5, "simu_state_bytes_over_so": 0.25,
                "simu_state_bytes_over_so_raw": 204 / 804, "trainable_fraction_simu": 0.25,
                "newton_per_cg_iter_s": 0.5, "scale_parameters": 350_000_000, "scale_load_rss_over_model": 1.1,
                "scale_load_device_over_model_per_device": 1.001, "scale_save_rss_over_written": 0.3,
                "scale_save_device_over_params_per_device": 1.06, "scale_step_temp_fsdp8_over_one_device": 0.2,
                "scale_wall_s": 60.0, "bench_wall_s": 90.0, "bench_wall_budget_s": 100.0}
    for key, value in expected.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key
    met = {k: v["met"] for k, v in targets.items()}
    assert met == {"jax_over_torch_so_step": False, "jax_over_torch_grad": False,
                   "simu_over_so_step": False,  # 0.75 > 0.7 + 0.03
                   "sophia_h_over_so_step": False, "hvp_flop_efficiency": True,  # 1.2 >= 0.95 (a ">=" target)
                   "hvp_marginal_lin_over_grad": True, "attribution_over_grad": False,
                   "compile_16_over_4": True, "simu_state_bytes_over_so": True,
                   "scale_parameters": True, "scale_load_rss_over_model": True,  # 1.1 <= 1.2
                   "scale_load_device_over_model_per_device": True, "scale_save_rss_over_written": True,
                   "scale_save_device_over_params_per_device": False,  # 1.06 > 1.05
                   "scale_step_temp_fsdp8_over_one_device": False,  # 0.2 > 1.5 / 8
                   "bench_wall_s": True}
    assert targets["simu_over_so_step"]["bound"] == pytest.approx(0.73, rel=1e-12)
    assert targets["simu_over_so_step"]["bound_from"] == "simu_over_so_grad_flops"


def test_check_targets_signs_and_missing_figures():
    """`<=` and `>=` targets on both sides of their bounds; a figure an older result lacks has no verdict."""
    from simu_jax.bench import check_targets

    ops = {key: op for key, op, *_ in TARGETS}
    assert set(ops.values()) == {"<=", ">="} and ops["hvp_flop_efficiency"] == ">="
    assert "hvp_time_over_flops" not in ops  # reported, untargeted: a ">=" bound on it would reward a slower HVP
    at = check_targets({"hvp_flop_efficiency": 0.95, "hvp_marginal_lin_over_grad": 2.0, "compile_16_over_4": 1.6,
                        "simu_over_so_step": 0.8, "simu_over_so_grad_flops": 0.78})
    assert at["hvp_flop_efficiency"]["met"] and at["hvp_marginal_lin_over_grad"]["met"]  # equal: met both ways
    assert not at["compile_16_over_4"]["met"] and at["simu_over_so_step"]["met"]  # 0.8 <= 0.78 + 0.03
    assert not check_targets({"hvp_flop_efficiency": 0.9})["hvp_flop_efficiency"]["met"]
    missing = check_targets({"simu_over_so_step": 0.5})
    assert missing["attribution_over_grad"] == {**missing["attribution_over_grad"], "value": None, "met": None}
    assert missing["simu_over_so_step"]["bound"] is None and missing["simu_over_so_step"]["met"] is None


def test_matmul_flops_counts_every_scan_iteration():
    """2 * M * K * N per matmul, a scan's body times its length, batch dimensions included."""
    import jax
    import jax.numpy as jnp

    from simu_jax.bench import matmul_flops

    x, ws = jnp.ones((8, 16)), jnp.ones((5, 16, 16))
    scan = jax.make_jaxpr(lambda x, ws: jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0])(x, ws)
    assert matmul_flops(scan) == 5 * 2 * 8 * 16 * 16
    batched = jax.make_jaxpr(lambda a, b: jnp.einsum("bik,bkj->bij", a, b))(jnp.ones((3, 4, 6)), jnp.ones((3, 6, 7)))
    assert matmul_flops(batched) == 2 * 3 * 4 * 6 * 7
    grad = jax.make_jaxpr(jax.grad(lambda w: jnp.sum(x @ w)))(ws[0])  # the backward's matmul only (x^T dy)
    assert matmul_flops(grad) == 2 * 8 * 16 * 16 * 2  # the primal forward's and the weight gradient's


def test_flop_ratios_are_the_timed_programs(result):
    """The flop ratios of the headline come from the cost of the very programs the second-order
    section timed (their jaxprs, every layer counted)."""
    p = result["profile"]
    at_step, big = result["second_order"]["sizes"][p["step_size"]], result["second_order"]["sizes"][-1]
    ca = at_step["cost_analysis"]
    assert result["simu_over_so_grad_flops"] == pytest.approx(ca["grad_simu"]["matmul_gflop"]
                                                              / ca["grad"]["matmul_gflop"], rel=1e-12)
    cb = big["cost_analysis"]
    assert result["hvp_flops_over_grad"] == pytest.approx(cb["hvp"]["matmul_gflop"] / cb["grad"]["matmul_gflop"])
    tb = {k: v["median_s"] for k, v in big["times"].items()}
    assert result["hvp_time_over_flops"] == pytest.approx(tb["hvp"] / tb["grad"] / result["hvp_flops_over_grad"])
    assert result["hvp_flop_efficiency"] == pytest.approx(result["hvp_flops_over_grad"] / (tb["hvp"] / tb["grad"]))
    assert result["hvp_marginal_lin_over_grad"] == pytest.approx((tb["hvp_lin4"] - tb["hvp_lin1"]) / 3 / tb["grad"])
    # forward-over-reverse: tangent forward and backward on top of the gradient: 3x its matmul flops
    assert 2.8 < result["hvp_flops_over_grad"] < 3.2


def test_attribution_section(result):
    att, p = result["attribution"], result["profile"]
    assert att["layers"] == p["attribution_layers"] == 8 and att["ig_steps"] == 3 and att["rows"] == p["batch"]
    assert set(att["times"]) == {"ig", "grad"}
    assert result["attribution_over_grad"] == pytest.approx(att["times"]["ig"]["median_s"]
                                                            / att["times"]["grad"]["median_s"], rel=1e-12)
    for name, t in att["times"].items():
        assert t["first_call_s"] > t["median_s"] and t["compile"]["xla_compile_s"] > 0, name  # compiles kept apart


def test_result_summary_is_summarize_of_its_sections(result):
    from simu_jax.bench import summarize

    summary, _ = summarize(result)
    for key in SUMMARY_KEYS:
        assert result[key] == pytest.approx(summary[key], rel=1e-9), key
    newton = result["steps"]["methods"]["simu_newton"]
    assert newton["per_cg_iter_s"] == pytest.approx(newton["median_s"] / max(newton["cg_iterations"], 1))
    for size in result["second_order"]["sizes"]:
        g = size["times"]["grad"]["median_s"]
        for op, r in size["ratios_to_grad"].items():
            assert r == pytest.approx(size["times"][op]["median_s"] / g, rel=1e-9)


def test_scale_section(result):
    """The scale section (8 simulated devices, fsdp=8) of --quick's tiny checkpoint: every key, the
    per-device shares against a hand count of the model (kernels and embeddings split 8 ways on
    their hidden axis, norms whole on every device), the save's largest device = its share + 1/8
    of the largest tensor gathered in bf16 (the gathered tensor stays sharded), and true FSDP's
    step memory under 1.5/8 of one device's."""
    sc = result["scale"]
    sp = sc["spec"]
    assert sc["devices"] == 8 and sc["mesh"] == "fsdp=8"
    h, i, n, v, d = sp["hidden"], sp["mlp"], sp["layers"], sp["vocab"], sp["hidden"] // sp["heads"]
    norms = 2 * n * h + h
    kernels = 2 * v * h + n * (2 * h * sp["heads"] * d + 2 * h * sp["kv_heads"] * d + 3 * h * i)
    assert sc["checkpoint"]["parameters"] == kernels + norms
    assert sc["checkpoint"]["files"] == sp["files"] == 4
    assert 2 * (kernels + norms) < sc["checkpoint"]["file_bytes"] < 2 * (kernels + norms) + 4 * 2**14  # + headers
    ld, sv, st = sc["load"], sc["save"], sc["step_memory"]
    assert ld["dtype"] == "float32" and ld["model_bytes"] == 4 * (kernels + norms)
    assert ld["device_bytes"] == [4 * (kernels // 8 + norms)] * 8
    assert ld["max_device_share_over_model_per_device"] == pytest.approx(max(ld["device_bytes"]) / (ld["model_bytes"] / 8))
    assert ld["peak_rss_over_model"] == pytest.approx(ld["peak_rss_bytes"] / ld["model_bytes"]) and ld["peak_rss_bytes"] > 0
    assert sv["dtype"] == "bfloat16" and sv["params_bytes"] == ld["model_bytes"]
    assert sv["written_bytes"] == 2 * (kernels + norms)
    assert sv["samples"] == 2 + 9 * n + 1  # one gather per HF tensor: embed, lm_head, 9 per layer, final norm
    assert v * h > max(h * i, h * sp["heads"] * d)  # the largest tensor: the embedding / lm_head
    assert sv["device_bytes"] == [ld["device_bytes"][0] + 2 * v * h // 8] * 8  # it, in bf16, 1/8 on each device
    assert sv["max_device_share_over_params_per_device"] == pytest.approx(max(sv["device_bytes"]) / (sv["params_bytes"] / 8))
    assert sv["peak_rss_over_written"] == pytest.approx(sv["peak_rss_bytes"] / sv["written_bytes"])
    assert st["method"] == "simu_graddiff" and st["batch_per_part"] == sp["step_batch"] == 8
    assert st["config"]["hidden"] == result["steps"]["config"]["hidden"]
    assert st["fsdp8_over_one_device"] == pytest.approx(st["fsdp8_temp_bytes"] / st["one_device_temp_bytes"])
    assert 0 < st["fsdp8_over_one_device"] <= 1.5 / 8
    for key, value in (("scale_parameters", sc["checkpoint"]["parameters"]),
                       ("scale_load_device_over_model_per_device", ld["max_device_share_over_model_per_device"]),
                       ("scale_save_device_over_params_per_device", sv["max_device_share_over_params_per_device"]),
                       ("scale_step_temp_fsdp8_over_one_device", st["fsdp8_over_one_device"])):
        assert result[key] == value, key
    assert 0 < sc["wall_s"] and "scale" in result["phases"]


def test_timings_are_medians_of_their_runs(result):
    p = result["profile"]
    found = list(_timings(result))
    # second-order ops, steps (+ gradient in turns), attribution, peer JAX / torch pairs (+ default env)
    assert len(found) >= 4 + 4 + 1 + 2 + 2 * 4 + 2
    for path, t in found:
        repeats = p["attribution_repeats"] if path.startswith("/attribution/") else p["repeats"]
        assert len(t["runs_s"]) == repeats, path
        assert all(_positive_finite(r) for r in t["runs_s"]), path
        assert t["median_s"] == pytest.approx(statistics.median(t["runs_s"])), path
        assert t["min_s"] <= t["median_s"] <= t["max_s"], path
    for n, row in result["compile"]["layers"].items():
        assert _positive_finite(row["median_s"]) and row["xla_compile_s"] > 0, n
        assert row["median_s"] == pytest.approx(statistics.median(r["total_s"] for r in row["runs"]))


def test_targets_block(result):
    assert list(result["targets"]) == [key for key, *_ in TARGETS]
    for key, op, bound, _ in TARGETS:
        t = result["targets"][key]
        assert t["value"] == result[key] and t["op"] == op
        assert t["bound"] == (result[bound[0]] + bound[1] if isinstance(bound, tuple) else bound)
        assert t["met"] == COMPARE[op](t["value"], t["bound"])
    assert "hvp_over_grad" not in result["targets"]  # a figure, no longer a target (UNTARGETED says why)


def test_state_bytes_and_trainable_counts(result):
    steps = result["steps"]["methods"]
    # trust-region Newton keeps only scalars (count, radius, damping): no per-parameter state
    assert steps["simu_newton"]["state_param_bytes"] == 0 and steps["simu_newton"]["state_scalar_leaves"] == 3
    assert 0 < steps["simu_graddiff"]["state_bytes"] < steps["so_graddiff"]["state_bytes"]
    assert steps["simu_graddiff"]["num_trainable"] < steps["so_graddiff"]["num_trainable"]
    assert steps["so_graddiff"]["num_trainable"] == result["steps"]["config"]["num_params"]
    # Sophia: momentum + curvature in float32 on every trainable coordinate (+ a step counter)
    for label in ("so_graddiff", "simu_graddiff"):
        row = steps[label]
        per = row["state_bytes"] / row["num_trainable"]
        assert 8.0 <= per < 8.01, (label, per)
        assert row["state_param_bytes"] == 8 * row["num_trainable"], label  # per-parameter state only
        assert row["state_param_bytes"] + row["state_scalar_bytes"] == row["state_bytes"], label
        assert 0 < row["state_scalar_bytes"] <= 16 and row["state_scalar_leaves"] >= 1, label
    # the headline compares per-parameter state with the trainable fraction (the raw ratio is kept too)
    assert result["simu_state_bytes_over_so"] == pytest.approx(result["trainable_fraction_simu"], rel=1e-12)
    assert result["simu_state_bytes_over_so_raw"] > result["simu_state_bytes_over_so"]


def test_same_weights_and_batch_as_the_peer(result):
    """The torch peer loaded the JAX weights: its first GradDiff loss is the JAX one."""
    parity = result["parity"]
    assert math.isfinite(parity["jax_so_first_loss"])
    assert parity["abs_diff"] < 1e-4
    for label, row in result["steps"]["methods"].items():
        assert math.isfinite(row["last_loss"]), label


def test_markdown_and_plot_from_json(result, tmp_path):
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", ROOT / "tools" / "make_benchmarks_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(result))
    md, png = tmp_path / "b.md", tmp_path / "b.png"
    assert mod.main(["--json", str(src), "--md", str(md), "--png", str(png)]) == 0
    text = md.read_text()
    assert result["machine"]["cpu_model"] in text
    for key, op, *_ in TARGETS:
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}`"))
        assert f"{op} " in row and ("| yes |" in row or "| **no** |" in row), row
    assert "`hvp_over_grad`" in text
    assert "OMP_WAIT_POLICY=PASSIVE" in text and "default OpenMP" in text  # the peer table's two settings
    assert "## Scale: a sharded checkpoint" in text and "| load (float32) |" in text and "| save (to bfloat16) |" in text
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_from_an_older_result(tmp_path):
    """A result from an older bench (the committed docs/benchmarks.json without the attribution
    and scale sections and their figures, as results before issues 15 and 18 are) still renders;
    the figure it lacks shows as a dash."""
    spec = importlib.util.spec_from_file_location("make_benchmarks_md", ROOT / "tools" / "make_benchmarks_md.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    older = json.loads((ROOT / "docs" / "benchmarks.json").read_text())
    for key in ["attribution", "attribution_over_grad", "targets", "scale"] + [k for k in older if k.startswith("scale_")]:
        older.pop(key, None)
    (tmp_path / "older.json").write_text(json.dumps(older))
    md, png = tmp_path / "b.md", tmp_path / "b.png"
    assert mod.main(["--json", str(tmp_path / "older.json"), "--md", str(md), "--png", str(png)]) == 0
    row = next(line for line in md.read_text().splitlines() if line.startswith("| `attribution_over_grad`"))
    assert "| – |" in row, row
    assert "Not measured in this run (a bench older than issue 18)." in md.read_text()  # no scale section


def test_bad_repeats_is_a_usage_error():
    from simu_jax.bench import cli_main

    with pytest.raises((SystemExit, ValueError)):
        cli_main(["--repeats", "0"])


def test_state_bytes_split_leaves_out_scalars():
    import jax.numpy as jnp

    from simu_jax.bench import state_bytes_split

    state = ({"mu": jnp.zeros((3, 4)), "nu": jnp.zeros((5,), jnp.float32)}, jnp.zeros((), jnp.int32), ())
    assert state_bytes_split(state) == {"state_param_bytes": (12 + 5) * 4, "state_scalar_bytes": 4,
                                        "state_scalar_leaves": 1}


def test_hvp_analysis_ratios():
    from simu_jax.bench import hvp_analysis

    t = lambda s: {"median_s": s}  # noqa: E731
    c = lambda g, xla: {"matmul_gflop": g, "gflop": xla}  # noqa: E731 - XLA's count (one layer) is not used
    row = {"times": {"forward": t(1.0), "grad": t(3.0), "hvp": t(8.0), "hvp_revrev": t(9.0), "hvp_lin1": t(8.5),
                     "hvp_lin4": t(26.0)},
           "cost_analysis": {"grad": c(3.0, 1.0), "hvp": c(9.0, 2.0), "hvp_lin1": c(9.0, 2.0),
                             "hvp_lin4": c(27.0, 4.0)}}
    a = hvp_analysis(row)
    assert a["time_over_grad"]["hvp"] == pytest.approx(8 / 3)
    assert a["time_over_grad"]["hvp_linearized_marginal"] == pytest.approx((26 - 8.5) / 3 / 3)
    assert a["flops_over_grad"]["hvp"] == pytest.approx(3.0)
    assert a["flops_over_grad"]["hvp_linearized_marginal"] == pytest.approx(2.0)
    assert a["hvp_time_ratio_over_flop_ratio"] == pytest.approx(8 / 9)  # the matmul flops, not XLA's count
    assert a["hvp_flop_efficiency"] == pytest.approx(9 / 8)  # flops / time: > 1, faster per flop than the gradient


def test_import_does_not_import_torch():
    code = ("import sys, simu_jax.bench, simu_jax.bench.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_peer_ships_inside_the_package():
    import simu_jax.bench
    from simu_jax.bench import find_peer_script

    path = find_peer_script()
    assert path.parent == Path(simu_jax.bench.__file__).resolve().parent
    assert path.name == "torch_peer.py" and "def serve(" in path.read_text()
    assert not (ROOT / "tools" / "torch_peer.py").exists()  # moved, not copied


def test_missing_torch_is_one_line():
    """Without torch, `simu-jax bench` stops before any work with one line; so does the peer script."""
    code = ("import sys; sys.modules['torch'] = None; from simu_jax.bench import cli_main; "
            "raise SystemExit(cli_main(['--quick', '--quiet']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr[-4000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs torch" in lines[0] and "Traceback" not in proc.stderr, proc.stderr

    from simu_jax.bench import find_peer_script

    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['torch_peer.py', '--serve']; "
            f"runpy.run_path({str(find_peer_script())!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-4000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "torch is not installed" in lines[0], proc.stderr


def test_simu_jax_cli_runs_bench():
    from simu_jax.base import EXIT_USAGE
    from simu_jax.cli import COMMANDS, main

    assert COMMANDS["bench"] == "simu_jax.bench:cli_main"
    assert main(["bench", "--repeats", "0"]) == EXIT_USAGE  # resolved, and its usage error is an exit code
