"""Run by tests/test_multiprocess.py: one of several JAX processes running `simu-jax unlearn`.

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=I \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
    JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \\
    python tests/multiprocess_worker.py REPORT.json unlearn --mesh fsdp=4 --out RUN ...

The arguments after REPORT.json are a `simu-jax` command line, run through `simu_jax.cli.main`
(which calls `initialize_distributed()` from the environment above, then builds the mesh over
all processes' devices). Afterwards the process writes what it saw to REPORT.json (its index,
the device counts, the CPU collectives in use, which rows of a global batch it fed, what
`sharding.place_batch` made of a few whole host batches (rows that divide the batch axes,
that do not, and a mesh whose device order interleaves the processes), and every file or
directory it created, wrote, renamed or removed under the run directory, recorded by a
`sys.addaudithook` hook; the digest of each neuron mask `simu_jax.unlearn.compute_mask`
returned in this process, recorded by a wrapper that calls the real function; what
`sharding.check_same_on_all_processes` says of a value that differs between the processes);
the assertions live in the test. Exits with the command's exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _arg(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _record_writes(root: str) -> list[list[str]]:
    """[event, path relative to root] for every write-like file operation under `root`
    done from Python (C++ writers such as tensorstore are not seen: orbax's array shards)."""
    root = os.path.abspath(root)
    seen: list[list[str]] = []

    def rel(path) -> str | None:
        if not isinstance(path, (str, os.PathLike)):
            return None
        path = os.fspath(path)
        if not os.path.isabs(path):
            return None
        path = os.path.abspath(path)
        return os.path.relpath(path, root) if path == root or path.startswith(root + os.sep) else None

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else isinstance(flags, int) and bool(flags & _WRITE_FLAGS))
            paths = [path] if writes else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = list(args[:2])
        else:
            return
        for p in paths:
            r = rel(p)
            if r is not None:
                seen.append([event, r])

    sys.addaudithook(hook)
    return seen


# (mesh, shape, rows axis) of the place_batch checks; "interleaved": the fsdp=4 mesh over the
# devices in the order process 0, 1, 0, 1 (each process's rows are not one range)
PLACE_CASES = [("fsdp=4", (4, 3), 0), ("fsdp=4", (6, 3), 0), ("fsdp=4", (2, 6, 3), 1),
               ("data=2,fsdp=2", (6, 3), 0), ("data=2,fsdp=2", (2, 6, 3), 1), ("interleaved", (4, 3), 0)]


def _place_batch_checks() -> dict:
    """`place_batch` of a whole host batch (the same on every process) per PLACE_CASES: the
    spec, this process's rows of it (None: not one range), whether its devices' shards are
    the right rows, and whether the global array gathers back to the host batch exactly."""
    import jax
    import numpy as np

    from simu_jax import sharding as S

    by_process = [[d for d in jax.devices() if d.process_index == p] for p in range(jax.process_count())]
    interleaved = [d for group in zip(*by_process) for d in group]
    meshes = {"fsdp=4": S.make_mesh("fsdp=4"), "data=2,fsdp=2": S.make_mesh("data=2,fsdp=2"),
              "interleaved": S.make_mesh("fsdp=4", devices=interleaved)}
    out = {"interleaved_mesh_processes": [d.process_index for d in meshes["interleaved"].devices.flat]}
    for name, shape, axis in PLACE_CASES:
        x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
        g = S.place_batch({"x": x}, meshes[name], axis=axis)["x"]
        try:
            rows = S.process_index_slice(g.sharding, shape, axis)
            rows = [rows.start, rows.stop]
        except ValueError:
            rows = None
        spec = tuple(g.sharding.spec) + (None,) * (g.ndim - len(g.sharding.spec))
        out[f"{name} {list(shape)} axis={axis}"] = {
            "spec": [[] if e is None else [e] if isinstance(e, str) else list(e) for e in spec],
            "rows": rows, "fully_addressable": bool(g.is_fully_addressable),
            "shards_ok": all(np.array_equal(np.asarray(s.data), x[s.index]) for s in g.addressable_shards),
            "roundtrip": bool(np.array_equal(S.to_host(g), x))}
    return out


def main() -> int:
    report_path, argv = sys.argv[1], sys.argv[2:]
    writes = _record_writes(_arg(argv, "--out"))
    import jax

    # Cross-process collectives on CPU (gloo; the env var sets the same option, which is
    # also JAX's default now): set explicitly so a JAX with another default still runs them.
    jax.config.update("jax_cpu_collectives_implementation",
                      os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION", "gloo"))

    # No launcher: the CLI itself must reach jax.distributed.initialize (in run_unlearn) before
    # anything starts the XLA backend (importing simu_jax.engine does not).
    import simu_jax.unlearn as unlearn
    from simu_jax.cli import main as cli_main

    masks = []  # the digest of every mask this process attributed (the real compute_mask)
    real_compute_mask = unlearn.compute_mask

    def compute_mask(*args, **kwargs):
        mask = real_compute_mask(*args, **kwargs)
        masks.append(mask.digest())
        return mask

    unlearn.compute_mask = compute_mask

    t0 = time.time()
    code = cli_main(argv)
    seconds = time.time() - t0

    report = {"exit": code, "seconds": round(seconds, 2), "writes": list(writes), "mask_digests": masks,
              "collectives": jax.config.jax_cpu_collectives_implementation}
    if jax.distributed.is_initialized():
        from simu_jax import sharding as S

        sets = [a.split("=", 1) for a in argv if "=" in a and not a.startswith("-")]
        batch = int(dict(sets).get("batch_size", 8))
        mesh = S.make_mesh(_arg(argv, "--mesh"))
        rows = S.process_index_slice(S.batch_sharding((batch,), mesh), (batch,))  # the rows place_batch hands over
        even = S.process_slice(batch, drop_remainder=True)
        report.update(process_index=jax.process_index(), process_count=jax.process_count(),
                      device_count=jax.device_count(), local_device_count=jax.local_device_count(),
                      local_devices=[d.id for d in jax.local_devices()],
                      mesh_devices=[d.id for d in mesh.devices.flat],
                      batch_rows=[rows.start, rows.stop], process_slice=[even.start, even.stop])
        # the host <-> global array helpers (to_host, place_like) and the stop agreement (any_process)
        import numpy as np

        x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # the same on every process
        g = S.place_batch({"x": x}, mesh)["x"]
        host = S.to_host(g)
        back = S.to_host(S.place_like(host, g))
        report.update(global_batch_fully_addressable=bool(g.is_fully_addressable),
                      roundtrip_ok=bool(np.array_equal(host, x) and np.array_equal(back, x)),
                      any_process_one=S.any_process(jax.process_index() == 1), any_process_none=S.any_process(False))
        report["place_batch"] = _place_batch_checks()
        S.check_same_on_all_processes("same everywhere", "a value")  # passes
        try:
            S.check_same_on_all_processes(f"{jax.process_index()}-abc", "a value")
            report["differing_value_error"] = None
        except ValueError as e:
            report["differing_value_error"] = str(e)
    with open(report_path, "w") as f:
        json.dump(report, f)
    return code


if __name__ == "__main__":
    sys.exit(main())
