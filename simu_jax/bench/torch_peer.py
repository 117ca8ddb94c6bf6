#!/usr/bin/env python
"""The PyTorch peer of `simu-jax bench`: the SO-GradDiff step as users run it today.

Run by the bench in its own process (``simu_jax.bench.peer.PeerServer``: this file, by its
path inside the package), or by hand: ``python -m simu_jax.bench.torch_peer --json out.json
--model DIR --batch batch.npz --threads N``. Needs torch (not a dependency of simu-jax:
``pip install torch==2.13.0`` or ``'simu-jax[test]'``) and transformers; it imports nothing
from simu_jax.

transformers ``LlamaForCausalLM`` (eager attention, float32) loaded from the HF directory
that ``simu_jax.models.convert.save_pretrained`` wrote (so the weights are the JAX ones), the
same forget / retain batch, and:

* ``so_step``: SOUL's loop (OPTML-Group/SOUL: HF Trainer + ``SophiaG``): zero grads, GradDiff
  loss ``-NLL(forget) + gamma * NLL(retain)`` (HF's own causal-LM loss), ``backward()``,
  ``update_hessian()`` with the squared gradient (every step), ``step(bs=5120)``. SophiaG is
  re-implemented below after ``Liuhong99/Sophia/sophia.py`` (single-tensor path: one
  ``param.mul_(1 - lr*wd)``, EMA of the gradient, ``ratio = (|m| / (rho*bs*h + 1e-15))
  .clamp(max=1)``, ``param -= lr * sign(m) * ratio``).
* ``sophia_h_step``: Sophia-H: the gradient with ``create_graph=True``, one Rademacher probe,
  the HVP by double backward (``autograd.grad(grads, params, grad_outputs=u)``), ``h_hat =
  u * Hu``, then the same Sophia update (denominator ``max(rho*bs*h, 1e-15)``, as Hutchinson
  estimates can be negative).
* ``forward`` (no grad), ``grad`` (forward + backward) and ``hvp`` (grad with graph + double
  backward) alone, and a phase breakdown of the SO step (forward / backward / optimizer).

Threads: ``torch.set_num_threads(--threads)`` (the bench passes the size of XLA's CPU pool).
Batch mode: all times are medians of ``--repeats`` runs after ``--warmup`` runs, written to
``--json``. ``--serve``: one call per stdin line, its time on stdout, so that ``simu-jax bench``
can alternate JAX and PyTorch runs (both then see the same machine load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

try:
    import torch
except ImportError:
    if __name__ != "__main__":
        raise
    # run as the peer: one line, no traceback (the bench shows it as the peer's error)
    sys.exit("torch_peer: torch is not installed (pip install torch==2.13.0, or pip install 'simu-jax[test]')")


class SophiaG(torch.optim.Optimizer):
    """SophiaG (Liu et al. 2023), the reference ``sophia.py`` update, single-tensor path."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1, floor=False):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay))
        self.floor = floor  # Sophia-H: max(rho*bs*h, eps) instead of rho*bs*h + eps

    def _state(self, p):
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, estimates=None):
        """h <- b2 h + (1 - b2) h_hat, with h_hat = grad * grad (SOUL) or the given estimates."""
        i = 0
        for group in self.param_groups:
            _, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                hess = self._state(p)["hessian"]
                if estimates is None:
                    hess.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                else:
                    hess.mul_(beta2).add_(estimates[i], alpha=1 - beta2)
                i += 1

    @torch.no_grad()
    def step(self, closure=None, bs=5120):
        for group in self.param_groups:
            beta1, _ = group["betas"]
            lr, rho, wd = group["lr"], group["rho"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                exp_avg, hess = state["exp_avg"], state["hessian"]
                state["step"] += 1
                p.mul_(1 - lr * wd)
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                if self.floor:
                    denom = (rho * bs * hess).clamp(min=1e-15)
                else:
                    denom = rho * bs * hess + 1e-15
                ratio = (exp_avg.abs() / denom).clamp(None, 1)
                p.addcmul_(exp_avg.sign(), ratio, value=-lr)


def timed(fn, repeats: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs_s": runs,
            "first_call_s": first, "first_out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF directory (config.json + safetensors)")
    ap.add_argument("--batch", required=True, help="npz with forget__/retain__ input_ids, attention_mask, labels")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--gamma", type=float, default=1.0)
    ap.add_argument("--b1", type=float, default=0.9)
    ap.add_argument("--b2", type=float, default=0.95)
    ap.add_argument("--rho", type=float, default=0.04)
    ap.add_argument("--bs", type=float, default=5120.0)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--json", default=None, help="write the timings here (batch mode)")
    ap.add_argument("--serve", action="store_true",
                    help="line protocol on stdin/stdout instead: run one named call per line (see serve())")
    args = ap.parse_args(argv)
    if not args.serve and not args.json:
        ap.error("give --json (batch mode) or --serve")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=torch.float32)
    model.train()  # no dropout in LLaMA configs (attention_dropout 0): as SOUL's Trainer runs it
    data = np.load(args.batch)
    batch = {part: {k: torch.from_numpy(data[f"{part}__{k}"].astype(np.int64))
                    for k in ("input_ids", "attention_mask", "labels")} for part in ("forget", "retain")}
    params = [p for p in model.parameters() if p.requires_grad]

    def nll(part):
        b = batch[part]
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                     use_cache=False).loss

    def graddiff():
        return -nll("forget") + args.gamma * nll("retain")

    opt = SophiaG(params, lr=args.lr, betas=(args.b1, args.b2), rho=args.rho, weight_decay=args.weight_decay)
    opt_h = SophiaG(params, lr=args.lr, betas=(args.b1, args.b2), rho=args.rho, weight_decay=args.weight_decay,
                    floor=True)
    phases: dict[str, list[float]] = {"forward_s": [], "backward_s": [], "optimizer_s": []}

    def so_step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = graddiff()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.update_hessian()  # SOUL: g*g of the unlearning loss, every step
        opt.step(bs=args.bs)
        t3 = time.perf_counter()
        for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k].append(v)
        return float(loss.detach())

    def rademacher(p):
        return torch.randint(0, 2, p.shape, dtype=p.dtype) * 2 - 1

    def sophia_h_step():
        opt_h.zero_grad(set_to_none=True)
        loss = graddiff()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        us = [rademacher(p) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=us)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g.detach()
            opt_h.update_hessian([u * hv for u, hv in zip(us, hvs)])
            opt_h.step(bs=args.bs)
        return float(loss.detach())

    def forward_only():
        with torch.no_grad():
            return float(graddiff())

    def grad_only():
        loss = graddiff()
        return torch.autograd.grad(loss, params)

    vs = [torch.randn_like(p) for p in params]

    def hvp_only():
        loss = graddiff()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(grads, params, grad_outputs=vs)

    machine = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
               "torch_interop_threads": torch.get_num_interop_threads(),
               "mkldnn": bool(torch.backends.mkldnn.is_available()), "python": platform.python_version(),
               "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # the host allocator it started with
    def profile_so_step():
        """torch.profiler over 3 SO steps: self CPU time per op (ms per step), for the bench's profile."""
        from torch.profiler import ProfilerActivity, profile

        so_step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                so_step()
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        return {"self_cpu_ms_per_step": {e.key: e.self_cpu_time_total / 3e3 for e in ops[:15]},
                "total_self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in ops) / 3e3}

    calls = {"so_step": so_step, "sophia_h_step": sophia_h_step, "forward": forward_only, "grad": grad_only,
             "hvp": hvp_only, "profile_so_step": profile_so_step}
    if args.serve:
        return serve(calls, phases, machine, model_info={"num_params": int(sum(p.numel() for p in params))})

    out = {"machine": machine, "model": "transformers LlamaForCausalLM, attn_implementation=eager, float32",
           "num_params": int(sum(p.numel() for p in params))}
    # The SO step runs first so its first loss is at the shared initial weights.
    so = timed(so_step, args.repeats, args.warmup)
    so["first_loss"] = so.pop("first_out")
    # phases of the timed runs only (drop the first call and warm-up)
    skip = 1 + args.warmup
    so["phases"] = {k: statistics.median(v[skip:]) for k, v in phases.items()}
    out["so_step"] = so
    sh = timed(sophia_h_step, args.repeats, args.warmup)
    sh["first_loss"] = sh.pop("first_out")
    out["sophia_h_step"] = sh
    for name, fn in (("forward", forward_only), ("grad", grad_only), ("hvp", hvp_only)):
        t = timed(fn, args.repeats, args.warmup)
        t.pop("first_out")
        out[name] = t
    out["hvp_over_grad"] = out["hvp"]["median_s"] / out["grad"]["median_s"]
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    return 0


def serve(calls: dict, phases: dict, machine: dict, model_info: dict) -> int:
    """Line protocol on stdin/stdout, so a caller can interleave our calls with its own.

    Prints ``READY <json>`` once; then, per input line ``<name>`` (a key of ``calls``), runs it
    once and prints ``<json>`` with its wall seconds (``s``), its output (``out``, a loss or
    null) and, for ``so_step``, the phase times of that call; ``quit`` ends.
    """
    print("READY " + json.dumps({"machine": machine, **model_info}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name in ("", "quit"):
            break
        if name not in calls:
            print(json.dumps({"error": f"unknown call {name!r}"}), flush=True)
            continue
        t0 = time.perf_counter()
        out = calls[name]()
        dt = time.perf_counter() - t0
        reply = {"name": name, "s": dt, "out": out if isinstance(out, (float, dict)) else None}
        if name == "so_step":
            reply["phases"] = {k: v[-1] for k, v in phases.items()}
        print(json.dumps(reply), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
