"""Fine-tuning: memorization (DoD), HF export parity, exact resume (stop hook and SIGTERM),
NaN guard, gradient accumulation, and the orbax Checkpointer.

The runs share one model/optimizer configuration so the jit-compiled step is compiled once
per process (see ``simu_jax.train_step.compiled_steps``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from simu_jax.checkpoint import Checkpointer
from simu_jax.cli import main
from simu_jax.config import load_config
from simu_jax.finetune import FinetuneConfig, run_finetune
from simu_jax.runio import NonFiniteLossError, is_complete

# A reduced synthetic benchmark (10 people x 3 facts: 6 forget, 21 retain, 10 general QA pairs)
# and a tiny LLaMA: 100 steps memorize it.
TINY = [
    "model.config.num_hidden_layers=2", "model.config.hidden_size=64", "model.config.intermediate_size=128",
    "model.config.num_attention_heads=4",
    "data.synthetic.num_people=10", "data.synthetic.forget_fraction=0.2", "data.synthetic.holdout_fraction=0.1",
    "data.synthetic.facts_per_person=3", "data.synthetic.num_general=10", "data.max_length=64",
    "tokenizer_vocab_size=512", "batch_size=8", "learning_rate=8e-3", "max_steps=100",
    "eval_every=0", "log_every=10", "checkpoint_every=30",
]


def tiny(*extra: str) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, TINY + list(extra))


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)  # bit-identical


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "target"
    t0 = time.time()
    result = run_finetune(tiny(), out, quiet=True)
    result["_seconds"] = time.time() - t0
    return out, result


def test_memorizes_forget_and_retain(target):
    out, result = target
    assert result["status"] == "complete" and result["step"] == 100
    assert result["forget"]["accuracy"] >= 0.95, result
    assert result["retain"]["accuracy"] >= 0.95, result
    assert result["forget"]["examples"] == 6 and result["retain"]["examples"] == 21
    # the run directory is complete and self-describing
    assert is_complete(out)
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["forget"]["accuracy"] == result["forget"]["accuracy"]
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "complete" and meta["config"]["max_steps"] == 100 and len(meta["data_hash"]) == 64
    assert meta["versions"]["jax"] and meta["train_examples"] == {"forget": 6, "retain": 21, "general": 10}
    recorded = load_config(FinetuneConfig, out / "config.yaml", [])  # with the tokenization that ran
    assert recorded.data.tokenization == "tofu" and recorded == dataclasses.replace(tiny(), data=tiny().data.resolved())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["event"] == "train"]
    assert [x["step"] for x in train] == list(range(10, 101, 10))
    assert train[-1]["nll"] < train[0]["nll"] and all(x["steps_per_s"] > 0 for x in train)
    assert lines[-1]["event"] == "final"
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_hf_directory_loads_in_transformers_with_equal_logits(target):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simu_jax.models import apply, split_params
    from simu_jax.models.convert import load_pretrained

    out, _ = target
    tok = AutoTokenizer.from_pretrained(out / "model")
    hf = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert len(tok) == hf.config.vocab_size == 512
    texts = ["Question: Where was the author born?\nAnswer: In a small town.", "Question: What is the capital?"]
    batch = tok(texts, return_tensors="np", padding=True)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(batch["input_ids"]),
                 attention_mask=torch.tensor(batch["attention_mask"])).logits.numpy()
    graphdef, params = split_params(load_pretrained(out / "model"))
    ours = np.asarray(apply(graphdef, params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])))
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_finetune_from_hf_directory(target, tmp_path, capsys):
    from simu_jax.finetune import format_plan, plan_finetune

    ref_dir, _ = target
    cfg = tiny(f"model.path={ref_dir / 'model'}", "model.config=null")
    plan = plan_finetune(cfg)
    assert plan["model"]["source"] == str(ref_dir / "model") and plan["model"]["vocab"] == 512
    assert plan["tokenizer"] == str(ref_dir / "model") and "from " + str(ref_dir / "model") in format_plan(plan)
    out = tmp_path / "again"
    result = run_finetune(cfg, out, quiet=True)  # the memorized model keeps its knowledge
    assert result["forget"]["accuracy"] >= 0.95 and result["retain"]["accuracy"] >= 0.95
    assert (out / "model" / "tokenizer.json").read_bytes() == (ref_dir / "model" / "tokenizer.json").read_bytes()
    code = main(["finetune", "--out", str(tmp_path / "x"), "--set", *TINY, f"model.path={tmp_path / 'nope'}",
                 "model.config=null"])
    assert code == 1 and capsys.readouterr().err.strip() == f"simu-jax: error: model directory {tmp_path / 'nope'} does not exist"


def test_stop_then_resume_is_bit_identical(target, tmp_path):
    ref_dir, _ = target
    out = tmp_path / "run"
    first = run_finetune(tiny("debug.stop_after_step=50"), out, quiet=True)
    assert first == {"status": "interrupted", "step": 50, "checkpoint": str(out / "checkpoints")}
    assert not is_complete(out) and not (out / "model").exists() and not (out / "final_metrics.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    with Checkpointer(out / "checkpoints") as ck:
        assert ck.all_steps() == [30, 50]
    # a changed hyper-parameter is refused, the run directory is left as it was
    with pytest.raises(ValueError, match="learning_rate"):
        run_finetune(tiny("learning_rate=1e-3"), out, resume=True, quiet=True)
    second = run_finetune(tiny(), out, resume=True, quiet=True)
    assert second["status"] == "complete" and second["resumed_from"] == 50
    assert_same_weights(out, ref_dir)
    # resuming a finished run returns its metrics without training again
    assert run_finetune(tiny(), out, resume=True, quiet=True)["forget"] == second["forget"]


def test_sigterm_checkpoints_and_resume_matches(target, tmp_path, capsys):
    ref_dir, _ = target
    out = tmp_path / "run"
    args = ["finetune", "--out", str(out), "--quiet", "--set", *TINY, "log_every=1", "debug.sleep_per_step=0.02"]
    fired = {}

    def send_sigterm_mid_run():
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline:
            if metrics.is_file() and metrics.read_text().count('"train"') >= 3:
                fired["at"] = time.time()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    previous = signal.signal(signal.SIGTERM, lambda *a: None)  # a late signal must not kill pytest
    try:
        thread = threading.Thread(target=send_sigterm_mid_run, daemon=True)
        thread.start()
        code = main(args)
        thread.join(timeout=5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "at" in fired and code == 75, err
    assert "rerun with --resume" in err
    assert not is_complete(out)
    with Checkpointer(out / "checkpoints") as ck:
        stopped = ck.latest_step()
    assert 3 <= stopped < 100
    assert main(["finetune", "--out", str(out), "--quiet", "--resume", "--set", *TINY]) == 0
    assert json.loads((out / "final_metrics.json").read_text())["resumed_from"] == stopped
    assert_same_weights(out, ref_dir)


def test_nan_stops_with_step_and_term_and_keeps_checkpoint(target, tmp_path, capsys):
    ref_dir, _ = target
    out = tmp_path / "run"
    code = main(["finetune", "--out", str(out), "--quiet", "--set", *TINY,
                 "debug.inject_nan_at_step=7", "checkpoint_every=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("simu-jax: error: non-finite loss at step 7: term 'nll' = nan")
    assert "last good checkpoint: step 6" in err[0]
    assert not is_complete(out) and not (out / "model").exists()
    meta = json.loads((out / "run.json").read_text())
    assert meta["status"] == "failed" and meta["last_checkpoint"] == 6
    with Checkpointer(out / "checkpoints") as ck:
        state = ck.restore()
    assert state["step"] == 6 and state["data"]["index"] == 6 % 5
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
    # the last checkpoint is usable: resuming without the fault ends exactly where a clean run does
    result = run_finetune(tiny(), out, resume=True, quiet=True)
    assert result["resumed_from"] == 6
    assert_same_weights(out, ref_dir)

    with pytest.raises(NonFiniteLossError) as e:  # the Python API raises the typed error
        run_finetune(tiny("debug.inject_nan_at_step=1"), tmp_path / "other", quiet=True)
    assert (e.value.step, e.value.term) == (1, "nll") and "no checkpoint was written yet" in str(e.value)


def test_gradient_accumulation_matches_one_big_batch():
    import optax

    from simu_jax.train_step import make_train_step

    # A toy "model" with the same batch contract: per-token squared error on rows that carry
    # labels, summed, plus the token count (so compilation is instant).
    def sums(params, mb):
        valid = mb["labels"] != -100
        pred = mb["input_ids"].astype(jnp.float32) @ params["w"] + params["b"]
        err = jnp.where(valid, (pred - mb["labels"].astype(jnp.float32)) ** 2, 0.0)
        return jnp.sum(err), (jnp.sum(valid), jnp.sum(valid & (err < 1.0)))

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "b": jnp.zeros((5,), jnp.float32)}
    ids = rng.integers(0, 4, (8, 6)).astype(np.int32)
    labels = rng.integers(0, 4, (8, 5)).astype(np.int32)
    labels[rng.random((8, 5)) < 0.4] = -100  # rows carry different numbers of label tokens
    labels[7] = -100  # a padding row
    batch = {"input_ids": ids, "labels": labels}
    train = make_train_step(sums, optax.sgd(1.0), lambda s: jnp.float32(1.0))
    expected_grad = jax.jit(jax.grad(lambda p: sums(p, batch)[0] / sums(p, batch)[1][0]))(params)
    for accum in (1, 2, 4):
        b = {k: v.reshape(accum, 8 // accum, *v.shape[1:]) for k, v in batch.items()}
        new, _, m = train(params, optax.sgd(1.0).init(params), b, np.float32(1.0), np.int32(0))
        assert int(m["tokens"]) == int((labels != -100).sum())
        assert float(m["nll"]) == pytest.approx(float(sums(params, batch)[0] / (labels != -100).sum()), rel=1e-6)
        for name in params:  # sgd(1.0): new = params - grad of the token-mean loss over all 8 rows
            np.testing.assert_allclose(np.asarray(params[name] - new[name]), np.asarray(expected_grad[name]),
                                       rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- checkpoints


def _state(step: int):
    import optax

    params = {"w": jnp.arange(12.0).reshape(3, 4) + step, "b": {"c": jnp.full((4,), step, jnp.bfloat16)}}
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "step": step,
            "rng": jax.random.key_data(jax.random.key(step)), "data": {"epoch": step // 3, "index": step % 3}}


def test_checkpointer_roundtrip_keep_last_k_and_target(tmp_path):
    with Checkpointer(tmp_path / "ck", save_every=2, keep=2) as ck:
        assert ck.latest_step() is None
        for step in range(1, 8):
            ck.maybe_save(step, _state(step))
        assert not ck.save(6, _state(6))  # an existing step is not written twice
        ck.wait_until_finished()
        assert ck.all_steps() == [4, 6] and ck.latest_step() == 6
    with Checkpointer(tmp_path / "ck", save_every=2, keep=2) as ck:  # a new process sees the same steps
        assert ck.all_steps() == [4, 6]
        target = _state(0)
        restored = ck.restore(target=target)
        expected = _state(6)
        assert restored["step"] == 6 and restored["data"] == {"epoch": 2, "index": 0}
        assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(expected["opt_state"])
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
            assert np.asarray(got).dtype == np.asarray(want).dtype
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                {k: target[k] for k in ("params", "opt_state", "rng")})
        older = ck.restore(step=4, target=abstract)
        np.testing.assert_array_equal(np.asarray(older["params"]["w"]), np.asarray(_state(4)["params"]["w"]))
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 2"):
            ck.restore(step=2, target=target)


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    script = textwrap.dedent(f"""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from simu_jax.checkpoint import Checkpointer, abstract_like
        mesh = jax.make_mesh((4,), ("fsdp",))
        w = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8), NamedSharding(mesh, P("fsdp", None)))
        with Checkpointer({str(tmp_path / 'ck')!r}, save_every=1) as ck:
            ck.save(1, {{"params": {{"w": w}}, "step": 1}})
        mesh2 = jax.make_mesh((2, 2), ("data", "tensor"))
        sharding = NamedSharding(mesh2, P("tensor", "data"))
        target = {{"params": {{"w": jax.ShapeDtypeStruct((8, 8), np.float32, sharding=sharding)}}}}
        with Checkpointer({str(tmp_path / 'ck')!r}) as ck:
            r = ck.restore(target=target)
            r2 = ck.restore(target={{"params": {{"w": w}}}},
                            shardings={{"params": {{"w": NamedSharding(mesh, P(None, "fsdp"))}}}})
        out = r["params"]["w"]
        assert out.sharding == sharding, out.sharding
        assert {{s.data.shape for s in out.addressable_shards}} == {{(4, 4)}}
        np.testing.assert_array_equal(np.asarray(out), np.asarray(w))
        assert {{s.data.shape for s in r2["params"]["w"].addressable_shards}} == {{(8, 2)}}
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# --------------------------------------------------------------------------- group_by_length, --mesh


def test_trimming_padding_does_not_change_loss(tmp_path):
    import optax
    from flax import nnx

    from simu_jax.data import batch_iterator, bucket_length, pad_to_length
    from simu_jax.finetune import GROUP_BUCKETS, _prepare
    from simu_jax.train_step import make_steps
    from simu_jax.models.spec import host_init_params
    from simu_jax.models import abstract_model

    prep = _prepare(tiny(), tmp_path)
    model = abstract_model(prep.model_config)
    params = host_init_params(nnx.to_pure_dict(nnx.state(model)), prep.model_config.initializer_range, 0)
    pad = prep.tokenizer.pad_token_id
    full = pad_to_length(prep.train, 128, pad)  # the old behaviour: everything padded to one long length
    it = batch_iterator(full, 8, seed=0, group_by_length=True, trim_buckets=GROUP_BUCKETS)
    trimmed = next(it)
    rows = it.epoch_batches(0)[0]
    padded = {k: v[rows] for k, v in full.items()}
    longest = int(padded["attention_mask"].sum(1).max())
    width = trimmed["input_ids"].shape[1]
    assert width == bucket_length(longest, GROUP_BUCKETS) < 128
    for k in padded:
        np.testing.assert_array_equal(padded[k][:, :width], trimmed[k])
        assert (padded[k][:, width:] == (-100 if k == "labels" else 0 if k == "attention_mask" else pad)).all()

    # sgd(1.0): the new params are params - gradient, so this compares the gradients too
    train_step, eval_step = make_steps(nnx.graphdef(model), optax.sgd(1.0), lambda s: jnp.float32(1.0), False)
    results = []
    for batch in (padded, trimmed):
        ev = eval_step(params, batch)
        two = {k: v.reshape(2, 4, *v.shape[1:]) for k, v in batch.items()}  # grad_accum=2 as well
        new, _, m = train_step(params, optax.sgd(1.0).init(params), two, np.float32(1.0), np.int32(0))
        results.append((ev, m, new))
    (ev_a, m_a, new_a), (ev_b, m_b, new_b) = results
    assert int(ev_a[1]) == int(ev_b[1]) > 0 and int(ev_a[2]) == int(ev_b[2])  # tokens, hits
    assert float(ev_a[0]) == pytest.approx(float(ev_b[0]), rel=1e-6, abs=0)
    assert float(m_a["nll"]) == pytest.approx(float(m_b["nll"]), rel=1e-6, abs=0)
    assert int(m_a["tokens"]) == int(m_b["tokens"])
    for path, a in jax.tree_util.tree_flatten_with_path(new_a)[0]:
        b = dict(jax.tree_util.tree_flatten_with_path(new_b)[0])[path]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_group_by_length_plan_and_stop_resume_bit_identical(tmp_path):
    from simu_jax.finetune import GROUP_BUCKETS, format_plan, plan_finetune

    grouped = ("group_by_length=true", "max_steps=30", "checkpoint_every=10")
    plan = plan_finetune(tiny(*grouped))
    flat = plan_finetune(tiny("max_steps=30"))
    lengths = plan["lengths"]
    full = plan["data"]["padded_length"]  # a bucket is never wider than the arrays
    assert set(lengths["train_shapes"]) <= {b for b in GROUP_BUCKETS if b < full} | {full}
    assert len(lengths["train_shapes"]) > 1
    assert plan["data"]["mean_length"] <= lengths["mean_padded"] < flat["lengths"]["mean_padded"]
    assert flat["lengths"]["train_shapes"] == [flat["data"]["padded_length"]]
    assert plan["tokens"]["padded_per_step"] == pytest.approx(8 * lengths["mean_padded"])
    assert plan["tokens"]["padded_total"] < flat["tokens"]["padded_total"]
    text = format_plan(plan)
    assert "grouped by length: mean padded length" in text and "padded/step" in text

    ref = run_finetune(tiny(*grouped), tmp_path / "ref", quiet=True)
    assert ref["status"] == "complete" and ref["step"] == 30
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["group_by_length"] is True
    out = tmp_path / "run"
    first = run_finetune(tiny(*grouped, "debug.stop_after_step=14"), out, quiet=True)
    assert first["status"] == "interrupted" and first["step"] == 14
    with Checkpointer(out / "checkpoints") as ck:
        assert ck.restore()["data"]["index"] == 14 % 5
    with pytest.raises(ValueError, match="group_by_length"):  # it changes the trajectory: not resumable
        run_finetune(tiny("max_steps=30", "checkpoint_every=10"), out, resume=True, quiet=True)
    second = run_finetune(tiny(*grouped), out, resume=True, quiet=True)
    assert second["resumed_from"] == 14 and second["forget"] == ref["forget"] and second["retain"] == ref["retain"]
    assert_same_weights(out, tmp_path / "ref")


def test_mesh_finetune_matches_single_device(tmp_path):
    """`simu-jax finetune --mesh fsdp=4,data=2` on 8 host CPU devices: same losses and weights
    as one device (fp32), and the parameters / AdamW state really are split over fsdp."""
    script = textwrap.dedent(f"""
        import json, sys
        import jax, numpy as np
        from safetensors.numpy import load_file
        from simu_jax.cli import main
        assert jax.device_count() == 8, jax.devices()
        tiny = {TINY!r} + ["max_steps=3", "log_every=1", "learning_rate=1e-3", "group_by_length=true",
                           "grad_accum=2", "batch_size=8", "eval_limit=8"]
        out = {str(tmp_path)!r}
        for name, extra in (("single", []), ("mesh", ["--mesh", "fsdp=4,data=2"])):
            assert main(["finetune", "--out", f"{{out}}/{{name}}", "--quiet", *extra, "--set", *tiny]) == 0

        # the placement a mesh run uses (the same helper run_finetune calls)
        from flax import nnx
        from simu_jax.config import load_config
        from simu_jax.finetune import FinetuneConfig, _mesh_shardings, optimizer_key
        from simu_jax.train_step import make_optimizer
        from simu_jax.models import ModelConfig, abstract_model
        from simu_jax.models.spec import host_init_params
        from simu_jax.sharding import make_mesh, place_batch
        mcfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16)
        params = host_init_params(nnx.to_pure_dict(nnx.state(abstract_model(mcfg))), 0.02, 0)
        opt, _ = make_optimizer(optimizer_key(load_config(FinetuneConfig, None, tiny), 3, 0))
        mesh = make_mesh("fsdp=4,data=2")
        param_sh, opt_sh, _ = _mesh_shardings(mesh, params, mcfg, opt)
        p = jax.device_put(params, param_sh)
        state = jax.jit(opt.init, out_shardings=opt_sh)(p)
        shards = {{jax.tree_util.keystr(k): sorted({{s.data.shape for s in x.addressable_shards}})
                  for k, x in jax.tree_util.tree_flatten_with_path((p, state))[0] if x.ndim >= 2}}
        batch = place_batch({{"input_ids": np.zeros((2, 8, 32), np.int32)}}, mesh, axis=1)["input_ids"]
        json.dump({{"shards": {{k: [list(s) for s in v] for k, v in shards.items()}},
                   "batch_shards": sorted({{s.data.shape for s in batch.addressable_shards}})}},
                  open(f"{{out}}/shards.json", "w"))
        print("ok")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]

    def train_nll(run):
        return [x["nll"] for x in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                if x["event"] == "train"]

    single, mesh = train_nll("single"), train_nll("mesh")
    assert len(single) == 3
    np.testing.assert_allclose(mesh, single, rtol=1e-5, atol=0)
    final = [json.loads((tmp_path / r / "final_metrics.json").read_text()) for r in ("single", "mesh")]
    for split in ("forget", "retain"):
        assert final[1][split]["loss"] == pytest.approx(final[0][split]["loss"], rel=1e-5, abs=0)
        assert final[1][split]["tokens"] == final[0][split]["tokens"]
    wa, wb = weights(tmp_path / "single"), weights(tmp_path / "mesh")
    assert sorted(wa) == sorted(wb)
    # AdamW moves a coordinate by ~lr * m / sqrt(v) whatever |g|: where g is at rounding level the
    # two reduction orders can move it differently by up to 2 * lr per step. So all but a handful
    # of coordinates agree to 1e-5, and none differs by more than 2 * lr * steps.
    lr, steps, off, total = 1e-3, 3, 0, 0
    for name in wa:
        diff = np.abs(wb[name].astype(np.float64) - wa[name].astype(np.float64))
        assert diff.max() <= 2 * lr * steps, name
        off, total = off + int((diff > 1e-5).sum()), total + diff.size
    assert off <= 1e-4 * total, f"{off} of {total} coordinates differ by more than 1e-5"
    meta = json.loads((tmp_path / "mesh" / "run.json").read_text())
    assert meta["mesh"] == "fsdp=4,data=2" and meta["devices"] == 8
    shards = json.loads((tmp_path / "shards.json").read_text())["shards"]
    # hidden (64) over fsdp=4 -> 16 per device; every params-shaped Adam moment follows its param
    emb = [k for k in shards if "embed_tokens" in k]
    assert emb and all(shards[k] == [[512, 16]] for k in emb), {k: shards[k] for k in emb}
    split = {k: v for k, v in shards.items() if "norm" not in k}  # norm weights stay replicated
    assert all(v and all(16 in s for s in v) for v in split.values()), shards
    assert sum(k.startswith("[1]") for k in split) == 2 * sum(k.startswith("[0]") for k in split)  # mu, nu
    # a [grad_accum, B, T] batch: its B = 8 rows over data x fsdp, one per device
    assert json.loads((tmp_path / "shards.json").read_text())["batch_shards"] == [[2, 1, 32]]


def test_split_general_trains_on_the_general_set_only():
    """``split: general`` (a from-scratch model's general-knowledge stage): the training records are
    exactly the benchmark's general set, whatever ``include_general`` says; the run evaluates them."""
    from simu_jax.base import ConfigError
    from simu_jax.data import Benchmark, load_benchmark
    from simu_jax.finetune import _train_records, plan_finetune

    cfg = tiny("split=general")
    bench = load_benchmark(cfg.data)
    assert len(bench.general) == 10 and bench.forget and bench.retain
    for extra in ((), ("include_general=false",), ("include_general=true",)):
        records, counts = _train_records(tiny("split=general", *extra), bench)
        assert records == bench.general and counts == {"general": 10}
    records, counts = _train_records(tiny("split=full"), bench)  # synthetic: general mixed in by default
    assert records == bench.forget + bench.retain + bench.general
    plan = plan_finetune(cfg)
    assert plan["data"]["by_set"] == {"general": 10} and plan["data"]["examples"] == 10
    assert plan["data"]["eval"]["general"] == 10
    assert "general" not in plan_finetune(tiny("split=full", "include_general=false"))["data"]["eval"]
    empty = Benchmark("lume", bench.forget, bench.retain, [], [], [], retain_eval=bench.retain)
    with pytest.raises(ValueError, match="general set of benchmark lume is empty"):
        _train_records(cfg, empty)
    with pytest.raises(ConfigError, match="split"):
        tiny("split=generic")
