"""simu_jax.sharding: meshes, logical-axis rules, sharded SIMU steps, cross-mesh checkpoints,
multi-host helpers, batch placement (`place_batch`) and the memory model.

The multi-device part runs `tests/sharding_worker.py` once, in a subprocess with 8 host CPU
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=8`, `JAX_PLATFORMS=cpu`), so the
rest of the suite keeps its single device; the assertions on what it measured live here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from simu_jax import optim
from simu_jax import sharding as S
from simu_jax.models import ModelConfig, abstract_model, split_params

HERE = Path(__file__).resolve().parent
MESHES = ("fsdp=8", "data=2,fsdp=4", "fsdp=2,tensor=4")
TOL = 1e-5
# XLA CPU codegen flags that roughly halve compile time of the tiny model's step; they do not
# change what the SPMD partitioner does. Retried without them if this XLA does not know them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _start_worker(tmp: Path, extra_flags: str) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 {extra_flags}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(HERE / "sharding_worker.py"), str(tmp / "out.json"), str(tmp)]
    # output to files, not pipes: a chatty worker must never block on a full pipe
    with open(tmp / "worker.log", "w") as log:
        return subprocess.Popen(cmd, env=env, cwd=str(HERE.parent), stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module", autouse=True)
def _worker_process(tmp_path_factory):
    """Start the 8-device worker when this module starts, so the single-process tests below
    run while it compiles; `worker` waits for it."""
    tmp = tmp_path_factory.mktemp("sharding")
    proc = _start_worker(tmp, FAST_COMPILE)
    yield proc, tmp
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def worker(_worker_process):
    proc, tmp = _worker_process
    code = proc.wait(timeout=900)
    log = (tmp / "worker.log").read_text()
    if code != 0 and "nknown flag" in log:  # an XLA without the fast-compile flags
        code = _start_worker(tmp, "").wait(timeout=900)
        log = (tmp / "worker.log").read_text()
    assert code == 0, f"worker failed:\n{log[-8000:]}"
    return json.loads((tmp / "out.json").read_text())


# ----------------------------------------------------------------------------
# Single process (run first, while the worker compiles)
# ----------------------------------------------------------------------------


def test_parse_mesh_spec():
    assert S.parse_mesh_spec("data=2,fsdp=4,tensor=1", 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert S.parse_mesh_spec("fsdp=-1", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert S.parse_mesh_spec("tensor=2, data=-1", 8) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert S.parse_mesh_spec({"fsdp": 2, "tensor": 4}, 8) == {"data": 1, "fsdp": 2, "tensor": 4}
    assert S.parse_mesh_spec("fsdp=-1") == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    for bad, why in [("data=3,fsdp=4", "multiply to 12"), ("data=-1,fsdp=-1", "only one axis"),
                     ("pipe=2", "unknown axis 'pipe'"), ("fsdp=two", "not an integer"), ("fsdp=0", "positive"),
                     ("data=3,fsdp=-1", "does not divide"), ("fsdp=2,fsdp=4", "given twice")]:
        with pytest.raises(ValueError, match=why) as e:
            S.parse_mesh_spec(bad, 8)
        msg = str(e.value)
        assert "\n" not in msg and repr(bad) in msg and "device count 8" in msg


def test_make_mesh_single_device():
    mesh = S.make_mesh("fsdp=-1")
    assert mesh.axis_names == S.MESH_AXES
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert S.mesh_description(mesh) == f"data=1,fsdp={jax.device_count()},tensor=1"


CFG = ModelConfig(model_type="olmo2", vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def test_logical_axes_and_specs_for_every_param():
    _, params = split_params(abstract_model(CFG))  # ShapeDtypeStruct leaves: no compute
    specs = S.param_partition_specs(params)  # no mesh: the rules as written
    m, a = specs["model"], specs["model"]["layers"]["self_attn"]
    assert m["embed_tokens"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert a["q_proj"]["kernel"] == P(None, "fsdp", "tensor") and a["o_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert a["q_norm"]["weight"] == P() and m["norm"]["weight"] == P()
    assert m["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert S.logical_axes("model/layers/mlp/up_proj/kernel", 3) == ("layers", "embed", "mlp")
    assert S.logical_axes("down_rows", 3) == ("layers", "mlp", "embed")
    assert S.logical_axes(("model", "norm", "weight"), 1) == ("norm",)
    with pytest.raises(KeyError, match="no logical axes"):
        S.logical_axes("model/mystery/bias", 1)
    # a flat trainable dict, and frozen trees with None leaves
    flat = {"model/layers/self_attn/k_proj/kernel": np.zeros((2, 32, 16)), "down_rows": np.zeros((2, 6, 32)),
            "model/norm/weight": None}
    fs = S.param_partition_specs(flat, mesh={"data": 1, "fsdp": 2, "tensor": 4}, model_config=CFG)
    assert fs["model/norm/weight"] is None
    assert fs["down_rows"] == P(None, None, "fsdp")  # K = 6 does not divide tensor=4
    assert fs["model/layers/self_attn/k_proj/kernel"] == P(None, "fsdp")  # 2 kv heads do not divide 4
    fs = S.param_partition_specs(flat, mesh={"data": 1, "fsdp": 2, "tensor": 4})  # width 16 does divide
    assert fs["model/layers/self_attn/k_proj/kernel"] == P(None, "fsdp", "tensor")


def test_layouts_that_would_replicate_silently_are_refused_in_one_line():
    """A dimension its rule puts on mesh axes it does not divide (the fallback would replicate
    it there) and a per-step batch that does not divide the batch axes are refused, naming
    the tensor / config key and the axis; by-design fallbacks (SIMU's K rows, an axis already
    used by an earlier dimension) are not."""
    big = ModelConfig(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000)
    S.check_layout({"data": 2, "fsdp": 4, "tensor": 8}, model_config=big, batch_sizes={"batch_size": 16})
    with pytest.raises(ValueError) as e:  # 4096 / 24 is not whole: fsdp would shard no weight
        S.check_layout({"data": 1, "fsdp": 24, "tensor": 1}, model_config=big)
    msg = str(e.value)
    assert "\n" not in msg and "(embed, 4096) does not divide fsdp=24" in msg and "(and 8 more)" in msg, msg
    problems = S.replication_problems(split_params(abstract_model(big))[1], {"data": 1, "fsdp": 2, "tensor": 16},
                                      model_config=big)  # 8 kv heads on tensor=16
    assert problems == [f"model/layers/self_attn/{p}_proj/kernel dim 2 (kv_heads, 8 heads) does not divide tensor=16"
                        for p in ("k", "v")]
    with pytest.raises(ValueError, match=r"batch_size = 8 rows do not divide the batch axes fsdp=16 = 16") as e:
        S.check_layout({"data": 1, "fsdp": 16, "tensor": 1}, batch_sizes={"batch_size": 8})
    with pytest.raises(ValueError, match=r"batch_size = 6 rows do not divide the batch axes data=2 x fsdp=4 = 8"):
        S.check_layout({"data": 2, "fsdp": 4, "tensor": 1}, batch_sizes={"batch_size": 6})
    sizes = {"data": 1, "fsdp": 2, "tensor": 4}
    assert S.replication_problems({"down_rows": np.zeros((2, 6, 32))}, sizes) == []  # K = 6 on tensor=4: by design
    assert S.replication_problems({"lm_head/kernel": np.zeros((8, 8))}, sizes, {**S.DEFAULT_RULES, "vocab": "fsdp"}) == []


def test_divisibility_fallback_and_batch_rule():
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    assert S.logical_to_spec(("batch", "length"), (8, 16), sizes) == P(("data", "fsdp"))
    assert S.logical_to_spec(("batch", "length"), (2, 16), sizes) == P("data")  # longest prefix that divides
    assert S.logical_to_spec(("batch", "length"), (3, 16), sizes) == P()
    rules = {**S.DEFAULT_RULES, "vocab": "fsdp"}  # two dims on one mesh axis: the second is replicated
    assert S.logical_to_spec(("vocab", "embed"), (8, 8), sizes, rules) == P("fsdp")
    assert S.mask_partition_spec((2, 48), {"data": 1, "fsdp": 1, "tensor": 4}) == P(None, "tensor")
    assert S.mask_partition_spec((2, 6, 1), {"data": 1, "fsdp": 1, "tensor": 4}) == P()


@pytest.mark.parametrize("kind", ["sophia", "adamw"])
def test_opt_state_shardings_follow_params(kind):
    mesh = S.make_mesh("fsdp=-1")
    trainable = {"model/layers/self_attn/q_proj/kernel": jnp.zeros((2, 32, 32)),
                 "model/layers/self_attn/o_proj/kernel": jnp.zeros((2, 32, 32)),
                 "down_rows": jnp.zeros((2, 6, 32))}
    mask = {k: True for k in trainable}
    tx = optim.sophia(1e-3, mask=mask) if kind == "sophia" else optim.adamw(1e-3, mask=mask)
    state = tx.init(trainable)
    psh = S.param_shardings(trainable, mesh)
    by_tx = S.opt_state_shardings(state, psh, mesh, tx=tx)
    by_path = S.opt_state_shardings(state, psh, mesh, params=trainable)
    assert jax.tree.structure(by_tx) == jax.tree.structure(by_path)
    assert [s.spec for s in jax.tree.leaves(by_tx)] == [s.spec for s in jax.tree.leaves(by_path)]
    specs = {str(s.spec) for s in jax.tree.leaves(by_tx)}
    assert str(P(None, "tensor", "fsdp")) in specs and str(P()) in specs
    placed = S.shard_opt_state(state, psh, mesh, tx=tx)
    assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(state)))


def test_constraints_inside_jit():
    mesh = S.make_mesh("fsdp=-1")
    x = {"down_rows": jnp.ones((2, 4, 8))}
    sh = S.param_shardings(x, mesh)

    @jax.jit
    def probe(key):
        u = {"down_rows": jax.random.rademacher(key, (2, 4, 8), jnp.float32)}
        u = S.constrain_like(u, sh)
        h = S.logical_constraint(jnp.ones((4, 16, 8)), ("batch", "length", None), mesh)
        return u, h

    u, h = probe(jax.random.key(0))
    assert u["down_rows"].sharding.is_equivalent_to(sh["down_rows"], 3)
    assert h.shape == (4, 16, 8)


def test_process_slice_covers_everything_once():
    for n, procs in [(10, 3), (7, 7), (5, 8), (64, 4)]:
        parts = [S.process_slice(n, process_index=p, process_count=procs) for p in range(procs)]
        covered = [i for s in parts for i in range(n)[s]]
        assert covered == list(range(n))
        sizes = [s.stop - s.start for s in parts]
        assert max(sizes) - min(sizes) <= 1
        eq = [S.process_slice(n, process_index=p, process_count=procs, drop_remainder=True) for p in range(procs)]
        assert len({s.stop - s.start for s in eq}) == 1 and all(s.stop <= n for s in eq)
    assert S.process_slice(10) == slice(0, 10)  # single process: everything
    with pytest.raises(ValueError, match="out of range"):
        S.process_slice(10, process_index=3, process_count=3)


_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SIMU_DISTRIBUTED", "SLURM_JOB_ID",
             "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


@pytest.fixture
def fake_distributed(monkeypatch):
    calls = []
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


def test_initialize_distributed(fake_distributed, monkeypatch):
    calls = fake_distributed
    assert S.initialize_distributed() is False and calls == []  # single process: no-op
    assert S.initialize_distributed(num_processes=1) is False and calls == []
    assert S.initialize_distributed("10.0.0.1:1234", 4, 2) is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert S.initialize_distributed() is True
    assert calls[-1] == {"coordinator_address": "host0:8476", "num_processes": 2, "process_id": 1}
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert S.initialize_distributed() is True and calls[-1] == {}  # JAX's own SLURM detection
    monkeypatch.setenv("SLURM_NTASKS", "1")
    n = len(calls)
    assert S.initialize_distributed() is False and len(calls) == n
    assert S.is_main_process()


def test_package_layout_and_no_engine_import():
    """Every public name of the three modules is re-exported; importing the package (in a
    fresh interpreter) imports no engine, so the engine can import it at module level."""
    from simu_jax.sharding import distributed, hf_io, mesh

    for module in (mesh, distributed, hf_io):
        for name in module.__all__:
            assert getattr(S, name) is getattr(module, name), name
            assert name in S.__all__ and not name.startswith("_")
    assert not hasattr(S, "build_unlearner") and not hasattr(S, "shard_unlearner")  # engine's now
    code = "import sys, simu_jax.sharding; sys.exit('simu_jax.engine' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=str(HERE.parent)).returncode == 0


def test_place_batch_single_device():
    mesh = S.make_mesh("fsdp=-1")
    n = jax.device_count()
    batch = {"ids": np.arange(2 * 3 * n * 4, dtype=np.int32).reshape(2, 3 * n, 4), "w": np.ones((2, 3 * n), np.float32)}
    placed = S.place_batch(batch, mesh, axis=1)
    for k, v in batch.items():
        assert isinstance(placed[k], jax.Array) and placed[k].dtype == v.dtype
        np.testing.assert_array_equal(np.asarray(placed[k]), v)
    assert placed["ids"].sharding == S.batch_sharding((2, 3 * n, 4), mesh, axis=1)
    assert placed["ids"].sharding.spec == P(None, ("data", "fsdp"))
    assert S.batch_sharding((), mesh, axis=1).spec == P()  # no rows axis: replicated
    assert [s.spec for s in jax.tree.leaves(S.batch_shardings(batch, mesh, axis=1))] == \
        [P(None, ("data", "fsdp")), P(None, ("data", "fsdp"))]
    again = S.place_batch(placed, mesh, axis=1)  # already placed: kept as it is
    assert again["ids"].sharding == placed["ids"].sharding
    np.testing.assert_array_equal(np.asarray(again["ids"]), batch["ids"])


# ----------------------------------------------------------------------------
# Multi-device (the subprocess)
# ----------------------------------------------------------------------------


def test_worker_has_8_devices_and_auto_axes(worker):
    assert worker["device_count"] == 8
    for spec in MESHES:
        assert worker["meshes"][spec]["axis_types"] == ["AxisType.Auto"] * 3


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_simu_step_equals_single_device(worker, spec):
    m = worker["meshes"][spec]
    assert worker["moved"] > 100 * TOL  # the step really changes the params: the comparison means something
    assert m["max_abs_diff"] <= TOL, m["max_abs_diff"]
    assert m["merged_max_abs_diff"] <= TOL  # unlearner.params(): rows scattered back into down_proj
    assert m["opt_max_abs_diff"] <= TOL  # Sophia's momentum and curvature
    np.testing.assert_allclose(m["losses"], worker["ref_losses"], rtol=0, atol=TOL)  # GradDiff: -L_f + L_r, cancels


@pytest.mark.parametrize("spec", MESHES)
def test_unlearner_built_on_mesh(worker, spec):
    """`engine.build_unlearner` (Unlearner(..., mesh=)): the trainable copy and the optimizer state are
    created sharded (jit with out_shardings) and equal the single-device ones; Sophia's m and h
    are split, 1/N of each sharded axis per device; no copy of the whole params is kept."""
    m = worker["meshes"][spec]
    b = m["built"]
    assert b["trainable_max_abs_diff"] == 0.0 and b["opt_max_abs_diff"] == 0.0 and b["opt_structure_equal"]
    assert b["no_original"]
    if spec == "fsdp=8":  # params the caller sharded are used as they are: frozen leaves alias them
        assert b["frozen_aliases"]
    state = m["before"]["opt_state"]
    assert sum(".mu[" in k or ".hessian[" in k for k in state) == 10  # 5 trainable leaves x (m, h)
    for name, x in state.items():
        if ".mu[" in name or ".hessian[" in name:
            assert x["dtype"] == "float32"
            assert any(x["spec"]), (spec, name)  # really sharded ...
            assert [list(s) for s in x["shard_shapes"]] == [x["expected"]] and x["n_shards"] == 8  # ... 1/N each
            assert x["expected"] != x["shape"], (spec, name)
    assert m["merged_down_proj_spec_kept"]  # params(): the row scatter keeps down_proj's layout


def test_shard_unlearner_still_works(worker):
    """An Unlearner built on one device and moved by `engine.shard_unlearner`: same result, same executable."""
    r = worker["shard_unlearner"]
    assert r["max_abs_diff"] <= TOL and r["opt_max_abs_diff"] <= TOL
    np.testing.assert_allclose(r["losses"], worker["ref_losses"], rtol=0, atol=TOL)
    assert r["same_executable"]
    for name, x in r["after"].items():
        assert [list(s) for s in x["shard_shapes"]] == [x["expected"]], name


def test_hutchinson_step_on_mesh(worker):
    """Sophia-H on fsdp=2,tensor=4 equals one device; the Rademacher probes are constrained to the
    trainable params' shardings (XLA's chosen sharding for every probe, read at compile time)."""
    h = worker["hutchinson"]
    assert h["moved"] > 100 * TOL
    assert h["max_abs_diff"] <= TOL and h["opt_max_abs_diff"] <= TOL and h["loss_diff"] <= TOL
    assert h["sharded_leaves"] == h["n_trainable"] == 5
    for name, p in h["probes"].items():
        assert p["equal"], (name, p)
    # per probe leaf: the probe, H u, the running sum (+ the zeros): none in the fisher step; both
    # pin the residual stream at the layer boundaries (activation_sharding), through the HVP too
    assert h["constraints"]["other"] >= 3 * h["n_trainable"] and h["fisher_constraints"]["other"] == 0
    assert h["constraints"]["activation"] > h["fisher_constraints"]["activation"] > 0


def test_true_fsdp_activations_are_sharded(worker):
    """The SIMU step's per-device temp memory (XLA memory_analysis) on fsdp=8 and data=2,fsdp=4 is at
    most 1.5/8 of one device's: the [tokens, hidden] activations are split over the 8 batch devices,
    not all-gathered (without the layer-boundary constraints it was 0.54 on fsdp=8, 0.30 on
    data=2,fsdp=4 at this config; measured with them: 0.16 on both)."""
    one = worker["ref_temp_bytes"]
    for spec in ("fsdp=8", "data=2,fsdp=4"):
        assert worker["meshes"][spec]["temp_bytes"] <= 1.5 / 8 * one, (spec, worker["meshes"][spec]["temp_bytes"], one)


def test_memory_model_per_device_against_xla_on_the_mesh(worker):
    """`memory.per_device` of the step's working set (activations + gradients + transient) against
    XLA's per-device temp bytes of the compiled mesh step, in test_memory's band [0.6, 1.3]: right
    for FSDP now that the activations are split over the batch devices (without the constraints XLA
    held 3.7x the estimate on fsdp=8). Tensor parallelism's split of the attention / MLP
    activations is not in the model: an upper bound there."""
    mm = worker["memory_model"]
    total = {spec: sum(parts.values()) for spec, parts in mm.items()}
    assert 0.6 <= worker["ref_temp_bytes"] / total["one"] <= 1.3
    for spec in ("fsdp=8", "data=2,fsdp=4"):
        assert mm[spec]["activations"] == mm["one"]["activations"] // 8  # 8 rows per part over 8 batch devices
        assert 0.6 <= worker["meshes"][spec]["temp_bytes"] / total[spec] <= 1.3, spec
    assert worker["meshes"]["fsdp=2,tensor=4"]["temp_bytes"] <= 1.3 * total["fsdp=2,tensor=4"]


def test_activation_constraint_follows_the_batch_rule(worker):
    """Under activation_sharding on data=2,fsdp=4 the residual stream's rows go over data x fsdp when
    they divide 8, over data alone for 6 rows, and are explicitly replicated for 3 (an evaluation
    batch of odd size): the divisibility rule of batch_sharding, so the constraint never asks for
    a layout the batch does not have. The logits equal the unconstrained forward's."""
    r = worker["activation_layout"]
    assert r["8"]["layouts"] == ['[{"data", "fsdp"}, {}, {}]']
    assert r["6"]["layouts"] == ['[{"data"}, {}, {}]']
    assert r["3"]["layouts"] == ["[{}, {}, {}]"]
    for rows, x in r.items():
        assert x["count"] == 2, (rows, x)  # entry and exit of the scanned layer body (one scan)
        assert x["max_abs_diff"] <= 1e-5, (rows, x)


@pytest.mark.parametrize("spec", MESHES)
def test_every_device_holds_one_nth(worker, spec):
    """Each of the 8 devices holds exactly its 1/N slice along each sharded axis, before and after steps."""
    m = worker["meshes"][spec]
    for when in ("before", "after"):
        for group, leaves in m[when].items():
            for name, x in leaves.items():
                assert x["n_shards"] == 8, (spec, when, group, name)
                assert x["mesh_match"], (spec, when, group, name)
                assert [list(s) for s in x["shard_shapes"]] == [x["expected"]], (spec, when, group, name, x)
    # the step's outputs keep the input layout
    for group in ("trainable", "opt_state"):
        for name, x in m["after"][group].items():
            assert x["spec"] == m["before"][group][name]["spec"], (spec, group, name)
    # optimizer and curvature state stay float32
    assert {x["dtype"] for x in m["after"]["opt_state"].values()} == {"float32", "int32"}


def _shard(worker, spec, group, name, when="before"):
    leaves = worker["meshes"][spec][when][group]
    key = next(k for k in leaves if name in k)
    return [list(s) for s in leaves[key]["shard_shapes"]][0]


def test_parameters_really_split(worker):
    """Concrete shard shapes (L=2, H=64, heads 8 x 8, kv 4 x 8, I=128, V=128, K=6 neuron rows)."""
    q, k, o, rows = "q_proj", "k_proj", "o_proj", "down_rows"
    # FSDP over 8: the hidden axis is split 8 ways
    assert _shard(worker, "fsdp=8", "trainable", q) == [2, 8, 64]
    assert _shard(worker, "fsdp=8", "trainable", o) == [2, 64, 8]
    assert _shard(worker, "fsdp=8", "trainable", rows) == [2, 6, 8]
    assert _shard(worker, "fsdp=8", "frozen", "embedding") == [128, 8]
    assert _shard(worker, "fsdp=8", "frozen", "gate_proj") == [2, 8, 128]
    # data=2 x fsdp=4: params split 4 ways, replicated over data; the batch split 8 ways
    assert _shard(worker, "data=2,fsdp=4", "trainable", q) == [2, 16, 64]
    assert _shard(worker, "data=2,fsdp=4", "batch", "input_ids") == [1, 16]
    # fsdp=2 x tensor=4: hidden split 2 ways, heads / neurons / vocab 4 ways
    assert _shard(worker, "fsdp=2,tensor=4", "trainable", q) == [2, 32, 16]
    assert _shard(worker, "fsdp=2,tensor=4", "trainable", k) == [2, 32, 8]
    assert _shard(worker, "fsdp=2,tensor=4", "frozen", "down_proj") == [2, 32, 32]
    assert _shard(worker, "fsdp=2,tensor=4", "frozen", "embedding") == [32, 32]
    assert _shard(worker, "fsdp=2,tensor=4", "frozen", "lm_head") == [32, 32]
    assert _shard(worker, "fsdp=2,tensor=4", "batch", "labels") == [4, 16]
    # K = 6 rows do not divide tensor=4: that dim is replicated, H still split over fsdp
    assert _shard(worker, "fsdp=2,tensor=4", "trainable", rows) == [2, 6, 32]
    # neuron masks are sharded like the rows they gate
    assert _shard(worker, "fsdp=2,tensor=4", "masks", "selected") == [2, 32]
    assert _shard(worker, "fsdp=2,tensor=4", "masks", "opt_mask") == [2, 6, 1]
    # Sophia state like its params
    assert _shard(worker, "fsdp=2,tensor=4", "opt_state", "mu['model/layers/self_attn/q_proj") == [2, 32, 16]


# place_batch on 8 devices: (mesh, shape, rows axis) -> spec entries of the rows' array, its shard shape
PLACED = {
    "data=2,fsdp=4 [8, 5] axis=0": ([["data", "fsdp"], []], [1, 5]),  # 8 rows: split 8 ways
    "data=2,fsdp=4 [6, 5] axis=0": ([["data"], []], [3, 5]),  # 6 rows: 8 does not divide, data=2 does
    "data=2,fsdp=4 [3, 5] axis=0": ([[], []], [3, 5]),  # 3 rows: replicated
    "data=2,fsdp=4 [2, 8, 5] axis=1": ([[], ["data", "fsdp"], []], [2, 1, 5]),  # [A, B, T]: B split, A not
    "data=2,fsdp=4 [2, 6, 5] axis=1": ([[], ["data"], []], [2, 3, 5]),
    "data=2,fsdp=4 [3, 3, 5] axis=1": ([[], [], []], [3, 3, 5]),
    "fsdp=8 [8, 5] axis=0": ([["data", "fsdp"], []], [1, 5]),
    "fsdp=8 [6, 5] axis=0": ([["data"], []], [6, 5]),  # data has size 1: replicated in effect
    "fsdp=2,tensor=4 [6, 5] axis=0": ([["data", "fsdp"], []], [3, 5]),  # batch axes: data x fsdp = 2
    "fsdp=2,tensor=4 [2, 3, 5] axis=1": ([[], ["data"], []], [2, 3, 5]),
}


def test_place_batch_on_8_devices(worker):
    """[B, T] and [A, B, T] batches whose rows divide the batch axes, a prefix of them, or
    none: the rows go over the longest prefix that divides (else replicated), every leaf of
    the batch alike, and the values and dtypes come back exactly."""
    r = worker["place_batch"]
    assert set(r) == set(PLACED) | {"already_placed"}
    for case, (spec, shard) in PLACED.items():
        x = r[case]
        assert x["spec"] == spec, case
        assert x["row_weight_spec"] == spec[: len(x["row_weight_spec"])], case  # the [.., B] leaf: same rows
        assert x["shard_shapes"] == [shard], case
        assert x["n_devices"] == 8 and x["mesh_match"] and x["roundtrip"], case
    assert r["already_placed"]  # placing a placed batch again: same sharding, same values


def test_checkpoint_saved_on_one_mesh_restores_on_another(worker):
    c = worker["checkpoint"]
    assert c["max_abs_diff"] == 0.0 and c["opt_max_abs_diff"] == 0.0
    assert c["same_structure"] and c["spec_equal"]
    assert c["step"] == 2 and c["data"] == {"index": 5}
    for name, x in c["restored"].items():
        assert [list(s) for s in x["shard_shapes"]] == [x["expected"]], name
    assert "[2, 32, 16]" in json.dumps(c["restored"]["['params']['model/layers/self_attn/q_proj/kernel']"]
                                       ["shard_shapes"])
    r = worker["resume_other_mesh"]  # a step after restoring on mesh B equals one on mesh A
    assert r["max_abs_diff"] <= TOL and r["loss_diff"] <= 1e-5
