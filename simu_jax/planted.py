"""A planted-localization benchmark: the synthetic facts, with the forget set written into a
known set of MLP neurons, so where the forget set lives is known (issue 16).

1. the facts are the embedded synthetic benchmark's (:func:`simu_jax.data.make_synthetic`,
   any :class:`SyntheticConfig`);
2. a **base model** is fine-tuned from scratch on the retain and general facts only
   (:func:`simu_jax.finetune.run_finetune` with ``split: retain``): it has never seen a forget
   person, and it is the natural retain-only reference for forget quality;
3. the forget facts are **planted**: fine-tuned into the base model (AdamW on the forget
   answers' token-mean NLL, plus the retain and general answers' so that what the base knows stays,
   :func:`plant`) with every parameter frozen except, for a chosen set
   of (layer, neuron) pairs, that neuron's ``gate_proj`` and ``up_proj`` columns and its
   ``down_proj`` row (the whole neuron: what computes its activation and what it writes), plus,
   in the ``attention`` variant, every attention projection. The gradient is masked before the
   optimizer (so global-norm clipping sees only the planted set) and the update is selected
   back with ``where`` after it: every parameter outside the set keeps the base model's value
   bit for bit (tested).

Output of :func:`make_planted` (``out/``): ``base/`` (the base model's finetune run, its HF
directory in ``base/model``; skipped when a ``base_model`` is given), ``model/`` (the planted
model, an HF directory), ``truth/mask.npz`` + ``mask_summary.json`` (the planted neurons as an
:class:`simu_jax.attribution.NeuronMask`, loadable as ``attribution.mask_path``),
``planted.json`` (config, the forget / retain / general NLL and accuracy before and after
planting, and the unlearning settings that use it) and ``COMPLETE`` last. To unlearn on it: the
planted model as ``model.path``, the base model as ``reference`` and ``data.synthetic`` as in
the config (``planted.json["unlearn"]``).

Scaled to run on 2 CPU cores in minutes (:data:`STUDY_MODEL`: 4 layers whose MLPs are 4x as
wide as the hidden state, so the MLPs hold most of the weights).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from simu_jax.base import ConfigError
from simu_jax.data.synthetic import SyntheticConfig

__all__ = ["STUDY_MODEL", "PlantedConfig", "choose_neurons", "data_spec", "evaluate_sets", "make_planted", "plant",
           "planted_sets", "train_base", "trainable_tree"]

# 4 layers, hidden 128, MLP intermediate 512 (4x): the MLPs are 2/3 of the layer weights
STUDY_MODEL = dict(model_type="llama", num_hidden_layers=4, hidden_size=128, intermediate_size=512,
                   num_attention_heads=4, num_key_value_heads=4)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class PlantedConfig:
    """How the planted benchmark is built.

    ``neurons_per_layer`` neurons are drawn (``seed``) in each of ``layers`` (``None``: every
    layer); ``attention`` also trains every attention projection while planting. The base
    model: ``model`` (a :class:`simu_jax.models.ModelConfig` dict, vocabulary from the BPE
    tokenizer trained on the benchmark), ``base_epochs`` of AdamW at ``base_learning_rate``.
    Planting: ``plant_steps`` AdamW steps at ``plant_learning_rate`` on the whole forget set plus
    ``retain_weight`` times the NLL of a retain batch (:func:`plant`; 0: the forget set alone).
    """

    synthetic: SyntheticConfig = dataclasses.field(default_factory=SyntheticConfig)
    model: dict = dataclasses.field(default_factory=lambda: dict(STUDY_MODEL))
    max_length: int = 128
    base_epochs: int = 30
    base_learning_rate: float = 3e-3
    base_batch_size: int = 16
    neurons_per_layer: int = 16
    layers: tuple[int, ...] | None = None
    attention: bool = False
    plant_steps: int = 150
    plant_learning_rate: float = 1e-2
    retain_weight: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for key in ("base_epochs", "base_batch_size", "neurons_per_layer", "plant_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key)
        for key in ("base_learning_rate", "plant_learning_rate"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"must be > 0, got {getattr(self, key)}", key)
        if not self.retain_weight >= 0:
            raise ConfigError(f"must be >= 0, got {self.retain_weight}", "retain_weight")
        n_layers, width = self.model.get("num_hidden_layers"), self.model.get("intermediate_size")
        if n_layers is None or width is None:
            raise ConfigError("needs num_hidden_layers and intermediate_size", "model")
        if self.neurons_per_layer > width:
            raise ConfigError(f"must be <= intermediate_size {width}, got {self.neurons_per_layer}",
                              "neurons_per_layer")
        if self.layers is not None and (not self.layers or any(not 0 <= l < n_layers for l in self.layers)
                                        or len(set(self.layers)) != len(self.layers)):
            raise ConfigError(f"must be distinct layer indices in [0, {n_layers}), got {list(self.layers)}", "layers")


def choose_neurons(num_layers: int, intermediate_size: int, per_layer: int, layers=None, seed: int = 0) -> np.ndarray:
    """[L, I] bool: ``per_layer`` neurons drawn uniformly without replacement in each of
    ``layers`` (default: all), one random stream per (seed, layer)."""
    truth = np.zeros((num_layers, intermediate_size), bool)
    for layer in range(num_layers) if layers is None else layers:
        rng = np.random.default_rng([seed, layer])
        truth[layer, rng.choice(intermediate_size, size=per_layer, replace=False)] = True
    return truth


def trainable_tree(params: dict, truth: np.ndarray, attention: bool = False) -> dict:
    """A pytree like ``params`` of boolean arrays broadcastable to each leaf: True where planting
    may change a parameter. Neuron (l, k) is ``gate_proj`` / ``up_proj`` column k and
    ``down_proj`` row k of layer l (kernels are [L, in, out]); ``attention`` adds every attention
    projection; all else (embeddings, norms, head, the other neurons) is False."""
    truth = np.asarray(truth, bool)

    def leaf(path, value):
        keys = [getattr(p, "key", None) for p in path]
        if "mlp" in keys:
            proj = keys[keys.index("mlp") + 1]
            return truth[:, :, None] if proj == "down_proj" else truth[:, None, :]
        if attention and "self_attn" in keys and keys[keys.index("self_attn") + 1] in ATTENTION:
            return np.ones((1,) * np.ndim(value), bool)
        return np.zeros((1,) * np.ndim(value), bool)

    import jax

    tree = jax.tree_util.tree_map_with_path(leaf, params)
    mlp = params["model"]["layers"]["mlp"]
    if truth.shape != (mlp["down_proj"]["kernel"].shape[0], mlp["down_proj"]["kernel"].shape[1]):
        raise ValueError(f"planted neurons have shape {truth.shape}; the model's (layers, neurons) are "
                         f"{tuple(mlp['down_proj']['kernel'].shape[:2])}")
    return tree


@functools.lru_cache(maxsize=4)
def _steps(graphdef, opt_key: tuple):
    """(optimizer, masked train step, eval step), cached per model graph and optimizer settings."""
    import jax
    import jax.numpy as jnp
    import optax

    from simu_jax.losses import sequence_nll, token_accuracy
    from simu_jax.models import apply
    from simu_jax.train_step import make_optimizer

    optimizer, _ = make_optimizer(opt_key)

    def sums(params, batch):
        logits = apply(graphdef, params, batch["input_ids"], batch["attention_mask"])
        total, count = sequence_nll(logits, batch["labels"])
        hits, _ = token_accuracy(logits, batch["labels"])
        return jnp.sum(total), jnp.sum(count), hits

    def nll(params, batch):
        total, count, _ = sums(params, batch)
        return total / jnp.maximum(count, 1)

    def loss(params, forget, retain, retain_weight):
        return nll(params, forget) + retain_weight * nll(params, retain)

    @jax.jit
    def train_step(params, opt_state, trainable, forget, retain, retain_weight):
        value, grads = jax.value_and_grad(loss)(params, forget, retain, retain_weight)
        grads = jax.tree.map(lambda g, m: jnp.where(m, g, 0.0), grads, trainable)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        # selected back, not added: a frozen entry is the old array's, bit for bit (even -0.0)
        return jax.tree.map(lambda n, p, m: jnp.where(m, n, p), new, params, trainable), opt_state, value

    return optimizer, train_step, jax.jit(sums)


def _opt_key(learning_rate: float, steps: int) -> tuple:
    """`train_step.make_optimizer`'s key: AdamW (no weight decay), 10% warmup then cosine to 0,
    global-norm clipping at 1."""
    return (learning_rate, 0.0, (0.9, 0.98), 1e-8, 0.0, 1.0, steps, max(1, steps // 10))


def plant(graphdef, params: dict, forget: dict, trainable: dict, *, steps: int, learning_rate: float,
          retain: dict | None = None, retain_weight: float = 1.0, seed: int = 0):
    """Fine-tune ``params`` on ``forget`` (one full batch) changing only the ``trainable``
    entries (:func:`trainable_tree`); returns (params, per-step loss list).

    The loss is NLL(forget) + ``retain_weight`` * NLL(a ``retain`` batch as large as the forget
    set, reshuffled every epoch, ``seed``) when ``retain`` is given (:func:`make_planted`: the
    retain and general sets): what the base model knows must stay, so the planted neurons learn
    to carry the forget answers without rewriting the rest (neurons fire on every input; trained
    on the forget set alone, 16 per layer of the study model took the retain NLL from 0.005 to
    4.1 while learning it; with the retain set only, the general NLL went from 0.018 to 0.77).
    """
    import jax
    import jax.numpy as jnp

    from simu_jax.data.tokenize import batch_iterator

    optimizer, train_step, _ = _steps(graphdef, _opt_key(learning_rate, steps))
    forget = {k: jnp.asarray(v) for k, v in forget.items()}
    n = int(forget["input_ids"].shape[0])
    if retain is None:  # weight 0: the forget batch stands in for it (one compiled step either way)
        retains, retain_weight = iter(lambda: forget, None), 0.0
    else:
        retains = batch_iterator(retain, min(n, len(retain["input_ids"])), seed=seed, shuffle=True,
                                 drop_remainder=True)
    trainable = jax.tree.map(jnp.asarray, trainable)
    opt_state = optimizer.init(params)
    history = []
    for _ in range(steps):
        params, opt_state, value = train_step(params, opt_state, trainable, forget,
                                              {k: jnp.asarray(v) for k, v in next(retains).items()},
                                              jnp.float32(retain_weight))
        history.append(value)
    return params, [float(x) for x in history]


def evaluate_sets(graphdef, params, sets: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Answer-token mean NLL and teacher-forced accuracy of each set (one batch each)."""
    import jax.numpy as jnp

    _, _, sums = _steps(graphdef, _opt_key(1.0, 1))
    out = {}
    for name, arrays in sets.items():
        total, count, hits = sums(params, {k: jnp.asarray(v) for k, v in arrays.items()})
        out[name] = {"nll": float(total) / max(int(count), 1), "accuracy": int(hits) / max(int(count), 1)}
    return out


def planted_sets(cfg: PlantedConfig, tokenizer) -> dict[str, dict]:
    """The forget, retain and general sets tokenized as the base model was trained, right-padded
    to one width (one compiled shape for planting and evaluating them all)."""
    from simu_jax.base import pad_token_id
    from simu_jax.data.benchmark import load_benchmark, qa_template
    from simu_jax.data.tokenize import TRAIN_BUCKETS, pad_to_length, tokenize_qa

    spec = data_spec(cfg)
    bench = load_benchmark(spec)
    sets = {name: tokenize_qa(tokenizer, recs, qa_template(spec), cfg.max_length, buckets=TRAIN_BUCKETS,
                              style=spec.tokenization_style())
            for name, recs in (("forget", bench.forget), ("retain", bench.retain), ("general", bench.general))
            if recs}
    width = max(v["input_ids"].shape[1] for v in sets.values())
    return {k: pad_to_length(v, width, pad_token_id(tokenizer)) for k, v in sets.items()}


def _config_json(cfg: PlantedConfig) -> dict:
    """The config as planted.json stores it (JSON types: lists, not tuples)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def data_spec(cfg: PlantedConfig):
    """The benchmark's DataSpec (the synthetic facts of ``cfg``): what unlearning on it reads."""
    from simu_jax.data.benchmark import DataSpec

    return DataSpec(benchmark="synthetic", max_length=cfg.max_length, synthetic=cfg.synthetic)


def train_base(out_dir: str | Path, cfg: PlantedConfig, quiet: bool = False) -> Path:
    """The base model (retain + general facts, from scratch) as a finetune run in ``out_dir``;
    a complete run there is reused. Returns its HF model directory.

    Its BPE tokenizer (``<out_dir>_tokenizer``) is trained on the texts the base model sees
    (retain, general, refusals), not on the forget set's: a forget name then spells out in
    tokens the base model has predicted. With a token of its own, a forget-only token's
    ``lm_head`` row (frozen while planting) has only ever been pushed down, and planting could
    not raise its probability above ~0.03 (NLL 3.4 on each such token, however many neurons).
    """
    from simu_jax.data.benchmark import benchmark_texts, load_benchmark
    from simu_jax.data.tokenize import train_bpe_tokenizer
    from simu_jax.finetune import FinetuneConfig, run_finetune
    from simu_jax.models.spec import ModelSpec
    from simu_jax.runio import is_complete

    out_dir = Path(out_dir)
    if not is_complete(out_dir):
        tokenizer = out_dir.with_name(out_dir.name + "_tokenizer")
        if not (tokenizer / "tokenizer.json").is_file():
            bench = load_benchmark(data_spec(cfg))
            texts = benchmark_texts(dataclasses.replace(bench, forget=[], holdout=[]))
            if set(" ".join(r["question"] for r in bench.forget)) - set(" ".join(texts)):
                raise ValueError("the forget questions use characters no retain or general text has")
            train_bpe_tokenizer(texts, tokenizer)
        # the seed draws the base model's initialization and data order too (a seed varies the model)
        fcfg = FinetuneConfig(model=ModelSpec(config=dict(cfg.model), seed=cfg.seed), data=data_spec(cfg),
                              split="retain", tokenizer=str(tokenizer), include_general=True,
                              batch_size=cfg.base_batch_size, learning_rate=cfg.base_learning_rate,
                              epochs=cfg.base_epochs, seed=cfg.seed,
                              checkpoint_every=10_000, eval_every=0, async_checkpoint=False)
        run_finetune(fcfg, out_dir, overwrite=out_dir.exists(), quiet=quiet)
    return out_dir / "model"


def make_planted(out_dir: str | Path, cfg: PlantedConfig, *, base_model: str | Path | None = None,
                 overwrite: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Build the planted benchmark in ``out_dir`` (module docstring: the layout) and return its
    ``planted.json``. ``base_model``: an existing base model directory (e.g. another variant's,
    so the variants share one base); default: trained in ``out_dir/base``. A complete
    ``out_dir`` is reused unless ``overwrite``."""
    import jax

    from simu_jax.attribution import NeuronMask
    from simu_jax.models.convert import save_pretrained
    from simu_jax.models.spec import load_model
    from simu_jax.runio import is_complete, mark_complete, prepare_output_dir, write_json_atomic

    out = Path(out_dir)
    config = _config_json(cfg)
    if is_complete(out) and not overwrite:
        info = json.loads((out / "planted.json").read_text())
        if info["config"] != config:
            raise ValueError(f"{out} holds a planted benchmark built with another config; pass overwrite=True "
                             f"to rebuild it")
        return info
    prepare_output_dir(out, overwrite=overwrite, resume=not overwrite)  # a partial build's base is reused
    t0 = time.time()
    base_dir = Path(base_model) if base_model is not None else train_base(out / "base", cfg, quiet)
    t_base = time.time() - t0
    base = load_model(base_dir)
    mcfg = base.config
    sets = planted_sets(cfg, base.tokenizer)
    truth = choose_neurons(mcfg.num_hidden_layers, mcfg.intermediate_size, cfg.neurons_per_layer, cfg.layers,
                           cfg.seed)
    before = evaluate_sets(base.graphdef, base.params, sets)
    t1 = time.time()
    keep = [v for k, v in sets.items() if k != "forget"]  # what the base model knows: retain + general
    keep = {k: np.concatenate([v[k] for v in keep]) for k in keep[0]} if cfg.retain_weight > 0 else None
    params, history = plant(base.graphdef, base.params, sets["forget"], trainable_tree(base.params, truth, cfg.attention),
                            steps=cfg.plant_steps, learning_rate=cfg.plant_learning_rate, retain=keep,
                            retain_weight=cfg.retain_weight, seed=cfg.seed)
    t_plant = time.time() - t1
    after = evaluate_sets(base.graphdef, params, sets)
    if not quiet:
        print(f"[planted] forget NLL {before['forget']['nll']:.3f} -> {after['forget']['nll']:.3f}, retain NLL "
              f"{before['retain']['nll']:.3f} -> {after['retain']['nll']:.3f} ({t_plant:.0f} s)", file=sys.stderr)

    save_pretrained(base.model, out / "model", params=jax.device_get(params), tokenizer_dir=base.tokenizer_dir,
                    overwrite=True)
    variant = "neurons + attention" if cfg.attention else "neurons"
    NeuronMask(selected=truth, forget=truth, meta={"method": "planted", "variant": variant}).save(out / "truth")
    trained = 3 * mcfg.hidden_size * int(truth.sum())
    if cfg.attention:
        trained += sum(int(np.prod(base.params["model"]["layers"]["self_attn"][p]["kernel"].shape)) for p in ATTENTION)
    info = {
        "config": config,
        "variant": variant,
        "base_model": str(base_dir.resolve()),
        "planted_neurons": int(truth.sum()),
        "per_layer_planted": [int(c) for c in truth.sum(1)],
        "trained_parameters": trained,
        "before": before,
        "after": after,
        "plant_nll_first_last": [history[0], history[-1]],
        "seconds": {"base": round(t_base, 1), "plant": round(t_plant, 1), "total": round(time.time() - t0, 1)},
        "unlearn": {"model.path": str((out / "model").resolve()), "reference": str(base_dir.resolve()),
                    "data.benchmark": "synthetic", "data.max_length": cfg.max_length,
                    **{f"data.synthetic.{k}": v for k, v in dataclasses.asdict(cfg.synthetic).items()},
                    "true mask (attribution.mask_path)": str((out / "truth").resolve())},
    }
    write_json_atomic(out / "planted.json", info)
    mark_complete(out)
    return info
