"""Tests for simu_jax.evaluate.report."""

import json
from pathlib import Path

import pytest

from simu_jax.evaluate.report import format_table, load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(d: Path, method, metrics, history=None, mask=None, raw_tail=None):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"method": method, "metrics": metrics}))
    if history is not None:
        lines = [json.dumps(h) for h in history]
        if raw_tail is not None:
            lines.append(raw_tail)
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if mask is not None:
        (d / "mask_summary.json").write_text(json.dumps(mask))
    return d


@pytest.fixture
def two_runs(tmp_path):
    a = _write_run(
        tmp_path / "runs" / "simu",
        "SIMU",
        {"forget_rouge": 0.1234, "retain_rouge": 0.8, "model_utility": 0.55,
         "forget_quality": 1e-5, "notes": "text is ignored"},
        history=[{"step": s, "forget_loss": 2.0 + s / 10, "retain_loss": 0.5,
                  "eval/forget_rouge": 0.9 - s / 100} for s in range(0, 50, 10)],
        mask={"per_layer_forget": [5, 3, 0, 1], "per_layer_retain": [1, 1, 2, 0],
              "per_layer_selected": [4, 2, 0, 1], "intermediate_size": 64},
    )
    b = _write_run(
        tmp_path / "runs" / "gd",
        "GradDiff",
        {"forget_rouge": 0.3, "retain_rouge": 0.7004, "model_utility": 0.5, "aggregate": 0.4},
        history=[{"step": s, "forget_loss": 3.0 - s / 10, "retain_loss": 0.6} for s in range(0, 40, 10)],
        raw_tail='{"step": 40, "forget_lo',  # truncated last line (interrupted run)
    )
    return a, b


def _table_rows(md: str):
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for l in lines[2:]:
        cells = [c.strip() for c in l.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells))
    return header, rows


def test_write_report_table_and_pngs(two_runs, tmp_path):
    out = tmp_path / "report"
    with pytest.warns(UserWarning, match="not valid JSON"):
        path = write_report(list(two_runs), out)
    assert path == out / "report.md" and path.is_file()
    md = path.read_text()
    header, rows = _table_rows(md)
    # paper-like order: forget scores, retain scores, utility, aggregate
    assert header == ["method", "forget_rouge", "forget_quality", "retain_rouge",
                      "model_utility", "aggregate"]
    assert set(rows) == {"SIMU", "GradDiff"}
    assert rows["SIMU"]["forget_rouge"] == "0.123"
    assert rows["SIMU"]["retain_rouge"] == "0.800"
    assert rows["SIMU"]["model_utility"] == "0.550"
    assert rows["SIMU"]["forget_quality"] == "1.00e-05"
    assert rows["SIMU"]["aggregate"] == "–"
    assert rows["GradDiff"]["retain_rouge"] == "0.700"
    assert rows["GradDiff"]["aggregate"] == "0.400"
    assert rows["GradDiff"]["forget_quality"] == "–"
    for name in ("tradeoff.png", "curves.png", "neurons.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5000, name
        assert f"({name})" in md
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "neurons.png",
                                                     "report.md", "tradeoff.png"]


def test_report_without_optional_files(tmp_path):
    a = _write_run(tmp_path / "a", "A", {"forget_rouge": 0.2, "retain_rouge": 0.6,
                                         "model_utility": 0.4})
    out = tmp_path / "out"
    # stale plot from an earlier report must not survive
    out.mkdir()
    (out / "neurons.png").write_bytes(b"old")
    write_report([a], out)
    assert (out / "tradeoff.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "curves.png").exists()
    assert not (out / "neurons.png").exists()
    assert "_no data for this plot_" in (out / "report.md").read_text()


def test_duplicate_method_names_are_disambiguated(tmp_path):
    a = _write_run(tmp_path / "seed0", "SIMU", {"forget_rouge": 0.1, "retain_rouge": 0.9,
                                                "model_utility": 0.5})
    b = _write_run(tmp_path / "seed1", "SIMU", {"forget_rouge": 0.2, "retain_rouge": 0.8,
                                                "model_utility": 0.6})
    _, rows = _table_rows(write_report([a, b], tmp_path / "o").read_text())
    assert set(rows) == {"SIMU (seed0)", "SIMU (seed1)"}


def test_missing_run_dir_or_summary(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        write_report([missing], tmp_path / "o")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_run.summary\.json"):
        write_report([empty], tmp_path / "o2")
    assert not (tmp_path / "o2" / "report.md").exists()


def test_load_run_schema(two_runs):
    run = load_run(two_runs[0])
    assert run["method"] == "SIMU"
    assert "notes" not in run["metrics"]
    assert [h["step"] for h in run["history"]] == [0, 10, 20, 30, 40]
    assert run["mask"]["intermediate_size"] == 64


def test_format_table_flat_and_nested_rows():
    txt = format_table([
        {"method": "X", "metrics": {"model_utility": 0.12345, "forget_rouge": 1.0}},
        {"method": "Y", "forget_rouge": 0.0, "mia_auc": 0.5004, "zzz_custom": 2},
    ])
    lines = txt.strip().splitlines()
    assert lines[0] == "| method | forget_rouge | model_utility | mia_auc | zzz_custom |"
    assert lines[2] == "| X | 1.000 | 0.123 | – | – |"
    assert lines[3] == "| Y | 0.000 | – | 0.500 | 2.000 |"


def test_second_order_diagnostics_from_metrics_rows():
    from simu_jax.evaluate.report import diagnostics

    rows = [{"step": i + 1, "loss": 1.0, "newton/cos_neg_grad": c, "newton/cg_iterations": it, "newton/accepted": a,
             "newton/rho": r} for i, (c, it, a, r) in enumerate([(1.0, 1, 1, 0.5), (0.5, 3, 1, 0.9), (0.98, 2, 0, -1.0),
                                                                 (float("nan"), 5, 1, 0.2)])]
    d = diagnostics(rows)
    assert d["steps"] == 4
    assert d["steps with cos < 0.99"] == 2 / 3 and d["cos(step, -g) (median)"] == 0.98  # NaN rows skipped
    assert d["steps with CG > 1 iteration"] == 3 / 4 and d["CG iterations (median)"] == 2.5
    assert d["accepted steps"] == 3 / 4 and d["rho (median)"] == 0.35
    assert "Sophia clip fraction (median)" not in d
    sophia = diagnostics([{"step": 1, "loss": 0.0, "sophia/clip_fraction": 0.9}, {"step": 2, "loss": 0.0,
                                                                               "sophia/clip_fraction": 0.7}])
    assert sophia["Sophia clip fraction (median)"] == pytest.approx(0.8)
    assert diagnostics([{"step": 1, "loss": 0.0}]) == {}  # no second-order key: no row in the table
