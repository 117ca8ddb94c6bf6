"""The PyTorch peer, driven from the bench: `torch_peer.py --serve` (in this package) in a subprocess.

The peer runs in its own process (torch is never imported here) on the weights the JAX side
wrote (``models.convert.save_pretrained``) and the same batch; ``PeerServer.call(name)`` runs
one of its calls and returns the seconds the peer measured, so the bench can alternate JAX and
PyTorch runs of the same work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from simu_jax.bench.profiles import Profile, step_settings

__all__ = ["DEFAULT_ENV_CALLS", "PEER_CALLS", "PeerServer", "find_peer_script", "torch_missing"]

PEER_CALLS = (  # torch peer call -> the JAX program doing the same work (same config and batch)
    ("so_step", "steps/so_graddiff"),
    ("sophia_h_step", "steps/so_graddiff_hutchinson"),
    ("forward", "second_order/{step}/forward"),
    ("grad", "second_order/{step}/grad"),
    ("hvp", "second_order/{step}/hvp"),
)
# the calls also run on a second peer with torch's default OpenMP environment, in the same turns:
# the headline JAX / PyTorch ratios compare against the faster of the two settings
DEFAULT_ENV_CALLS = ("so_step", "grad")


def find_peer_script() -> Path:
    """The peer's source file, shipped inside this package (also runnable as
    ``python -m simu_jax.bench.torch_peer``)."""
    path = Path(__file__).resolve().with_name("torch_peer.py")
    if not path.is_file():
        raise FileNotFoundError(f"the torch peer is missing from this installation: {path}")
    return path


def torch_missing() -> str | None:
    """Why the peer cannot run in this environment (one line), or None if it can.

    Looks the packages up without importing them (torch stays out of the bench's process).
    """
    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"the PyTorch peer of `simu-jax bench` needs {' and '.join(missing)}, not installed here "
            f"(pip install torch==2.13.0, or pip install 'simu-jax[test]')")


class PeerServer:
    """torch_peer.py --serve in a subprocess, on the step config's weights (HF dir) and batch.

    `call(name)` runs one of the peer's calls (so_step, sophia_h_step, forward, grad, hvp) and
    returns the seconds the peer measured around it, so the bench can alternate JAX and PyTorch
    runs of the same work.
    """

    def __init__(self, p: Profile, model, batch: dict, threads: int, omp_wait_policy: str | None = "PASSIVE",
                 host_allocator: str = "system"):
        from simu_jax.models.convert import save_pretrained

        s = step_settings(p)
        self._tmp = tempfile.TemporaryDirectory(prefix="simu-bench-")
        tmp = Path(self._tmp.name)
        save_pretrained(model, tmp / "model")
        np.savez(tmp / "batch.npz", **{f"{part}__{k}": np.asarray(v) for part, d in batch.items()
                                        for k, v in d.items()})
        # -P: the script's own directory (this package) is not put on sys.path, so its module
        # names never shadow anything torch or transformers import.
        self.cmd = [sys.executable, "-P", str(find_peer_script()), "--serve", "--model", str(tmp / "model"),
                    "--batch", str(tmp / "batch.npz"), "--threads", str(threads), "--lr", str(s.optim.learning_rate),
                    "--gamma", str(s.loss.gamma), "--b1", str(s.optim.b1), "--b2", str(s.optim.b2), "--rho", str(s.optim.rho), "--bs",
                    str(s.optim.batch_scale), "--weight-decay", str(s.optim.weight_decay)]
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        # PASSIVE: idle OpenMP threads sleep instead of spinning. On a shared machine the
        # spinning threads of torch's default policy fight the other processes and the step
        # gets several times slower; on an idle one the default can be faster (the bench runs
        # both: DEFAULT_ENV_CALLS).
        if omp_wait_policy:
            self.env["OMP_WAIT_POLICY"] = omp_wait_policy
        else:
            self.env.pop("OMP_WAIT_POLICY", None)
        self.omp_wait_policy = omp_wait_policy or "default"
        # "keep": the host allocator settings the JAX side runs with (simu_jax.host_memory), through
        # glibc's tunables at the peer's start; "system": glibc's defaults
        self.env.pop("GLIBC_TUNABLES", None)
        if host_allocator == "keep":
            from simu_jax.host_memory import glibc_tunables

            self.env["GLIBC_TUNABLES"] = glibc_tunables()
        self.host_allocator = host_allocator
        self.proc = None
        self.info: dict[str, Any] | None = None

    def start(self) -> "PeerServer":
        if self.proc is None:
            self._err = open(Path(self._tmp.name) / "stderr.txt", "w+")
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                         text=True, env=self.env, bufsize=1)
        return self

    def _line(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self._err.seek(0)
            raise RuntimeError(f"torch peer exited ({self.proc.poll()}):\n{self._err.read()[-4000:]}")
        return line

    def ready(self) -> dict[str, Any]:
        self.start()
        while self.info is None:
            line = self._line()
            if line.startswith("READY "):
                self.info = json.loads(line[6:])
                self.info["machine"]["omp_wait_policy"] = self.omp_wait_policy
                self.info["machine"]["host_allocator"] = self.host_allocator
        return self.info

    def call(self, name: str) -> dict[str, Any]:
        self.ready()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        while True:
            line = self._line()
            if line.startswith("{"):
                reply = json.loads(line)
                if "error" in reply:
                    raise RuntimeError(f"torch peer: {reply['error']}")
                return reply

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self._err.close()
        self._tmp.cleanup()
