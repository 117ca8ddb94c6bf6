"""Issue #9, the curvature claim: does confining the update to fewer neurons make Sophia's diagonal
curvature a better model of the exact Hessian?

    python experiments/curvature_study.py --out runs/study     # after `study.py runs` made the models
    python experiments/curvature_study.py --out runs/curvature \
        --model runs/matched/mlp/s0/models/target/model --sizes 2 8 32 128 512   # docs/results.md §5

On a synthetic target model (default: study.py's, the demo's 2-layer LLaMA with 2 x 256 MLP
neurons; docs/results.md uses matched_study.py's 4-layer MLP-heavy one, 4 x 512), for the GradDiff
loss on one fixed batch (all 20 forget + 20 retain QA pairs) and for nested neuron subsets S (the
top-k neurons per layer by forget integrated-gradient score, k = 2, 8, 32, 128, 256 = all), with the
trainable coordinates = the down_proj rows of S (128 per neuron; attention excluded so that S alone
changes):

* exact Hessian rows H[i, S] for 32 coordinates i sampled uniformly in S (one exact HVP each);
* the relative error of each diagonal estimate at those coordinates against the exact H_ii:
  Hutchinson restricted to S (1 probe, as Sophia-H uses per refresh, and 16 probes), fisher (g*g,
  SOUL) and GNB (Sophia-G); fisher and GNB estimate other matrices (they are >= 0 while H_ii of
  GradDiff is often negative), so they are also scored scale-free (best positive scale) and by
  Spearman rank correlation and sign agreement;
* how diagonal H_S is: the fraction of each sampled row's squared mass on the diagonal;
* the exact Newton direction (H_S + lambda I)^-1 g (CG; lambda shifts the spectrum to be positive
  definite, from Lanczos) against Sophia's first step with each estimator and against g.

Writes `<out>/curvature.json` (read by study.py collect and make_results_md.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (2, 8, 32, 128, 256)
SAMPLES = 32
EXAMPLES = 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--model", help="the target model (default: <out>/target/model, study.py's); e.g. "
                                   "matched_study.py's MLP-heavy target with --sizes 2 8 32 128 512")
    args = p.parse_args(argv)
    root = Path(args.out)

    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree
    from scipy.stats import spearmanr

    from simu_jax import curvature as C
    from simu_jax import optim
    from simu_jax.attribution import neuron_scores
    from simu_jax.config import load_config
    from simu_jax.models.spec import ModelSpec
    from simu_jax.demo import FULL, demo_data
    from simu_jax.losses import unlearning_loss
    from simu_jax.models import apply
    from simu_jax.selection import Partition, TrainableSpec
    from simu_jax.optim import OptimSpec
    from simu_jax.unlearn import UnlearnConfig, prepare

    cfg = dataclasses.replace(load_config(UnlearnConfig, None, []), model=ModelSpec(path=args.model or str(root / "target" / "model")),
                              data=demo_data(FULL))
    prep = prepare(cfg)
    graphdef, params = prep.graphdef, prep.params
    batch = {k: {a: jnp.asarray(v[:EXAMPLES]) for a, v in prep.arrays[k].items()} for k in ("forget", "retain")}
    scores = neuron_scores(graphdef, params, [batch["forget"]], method="ig", steps=3)  # [L, I]
    order = np.argsort(-scores, axis=1)
    spec = TrainableSpec(attention="frozen", mlp="masked", rest="frozen")
    o = OptimSpec()
    results = []
    for k in args.sizes:
        t0 = time.time()
        selected = np.zeros_like(scores, bool)
        np.put_along_axis(selected, order[:, :k], True, axis=1)
        part = Partition(params, spec, selected)
        trainable, frozen = part.split(params)
        rows = part.rows

        def combined(tr):
            return part.combine(tr, frozen, rows)

        def loss(tr):
            full, kw = combined(tr)
            value, _ = unlearning_loss("graddiff", lambda b: apply(graphdef, full, b["input_ids"], b["attention_mask"],
                                                                  **kw), batch)
            return value

        def logits(tr):  # Sophia-G's curvature: the model's own output distribution on the answer tokens
            full, kw = combined(tr)
            z = [apply(graphdef, full, b["input_ids"], b["attention_mask"], **kw)[:, :-1] for b in batch.values()]
            w = [(b["labels"][:, 1:] != -100).astype(jnp.float32) for b in batch.values()]
            return jnp.concatenate(z), jnp.concatenate(w)

        flat, unravel = ravel_pytree(trainable)
        n = flat.shape[0]
        idx = np.sort(np.random.default_rng(k).choice(n, size=min(SAMPLES, n), replace=False))
        hrows = np.asarray(jax.jit(lambda tr: C.hessian_rows(loss, tr, idx, (), 8)[0])(trainable))
        exact = hrows[np.arange(len(idx)), idx]
        diag_mass = exact ** 2 / np.maximum((hrows ** 2).sum(axis=1), 1e-30)

        grads = jax.jit(jax.grad(loss))(trainable)
        key = jax.random.key(k)
        est = {
            "hutchinson_1": jax.jit(lambda tr: C.hutchinson_diagonal(loss, tr, key, 1))(trainable),
            "hutchinson_16": jax.jit(lambda tr: C.hutchinson_diagonal(loss, tr, key, 16))(trainable),
            "fisher": C.fisher_diagonal(grads),
            "gnb": jax.jit(lambda tr: C.gnb_diagonal(lambda p: logits(p)[0], tr, key, logits(tr)[1]))(trainable),
        }
        errors = {}
        for name, h in est.items():
            h_at = np.asarray(ravel_pytree(h)[0])[idx]
            scale = max(float(h_at @ exact) / max(float(h_at @ h_at), 1e-30), 0.0)
            errors[name] = {
                "rel_error": float(np.linalg.norm(h_at - exact) / np.linalg.norm(exact)),
                "rel_error_best_scale": float(np.linalg.norm(scale * h_at - exact) / np.linalg.norm(exact)),
                "spearman": float(spearmanr(h_at, exact).statistic),
                "sign_agreement": float(np.mean(np.sign(h_at) == np.sign(exact))),
            }

        # Newton direction on S: (H_S + lambda I) d = g, lambda from the Lanczos spectrum bounds
        matvec = jax.jit(lambda v: C.hvp(loss, trainable, v))
        v0 = unravel(jax.random.normal(jax.random.key(1), (n,), flat.dtype))
        lz = C.lanczos(matvec, v0, min(30, n))
        lam_min, lam_max = float(lz.min_eigenvalue), float(lz.max_eigenvalue)
        damping = max(0.0, -lam_min) + 1e-2 * abs(lam_max)
        newton, info = jax.jit(lambda g: C.conjugate_gradient(matvec, g, damping=damping, tol=1e-4, maxiter=200))(grads)
        d_newton = np.asarray(ravel_pytree(newton)[0])
        g_flat = np.asarray(ravel_pytree(grads)[0])

        def cos(a, b):
            return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))

        directions = {"gradient": cos(d_newton, g_flat)}
        for name in ("fisher", "gnb", "hutchinson_1"):
            # each estimator at its own scale (docs/method.md#curvature-estimators): 5120 for fisher only
            tx = optim.sophia(1.0, b1=o.b1, b2=o.b2, rho=o.rho, batch_scale=optim.ESTIMATOR_BATCH_SCALE[name.split('_')[0]],
                              clip_threshold=o.clip_threshold)
            update, _ = tx.update(grads, tx.init(trainable), trainable, hessian_estimate=est[name])
            directions[f"sophia_{name}"] = cos(d_newton, -np.asarray(ravel_pytree(update)[0]))
        row = {
            "neurons_per_layer": k, "neurons": int(selected.sum()), "fraction": float(selected.mean()),
            "coordinates": int(n), "samples": len(idx),
            "exact_diag_median_abs": float(np.median(np.abs(exact))),
            "exact_diag_negative_fraction": float(np.mean(exact < 0)),
            "diag_mass_median": float(np.median(diag_mass)),
            "estimators": errors,
            "lanczos": {"min": lam_min, "max": lam_max}, "damping": damping,
            "cg": {"iterations": int(info.iterations), "converged": bool(info.converged),
                   "negative_curvature": bool(info.negative_curvature)},
            "newton_cosine": directions, "seconds": round(time.time() - t0, 1),
        }
        results.append(row)
        print(f"[curvature] k={k}: diag mass {row['diag_mass_median']:.3g}, hutchinson_1 rel err "
              f"{errors['hutchinson_1']['rel_error']:.3g}, cos(newton, sophia-fisher) "
              f"{directions['sophia_fisher']:.3f} [{row['seconds']} s]", file=sys.stderr)
    out = {"model": cfg.model.path, "batch": f"{EXAMPLES} forget + {EXAMPLES} retain QA pairs", "loss": "graddiff (gamma=1)",
           "ranking": "forget IG score (m=3), top-k per layer", "trainable": "down_proj rows of the selected neurons",
           "sophia": {"rho": o.rho, "batch_scale": dict(optim.ESTIMATOR_BATCH_SCALE), "b1": o.b1, "b2": o.b2}, "sizes": results}
    (root / "curvature.json").write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
