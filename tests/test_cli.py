"""The `simu-jax` entry point: one-line errors with exit codes, --debug, dispatch, dry-run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from simu_jax import cli
from simu_jax.cli import main

FAST = ["data.synthetic.num_people=10", "data.synthetic.num_general=5", "tokenizer_vocab_size=300",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def one_error(err: list[str]) -> str:
    assert len(err) == 1, err
    assert err[0].startswith("simu-jax: error: "), err
    return err[0][len("simu-jax: error: "):]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learning_rate=-1e-3"], "config key 'learning_rate' must be in (0, inf); got -0.001"),
        (["learning_rat=1e-3"], "config key 'learning_rat' is unknown; allowed keys: model, data, split,"),
        (["batch_size=big"], "config key 'batch_size' must be int, got 'big' (str)"),
        (["split=forget"], "config key 'split' must be one of full, retain, general; got 'forget'"),
        (["data.synthetic.forget_fraction=0"], "config key 'data.synthetic.forget_fraction' must be in (0, 1); got 0.0"),
        (["warmup_ratio=1"], "config key 'warmup_ratio' must be in [0, 1); got 1.0"),
        (["data.benchmark=squad"], "config key 'data.benchmark' must be one of synthetic, tofu, lume; got 'squad'"),
        (["model.config.layers=2"], "config key 'model.config.layers' is not a ModelConfig field; allowed:"),
        (["model.dtype=float16"], "config key 'model.dtype' must be one of float32, bfloat16; got 'float16'"),
        (["adam_betas=[0.9, 1.0]"], "config key 'adam_betas' must be in [0, 1); got 1.0"),
        (["debug.inject_nan_at_step=0"], "config key 'debug.inject_nan_at_step' must be in [1, inf]; got 0"),
    ],
)
def test_config_errors_are_one_line_with_exit_2(capsys, tmp_path, overrides, message):
    out = tmp_path / "out"
    code, _, err = run(capsys, "finetune", "--out", str(out), "--set", *overrides)
    assert code == 2
    assert one_error(err).startswith(message), err
    assert not out.exists()  # failed before touching the output


def test_config_file_errors(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data:\n  benchmark: synthetic\n  max_len: 12\n")
    code, _, err = run(capsys, "finetune", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2
    assert one_error(err).startswith("config key 'data.max_len' is unknown; allowed keys under data: benchmark,")
    code, _, err = run(capsys, "finetune", "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"))
    assert code == 1 and one_error(err) == f"config file not found: {tmp_path / 'missing.yaml'}"
    cfg.write_text("data: [1, 2\n")
    code, _, err = run(capsys, "finetune", "--config", str(cfg), "--out", str(tmp_path / "o"))
    assert code == 2 and "not valid YAML" in one_error(err)


def test_usage_errors(capsys, tmp_path):
    code, _, err = run(capsys)
    assert code == 2 and err[0].startswith("usage: simu-jax")
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and one_error(err).startswith("unknown command 'frobnicate'; commands: finetune, unlearn")
    code, _, err = run(capsys, "finetune", "--out", str(tmp_path / "x"), "--overwrite", "--resume")
    assert code == 2 and "not allowed with argument" in one_error(err)
    code, _, err = run(capsys, "finetune", "--bogus")
    assert code == 2 and one_error(err) == "simu-jax finetune: unrecognized arguments: --bogus"
    code, _, err = run(capsys, "finetune")
    assert code == 2 and "--out is required" in one_error(err)
    code, out, _ = run(capsys, "finetune", "--help")
    assert code == 0 and "--resume" in out and "--dry-run" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("simu-jax ")


def test_missing_command_module_is_reported(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", "simu_jax.no_such_module:cli_main")
    monkeypatch.setitem(cli.COMMANDS, "nofunc", "simu_jax.config:cli_main")
    code, _, err = run(capsys, "ghost")
    assert code == 2 and one_error(err) == ("command 'ghost' is not available in this installation "
                                            "(module simu_jax.no_such_module not found)")
    code, _, err = run(capsys, "nofunc")
    assert code == 2 and "simu_jax.config has no cli_main" in one_error(err)


def test_error_mapping_and_debug(capsys, monkeypatch):
    from simu_jax.runio import NonFiniteLossError

    def boom(exc):
        def cli_main(argv):
            raise exc
        return cli_main

    cases = [
        (FileNotFoundError("model directory /m does not exist"), 1, "model directory /m does not exist"),
        (FileExistsError("output directory /o already exists"), 1, "output directory /o already exists"),
        (ValueError("tensor a has shape (1,)\nbut (2,)"), 1, "tensor a has shape (1,) but (2,)"),
        (NonFiniteLossError(5, "retain", float("nan")), 1, "non-finite loss at step 5: term 'retain' = nan"),
        (KeyboardInterrupt(), 130, "interrupted"),
        (RuntimeError("XLA out of memory"), 1,
         "internal error RuntimeError: XLA out of memory (rerun with --debug for the traceback)"),
    ]
    for exc, code_want, msg in cases:
        monkeypatch.setattr(cli, "_resolve", lambda name, exc=exc: boom(exc))
        code, _, err = run(capsys, "finetune")
        assert code == code_want and one_error(err) == msg, (exc, err)
    monkeypatch.setattr(cli, "_resolve", lambda name: boom(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):
        main(["--debug", "finetune"])
    seen = []
    monkeypatch.setattr(cli, "_resolve", lambda name: lambda argv: seen.append(argv))  # returns None -> 0
    assert main(["finetune", "--out", "x", "--debug"]) == 0 and seen == [["--out", "x"]]  # --debug anywhere


def test_debug_shows_traceback_for_config_errors(capsys):
    from simu_jax.config import ConfigError

    with pytest.raises(ConfigError, match="learning_rate"):
        main(["finetune", "--debug", "--out", "/nonexistent/x", "--set", "learning_rate=0"])


def test_existing_output_is_refused_and_left_intact(capsys, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "model.safetensors").write_bytes(b"previous weights")
    (out / "run.json").write_text('{"status": "complete"}')
    code, _, err = run(capsys, "finetune", "--out", str(out), "--set", *FAST)
    assert code == 1
    assert one_error(err) == (f"output directory {out} already exists (use --overwrite to replace it or "
                              f"--resume to continue it)")
    assert (out / "model" / "model.safetensors").read_bytes() == b"previous weights"
    assert sorted(p.name for p in out.iterdir()) == ["model", "run.json"]


def test_dry_run_prints_plan_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "never"
    code, text, err = run(capsys, "finetune", "--dry-run", "--out", str(out), "--set", *FAST, "epochs=3",
                          "batch_size=4", "grad_accum=2")
    assert code == 0, err
    assert not out.exists()
    assert "finetune plan" in text and "llama from random init: 1 layers, hidden 32" in text
    # 10 people x 5 facts: 5 forget + 40 retain + 5 general = 50 examples, 8 per step -> 7 steps/epoch
    assert "split full: 50 examples (forget 5, retain 40, general 5)" in text
    assert "steps:      21 (7/epoch, 3 epochs" in text and "(batch 4 x accum 2)" in text
    assert "parameters:" in text and "memory:" in text


def test_console_script_subprocess(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "simu_jax.cli", "finetune", "--out", str(tmp_path / "o"),
                           "--set", "model.seed=-1"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "simu-jax: error: config key 'model.seed' must be in [0, inf]; got -1"]


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--out", "gs://bucket/run", "--set", *FAST],
     "output directory gs://bucket/run: gs:// needs gcsfs: pip install gcsfs"),
    (["unlearn", "--out", "gs://bucket/run"], "output directory gs://bucket/run: gs:// needs gcsfs: pip install gcsfs"),
    (["attribute", "--out", "s3://bucket/mask"], "output directory s3://bucket/mask: s3:// needs s3fs: pip install s3fs"),
    (["report", "some/run", "--out", "az://bucket/report"],
     "output directory az://bucket/report: az:// needs adlfs: pip install adlfs"),
    (["unlearn", "--out", "memory://run"], "output directory memory://run: memory:// is not a supported storage"),
])
def test_remote_output_paths_without_their_backend_are_refused(capsys, tmp_path, monkeypatch, argv, message):
    """A URL is never made a local path (`Path("gs://bucket/run")` is the local `gs:/bucket/run`:
    a TPU pod's workers would each write their own disk). Without the scheme's fsspec package
    (offline here: no gcsfs, s3fs, adlfs) it is refused in one line naming the path and the
    package (exit 2), before anything is read or written."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and one_error(err).startswith(message), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["model.path", "reference"])
def test_remote_model_paths_without_their_backend_are_refused_when_the_config_loads(capsys, tmp_path, monkeypatch,
                                                                                      key):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "unlearn", "--out", str(tmp_path / "run"), "--set", f"{key}=gs://bucket/llama")
    assert code == 2 and one_error(err) == f"{key} gs://bucket/llama: gs:// needs gcsfs: pip install gcsfs", err
    assert list(tmp_path.iterdir()) == []
