"""Markdown + PNG report comparing unlearning runs.

Run-directory schema (one directory per method / run)
-----------------------------------------------------
``summary.json`` (required)::

    {"method": "SIMU",                       # display name (str)
     "metrics": {"forget_rouge": 0.12,       # name -> float (null allowed = missing)
                 "retain_rouge": 0.81,
                 "model_utility": 0.55,
                 ...}}

  ``metrics`` should contain at least ``forget_rouge``, ``retain_rouge`` and
  ``model_utility``; any other numeric entries are reported too, e.g.
  ``forget_prob``, ``forget_truth_ratio``, ``forget_quality``, ``retain_prob``,
  ``retain_truth_ratio``, ``real_authors_*``, ``world_facts_*``,
  ``forget_regurgitation``, ``forget_knowledge``, ``retain_regurgitation``,
  ``retain_knowledge``, ``mia_auc``, ``mia_score``, ``mmlu``, ``task_aggregate``,
  ``aggregate`` / ``final_score``, open-unlearning's ``forget_extraction_strength``,
  ``forget_exact_memorization``, the MIA AUCs ``mia_auc_loss`` / ``_zlib`` / ``_min_k`` /
  ``_min_k_pp`` / ``_reference`` / ``_gradnorm``, ``reference_mia_auc_min_k`` and ``privleak``
  (what ``simu-jax evaluate`` and ``simu-jax unlearn`` write).  Non-numeric values are ignored.

  ``details.robustness`` (optional; ``simu-jax evaluate --attack``, ``eval.attack``): the
  robustness attacks' forget metrics and recovery (:func:`simu_jax.evaluate.attacks.run_attacks`),
  tabulated in their own section.

``metrics.jsonl`` (optional): one JSON object per line, each with ``"step"``
(int) and any numeric keys, e.g.
``{"step": 10, "forget_loss": 2.3, "retain_loss": 0.4, "eval/forget_rouge": 0.5}``.
Keys need not appear on every line; blank or truncated (non-JSON) lines are
skipped with a warning; lines without ``"step"`` are skipped.

``mask_summary.json`` or ``mask/mask_summary.json`` (optional)::

    {"per_layer_forget":   [int, ...],   # neurons flagged for the forget set, per layer
     "per_layer_retain":   [int, ...],   # neurons flagged for the retain set, per layer
     "per_layer_selected": [int, ...],   # neurons finally selected (edited), per layer
     "intermediate_size":  int}          # MLP width (neurons per layer)

Outputs written by :func:`write_report` into ``out_dir`` (each written to a
temporary file in ``out_dir`` and moved into place with ``os.replace``):

* ``report.md``: results table (one row per run; metric columns in a
  paper-like order: forget scores, retain scores, real-authors / world-facts,
  utility, MIA, aggregate; values to 3 decimals), the run list, and the plots.
* ``tradeoff.png``: forget-vs-retain scatter, one labelled point per method
  (forget ROUGE vs retain ROUGE; forget ROUGE vs model utility; forget quality
  (log x) vs model utility when available).
* ``curves.png``: each numeric key of ``metrics.jsonl`` against ``step``, one
  subplot per key, one line per method (only if any run has metrics.jsonl).
* ``neurons.png``: grouped bars of selected neurons per layer, one bar group
  per layer, one colour per method (only if any run has mask_summary.json).
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from simu_jax.evaluate.metrics import METRIC_ORDER

__all__ = ["METRIC_ORDER", "load_run", "format_table", "write_report"]

_TRAILING: tuple[str, ...] = ("task_aggregate", "aggregate", "final_score")


# --------------------------------------------------------------------------- #
# io helpers
# --------------------------------------------------------------------------- #
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from simu_jax.runio import write_bytes_atomic

    write_bytes_atomic(path, data)


def _atomic_savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_write_bytes(path, buf.getvalue())


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: skipping line that is not valid JSON")
                continue
            if not isinstance(obj, dict) or not _is_number(obj.get("step")):
                continue
            rows.append(obj)
    return rows


def load_run(run_dir: Path) -> dict[str, Any]:
    """Read one run directory (schema in the module docstring).

    Returns ``{"dir": Path, "method": str, "metrics": {name: float},
    "history": [dict] | None, "mask": dict | None, "robustness": dict | None}``.
    Raises ``FileNotFoundError`` (with the path) when the directory or its
    ``summary.json`` is missing, ``ValueError`` when summary.json is malformed.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"summary.json not found: {summary_path}")
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        raise ValueError(f"{summary_path}: expected {{'method': str, 'metrics': {{...}}}}")
    metrics = {
        str(k): float(v) for k, v in summary["metrics"].items() if _is_number(v)
    }
    method = str(summary.get("method") or run_dir.name)
    hist_path = run_dir / "metrics.jsonl"
    history = _read_jsonl(hist_path) if hist_path.is_file() else None
    mask_path = run_dir / "mask_summary.json"
    if not mask_path.is_file():  # `simu-jax unlearn` keeps the mask in its own folder
        mask_path = run_dir / "mask" / "mask_summary.json"
    mask = None
    if mask_path.is_file():
        with open(mask_path, encoding="utf-8") as f:
            mask = json.load(f)
    details = summary.get("details") if isinstance(summary.get("details"), dict) else {}
    robustness = details.get("robustness") if isinstance(details.get("robustness"), dict) else None
    return {"dir": run_dir, "method": method, "metrics": metrics, "history": history, "mask": mask,
            "robustness": robustness or None}


# --------------------------------------------------------------------------- #
# table
# --------------------------------------------------------------------------- #
def _row_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    src = row["metrics"] if isinstance(row.get("metrics"), Mapping) else row
    return {str(k): float(v) for k, v in src.items() if k != "method" and _is_number(v)}


def _ordered_columns(names: Iterable[str]) -> list[str]:
    names = set(names)
    head = [m for m in METRIC_ORDER if m in names]
    tail = [m for m in _TRAILING if m in names]
    middle = sorted(names - set(head) - set(tail))
    return head + middle + tail


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v != 0 and abs(v) < 5e-4:
        # p-values such as forget quality would print as 0.000
        return f"{v:.2e}"
    return f"{v:.3f}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """GitHub-markdown table: one row per method, one column per metric present.

    ``rows``: mappings ``{"method": str, "metrics": {name: float}}`` (the
    summary.json schema) or flat ``{"method": str, name: float, ...}``.
    Columns follow :data:`METRIC_ORDER` (unknown metrics sorted, aggregates
    last); values are printed with 3 decimals (non-zero values below 5e-4 in
    scientific notation); a metric a row lacks is shown as "–".
    """
    rows = list(rows)
    per_row = [_row_metrics(r) for r in rows]
    cols = _ordered_columns(k for m in per_row for k in m)
    lines = [
        "| " + " | ".join(["method"] + cols) + " |",
        "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|",
    ]
    for r, m in zip(rows, per_row):
        cells = [str(r.get("method", "?")).replace("|", "\\|")] + [_fmt(m.get(c)) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
def _figure(nrows: int, ncols: int, w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _plot_tradeoff(runs: list[dict[str, Any]], path: Path) -> bool:
    panels = [
        ("forget_rouge", "retain_rouge", False),
        ("forget_rouge", "model_utility", False),
        ("forget_quality", "model_utility", True),
    ]
    panels = [
        p for p in panels if any(p[0] in r["metrics"] and p[1] in r["metrics"] for r in runs)
    ]
    if not panels:
        return False
    fig, axes = _figure(1, len(panels), 4.6 * len(panels), 4.0)
    for ax, (xk, yk, logx) in zip(axes[0], panels):
        for i, r in enumerate(runs):
            m = r["metrics"]
            if xk not in m or yk not in m:
                continue
            x, y = m[xk], m[yk]
            if logx and x <= 0:
                continue
            ax.scatter([x], [y], s=45, color=f"C{i % 10}", zorder=3)
            ax.annotate(
                r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xk + (" (higher = better)" if xk == "forget_quality" else " (lower = better)"))
        ax.set_ylabel(yk + " (higher = better)")
        ax.grid(True, alpha=0.3)
    fig.suptitle("forget / retain trade-off")
    _atomic_savefig(fig, path)
    return True


def _plot_curves(runs: list[dict[str, Any]], path: Path) -> bool:
    keys: set[str] = set()
    for r in runs:
        for row in r["history"] or []:
            keys.update(k for k, v in row.items() if k != "step" and _is_number(v))
    if not keys:
        return False
    keys_sorted = sorted(keys)
    ncols = min(3, len(keys_sorted))
    nrows = math.ceil(len(keys_sorted) / ncols)
    fig, axes = _figure(nrows, ncols, 4.6 * ncols, 3.2 * nrows)
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, keys_sorted):
        for i, r in enumerate(runs):
            pts = sorted(
                (row["step"], row[key])
                for row in (r["history"] or [])
                if key in row and _is_number(row[key])
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="." if len(pts) < 30 else None, color=f"C{i % 10}",
                        label=r["label"])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(keys_sorted):]:
        ax.set_visible(False)
    _atomic_savefig(fig, path)
    return True


def _plot_neurons(runs: list[dict[str, Any]], path: Path) -> bool:
    have = [
        (i, r) for i, r in enumerate(runs)
        if isinstance(r["mask"], Mapping) and r["mask"].get("per_layer_selected")
    ]
    if not have:
        return False
    n_layers = max(len(r["mask"]["per_layer_selected"]) for _, r in have)
    width = 0.8 / len(have)
    fig, axes = _figure(1, 1, max(6.0, 0.35 * n_layers * max(1, len(have)) + 2), 4.0)
    ax = axes[0][0]
    for j, (i, r) in enumerate(have):
        sel = [int(v) for v in r["mask"]["per_layer_selected"]]
        xs = [layer - 0.4 + width * (j + 0.5) for layer in range(len(sel))]
        size = r["mask"].get("intermediate_size")
        lab = r["label"] + (f" (of {size}/layer)" if size else "") + f", total {sum(sel)}"
        ax.bar(xs, sel, width=width, color=f"C{i % 10}", label=lab)
    ax.set_xlabel("layer")
    ax.set_ylabel("selected neurons")
    ax.set_xticks(range(n_layers))
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title("selected neurons per layer")
    _atomic_savefig(fig, path)
    return True


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
# How second-order each run was, from its per-step metrics.jsonl rows (docs/method.md#sophia,
# #newton): (column, key, statistic over the steps that logged the key).
DIAGNOSTICS: tuple[tuple[str, str, str], ...] = (
    ("steps", "loss", "count"),
    ("Sophia clip fraction (median)", "sophia/clip_fraction", "median"),
    ("negative curvature fraction (median)", "sophia/negative_curvature_fraction", "median"),
    ("cos(step, -g) (median)", "newton/cos_neg_grad", "median"),
    ("steps with cos < 0.99", "newton/cos_neg_grad", "below_0.99"),
    ("CG iterations (median)", "newton/cg_iterations", "median"),
    ("steps with CG > 1 iteration", "newton/cg_iterations", "above_1"),
    ("accepted steps", "newton/accepted", "mean"),
    ("rho (median)", "newton/rho", "median"),
)


def diagnostics(history: Sequence[Mapping[str, Any]] | None) -> dict[str, float]:
    """The :data:`DIAGNOSTICS` of one run's metrics.jsonl rows (keys the run never logged are absent)."""
    out: dict[str, float] = {}
    for column, key, stat in DIAGNOSTICS:
        vals = [float(r[key]) for r in history or [] if _is_number(r.get(key)) and math.isfinite(float(r[key]))]
        if not vals:
            continue
        if stat == "count":
            out[column] = float(len(vals))
        elif stat == "median":
            out[column] = float(statistics.median(vals))
        elif stat == "mean":
            out[column] = float(sum(vals) / len(vals))
        elif stat == "below_0.99":
            out[column] = sum(v < 0.99 for v in vals) / len(vals)
        elif stat == "above_1":
            out[column] = sum(v > 1 for v in vals) / len(vals)
    return out if len(out) > 1 else {}  # a step count alone says nothing about curvature


def _diagnostics_table(runs: list[dict[str, Any]]) -> list[str]:
    rows = [(r["label"], diagnostics(r["history"])) for r in runs]
    rows = [(label, d) for label, d in rows if d]
    if not rows:
        return []
    cols = [c for c, _, _ in DIAGNOSTICS if any(c in d for _, d in rows)]
    lines = ["## Second-order diagnostics", "",
             "Per run, over its steps (`metrics.jsonl`); fractions of steps for the 'steps with' columns.", "",
             "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, d in rows:
        cells = [(f"{int(d[c])}" if c == "steps" else f"{d[c]:.3f}") if c in d else "–" for c in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _robustness_table(runs: list[dict[str, Any]]) -> list[str]:
    """One row per (run, model): the unlearned model, the target, then each attack; each cell
    the forget metric, with the attack's recovery in parentheses (docs/metrics.md#robustness-attacks)."""
    have = [r for r in runs if r.get("robustness")]
    if not have:
        return []
    from simu_jax.evaluate.attacks import FORGET_METRICS, attack_table

    rows = [(r["label"], *row) for r in have for row in attack_table(r["robustness"])]
    cols = [c for c in FORGET_METRICS if any(_is_number(v.get(c)) for _, _, v, _ in rows)]
    lines = ["## Robustness attacks", "",
             "Forget metrics after each attack; in parentheses the recovery (after - unlearned) / "
             "(target - unlearned): 0 = nothing undone, 1 = back to the target model.", "",
             "| method | model | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for label, name, vals, rec in rows:
        cells = []
        for c in cols:
            cell = _fmt(float(vals[c])) if _is_number(vals.get(c)) else "–"
            if _is_number(rec.get(c)) and math.isfinite(rec[c]):
                cell += f" ({rec[c]:+.2f})"
            cells.append(cell)
        lines.append(f"| {label} | {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``report.md`` and the PNG plots for ``run_dirs`` into ``out_dir``.

    Returns the path of ``report.md``.  Raises ``FileNotFoundError`` naming the
    path when a run directory or its ``summary.json`` is missing (nothing is
    written in that case).  ``out_dir`` is created if needed.
    """
    runs = [load_run(Path(d)) for d in run_dirs]
    if not runs:
        raise ValueError("write_report needs at least one run directory")
    counts: dict[str, int] = {}
    for r in runs:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    for r in runs:
        r["label"] = r["method"] if counts[r["method"]] == 1 else f"{r['method']} ({r['dir'].name})"

    from simu_jax.base import as_path

    out_dir = as_path(out_dir)  # local, or a URL (gs://, ...): each file one object upload
    out_dir.mkdir(parents=True, exist_ok=True)
    made = {
        "tradeoff.png": _plot_tradeoff(runs, out_dir / "tradeoff.png"),
        "curves.png": _plot_curves(runs, out_dir / "curves.png"),
        "neurons.png": _plot_neurons(runs, out_dir / "neurons.png"),
    }
    for name, ok in made.items():  # drop a stale plot from an earlier report
        if not ok and (out_dir / name).exists():
            (out_dir / name).unlink()

    table = format_table([{"method": r["label"], "metrics": r["metrics"]} for r in runs])
    lines = ["# Unlearning report", "", "## Results", "", table]
    lines += [
        "Values to 3 decimals (non-zero values < 5e-4 in scientific notation); "
        "'–' = not reported by that run.",
        "",
        "## Runs",
        "",
    ]
    for r in runs:
        extras = []
        if r["history"] is not None:
            extras.append(f"{len(r['history'])} metrics.jsonl rows")
        if r["mask"] is not None:
            extras.append("mask summary")
        lines.append(f"- **{r['label']}**: `{r['dir']}`" + (f" ({', '.join(extras)})" if extras else ""))
    lines.append("")
    lines += _robustness_table(runs)
    lines += _diagnostics_table(runs)
    titles = {
        "tradeoff.png": "Forget / retain trade-off",
        "curves.png": "Training curves",
        "neurons.png": "Selected neurons per layer",
    }
    for name, ok in made.items():
        lines += [f"## {titles[name]}", ""]
        if ok:
            lines += [f"![{titles[name]}]({name})", ""]
        else:
            lines += ["_no data for this plot_", ""]
    report = out_dir / "report.md"
    _atomic_write_bytes(report, "\n".join(lines).encode("utf-8"))
    return report


def cli_main(argv: list[str]) -> int:
    """`simu-jax report RUN_DIR... --out DIR`: the markdown table and plots of finished runs."""
    from simu_jax.cli import ArgumentParser

    p = ArgumentParser(prog="simu-jax report", description="Tabulate and plot finished runs.")
    p.add_argument("runs", nargs="+", help="run directories (each with summary.json)")
    p.add_argument("--out", required=True, help="directory for report.md and the PNG plots")
    args = p.parse_args(argv)
    from simu_jax.base import as_path

    path = write_report([Path(r) for r in args.runs], as_path(args.out))
    print(format_table([load_run(Path(r)) for r in args.runs]))
    print(f"report written to {path}")
    return 0
