"""`simu-jax bench [--quick] [--json FILE] [--repeats N] [--quiet] [--profile-only]`."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from simu_jax.base import EXIT_ERROR, ArgumentParser
from simu_jax.bench.peer import torch_missing
from simu_jax.bench.profiles import FULL, QUICK, QUICK_XLA_FLAGS, SUMMARY_KEYS
from simu_jax.bench.profiling import PROFILE_XLA_FLAGS, profile_run
from simu_jax.bench.runner import run
from simu_jax.host_memory import configure_host_allocator

__all__ = ["cli_main"]


def _parser() -> ArgumentParser:
    ap = ArgumentParser(prog="simu-jax bench",
                        description="Benchmarks: second-order cost, masked steps, JAX vs PyTorch, compile time, "
                                    "sharded checkpoints and FSDP memory on 8 simulated devices.")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, 2 repeats (< 3 min; run by the tests)")
    ap.add_argument("--json", type=Path, default=None, help="write the full results here")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per figure (the median is reported)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--profile-only", action="store_true",
                    help="no timing run: profile the step config of the existing --json result (jax.profiler op "
                         "kinds of the gradient, HVP, SO, Sophia-H and SIMU steps and IG attribution; torch.profiler of "
                         "the peer's SO step) and "
                         "add it there as `profile_run` (run it in a fresh process: it turns on XLA's per-op trace events)")
    return ap


def cli_main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if not _backend_initialized():  # steady-state steps: XLA's temp buffers kept (simu_jax.host_memory)
        configure_host_allocator(default="keep")
    profile = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            ap.error("--repeats must be >= 1")
        profile = dataclasses.replace(profile, repeats=args.repeats)
    log = (lambda *a, **k: None) if args.quiet else functools.partial(print, file=sys.stderr, flush=True)
    if args.profile_only and (args.json is None or not args.json.is_file()):
        ap.error("--profile-only needs --json FILE, an existing result of `simu-jax bench`")
    missing = torch_missing()
    if missing:  # before any work: every run (and --profile-only) drives the torch peer
        print(f"simu-jax bench: error: {missing}", file=sys.stderr)
        return EXIT_ERROR
    if args.profile_only:
        if not _backend_initialized():
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {PROFILE_XLA_FLAGS}".strip()
        result = json.loads(args.json.read_text())
        log(f"profiling the step config of {args.json}")
        result["profile_run"] = profile_run(result, log)
        _write_json(args.json, result)
        return 0
    if args.quick and not _backend_initialized():
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
    result = run(profile, log)
    if args.json is not None:
        _write_json(args.json, result)
    print(json.dumps({"headline": {k: result[k] for k in SUMMARY_KEYS},
                      "targets_met": {k: v["met"] for k, v in result["targets"].items()},
                      "wall_s": round(result["wall_s"], 1)}, indent=2))
    return 0


def _write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
    tmp.replace(path)


def _backend_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # noqa: BLE001 - private API: assume initialized (flags left alone)
        return True


def _json_default(o):
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o)}")
