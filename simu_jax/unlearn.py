"""`simu-jax unlearn` and `simu-jax attribute`: config, orchestration and outputs.

A run directory holds: `config.yaml` (resolved), `run.json` (what reproduces it: versions,
git commit, data and mask hashes, devices, mesh), `mask/` (mask.npz + mask_summary.json, for
masked methods), `metrics.jsonl` (per-step losses, eval curves), `checkpoints/` (orbax),
`model/` (the unlearned model, HF format, in the source checkpoint's dtype), `summary.json` +
`per_sample.json` (evaluation), `result.json`, and `COMPLETE`, written last.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from simu_jax.base import EXIT_INTERRUPTED, ArgumentParser, ConfigError, pad_token_id
from simu_jax.config import load_config
from simu_jax.data import DataSpec, load_benchmark, qa_template
from simu_jax.engine import METHODS, StepSettings, get_method
from simu_jax.evaluate.attacks import AttackSpec
from simu_jax.loop import DebugSpec, RunDirectory, run_steps
from simu_jax.losses import LossSpec
from simu_jax.models.spec import ModelSpec, load_model
from simu_jax.optim import OptimSpec
from simu_jax.selection import TrainableSpec

POS = (1, None)
NONNEG = (0.0, None)
# Keys that may differ between a run and its --resume (they do not change the trajectory).
RESUME_FREE_KEYS = ("debug", "eval", "reference", "checkpoint_every", "keep_checkpoints", "mesh")


@dataclass
class AttributionSpec:
    """Stage 1. `threshold` t: score > t * layer max; or `top_fraction` per layer instead.
    `mask_path`: reuse a saved mask (directory or mask.npz) instead of attributing."""

    method: Literal["ig", "grad_x_act", "grad_down", "random"] = "ig"
    steps: int = field(default=3, metadata={"range": POS})
    threshold: float | None = field(default=0.5, metadata={"range": (0.0, 1.0, "(]")})
    top_fraction: float | None = field(default=None, metadata={"range": (0.0, 1.0, "(]")})
    dual: Literal["include", "exclude"] = "include"
    max_examples: int | None = field(default=None, metadata={"range": POS})
    batch_size: int = field(default=8, metadata={"range": POS})
    mask_path: str | None = None
    seed: int = field(default=0, metadata={"range": (0, None)})


@dataclass
class TrainableOverride:
    """Override the method's trainable set (None = the method's default)."""

    attention: Literal["full", "frozen"] | None = None
    mlp: Literal["masked", "down", "full", "frozen"] | None = None
    rest: Literal["frozen", "full"] | None = None


@dataclass
class EvalSpec:
    """Final evaluation (`enabled`) and the curves recorded every `every` steps (0 = never).

    `stop_forget_loss`: stop once the curve's forget NLL (teacher-forced, on `curve_limit`
    forget examples) reaches this many nats. `keep_best`: the written model is the one of the
    curve step with the best balance `forget NLL - retain NLL` (both in nats), not the last
    (after `--resume`, among the steps since the resume point). Both need `every > 0`.

    `protocol`: whose evaluation choices the final evaluation follows (`tofu`: TOFU's
    evaluate_util.py; `open-unlearning`; `simu`: this project's; null = the one scoring the tokens
    the model was trained on, `evaluate.protocol.default_protocol` of `data.tokenization`: tofu
    for TOFU and the synthetic benchmark by default, simu for `tokenization: split`;
    docs/metrics.md). `max_new_tokens`:
    new-token budget (null = the protocol's; under tofu, TOFU's 200 tokens in total, which a
    number caps further). `reference_log`: a TOFU eval log
    (`eval_log_aggregated.json`, e.g. a published retain model's) whose forget-set truth ratios
    are the forget-quality reference when no `reference` model is given. `dtype`: the parameter
    dtype of the evaluation (`protocol`: bfloat16 under tofu and semeval, as TOFU's and SemEval's
    scripts run; `model`: the model's). LUME's default protocol is `semeval` (SemEval-2025 Task 4's
    evaluate_generations.py: bfloat16, generations decoded with clean_up_tokenization_spaces=True);
    `simu` evaluates LUME as before.

    The QA evaluation reports what `simu-jax evaluate` does (open-unlearning's suite included):
    with a `reference` model also `mia_auc_reference`, `reference_mia_auc_min_k` and `privleak`
    against the reference's Min-K% AUC (else against 0.5). `gradnorm`: also the GradNorm MIA,
    `mia_auc_gradnorm` (one gradient per forget / holdout row: slow on large models; synthetic
    and tofu). `attack`: robustness attacks after the evaluation (`evaluate.attacks.AttackSpec`:
    4-bit quantization, relearning; synthetic and tofu), each followed by the forget metrics
    again, with their recovery towards the target model `model.path`. `mmlu`: LUME only, an
    MMLU directory in Hendrycks' layout (`test/<subject>_test.csv`, `dev/<subject>_dev.csv`);
    its 5-shot accuracy (`mmlu`) completes the SemEval final score
    (`evaluate.runner.mmlu_accuracy`); `limit` keeps the first rows of each subject. It is read
    when the config is loaded, so a missing or malformed file fails before the run.
    """

    enabled: bool = True
    every: int = field(default=0, metadata={"range": (0, None)})
    stop_forget_loss: float | None = field(default=None, metadata={"range": (0.0, None, "()")})
    keep_best: bool = False
    limit: int | None = field(default=None, metadata={"range": POS})
    curve_limit: int = field(default=32, metadata={"range": POS})
    generate: bool = True
    max_new_tokens: int | None = field(default=32, metadata={"range": POS})
    batch_size: int = field(default=16, metadata={"range": POS})
    protocol: Literal["tofu", "open-unlearning", "simu", "semeval"] | None = None
    reference_log: str | None = None
    dtype: Literal["protocol", "model", "bfloat16", "float32"] = "protocol"
    gradnorm: bool = False
    mmlu: str | None = None
    attack: AttackSpec = field(default_factory=AttackSpec)

    def __post_init__(self):
        if self.reference_log is not None and not Path(self.reference_log).expanduser().exists():
            raise FileNotFoundError(f"eval.reference_log: TOFU eval log not found: {self.reference_log}")
        if self.mmlu is not None:  # read at start (a second or so): a bad file fails before the run
            from simu_jax.data import load_mmlu

            load_mmlu(self.mmlu)


@dataclass
class UnlearnConfig:
    """Unlearning configuration (YAML keys = field names). `model.path` is the target model;
    `reference` the retain-only model (forget quality compares against it)."""

    model: ModelSpec = field(default_factory=ModelSpec)
    reference: str | None = None
    data: DataSpec = field(default_factory=DataSpec)
    method: Literal[tuple(sorted(METHODS))] = "simu_graddiff"  # type: ignore[valid-type]
    attribution: AttributionSpec = field(default_factory=AttributionSpec)
    trainable: TrainableOverride = field(default_factory=TrainableOverride)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    steps: int = field(default=20, metadata={"range": POS})
    batch_size: int = field(default=8, metadata={"range": POS})
    seed: int = field(default=0, metadata={"range": (0, None)})
    eval: EvalSpec = field(default_factory=EvalSpec)
    checkpoint_every: int = field(default=50, metadata={"range": POS})
    keep_checkpoints: int = field(default=2, metadata={"range": POS})
    mesh: str | None = None
    debug: DebugSpec = field(default_factory=DebugSpec)

    def check(self) -> None:
        from simu_jax.base import as_path
        from simu_jax.evaluate.protocol import check_protocol

        if self.reference is not None:
            as_path(self.reference, "reference")  # a bad URL scheme is refused before any output exists
        bench = self.data.benchmark
        if self.eval.protocol is not None:
            try:
                check_protocol(self.eval.protocol, bench)
            except ValueError as e:
                raise ConfigError(str(e), "eval.protocol") from None
        if self.eval.mmlu is not None and bench != "lume":
            raise ConfigError(f"applies to the lume benchmark (the SemEval final score), not {bench}", "eval.mmlu")
        if self.eval.gradnorm and bench == "lume":
            raise ConfigError("applies to the synthetic and tofu benchmarks (forget vs holdout rows)", "eval.gradnorm")
        if self.eval.attack.names and bench == "lume":
            raise ConfigError("applies to the synthetic and tofu benchmarks (QA forget metrics)", "eval.attack.names")


def step_settings(cfg: UnlearnConfig) -> StepSettings:
    """The step's hyper-parameters: the config's own ``optim`` and ``loss`` objects (the debug
    NaN step is 1-based here, the engine counts steps from 0)."""
    nan = cfg.debug.inject_nan_at_step
    return StepSettings(optim=cfg.optim, loss=cfg.loss, inject_nan_at_step=-1 if nan is None else nan - 1,
                        total_steps=cfg.steps)


def resolve_config(cfg: UnlearnConfig) -> UnlearnConfig:
    """``cfg`` with the ``optim`` / ``loss`` fields left unset filled in (what config.yaml records).

    A Sophia method (so_*, simu_*) without ``optim.preset`` takes ``soul``, SOUL's optimizer as
    its code runs (docs/method.md#soul-optimizer); then ``OptimSpec.resolved`` (with
    ``steps`` for the schedule's warmup) and ``LossSpec.resolved``; ``data.tokenization``
    (``DataSpec.resolved``). Idempotent."""
    from simu_jax.engine import resolve_settings

    if cfg.data.resolved() != cfg.data:
        cfg = dataclasses.replace(cfg, data=cfg.data.resolved())

    method = resolved_method(cfg)
    o = cfg.optim
    if method.optimizer == "sophia" and o.preset is None:
        o = dataclasses.replace(o, preset="soul")
    s = resolve_settings(method, dataclasses.replace(step_settings(cfg), optim=o))
    if s.optim == cfg.optim and s.loss == cfg.loss:
        return cfg
    return dataclasses.replace(cfg, optim=s.optim, loss=s.loss)


def resolved_method(cfg: UnlearnConfig):
    base = get_method(cfg.method)
    t = cfg.trainable
    spec = TrainableSpec(attention=t.attention or base.trainable.attention, mlp=t.mlp or base.trainable.mlp,
                         rest=t.rest or base.trainable.rest)
    return get_method(cfg.method, spec)


# =========================================================================== preparation


@dataclass
class Prepared:
    model: Any  # abstract CausalLM (graph only)
    graphdef: Any
    params: dict
    tokenizer: Any
    tokenizer_dir: Path
    bench: Any
    template: Any
    arrays: dict  # forget / retain / forget_idk -> numpy arrays, common length


def prepare(cfg: UnlearnConfig, bench=None, mesh=None) -> Prepared:
    """Load the target model, its tokenizer, the benchmark, and tokenize forget/retain.

    `bench`: a `simu_jax.data.Benchmark` to use instead of loading `cfg.data`'s (experiments on
    custom splits, e.g. sequential forget requests); it is tokenized the same way. `mesh`: the
    weights are read straight into their shardings on it (each device reads only its block)."""
    from simu_jax.data import TRAIN_BUCKETS, pad_to_length, tokenize_qa
    from simu_jax.engine import with_refusals

    if cfg.model.path is None:
        raise ValueError("model.path is required: the fine-tuned target model to unlearn from")
    loaded = load_model(cfg.model, shardings=None if mesh is None else _mesh_param_shardings(mesh))
    tok = loaded.tokenizer
    bench = load_benchmark(cfg.data) if bench is None else bench
    for name in ("forget", "retain"):
        if not getattr(bench, name):
            raise ValueError(f"the {name} set of benchmark {bench.name} is empty")
    template = qa_template(cfg.data)
    max_len = min(cfg.data.max_length, loaded.config.max_position_embeddings)

    def tokenize(recs):
        return tokenize_qa(tok, recs, template, max_len, truncation=cfg.data.truncation, buckets=TRAIN_BUCKETS,
                           style=cfg.data.tokenization_style())

    arrays = {"forget": tokenize(bench.forget), "retain": tokenize(bench.retain)}
    if resolved_method(cfg).objective == "idk":
        arrays["forget_idk"] = tokenize(with_refusals(bench.forget, bench.refusals, cfg.seed))
    length = max(a["input_ids"].shape[1] for a in arrays.values())
    arrays = {k: pad_to_length(v, length, pad_token_id(tok)) for k, v in arrays.items()}
    return Prepared(loaded.model, loaded.graphdef, loaded.params, tok, loaded.tokenizer_dir, bench, template, arrays)


def _mesh_param_shardings(mesh):
    """``(abstract_params, model_config) -> shardings`` on ``mesh`` (the loader's callable form)."""
    from simu_jax.sharding import param_shardings

    return lambda abstract, model_config: param_shardings(abstract, mesh, model_config=model_config)


def compute_mask(cfg: UnlearnConfig, prep: Prepared, quiet: bool = True, mesh=None):
    """The neuron mask of a run: loaded (`attribution.mask_path`) or attributed on forget + retain.

    `mesh`: `prep.params` are sharded on it (several processes included): every attribution
    batch is placed as global arrays with its rows over the batch axes, so the devices of all
    processes share the rows, and the summed scores are gathered to every host
    (`attribution.neuron_scores`), so every process builds the same mask from the same scores
    (`run_unlearn` checks that by digest)."""
    import numpy as np

    from simu_jax.attribution import NeuronMask, build_mask, neuron_scores, random_mask_like
    from simu_jax.data import batch_iterator

    a = cfg.attribution
    if a.mask_path:
        mcfg = prep.model.config
        return NeuronMask.load(a.mask_path, shape=(mcfg.num_hidden_layers, mcfg.intermediate_size))

    def batches(arrays):
        n = len(arrays["input_ids"]) if a.max_examples is None else min(a.max_examples, len(arrays["input_ids"]))
        sub = {k: v[:n] for k, v in arrays.items()}
        it = batch_iterator(sub, a.batch_size, seed=a.seed, shuffle=False, epochs=1)
        return list(it)

    method = "ig" if a.method == "random" else a.method
    t0 = time.time()
    place = None
    if mesh is not None:
        from simu_jax.sharding import place_batch

        place = functools.partial(place_batch, mesh=mesh)
    forget = neuron_scores(prep.graphdef, prep.params, batches(prep.arrays["forget"]), method=method, steps=a.steps,
                           place=place)
    # retain scores give dual='exclude' its selection and the summary its per_layer_retain / _dual
    # counts; a random mask keeps neither, so with dual='include' they would be thrown away
    retain = None
    if not (a.method == "random" and a.dual == "include"):
        retain = neuron_scores(prep.graphdef, prep.params, batches(prep.arrays["retain"]), method=method,
                               steps=a.steps, place=place)
    meta = {"method": a.method, "steps": a.steps, "threshold": a.threshold, "top_fraction": a.top_fraction,
            "seconds": round(time.time() - t0, 2)}
    threshold = None if a.top_fraction is not None else a.threshold
    mask = build_mask(forget, retain, threshold=threshold, top_fraction=a.top_fraction, dual=a.dual, meta=meta)
    if a.method == "random":
        mask = random_mask_like(mask, seed=a.seed)
    if not quiet:
        print(f"attribution: {mask.num_selected} neurons selected ({100 * mask.num_selected / mask.selected.size:.1f}%),"
              f" per layer {mask.counts} [{meta['seconds']} s]", file=sys.stderr)
    np.asarray(mask.selected)  # materialized
    return mask


def _agreed(mask):
    """``mask``, once every process holds the same one (several processes: its digest compared
    across them, a one-line ``ValueError`` on all of them otherwise; K, the rows per layer,
    would differ and the processes' SPMD programs diverge)."""
    from simu_jax.sharding import check_same_on_all_processes

    check_same_on_all_processes(mask.digest(), "the neuron mask")
    return mask


# =========================================================================== run


def layout_batch_sizes(cfg: UnlearnConfig) -> dict[str, int]:
    """The batch sizes a run places over the mesh's batch axes, by config key (each must divide
    them, :func:`simu_jax.sharding.check_layout`): the step's ``batch_size``, the attribution's
    (when it attributes) and the final evaluation's (when it evaluates: the scorer fills each
    set's last batch up to ``eval.batch_size`` rows, so every evaluation batch then divides)."""
    sizes = {"batch_size": cfg.batch_size}
    if resolved_method(cfg).trainable.mlp == "masked" and not cfg.attribution.mask_path:
        sizes["attribution.batch_size"] = cfg.attribution.batch_size
    if cfg.eval.enabled:
        sizes["eval.batch_size"] = cfg.eval.batch_size
    return sizes


def check_inputs(cfg: UnlearnConfig) -> None:
    """The run's input files, refused in one line naming the file before the run directory
    exists (so nothing is written): the model and reference directories (config.json and the
    safetensors headers; no weight is read) and a given mask (read and checked against the
    model's shape)."""
    from simu_jax.models.spec import check_model_files, model_config_from_spec

    if cfg.model.path is not None:
        check_model_files(cfg.model.path)
    if cfg.reference is not None:
        check_model_files(cfg.reference)
    if cfg.attribution.mask_path:
        from simu_jax.attribution import NeuronMask

        mcfg = model_config_from_spec(cfg.model)
        NeuronMask.load(cfg.attribution.mask_path, shape=(mcfg.num_hidden_layers, mcfg.intermediate_size))


def run_unlearn(cfg: UnlearnConfig, out_dir, overwrite: bool = False, resume: bool = False,
                quiet: bool = False, bench=None) -> dict[str, Any]:
    """Unlearn per `cfg` into `out_dir`; returns {'status', 'step', 'metrics'?, ...}.
    `bench`: see `prepare` (default: the benchmark `cfg.data` names)."""
    import jax
    import jax.numpy as jnp

    from simu_jax.checkpoint import Checkpointer
    from simu_jax.data import batch_iterator, scored_width, with_scored_positions
    from simu_jax.engine import Unlearner, eval_losses, host_metrics
    from simu_jax.runio import MetricsLogger, hash_arrays, write_json_atomic
    from simu_jax.models.spec import model_config_from_spec
    from simu_jax.sharding import check_layout, initialize_distributed, make_mesh, place_batch, save_pretrained

    t_start = time.time()
    cfg = resolve_config(cfg)  # presets applied: config.yaml and run.json record the values that ran
    done = RunDirectory.finished(out_dir, resume, "result.json")
    if done is not None:
        return done
    mesh = None
    if cfg.mesh:
        initialize_distributed()  # several processes (JAX_COORDINATOR_ADDRESS, ..., or a cluster launcher)
        mesh = make_mesh(cfg.mesh)  # validates the spec against the device count before any work
        # no silent replication: refused before anything is read or written
        check_layout(mesh, model_config=model_config_from_spec(cfg.model) if cfg.model.path else None,
                     batch_sizes=layout_batch_sizes(cfg))
    check_inputs(cfg)  # bad model / reference / mask files: one line, before the run directory exists
    run = RunDirectory(out_dir, overwrite=overwrite, resume=resume, config=cfg, resume_free_keys=RESUME_FREE_KEYS)
    out = run.path
    quiet = quiet or not run.primary  # progress and messages from process 0 only
    prep = prepare(cfg, bench, mesh)
    method = resolved_method(cfg)
    mask = None
    if method.trainable.mlp == "masked":
        mask_dir = out / "mask"
        if resume and (mask_dir / "mask.npz").is_file():
            from simu_jax.attribution import NeuronMask

            mask = _agreed(NeuronMask.load(mask_dir))
        else:
            mask = _agreed(compute_mask(cfg, prep, quiet, mesh))
            if run.primary:
                mask.save(mask_dir)
    # with a mesh, built directly on it: trainable copy and optimizer state created sharded
    unlearner = Unlearner(prep.graphdef, prep.params, method, step_settings(cfg),
                          selected=None if mask is None else mask.selected, mesh=mesh,
                          model_config=prep.model.config if mesh is not None else None)

    # Every process runs the same deterministic iterators (same seeds, same positions, so a
    # checkpoint's data position is one for all) and places only its rows of each global batch.
    iters = {k: batch_iterator(v, cfg.batch_size, seed=cfg.seed + i, shuffle=True)
             for i, (k, v) in enumerate(sorted(prep.arrays.items()))}
    # each step batch carries its scored view (the loss takes the logits at the label positions
    # only), one width per set so every step has the same shapes
    scored_widths = {k: scored_width(v["labels"]) for k, v in prep.arrays.items()}

    def place(host_batch):
        if mesh is None:
            return {a: jax.numpy.asarray(v) for a, v in host_batch.items()}
        return place_batch(host_batch, mesh)

    if (cfg.eval.stop_forget_loss is not None or cfg.eval.keep_best) and not cfg.eval.every:
        raise ValueError("eval.stop_forget_loss and eval.keep_best need eval.every > 0 (curve steps)")
    # fixed curve sets, placed once (on a mesh: global arrays, split over the batch axes)
    curve_sets = {k: place({a: v[: cfg.eval.curve_limit] for a, v in prep.arrays[k].items()})
                  for k in ("forget", "retain")}
    best = {"score": -float("inf"), "step": None, "trainable": None}
    ckpt = Checkpointer(out / "checkpoints", save_every=cfg.checkpoint_every, keep=cfg.keep_checkpoints)

    def state(step):
        return {"trainable": unlearner.trainable, "opt_state": unlearner.opt_state, "step": step,
                "data": {k: it.state_dict() for k, it in iters.items()}}

    step = 0
    resumed_from = None
    if resume and ckpt.latest_step() is not None:
        restored = ckpt.restore(target=state(0))
        unlearner.trainable, unlearner.opt_state = restored["trainable"], restored["opt_state"]
        step = unlearner.step_count = int(restored["step"])
        for k, it in iters.items():
            it.load_state_dict(restored["data"][k])
        resumed_from = step
        if not quiet:
            print(f"resuming from step {step}", file=sys.stderr)

    run.start(cfg, command_name="unlearn", method=cfg.method, seed=cfg.seed,
              data_hash=hash_arrays({f"{k}/{a}": v for k, arr in prep.arrays.items() for a, v in arr.items()}),
              mask_hash=None if mask is None else mask.digest(),
              mask_selected=None if mask is None else mask.num_selected,
              trainable_parameters=unlearner.num_trainable, state_bytes=unlearner.state_bytes(),
              mesh=cfg.mesh, resumed_from=resumed_from)
    base_key = jax.random.key(cfg.seed)

    def curves(current):
        return {f"eval/{k}_loss": float(eval_losses(prep.graphdef, current, s)) for k, s in curve_sets.items()}

    def one_step(step):
        batch = {k: place(with_scored_positions(next(it), scored_widths[k])) for k, it in iters.items()}
        metrics = host_metrics(unlearner.step(batch, jax.random.fold_in(base_key, step)))
        one_step.metrics = metrics
        # the objective's terms first, so a NaN is reported in the term it came from
        terms = {k.removeprefix("loss/"): v for k, v in metrics.items() if k.startswith("loss/")}
        return {**terms, "total loss": metrics["loss"]}

    def after_step(step, terms, bar):
        record = {"step": step, **one_step.metrics, "time": round(time.time() - t_start, 3)}
        reached = False
        if cfg.eval.every and step % cfg.eval.every == 0:
            record.update(curves(unlearner.params()))
            score = record["eval/forget_loss"] - record["eval/retain_loss"]
            if cfg.eval.keep_best and score > best["score"]:  # a copy on the devices, in place
                best.update(score=score, step=step, trainable=jax.tree.map(jnp.copy, unlearner.trainable))
            limit = cfg.eval.stop_forget_loss
            reached = limit is not None and record["eval/forget_loss"] >= limit
            if reached:
                bar.write(f"forget NLL {record['eval/forget_loss']:.3f} >= {limit}: stopping at step {step}")
        logger.log(record)
        return reached

    t_loop = time.time()
    with MetricsLogger(out / "metrics.jsonl", primary=run.primary) as logger:
        if cfg.eval.every and step == 0:
            logger.log(step=0, **curves(prep.params))
        status, step = run_steps(run, ckpt, total=cfg.steps, start=step, step_fn=one_step, state_fn=state,
                                 after_step=after_step, debug=cfg.debug, desc=f"unlearn {cfg.method}", quiet=quiet,
                                 postfix=lambda t: {"loss": t["total loss"], "forget": t.get("forget", float("nan"))})
    if status == "interrupted":
        return {"status": "interrupted", "step": step, "checkpoint": str(out / "checkpoints")}

    unlearn_time = time.time() - t_loop
    if best["trainable"] is not None:
        unlearner.trainable = best["trainable"]
    # Every process takes part in the end work, with the params where they are (on a mesh:
    # sharded, never whole on a host): the save gathers one HF tensor at a time on device and
    # splits the files across the processes (the source checkpoint's dtype), the evaluation runs
    # its passes on the mesh; process 0 writes the run's files; then all meet at one barrier
    # (run.complete), so no process reaches JAX's shutdown barrier while another still works.
    final_params = unlearner.params()
    result: dict[str, Any] = {"status": "complete", "step": step, "method": cfg.method,
                              "unlearn_time_s": round(unlearn_time, 2), "resumed_from": resumed_from,
                              "trainable_parameters": unlearner.num_trainable, "state_bytes": unlearner.state_bytes(),
                              "best_step": best["step"]}
    t_end = time.time()
    save_pretrained(prep.model, out / "model", params=final_params, source=prep.tokenizer_dir,
                    tokenizer_dir=prep.tokenizer_dir, overwrite=True)
    result["save_time_s"] = round(time.time() - t_end, 2)
    if cfg.eval.enabled:
        t_eval = time.time()
        result["metrics"] = evaluate_run(cfg, prep, final_params, out, quiet, mesh=mesh)
        result["eval_time_s"] = round(time.time() - t_eval, 2)
    if run.primary:
        write_json_atomic(out / "result.json", result)
    run.complete(step, wall_time_s=round(time.time() - t_start, 2))
    return result


def evaluate_run(cfg: UnlearnConfig, prep: Prepared, params, out: Path, quiet: bool = True,
                 mesh=None) -> dict[str, float]:
    """Evaluate `params` on the benchmark (forget quality against `cfg.reference`) -> summary.json.

    `mesh`: `params` are laid out on it (sharded, several processes included). Then every
    process must call this: the scorers' passes run on the mesh with each batch's rows over
    its batch axes (`evaluate.scoring.Scorer`'s `mesh`), the reference model is read straight
    into its shardings there, every process computes the same summary, and process 0 writes
    the files."""
    import jax

    from simu_jax.evaluate.runner import (Scorer, evaluate_lume, evaluate_qa_benchmark, evaluation_sets,
                                          format_summary, summary_metrics, write_results)

    from simu_jax.evaluate.protocol import check_protocol, default_protocol

    bench = prep.bench
    protocol = check_protocol(cfg.eval.protocol or default_protocol(bench.name, cfg.data.tokenization_style()),
                              bench.name)
    scorer = Scorer(prep.graphdef, params, prep.tokenizer, prep.template, batch_size=cfg.eval.batch_size,
                    protocol=protocol, dtype=None if cfg.eval.dtype == "model" else cfg.eval.dtype, mesh=mesh)
    sets = evaluation_sets(bench, cfg.eval.limit, protocol=protocol)
    if bench.name == "lume":
        from simu_jax.data import load_mia_documents, load_mmlu

        try:  # SemEval's document-level MIA (members = LUME forget documents); absent = no MIA keys
            member, nonmember = load_mia_documents("member"), load_mia_documents("nonmember")
        except FileNotFoundError:
            member = nonmember = None
        mmlu = load_mmlu(cfg.eval.mmlu, limit=cfg.eval.limit) if cfg.eval.mmlu else None
        summary, per_sample = evaluate_lume(scorer, sets["forget"], sets["retain"], member, nonmember,
                                            max_new_tokens=cfg.eval.max_new_tokens or 256, generate=cfg.eval.generate,
                                            mmlu=mmlu)
    else:
        ref_tr = ref_scorer = None
        if cfg.reference:  # one scorer: forget-quality truth ratios, reference MIA, privleak's reference AUC
            ref = load_model(cfg.reference, shardings=None if mesh is None else _mesh_param_shardings(mesh))
            ref_scorer = Scorer(ref.graphdef, ref.params, prep.tokenizer, prep.template,
                                batch_size=cfg.eval.batch_size, protocol=protocol, dtype=scorer.dtype, mesh=mesh)
        elif cfg.eval.reference_log:
            from simu_jax.evaluate.tofu_log import log_forget_truth_ratios, read_tofu_log

            ref_tr = log_forget_truth_ratios(read_tofu_log(cfg.eval.reference_log))
        summary, per_sample = evaluate_qa_benchmark(scorer, sets, reference_forget_truth_ratios=ref_tr,
                                                    generate=cfg.eval.generate, max_new_tokens=cfg.eval.max_new_tokens,
                                                    reference_scorer=ref_scorer, gradnorm=cfg.eval.gradnorm)
        if cfg.eval.attack.names:  # recovery towards the target model (model.path, before unlearning)
            from simu_jax.evaluate.attacks import run_attacks

            tgt = load_model(cfg.model, shardings=None if mesh is None else _mesh_param_shardings(mesh))
            summary["robustness"] = run_attacks(cfg.eval.attack, scorer, params, sets, summary, per_sample,
                                                evaluate_qa=evaluate_qa_benchmark,
                                                target=(tgt.graphdef, tgt.params), generate=cfg.eval.generate,
                                                max_new_tokens=cfg.eval.max_new_tokens)
    if jax.process_index() == 0:
        write_results(out, cfg.method, summary, per_sample)
    if not quiet:
        print(format_summary(summary), file=sys.stderr)
    return summary_metrics(summary)


# =========================================================================== CLI


def _parser(prog: str, description: str):
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="YAML config file (UnlearnConfig); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set method=simu_npo optim.learning_rate=1e-4")
    p.add_argument("--out", required=True, help="output run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    return p


def _load(args):
    cfg = load_config(UnlearnConfig, args.config, args.overrides)
    if getattr(args, "mesh", None):
        cfg = dataclasses.replace(cfg, mesh=args.mesh)
    return cfg


def plan(cfg: UnlearnConfig) -> str:
    """The run's settings and its per-device memory estimate (`simu-jax unlearn --dry-run`). Reads
    only the model's config.json (a local directory holding just that file is enough). With a
    mesh, raises the run's ``check_layout`` error when the run would refuse the mesh."""
    from simu_jax.models.spec import model_config_from_spec

    method = resolved_method(cfg)
    cfg = resolve_config(cfg)
    lines = [f"method: {cfg.method} (objective {method.objective}, optimizer {method.optimizer}, "
             f"trainable {dataclasses.asdict(method.trainable)})",
             "optim: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.optim).items()),
             "loss: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg.loss).items()),
             f"model: {cfg.model.path}", f"benchmark: {cfg.data.benchmark}", f"steps: {cfg.steps} x batch {cfg.batch_size}"]
    if cfg.mesh:  # the run's refusals (check_layout), from the mesh's sizes: no devices needed
        lines.append(_plan_layout(cfg))
    try:
        from simu_jax.memory import memory_estimate, per_device

        mcfg = model_config_from_spec(cfg.model)
        a, masked = cfg.attribution, method.trainable.mlp == "masked"
        rows = None
        if masked and a.mask_path:  # the given mask's rows per layer (K)
            from simu_jax.attribution import NeuronMask

            mask = NeuronMask.load(a.mask_path, shape=(mcfg.num_hidden_layers, mcfg.intermediate_size))
            rows = int(mask.selected.sum(axis=1).max())
        seq_len = min(cfg.data.max_length, mcfg.max_position_embeddings)
        est = memory_estimate(mcfg, method, settings=step_settings(cfg), batch_size=cfg.batch_size, seq_len=seq_len,
                              dtype=cfg.model.dtype, compute_dtype=cfg.model.compute_dtype, remat=cfg.model.remat,
                              mlp_fraction=a.top_fraction or 0.05, neuron_rows=rows,
                              attribution_batch_size=a.batch_size if masked and not a.mask_path else None,
                              attribution_steps=1 if a.method in ("grad_x_act", "grad_down") else a.steps)
        dev = per_device(est, cfg.mesh or "fsdp=1")
        where = f"mesh {cfg.mesh} ({dev['devices']} devices)" if cfg.mesh else "one device (no mesh)"
        lines.append(f"memory estimate (bytes) per device, {where}; {cfg.model.dtype} "
                     f"params, {cfg.model.compute_dtype or cfg.model.dtype} compute, remat {cfg.model.remat}, "
                     f"{cfg.batch_size} forget + {cfg.batch_size} retain rows x {seq_len} tokens:")
        labels = {"params": "params (trainable + frozen)", "source_params": "loaded params kept by the run",
                  "gradients": "gradients", "optimizer_state": "optimizer state", "curvature_state": "curvature state",
                  "activations": "activations", "transient": "transient (curvature, HVP residuals)",
                  "step": "step total", "attribution_phase": "attribution (model + IG buffers)", "peak": "peak"}
        lines += [f"  {label:34s} {dev[k]:>18,d}  {dev[k] / 2**30:8.2f} GiB" for k, label in labels.items()]
    except Exception as e:  # the plan is informative; a missing model dir is reported by the real run
        lines.append(f"memory estimate unavailable: {' '.join(str(e).split())[:120]}")
    return "\n".join(lines)


def _plan_layout(cfg: UnlearnConfig) -> str:
    """What `run_unlearn` checks before it reads or writes anything, on the mesh's axis sizes
    alone (so a dry run on a laptop plans a 16-chip slice): the same ``ValueError`` when the
    run would refuse the mesh (a spec that does not parse, a ``batch_size`` that does not
    divide the batch axes, a parameter dimension that does not divide its axes), else a line."""
    from simu_jax.memory import mesh_sizes
    from simu_jax.models.spec import model_config_from_spec
    from simu_jax.sharding import check_layout

    sizes = mesh_sizes(cfg.mesh)
    try:
        mcfg = model_config_from_spec(cfg.model) if cfg.model.path else None
    except Exception:  # noqa: BLE001 - no config.json: the memory estimate below says so
        mcfg = None
    batch_sizes = layout_batch_sizes(cfg)
    check_layout(sizes, model_config=mcfg, batch_sizes=batch_sizes)
    keys = " and ".join(batch_sizes)
    what = f"{keys} and every parameter dimension divide" if mcfg is not None else f"{keys} divide"
    return f"layout: {what} their axes of the mesh {cfg.mesh} (the run's check_layout passes)"


def cli_main(argv: list[str]) -> int:
    p = _parser("simu-jax unlearn", "Unlearn the forget set from a fine-tuned target model.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4,tensor=1 (-1 = the rest)")
    args = p.parse_args(argv)
    cfg = _load(args)
    if args.dry_run:
        print(plan(cfg))
        return 0
    result = run_unlearn(cfg, args.out, overwrite=args.overwrite, resume=args.resume, quiet=args.quiet)
    if result["status"] == "interrupted":
        return EXIT_INTERRUPTED
    if not args.quiet:
        print(f"unlearned model written to {args.out.rstrip('/')}/model", file=sys.stderr)
    return 0


def attribute_main(argv: list[str]) -> int:
    """`simu-jax attribute`: compute and save a neuron mask on its own (with a mesh, as every
    process of a multi-process run: process 0 writes the mask)."""
    from simu_jax.base import as_path
    from simu_jax.loop import prepare_on_process_0

    p = _parser("simu-jax attribute", "Attribute MLP neurons on the forget/retain sets and save the mask.")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=4 (-1 = the rest); several processes as in unlearn")
    args = p.parse_args(argv)
    cfg = _load(args)
    if args.dry_run:
        print(plan(cfg))
        return 0
    mesh = None
    if cfg.mesh:  # as run_unlearn: params read into their shardings, rows over the batch axes
        from simu_jax.models.spec import model_config_from_spec
        from simu_jax.sharding import check_layout, initialize_distributed, make_mesh

        initialize_distributed()
        mesh = make_mesh(cfg.mesh)
        check_layout(mesh, model_config=model_config_from_spec(cfg.model) if cfg.model.path else None,
                     batch_sizes={"attribution.batch_size": cfg.attribution.batch_size})
    import jax

    from simu_jax.sharding import sync_processes

    primary = jax.process_index() == 0
    out = prepare_on_process_0(as_path(args.out), overwrite=args.overwrite, resume=False)
    prep = prepare(cfg, mesh=mesh)
    mask = _agreed(compute_mask(cfg, prep, quiet=args.quiet or not primary, mesh=mesh))
    if mask.num_selected == 0:
        raise ValueError("the neuron mask selects zero neurons (lower attribution.threshold or set top_fraction)")
    if primary:
        mask.save(out)
        print(f"{mask.num_selected} neurons selected, per layer {mask.counts}; mask written to {out}")
    sync_processes("simu_jax.attribute.end")
    return 0
