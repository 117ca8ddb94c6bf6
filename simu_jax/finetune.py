"""Fine-tuning a target model (forget + retain data) or a retain-only reference model.

``simu-jax finetune --config FILE [--set k=v ...] --out DIR [--overwrite|--resume] [--quiet] [--dry-run]``

* AdamW (decoupled weight decay on linear kernels only) with linear warmup + cosine decay,
  global-norm clipping, and exact gradient accumulation: one jit-compiled step takes a
  ``[grad_accum, batch_size, T]`` batch, scans over the micro-batches summing per-token
  gradients and divides by the total number of answer tokens, so ``grad_accum=4,
  batch_size=4`` computes the same update as ``batch_size=16``.
* Padding: by default all sequences (train and eval) are padded to one length, so the step
  compiles once. ``group_by_length: true`` (like HF Trainer's ``group_by_length``) groups
  rows of similar length into batches (seeded, per epoch: sorted within chunks of
  ``GROUP_CHUNK`` batches, then the batch order shuffled) and trims each batch to the
  smallest of ``length_buckets`` (default :data:`GROUP_BUCKETS`) holding its longest row:
  a few compiled shapes, far fewer padded tokens. Evaluation batches are sorted by length
  and trimmed the same way. Trimming padding does not change the loss (right padding,
  causal attention).
* ``--mesh data=2,fsdp=4`` (or ``mesh:``): parameters and AdamW state placed with
  NamedShardings (:mod:`simu_jax.sharding` rules), the jitted step pinned to that layout
  with ``out_shardings``, batches sharded over the data axes (several processes: each
  process feeds its :func:`simu_jax.sharding.process_slice` of the rows).
* Periodic evaluation: answer-token loss and teacher-forced accuracy on forget and retain.
* NaN/Inf guard on every step; orbax checkpoints every ``checkpoint_every`` steps; exact
  ``--resume`` (parameters, optimizer state, step and data position); SIGINT/SIGTERM save
  a checkpoint and exit cleanly (exit code 75, resumable).
* The run loop (directory start, resume-config check, signals, NaN guard, checkpoints, stop
  agreement across processes, COMPLETE) is :mod:`simu_jax.loop`'s, shared with unlearning.
* Output (see :mod:`simu_jax.runio` for the directory contract): ``model/`` (HF directory:
  config.json, safetensors, tokenizer files, loads in transformers), ``final_metrics.json``,
  ``run.json``, ``config.yaml``, ``metrics.jsonl``, ``tokenizer/``, ``checkpoints/``, and
  ``COMPLETE`` last.

Python API: :func:`run_finetune` (returns the final metrics), :func:`plan_finetune`
(the ``--dry-run`` plan).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from simu_jax.base import EXIT_INTERRUPTED, IGNORE_INDEX, ArgumentParser, ConfigError, pad_token_id
from simu_jax.config import load_config
from simu_jax.data import TRAIN_BUCKETS, DataSpec, benchmark_texts, load_benchmark, pad_to_length, qa_template
from simu_jax.loop import DebugSpec, RunDirectory, run_steps
from simu_jax.train_step import compiled_steps, make_optimizer, make_steps
from simu_jax.models.spec import (ModelSpec, host_init_params, jnp_dtype, load_tokenizer, model_config_from_spec,
                                  resolve_model_path)

__all__ = ["FinetuneConfig", "cli_main", "format_plan", "plan_finetune", "run_finetune"]

POS = (1, None)  # range metadata: >= 1
# Per-batch lengths with group_by_length: few shapes (each one is a compile of the step):
# multiples of 32 up to 256, of 64 up to 512, of 128 up to 1024, then powers of two.
GROUP_BUCKETS = (tuple(range(32, 257, 32)) + tuple(range(320, 513, 64)) + tuple(range(640, 1025, 128))
                 + (2048, 4096, 8192))
GROUP_CHUNK = 50  # group_by_length sorts within chunks of this many batches


@dataclass
class FinetuneConfig:
    """Fine-tuning configuration (YAML keys = field names).

    ``split``: ``full`` trains on forget + retain (the target model), ``retain`` on retain
    only (the reference model), ``general`` on the benchmark's general set only (TOFU:
    real_authors + world_facts; a from-scratch model's general-knowledge stage, fine-tuned
    afterwards with ``split: full`` / ``retain``; ``include_general`` does not apply).
    ``include_general`` adds the benchmark's general set (default: only for synthetic, whose
    model starts from scratch). A run that trains on the general set also evaluates it
    (``general/loss``, ``general/accuracy``).
    ``tokenizer``: an HF tokenizer directory/name; ``None`` = the model directory's, or for
    a randomly initialized model a byte-level BPE tokenizer (``tokenizer_vocab_size``)
    trained on the benchmark's texts and saved with the model.
    ``epochs`` is used unless ``max_steps`` is set. ``eval_every: 0`` evaluates only at the
    end. ``eval_limit`` caps the records evaluated per split (``None`` = all).
    ``group_by_length``: length-grouped batches trimmed to ``length_buckets`` (``None`` =
    :data:`GROUP_BUCKETS`); ``false`` pads everything to one length (the old behaviour).
    ``mesh``: a device mesh spec (``data=2,fsdp=4``; ``--mesh`` on the command line).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    split: Literal["full", "retain", "general"] = "full"
    include_general: bool | None = None
    tokenizer: str | None = None
    tokenizer_vocab_size: int = field(default=1024, metadata={"range": (260, None)})
    batch_size: int = field(default=16, metadata={"range": POS})
    grad_accum: int = field(default=1, metadata={"range": POS})
    learning_rate: float = field(default=2e-3, metadata={"range": (0.0, None, "()")})
    warmup_ratio: float = field(default=0.05, metadata={"range": (0.0, 1.0, "[)")})
    min_lr_ratio: float = field(default=0.0, metadata={"range": (0.0, 1.0)})
    weight_decay: float = field(default=0.0, metadata={"range": (0.0, None)})
    adam_betas: tuple[float, float] = field(default=(0.9, 0.98), metadata={"range": (0.0, 1.0, "[)")})
    adam_eps: float = field(default=1e-8, metadata={"range": (0.0, None, "()")})
    max_grad_norm: float | None = field(default=1.0, metadata={"range": (0.0, None, "()")})
    epochs: int = field(default=10, metadata={"range": POS})
    max_steps: int | None = field(default=None, metadata={"range": POS})
    seed: int = field(default=0, metadata={"range": (0, None)})
    eval_every: int = field(default=0, metadata={"range": (0, None)})
    eval_batch_size: int = field(default=32, metadata={"range": POS})
    eval_limit: int | None = field(default=None, metadata={"range": POS})
    log_every: int = field(default=10, metadata={"range": POS})
    checkpoint_every: int = field(default=200, metadata={"range": POS})
    keep_checkpoints: int = field(default=2, metadata={"range": POS})
    async_checkpoint: bool = True
    group_by_length: bool = False
    length_buckets: list[int] | None = None
    mesh: str | None = None
    debug: DebugSpec = field(default_factory=DebugSpec)


# Keys that may differ between a run and its --resume (they do not change the trajectory).
# (`mesh`: a checkpoint restores onto another mesh; results then differ only by float rounding.)
RESUME_FREE_KEYS = ("debug", "eval_every", "eval_batch_size", "eval_limit", "log_every", "checkpoint_every",
                     "keep_checkpoints", "async_checkpoint", "mesh")


# =========================================================================== preparation


@dataclass
class _Prepared:
    cfg: FinetuneConfig
    bench: Any
    tokenizer: Any
    tokenizer_dir: Path
    model_config: Any
    train: dict  # numpy arrays [N, T]
    evals: dict  # split name -> numpy arrays
    counts: dict
    length: int


def _load_tokenizer(cfg: FinetuneConfig, bench, work_dir: Path):
    """(tokenizer, directory holding its files)."""
    from simu_jax.data import train_bpe_tokenizer
    from simu_jax.models.convert import local_metadata_dir

    source = cfg.tokenizer or (str(local_metadata_dir(resolve_model_path(cfg.model.path, config_only=True)))
                               if cfg.model.path else None)  # a gs:// model: its tokenizer files, copied locally
    if source is not None:
        try:
            tok = load_tokenizer(source)
        except (OSError, ValueError) as e:
            what = "tokenizer" if cfg.tokenizer else "model.path (no tokenizer files there; set tokenizer)"
            raise FileNotFoundError(f"cannot load a tokenizer from {source} ({what}): "
                                    f"{' '.join(str(e).split())[:200]}") from None
        local = Path(source)
        if not (local.is_dir() and (local / "tokenizer_config.json").is_file()):
            local = work_dir / "tokenizer"
            if not (local / "tokenizer_config.json").is_file():
                tok.save_pretrained(str(local))
        return tok, local
    tok_dir = work_dir / "tokenizer"
    if (tok_dir / "tokenizer.json").is_file():  # resume: reuse the tokenizer the run started with
        return load_tokenizer(tok_dir), tok_dir
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=work_dir))
    try:
        tok = train_bpe_tokenizer(benchmark_texts(bench), tmp, vocab_size=cfg.tokenizer_vocab_size)
        os.replace(tmp, tok_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return load_tokenizer(tok_dir), tok_dir


def _train_records(cfg: FinetuneConfig, bench) -> tuple[list[dict], dict[str, int]]:
    include_general = bench.train_general if cfg.include_general is None else cfg.include_general
    if cfg.split == "general":
        parts = {"general": bench.general}
    else:
        parts = {"retain": bench.retain}
        if cfg.split == "full":
            parts = {"forget": bench.forget, **parts}
        if include_general:
            parts["general"] = bench.general
    required = ("general",) if cfg.split == "general" else ("forget", "retain")
    for name in required:
        if name in parts and not parts[name]:
            raise ValueError(f"the {name} set of benchmark {bench.name} is empty; cannot fine-tune split={cfg.split}")
    records = [r for recs in parts.values() for r in recs]
    return records, {k: len(v) for k, v in parts.items()}


def _prepare(cfg: FinetuneConfig, work_dir: Path) -> _Prepared:
    from simu_jax.data import tokenize_qa

    bench = load_benchmark(cfg.data)
    tok, tok_dir = _load_tokenizer(cfg, bench, work_dir)
    mcfg = model_config_from_spec(
        cfg.model, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=pad_token_id(tok), max_position_embeddings=max(2048, cfg.data.max_length),
    )
    if len(tok) > mcfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens but the model's vocab_size is {mcfg.vocab_size}")
    max_len = min(cfg.data.max_length, mcfg.max_position_embeddings)
    template = qa_template(cfg.data)
    records, counts = _train_records(cfg, bench)

    def tokenize(recs):
        return tokenize_qa(tok, recs, template, max_len, truncation=cfg.data.truncation, buckets=TRAIN_BUCKETS,
                           style=cfg.data.tokenization_style())

    train = tokenize(records)
    evals = {}
    for name, recs in (("forget", bench.forget), ("retain", bench.retain_eval), ("general", bench.general)):
        if recs and (name != "general" or "general" in counts):
            evals[name] = tokenize(recs[: cfg.eval_limit] if cfg.eval_limit else recs)
    length = max(a["input_ids"].shape[1] for a in [train, *evals.values()])
    train = pad_to_length(train, length, pad_token_id(tok))
    evals = {k: pad_to_length(v, length, pad_token_id(tok)) for k, v in evals.items()}
    return _Prepared(cfg, bench, tok, tok_dir, mcfg, train, evals, counts, length)


def _length_buckets(cfg: FinetuneConfig) -> tuple[int, ...] | None:
    """The per-batch trim buckets (``None``: no trimming, one padded length)."""
    if not cfg.group_by_length:
        return None
    buckets = tuple(cfg.length_buckets) if cfg.length_buckets else GROUP_BUCKETS
    if any(b < 1 for b in buckets):
        raise ConfigError(f"must be positive lengths, got {list(buckets)}", "length_buckets")
    return buckets


def _train_iterator(cfg: FinetuneConfig, train: dict, pad_id: int):
    from simu_jax.data import batch_iterator

    return batch_iterator(train, cfg.batch_size * cfg.grad_accum, seed=cfg.seed, shuffle=True, pad_id=pad_id,
                          group_by_length=cfg.group_by_length, group_chunk=GROUP_CHUNK,
                          trim_buckets=_length_buckets(cfg))


def _eval_iterator(arrays: dict, batch_size: int, pad_id: int, buckets):
    """One pass over ``arrays``; with ``buckets`` sorted by length and each batch trimmed."""
    from simu_jax.data import batch_iterator

    n_batches = -(-len(arrays["input_ids"]) // batch_size)
    return batch_iterator(arrays, batch_size, shuffle=False, epochs=1, pad_id=pad_id,
                          group_by_length=buckets is not None, group_chunk=max(n_batches, 1), trim_buckets=buckets)


def _step_widths(it, total: int, steps_per_epoch: int):
    """The sequence length of each of the run's ``total`` steps (the batches it will see)."""
    import numpy as np

    widths = [it.epoch_widths(e) for e in range(-(-total // steps_per_epoch))]
    return np.concatenate(widths)[:total]


def _schedule_steps(cfg: FinetuneConfig, num_examples: int) -> tuple[int, int, int]:
    """(steps per epoch, total steps, warmup steps)."""
    per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(num_examples / per_step)
    total = cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_ratio * total))
    return steps_per_epoch, total, warmup


# =========================================================================== plan (--dry-run)


def plan_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """What a run would do (no output directory, no weights allocated)."""
    import jax
    import numpy as np
    from flax import nnx

    from simu_jax.models import abstract_model, count_params

    with tempfile.TemporaryDirectory() as tmp:
        prep = _prepare(cfg, Path(tmp))
    mcfg = prep.model_config
    abstract = abstract_model(mcfg, param_dtype=jnp_dtype(cfg.model.dtype))
    n_params = count_params(nnx.to_pure_dict(nnx.state(abstract)))
    steps_per_epoch, total, warmup = _schedule_steps(cfg, len(prep.train["input_ids"]))
    per_step = cfg.batch_size * cfg.grad_accum
    answer_tokens = int((prep.train["labels"] != IGNORE_INDEX).sum())
    pad = pad_token_id(prep.tokenizer)
    widths = _step_widths(_train_iterator(cfg, prep.train, pad), total, steps_per_epoch)
    buckets = _length_buckets(cfg)
    eval_widths = sorted({int(w) for v in prep.evals.values()
                          for w in _eval_iterator(v, cfg.eval_batch_size, pad, buckets).epoch_widths(0)})
    real_tokens = int(prep.train["attention_mask"].sum())
    pbytes = np.dtype(jax.numpy.dtype(cfg.model.dtype)).itemsize
    act_dtype = np.dtype(jax.numpy.dtype(cfg.model.compute_dtype or cfg.model.dtype)).itemsize
    # Rough activation estimate for one micro-batch: ~16 hidden-sized tensors per layer kept for
    # backward (fewer with remat), plus the [B, T, V] logits in fp32.
    per_layer = 16 * mcfg.hidden_size + 3 * mcfg.intermediate_size
    layers_kept = mcfg.num_hidden_layers if cfg.model.remat == "none" else 1
    act = cfg.batch_size * int(widths.max()) * (per_layer * layers_kept * act_dtype + 2 * mcfg.vocab_size * 4)
    memory = {
        "params": n_params * pbytes,
        "gradients": n_params * 4,
        "adam_state": 2 * n_params * 4,
        "activations": act,
    }
    memory["total"] = sum(memory.values())
    return {
        "model": {
            "source": cfg.model.path or "random init",
            "model_type": mcfg.model_type, "layers": mcfg.num_hidden_layers, "hidden": mcfg.hidden_size,
            "heads": mcfg.num_attention_heads, "kv_heads": mcfg.num_key_value_heads,
            "intermediate": mcfg.intermediate_size, "vocab": mcfg.vocab_size,
            "dtype": cfg.model.dtype, "compute_dtype": cfg.model.compute_dtype or cfg.model.dtype,
        },
        "parameters": n_params,
        "trainable": n_params,
        "data": {"benchmark": cfg.data.benchmark, "split": cfg.split, "examples": len(prep.train["input_ids"]),
                 "by_set": prep.counts, "padded_length": prep.length, "answer_tokens": answer_tokens,
                 "real_tokens": real_tokens, "mean_length": real_tokens / len(prep.train["input_ids"]),
                 "group_by_length": cfg.group_by_length,
                 "eval": {k: len(v["input_ids"]) for k, v in prep.evals.items()}},
        "lengths": {"mean_padded": float(widths.mean()), "max_padded": int(widths.max()),
                    "train_shapes": sorted({int(w) for w in widths}), "eval_shapes": eval_widths},
        "steps": {"per_epoch": steps_per_epoch, "total": total, "warmup": warmup,
                  "epochs": total / steps_per_epoch, "examples_per_step": per_step,
                  "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum},
        "mesh": cfg.mesh,
        "tokens": {"padded_per_step": per_step * float(widths.mean()), "padded_total": per_step * int(widths.sum()),
                   "padding_fraction": 1.0 - real_tokens * total / steps_per_epoch
                   / max(per_step * int(widths.sum()), 1),
                   "answer_tokens_total": int(answer_tokens * total / steps_per_epoch)},
        "memory_bytes": memory,
        "tokenizer": cfg.tokenizer or cfg.model.path or f"BPE trained on the benchmark ({len(prep.tokenizer)} tokens)",
    }


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def format_plan(plan: dict[str, Any]) -> str:
    m, d, s, t, mem = plan["model"], plan["data"], plan["steps"], plan["tokens"], plan["memory_bytes"]
    ln = plan["lengths"]
    if d["group_by_length"]:
        lengths = (f"grouped by length: mean padded length {ln['mean_padded']:.1f} "
                   f"(real {d['mean_length']:.1f}), {len(ln['train_shapes'])} train shapes "
                   f"{ln['train_shapes']}, eval shapes {ln['eval_shapes']}")
    else:
        lengths = (f"all padded to {ln['max_padded']} (real mean {d['mean_length']:.1f}; "
                   f"group_by_length: true trims per batch)")
    lines = [
        "finetune plan",
        f"  model:      {m['model_type']} from {m['source']}: {m['layers']} layers, hidden {m['hidden']}, "
        f"{m['heads']} heads ({m['kv_heads']} kv), intermediate {m['intermediate']}, vocab {m['vocab']}",
        f"  parameters: {plan['parameters']:,} ({_human(plan['parameters'])}), trainable {plan['trainable']:,}; "
        f"dtype {m['dtype']}, compute {m['compute_dtype']}",
        f"  tokenizer:  {plan['tokenizer']}",
        f"  data:       {d['benchmark']}, split {d['split']}: {d['examples']} examples "
        f"({', '.join(f'{k} {v}' for k, v in d['by_set'].items())}), padded length {d['padded_length']}, "
        f"{d['answer_tokens']:,} answer tokens",
        f"  steps:      {s['total']} ({s['per_epoch']}/epoch, {s['epochs']:.3g} epochs, warmup {s['warmup']}), "
        f"{s['examples_per_step']} examples/step (batch {s['batch_size']} x accum {s['grad_accum']})",
        f"  lengths:    {lengths}",
        f"  tokens:     {t['padded_per_step']:,.0f} padded/step, {_human(t['padded_total'])} padded in total "
        f"({100 * t['padding_fraction']:.0f}% padding), ~{_human(t['answer_tokens_total'])} answer tokens trained on",
        f"  memory:     ~{_mib(mem['total'])} (params {_mib(mem['params'])}, grads {_mib(mem['gradients'])}, "
        f"adam {_mib(mem['adam_state'])}, activations {_mib(mem['activations'])})",
        f"  eval:       {', '.join(f'{k} {v}' for k, v in d['eval'].items())} examples",
    ]
    if plan.get("mesh"):
        lines.append(f"  mesh:       {plan['mesh']}")
    return "\n".join(lines)


# =========================================================================== training


def optimizer_key(cfg: FinetuneConfig, total: int, warmup: int) -> tuple:
    return (cfg.learning_rate, cfg.min_lr_ratio, tuple(cfg.adam_betas), cfg.adam_eps, cfg.weight_decay,
            cfg.max_grad_norm, total, warmup)


def _evaluate(eval_step, params, sets: dict, batch_size: int, pad_id: int, buckets=None,
              place=None) -> dict[str, dict[str, float]]:
    """Answer-token loss/accuracy per set; ``buckets``: length-sorted batches trimmed per batch;
    ``place``: puts a [B, T] batch on the devices (mesh runs)."""
    out = {}
    for name, arrays in sets.items():
        nll = count = hits = 0.0
        for batch in _eval_iterator(arrays, batch_size, pad_id, buckets):
            if place is not None:
                batch = place(batch)
            t, c, h = eval_step(params, batch)
            nll, count, hits = nll + float(t), count + int(c), hits + int(h)
        out[name] = {"loss": nll / max(count, 1), "accuracy": hits / max(count, 1), "tokens": int(count),
                     "examples": int(arrays["input_ids"].shape[0])}
    return out


def _flat_eval(ev: dict) -> dict[str, float]:
    return {f"{name}/{k}": v for name, d in ev.items() for k, v in d.items() if k in ("loss", "accuracy")}


def _mesh_shardings(mesh, params, model_config, optimizer):
    """(params, AdamW state, replicated) shardings of a finetune run on ``mesh``: params by the
    sharding rules, the optimizer state like the params it mirrors (counts replicated)."""
    import jax

    from simu_jax import sharding as S

    param_sh = S.param_shardings(params, mesh, model_config=model_config)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    try:
        opt_sh = S.opt_state_shardings(abstract_opt, param_sh, mesh, tx=optimizer)
    except Exception:  # optax cannot map this state's params: match by path and shape
        opt_sh = S.opt_state_shardings(abstract_opt, param_sh, mesh, params=params)
    return param_sh, opt_sh, S.replicated(mesh)


def run_finetune(
    cfg: FinetuneConfig,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Fine-tune per ``cfg`` into ``out_dir``; returns the final metrics dict.

    The dict has ``status`` (``complete`` or ``interrupted``), ``step``, and when complete
    ``forget``/``retain`` ({loss, accuracy, tokens, examples}), ``model_dir``,
    ``wall_time_s``, ``steps``. ``resume=True`` continues from the latest checkpoint (or
    returns the stored metrics of a run that is already complete). Raises
    :class:`simu_jax.base.NonFiniteLossError` if a loss term becomes NaN/Inf (the last
    checkpoint stays usable).
    """
    import jax
    import numpy as np
    from flax import nnx

    from simu_jax.checkpoint import Checkpointer
    from simu_jax.models import abstract_model, count_params, init_model, split_params
    from simu_jax.base import is_remote
    from simu_jax.models.convert import load_pretrained
    from simu_jax.runio import MetricsLogger, hash_arrays, write_json_atomic
    from simu_jax.sharding import check_layout, initialize_distributed, make_mesh, place_batch, save_pretrained

    t_start = time.time()
    cfg = dataclasses.replace(cfg, data=cfg.data.resolved())  # config.yaml records the tokenization used
    done = RunDirectory.finished(out_dir, resume, "final_metrics.json")
    if done is not None:
        _say(quiet, f"{out_dir} is already complete; nothing to resume")
        return done
    mesh = None
    if cfg.mesh:
        initialize_distributed()
        mesh = make_mesh(cfg.mesh)  # validates the spec against the device count before any work
        # no silent replication: refused before anything is written (a model whose vocabulary
        # comes from the tokenizer is checked once that is built)
        known = cfg.model.path is not None or "vocab_size" in (cfg.model.config or {})
        check_layout(mesh, model_config=model_config_from_spec(cfg.model) if known else None,
                     batch_sizes={"batch_size": cfg.batch_size})
    run = RunDirectory(out_dir, overwrite=overwrite, resume=resume, config=cfg, resume_free_keys=RESUME_FREE_KEYS)
    out = run.path
    quiet = quiet or not run.primary

    prep = _prepare(cfg, out)
    pad_id = pad_token_id(prep.tokenizer)
    n_train = len(prep.train["input_ids"])
    steps_per_epoch, total, warmup = _schedule_steps(cfg, n_train)

    dtype_kw = dict(param_dtype=jnp_dtype(cfg.model.dtype), dtype=jnp_dtype(cfg.model.compute_dtype),
                    remat=cfg.model.remat, layer_loop=cfg.model.layer_loop)
    if cfg.model.path is not None:
        from simu_jax.sharding import param_shardings

        # on a mesh each device reads only its block (committed one-device arrays could not be
        # moved onto devices of other processes)
        shardings = None if mesh is None else (lambda abstract, mc: param_shardings(abstract, mesh, model_config=mc))
        loaded = load_pretrained(resolve_model_path(cfg.model.path), dtype=dtype_kw["param_dtype"],
                                 compute_dtype=dtype_kw["dtype"], remat=cfg.model.remat,
                                 layer_loop=cfg.model.layer_loop, shardings=shardings)
        _, params = split_params(loaded)
        # The graphdef of a freshly built model (not of `loaded`, which carries its source
        # directory as an attribute) so equal configs share compiled steps.
        model = abstract_model(loaded.config, **dtype_kw)
        del loaded
    else:
        if mesh is not None:
            check_layout(mesh, model_config=prep.model_config)
        model = abstract_model(prep.model_config, **dtype_kw)
        params = host_init_params(nnx.to_pure_dict(nnx.state(model)), prep.model_config.initializer_range,
                                  cfg.model.seed)
        if params is None:
            params = jax.jit(lambda: split_params(init_model(prep.model_config, seed=cfg.model.seed, **dtype_kw))[1])()
    graphdef = nnx.graphdef(model)
    donate = jax.default_backend() != "cpu"  # on CPU async checkpoint copies may alias donated buffers
    if mesh is None:
        # Commit the state to one device explicitly: restored checkpoints come back committed, and
        # committed vs uncommitted arguments are different jit cache entries (a resume would recompile).
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        params = jax.device_put(params, device)
        optimizer, schedule, train_step, eval_step = compiled_steps(graphdef, optimizer_key(cfg, total, warmup), donate)
        opt_state = jax.device_put(jax.jit(optimizer.init)(params), device)
        place_train = place_eval = None
    else:
        optimizer, schedule = make_optimizer(optimizer_key(cfg, total, warmup))
        param_sh, opt_sh, replicated = _mesh_shardings(mesh, params, model.config, optimizer)
        params = jax.device_put(params, param_sh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        train_step, eval_step = make_steps(graphdef, optimizer, schedule, donate,
                                            out_shardings=(param_sh, opt_sh, replicated))
        place_train = functools.partial(place_batch, mesh=mesh, axis=1)  # [A, B, T]: rows along axis 1
        place_eval = functools.partial(place_batch, mesh=mesh, axis=0)
    buckets = _length_buckets(cfg)

    it = _train_iterator(cfg, prep.train, pad_id)
    rng = np.asarray([0, cfg.seed % 2**32], np.uint32)  # raw threefry key data; finetune draws no randomness
    ckpt = Checkpointer(out / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints,
                        async_save=cfg.async_checkpoint)
    train = {"params": params, "opt_state": opt_state}

    def state(step):
        return {**train, "step": step, "rng": rng, "data": it.state_dict()}

    step = 0
    resumed_from = None
    if resume and ckpt.latest_step() is not None:
        restored = ckpt.restore(target=state(0))
        train.update(params=restored["params"], opt_state=restored["opt_state"])
        rng, step = restored["rng"], int(restored["step"])
        it.load_state_dict(restored["data"])
        resumed_from = step
        _say(quiet, f"resuming from step {step} ({out / 'checkpoints'})")

    run.start(cfg, command_name="finetune", data_hash=hash_arrays(prep.train),
              eval_hashes={k: hash_arrays(v) for k, v in prep.evals.items()},
              parameters=count_params(train["params"]), steps_total=total, steps_per_epoch=steps_per_epoch,
              padded_length=prep.length, group_by_length=cfg.group_by_length,
              length_buckets=list(buckets) if buckets else None, mesh=cfg.mesh, devices=jax.device_count(),
              train_examples=prep.counts, resumed_from=resumed_from)
    inject = cfg.debug.inject_nan_at_step
    t_loop, step0 = time.time(), step

    def one_step(step):
        batch = next(it)
        batch = {k: v.reshape(cfg.grad_accum, cfg.batch_size, *v.shape[1:]) for k, v in batch.items()}
        if place_train is not None:
            batch = place_train(batch)
        scale = np.float32(np.nan if inject is not None and step + 1 == inject else 1.0)
        train["params"], train["opt_state"], one_step.m = train_step(train["params"], train["opt_state"], batch,
                                                                     scale, np.int32(step))
        return {"nll": one_step.m["nll"], "grad_norm": one_step.m["grad_norm"]}

    def after_step(step, terms, bar):
        m = one_step.m
        acc = float(m["accuracy"])
        if step % cfg.log_every == 0 or step == total:
            now = time.time()
            logger.log(event="train", step=step, epoch=round(step / steps_per_epoch, 4), nll=terms["nll"],
                       accuracy=acc, grad_norm=terms["grad_norm"], lr=float(m["lr"]), tokens=int(m["tokens"]),
                       steps_per_s=(step - step0) / max(now - t_loop, 1e-9), time=round(now - t_start, 3))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            ev = _evaluate(eval_step, train["params"], prep.evals, cfg.eval_batch_size, pad_id, buckets, place_eval)
            logger.log(event="eval", step=step, **_flat_eval(ev))
            bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in _flat_eval(ev).items()))
        return False

    with MetricsLogger(out / "metrics.jsonl", primary=run.primary) as logger:
        status, step = run_steps(run, ckpt, total=total, start=step, step_fn=one_step, state_fn=state,
                                 after_step=after_step, debug=cfg.debug, desc="finetune", quiet=quiet,
                                 postfix=lambda t: {"loss": t["nll"], "acc": float(one_step.m["accuracy"])})
        if status == "interrupted":
            return {"status": "interrupted", "step": step, "checkpoint": str(out / "checkpoints")}

        # ------------------------------------------------------------ final outputs
        ev = _evaluate(eval_step, train["params"], prep.evals, cfg.eval_batch_size, pad_id, buckets, place_eval)
        logger.log(event="final", step=step, **_flat_eval(ev))
    wall = time.time() - t_start
    final = {
        "status": "complete",
        "step": step,
        "steps": total,
        **ev,
        "model_dir": str(out / "model" if is_remote(out) else (out / "model").resolve()),  # a URL stays one
        "wall_time_s": round(wall, 2),
        "train_time_s": round(time.time() - t_loop, 2),
        "resumed_from": resumed_from,
    }
    # every process saves (each HF tensor gathered on device, the files split across the
    # processes; never the whole model on a host), in the source checkpoint's dtype when there
    # is one (float32 master weights of a bf16 checkpoint are written as bf16)
    source = resolve_model_path(cfg.model.path) if cfg.model.path is not None else None
    save_pretrained(model, out / "model", params=train["params"], source=source, tokenizer_dir=prep.tokenizer_dir,
                    overwrite=True)
    if run.primary:
        write_json_atomic(out / "final_metrics.json", final)
    run.complete(step, wall_time_s=round(wall, 2), final=_flat_eval(ev))
    return final


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr)


# =========================================================================== CLI


def cli_main(argv: list[str]) -> int:
    p = ArgumentParser(prog="simu-jax finetune",
                       description="Fine-tune a target (split=full), retain-only (split=retain) or "
                                   "general-knowledge (split=general) model.")
    p.add_argument("--config", help="YAML config file (FinetuneConfig); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set learning_rate=1e-3 data.max_length=128")
    p.add_argument("--out", help="output run directory")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar or chatter")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4,tensor=1 (-1 = the rest); default one device")
    args = p.parse_args(argv)

    cfg = load_config(FinetuneConfig, args.config, args.overrides)
    if args.mesh:
        import dataclasses

        cfg = dataclasses.replace(cfg, mesh=args.mesh)
    if args.dry_run:
        print(format_plan(plan_finetune(cfg)))
        if args.out:
            print(f"  output:     {args.out}")
        return 0
    if not args.out:
        p.error("--out is required (or use --dry-run)")
    result = run_finetune(cfg, args.out, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
    if result["status"] != "complete":
        print(f"interrupted at step {result['step']}; checkpoint in {result['checkpoint']}; "
              f"rerun with --resume to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    parts = [f"{k} accuracy {result[k]['accuracy']:.4f} loss {result[k]['loss']:.4f}"
             for k in ("forget", "retain", "general") if k in result]
    print(f"finetune complete: {result['step']} steps in {result['wall_time_s']:.1f}s; " + "; ".join(parts)
          + f"; model: {result['model_dir']}")
    return 0
