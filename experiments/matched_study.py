"""Issue 16: the methods at matched forgetting where the MLPs matter, over seeds that vary the
target model, with true / IG / random masks and the robustness attacks on every run.

    python experiments/matched_study.py runs --out runs/matched [--bench planted mlp] [--seeds 0 1 2]
    python experiments/matched_study.py collect --out runs/matched     # -> runs/matched/matched.json

Two benchmarks, both on the synthetic facts (40 people x 5 facts, 4 forget people = 20 rows):

* ``planted``: :mod:`simu_jax.planted` (:data:`PLANTED`): a base model trained on the retain and
  general facts (it is the retain-only reference), then the forget facts planted into 32 of 512
  neurons per layer of a 4-layer LLaMA (hidden 128, MLP 512) with everything else bit-identical.
  The seed draws the base model's initialization and data order, the planted neurons and the
  planting batches. The true mask is the planted neurons.
* ``mlp``: the synthetic benchmark's target (trained on everything) and retain-only models, with
  the same 4-layer MLP-heavy architecture (:data:`MLP_MODEL`) instead of the demo's 2-layer one;
  the seed draws both models' initialization and data order.

Protocol (as experiments/study.py): every run unlearns until the forget set's teacher-forced
answer NLL reaches the reference model's NLL on it, checked after every step, at most
:data:`MAX_STEPS` steps; a method that does not reach it is rerun at 3x, then 10x its learning
rate (Sophia / Adam) or trust radius (Newton); the ``/lr0.1`` rows start at a tenth of it. On the
planted benchmark the Newton rows of seeds 1 and 2 start at 3x (7 minutes a try here): on seed 0 the
demo's radius reached the stop in 40 steps with neither mask. Each run's final evaluation (the default ``tofu``
protocol, model utility and forget quality against the reference) is followed by INT4 (group
128), NF4 and relearning attacks (:mod:`simu_jax.evaluate.attacks`; 10 AdamW steps on 2 of the 20
forget pairs), each with its recovery towards the target. Masks: ``ig`` = SIMU's own
attribution (IG, m = 3, t = 0.5, dual include) of the target; ``true`` = the planted neurons
(``planted`` only); ``random`` = :func:`simu_jax.attribution.random_mask_like` of the IG mask
(as many neurons per layer, drawn with the run's seed). ``simu_frozen`` is SIMU-GradDiff with
attention frozen, so only the masked neurons' down_proj rows train: the test of whether the mask
itself carries the forgetting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from study import diagnostics, forget_nll, reached  # noqa: E402  (the same definitions as study.py's)

MAX_STEPS = 40
SEEDS = (0, 1, 2)
FACTORS = (1, 3, 10)
MLP_MODEL = dict(model_type="llama", num_hidden_layers=4, hidden_size=128, intermediate_size=512,
                 num_attention_heads=4, num_key_value_heads=4)
# (run name, method, mask, extra overrides); mask None = the method needs none (FO / SO)
RUNS = (
    ("fo_graddiff", "fo_graddiff", None, ()),
    ("so_graddiff", "so_graddiff", None, ()),
    ("simu_graddiff/ig", "simu_graddiff", "ig", ()),
    ("simu_graddiff/true", "simu_graddiff", "true", ()),
    ("simu_graddiff/random", "simu_graddiff", "random", ()),
    ("simu_frozen/ig", "simu_graddiff", "ig", ("trainable.attention=frozen",)),
    ("simu_frozen/true", "simu_graddiff", "true", ("trainable.attention=frozen",)),
    ("simu_frozen/random", "simu_graddiff", "random", ("trainable.attention=frozen",)),
    ("simu_newton/ig", "simu_newton", "ig", ()),
    ("simu_newton/true", "simu_newton", "true", ()),
)
EXTRA = (  # `runs --extra`
    # the Sophia methods at a tenth of the demo's learning rate (swept on the 2-layer model): at
    # the demo's rate both reach the stop within a few steps and lose most of their utility here
    ("so_graddiff/lr0.1", "so_graddiff", None, (), 0.1),
    ("simu_graddiff/ig/lr0.1", "simu_graddiff", "ig", (), 0.1),
)
ATTACKS = ("int4", "nf4", "relearn")


def planted_config(seed: int):
    from simu_jax.planted import PlantedConfig

    # 32 of 512 neurons per layer, 100 AdamW steps at 3e-2 (experiments/planted_study.py's STUDY)
    return PlantedConfig(neurons_per_layer=32, plant_steps=100, plant_learning_rate=3e-2, seed=seed)


def data_spec():
    from simu_jax.data.benchmark import DataSpec
    from simu_jax.data.synthetic import SyntheticConfig

    return DataSpec(benchmark="synthetic", max_length=128, synthetic=SyntheticConfig(seed=0, num_people=40,
                                                                                     num_general=40))


def mlp_models(root: Path, seed: int) -> tuple[Path, Path]:
    """Target (forget + retain + general) and retain-only models of the MLP-heavy architecture."""
    from simu_jax.finetune import FinetuneConfig, run_finetune
    from simu_jax.models.spec import ModelSpec
    from simu_jax.runio import is_complete

    dirs = {}
    for split, name in (("full", "target"), ("retain", "retain")):
        out = root / name
        if not is_complete(out):
            print(f"[matched] mlp seed {seed}: fine-tuning {name}", file=sys.stderr)
            cfg = FinetuneConfig(model=ModelSpec(config=dict(MLP_MODEL), seed=seed), data=data_spec(), split=split,
                                 tokenizer=None if split == "full" else str(dirs["target"]), batch_size=16,
                                 learning_rate=3e-3, epochs=30, seed=seed, checkpoint_every=10_000, eval_every=0,
                                 async_checkpoint=False)
            run_finetune(cfg, out, overwrite=out.exists(), quiet=True)
        dirs[name] = out / "model"
    return dirs["target"], dirs["retain"]


def benchmark(bench: str, root: Path, seed: int) -> dict:
    """{target, reference, data, truth (planted only)} for one benchmark and seed."""
    if bench == "planted":
        from simu_jax.planted import data_spec as planted_data_spec, make_planted

        cfg = planted_config(seed)
        info = make_planted(root, cfg, quiet=True)
        return {"target": root / "model", "reference": Path(info["base_model"]), "data": planted_data_spec(cfg),
                "truth": root / "truth", "planted": info}
    target, reference = mlp_models(root, seed)
    return {"target": target, "reference": reference, "data": data_spec(), "truth": None}


def unlearn_config(method, b, stop, seed, *, mask=None, overrides=(), factor=1):
    from simu_jax.config import load_config
    from simu_jax.demo import METHOD_SETTINGS
    from simu_jax.models.spec import ModelSpec
    from simu_jax.unlearn import UnlearnConfig

    settings = dict(METHOD_SETTINGS.get(method, {}))
    key = "optim.trust_radius" if method.endswith(("newton", "ggn")) else "optim.learning_rate"
    if factor != 1:
        settings[key] = float(settings.get(key, load_config(UnlearnConfig, None, []).optim.learning_rate)) * factor
    cfg = load_config(UnlearnConfig, None, [f"{k}={v}" for k, v in settings.items()] + list(overrides)
                      + [f"eval.attack.names=[{','.join(ATTACKS)}]"])
    attribution = cfg.attribution if mask is None else dataclasses.replace(cfg.attribution, mask_path=str(mask))
    return dataclasses.replace(
        cfg, model=ModelSpec(path=str(b["target"])), reference=str(b["reference"]), data=b["data"], method=method,
        steps=MAX_STEPS, batch_size=4, seed=seed, attribution=attribution,
        eval=dataclasses.replace(cfg.eval, every=1, stop_forget_loss=stop, max_new_tokens=24))


def mask_dir(bench_root: Path, kind: str, b: dict, seed: int) -> Path:
    """The run's mask: the IG run's own, the planted truth, or a random mask like the IG one."""
    from simu_jax.attribution import NeuronMask, random_mask_like

    ig = bench_root / "runs" / "simu_graddiff" / "ig" / "x1" / "mask"
    if kind == "ig":
        return ig
    if kind == "true":
        return b["truth"]
    out = bench_root / "random_mask"
    if not (out / "mask.npz").is_file():
        random_mask_like(NeuronMask.load(ig), seed=1000 + seed).save(out)
    return out


def run_all(bench: str, root: Path, seed: int, runs=RUNS):
    from simu_jax.runio import is_complete
    from simu_jax.unlearn import run_unlearn

    broot = root / bench / f"s{seed}"
    b = benchmark(bench, broot / "model" if bench == "planted" else broot / "models", seed)
    stop = forget_nll(b["reference"], b["data"], broot / "reference_forget_nll.json")
    print(f"[matched] {bench} seed {seed}: stop at forget NLL {stop:.3f}", file=sys.stderr)
    for name, method, mask, overrides, *base in runs:
        if mask == "true" and b["truth"] is None:
            continue
        factors = [round(f * (base[0] if base else 1), 6) for f in FACTORS]
        if bench == "planted" and method == "simu_newton" and seed > 0:
            factors = factors[1:]  # seed 0: at the demo's radius neither mask reached the stop in MAX_STEPS
        for factor in factors:
            out = broot / "runs" / name / f"x{factor}"
            # the first IG run attributes; every other IG run reuses its mask
            attributes = name == "simu_graddiff/ig" and factor == 1
            mdir = None if mask is None or attributes else mask_dir(broot, mask, b, seed)
            if not is_complete(out):
                print(f"[matched] {bench} s{seed} {name} x{factor}", file=sys.stderr)
                cfg = unlearn_config(method, b, stop, seed, mask=mdir, overrides=overrides, factor=factor)
                run_unlearn(cfg, out, overwrite=out.exists(), quiet=True)
            if reached(out, stop):
                break
    for label, model in (("target", b["target"]), ("retain", b["reference"])):
        evaluate_model(broot / "runs" / label, label, model, b)
    if bench == "planted":
        attribution(broot, seed)


def attribution(broot: Path, seed: int) -> dict:
    """Every attribution method against the planted truth, on the planted model and on the base
    model (the control: the same neurons before planting; chance is expected); cached."""
    from planted_study import attribute

    from simu_jax.attribution import NeuronMask

    cache = broot / "attribution.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    cfg = planted_config(seed)
    truth = NeuronMask.load(broot / "model" / "truth").selected
    info = json.loads((broot / "model" / "planted.json").read_text())
    out = {"planted": attribute(broot / "model" / "model", cfg, truth, seed=seed),
           "base (control)": attribute(Path(info["base_model"]), cfg, truth, seed=seed)}
    cache.write_text(json.dumps(out, indent=1) + "\n")
    return out


def evaluate_model(out: Path, label: str, model: Path, b: dict):
    from simu_jax.models.spec import ModelSpec
    from simu_jax.runio import is_complete, mark_complete, prepare_output_dir
    from simu_jax.unlearn import evaluate_run, prepare

    if is_complete(out):
        return
    cfg = unlearn_config("fo_graddiff", dict(b, target=model), None, 0)
    cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, every=0, stop_forget_loss=None,
                                                             attack=dataclasses.replace(cfg.eval.attack, names=())),
                              model=ModelSpec(path=str(model)))
    prepare_output_dir(out, overwrite=out.exists())
    prep = prepare(cfg)
    evaluate_run(dataclasses.replace(cfg, method=label), prep, prep.params, out)
    mark_complete(out)


# ------------------------------------------------------------------------------------ collect

ROW_METRICS = ("forget_rouge", "forget_prob", "forget_quality", "model_utility", "retain_rouge", "general_rouge",
               "mia_auc_loss")


def _row(run_dir: Path, truth=None) -> dict:
    from simu_jax.attribution import NeuronMask
    from simu_jax.evaluate.report import load_run

    loaded = load_run(run_dir)
    m = loaded["metrics"]
    row = {"run": str(run_dir), **{k: m.get(k) for k in ROW_METRICS}}
    result = json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").is_file() else {}
    row.update({k: result.get(k) for k in ("step", "trainable_parameters", "unlearn_time_s")})
    curve = [r for r in loaded["history"] or [] if "eval/forget_loss" in r]
    if curve:
        row["forget_nll"], row["retain_nll"] = curve[-1]["eval/forget_loss"], curve[-1]["eval/retain_loss"]
    rob = loaded["robustness"] or {}
    row["attacks"] = {name: {"forget_rouge": a["forget"].get("forget_rouge"),
                             "forget_prob": a["forget"].get("forget_prob"),
                             "recovery_rouge": (a.get("recovery") or {}).get("forget_rouge"),
                             "recovery_prob": (a.get("recovery") or {}).get("forget_prob")}
                      for name, a in (rob.get("attacks") or {}).items()}
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    mpath = (cfg.get("attribution") or {}).get("mask_path")
    mpath = mpath or (run_dir / "mask" if (run_dir / "mask" / "mask.npz").is_file() else None)
    if mpath:
        sel = NeuronMask.load(mpath).selected
        row["mask"] = {"selected": int(sel.sum())}
        if truth is not None:
            hits = int((sel & truth).sum())
            row["mask"].update(precision=hits / max(int(sel.sum()), 1), recall=hits / int(truth.sum()))
    row["diagnostics"] = diagnostics(loaded["history"] or [])
    return row


def collect(root: Path) -> dict:
    from simu_jax.attribution import NeuronMask

    out = {"max_steps": MAX_STEPS, "benchmarks": {}}
    for bdir in sorted(p for p in root.iterdir() if p.is_dir() and p.name in ("planted", "mlp")):
        bench = {}
        for sdir in sorted(bdir.glob("s*")):
            if not (sdir / "reference_forget_nll.json").is_file():
                continue  # its models are still being built
            truth_dir = sdir / "model" / "truth"
            truth = NeuronMask.load(truth_dir).selected if truth_dir.exists() else None
            stop = json.loads((sdir / "reference_forget_nll.json").read_text())["nll"]
            seed_rows = {"stop": stop, "runs": {}}
            if (sdir / "model" / "planted.json").is_file():
                p = json.loads((sdir / "model" / "planted.json").read_text())
                seed_rows["planted"] = {k: p[k] for k in ("before", "after", "seconds")}
            if (sdir / "attribution.json").is_file():
                seed_rows["attribution"] = json.loads((sdir / "attribution.json").read_text())
            for name, *_ in RUNS + EXTRA + (("target",), ("retain",)):
                base = sdir / "runs" / name
                tries = sorted((d for d in base.glob("x*") if (d / "COMPLETE").is_file()),
                               key=lambda d: float(d.name[1:])) if name not in ("target", "retain") else (
                    [base] if (base / "COMPLETE").is_file() else [])
                if not tries:
                    continue
                row = _row(tries[-1], truth)
                row["factor"] = float(tries[-1].name[1:]) if name not in ("target", "retain") else None
                if name not in ("target", "retain"):
                    row["reached"] = reached(tries[-1], stop)
                seed_rows["runs"][name] = row
            bench[sdir.name] = seed_rows
        out["benchmarks"][bdir.name] = bench
    out["summary"] = summarize(out)
    (root / "matched.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def summarize(data: dict) -> dict:
    """Mean and std over seeds of every row metric (and attack recovery) per benchmark and run."""
    summary = {}
    for bench, seeds in data["benchmarks"].items():
        rows = {}
        for seed_rows in seeds.values():
            for name, row in seed_rows["runs"].items():
                flat = {k: row.get(k) for k in ROW_METRICS + ("step", "forget_nll")}
                flat["reached"] = float(row["reached"]) if "reached" in row else None
                for a, v in row.get("attacks", {}).items():
                    for k in ("forget_rouge", "recovery_rouge", "recovery_prob"):
                        flat[f"{a}/{k}"] = v.get(k)
                if "mask" in row:
                    for k, v in row["mask"].items():
                        flat[f"mask/{k}"] = v
                rows.setdefault(name, []).append(flat)
        summary[bench] = {}
        for name, seq in rows.items():
            keys = {k for r in seq for k in r}
            stats = {}
            for k in sorted(keys):
                vals = [r[k] for r in seq if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
                if vals:
                    stats[k] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                                "n": len(vals)}
            summary[bench][name] = stats
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("runs", "attribution", "collect"))
    p.add_argument("--out", default="runs/matched")
    p.add_argument("--bench", nargs="*", choices=("planted", "mlp"), default=["planted", "mlp"])
    p.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    p.add_argument("--extra", action="store_true", help="only the EXTRA rows (Sophia at a tenth of the rate)")
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.command == "runs":
        for seed in args.seeds:
            for bench in args.bench:
                run_all(bench, root, seed, EXTRA if args.extra else RUNS)
    elif args.command == "attribution":
        for seed in args.seeds:
            attribution(root / "planted" / f"s{seed}", seed)
    collect(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
