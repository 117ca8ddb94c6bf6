"""The bench's ``scale`` section: a sharded checkpoint in and out, and true FSDP's activations,
on 8 simulated CPU devices.

Each measurement is a fresh subprocess (``python -m simu_jax.bench.scale CHILD JSON``) with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (added to the bench's own flags) and
``JAX_PLATFORMS=cpu``, so the bench process keeps its one device and each peak is its own:

1. ``make``: a random LLaMA (``profiles.ScaleSpec``: by default 349 M parameters, hidden 1024, MLP 2816,
   24 layers, 16 / 8 KV heads, vocabulary 32000) written as ``files`` bf16 safetensors shards +
   index, by ``simu_jax.save_pretrained`` from host (numpy) arrays drawn leaf by leaf (our own
   streaming safetensors writer; no torch).
2. ``load``: ``simu_jax.load_pretrained(path, mesh=fsdp=8, dtype=load_dtype)`` (float32 by
   default: bf16 files, float32 master weights, as the pipelines load them).
3. ``save``: the same load (not measured), then ``simu_jax.save_pretrained(model, out,
   source=path)``: each tensor gathered and cast on device, written in the source's bf16
   (cold: its gather programs compile inside the measured call).
4. ``step_memory``: XLA's ``memory_analysis().temp_size_in_bytes`` of the compiled
   ``simu_graddiff`` step (``engine.Unlearner``) of the bench's step config (its model, its
   neuron fraction and settings; ``step_batch`` forget + ``step_batch`` retain rows, so the
   rows divide fsdp=8) on one device and per device on fsdp=8 (nothing is run).

Peak host RSS is ``VmHWM`` of ``/proc/self/status`` after resetting it (``/proc/self/clear_refs``)
minus ``VmRSS`` at the reset, over the phase alone (Linux only). On CPU the "devices" live in
host memory, so a load's peak includes the arrays it builds: 1.0 would be a load without any
transient copy; the save starts with the params resident, so its peak is what saving adds.
Per-device bytes are each live array's shard size on each device it occupies (replicated
arrays count on every device): for the load, the final arrays; for the save, the largest
total over the save, sampled right after each tensor's on-device gather (a
``convert.GATHER_LISTENERS`` callback), when the gathered tensor and all params are alive. "Model" is the load's final
arrays in ``load_dtype`` (``model_bytes``); the save's RSS is over the written (bf16) bytes and
its device share over the params it saves (the loaded float32 model), per device: model / 8.

Result keys (``result["scale"]``): ``what``, ``devices`` (8), ``mesh`` ("fsdp=8"),
``spec`` (the ``profiles.ScaleSpec``), ``checkpoint`` {``parameters``, ``files``, ``file_bytes``,
``seconds``}, ``load`` {``dtype``, ``model_bytes``, ``peak_rss_bytes``, ``peak_rss_over_model``,
``device_bytes`` (per device, in device order), ``max_device_share_over_model_per_device``,
``seconds``}, ``save`` {``dtype``, ``params_bytes``, ``written_bytes`` (the tensors' bytes in the
written dtype, from the files' headers), ``file_bytes``, ``peak_rss_bytes``,
``peak_rss_over_written``, ``device_bytes`` (per device, at the sample with the largest
device), ``max_device_share_over_params_per_device``, ``samples``, ``seconds``},
``step_memory`` {``method``, ``config``, ``batch_per_part``, ``seq``, ``one_device_temp_bytes``,
``fsdp8_temp_bytes``, ``fsdp8_over_one_device``, ``compile_s``}, ``wall_s``. The headline keys
``scale_*`` (``profiles.SUMMARY_KEYS``) come from these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from simu_jax.bench.profiles import ScaleSpec

__all__ = ["CHILDREN", "device_bytes", "make_checkpoint", "peak_rss_reset", "peak_rss_since", "run_scale"]

DEVICES = 8
MESH = "fsdp=8"


# ---------------------------------------------------------------------------------------
# Measuring (in a child)
# ---------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_reset() -> int:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; returns that RSS (bytes)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as e:
        raise RuntimeError(f"the scale section measures peak RSS with /proc/self/clear_refs (Linux): {e}") from e
    return _status("VmRSS")


def peak_rss_since(base: int) -> int:
    """Peak RSS since :func:`peak_rss_reset` (which returned ``base``), above ``base``."""
    return _status("VmHWM") - base


def device_bytes(arrays) -> list[int]:
    """Bytes each local device holds of ``arrays`` (jax.Arrays), in ``jax.local_devices()`` order:
    each array's shard size on every device of its sharding (a replicated array counts whole on
    each)."""
    import jax

    devices = jax.local_devices()
    held = dict.fromkeys(devices, 0)
    for x in arrays:
        shard = math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for d in x.sharding.device_set:
            if d in held:
                held[d] += shard
    return [held[d] for d in devices]


def _config(spec: dict):
    from simu_jax.models import ModelConfig

    return ModelConfig(model_type="llama", vocab_size=spec["vocab"], hidden_size=spec["hidden"],
                       intermediate_size=spec["mlp"], num_hidden_layers=spec["layers"],
                       num_attention_heads=spec["heads"], num_key_value_heads=spec["kv_heads"],
                       head_dim=spec["hidden"] // spec["heads"])


def make_checkpoint(path: str, spec: dict) -> dict:
    """A random LLaMA as ``spec["files"]`` bf16 safetensors shards + index at ``path``: N(0, 0.02)
    kernels drawn leaf by leaf in float32 and kept as bf16 host arrays, written by
    ``simu_jax.save_pretrained`` (tensor by tensor, numpy only)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import simu_jax
    from simu_jax.models import abstract_model, split_params

    cfg = _config(spec)
    _, abstract = split_params(abstract_model(cfg))
    rng = np.random.default_rng(0)

    def leaf(path, s):
        if path[-1].key == "weight":  # norms
            return np.ones(s.shape, jnp.bfloat16)
        return (0.02 * rng.standard_normal(s.shape, np.float32)).astype(jnp.bfloat16)

    t0 = time.perf_counter()
    params = jax.tree_util.tree_map_with_path(leaf, abstract)
    n = sum(x.size for x in jax.tree.leaves(params))
    simu_jax.save_pretrained(cfg, path, params=params, overwrite=True,
                             max_shard_bytes=int(2 * n / spec["files"] * 1.1))
    files = sorted(Path(path).glob("*.safetensors"))
    return {"parameters": int(n), "files": len(files), "file_bytes": sum(f.stat().st_size for f in files),
            "seconds": time.perf_counter() - t0}


def _mesh_load(path: str, spec: dict):
    import jax
    import jax.numpy as jnp

    import simu_jax
    from simu_jax import sharding as S

    mesh = S.make_mesh(MESH)
    jax.block_until_ready([jax.device_put(jnp.zeros(8), d) for d in jax.local_devices()])  # devices started
    return mesh, lambda: simu_jax.load_pretrained(path, mesh=mesh, dtype=getattr(jnp, spec["load_dtype"]))


def load(path: str, spec: dict) -> dict:
    """Peak RSS and per-device bytes of ``load_pretrained`` onto fsdp=8."""
    import jax

    from simu_jax.models import split_params

    _, do_load = _mesh_load(path, spec)
    base = peak_rss_reset()
    t0 = time.perf_counter()
    params = split_params(do_load())[1]
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = peak_rss_since(base)
    leaves = jax.tree.leaves(params)
    model = sum(x.nbytes for x in leaves)
    held = device_bytes(leaves)
    return {"dtype": spec["load_dtype"], "model_bytes": model, "peak_rss_bytes": peak,
            "peak_rss_over_model": peak / model, "device_bytes": held,
            "max_device_share_over_model_per_device": max(held) / (model / len(held)), "seconds": seconds}


def save(path: str, spec: dict, out: str) -> dict:
    """Peak RSS and the largest per-device bytes of ``save_pretrained`` of the fsdp=8 model
    (loaded first, outside the measurement), written in the source's dtype."""
    import jax

    import simu_jax
    from simu_jax.models import convert, split_params

    _, do_load = _mesh_load(path, spec)
    model = do_load()
    params = split_params(model)[1]
    jax.block_until_ready(params)
    params_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    del params
    samples: list[list[int]] = []

    def sample(name, gathered):  # after each tensor's gather: every live array (params + the gathered tensor)
        jax.block_until_ready(gathered)
        samples.append(device_bytes(jax.live_arrays()))

    convert.GATHER_LISTENERS.append(sample)
    try:
        base = peak_rss_reset()
        t0 = time.perf_counter()
        simu_jax.save_pretrained(model, out, source=path, overwrite=True)
        seconds = time.perf_counter() - t0
        peak = peak_rss_since(base)
    finally:
        convert.GATHER_LISTENERS.remove(sample)
    tensors = convert.checkpoint_tensors(out).values()  # from the written headers
    written = sum(math.prod(t.shape) * t.dtype.itemsize for t in tensors)
    dtype = json.loads((Path(out) / "config.json").read_text()).get("dtype")
    worst = max(samples, key=max)
    return {"dtype": dtype, "params_bytes": params_bytes, "written_bytes": written,
            "file_bytes": sum(f.stat().st_size for f in Path(out).glob("*.safetensors")), "peak_rss_bytes": peak,
            "peak_rss_over_written": peak / written, "device_bytes": worst,
            "max_device_share_over_params_per_device": max(worst) / (params_bytes / len(worst)),
            "samples": len(samples), "seconds": seconds}


def step_memory(profile: dict, spec: dict) -> dict:
    """Temp bytes of the compiled simu_graddiff step of the bench's step config, one device vs
    per device on fsdp=8 (``step_batch`` rows per part)."""
    import jax
    import jax.numpy as jnp

    from simu_jax import sharding as S
    from simu_jax.bench.problems import init_params, make_batch, model_config, random_neuron_mask
    from simu_jax.bench.profiles import Profile, step_settings
    from simu_jax.engine import Unlearner, build_unlearner, get_method

    def tuples(v):  # JSON lists back to the Profile's tuples
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    fields = {f.name for f in dataclasses.fields(Profile)} - {"scale"}
    p = Profile(**{k: tuples(v) for k, v in profile.items() if k in fields})
    p = dataclasses.replace(p, batch=spec["step_batch"])
    hidden, inter = p.sizes[p.step_size]
    cfg = model_config(p, hidden, inter)
    graphdef, params = init_params(cfg, seed=0)
    selected = random_neuron_mask(cfg.num_hidden_layers, inter, p.neuron_fraction, seed=0)
    batch = jax.tree.map(jnp.asarray, make_batch(p, seed=0))
    method, settings = get_method("simu_graddiff"), step_settings(p)

    t0 = time.perf_counter()
    # the one-device reference runs the program the mesh step runs: the layers scanned (the
    # default layer_loop, auto, unrolls these 4 layers on one device but scans on a mesh)
    from flax import nnx

    from simu_jax.models import abstract_model

    scanned, _ = nnx.split(abstract_model(cfg, layer_loop="scan"))
    one = Unlearner(scanned, params, method, settings, selected=selected)
    one_temp = one.lower_step(batch).compile().memory_analysis().temp_size_in_bytes
    u = build_unlearner(graphdef, params, method, settings, S.make_mesh(MESH), selected=selected, model_config=cfg)
    mesh_temp = u.lower_step(batch).compile().memory_analysis().temp_size_in_bytes
    return {"method": "simu_graddiff",
            "config": {"hidden": hidden, "intermediate": inter, "layers": cfg.num_hidden_layers,
                       "vocab": cfg.vocab_size, "heads": cfg.num_attention_heads,
                       "neuron_fraction": p.neuron_fraction},
            "batch_per_part": p.batch, "seq": p.seq, "one_device_temp_bytes": int(one_temp),
            "fsdp8_temp_bytes": int(mesh_temp), "fsdp8_over_one_device": mesh_temp / one_temp,
            "compile_s": time.perf_counter() - t0}


CHILDREN = {"make": make_checkpoint, "load": load, "save": save, "step_memory": step_memory}


# ---------------------------------------------------------------------------------------
# Driving (in the bench)
# ---------------------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={DEVICES}"])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _child(name: str, *args: Any) -> dict:
    """Run ``CHILDREN[name](*args)`` in a fresh 8-device process; its JSON result."""
    cmd = [sys.executable, "-m", "simu_jax.bench.scale", name, json.dumps(list(args))]
    proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scale section: child {name!r} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else '(no output)'}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_scale(spec: ScaleSpec, profile: dict, log=print, workdir: str | None = None) -> dict[str, Any]:
    """The scale section (module doc): four child processes, one after the other."""
    t0 = time.perf_counter()
    s = dataclasses.asdict(spec)
    with tempfile.TemporaryDirectory(prefix="simu_bench_scale_", dir=workdir) as tmp:
        ckpt, out = str(Path(tmp) / "model"), str(Path(tmp) / "saved")
        made = _child("make", ckpt, s)
        log(f"  checkpoint: {made['parameters'] / 1e6:.3g} M parameters, {made['files']} bf16 files "
            f"({made['seconds']:.1f} s)")
        loaded = _child("load", ckpt, s)
        log(f"  load onto {MESH} ({spec.load_dtype}): peak RSS {loaded['peak_rss_over_model']:.3f}x the model, "
            f"largest device {loaded['max_device_share_over_model_per_device']:.3f}x model/{DEVICES} "
            f"({loaded['seconds']:.1f} s)")
        saved = _child("save", ckpt, s, out)
        log(f"  save ({saved['dtype']}): peak RSS {saved['peak_rss_over_written']:.3f}x the written bytes, "
            f"largest device {saved['max_device_share_over_params_per_device']:.3f}x params/{DEVICES} "
            f"({saved['seconds']:.1f} s)")
    step = _child("step_memory", profile, s)
    log(f"  SIMU step temp per device on {MESH}: {step['fsdp8_over_one_device']:.3f}x one device")
    return {"what": ("a random LLaMA as bf16 safetensors shards + index, loaded onto fsdp=8 by "
                     "simu_jax.load_pretrained and saved by simu_jax.save_pretrained, and XLA's temp bytes of "
                     "the simu_graddiff step of the steps' config on one device vs per device on fsdp=8; each in "
                     "a fresh process with 8 simulated CPU devices (simu_jax/bench/scale.py)"),
            "devices": DEVICES, "mesh": MESH, "spec": s, "checkpoint": made, "load": loaded, "save": saved,
            "step_memory": step, "wall_s": time.perf_counter() - t0}


def _main(argv: list[str]) -> int:
    name, args = argv[0], json.loads(argv[1])
    print(json.dumps(CHILDREN[name](*args)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
