"""Render docs/results.md (+ plots in docs/results/) from the study outputs.

    python experiments/matched_study.py collect --out runs/matched
    python experiments/make_results_md.py --matched runs/matched/matched.json \
        --curvature runs/curvature/curvature.json [--real runs/real/real.json ...]

The prose (what held, what did not) lives in experiments/results_notes.md and is included first;
every number below it comes from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
def _f(x, digits=3):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _shown(path) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(HERE.parent)) if p.is_relative_to(HERE.parent) else str(path)


def section_cost(bench_path):
    """Cost per step of each method, from the benchmark's steps section (docs/benchmarks.json)."""
    if not bench_path or not Path(bench_path).is_file():
        return []
    b = json.loads(Path(bench_path).read_text())
    st = b.get("steps", {})
    methods, cfg = st.get("methods", {}), st.get("config", {})
    if not methods:
        return []
    so = methods.get("so_graddiff", {}).get("median_s")
    m = b.get("machine", {})
    lines = ["### Cost per step (from `simu-jax bench`)", "",
             f"`simu-jax bench` steps section ({_shown(bench_path)}): a {cfg.get('layers')}-layer LLaMA, hidden "
             f"{cfg.get('hidden')}, intermediate {cfg.get('intermediate')}, vocab {cfg.get('vocab')}, "
             f"{cfg.get('batch_per_part')} + {cfg.get('batch_per_part')} sequences of {cfg.get('seq')} tokens, "
             f"SIMU subset {cfg.get('neuron_fraction')} of the neurons; Newton-type steps at "
             f"`cg_iters` {cfg.get('settings', {}).get('cg_iters')}; median of the timed steps on "
             f"{m.get('cpu_model', m.get('cpu', '?'))} ({m.get('cpu_count', '?')} cores), {b.get('timestamp_utc', '')}.",
             ""]
    header = ["method", "step (ms)", "x so_graddiff", "curvature products", "trainable params"]
    rows = []
    for label, r in methods.items():
        rows.append([label, f"{r['median_s'] * 1e3:.0f}", None if not so else f"{r['median_s'] / so:.2f}",
                     r.get("cg_iterations"), r.get("num_trainable")])
    return lines + [_table(header, rows), ""]


def section_curvature(c, figdir):
    if not c:
        return ["## 5. The curvature claim", "", "(not run)", ""]
    lines = ["## 5. The curvature claim", "",
             f"Model: `{_shown(c.get('model', '?'))}`. Loss: {c['loss']} on one batch ({c['batch']}); neurons ranked by {c['ranking']}; trainable = "
             f"{c['trainable']}; exact Hessian rows from exact HVPs at sampled coordinates. `diag mass` = median over "
             "sampled rows i of H_ii² / ‖H[i, S]‖² (1 = the restricted Hessian is diagonal). Estimator errors are "
             "‖ĥ − h‖/‖h‖ at the sampled coordinates (h = exact diagonal); fisher and GNB are also given after the "
             "best positive scale (`scaled`), and by Spearman ρ with the exact diagonal. Newton: CG on "
             "(H_S + λI) d = g with λ = max(0, −λ_min) + 0.01·|λ_max| (Lanczos); cosines of d with Sophia's first "
             "step (rho, batch_scale as in the unlearn defaults) and with g.", ""]
    header = ["neurons/layer", "fraction", "coords", "H_ii < 0", "diag mass", "hutch-1 err", "hutch-16 err",
              "fisher err (scaled)", "fisher ρ", "gnb err (scaled)", "gnb ρ", "λ_min", "λ_max",
              "cos(N, g)", "cos(N, sophia-fisher)", "cos(N, sophia-hutch)", "cos(N, sophia-gnb)"]
    rows = []
    for r in c["sizes"]:
        e, n = r["estimators"], r["newton_cosine"]
        rows.append([r["neurons_per_layer"], r["fraction"], r["coordinates"], r["exact_diag_negative_fraction"],
                     r["diag_mass_median"], e["hutchinson_1"]["rel_error"], e["hutchinson_16"]["rel_error"],
                     e["fisher"]["rel_error_best_scale"], e["fisher"]["spearman"], e["gnb"]["rel_error_best_scale"],
                     e["gnb"]["spearman"], f"{r['lanczos']['min']:.2e}", f"{r['lanczos']['max']:.2e}",
                     n["gradient"], n["sophia_fisher"], n["sophia_hutchinson_1"], n["sophia_gnb"]])
    lines += [_table(header, rows), ""]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fr = [r["fraction"] for r in c["sizes"]]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(fr, [r["diag_mass_median"] for r in c["sizes"]], "o-", label="diag mass of H_S")
    for name in ("hutchinson_1", "hutchinson_16"):
        ax[0].plot(fr, [r["estimators"][name]["rel_error"] for r in c["sizes"]], "s--", label=f"{name} rel. error")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("fraction of MLP neurons in S")
    ax[0].legend(fontsize=8)
    for name in ("gradient", "sophia_fisher", "sophia_hutchinson_1", "sophia_gnb"):
        ax[1].plot(fr, [r["newton_cosine"][name] for r in c["sizes"]], "o-", label=name)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("fraction of MLP neurons in S")
    ax[1].set_ylabel("cosine with the Newton direction")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figdir / "curvature.png", dpi=110)
    plt.close(fig)
    return lines + ["![curvature](results/curvature.png)", ""]


def section_real(reals):
    if not reals:
        return []
    return ["## 6. Real data (TOFU forget10, LUME)", ""] + [r.get("markdown", "") + "\n" for r in reals]




def _ms(stats: dict, key: str, digits: int = 3) -> str | None:
    """'mean ± std' of one summarized metric (matched_study.summarize), or None."""
    v = stats.get(key)
    if v is None:
        return None
    if v["n"] == 1:
        return f"{v['mean']:.{digits}f}"
    return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}"


MATCHED_COLS = [("step", "steps", 1), ("forget_nll", "forget NLL", 2), ("forget_rouge", "forget ROUGE-L", 3),
                ("forget_prob", "forget prob", 3), ("forget_quality", "forget quality", 3),
                ("model_utility", "model utility", 3), ("retain_rouge", "retain ROUGE-L", 3),
                ("general_rouge", "general ROUGE-L", 3), ("mia_auc_loss", "MIA AUC (loss)", 3)]
RUN_ORDER = ("target", "retain", "fo_graddiff", "so_graddiff", "simu_graddiff/ig", "simu_graddiff/true",
             "simu_graddiff/random", "simu_frozen/ig", "simu_frozen/true", "simu_frozen/random", "simu_newton/ig",
             "simu_newton/true", "so_graddiff/lr0.1", "simu_graddiff/ig/lr0.1")
LABELS = {"target": "target (no unlearning)", "retain": "retain-only reference (no unlearning)"}


def _seeds(d, bench):
    return sorted(d["benchmarks"].get(bench, {}))


def section_attribution(d):
    seeds = {k: v for k, v in d["benchmarks"].get("planted", {}).items() if "attribution" in v}
    if not seeds:
        return []
    lines = ["## 1. Attribution against the planted truth", "",
             f"Planted benchmark (§2's models, seeds {', '.join(s[1:] for s in seeds)}): each method scores the forget "
             "set's 20 rows on the planted model; `base (control)` scores the same neurons on the base model, "
             "before anything was planted (chance expected). `AUC (all)`: ROC AUC of the scores against the "
             "planted neurons pooled over layers (scores must compare across layers); `layer AUC`: the mean of the "
             "per-layer AUCs; `top-k`: precision of the |truth| highest scores; `t = 0.5 mask`: SIMU's mask rule "
             "(`critical_neurons` at t = 0.5) with its size, precision and recall. `ll`: the log-likelihood's "
             "IG (the code's sign), `loss`: its negative. Mean ± std over seeds.", ""]
    header = ["model", "method", "AUC (all)", "layer AUC", "top-k precision", "t=0.5 mask: n", "precision", "recall"]
    rows = []
    first = next(iter(seeds.values()))["attribution"]
    for model in first:
        for method in first[model]["metrics"]:
            vals = {k: [] for k in ("auc", "mean_layer_auc", "top_k", "n", "precision", "recall")}
            for v in seeds.values():
                o = v["attribution"][model]["metrics"][method]["overall"]
                thr = o["threshold"]
                for k, x in (("auc", o.get("auc")), ("mean_layer_auc", o.get("mean_layer_auc")),
                             ("top_k", o.get("top_k")), ("n", thr.get("selected")), ("precision", thr.get("precision")),
                             ("recall", thr.get("recall"))):
                    if x is not None:
                        vals[k].append(float(x))
            cells = []
            for k, xs in vals.items():
                if not xs:
                    cells.append(None)
                elif len(xs) == 1:
                    cells.append(f"{xs[0]:.{0 if k == 'n' else 3}f}")
                else:
                    cells.append(f"{statistics.fmean(xs):.{0 if k == 'n' else 3}f} ± "
                                 f"{statistics.stdev(xs):.{0 if k == 'n' else 3}f}")
            rows.append([model, method, *cells])
    return lines + [_table(header, rows), ""]


def section_matched(d, bench, number, title, intro):
    summary = d["summary"].get(bench)
    if not summary:
        return []
    seeds = _seeds(d, bench)
    stops = [d["benchmarks"][bench][s]["stop"] for s in seeds]
    lines = [f"## {number}. {title}", "", intro, "",
             f"Stop: the reference model's forget NLL ({', '.join(f'{x:.2f}' for x in stops)} nats/token for seeds "
             f"{', '.join(s[1:] for s in seeds)}), checked after every step, at most {d['max_steps']} steps, batch 4 "
             "forget + 4 retain; a run that does not reach it is rerun at 3x then 10x its learning rate (trust radius "
             "for Newton); `lr x` = the factor of the row's last try, `reached` = the fraction of seeds that reached "
             "the stop. Mean ± sample std over seeds.", ""]
    header = ["run", "reached", "lr x"] + [c for _, c, _ in MATCHED_COLS] + ["mask n", "mask precision",
                                                                             "mask recall", "trainable params"]
    rows = []
    for name in RUN_ORDER:
        st = summary.get(name)
        if not st:
            continue
        factors = sorted({d["benchmarks"][bench][s]["runs"][name].get("factor") for s in seeds
                          if name in d["benchmarks"][bench][s]["runs"]} - {None})
        trainable = sorted({d["benchmarks"][bench][s]["runs"][name].get("trainable_parameters") for s in seeds
                            if name in d["benchmarks"][bench][s]["runs"]} - {None})
        rows.append([LABELS.get(name, name), _ms(st, "reached", 2), "/".join(map(str, factors)) or None]
                    + [_ms(st, k, dg) for k, _, dg in MATCHED_COLS]
                    + [_ms(st, "mask/selected", 0), _ms(st, "mask/precision"), _ms(st, "mask/recall"),
                       "/".join(map(str, trainable)) or None])
    return lines + [_table(header, rows), ""]


def section_attacks(d):
    lines = ["## 4. Robustness: 4-bit quantization and relearning", "",
             "After each run's final evaluation (§2, §3): INT4 (per-group round-to-nearest, group 128, llm-awq's "
             "`pseudo_quantize_tensor`), NF4 (bitsandbytes' blockwise, block 64) of every linear layer of the "
             "unlearned model, and relearning (10 AdamW steps at 1e-3 on 2 of the 20 forget pairs), each followed by "
             "the forget metrics on the whole forget set (`simu_jax.evaluate.attacks`). `recovery` = (after - "
             "unlearned) / (target - unlearned) of forget ROUGE-L: 0 = the attack undoes nothing, 1 = back to the "
             "target model. Mean ± std over seeds.", ""]
    header = ["benchmark", "run", "forget ROUGE-L", "INT4: ROUGE-L", "recovery", "NF4: ROUGE-L", "recovery",
              "relearn: ROUGE-L", "recovery"]
    rows = []
    for bench in ("planted", "mlp"):
        summary = d["summary"].get(bench, {})
        for name in RUN_ORDER[2:]:
            st = summary.get(name)
            if not st:
                continue
            rows.append([bench, name, _ms(st, "forget_rouge")]
                        + [x for a in ("int4", "nf4", "relearn")
                           for x in (_ms(st, f"{a}/forget_rouge"), _ms(st, f"{a}/recovery_rouge"))])
    return lines + [_table(header, rows), ""] if rows else []


DIAG_COLS = [("clip_fraction", "at clip (Sophia)"), ("update_over_lr", "median update / lr"),
             ("off_gradient", "steps with cos(step, -g) < 0.99"), ("cos_median", "median cos(step, -g)"),
             ("products_median", "Lanczos products"), ("accepted", "accepted"), ("rho_median", "median rho")]


def section_diagnostics(d):
    """How second-order each run's steps were (matched_study rows' `diagnostics`, mean over seeds)."""
    lines = ["### How second-order the steps were", "",
             "Medians over each run's steps, then the mean over seeds. `at clip`: fraction of trainable coordinates "
             "whose Sophia update sits at the clip (there the step is lr x sign(m)); `median update / lr` (1 = the "
             "median coordinate is clipped). Newton: the fraction of steps whose direction is not the gradient's "
             "(cosine to -g below 0.99), the median cosine, the curvature products per step, the fraction of "
             "trust-region steps accepted, the median ratio rho.", ""]
    header = ["benchmark", "run"] + [c for _, c in DIAG_COLS]
    rows = []
    for bench, seeds in d["benchmarks"].items():
        for name in RUN_ORDER[2:]:
            diags = [v["runs"][name]["diagnostics"] for v in seeds.values() if name in v["runs"]]
            diags = [x for x in diags if x]
            if not diags:
                continue
            rows.append([bench, name] + [statistics.fmean([x[k] for x in diags]) if all(k in x for x in diags)
                                         else None for k, _ in DIAG_COLS])
    return lines + [_table(header, rows), ""] if rows else []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--matched", default="runs/matched/matched.json")
    p.add_argument("--curvature", default="runs/curvature/curvature.json")
    p.add_argument("--real", nargs="*", default=[],
                   help="markdown sections for the real-data runs (JSONs with 'markdown': real.py report's, "
                        "docs/results/data/lume_2026-11-27.json for the LUME rows not rerun)")
    p.add_argument("--bench", default=str(HERE.parent / "docs" / "benchmarks.json"),
                   help="simu-jax bench --json output: the cost-per-step table")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "results.md"))
    args = p.parse_args(argv)
    d = json.loads(Path(args.matched).read_text())
    curvature = json.loads(Path(args.curvature).read_text()) if Path(args.curvature).is_file() else None
    out = Path(args.out)
    figdir = out.parent / "results"
    figdir.mkdir(parents=True, exist_ok=True)
    notes = (HERE / "results_notes.md").read_text() if (HERE / "results_notes.md").is_file() else ""
    real = [json.loads(Path(r).read_text()) for r in args.real]
    lines = ["# Results", "", notes.strip(), ""]
    lines += section_attribution(d)
    lines += section_matched(d, "planted", 2, "Matched forgetting on the planted benchmark",
                             "The forget facts live in 32 known neurons per layer of a 4-layer LLaMA (hidden 128, "
                             "MLP 512; §1); the base model (retain + general facts) is the reference. Masks: `ig` = "
                             "SIMU's own attribution, `true` = the planted neurons, `random` = as many random neurons "
                             "per layer as `ig`. `simu_frozen`: SIMU-GradDiff with attention frozen (only the masked "
                             "neurons' down_proj rows train). The Newton rows of seeds 1 and 2 start at 3x the demo's radius (on "
                             "seed 0 neither mask reached the stop at 1x).")
    lines += section_matched(d, "mlp", 3, "Matched forgetting on the synthetic benchmark with an MLP-heavy model",
                             "The synthetic benchmark's target (all facts) and retain-only models with the planted "
                             "benchmark's architecture (4 layers, hidden 128, MLP 512 = 4x hidden), one pair per "
                             "seed. No true mask exists here.")
    lines += section_diagnostics(d) + section_cost(args.bench) + section_attacks(d)
    lines += section_curvature(curvature, figdir) + section_real(real)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
