"""Issue #9 experiments on the synthetic benchmark: the method comparison at matched forgetting,
ablations, seeds, sequential unlearning, a relearning attack and MIA, all on this CPU.

    python experiments/study.py runs --out runs/study                 # every group (~1 h on 2 cores)
    python experiments/study.py runs --out runs/study --group compare  # one group
    python experiments/study.py collect --out runs/study               # -> runs/study/study.json

The target and retain-only models are the demo's (`simu-jax demo` FULL size: 2-layer LLaMA,
hidden 128, 40 people x 5 facts); they are trained here (or reused from `--out`). Every run is a
normal `simu-jax unlearn` run directory under `--out/runs/<name>` (config.yaml reproduces it)
and is reused when complete, so an interrupted study continues where it stopped.

Protocol ("matched forgetting"): every method unlearns until the teacher-forced answer NLL on
the forget set reaches the retain-only reference model's NLL on it (the level of a model that
never saw those facts), at most MAX_STEPS steps, checked after every step; utility is then
compared at the same amount of forgetting. A second table uses a fixed budget of 20 steps
(the demo's protocol) for the four GradDiff methods.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from simu_jax.models.spec import ModelSpec
from simu_jax.demo import FULL, METHOD_SETTINGS, demo_data, evaluate_model, finetune_model

MAX_STEPS = 40
# FO, SOUL-exact SO, SIMU and the Newton-type methods on SIMU's subset (issue #14)
HEADLINE = ("fo_graddiff", "so_graddiff", "simu_graddiff", "simu_newton", "simu_ggn", "simu_influence")
# every method of the comparison at matched forgetting (seed 0): the headline, the Newton-type
# steps over all parameters for comparison, and the NPO / IdK objectives
COMPARE = HEADLINE + ("so_newton", "so_ggn", "so_influence", "fo_npo", "so_npo", "simu_npo", "fo_idk", "so_idk",
                      "simu_idk")
ONLY: tuple[str, ...] | None = None  # --methods: restrict every group to these methods
SEEDS = (0, 1, 2)
BASE = "simu_graddiff"  # the method the ablations vary


def models(root: Path) -> tuple[Path, Path]:
    target = finetune_model(root / "target", "full", FULL, None, quiet=True)
    reference = finetune_model(root / "retain", "retain", FULL, str(target), quiet=True)
    return target, reference


def forget_nll(model: Path, data, cache: Path) -> float:
    """Teacher-forced answer NLL (nats/token) of ``model`` on the forget set's first
    ``eval.curve_limit`` rows, the rows the run's stop check reads (cached in ``cache``)."""
    import jax.numpy as jnp

    from simu_jax.engine import eval_losses
    from simu_jax.unlearn import UnlearnConfig, prepare

    if cache.is_file():
        return json.loads(cache.read_text())["nll"]
    cfg = UnlearnConfig(model=ModelSpec(path=str(model)), data=data)
    prep = prepare(cfg)
    forget = {a: jnp.asarray(v[: cfg.eval.curve_limit]) for a, v in prep.arrays["forget"].items()}
    nll = float(eval_losses(prep.graphdef, prep.params, forget))
    cache.write_text(json.dumps({"nll": nll}) + "\n")
    return nll


def reference_forget_nll(root: Path, reference: Path) -> float:
    """The retain-only model's forget NLL on the demo benchmark: the stop of every run."""
    return forget_nll(reference, demo_data(FULL), root / "reference_forget_nll.json")


def unlearn_config(method: str, target: Path, reference: Path | None, *, overrides=(), seed=0,
                   steps=MAX_STEPS, stop=None, mask=None):
    from simu_jax.config import load_config
    from simu_jax.unlearn import UnlearnConfig

    base = [f"{k}={v}" for k, v in METHOD_SETTINGS.get(method, {}).items()]
    cfg = load_config(UnlearnConfig, None, base + list(overrides))
    attribution = cfg.attribution if mask is None else dataclasses.replace(cfg.attribution, mask_path=str(mask))
    return dataclasses.replace(
        cfg, model=ModelSpec(path=str(target)), reference=None if reference is None else str(reference),
        data=demo_data(FULL), method=method, steps=steps, batch_size=4, seed=seed, attribution=attribution,
        eval=dataclasses.replace(cfg.eval, every=1 if stop is not None else 0, stop_forget_loss=stop,
                                 max_new_tokens=FULL.max_new_tokens, limit=FULL.eval_limit))


def run(root: Path, name: str, cfg, bench=None) -> Path:
    from simu_jax.runio import is_complete
    from simu_jax.unlearn import run_unlearn

    out = root / "runs" / name
    if not is_complete(out):
        print(f"[study] {name}", file=sys.stderr)
        run_unlearn(cfg, out, overwrite=out.exists(), quiet=True, bench=bench)
    return out


# ------------------------------------------------------------------------------------ groups


def group_compare(root, target, reference, stop):
    """Every method at matched forgetting (seed 0), plus the headline rows at a fixed budget."""
    for method in _only(COMPARE):
        mask = _base_mask(root) if method.startswith("simu") and method != BASE else None
        run(root, f"compare/{method}", unlearn_config(method, target, reference, stop=stop, mask=mask))
    # NPO and IdK at the GradDiff learning rates do not reach the stop in MAX_STEPS: escalate the
    # learning rate (x3, x10) until they do; every attempt stays in runs/compare_lr/.
    for method in _only(("fo_npo", "so_npo", "simu_npo", "fo_idk", "so_idk", "simu_idk")):
        if reached(root / "runs" / "compare" / method, stop):
            continue
        lr = float(METHOD_SETTINGS[method.replace("npo", "graddiff").replace("idk", "graddiff")]["optim.learning_rate"])
        for factor in LR_FACTORS:
            mask = _base_mask(root) if method.startswith("simu") else None
            out = run(root, f"compare_lr/{method}_x{factor}",
                      unlearn_config(method, target, reference, stop=stop, mask=mask,
                                     overrides=[f"optim.learning_rate={lr * factor:g}"]))
            if reached(out, stop):
                break
    for method in _only(HEADLINE):
        mask = _base_mask(root) if method.startswith("simu") else None
        run(root, f"fixed20/{method}", unlearn_config(method, target, reference, steps=20, mask=mask))
    evaluate_model(root / "runs" / "models" / "target", "target", target, reference, FULL)
    evaluate_model(root / "runs" / "models" / "retain", "retain-only", reference, reference, FULL)


def _only(methods):
    return tuple(m for m in methods if ONLY is None or m in ONLY)


def _base_mask(root: Path) -> Path:
    """The mask of compare/simu_graddiff (attribution is deterministic: runs that do not vary it reuse it)."""
    return root / "runs" / "compare" / BASE / "mask"


LR_FACTORS = (3, 10)


def reached(run_dir: Path, stop: float) -> bool:
    """Whether the run's forget-NLL curve reached ``stop``."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return any(r.get("eval/forget_loss", -1.0) >= stop for r in rows)


def group_seeds(root, target, reference, stop):
    """The seed changes the batch order and the curvature probes (attribution is deterministic)."""
    for seed in SEEDS[1:]:
        for method in _only(HEADLINE):
            mask = _base_mask(root) if method.startswith("simu") else None
            run(root, f"seeds/{method}_s{seed}",
                unlearn_config(method, target, reference, seed=seed, stop=stop, mask=mask))


ABLATIONS = {
    # name: overrides of simu_graddiff (the default is t=0.5, m=3, dual include, attention full, fisher)
    "t0.1": ["attribution.threshold=0.1"],
    "t0.3": ["attribution.threshold=0.3"],
    "t0.7": ["attribution.threshold=0.7"],
    "t0.9": ["attribution.threshold=0.9"],
    "m1": ["attribution.steps=1"],
    "m5": ["attribution.steps=5"],
    "dual_exclude": ["attribution.dual=exclude"],
    "attention_frozen": ["trainable.attention=frozen"],
    "attention_frozen_lr1e-2": ["trainable.attention=frozen", "optim.learning_rate=1e-2"],
    "mlp_full_attention_frozen": ["trainable.attention=frozen", "trainable.mlp=full"],
    "estimator_gnb": ["optim.estimator=gnb"],
    "estimator_hutchinson": ["optim.estimator=hutchinson"],
    "random_mask": ["attribution.method=random"],
}


def group_ablations(root, target, reference, stop):
    """t = 0.5, m = 3, dual included, attention trained, fisher: the compare/simu_graddiff run."""
    for name, overrides in ABLATIONS.items():
        same_mask = not any(o.startswith("attribution.") for o in overrides)
        run(root, f"ablations/{name}", unlearn_config(BASE, target, reference, overrides=overrides, stop=stop,
                                                      mask=_base_mask(root) if same_mask else None))


def _people_groups(bench, n_groups: int, size: int):
    """Request 1 = the benchmark's forget people; requests 2.. = disjoint groups of retain people."""
    forget_people = sorted({r["person"] for r in bench.forget})
    retain_people = sorted({r["person"] for r in bench.retain if "person" in r})
    groups = [forget_people]
    for i in range(n_groups - 1):
        groups.append(retain_people[i * size:(i + 1) * size])
    return groups


def group_sequential(root, target, reference, stop):
    """Three forget requests in a row (4 people each); the retain set = people never requested.
    No reference model exists for requests 2-3, so forget quality is not reported; utility and
    per-request forgetting are."""
    from simu_jax.data import load_benchmark

    full = load_benchmark(demo_data(FULL))
    groups = _people_groups(full, 3, len(full.forget) // 5)
    requested = {p for g in groups for p in g}
    retain = [r for r in full.retain if r.get("person") not in requested]
    for method in _only(("fo_graddiff", "so_graddiff", "simu_graddiff")):
        model = target
        for k, group in enumerate(groups, 1):
            forget = [r for r in full.forget + full.retain if r.get("person") in group]
            bench = dataclasses.replace(full, forget=forget, retain=retain, retain_eval=retain)
            out = run(root, f"sequential/{method}/request{k}",
                      unlearn_config(method, model, None, stop=stop), bench=bench)
            model = out / "model"
    (root / "runs" / "sequential" / "groups.json").write_text(json.dumps(groups, indent=1) + "\n")


def group_relearn(root, target, reference, stop, steps: int = 10, lr: float = 1e-3):
    """Relearning attack (:func:`simu_jax.evaluate.attacks.relearn`): fine-tune each unlearned
    model (matched forgetting runs) on 10% of the forget set (2 of 20 QA pairs,
    :func:`~simu_jax.evaluate.attacks.relearn_records`) with AdamW for `steps` full-batch steps,
    then measure the whole forget set (the 18 pairs never relearned show what comes back by itself)."""
    from simu_jax.data import load_benchmark
    from simu_jax.evaluate.attacks import relearn, relearn_records
    from simu_jax.runio import is_complete, mark_complete, prepare_output_dir
    from simu_jax.unlearn import evaluate_run, prepare

    full = load_benchmark(demo_data(FULL))
    attack_set = relearn_records(full.forget, max(len(full.forget) // 10, 1))  # forget[::10]: different people
    for name, model_dir in [("target", target)] + [(m, root / "runs" / "compare" / m / "model") for m in _only(HEADLINE)]:
        out = root / "runs" / "relearn" / name
        if is_complete(out):
            continue
        print(f"[study] relearn {name}", file=sys.stderr)
        cfg = unlearn_config(BASE, model_dir, reference)
        prep = prepare(cfg, dataclasses.replace(full, forget=attack_set))
        params, losses = relearn(prep.graphdef, prep.params, prep.arrays["forget"], steps=steps, learning_rate=lr)
        prepare_output_dir(out, overwrite=out.exists())
        prep.bench = full
        metrics = evaluate_run(cfg, prep, params, out)
        (out / "relearn.json").write_text(json.dumps({"attack_losses": losses, "steps": steps, "lr": lr,
                                                      "attack_questions": [r["question"] for r in attack_set],
                                                      "metrics": metrics}, indent=1) + "\n")
        mark_complete(out)


GROUPS = {"compare": group_compare, "seeds": group_seeds, "ablations": group_ablations,
          "sequential": group_sequential, "relearn": group_relearn}


# ------------------------------------------------------------------------------------ collect


def _row(run_dir: Path) -> dict:
    from simu_jax.evaluate.report import load_run

    loaded = load_run(run_dir)
    row = {"run": str(run_dir), "metrics": loaded["metrics"]}
    if (run_dir / "result.json").is_file():
        result = json.loads((run_dir / "result.json").read_text())
        row.update({k: result[k] for k in ("step", "unlearn_time_s", "trainable_parameters", "state_bytes")
                    if k in result})
    if loaded["mask"]:
        row["mask"] = loaded["mask"]
    curve = [r for r in loaded["history"] or [] if "eval/forget_loss" in r]
    if curve:
        row["final_forget_nll"], row["final_retain_nll"] = curve[-1]["eval/forget_loss"], curve[-1]["eval/retain_loss"]
        row["start_retain_nll"] = curve[0]["eval/retain_loss"]
    if (run_dir / "relearn.json").is_file():
        row["relearn"] = json.loads((run_dir / "relearn.json").read_text())
    row["diagnostics"] = diagnostics(loaded["history"] or [])
    return row


def diagnostics(history: list[dict]) -> dict:
    """How second-order a run's steps were: medians over its steps of Sophia's clip fraction and
    |update|/lr; for the Newton-type steps the fraction of steps off the gradient direction
    (cosine to -g < 0.99), the median cosine, products per step, accepted fraction, median rho."""
    import statistics

    def col(key):
        return [r[key] for r in history if key in r and r[key] == r[key]]  # drops NaN

    out = {}
    if col("sophia/clip_fraction"):
        out["clip_fraction"] = statistics.median(col("sophia/clip_fraction"))
        out["update_over_lr"] = statistics.median(col("sophia/update_over_lr_median"))
    cos = col("newton/cos_neg_grad")
    if cos:
        out.update(off_gradient=sum(c < 0.99 for c in cos) / len(cos), cos_median=statistics.median(cos),
                   products_median=statistics.median(col("newton/cg_iterations")),
                   accepted=statistics.fmean(col("newton/accepted")), rho_median=statistics.median(col("newton/rho")))
    return out


def collect(root: Path) -> dict:
    out = {"reference_forget_nll": json.loads((root / "reference_forget_nll.json").read_text())["nll"],
           "max_steps": MAX_STEPS, "runs": {}}
    for complete in sorted((root / "runs").rglob("COMPLETE")):
        name = str(complete.parent.relative_to(root / "runs"))
        out["runs"][name] = _row(complete.parent)
    if (root / "runs" / "sequential" / "groups.json").is_file():
        out["sequential_groups"] = json.loads((root / "runs" / "sequential" / "groups.json").read_text())
    if (root / "curvature.json").is_file():
        out["curvature"] = json.loads((root / "curvature.json").read_text())
    (root / "study.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("runs", "collect"))
    p.add_argument("--out", default="runs/study")
    p.add_argument("--group", nargs="*", choices=sorted(GROUPS), default=None)
    p.add_argument("--methods", nargs="*", default=None, help="restrict every group to these methods")
    args = p.parse_args(argv)
    global ONLY
    ONLY = None if args.methods is None else tuple(args.methods)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.command == "runs":
        target, reference = models(root)
        stop = reference_forget_nll(root, reference)
        print(f"[study] stop at forget NLL {stop:.3f} (the retain-only model's)", file=sys.stderr)
        for name in args.group or list(GROUPS):
            GROUPS[name](root, target, reference, stop)
    collect(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
