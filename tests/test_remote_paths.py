"""Remote paths (gs:// and the other etils.epath schemes): simu_jax.base.as_path, and the run
directory, masks and HF directories on an object store (tests/remote_fs.py: an in-memory store
with gcsfs's semantics behind gs://, since gcsfs is not installed offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import remote_fs
from simu_jax.base import UsageError, as_path, is_remote


@pytest.fixture
def gcs():
    store = remote_fs.install()
    yield store
    remote_fs.uninstall()


def test_local_paths_stay_pathlib_and_urls_become_epath_paths(gcs):
    from etils import epath

    for text in ("run", "/abs/run", "./a/b", "gs:/not-a-url"):
        p = as_path(text)
        assert type(p) is type(Path(text)) and str(p) == str(Path(text))
        assert not is_remote(p)
    p = as_path("gs://bucket/run")
    assert isinstance(p, epath.Path) and str(p) == "gs://bucket/run" and str(p / "model") == "gs://bucket/run/model"
    assert as_path(p) is p and is_remote(p / "x")  # idempotent: every layer may call it again


@pytest.mark.parametrize("text, what, kw, message", [
    ("gs://bucket/run", "output directory", {}, "output directory gs://bucket/run: gs:// needs gcsfs: pip install gcsfs"),
    ("s3://bucket/m", "model.path", {}, "model.path s3://bucket/m: s3:// needs s3fs: pip install s3fs"),
    ("az://c/m", "model.path", {}, "model.path az://c/m: az:// needs adlfs: pip install adlfs"),
    ("memory://x", "output directory", {}, "output directory memory://x: memory:// is not a supported storage scheme "
     "(supported: local paths, gs://, s3://, az://, hf://)"),
    ("s3://bucket/run", "output directory", {"checkpoints": True}, "output directory s3://bucket/run: orbax "
     "checkpoints (in every run directory) can be written to local paths and gs:// only, not s3://"),
])
def test_unsupported_schemes_are_one_line_naming_the_path_and_the_package(text, what, kw, message):
    with pytest.raises(UsageError) as e:
        as_path(text, what, **kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_run_directory_on_an_object_store(gcs):
    from simu_jax.runio import (MetricsLogger, is_complete, mark_complete, prepare_output_dir, read_metrics,
                                write_json_atomic)

    out = prepare_output_dir("gs://bucket/run")
    assert str(out) == "gs://bucket/run" and remote_fs.objects() == {}  # no empty directories on a store
    write_json_atomic(out / "run.json", {"status": "running", "x": float("nan")})
    assert json.loads(remote_fs.objects()["bucket/run/run.json"]) == {"status": "running", "x": "nan"}
    assert not is_complete(out)
    with pytest.raises(FileExistsError, match="output directory gs://bucket/run already exists"):
        prepare_output_dir("gs://bucket/run")
    assert prepare_output_dir("gs://bucket/run", resume=True) == out and "bucket/run/run.json" in remote_fs.objects()

    # metrics.jsonl: objects cannot be appended to; lines are uploaded whole (now: every line)
    MetricsLogger.remote_flush_s = 0.0
    try:
        with MetricsLogger(out / "metrics.jsonl") as log:
            log.log(step=1, loss=2.5)
            assert remote_fs.objects()["bucket/run/metrics.jsonl"] == b'{"step": 1, "loss": 2.5}\n'
            log.log(step=2, loss=float("inf"))
        with MetricsLogger(out / "metrics.jsonl") as log:  # a resumed run keeps the earlier lines
            log.log(step=3, loss=1.0)
    finally:
        MetricsLogger.remote_flush_s = 30.0
    assert read_metrics(out / "metrics.jsonl") == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": "inf"},
                                                   {"step": 3, "loss": 1.0}]
    with MetricsLogger(out / "metrics.jsonl") as log:  # throttled: nothing uploaded until close
        log._flushed = float("inf")
        log.log(step=4)
        assert len(read_metrics(out / "metrics.jsonl")) == 3
    assert read_metrics(out / "metrics.jsonl")[-1] == {"step": 4}

    mark_complete(out, {"step": 4})
    assert is_complete(out) and list(remote_fs.objects())[-1] == "bucket/run/COMPLETE"
    out2 = prepare_output_dir("gs://bucket/run", overwrite=True)  # deleted, COMPLETE first
    assert out2 == out and remote_fs.objects() == {}
    (as_path("gs://bucket/other") / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="is not a simu-jax run directory"):
        prepare_output_dir("gs://bucket/other", overwrite=True)
    assert remote_fs.objects() == {"bucket/other/notes.txt": b"keep"}


def test_checkpointer_keeps_the_url(gcs, tmp_path):
    """`Path("gs://b/run").absolute()` was the local `/cwd/gs:/b/run`: orbax gets the URL."""
    from etils import epath

    from simu_jax.checkpoint import Checkpointer

    with Checkpointer("gs://bucket/run/checkpoints", async_save=False) as ck:
        assert isinstance(ck.directory, epath.Path) and str(ck.directory) == "gs://bucket/run/checkpoints"
        assert ck.latest_step() is None
    with Checkpointer(tmp_path / "ck", async_save=False) as ck:
        assert isinstance(ck.directory, Path) and ck.directory == (tmp_path / "ck").absolute()


def test_mask_on_an_object_store(gcs, tmp_path):
    from simu_jax.attribution import NeuronMask

    rng = np.random.default_rng(0)
    mask = NeuronMask(selected=rng.random((3, 8)) < 0.5, forget=rng.random((3, 8)) < 0.5)
    mask.save("gs://bucket/run/mask")
    assert sorted(remote_fs.objects()) == ["bucket/run/mask/mask.npz", "bucket/run/mask/mask_summary.json"]
    back = NeuronMask.load("gs://bucket/run/mask", shape=(3, 8))
    np.testing.assert_array_equal(back.selected, mask.selected)
    np.testing.assert_array_equal(back.forget, mask.forget)
    (as_path("gs://bucket/bad.npz")).write_bytes(b"not a mask")
    with pytest.raises(ValueError) as e:
        NeuronMask.load("gs://bucket/bad.npz")
    assert str(e.value).startswith("gs://bucket/bad.npz: not a neuron mask (not an .npz archive")


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    from hf_fixtures import build_hf_model

    d = tmp_path_factory.mktemp("remote_model")
    build_hf_model("llama_gqa_untied", d / "hf")
    (d / "hf" / "tokenizer_config.json").write_text("{}")  # a small file to copy along
    return d


def test_hf_directory_on_an_object_store(gcs, local_model, tmp_path, monkeypatch):
    """Saved in place (config.json last), byte-identical to a local save; read back exactly by
    ranged reads; a truncated remote shard is refused naming the URL."""
    from safetensors.numpy import load_file

    from simu_jax.models import split_params
    from simu_jax.models.convert import (CheckpointFileError, load_pretrained, local_metadata_dir,
                                         read_safetensors, save_pretrained)

    model = load_pretrained(local_model / "hf")
    local = save_pretrained(model, local_model / "saved", max_shard_bytes=40_000,
                            tokenizer_dir=local_model / "hf", overwrite=True)
    url = save_pretrained(model, "gs://bucket/model", max_shard_bytes=40_000, tokenizer_dir=local_model / "hf")
    objects = remote_fs.objects("bucket/model/")
    assert sorted(k.split("/")[-1] for k in objects) == sorted(p.name for p in local.iterdir())
    for k, v in objects.items():
        assert v == (local / k.split("/")[-1]).read_bytes(), k
    assert list(objects)[-1] == "bucket/model/config.json"  # written last
    assert len([k for k in objects if k.endswith(".safetensors")]) > 3

    want = {}
    for f in sorted(local.glob("*.safetensors")):
        want.update(load_file(f))
    got = read_safetensors(url)
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    back = split_params(load_pretrained("gs://bucket/model"))[1]
    ref = split_params(model)[1]
    import jax

    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(ref)))
    monkeypatch.setenv("SIMU_JAX_CACHE", str(tmp_path / "cache"))
    cache = local_metadata_dir(url)  # the small files, for the tokenizer
    small = sorted(k.split("/")[-1] for k in objects if not k.endswith(".safetensors") and "index" not in k)
    assert cache.parent.parent == tmp_path / "cache" and sorted(p.name for p in cache.iterdir()) == small
    assert "tokenizer_config.json" in small and all((cache / n).read_bytes() == objects[f"bucket/model/{n}"]
                                                    for n in small)

    with pytest.raises(FileExistsError, match="gs://bucket/model exists"):
        save_pretrained(model, url)
    shard = sorted(k for k in objects if k.endswith(".safetensors"))[1]
    gcs.store[shard] = remote_fs.FakeGCS.store[shard].__class__(None, shard, objects[shard][:-100])
    with pytest.raises(CheckpointFileError) as e:
        load_pretrained(url)
    assert str(e.value).startswith(f"gs://{shard}: not a valid safetensors file") and "truncated" in str(e.value)
    save_pretrained(model, url, overwrite=True)  # an old directory is replaced: no shard left over
    assert list(remote_fs.objects("bucket/model/")) == ["bucket/model/model.safetensors",
                                                         "bucket/model/config.json"]
