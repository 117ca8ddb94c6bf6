"""Issue #9 on real data: TOFU forget10 with a small LLaMA and LUME with a small OLMo, trained from
scratch on this CPU, then FO / SO / SIMU GradDiff and SIMU-Newton at matched forgetting.

    python experiments/real.py run --benchmark tofu --out runs/real      # general, target, retain, methods
    python experiments/real.py run --benchmark lume --out runs/real
    python experiments/real.py report --out runs/real                    # -> runs/real/real.json

The models come from experiments/<benchmark>/{target,retain}.yaml (the retain-only model uses the
target's tokenizer). Where experiments/<benchmark>/general.yaml exists (TOFU, issue 16) a
general-knowledge model is trained from scratch first (``split: general``: TOFU's real_authors +
world_facts QA, with the BPE tokenizer trained on all TOFU texts), and the target and the
retain-only model are both fine-tuned from it, with the general set replayed
(``include_general: true``), so TOFU's model utility has something to measure. Those two sets
are also TOFU's real-authors / world-facts evaluation sets: here they measure whether the
general knowledge the model was taught is *retained* through fine-tuning and unlearning, not
whether the model generalizes to facts it never saw (a pretrained model's case).

Unlearning stops when the forget answer NLL (first 32 forget examples)
reaches the retain-only model's NLL there (at most MAX_STEPS steps, batch 8 + 8), as in
experiments/study.py. Evaluation is capped at EVAL_LIMIT records per set (TOFU's official
evaluation uses the first 300 of each set; this CPU cannot generate that much per run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from study import forget_nll  # noqa: E402  (the stop's level, as study.py and matched_study.py compute it)

MAX_STEPS = 60
EVAL_LIMIT = 100
ATTRIBUTION_EXAMPLES = {"tofu": None, "lume": 256}
METHODS = ("fo_graddiff", "so_graddiff", "simu_graddiff", "simu_newton", "simu_ggn", "simu_influence")


def finetune(bench: str, split: str, out: Path, overrides=()) -> Path:
    from simu_jax.config import load_config
    from simu_jax.finetune import FinetuneConfig, run_finetune
    from simu_jax.runio import is_complete

    if not is_complete(out):
        cfg = load_config(FinetuneConfig, HERE / bench / f"{split}.yaml", list(overrides))
        print(f"[real] fine-tuning {bench} {split}", file=sys.stderr)
        run_finetune(cfg, out, overwrite=out.exists(), quiet=True)
    return out / "model"


def _data(bench: str):
    from simu_jax.config import load_config
    from simu_jax.finetune import FinetuneConfig

    return load_config(FinetuneConfig, HERE / bench / "target.yaml").data


def unlearn_config(bench, method, target, reference, stop):
    from simu_jax.config import load_config
    from simu_jax.models.spec import ModelSpec
    from simu_jax.demo import METHOD_SETTINGS
    from simu_jax.unlearn import UnlearnConfig

    overrides = [f"{k}={v}" for k, v in METHOD_SETTINGS.get(method, {}).items()]
    cfg = load_config(UnlearnConfig, None, overrides)
    # attribution on the first ATTRIBUTION_EXAMPLES forget / retain rows (IG over all 5,464 LUME rows
    # takes longer than this CPU session had)
    attribution = dataclasses.replace(cfg.attribution, max_examples=ATTRIBUTION_EXAMPLES[bench])
    return dataclasses.replace(
        cfg, model=ModelSpec(path=str(target)), reference=None if reference is None else str(reference),
        data=_data(bench), method=method, steps=MAX_STEPS, batch_size=8, attribution=attribution,
        eval=dataclasses.replace(cfg.eval, every=1, stop_forget_loss=stop, limit=EVAL_LIMIT, max_new_tokens=32))


def evaluate_model(bench: str, label: str, model: Path, reference: Path | None, out: Path):
    from simu_jax.runio import is_complete, mark_complete, prepare_output_dir
    from simu_jax.unlearn import evaluate_run, prepare

    if is_complete(out):
        return
    cfg = unlearn_config(bench, "fo_graddiff", model, reference, None)
    prepare_output_dir(out, overwrite=out.exists())
    prep = prepare(cfg)
    evaluate_run(dataclasses.replace(cfg, method=label), prep, prep.params, out)
    mark_complete(out)


def run(bench: str, root: Path, methods=METHODS):
    from simu_jax.runio import is_complete
    from simu_jax.unlearn import run_unlearn

    base = root / bench
    start, general = [], None  # where the target and the retain-only model start from (default: their yaml's)
    if (HERE / bench / "general.yaml").is_file():
        general = finetune(bench, "general", base / "general")
        start = [f"model.path={general}"]  # its tokenizer comes along
    target = finetune(bench, "target", base / "target", start)
    reference = finetune(bench, "retain", base / "retain", start or [f"tokenizer={target}"])
    stop = forget_nll(reference, _data(bench), base / "reference_forget_nll.json")
    print(f"[real] {bench}: stop at forget NLL {stop:.3f}", file=sys.stderr)
    ref_for_eval = reference if bench == "tofu" else None  # LUME has no forget quality
    evaluate_model(bench, "target", target, ref_for_eval, base / "runs" / "target")
    evaluate_model(bench, "retain-only", reference, ref_for_eval, base / "runs" / "retain")
    mask = None
    for method in methods:
        out = base / "runs" / method
        if is_complete(out):
            continue
        print(f"[real] {bench} {method}", file=sys.stderr)
        cfg = unlearn_config(bench, method, target, ref_for_eval, stop)
        if method.startswith("simu") and mask is not None:
            cfg = dataclasses.replace(cfg, attribution=dataclasses.replace(cfg.attribution, mask_path=str(mask)))
        run_unlearn(cfg, out, overwrite=out.exists(), quiet=True)
        if method == "simu_graddiff":
            mask = out / "mask"
    if general is not None:  # the starting point, for comparison: knows the general set, not TOFU
        evaluate_model(bench, "general", general, ref_for_eval, base / "runs" / "general")


# TOFU model utility = harmonic mean of these nine (simu_jax.evaluate.metrics.model_utility): the report
# prints them, since they tell whether a utility is real (one near-zero entry drags the mean to zero)
UTILITY_PARTS = [(f"{s}_{m}", f"{name} {label}") for s, name in (("retain", "retain"), ("real_authors", "RA"),
                                                                  ("world_facts", "WF"))
                 for m, label in (("rouge", "ROUGE-L"), ("prob", "prob"), ("truth_ratio", "TR"))]


def _fmt(c) -> str:
    return "–" if c is None else (f"{c:.3f}" if isinstance(c, float) else str(c))


def _table(header, rows) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
            + ["| " + " | ".join(map(_fmt, r)) + " |" for r in rows] + [""])


def _finetune_summary(base: Path) -> tuple[str, dict]:
    """One sentence on the fine-tuned models (wall time, final answer-token accuracy per set)."""
    parts, data = [], {}
    for stage in ("general", "target", "retain"):
        f = base / stage / "final_metrics.json"
        if not f.is_file():
            continue
        m = json.loads(f.read_text())
        data[stage] = {"wall_time_s": m.get("wall_time_s"), "steps": m.get("steps"),
                       **{f"{k}_accuracy": m[k]["accuracy"] for k in ("forget", "retain", "general") if k in m}}
        acc = ", ".join(f"{k} {m[k]['accuracy']:.3f}" for k in ("forget", "retain", "general") if k in m)
        parts.append(f"{stage} {m.get('steps')} steps in {m.get('wall_time_s')} s (answer-token accuracy {acc})")
    return "; ".join(parts), data


def report(root: Path) -> dict:
    from simu_jax.evaluate.report import load_run

    cols = {"tofu": [("forget_rouge", "forget ROUGE-L"), ("forget_prob", "forget prob"),
                     ("forget_truth_ratio", "forget truth ratio"), ("forget_quality", "forget quality"),
                     ("model_utility", "model utility"), ("retain_rouge", "retain ROUGE-L"),
                     ("mia_auc_loss", "MIA AUC (loss)")],
            "lume": [("task_aggregate", "task aggregate"), ("forget_regurgitation", "forget regurgitation"),
                     ("retain_regurgitation", "retain regurgitation"), ("mia_auc_loss", "MIA AUC (loss)"),
                     ("mia_score", "MIA score")]}
    md, data, finetuned = [], {}, {}
    for bench in ("tofu", "lume"):
        base = root / bench
        if not (base / "runs").is_dir():
            continue
        stop = json.loads((base / "reference_forget_nll.json").read_text())["nll"]
        summary, finetuned[bench] = _finetune_summary(base)
        general = (base / "general").is_dir()
        md += [f"### {bench.upper()}", ""]
        if general:
            md += [f"General model = experiments/{bench}/general.yaml (from scratch on real_authors + world_facts); "
                   f"target = target.yaml, reference = retain.yaml, both fine-tuned from it with the general set "
                   f"replayed. The real-authors / world-facts evaluation sets are the general training set: their "
                   f"numbers measure retention of taught knowledge, not generalization.", ""]
        else:
            md += [f"Target = experiments/{bench}/target.yaml, reference = retain.yaml.", ""]
        md += [f"Fine-tuned here: {summary}. Stop at forget NLL {stop:.3f} (the retain-only model's), at most "
               f"{MAX_STEPS} steps; evaluation on the first {EVAL_LIMIT} records of each set.", ""]
        data[bench], rows, parts = {}, [], []
        for name in ("general", "target", "retain") + METHODS:
            d = base / "runs" / name
            if not (d / "COMPLETE").is_file():
                continue
            r = load_run(d)
            res = json.loads((d / "result.json").read_text()) if (d / "result.json").is_file() else {}
            curve = [h for h in (r["history"] or []) if "eval/forget_loss" in h]
            row = {"steps": res.get("step"), "forget_nll": curve[-1]["eval/forget_loss"] if curve else None,
                   **r["metrics"]}
            data[bench][name] = row
            rows.append([name, row["steps"], row["forget_nll"]] + [row.get(k) for k, _ in cols[bench]])
            parts.append([name] + [row.get(k) for k, _ in UTILITY_PARTS] + [row.get("model_utility")])
        md += _table(["model", "steps", "forget NLL"] + [c for _, c in cols[bench]], rows)
        if bench == "tofu" and parts:
            md += ["Model utility's nine parts (RA = real authors, WF = world facts; prob is the normalized "
                   "probability of the true answer there, TR = truth ratio max(0, 1 - R)):", ""]
            md += _table(["model"] + [c for _, c in UTILITY_PARTS] + ["model utility"], parts)
    out = {"markdown": "\n".join(md), "rows": data, "finetune": finetuned}
    (root / "real.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("run", "report"))
    p.add_argument("--benchmark", choices=("tofu", "lume"), default="tofu")
    p.add_argument("--out", default="runs/real")
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        run(args.benchmark, root)
    print(report(root)["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
