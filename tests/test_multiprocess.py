"""A real multi-process run: `simu-jax unlearn --mesh fsdp=4` as 2 JAX processes x 2 CPU devices,
end to end: attribution, the steps, save and evaluation, every phase on the mesh.

Two subprocesses (`tests/multiprocess_worker.py`) each get
`XLA_FLAGS=--xla_force_host_platform_device_count=2`, `JAX_PLATFORMS=cpu`, gloo CPU
collectives and `JAX_COORDINATOR_ADDRESS=localhost:<free port>`, `JAX_NUM_PROCESSES=2`,
`JAX_PROCESS_ID=i`, which `initialize_distributed()` passes to `jax.distributed.initialize`.
The mesh spans the 4 devices of both processes; each process feeds its rows of every batch
(the global batch is assembled with `jax.make_array_from_process_local_data`); the step's
all-gathers and reductions cross the process boundary through gloo. Meanwhile this process
runs the same config on one device, and the two runs must agree (fp32, 1e-5): the neuron
mask (attributed with the params sharded and the rows over the devices of both processes: the
same on both processes, and the same as one device's), per-step losses, eval curves, the
saved model (written from the sharded params by both processes) and the final evaluation's
metrics (its passes on the mesh, both processes taking part). Only process 0 may write the
run's files (orbax's checkpoint writes excepted: every process takes part in those).

JAX's shutdown barrier is set to SHUTDOWN_TIMEOUT_S, less than the final evaluation takes:
the processes must still exit cleanly (they meet at a barrier before they return; a process
that exits while another still evaluates would make both abort with exit 134).

The run is interrupted after step 2 (`debug.stop_after_step`, a checkpoint written by both
processes) and resumed with `--resume` (restored by both), so checkpoints are exercised
across processes too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # two launches of 2 processes + a reference run: ~150 CPU-s, 3-5 min on a busy host

from simu_jax.cli import main
from simu_jax.models import split_params
from simu_jax.models.convert import load_pretrained
from simu_jax.sharding import SHUTDOWN_TIMEOUT_ENV

HERE = Path(__file__).resolve().parent
TOL = 1e-5
NUM_PROCESSES, LOCAL_DEVICES = 2, 2
TIMEOUT_S = 240  # per launch of the process pair; a hang is killed, never waited out
# XLA CPU flags that cut the compile time of a tiny model (as tests/test_sharding.py); they do
# not change what the partitioner does. Retried without them if this XLA does not know them.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
STEPS, STOP_AT = 4, 2
SHUTDOWN_TIMEOUT_S = 5  # JAX's shutdown barrier (default 300 s), set small: the final evaluation takes longer


def _common(model_dir: Path) -> list[str]:
    """SIMU (Sophia on attention + the masked down_proj rows of the attributed neurons: IG with
    m = 2 on 8 forget and 8 retain rows in batches of 4), 4 steps of batch 4 (one row per
    device), eval curves every 2 steps, a checkpoint at step 2; the final evaluation on 2 rows
    per set in batches of 4 (one row per device), with 4 generated tokens per answer."""
    return ["--quiet", "--set", f"model.path={model_dir}", "data.synthetic.num_people=10",
            "data.synthetic.num_general=10", "data.max_length=64", "method=simu_graddiff", f"steps={STEPS}",
            "batch_size=4", "checkpoint_every=2", "eval.every=2", "eval.limit=2", "eval.batch_size=4",
            "eval.max_new_tokens=4", "attribution.steps=2", "attribution.max_examples=8", "attribution.batch_size=4",
            "optim.learning_rate=1e-2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA with a BPE tokenizer trained on the synthetic benchmark's texts."""
    from simu_jax.data import DataSpec, SyntheticConfig, benchmark_texts, load_benchmark
    from simu_jax.data import train_bpe_tokenizer
    from simu_jax.models import ModelConfig, init_model
    from simu_jax.models.convert import save_pretrained

    root = tmp_path_factory.mktemp("mp_model")
    bench = load_benchmark(DataSpec(synthetic=SyntheticConfig(num_people=10, num_general=10)))
    tok = train_bpe_tokenizer(benchmark_texts(bench), root / "tokenizer", vocab_size=320)
    cfg = ModelConfig(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                      max_position_embeddings=128, initializer_range=0.1, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return save_pretrained(init_model(cfg, seed=0), root / "model", tokenizer_dir=root / "tokenizer")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(tmp: Path, tag: str, argv: list[str], xla_extra: str) -> list[tuple[subprocess.Popen, Path, Path]]:
    port = _free_port()
    cache = tmp / "jax_cache"  # shared by the launches: the resumed one reuses the first one's executables
    procs = []
    for i in range(NUM_PROCESSES):
        env = dict(os.environ)
        env.update({
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={LOCAL_DEVICES} "
                         f"{xla_extra}".strip(),
            "JAX_PLATFORMS": "cpu",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
            "JAX_PROCESS_ID": str(i),
            "JAX_COMPILATION_CACHE_DIR": str(cache),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            SHUTDOWN_TIMEOUT_ENV: str(SHUTDOWN_TIMEOUT_S),
            "PYTHONPATH": os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        })
        for name in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "SIMU_DISTRIBUTED"):
            env.pop(name, None)
        report, log = tmp / f"{tag}.report{i}.json", tmp / f"{tag}.log{i}"
        report.unlink(missing_ok=True)
        with open(log, "w") as f:  # files, not pipes: a chatty process never blocks on a full pipe
            p = subprocess.Popen([sys.executable, str(HERE / "multiprocess_worker.py"), str(report), *argv],
                                 env=env, cwd=str(HERE.parent), stdout=f, stderr=subprocess.STDOUT)
        procs.append((p, report, log))
    return procs


def _wait(procs, deadline: float) -> list[int | None]:
    """Exit codes (None: killed). Past the deadline, or 15 s after one process failed (the
    others may wait forever in a collective), every process still running is killed."""
    try:
        failed_at = None
        while time.time() < deadline:
            codes = [p.poll() for p, _, _ in procs]
            if all(c is not None for c in codes):
                return codes
            if failed_at is None and any(c not in (None, 0, 75) for c in codes):
                failed_at = time.time()
            if failed_at is not None and time.time() > failed_at + 15:
                break
            time.sleep(0.2)
        return [p.poll() for p, _, _ in procs]
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _logs(procs) -> str:
    return "\n".join(f"--- process {i} ---\n{log.read_text()[-4000:]}" for i, (_, _, log) in enumerate(procs))


def _run_pair(tmp: Path, tag: str, argv: list[str], expect: int, extra: str) -> tuple[list[dict], str]:
    procs = _launch(tmp, tag, argv, extra)
    codes = _wait(procs, time.time() + TIMEOUT_S)
    logs = _logs(procs)
    if extra and any(c != expect for c in codes) and "nknown flag" in logs:  # an XLA without the flags
        return _run_pair(tmp, tag, argv, expect, "")
    assert codes == [expect] * NUM_PROCESSES, f"exit codes {codes} (expected {expect}):\n{logs}"
    return [json.loads(r.read_text()) for _, r, _ in procs], logs


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mp")
    multi, single = tmp / "multi", tmp / "single"
    argv = ["unlearn", "--out", str(multi), "--mesh", f"fsdp={NUM_PROCESSES * LOCAL_DEVICES}", *_common(model_dir)]
    t0 = time.time()
    # interrupted after step STOP_AT: both processes checkpoint (orbax) and exit 75 together
    first = _launch(tmp, "first", argv + [f"debug.stop_after_step={STOP_AT}"], FAST_COMPILE)
    try:  # meanwhile, the reference: one process, one device, no mesh
        reference_exit = main(["unlearn", "--out", str(single), *_common(model_dir)])
    except BaseException:
        _wait(first, time.time())  # kills them
        raise
    if reference_exit != 0:
        _wait(first, time.time())
    assert reference_exit == 0
    codes = _wait(first, time.time() + TIMEOUT_S)
    logs = _logs(first)
    extra = FAST_COMPILE
    if any(c != 75 for c in codes) and "nknown flag" in logs:
        extra = ""
        _, logs = _run_pair(tmp, "first", argv + [f"debug.stop_after_step={STOP_AT}"], 75, extra)
    else:
        assert codes == [75] * NUM_PROCESSES, f"exit codes {codes} (expected 75):\n{logs}"
    interrupted = [json.loads(r.read_text()) for _, r, _ in first]
    interrupted_files = sorted(str(p.relative_to(multi)) for p in multi.rglob("*"))
    resumed, _ = _run_pair(tmp, "resume", [argv[0], "--resume", *argv[1:]], 0, extra)
    return {"multi": multi, "single": single, "interrupted": interrupted, "resumed": resumed,
            "interrupted_files": interrupted_files, "seconds": time.time() - t0}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _params(model: Path) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(split_params(load_pretrained(model))[1])]


def test_two_processes_four_devices_gloo(runs):
    for reports in (runs["interrupted"], runs["resumed"]):
        assert sorted(r["process_index"] for r in reports) == list(range(NUM_PROCESSES))
        for r in reports:
            assert r["process_count"] == NUM_PROCESSES
            assert r["device_count"] == NUM_PROCESSES * LOCAL_DEVICES and r["local_device_count"] == LOCAL_DEVICES
            assert r["collectives"] == "gloo"
            assert set(r["local_devices"]) < set(r["mesh_devices"])  # the mesh spans both processes
            # each process feeds its half of each batch of 4: the sharding's rows = process_slice's
            assert r["batch_rows"] == r["process_slice"]
            assert r["batch_rows"][1] - r["batch_rows"][0] == 4 // NUM_PROCESSES
            # a global array from the processes' rows, gathered back to the host and placed again
            assert not r["global_batch_fully_addressable"] and r["roundtrip_ok"]
            assert r["any_process_one"] is True and r["any_process_none"] is False


def test_place_batch_across_processes(runs):
    """`sharding.place_batch` of a whole host batch (the same on both processes): each process
    gives its devices their rows, also when the rows do not divide the batch axes (then
    replicated, or split over `data` only) and when a process's rows are not one range."""
    for r in runs["resumed"]:
        p, pb = r["process_index"], r["place_batch"]
        assert pb["interleaved_mesh_processes"] == [0, 1, 0, 1]
        expected = {  # spec entries, this process's rows
            "fsdp=4 [4, 3] axis=0": ([["data", "fsdp"], []], [2 * p, 2 * p + 2]),  # divides: half each
            "fsdp=4 [6, 3] axis=0": ([["data"], []], [0, 6]),  # 4 does not divide 6: all rows everywhere
            "fsdp=4 [2, 6, 3] axis=1": ([[], ["data"], []], [0, 6]),
            "data=2,fsdp=2 [6, 3] axis=0": ([["data"], []], [3 * p, 3 * p + 3]),  # split over data only
            "data=2,fsdp=2 [2, 6, 3] axis=1": ([[], ["data"], []], [3 * p, 3 * p + 3]),
            "interleaved [4, 3] axis=0": ([["data", "fsdp"], []], None),  # rows p and p + 2: not one range
        }
        assert set(pb) == set(expected) | {"interleaved_mesh_processes"}
        for case, (spec, rows) in expected.items():
            x = pb[case]
            assert x["spec"] == spec and x["rows"] == rows, (p, case, x)
            assert not x["fully_addressable"] and x["shards_ok"] and x["roundtrip"], (p, case, x)


def test_multiprocess_run_equals_single_device(runs, model_dir):
    multi, single = runs["multi"], runs["single"]
    assert (multi / "COMPLETE").is_file() and (single / "COMPLETE").is_file()
    m, s = _metrics(multi), _metrics(single)
    steps = lambda rows: [r["step"] for r in rows if "loss" in r]  # noqa: E731
    # the resumed run logged steps 1..STOP_AT before the interruption, STOP_AT+1..STEPS after
    assert steps(m) == steps(s) == list(range(1, STEPS + 1))
    losses = lambda rows, key: np.array([r[key] for r in rows if key in r])  # noqa: E731
    for key in ("loss", "loss/forget", "loss/retain", "eval/forget_loss", "eval/retain_loss"):
        a, b = losses(m, key), losses(s, key)
        assert a.shape == b.shape and a.size > 0, key
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL, err_msg=key)
    pm, ps, base = _params(multi / "model"), _params(single / "model"), _params(model_dir)
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(ps, base)) > 100 * TOL  # the steps moved the params
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(pm, ps)) <= TOL
    # the same final evaluation (its passes on the mesh, both processes taking part)
    em, es = (json.loads((run / "summary.json").read_text())["metrics"] for run in (multi, single))
    assert set(em) == set(es) and {"forget_rouge", "forget_truth_ratio", "model_utility"} <= set(em)
    for key, value in es.items():
        if isinstance(value, float) and np.isfinite(value):
            assert abs(em[key] - value) <= TOL, (key, em[key], value)
        else:
            assert em[key] == value or (value != value and em[key] != em[key]), (key, em[key], value)
    gm, gs = (json.loads((run / "per_sample.json").read_text()) for run in (multi, single))
    for name in ("forget", "retain", "general"):  # greedy generation on the mesh: the same tokens
        assert gm[name]["generation"] == gs[name]["generation"] and len(gs[name]["generation"]) == 2, name
        assert any(gs[name]["generation"]), name


def test_attribution_on_the_mesh_gives_one_mask(runs):
    """Attributed in the first launch (no given mask) with the rows over both processes'
    devices: both processes built the same mask, which is the one-device run's, and it was
    checked across them (a value that differs is refused on every process, in one line)."""
    from simu_jax.attribution import NeuronMask

    multi, single = runs["multi"], runs["single"]
    digests = [r["mask_digests"] for r in runs["interrupted"]]
    assert len(digests[0]) == 1 and digests[0] == digests[1], digests
    assert [r["mask_digests"] for r in runs["resumed"]] == [[], []]  # the resume reads the saved mask
    run_m, run_s = (json.loads((run / "run.json").read_text()) for run in (multi, single))
    assert digests[0][0] == run_m["mask_hash"] == run_s["mask_hash"] == NeuronMask.load(multi / "mask").digest()
    assert 0 < run_m["mask_selected"] < 2 * 64  # some, not all, of the 2 x 64 neurons
    for r in runs["resumed"]:
        msg = r["differing_value_error"]
        assert msg is not None and "\n" not in msg and "differs between the processes" in msg
        assert "a value differs" in msg and "process 0: 0-abc, process 1: 1-abc" in msg


def test_final_phase_outlasts_the_shutdown_timeout(runs):
    """The resumed launch's final phase (save and evaluation, every process taking part) took
    longer than JAX's shutdown timeout, and both processes exited cleanly (the fixture asserts
    exit 0 on both: an abort at the shutdown barrier is exit 134)."""
    result = json.loads((runs["multi"] / "result.json").read_text())
    assert result["eval_time_s"] > SHUTDOWN_TIMEOUT_S, result
    assert all(r["exit"] == 0 for r in runs["resumed"])


def test_only_process_zero_writes_run_files(runs):
    multi = runs["multi"]
    for reports in (runs["interrupted"], runs["resumed"]):
        for r in reports:
            outside = sorted({p for _, p in r["writes"] if p != "." and not p.startswith("checkpoints")})
            if r["process_index"] == 0:
                assert any(p.startswith("run.json") or ".run.json" in p for p in outside), outside
            else:
                assert outside == [], f"process {r['process_index']} wrote {outside}"
    # every output of a single-process run, each once
    expected = {"config.yaml", "run.json", "metrics.jsonl", "result.json", "summary.json", "COMPLETE"}
    assert expected <= {p.name for p in multi.iterdir()}
    assert (multi / "model" / "model.safetensors").is_file() and (multi / "mask" / "mask.npz").is_file()
    assert len(_metrics(multi)) == len(_metrics(runs["single"]))  # no line logged twice
    # the interrupted launch left its checkpoint (written by both processes through orbax)
    assert f"checkpoints/{STOP_AT}" in runs["interrupted_files"]
    assert "model" not in runs["interrupted_files"] and "COMPLETE" not in runs["interrupted_files"]
    run = json.loads((multi / "run.json").read_text())
    assert run["status"] == "complete" and run["resumed_from"] == STOP_AT and run["mesh"] == "fsdp=4"


def test_shutdown_timeout_reaches_jax_distributed_initialize(monkeypatch):
    """`SIMU_SHUTDOWN_TIMEOUT_S` (or `shutdown_timeout_s=`) becomes `jax.distributed.initialize`'s
    `shutdown_timeout_seconds` (what the launches above run under); a value < 1 is refused in
    one line before anything is initialized."""
    from simu_jax.sharding import initialize_distributed

    seen = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv(SHUTDOWN_TIMEOUT_ENV, "7")
    assert initialize_distributed("localhost:1", 2, 0)
    monkeypatch.delenv(SHUTDOWN_TIMEOUT_ENV)
    assert initialize_distributed("localhost:1", 2, 1, shutdown_timeout_s=9)
    assert initialize_distributed("localhost:1", 2, 1)  # JAX's own default
    assert [kw.get("shutdown_timeout_seconds") for kw in seen] == [7, 9, None]
    with pytest.raises(ValueError, match="shutdown timeout must be >= 1 second"):
        initialize_distributed("localhost:1", 2, 0, shutdown_timeout_s=0)
    assert len(seen) == 3
