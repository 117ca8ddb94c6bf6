"""End to end: `simu-jax demo --quick`, then `simu-jax unlearn` on its target: outputs, errors, resume, NaN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from simu_jax.cli import main
from simu_jax.evaluate.report import load_run
from simu_jax.models.convert import load_pretrained
from simu_jax.models import split_params

METHODS = ("simu_graddiff", "simu_newton", "so_graddiff", "fo_graddiff")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_demo_outputs(demo, capsys):
    report = (demo / "report" / "report.md").read_text()
    for method in METHODS:
        assert method in report
        run = load_run(demo / "runs" / method)
        m = run["metrics"]
        for key in ("forget_rouge", "retain_rouge", "model_utility", "forget_quality", "forget_prob"):
            assert key in m and np.isfinite(m[key]), (method, key)
        assert (demo / "runs" / method / "COMPLETE").is_file()
        assert (demo / "runs" / method / "model" / "model.safetensors").is_file()
    for png in ("tradeoff.png", "curves.png", "neurons.png"):
        assert (demo / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the target memorized its forget set; unlearning moved the forget answers' probability down
    target = load_run(demo / "runs" / "target")["metrics"]
    assert target["forget_prob"] > 0.5
    for method in METHODS:
        assert load_run(demo / "runs" / method)["metrics"]["forget_prob"] < target["forget_prob"], method
    # the reference is the retain-only model itself: forget quality of a model against itself is 1
    assert load_run(demo / "runs" / "retain_only")["metrics"]["forget_quality"] == pytest.approx(1.0)


def test_demo_rerun_reuses_everything(demo, capsys):
    before = (demo / "runs" / "simu_graddiff" / "model" / "model.safetensors").stat().st_mtime_ns
    assert main(["demo", "--quick", "--quiet", "--out", str(demo)]) == 0
    err = capsys.readouterr().err
    assert "reusing target model" in err and "reusing retain model" in err
    assert (demo / "runs" / "simu_graddiff" / "model" / "model.safetensors").stat().st_mtime_ns == before


def _unlearn_args(demo, out, *extra):
    return ["unlearn", "--quiet", "--out", str(out), "--set", f"model.path={demo / 'target' / 'model'}",
            "data.synthetic.num_people=10", "data.synthetic.num_general=10", "steps=4", "batch_size=4",
            "eval.enabled=false", "checkpoint_every=2", f"attribution.mask_path={demo / 'runs' / 'simu_graddiff' / 'mask'}",
            "optim.learning_rate=1e-2", *extra]


def _params(run):
    return split_params(load_pretrained(run / "model"))[1]


@pytest.fixture(scope="module")
def plain(demo, tmp_path_factory):
    """One uninterrupted run of `_unlearn_args` (no extra overrides), shared by the tests that
    compare against it or need a finished run directory: each used to run this same config itself."""
    out = tmp_path_factory.mktemp("plain") / "run"
    assert main(_unlearn_args(demo, out)) == 0
    return out


def test_resume_after_interrupt_equals_uninterrupted(demo, plain, tmp_path, capsys):
    full = plain
    part = tmp_path / "part"
    assert main(_unlearn_args(demo, part, "debug.stop_after_step=2")) == 75  # interrupted, checkpoint written
    assert not (part / "COMPLETE").exists() and not (part / "model").exists()
    # a resume that would change the trajectory is refused, naming the key (the run loop's check)
    changed = _unlearn_args(demo, part, "optim.learning_rate=2e-2")
    assert main(changed[:1] + ["--resume"] + changed[1:]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err
    assert main(_unlearn_args(demo, part)[:1] + ["--resume"] + _unlearn_args(demo, part)[1:]) == 0
    for a, b in zip(jax.tree.leaves(_params(full)), jax.tree.leaves(_params(part))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    losses = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r]
    assert losses(full)[-1] == losses(part)[-1]


def test_nan_stops_with_step_and_term(demo, tmp_path, capsys):
    out = tmp_path / "nan"
    assert main(_unlearn_args(demo, out, "debug.inject_nan_at_step=4")) == 1  # 1-based, as the guard reports it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step 4" in err[0] and "forget" in err[0]
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["last_checkpoint"] == 2
    assert not (out / "COMPLETE").exists() and not (out / "model").exists()


@pytest.mark.parametrize("override, needle", [
    ("attribution.threshold=1.5", "attribution.threshold"),
    ("optim.learning_rate=-1", "optim.learning_rate"),
    ("loss.gamma=-0.5", "loss.gamma"),
    ("attribution.steps=0", "attribution.steps"),
    ("method=simu_magic", "method"),
    ("optimm.learning_rate=1", "optimm"),
])
def test_bad_config_one_line_error(demo, tmp_path, capsys, override, needle):
    out = tmp_path / "bad"
    assert main(_unlearn_args(demo, out, override)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not out.exists()


def test_bad_inputs_keep_previous_output(demo, plain, tmp_path, capsys):
    good = plain
    snapshot = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    # rerun into an existing directory: refused, nothing touched
    assert main(_unlearn_args(demo, good)) == 1
    assert "already exists" in capsys.readouterr().err
    # a missing model directory
    assert main(_unlearn_args(demo, tmp_path / "x", f"model.path={tmp_path / 'nope'}")) == 1
    assert "nope" in capsys.readouterr().err
    # a mesh that does not divide the device count
    assert main(_unlearn_args(demo, tmp_path / "y") + ["--mesh", "fsdp=3"]) == 1
    assert "fsdp=3" in capsys.readouterr().err
    # a mask that selects no neuron
    empty = tmp_path / "empty_mask"
    shutil.copytree(demo / "runs" / "simu_graddiff" / "mask", empty)
    sel = np.load(empty / "mask.npz")
    np.savez(empty / "mask.npz", selected=np.zeros_like(sel["selected"]))
    assert main(_unlearn_args(demo, tmp_path / "z", f"attribution.mask_path={empty}")) == 1
    assert "zero neurons" in capsys.readouterr().err
    # a tokenizer with more tokens than the model's vocabulary
    model_copy = tmp_path / "vocab_model"
    shutil.copytree(demo / "target" / "model", model_copy)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(model_copy))
    tok.add_tokens([f"extra_token_{i}" for i in range(2000)])
    tok.save_pretrained(str(model_copy))
    assert main(_unlearn_args(demo, tmp_path / "v", f"model.path={model_copy}")) == 1
    assert "vocab_size" in capsys.readouterr().err
    # an empty forget set (a TOFU directory whose forget split holds no rows)
    from simu_jax.data import default_data_dir

    tofu = default_data_dir() / "tofu"
    if tofu.is_dir():
        empty_tofu = tmp_path / "tofu"
        empty_tofu.mkdir()
        for f in tofu.iterdir():
            (empty_tofu / f.name).symlink_to(f)
        (empty_tofu / "forget10_perturbed.json").unlink()
        (empty_tofu / "forget10_perturbed.json").write_text("[]")
        assert main(_unlearn_args(demo, tmp_path / "e", "data.benchmark=tofu", f"data.source={empty_tofu}")) == 1
        err = capsys.readouterr().err
        assert "forget set" in err and "empty" in err
    after = {p.relative_to(good): p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert after == snapshot


def _damage(kind: str, src, dst):
    """A copy of directory ``src`` at ``dst`` damaged one way; returns the file the error must name."""
    shutil.copytree(src, dst)
    if kind in ("truncated", "corrupt_header"):
        f = dst / "model.safetensors"
        raw = bytearray(f.read_bytes())
        raw = raw[: len(raw) // 2] if kind == "truncated" else raw[:8] + b"\x00not json" + raw[17:]
        f.write_bytes(bytes(raw))
    elif kind == "bad_config":
        f = dst / "config.json"
        f.write_text("{not json")
    elif kind == "garbage_mask":
        f = dst / "mask.npz"
        f.write_bytes(b"\x80\x04garbage, not an npz")
    elif kind == "not_a_mask":
        f = dst / "mask.npz"
        np.savez(f, weights=np.zeros((2, 3)))
    return f


@pytest.mark.parametrize("key, kind", [
    ("model.path", "truncated"), ("model.path", "corrupt_header"), ("model.path", "bad_config"),
    ("reference", "truncated"), ("attribution.mask_path", "garbage_mask"), ("attribution.mask_path", "not_a_mask"),
])
def test_bad_model_and_mask_files_are_one_line_naming_the_file_and_write_nothing(demo, tmp_path, capsys, key, kind):
    """Refused before the run directory exists (headers and the mask only: no weight is read,
    nothing compiled): exit 1, one line naming the file, no output directory."""
    src = demo / ("runs/simu_graddiff/mask" if key.startswith("attribution") else "target/model")
    named = _damage(kind, src, tmp_path / "input")
    out = tmp_path / "run"
    assert main(_unlearn_args(demo, out, f"{key}={tmp_path / 'input'}")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"simu-jax: error: {named}") and "internal error" not in err[0], err
    assert not out.exists()


def test_unlearn_and_evaluate_on_an_object_store(demo, plain, tmp_path, capsys):
    """The model, the mask, the run directory and the evaluation's output all on gs:// (an
    in-memory store with gcsfs's semantics, tests/remote_fs.py): the same model bytes, mask and
    metrics as the local run, COMPLETE last; evaluating the remote model into gs:// gives the
    local model's numbers. (No checkpoint is written: orbax writes gs:// arrays with TensorStore's
    GCS driver, which no offline store serves.)"""
    sys.path.insert(0, os.path.dirname(__file__))
    import remote_fs

    from simu_jax.base import as_path

    remote_fs.install()
    try:
        for src, url in ((demo / "target" / "model", "gs://bucket/target"),
                         (demo / "runs" / "simu_graddiff" / "mask", "gs://bucket/mask")):
            for f in src.iterdir():
                (as_path(url) / f.name).write_bytes(f.read_bytes())
        args = _unlearn_args(demo, "gs://bucket/run", "model.path=gs://bucket/target",
                             "attribution.mask_path=gs://bucket/mask", "checkpoint_every=100")
        assert main(args) == 0
        run = {k.removeprefix("bucket/run/"): v for k, v in remote_fs.objects("bucket/run/").items()}
        assert list(run)[-1] == "COMPLETE" and json.loads(run["run.json"])["status"] == "complete"
        for f in (plain / "model").iterdir():
            assert run[f"model/{f.name}"] == f.read_bytes(), f.name
        def rows(text):
            return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in text.splitlines()]

        assert rows(run["metrics.jsonl"].decode()) == rows((plain / "metrics.jsonl").read_text())
        assert not any(k.startswith("checkpoints/") for k in run)

        ev = ["evaluate", "--benchmark", "synthetic", "--limit", "3", "--no-generate"]
        assert main([*ev, "--model", "gs://bucket/run/model", "--out", "gs://bucket/eval"]) == 0
        assert main([*ev, "--model", str(plain / "model"), "--out", str(tmp_path / "eval")]) == 0
        remote = json.loads(remote_fs.objects()["bucket/eval/summary.json"])
        local = json.loads((tmp_path / "eval" / "summary.json").read_text())
        assert remote["metrics"] == local["metrics"] and remote["model"] == "gs://bucket/run/model"
    finally:
        remote_fs.uninstall()
    capsys.readouterr()


def test_attribute_command_writes_reusable_mask(demo, tmp_path, capsys):
    out = tmp_path / "mask"
    args = ["attribute", "--quiet", "--out", str(out), "--set", f"model.path={demo / 'target' / 'model'}",
            "data.synthetic.num_people=10", "data.synthetic.num_general=10", "attribution.threshold=0.5"]
    assert main(args) == 0
    summary = json.loads((out / "mask_summary.json").read_text())
    demo_summary = json.loads((demo / "runs" / "simu_graddiff" / "mask" / "mask_summary.json").read_text())
    assert summary["per_layer_selected"] == demo_summary["per_layer_selected"]  # same config -> same mask
    assert summary["num_selected"] > 0


def _small_lume_data_dir(root, rows: int = 64, docs: int = 4):
    """A data root (``$SIMU_JAX_DATA_DIR``) holding the first `rows` rows of each LUME split and
    the first `docs` SemEval member / nonmember documents of the shared data. The run evaluates
    the first ``eval.limit`` rows of each split either way; scoring all 150 + 150 MIA documents
    at the model's full length was most of this test's time, and 16 + 16 still half of it in
    bf16 (the keys and the mia_score identity checked below do not depend on how many documents
    there are; with ``eval.batch_size=4`` one pass scores each set, no padding rows)."""
    from simu_jax.data import default_data_dir

    src = default_data_dir()
    for sub, names, n in (("lume", ("forget.jsonl", "retain.jsonl"), rows),
                          ("semeval25_task4/mia_data", ("member.jsonl", "nonmember.jsonl"), docs)):
        (root / sub).mkdir(parents=True)
        for name in names:
            lines = (src / sub / name).read_text().splitlines()
            assert len(lines) > n, (sub, name, len(lines))  # a real subset of the shared data
            (root / sub / name).write_text("\n".join(lines[:n]) + "\n")
    return root


def test_unlearn_on_lume_evaluates_official_metrics_and_mia(demo, tmp_path, monkeypatch):
    """LUME rows reach the scorer as input/output (the benchmark stores them as question/answer),
    and the SemEval member/nonmember documents give the MIA keys."""
    from simu_jax.data import load_lume

    monkeypatch.setenv("SIMU_JAX_DATA_DIR", str(_small_lume_data_dir(tmp_path / "data")))
    mmlu = tmp_path / "mmlu"  # eval.mmlu: Hendrycks' layout, one subject
    for split, rows in (("test", "What is 1 + 1?,1,2,3,4,B\nWhat is 2 + 2?,4,3,2,1,A\n"),
                        ("dev", "What is 0 + 1?,0,1,2,3,B\n")):
        (mmlu / split).mkdir(parents=True)
        (mmlu / split / f"arithmetic_{split}.csv").write_text(rows)
    out = tmp_path / "lume"
    args = ["unlearn", "--quiet", "--out", str(out), "--set", f"model.path={demo / 'target' / 'model'}",
            "data.benchmark=lume", "data.max_length=64", "method=fo_graddiff", "steps=1", "batch_size=2",
            "eval.limit=3", "eval.max_new_tokens=4", "eval.batch_size=4", f"eval.mmlu={mmlu}"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    for key in ("task_aggregate", "forget_regurgitation", "retain_regurgitation", "mia_auc_loss", "mia_score",
                "mmlu"):
        assert key in m and np.isfinite(m[key]), key
    assert m["mia_score"] == pytest.approx(1 - 2 * abs(m["mia_auc_loss"] - 0.5))
    assert m["mmlu"] in (0.0, 0.5, 1.0) and summary["details"]["semeval"]["complete"]
    meta = json.loads((out / "per_sample.json").read_text())["meta"]
    assert (meta["protocol"], meta["dtype"]) == ("semeval", "bfloat16")  # SemEval's script: bf16, clean-up decode
    scored = {r["id"] for r in json.loads((out / "per_sample.json").read_text())["rows"]}
    for row in load_lume("forget")[:3]:  # the first `limit` forget rows were generated from and scored
        assert row["id"] in scored


def test_early_stop_and_keep_best(demo, tmp_path):
    out = tmp_path / "best"
    # a constant learning rate (the paper's Sophia, not SOUL's schedule, whose horizon is `steps`),
    # so the first N steps of this run are a run of N steps
    const = "optim.preset=sophia"
    args = _unlearn_args(demo, out, const, "steps=6", "eval.every=1", "eval.keep_best=true",
                         "eval.stop_forget_loss=3.0")
    assert main(args) == 0
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r for r in rows if "eval/forget_loss" in r and r["step"] > 0]
    reached = [r["step"] for r in curve if r["eval/forget_loss"] >= 3.0]
    last = curve[-1]["step"]
    assert reached == ([last] if reached else [])  # stopped at the first step that reached the target
    assert reached or last == 6
    scores = {r["step"]: r["eval/forget_loss"] - r["eval/retain_loss"] for r in curve}
    best = json.loads((out / "result.json").read_text())["best_step"]
    assert best == max(scores, key=scores.get)
    # the written model is the best step's: equal to a plain run of exactly that many steps
    plain = tmp_path / "plain"
    assert main(_unlearn_args(demo, plain, const, f"steps={best}")) == 0
    for a, b in zip(jax.tree.leaves(_params(out)), jax.tree.leaves(_params(plain))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def _cli(args, env_extra=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return [sys.executable, "-m", "simu_jax.cli", *args], env


def test_mesh_run_matches_single_device(demo, plain, tmp_path):
    """`simu-jax unlearn --mesh fsdp=2,tensor=4` on 8 host devices == the single-device run."""
    single, meshed = plain, tmp_path / "meshed"
    cmd, env = _cli(_unlearn_args(demo, meshed) + ["--mesh", "fsdp=2,tensor=4"],
                    {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((meshed / "run.json").read_text())["mesh"] == "fsdp=2,tensor=4"
    # One step is equal to <= 1e-5 (tests/test_sharding.py). Over the run's Sophia steps (fisher,
    # lr 1e-2) the update is lr * clip(m / (rho * bs * h), 1) with m ~ g and h ~ g^2, i.e.
    # -lr * sign(g) wherever |g| is small: a gradient at rounding level whose sign differs between
    # the two reduction orders moves that coordinate by up to 2 * lr per step. So: all but a
    # handful of coordinates agree to 1% of one step, and none differs by more than 2 * lr * steps.
    lr, steps = 1e-2, 4
    off, total, sq = 0, 0, 0.0
    for a, b in zip(jax.tree.leaves(_params(single)), jax.tree.leaves(_params(meshed))):
        diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert diff.max() <= 2 * lr * steps
        off, total, sq = off + int((diff > 1e-2 * lr).sum()), total + diff.size, sq + float(np.sum(diff**2))
    assert off <= 1e-4 * total, f"{off} of {total} coordinates differ by more than 1% of one step"
    # The losses: step 1 sees the same parameters (only the reduction order differs); a later
    # step's parameters differ by at most the final distance d (the runs drift apart), so its
    # loss by about |g| * d to first order
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
            for run in (single, meshed)]
    assert len(rows[0]) == len(rows[1]) == steps
    assert abs(rows[0][0]["loss"] - rows[1][0]["loss"]) <= 1e-5 * max(1.0, abs(rows[0][0]["loss"]))
    for s, m in zip(rows[0][1:], rows[1][1:]):
        assert abs(s["loss"] - m["loss"]) <= s["grad_norm"] * np.sqrt(sq) + 1e-5 * max(1.0, abs(s["loss"])), (s, m)


def test_mesh_that_would_replicate_the_batch_is_refused_before_anything_is_written(demo, tmp_path):
    """batch_size=4 on fsdp=8: every pair of devices would compute the same rows; refused in one
    line, exit 1, no run directory."""
    out = tmp_path / "refused"
    cmd, env = _cli(_unlearn_args(demo, out) + ["--mesh", "fsdp=8"],
                    {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()})
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr[-2000:]
    assert "batch_size = 4 rows do not divide the batch axes fsdp=8 = 8" in err[0]
    assert not out.exists()


def test_sigkill_then_resume_equals_uninterrupted(demo, plain, tmp_path):
    """`plain` is the uninterrupted run (4 steps, a checkpoint every 2). The killed run sleeps 2 s
    after each step: once checkpoint 2 is in place, steps 3 and 4 and their sleeps (> 4 s) are
    left to kill it in."""
    full, killed = plain, tmp_path / "killed"
    cmd, env = _cli(_unlearn_args(demo, killed, "debug.sleep_per_step=2.0"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        ckpts = killed / "checkpoints"
        done = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if any(step >= 2 for step in done):  # a finished checkpoint (orbax renames it into place)
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()  # SIGKILL: no handler runs, no final checkpoint
    proc.wait()
    assert not (killed / "COMPLETE").exists()
    resume = _unlearn_args(demo, killed)
    assert main(resume[:1] + ["--resume"] + resume[1:]) == 0
    for a, b in zip(jax.tree.leaves(_params(full)), jax.tree.leaves(_params(killed))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_demo_runs_log_second_order_diagnostics(demo, capsys):
    """Every step of a Newton-type run logs its trust-region diagnostics and every Sophia step its
    clip fraction (metrics.jsonl); the report tabulates them; --dry-run plans each Newton method."""
    def steps(method):
        rows = [json.loads(line) for line in (demo / "runs" / method / "metrics.jsonl").read_text().splitlines()]
        return [r for r in rows if "loss" in r]

    for method in ("simu_newton", "simu_ggn"):
        rows = steps(method)
        assert rows
        for r in rows:
            for k in ("newton/rho", "newton/cg_exit", "newton/cos_neg_grad", "newton/cg_iterations", "newton/radius",
                      "newton/accepted", "newton/predicted_decrease", "newton/actual_decrease"):
                assert k in r, (method, k)
            assert r["newton/cg_exit"] in (0, 1, 2, 3) and -1 - 1e-6 <= r["newton/cos_neg_grad"] <= 1 + 1e-6
        # issue 14: in the demo's setting the steps are not the gradient direction and the solver
        # does more than one product, on most steps (simu_newton by the Lanczos solver, its default)
        cos = np.array([r["newton/cos_neg_grad"] for r in rows])
        products = np.array([r["newton/cg_iterations"] for r in rows])
        assert np.mean(cos < 0.99) > 0.5 and np.mean(products > 1) > 0.5, (method, cos, products)
    config = (demo / "runs" / "simu_newton" / "config.yaml").read_text()
    assert "tr_solver: lanczos" in config, config
    for method in ("so_graddiff", "simu_graddiff"):
        for r in steps(method):
            assert 0 <= r["sophia/clip_fraction"] <= 1, method
    assert "## Second-order diagnostics" in (demo / "report" / "report.md").read_text()
    common = ["--set", f"model.path={demo / 'target' / 'model'}", "data.synthetic.num_people=10",
              "data.synthetic.num_general=10"]
    for method in ("simu_newton", "simu_ggn", "simu_influence", "so_influence", "so_newton"):
        assert main(["unlearn", "--dry-run", "--out", str(demo / "unused"), *common, f"method={method}"]) == 0
        out = capsys.readouterr().out
        assert "memory estimate (bytes)" in out and "optimizer" in out, method
