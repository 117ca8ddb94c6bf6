"""Render docs/results.md (+ plots in docs/results/) from the study outputs.

    python experiments/study.py collect --out runs/study
    python experiments/make_results_md.py --study runs/study/study.json [--real runs/real/real.json ...]

The prose (what held, what did not) lives in experiments/results_notes.md and is included first;
every number below it comes from the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADLINE = ("fo_graddiff", "so_graddiff", "simu_graddiff", "simu_newton", "simu_ggn", "simu_influence")
DIAG_COLS = [("clip_fraction", "at clip (Sophia)"), ("update_over_lr", "median update / lr"),
             ("off_gradient", "steps with cos(step, -g) < 0.99"), ("cos_median", "median cos(step, -g)"),
             ("products_median", "CG / Lanczos products"), ("accepted", "accepted"), ("rho_median", "median rho")]
COLS = [("forget_rouge", "forget ROUGE-L"), ("forget_prob", "forget prob"), ("forget_quality", "forget quality"),
        ("model_utility", "model utility"), ("retain_rouge", "retain ROUGE-L"), ("general_rouge", "general ROUGE-L"),
        ("mia_auc_loss", "MIA AUC (loss)")]


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


def _metric_row(name, r, extra=()):
    m = r["metrics"]
    return [name, *extra, *[m.get(k) for k, _ in COLS]]


def _steps(r):
    return r.get("step")


def section_compare(d, stop):
    runs = d["runs"]
    lines = ["## 1. The comparison at matched forgetting (synthetic benchmark)", "",
             f"Every method unlearns until the forget set's answer NLL reaches {stop:.3f} nats/token, the retain-only "
             f"reference model's NLL on it (checked after every step, at most {d['max_steps']} steps; batch 4 forget + "
             "4 retain). Rows: seed 0; `steps` = steps taken; `reached` = whether the stop was reached.", ""]
    header = ["method", "steps", "reached", "forget NLL"] + [c for _, c in COLS]
    rows = []
    for name in ("models/target", "models/retain"):
        if name in runs:
            rows.append(_metric_row(name.split("/")[1] + " (no unlearning)", runs[name], ("–", "–", "–")))
    for key, r in runs.items():
        if key.startswith("compare/") or key.startswith("compare_lr/"):
            reached = r.get("final_forget_nll") is not None and r["final_forget_nll"] >= stop
            label = key.split("/", 1)[1].replace("_x", " (lr x") + (")" if "_x" in key else "")
            rows.append(_metric_row(label, r, (_steps(r), "yes" if reached else "no", r.get("final_forget_nll"))))
    lines += [_table(header, rows), ""]
    # seeds
    lines += ["### Seeds (headline rows, mean ± sample std over seeds 0, 1, 2)", "",
              "The seed changes the batch order and the curvature probes; the target model and the mask are fixed.", ""]
    header = ["method", "n", "steps"] + [c for _, c in COLS]
    rows = []
    for method in HEADLINE:
        rs = [runs[k] for k in [f"compare/{method}", f"seeds/{method}_s1", f"seeds/{method}_s2"] if k in runs]
        if not rs:
            continue
        row = [method, len(rs)]
        for get in [lambda r: r.get("step")] + [lambda r, k=k: r["metrics"].get(k) for k, _ in COLS]:
            vals = [get(r) for r in rs if get(r) is not None]
            if not vals:
                row.append(None)
                continue
            mean = statistics.fmean(vals)
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row.append(f"{mean:.3f} ± {sd:.3f}" if isinstance(vals[0], float) else f"{mean:.1f} ± {sd:.1f}")
        rows.append(row)
    lines += [_table(header, rows), ""]
    lines += section_diagnostics(runs)
    # fixed budget
    lines += ["### Fixed budget (20 steps, the demo's protocol)", ""]
    rows = [_metric_row(k.split("/")[1], r) for k, r in runs.items() if k.startswith("fixed20/")]
    lines += [_table(["method"] + [c for _, c in COLS], rows), ""]
    return lines


def section_diagnostics(runs):
    """How second-order each run was (from every step's metrics; study.py's `diagnostics`)."""
    lines = ["### How second-order the steps were (seed 0, matched forgetting)", "",
             "Medians over the run's steps. `at clip`: fraction of trainable coordinates whose Sophia update "
             "sits at the clip (|m / (rho h)| >= 1: there the step is lr x sign(m), sign-of-momentum descent); "
             "`median update / lr` (of |update| / lr; 1 = every coordinate clipped). Newton-type: the fraction of steps whose "
             "direction is not the gradient's (cosine to -g below 0.99), the median cosine, the products with "
             "the curvature per step, the fraction of trust-region steps accepted and the median ratio rho "
             "(actual / predicted decrease; influence: no ratio test).", ""]
    header = ["method"] + [c for _, c in DIAG_COLS]
    rows = []
    for key, r in runs.items():
        if not key.startswith("compare/"):
            continue
        dg = r.get("diagnostics") or {}
        if not dg:
            continue
        rows.append([key.split("/", 1)[1]] + [dg.get(k) for k, _ in DIAG_COLS])
    return lines + [_table(header, rows), ""] if rows else []


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


def section_ablations(d, stop, figdir):
    runs = d["runs"]
    base = runs.get("compare/simu_graddiff")
    lines = ["## 2. Ablations of SIMU-GradDiff (matched forgetting, seed 0)", "",
             "Default: threshold t = 0.5, IG steps m = 3, dual neurons included, attention trained, fisher "
             "curvature (SOUL's Sophia). `neurons` = selected MLP neurons per layer (of 256).", ""]
    header = ["variant", "neurons", "dual", "trainable params", "steps", "forget NLL"] + [c for _, c in COLS]
    rows = []
    items = ([("default (t=0.5, m=3)", base)] if base else []) + \
        [(k.split("/")[1], r) for k, r in runs.items() if k.startswith("ablations/")]
    items.append(("simu_newton (trust-region Newton, Lanczos)", runs.get("compare/simu_newton")))
    items.append(("so_graddiff (no mask, all params)", runs.get("compare/so_graddiff")))
    for name, r in items:
        if r is None:
            continue
        mask = r.get("mask") or {}
        rows.append(_metric_row(name, r, (mask.get("per_layer_selected"), mask.get("per_layer_dual"),
                                          r.get("trainable_parameters"), _steps(r), r.get("final_forget_nll"))))
    lines += [_table(header, rows), ""]
    # t sweep plot
    sweep = []
    for key in ("ablations/t0.1", "ablations/t0.3", "compare/simu_graddiff", "ablations/t0.7", "ablations/t0.9"):
        r = runs.get(key)
        if r and r.get("mask"):
            t = r["mask"].get("threshold", 0.5)
            sweep.append((t, r["mask"]["num_selected"], r["metrics"].get("model_utility"), r.get("step"),
                          r["metrics"].get("forget_quality")))
    if len(sweep) >= 2:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        sweep.sort()
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
        ts = [s[0] for s in sweep]
        ax[0].plot(ts, [s[1] for s in sweep], "o-")
        ax[0].set_xlabel("threshold t")
        ax[0].set_ylabel("neurons selected (of 512)")
        ax[1].plot(ts, [s[2] for s in sweep], "o-", label="model utility")
        ax[1].plot(ts, [s[4] for s in sweep], "s--", label="forget quality")
        ax[1].set_xlabel("threshold t")
        ax[1].legend()
        ax[1].set_title("at matched forgetting")
        fig.tight_layout()
        fig.savefig(figdir / "t_sweep.png", dpi=110)
        plt.close(fig)
        lines += ["![t sweep](results/t_sweep.png)", ""]
    return lines


def section_curvature(d, figdir):
    c = d.get("curvature")
    if not c:
        return ["## 3. The curvature claim", "", "(not run)", ""]
    lines = ["## 3. The curvature claim", "",
             f"Loss: {c['loss']} on one batch ({c['batch']}); neurons ranked by {c['ranking']}; trainable = "
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


def section_sequential(d):
    runs = d["runs"]
    groups = d.get("sequential_groups")
    lines = ["## 4. Sequential unlearning (three requests in a row)", "",
             "Request 1 = the benchmark's forget people; requests 2 and 3 = 4 further people each (taken from the "
             "retain people); the retain set = the 28 people never requested; each request unlearns until the "
             "request's forget NLL reaches the same stop as in §1. Forget quality is not defined for requests 2-3 (no "
             "model that never saw them exists), so the table shows forgetting of the current request and utility.",
             ""]
    if groups:
        lines += ["Requests: " + "; ".join(f"{i + 1}: {', '.join(g)}" for i, g in enumerate(groups)), ""]
    header = ["method", "request", "steps", "forget ROUGE-L (this request)", "forget prob", "model utility",
              "retain ROUGE-L", "general ROUGE-L"]
    rows = []
    for key, r in runs.items():
        if key.startswith("sequential/"):
            _, method, req = key.split("/")
            m = r["metrics"]
            rows.append([method, req.replace("request", ""), _steps(r), m.get("forget_rouge"), m.get("forget_prob"),
                         m.get("model_utility"), m.get("retain_rouge"), m.get("general_rouge")])
    return lines + [_table(header, rows), ""]


def section_relearn(d):
    runs = d["runs"]
    lines = ["## 5. Relearning attack and MIA", "",
             "Each model is fine-tuned on 2 of the 20 forget QA pairs (10%) for 10 full-batch AdamW steps (lr 1e-3); "
             "then the whole forget set is measured. `after` = after the attack.", ""]
    header = ["model", "forget ROUGE-L before", "after", "forget prob before", "after", "model utility after",
              "MIA AUC (loss) before", "after"]
    rows = []
    for name in ("target",) + HEADLINE:
        r = runs.get(f"relearn/{name}")
        before = runs.get("models/target" if name == "target" else f"compare/{name}")
        if r is None or before is None:
            continue
        b, a = before["metrics"], r["metrics"]
        rows.append([name, b.get("forget_rouge"), a.get("forget_rouge"), b.get("forget_prob"), a.get("forget_prob"),
                     a.get("model_utility"), b.get("mia_auc_loss"), a.get("mia_auc_loss")])
    lines += [_table(header, rows), ""]
    lines += ["MIA (forget = members vs holdout = non-members, AUC; 0.5 = indistinguishable; the retain-only model "
              "is the target level):", ""]
    header = ["model", "loss", "zlib", "min-k", "min-k++"]
    rows = []
    for key in ["models/target", "models/retain"] + [f"compare/{m}" for m in HEADLINE]:
        r = runs.get(key)
        if r:
            m = r["metrics"]
            rows.append([key.split("/")[1], m.get("mia_auc_loss"), m.get("mia_auc_zlib"), m.get("mia_auc_min_k"),
                         m.get("mia_auc_min_k_pp")])
    return lines + [_table(header, rows), ""]


def section_real(reals):
    if not reals:
        return []
    return ["## 6. Real data (TOFU forget10, LUME)", ""] + [r.get("markdown", "") + "\n" for r in reals]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--study", default="runs/study/study.json")
    p.add_argument("--real", nargs="*", default=[],
                   help="markdown sections for the real-data runs (JSONs with 'markdown': real.py report's, "
                        "docs/results/data/lume_2026-11-27.json for the LUME rows not rerun)")
    p.add_argument("--bench", default=str(HERE.parent / "docs" / "benchmarks.json"),
                   help="simu-jax bench --json output: the cost-per-step table")
    p.add_argument("--out", default=str(HERE.parent / "docs" / "results.md"))
    args = p.parse_args(argv)
    d = json.loads(Path(args.study).read_text())
    out = Path(args.out)
    figdir = out.parent / "results"
    figdir.mkdir(parents=True, exist_ok=True)
    stop = d["reference_forget_nll"]
    notes = (HERE / "results_notes.md").read_text() if (HERE / "results_notes.md").is_file() else ""
    real = [json.loads(Path(r).read_text()) for r in args.real]
    lines = ["# Results", "", notes.strip(), ""]
    lines += section_compare(d, stop) + section_cost(args.bench) + section_ablations(d, stop, figdir)
    lines += section_curvature(d, figdir)
    lines += section_sequential(d) + section_relearn(d) + section_real(real)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
