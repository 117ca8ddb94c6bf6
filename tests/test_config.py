"""Typed configs (strict YAML + overrides), shared specs, and run-directory helpers (runio)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from simu_jax.config import ConfigError, dump_yaml, load_config, to_dict
from simu_jax.data import DataSpec, benchmark_texts, load_benchmark
from simu_jax.models.spec import ModelSpec, build_model, model_config_from_spec
from simu_jax.runio import (
    GracefulSignals,
    MetricsLogger,
    NanGuard,
    NonFiniteLossError,
    is_complete,
    mark_complete,
    prepare_output_dir,
    read_metrics,
    run_metadata,
    write_json_atomic,
    write_text_atomic,
)

# --------------------------------------------------------------------------- a config tree


@dataclass
class Attr:
    t: float = field(default=0.5, metadata={"range": (0.0, 1.0, "(]")})
    m: int = field(default=3, metadata={"range": (1, None)})
    dual: Literal["include", "exclude"] = "include"
    method: str = field(default="ig", metadata={"choices": ("ig", "grad")})


@dataclass
class Opt:
    learning_rate: float = field(default=1e-3, metadata={"range": (0.0, None, "()")})
    betas: tuple[float, float] = (0.9, 0.95)
    layers: list[int] = field(default_factory=list)
    clip: float | None = 1.0


@dataclass
class Extra:
    name: str = "x"


@dataclass
class Root:
    attr: Attr = field(default_factory=Attr)
    opt: Opt = field(default_factory=Opt)
    extra: Extra | None = None
    seed: int = 0
    tags: dict[str, int] = field(default_factory=dict)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg, msg
    return msg


def test_defaults_and_yaml_and_overrides(tmp_path):
    cfg = load_config(Root, None, [])
    assert cfg == Root()
    p = write(tmp_path, "attr:\n  t: 1.0\n  dual: exclude\nopt:\n  learning_rate: 1e-4\n  betas: [0.8, 0.9]\nseed: 3\n")
    cfg = load_config(Root, p, ["opt.layers=[1, 2]", "opt.clip=null", "attr.m=5", "extra.name=abc", "tags.a=1"])
    assert cfg.attr == Attr(t=1.0, m=5, dual="exclude")
    # YAML 1.1 reads "1e-4" as a string: float fields accept it.
    assert cfg.opt.learning_rate == 1e-4 and isinstance(cfg.opt.learning_rate, float)
    assert cfg.opt.betas == (0.8, 0.9) and cfg.opt.layers == [1, 2] and cfg.opt.clip is None
    assert cfg.extra == Extra("abc")  # created from None by a nested override
    assert cfg.seed == 3 and cfg.tags == {"a": 1}
    # an override wins over the file; ints are accepted for floats
    assert load_config(Root, p, ["opt.learning_rate=2"]).opt.learning_rate == 2.0


def test_yaml_round_trip(tmp_path):
    cfg = load_config(Root, None, ["attr.t=0.25", "opt.betas=[0.5, 0.6]", "extra.name=n", "opt.layers=[4]"])
    path = tmp_path / "resolved.yaml"
    write_text_atomic(path, dump_yaml(cfg))
    again = load_config(Root, path, [])
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "overrides, key, fragment",
    [
        (["attr.tt=1"], "attr.tt", "is unknown; allowed keys under attr: t, m, dual, method"),
        (["nope=1"], "nope", "is unknown; allowed keys: attr, opt, extra, seed, tags"),
        (["opt.learning_rate=abc"], "opt.learning_rate", "must be float, got 'abc' (str)"),
        (["seed=1.5"], "seed", "must be int, got 1.5 (float)"),
        (["seed=true"], "seed", "must be int, got True (bool)"),
        (["attr.t=0"], "attr.t", "must be in (0, 1]; got 0.0"),
        (["attr.t=1.5"], "attr.t", "must be in (0, 1]; got 1.5"),
        (["attr.m=0"], "attr.m", "must be in [1, inf]; got 0"),
        (["opt.learning_rate=-0.1"], "opt.learning_rate", "must be in (0, inf); got -0.1"),
        (["opt.learning_rate=.nan"], "opt.learning_rate", "must be in (0, inf); got nan"),
        (["attr.dual=maybe"], "attr.dual", "must be one of include, exclude; got 'maybe'"),
        (["attr.method=hessian"], "attr.method", "must be one of ig, grad; got 'hessian'"),
        (["opt.betas=[0.9]"], "opt.betas", "must be a list of 2 items"),
        (["opt.layers=[1, x]"], "opt.layers[1]", "must be int, got 'x' (str)"),
        (["attr=3"], "attr", "must be a mapping (Attr), got 3 (int)"),
        (["tags.a=b"], "tags.a", "must be int"),
    ],
)
def test_strict_errors_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(Root, None, overrides)
    msg = one_line(e.value)
    assert e.value.key == key
    assert msg.startswith(f"config key '{key}' "), msg
    assert fragment in msg, msg


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(Root, tmp_path / "missing.yaml", [])
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Root, write(tmp_path, "- 1\n- 2\n"), [])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(Root, None, ["seed"])
    with pytest.raises(ConfigError, match="unknown"):  # unknown keys in the file too
        load_config(Root, write(tmp_path, "opt:\n  lr: 1\n"), [])


def test_model_spec_checks():
    with pytest.raises(ConfigError) as e:
        load_config(ModelSpec, None, ["path=/x", "config.hidden_size=8"])
    assert "not both" in one_line(e.value)

    @dataclass
    class Wrap:
        model: ModelSpec = field(default_factory=ModelSpec)

    with pytest.raises(ConfigError) as e:
        load_config(Wrap, None, ["model.config.hidden=8"])
    assert e.value.key == "model.config.hidden" and "hidden_size" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(Wrap, None, ["model.remat=some"])
    assert "must be one of none, full, dots" in str(e.value)

    spec = load_config(ModelSpec, None, ["config.hidden_size=32", "config.intermediate_size=64",
                                         "config.num_attention_heads=2", "config.num_hidden_layers=1"])
    mcfg = model_config_from_spec(spec, vocab_size=100)
    assert (mcfg.head_dim, mcfg.num_key_value_heads, mcfg.vocab_size, mcfg.model_type) == (16, 2, 100, "llama")
    model = build_model(spec, vocab_size=100)
    assert model.config == mcfg
    with pytest.raises(ConfigError, match="vocab_size"):
        model_config_from_spec(spec)


def test_data_spec_checks_and_synthetic_benchmark():
    with pytest.raises(ConfigError) as e:
        load_config(DataSpec, None, ["benchmark=tofu", "forget=forget11"])
    assert e.value.key == "forget" and "forget10" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(DataSpec, None, ["synthetic.forget_fraction=0.6", "synthetic.holdout_fraction=0.5"])
    assert e.value.key == "synthetic.forget_fraction"
    spec = load_config(DataSpec, None, ["synthetic.num_people=10", "synthetic.num_general=5"])
    bench = load_benchmark(spec)
    assert bench.name == "synthetic" and bench.train_general
    assert len(bench.forget) == 5 and len(bench.holdout) == 5 and len(bench.retain) == 40 and len(bench.general) == 5
    assert bench.retain_eval is bench.retain
    texts = benchmark_texts(bench)
    assert bench.forget[0]["answer"] in texts and bench.refusals[0] in texts


def _shared(name: str) -> Path:
    from simu_jax.data import default_data_dir

    path = default_data_dir() / name
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


def test_tofu_benchmark_mapping():
    _shared("tofu")
    bench = load_benchmark(load_config(DataSpec, None, ["benchmark=tofu"]))
    assert (len(bench.forget), len(bench.retain), len(bench.holdout)) == (400, 3600, 400)
    assert len(bench.retain_eval) == 400 and len(bench.general) == 100 + 117
    for rec in (bench.forget[0], bench.retain_eval[0], bench.general[0]):
        assert rec["paraphrased_answer"] and len(rec["perturbed_answer"]) >= 3
    assert len(bench.refusals) == 100
    assert not bench.train_general


def test_lume_benchmark_mapping():
    _shared("lume")
    from simu_jax.data import load_lume

    bench = load_benchmark(load_config(DataSpec, None, ["benchmark=lume"]))
    assert (len(bench.forget), len(bench.retain), len(bench.holdout)) == (2732, 2734, 0)
    raw = load_lume("forget")[0]
    assert bench.forget[0]["question"] == raw["input"] and bench.forget[0]["answer"] == raw["output"]
    with pytest.raises(ConfigError, match="no holdout"):
        load_config(DataSpec, None, ["benchmark=lume", "holdout=x"])


# --------------------------------------------------------------------------- runio


def test_prepare_output_dir_refuses_and_keeps_previous(tmp_path):
    out = tmp_path / "run"
    prepare_output_dir(out)
    (out / "run.json").write_text("{}")
    (out / "model").mkdir()
    (out / "model" / "weights").write_text("old")
    with pytest.raises(FileExistsError) as e:
        prepare_output_dir(out)
    assert "--overwrite" in one_line(e.value) and "--resume" in str(e.value)
    assert (out / "model" / "weights").read_text() == "old"
    assert prepare_output_dir(out, resume=True) == out and (out / "model" / "weights").read_text() == "old"
    prepare_output_dir(out, overwrite=True)
    assert out.is_dir() and list(out.iterdir()) == []
    # --overwrite never deletes a folder that is not a run directory
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a simu-jax run directory"):
        prepare_output_dir(other, overwrite=True)
    assert (other / "thesis.tex").read_text() == "precious"
    with pytest.raises(ValueError, match="mutually exclusive"):
        prepare_output_dir(out, overwrite=True, resume=True)


def test_atomic_writes(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": 1, "nan": float("nan")})
    assert json.loads(path.read_text()) == {"x": 1, "nan": "nan"}
    write_text_atomic(path, "new")
    assert path.read_text() == "new"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(path, "half")
    monkeypatch.undo()
    assert path.read_text() == "new"  # the old content survives a failed write
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temp file left behind
    assert not is_complete(tmp_path)
    mark_complete(tmp_path, {"step": 3})
    assert is_complete(tmp_path)


def test_nan_guard():
    guard = NanGuard(hint="last good checkpoint: step 10")
    assert guard.check(3, {"forget": 1.5, "retain": 2}) == {"forget": 1.5, "retain": 2.0}
    with pytest.raises(NonFiniteLossError) as e:
        guard.check(12, {"forget": 1.0, "retain": float("inf"), "total": float("nan")})
    assert e.value.step == 12 and e.value.term == "retain"
    assert one_line(e.value) == "non-finite loss at step 12: term 'retain' = inf; last good checkpoint: step 10"


def test_graceful_signals_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with GracefulSignals() as sig:
        assert not sig.stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert sig.stop and sig.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second signal stops at once
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before


def test_metrics_logger_and_run_metadata(tmp_path):
    logger = MetricsLogger(tmp_path / "metrics.jsonl")
    logger.log({"step": 1, "loss": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]  # flushed before close
    logger.log(step=2, loss=float("nan"))
    logger.close()
    assert read_metrics(tmp_path / "metrics.jsonl")[1] == {"step": 2, "loss": "nan"}

    meta = run_metadata(Root(seed=7), {"data_hash": "abc", "mask_hash": None})
    assert meta["config"]["seed"] == 7 and meta["seed"] == 7 and meta["data_hash"] == "abc"
    for pkg in ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
        assert meta["versions"][pkg], pkg
    assert meta["device_count"] >= 1 and meta["devices"]
    assert "git" in meta and "mesh" in meta
    json.dumps(meta)  # JSON-able


def test_base_config_chain_merges_mappings_and_refuses_bad_bases(tmp_path):
    from simu_jax.unlearn import UnlearnConfig

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text(
        "steps: 7\nbatch_size: 2\noptim:\n  learning_rate: 0.5\n  damping: 0.25\ndata:\n  max_length: 64\n")
    (tmp_path / "mid.yaml").write_text("base: shared/base.yaml\noptim:\n  damping: 0.125\n")  # relative to this file
    (tmp_path / "run.yaml").write_text("base: mid.yaml\nmethod: simu_newton\nsteps: 9\n")
    cfg = load_config(UnlearnConfig, tmp_path / "run.yaml", ["batch_size=3"])
    # the child overrides key by key; untouched keys of a merged mapping come from the base
    assert (cfg.method, cfg.steps, cfg.batch_size) == ("simu_newton", 9, 3)
    assert (cfg.optim.learning_rate, cfg.optim.damping, cfg.data.max_length) == (0.5, 0.125, 64)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(UnlearnConfig, tmp_path / "a.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="base config not found"):
        load_config(UnlearnConfig, tmp_path / "lost.yaml")
    (tmp_path / "bad.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="base must be the path"):
        load_config(UnlearnConfig, tmp_path / "bad.yaml")
