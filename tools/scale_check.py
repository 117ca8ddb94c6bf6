"""Peak host memory and per-device share of loading / saving a sharded checkpoint, new vs old path.

    python tools/scale_check.py [--dir DIR] [--json FILE] [--layers 24] [--hidden 1024] ...

Writes a random LLaMA (default 349 M parameters: hidden 1024, MLP 2816, 24 layers, 16 heads /
8 KV heads, vocabulary 32000) as 4 bf16 safetensors shards + index, then measures, each in a
fresh process with 8 simulated CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``):

* loading onto ``fsdp=8`` (and onto one device) with ``simu_jax.load_pretrained(path, mesh=...)``
  (slice by slice into the target shardings) and with the old path (every tensor read whole,
  stacked and cast in numpy, ``jnp.asarray`` onto device 0, then ``shard_params``): peak host
  RSS over the bytes the devices end up holding (the model in the target dtype), the largest
  per-device share over model/8 (for the old path: at its peak, device 0 holding everything),
  and the wall time;
* saving the float32 ``fsdp=8`` params with ``simu_jax.save_pretrained`` (each tensor gathered
  and cast on device, streamed; bf16, the source's dtype) and with the old path (``to_host`` of
  the whole model, every HF tensor copied to device 0, ``safetensors.flax.save_file``): peak
  host RSS over the model's float32 bytes (the new path measured cold, which includes compiling
  its gather programs, and warm).

Peak RSS is ``VmHWM`` of ``/proc/self/status`` after resetting it (``/proc/self/clear_refs``),
minus the RSS at the reset: Linux only (the helpers of ``simu_jax.bench.scale``, whose bench
section measures the new paths' figures as targets; this tool adds the old paths beside them). Prints a markdown table (plus the CPU model); ``--json``
writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout: the package's own

from simu_jax.bench.scale import device_bytes, make_checkpoint, peak_rss_reset, peak_rss_since  # noqa: E402


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return "unknown CPU"


# ---------------------------------------------------------------------------- child processes


def make(path: str, hidden: int, mlp: int, layers: int, vocab: int, heads: int, kv_heads: int, files: int) -> dict:
    made = make_checkpoint(path, {"hidden": hidden, "mlp": mlp, "layers": layers, "vocab": vocab, "heads": heads,
                                  "kv_heads": kv_heads, "files": files})
    return {"parameters": made["parameters"], "files": sorted(p.name for p in Path(path).glob("*.safetensors"))}


def load(path: str, way: str, mesh_spec: str, dtype_name: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import simu_jax
    from simu_jax import sharding as S
    from simu_jax.models import ModelConfig, split_params
    from simu_jax.models.convert import params_from_hf_tensors, read_safetensors

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype_name]
    mesh = None if mesh_spec == "none" else S.make_mesh(mesh_spec)
    jax.block_until_ready([jax.device_put(np.zeros(8), d) for d in jax.devices()])
    cfg = ModelConfig.from_pretrained(path)
    base = peak_rss_reset()
    t0 = time.perf_counter()
    device0_peak = None
    if way == "new":
        params = split_params(simu_jax.load_pretrained(path, mesh=mesh, dtype=dtype))[1]
    else:
        params = jax.tree.map(jnp.asarray, params_from_hf_tensors(cfg, read_safetensors(path), param_dtype=dtype))
        jax.block_until_ready(params)
        device0_peak = max(device_bytes(jax.tree.leaves(params)))
        if mesh is not None:
            params = S.shard_params(params, mesh, model_config=cfg)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    peak = peak_rss_since(base)
    leaves = jax.tree.leaves(params)
    model_bytes = sum(x.nbytes for x in leaves)
    held = device_bytes(leaves)
    share = max(held) if device0_peak is None else max(device0_peak, max(held))
    n_dev = len(held) if mesh is not None else 1
    return {"way": way, "mesh": mesh_spec, "dtype": dtype_name, "seconds": round(seconds, 2),
            "model_bytes": model_bytes, "held_bytes": sum(held), "peak_bytes": peak,
            "peak_over_held": round(peak / sum(held), 3),
            "max_device_share_over_model_per_device": round(share / (model_bytes / n_dev), 3)}


def save(path: str, way: str, out: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import simu_jax
    from simu_jax import sharding as S
    from simu_jax.models import split_params
    from simu_jax.models.convert import hf_tensors_from_params

    mesh = S.make_mesh("fsdp=8")
    model = simu_jax.load_pretrained(path, mesh=mesh)
    graphdef, params = split_params(model)
    jax.block_until_ready(params)
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    res = {"way": way, "model_bytes": model_bytes}
    runs = ("cold", "warm") if way == "new" else ("cold",)
    for run in runs:
        base = peak_rss_reset()
        t0 = time.perf_counter()
        if way == "new":
            simu_jax.save_pretrained(model, f"{out}-{run}", source=path, overwrite=True, max_shard_bytes=200 * 2**20)
        else:
            from safetensors.flax import save_file

            host = S.to_host(params)
            tensors = {k: jnp.asarray(v) for k, v in hf_tensors_from_params(model.config, host).items()}
            Path(f"{out}-{run}").mkdir(exist_ok=True)
            save_file(tensors, f"{out}-{run}/model.safetensors", metadata={"format": "pt"})
            del host, tensors
        res[f"{run}_seconds"] = round(time.perf_counter() - t0, 2)
        res[f"{run}_peak_bytes"] = peak_rss_since(base)
        res[f"{run}_peak_over_model"] = round(res[f"{run}_peak_bytes"] / model_bytes, 3)
    written = sum(p.stat().st_size for p in Path(f"{out}-cold").glob("*.safetensors"))
    res["written_bytes"] = written
    np.asarray(0)
    return res


# ---------------------------------------------------------------------------- driver


def _child(*args: str) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    with open(os.devnull, "w") as null:
        out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, check=True,
                             stdout=subprocess.PIPE, stderr=null, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/tmp/simu_scale_check", help="where the checkpoint and saves go")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--mlp", type=int, default=2816)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--skip-old", action="store_true", help="measure the new paths only")
    p.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        what, *rest = args.child
        fn = {"make": make, "load": load, "save": save}[what]
        if what == "make":
            rest = [rest[0], *map(int, rest[1:])]
        print(json.dumps(fn(*rest)))
        return 0

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = str(root / "model")
    t0 = time.time()
    made = _child("make", ckpt, *map(str, (args.hidden, args.mlp, args.layers, args.vocab, args.heads,
                                           args.kv_heads, args.files)))
    print(f"checkpoint: {made['parameters'] / 1e6:.0f} M parameters, {len(made['files'])} bf16 files "
          f"({time.time() - t0:.0f} s)", file=sys.stderr)
    results = {"cpu": cpu_model(), "parameters": made["parameters"], "files": made["files"], "load": [], "save": []}
    ways = ("new",) if args.skip_old else ("new", "old")
    for way in ways:
        for mesh, dtype in (("fsdp=8", "float32"), ("fsdp=8", "bfloat16"), ("none", "float32")):
            r = _child("load", ckpt, way, mesh, dtype)
            print(json.dumps(r), file=sys.stderr)
            results["load"].append(r)
        r = _child("save", ckpt, way, str(root / f"saved-{way}"))
        print(json.dumps(r), file=sys.stderr)
        results["save"].append(r)

    print(f"CPU: {results['cpu']}; {made['parameters'] / 1e6:.0f} M-parameter LLaMA, "
          f"{len(made['files'])} bf16 safetensors files, 8 simulated CPU devices\n")
    print("| load | mesh | dtype | seconds | peak host RSS / final arrays | largest device share / (model / N) |")
    print("|---|---|---|---:|---:|---:|")
    for r in results["load"]:
        print(f"| {r['way']} | {r['mesh']} | {r['dtype']} | {r['seconds']} | {r['peak_over_held']} | "
              f"{r['max_device_share_over_model_per_device']} |")
    print("\n| save (fsdp=8, float32 params) | seconds | peak host RSS / float32 model | bytes written |")
    print("|---|---:|---:|---:|")
    for r in results["save"]:
        runs = ("cold", "warm") if r["way"] == "new" else ("cold",)
        for run in runs:
            print(f"| {r['way']} ({run}) | {r[f'{run}_seconds']} | {r[f'{run}_peak_over_model']} | "
                  f"{r['written_bytes'] / 1e6:.0f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
