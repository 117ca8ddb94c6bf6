"""Sharded Hugging Face loading and saving (simu_jax.sharding.hf_io), and bad weight / mask files.

The multi-device part runs this file as a script in a subprocess with 8 host CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), as tests/test_sharding.py does:

    python tests/test_hf_io.py worker OUT.json TMPDIR    # loads / saves on meshes, writes what it saw
    python tests/test_hf_io.py memory OUT.json DIR MESH  # peak host memory of one load (+ save), fresh process

The assertions live in the tests below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MESHES = ("fsdp=8", "data=2,fsdp=4", "fsdp=2,tensor=4")
VARIANTS = ("llama_gqa_untied", "olmo2_gqa")
# the memory check's model: 21 M parameters, 84 MB in float32, stored as 4 bf16 shards
BIG = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=8192)


# ============================================================================ worker side


def _leaves(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield "/".join(prefix + (k,)), v


def _check_layout(params, ref, mesh, cfg) -> dict:
    """Per leaf: equal to the one-device load bit for bit; the expected sharding; each device's
    shard of the expected block shape (1/N along each sharded axis), holding ref[index]."""
    import numpy as np

    from simu_jax import sharding as S

    specs = dict(_leaves(S.param_partition_specs(params, mesh=mesh, model_config=cfg)))
    ref = dict(_leaves(ref))
    bad = {"values": [], "sharding": [], "shards": []}
    sharded_axes = 0
    for name, x in _leaves(params):
        want = ref[name]
        if x.dtype != want.dtype or not np.array_equal(np.asarray(x).view(np.uint8), want.view(np.uint8)):
            bad["values"].append(name)
        if x.sharding.mesh != mesh or x.sharding.spec != specs[name]:
            bad["sharding"].append(f"{name}: {x.sharding.spec} != {specs[name]}")
        block = list(x.shape)
        for d, entry in enumerate(specs[name]):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            for a in axes:
                block[d] //= mesh.shape[a]
                sharded_axes += mesh.shape[a] > 1
        for shard in x.addressable_shards:
            if tuple(shard.data.shape) != tuple(block) or not np.array_equal(
                    np.asarray(shard.data).view(np.uint8), want[shard.index].view(np.uint8)):
                bad["shards"].append(f"{name} on {shard.device}")
                break
    return {**bad, "sharded_axes": sharded_axes}


def _host(params):
    import numpy as np

    return {k: (_host(v) if isinstance(v, dict) else np.asarray(v)) for k, v in params.items()}


def worker(out_json: str, tmp: str) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import simu_jax
    from simu_jax import sharding as S
    from simu_jax.models import split_params
    from simu_jax.models.convert import params_from_hf_tensors, read_safetensors

    tmp = Path(tmp)
    assert jax.device_count() == 8, jax.devices()
    out: dict = {"meshes": {}, "bf16": {}, "save": {}}
    for variant in VARIANTS:
        src = tmp / variant
        model = simu_jax.load_pretrained(src)
        cfg = model.config
        ref = _host(split_params(model)[1])
        old = params_from_hf_tensors(cfg, read_safetensors(src))
        out.setdefault("old_path_equal", {})[variant] = all(
            np.array_equal(a, b) for (_, a), (_, b) in zip(_leaves(ref), _leaves(old)))
        for spec in MESHES:
            mesh = S.make_mesh(spec)
            for kind, path in (("single", src), ("sharded", tmp / f"{variant}_sharded")):
                _, params = split_params(simu_jax.load_pretrained(path, mesh=mesh))
                out["meshes"][f"{variant} {spec} {kind}"] = _check_layout(params, ref, mesh, cfg)
        mesh = S.make_mesh("fsdp=8")
        _, p16 = split_params(simu_jax.load_pretrained(tmp / f"{variant}_sharded", mesh=mesh, dtype=jnp.bfloat16))
        ref16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), ref)
        out["bf16"][variant] = _check_layout(p16, ref16, mesh, cfg)

        # save from sharded params: exact round trip, several files + index, then bf16
        sharded_model = simu_jax.load_pretrained(src, mesh=S.make_mesh("data=2,fsdp=4"))
        saved = simu_jax.save_pretrained(sharded_model, tmp / f"{variant}_saved", max_shard_bytes=60_000)
        back = _host(split_params(simu_jax.load_pretrained(saved))[1])
        g, sp = split_params(sharded_model)
        saved16 = simu_jax.save_pretrained(g, tmp / f"{variant}_saved16", params=sp, dtype="bfloat16")
        back16 = _host(split_params(simu_jax.load_pretrained(saved16))[1])
        src_dtype = simu_jax.save_pretrained(cfg, tmp / f"{variant}_saved_src", params=sp, source=saved16)
        out["save"][variant] = {
            "files": sorted(p.name for p in saved.iterdir()),
            "exact": all(np.array_equal(a, b) for (_, a), (_, b) in zip(_leaves(back), _leaves(ref))),
            "bf16_exact": all(np.array_equal(a, np.asarray(jnp.asarray(b).astype(jnp.bfloat16)).astype(np.float32))
                              for (_, a), (_, b) in zip(_leaves(back16), _leaves(ref))),
            "bf16_config_dtype": json.loads((saved16 / "config.json").read_text())["dtype"],
            "source_default_dtype": json.loads((src_dtype / "config.json").read_text())["dtype"],
            "leftovers": sorted(p.name for p in tmp.iterdir() if p.name.startswith(".")),
        }

    # gs:// (tests/remote_fs.py, an in-memory object store): save from a mesh, the same files as
    # the local save; load onto every mesh by ranged reads, bit-exact and laid out by the rules
    import remote_fs

    remote_fs.install()
    variant = VARIANTS[0]
    ref = _host(split_params(simu_jax.load_pretrained(tmp / variant))[1])
    sharded_model = simu_jax.load_pretrained(tmp / variant, mesh=S.make_mesh("data=2,fsdp=4"))
    url = simu_jax.save_pretrained(sharded_model, f"gs://bucket/{variant}", max_shard_bytes=60_000)
    objects = remote_fs.objects(f"bucket/{variant}/")
    local = tmp / f"{variant}_saved"
    names = {k: k.rsplit("/", 1)[1] for k in objects}
    out["remote"] = {"same_files": sorted(names.values()) == sorted(p.name for p in local.iterdir()),
                     "same_bytes": all(v == (local / names[k]).read_bytes() for k, v in objects.items()),
                     "meshes": {}}
    for spec in MESHES:
        mesh = S.make_mesh(spec)
        _, params = split_params(simu_jax.load_pretrained(str(url), mesh=mesh))
        out["remote"]["meshes"][spec] = _check_layout(params, ref, mesh, sharded_model.config)
    remote_fs.uninstall()

    # peak host memory: a bigger model, measured in fresh processes
    from simu_jax.models import ModelConfig, abstract_model
    from simu_jax.models.spec import host_init_params

    big = ModelConfig(model_type="llama", num_attention_heads=8, num_key_value_heads=4, head_dim=64, **BIG)
    _, abstract = split_params(abstract_model(big))
    simu_jax.save_pretrained(big, tmp / "big", params=host_init_params(abstract, 0.02, 0), dtype="bfloat16",
                             max_shard_bytes=12 * 2**20)
    out["memory"] = {}
    for spec in ("fsdp=8", "none"):
        res = tmp / f"memory-{spec}.json"
        subprocess.run([sys.executable, __file__, "memory", str(res), str(tmp / "big"), spec], check=True,
                       env=os.environ)
        out["memory"][spec] = json.loads(res.read_text())
    Path(out_json).write_text(json.dumps(out, indent=1))


def memory(out_json: str, path: str, spec: str) -> None:
    """Peak host RSS of loading ``path`` (float32) onto ``spec`` (or one device) over the bytes
    this process's devices end up holding, the largest device share over model/N, and the
    peak of saving it back (bf16) over the model's bytes."""
    import jax
    import numpy as np

    import simu_jax
    from simu_jax import sharding as S
    from simu_jax.bench.scale import peak_rss_reset, peak_rss_since
    from simu_jax.models import split_params

    mesh = None if spec == "none" else S.make_mesh(spec)
    jax.block_until_ready([jax.device_put(np.zeros(8), d) for d in jax.devices()])  # start every device
    base = peak_rss_reset()
    t0 = time.perf_counter()
    model = simu_jax.load_pretrained(path, mesh=mesh)
    _, params = split_params(model)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = peak_rss_since(base)
    leaves = jax.tree.leaves(params)
    model_bytes = sum(x.nbytes for x in leaves)
    held = {d: 0 for d in jax.local_devices()}
    for x in leaves:
        for s in x.addressable_shards:
            held[s.device] += s.data.nbytes
    # the transient the loader allows itself: one host block (a device's share of one leaf, in
    # float32) while it is handed to its device, plus the pages of the one source tensor mapped
    # while that block is read (see convert._slice_reader)
    from simu_jax.models.convert import checkpoint_tensors

    block = max(max(s.data.nbytes for s in x.addressable_shards) for x in leaves)
    source = max(int(np.prod(t.shape)) * t.dtype.itemsize for t in checkpoint_tensors(path).values())
    res = {"model_bytes": model_bytes, "held_bytes": sum(held.values()), "load_peak_bytes": peak,
           "largest_block_bytes": block, "largest_source_tensor_bytes": source,
           "load_seconds": seconds, "max_device_share": max(held.values()) / (model_bytes / len(held))}
    if mesh is not None:  # the first save also compiles its gather programs (kept: a constant)
        for run in ("cold", "warm"):
            base = peak_rss_reset()
            simu_jax.save_pretrained(model, Path(path).parent / f"saved-{spec}-{run}", max_shard_bytes=12 * 2**20)
            res[f"save_peak_bytes_{run}"] = peak_rss_since(base)
        res["largest_tensor_bytes"] = max(x.nbytes // (x.shape[0] if x.ndim == 3 else 1) for x in leaves)
    Path(out_json).write_text(json.dumps(res))


def multiprocess(out_json: str, src: str, dest: str) -> None:
    """One of two processes (2 CPU devices each, gloo): load ``src`` onto ``fsdp=4`` spanning
    both, check this process's shards against a whole numpy read, save to ``dest`` in several
    files, and report which files this process wrote."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import numpy as np

    import simu_jax
    from simu_jax import sharding as S
    from simu_jax.models import convert, split_params

    assert S.initialize_distributed() and jax.process_count() == 2
    written = []
    write = convert.write_safetensors

    def logged(file, *a, **k):
        written.append(Path(file).name)
        return write(file, *a, **k)

    convert.write_safetensors = logged
    mesh = S.make_mesh("fsdp=4")
    model = simu_jax.load_pretrained(src, mesh=mesh)
    cfg = model.config
    ref = dict(_leaves(convert.params_from_hf_tensors(cfg, convert.read_safetensors(Path(src)))))
    bad, local_shards = [], 0
    for name, x in _leaves(split_params(model)[1]):
        assert not x.is_fully_addressable
        for shard in x.addressable_shards:
            local_shards += 1
            if not np.array_equal(np.asarray(shard.data), ref[name][shard.index]):
                bad.append(name)
    simu_jax.save_pretrained(model, dest, max_shard_bytes=60_000)
    Path(out_json).write_text(json.dumps({"process": jax.process_index(), "bad": bad, "written": written,
                                          "local_shards": local_shards}))


if __name__ == "__main__":
    {"worker": worker, "memory": memory, "multiprocess": multiprocess}[sys.argv[1]](*sys.argv[2:])
    sys.exit(0)


# ============================================================================ tests

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from simu_jax.attribution import NeuronMask  # noqa: E402
from simu_jax.cli import main  # noqa: E402


def _start_worker(tmp: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(tmp / "worker.log", "w") as log:
        return subprocess.Popen([sys.executable, __file__, "worker", str(tmp / "out.json"), str(tmp)], env=env,
                                cwd=str(HERE.parent), stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module", autouse=True)
def _worker_process(tmp_path_factory):
    """Build the checkpoints (transformers, float32; a sharded copy with an index), then start the
    8-device worker; the single-process tests run while it works."""
    from hf_fixtures import build_hf_model

    from simu_jax.models.convert import load_pretrained, save_pretrained

    tmp = tmp_path_factory.mktemp("hf_io")
    torch_models = {}
    for variant in VARIANTS:
        torch_models[variant] = build_hf_model(variant, tmp / variant)
        save_pretrained(load_pretrained(tmp / variant), tmp / f"{variant}_sharded", max_shard_bytes=40_000)
    proc = _start_worker(tmp)
    yield proc, tmp, torch_models
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def worker(_worker_process):
    proc, tmp, torch_models = _worker_process
    code = proc.wait(timeout=600)
    assert code == 0, f"worker failed:\n{(tmp / 'worker.log').read_text()[-8000:]}"
    return json.loads((tmp / "out.json").read_text()), tmp, torch_models


def test_two_processes_load_their_slices_and_split_the_files(worker):
    """2 processes x 2 CPU devices (gloo), fsdp=4 across both: each process's shards equal the
    checkpoint; saving writes file k on process k % 2, and the result reloads exactly."""
    import socket

    from simu_jax.models import split_params
    from simu_jax.models.convert import load_pretrained

    _, tmp, _ = worker  # after the 8-device worker: the CPU cores are shared
    src, dest = tmp / VARIANTS[0], tmp / "saved_by_two"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip(), JAX_PLATFORMS="cpu",
                   JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i),
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        for name in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "SIMU_DISTRIBUTED"):
            env.pop(name, None)
        log = open(tmp / f"mp{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, __file__, "multiprocess", str(tmp / f"mp{i}.json"), str(src),
                                       str(dest)], env=env, cwd=str(HERE.parent), stdout=log,
                                      stderr=subprocess.STDOUT))
        log.close()
    deadline = time.time() + 300
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    logs = "\n".join((tmp / f"mp{i}.log").read_text()[-3000:] for i in range(2))
    assert [p.wait() for p in procs] == [0, 0], logs
    reports = [json.loads((tmp / f"mp{i}.json").read_text()) for i in range(2)]
    files = sorted(f.name for f in dest.glob("model-*.safetensors"))
    assert len(files) >= 4
    for r in reports:
        assert r["bad"] == [] and r["local_shards"] > 0, r
        assert sorted(r["written"]) == files[r["process"]::2], (r, files)
    original = dict(_leaves(split_params(load_pretrained(src))[1]))
    for name, x in _leaves(split_params(load_pretrained(dest))[1]):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(original[name]))
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------- bad files (one process)


def _model_dir(tmp_path: Path, sharded: bool) -> Path:
    from hf_fixtures import build_hf_model

    from simu_jax.models.convert import load_pretrained, save_pretrained

    build_hf_model("llama_gqa_untied", tmp_path / "one")
    if not sharded:
        return tmp_path / "one"
    return save_pretrained(load_pretrained(tmp_path / "one"), tmp_path / "many", max_shard_bytes=40_000)


def _cli_error(capsys, tmp_path: Path, model: Path) -> str:
    out = tmp_path / "eval-out"
    code = main(["evaluate", "--model", str(model), "--benchmark", "synthetic", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("simu-jax: error: ")]
    assert code == 1 and len(errors) == 1 and err[-1] == errors[0], err
    assert not out.exists()  # nothing written
    return errors[0][len("simu-jax: error: "):]


def _break(kind: str, d: Path) -> Path:
    """Damage model directory ``d`` one way; return the file the error must name."""
    index = d / "model.safetensors.index.json"
    shard = sorted(d.glob("model-*.safetensors"))[1] if index.exists() else d / "model.safetensors"
    if kind == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif kind == "corrupt_header":
        raw = bytearray(shard.read_bytes())
        raw[8:40] = b"\x00garbage-not-json-garbage-00000"
        shard.write_bytes(bytes(raw))
    elif kind == "not_safetensors":
        shard.write_text("this is a text file, not weights\n")
    elif kind == "bad_index":
        index.write_text("{not json")
        return index
    elif kind == "index_without_map":
        index.write_text(json.dumps({"metadata": {}}))
        return index
    elif kind == "missing_shard":
        shard.unlink()
    elif kind == "index_names_absent_tensor":
        idx = json.loads(index.read_text())
        name = sorted(idx["weight_map"])[0]
        other = next(f for f in sorted(set(idx["weight_map"].values())) if f != idx["weight_map"][name])
        idx["weight_map"][name] = other
        index.write_text(json.dumps(idx))
        return d / other
    elif kind == "wrong_shape":
        cfg = json.loads((d / "config.json").read_text())
        cfg["intermediate_size"] = 80
        (d / "config.json").write_text(json.dumps(cfg))
        return Path("model.layers.0.mlp")
    return shard


@pytest.mark.parametrize("sharded, kind", [
    (False, "truncated"), (False, "corrupt_header"), (False, "not_safetensors"), (False, "wrong_shape"),
    (True, "truncated"), (True, "corrupt_header"), (True, "bad_index"), (True, "index_without_map"),
    (True, "missing_shard"), (True, "index_names_absent_tensor"), (True, "wrong_shape"),
])
def test_bad_weight_files_are_one_line_naming_the_file(capsys, tmp_path, sharded, kind):
    model = _model_dir(tmp_path, sharded)
    named = _break(kind, model)
    message = _cli_error(capsys, tmp_path, model)
    assert str(named) in message, message
    assert "internal error" not in message and "SafetensorError" not in message


def test_bad_mask_files_are_one_line_naming_the_file(tmp_path):
    good = NeuronMask(selected=np.eye(2, 6, dtype=bool), forget=np.eye(2, 6, dtype=bool))
    good.save(tmp_path / "ok")
    assert NeuronMask.load(tmp_path / "ok", shape=(2, 6)).selected.shape == (2, 6)
    (tmp_path / "text.npz").write_text("not a mask\n")
    np.savez(tmp_path / "nosel.npz", forget=np.zeros((2, 6), bool))
    np.save(tmp_path / "plain.npy", np.zeros((2, 6), bool))
    np.savez(tmp_path / "floats.npz", selected=np.full((2, 6), 0.5))
    np.savez(tmp_path / "ragged.npz", selected=np.zeros((2, 6), bool), retain=np.zeros((3, 6), bool))
    np.savez(tmp_path / "pickled.npz", selected=np.array([{"a": 1}], dtype=object))
    cases = [("text.npz", "not an .npz archive"), ("nosel.npz", "no 'selected' array; it has forget"),
             ("plain.npy", "not an .npz archive"), ("floats.npz", "not boolean"),
             ("ragged.npz", "'retain' has shape (3, 6)"), ("pickled.npz", "")]
    for name, why in cases:
        with pytest.raises(ValueError, match="not a neuron mask") as e:
            NeuronMask.load(tmp_path / name)
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path / name) in msg and why in msg, msg
    with pytest.raises(ValueError, match=r"shape \(2, 6\) \(layers, neurons\) does not fit the model's \(2, 8\)") as e:
        NeuronMask.load(tmp_path / "ok", shape=(2, 8))
    assert str(tmp_path / "ok" / "mask.npz") in str(e.value)


def test_source_dtype(tmp_path):
    from simu_jax.sharding import source_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert source_dtype(tmp_path) == np.dtype("bfloat16")
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32"}))
    assert source_dtype(tmp_path) == np.float32
    assert source_dtype(tmp_path / "nowhere") is None and source_dtype(None) is None


# ---------------------------------------------------------------------------- 8 devices


def test_one_device_load_equals_the_old_full_read(worker):
    out, _, _ = worker
    assert all(out["old_path_equal"].values()), out["old_path_equal"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kind", ("single", "sharded"))
def test_sharded_load_is_bit_exact_and_laid_out_by_the_rules(worker, variant, mesh, kind):
    res = worker[0]["meshes"][f"{variant} {mesh} {kind}"]
    assert res["values"] == [] and res["sharding"] == [] and res["shards"] == [], res
    assert res["sharded_axes"] > 0


def test_object_store_save_and_sharded_load(worker):
    """gs:// on the in-memory store: saving from a mesh writes the local save's files byte for
    byte; loading onto each mesh (each device's block one ranged read) is bit-exact."""
    res = worker[0]["remote"]
    assert res["same_files"] and res["same_bytes"], res
    for spec in MESHES:
        r = res["meshes"][spec]
        assert r["values"] == [] and r["sharding"] == [] and r["shards"] == [] and r["sharded_axes"] > 0, (spec, r)


def test_bf16_load_casts_slice_by_slice_like_numpy(worker):
    for variant, res in worker[0]["bf16"].items():
        assert res["values"] == [] and res["sharding"] == [] and res["shards"] == [], (variant, res)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_from_sharded_params_round_trips_and_loads_in_transformers(worker, variant):
    import torch
    from transformers import AutoModelForCausalLM

    out, tmp, torch_models = worker
    res = out["save"][variant]
    assert res["exact"] and res["bf16_exact"], res
    assert "model.safetensors.index.json" in res["files"] and sum(f.startswith("model-") for f in res["files"]) > 1
    assert res["bf16_config_dtype"] == "bfloat16" and res["source_default_dtype"] == "bfloat16"
    assert res["leftovers"] == []  # no temp directories left behind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / f"{variant}_saved", attn_implementation="eager").eval()
    ids = torch.as_tensor(np.random.default_rng(0).integers(2, 127, size=(2, 24)))
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), torch_models[variant](ids).logits.numpy())


def test_peak_host_memory_of_loading_and_saving(worker):
    mem = worker[0]["memory"]
    for spec, res in mem.items():
        assert 60e6 < res["model_bytes"] < 120e6, res
        # no second copy of the model: the peak is what the devices hold plus one block and one
        # mapped source tensor (the measured transient depends on whether the host block is
        # aliased or copied by the device transfer), plus 4 MB of interpreter allocations
        transient = res["largest_block_bytes"] + res["largest_source_tensor_bytes"] + 4 * 2**20
        assert res["load_peak_bytes"] < res["held_bytes"] + transient, (spec, res)
        assert res["load_peak_bytes"] < 1.35 * res["held_bytes"], (spec, res)
    assert mem["fsdp=8"]["max_device_share"] < 1.01, mem  # each device ~1/8 (norms are replicated)
    # saving streams one tensor at a time: about two of the largest tensor (the device result and
    # its host copy; here the 16 MB embedding of an 84 MB model), once the gathers are compiled
    save = mem["fsdp=8"]
    assert save["save_peak_bytes_warm"] < 2.5 * save["largest_tensor_bytes"] < 0.5 * save["model_bytes"], save
