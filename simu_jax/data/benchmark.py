"""Benchmarks as run configurations see them: :class:`DataSpec` (which benchmark, which
splits, which QA template), :func:`load_benchmark` (the records by role) and
:func:`benchmark_texts` (the corpus a local tokenizer is trained on).

The schema of ``data.synthetic`` is :class:`simu_jax.data.SyntheticConfig` itself. The
evaluation sets of a benchmark are built from a :class:`Benchmark` by
:func:`simu_jax.evaluate.evaluation_sets` (the one path from a benchmark to what is scored).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from simu_jax.base import ConfigError
from simu_jax.data.lume import load_lume
from simu_jax.data.synthetic import REFUSALS, SyntheticConfig, make_synthetic
from simu_jax.data.tofu import TOFU_HUB_NAME, TOFU_SPLITS, default_data_dir, load_idontknow, load_tofu
from simu_jax.data.tokenize import QATemplate

__all__ = ["Benchmark", "DataSpec", "TemplateSpec", "benchmark_texts", "load_benchmark", "qa_template"]


@dataclass
class TemplateSpec:
    """QA template; ``None`` fields take the benchmark's default (TOFU's
    ``Question: ...\\nAnswer: `` for synthetic/TOFU; input and output joined by a space for LUME)."""

    question_start: str | None = None
    question_end: str | None = None
    answer_start: str | None = None


_DEFAULT_SPLITS = {
    "synthetic": {"forget": "forget", "retain": "retain", "holdout": "holdout"},
    "tofu": {"forget": "forget10", "retain": "retain90", "holdout": "holdout10"},
    "lume": {"forget": "forget", "retain": "retain", "holdout": None},
}
# How QA pairs are tokenized for training and unlearning unless data.tokenization says:
# TOFU's own way for TOFU and the synthetic benchmark (evaluated under the `tofu` protocol),
# the prompt and the answer apart for LUME (whose evaluation scores plain texts).
_DEFAULT_TOKENIZATION = {"synthetic": "tofu", "tofu": "tofu", "lume": "split"}
_DEFAULT_TEMPLATES = {
    "synthetic": ("Question: ", "\n", "Answer: "),
    "tofu": ("Question: ", "\n", "Answer: "),
    "lume": ("", " ", ""),
}


@dataclass
class DataSpec:
    """Which benchmark, which splits, and how to tokenize it.

    ``source``: TOFU: a local directory of the JSON files or a hub name (default: the
    shared data directory if present, else ``locuslab/TOFU``); LUME: a local directory
    (default: the shared data directory). Ignored for ``synthetic``.
    Split names (``None`` = the benchmark's default): synthetic forget/retain/holdout;
    TOFU forget10/retain90/holdout10; LUME forget/retain (no holdout).
    Sequences longer than ``max_length`` tokens are truncated with a warning
    (``truncation: error`` makes it an error).
    ``tokenization``: how a QA pair becomes tokens and labels, for fine-tuning and unlearning
    (:func:`simu_jax.data.tokenize_qa`): ``tofu`` (TOFU's ``convert_raw_data_to_model_format``,
    ``data_module.py:8-32``: question and answer as one string, the answer tag, answer and
    EOS scored; what the ``tofu`` evaluation protocol scores), ``open-unlearning`` (prompt +
    answer as one string, answer and EOS scored) or ``split`` (prompt and answer encoded
    apart, answer and EOS scored). ``None``: ``tofu`` for synthetic and TOFU, ``split`` for LUME.
    A model is best unlearned with the tokenization it was trained with.
    """

    benchmark: Literal["synthetic", "tofu", "lume"] = "synthetic"
    source: str | None = None
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    forget: str | None = None
    retain: str | None = None
    holdout: str | None = None
    template: TemplateSpec = field(default_factory=TemplateSpec)
    max_length: int = field(default=256, metadata={"range": (8, None)})
    truncation: Literal["warn", "error"] = "warn"
    tokenization: Literal["tofu", "open-unlearning", "split"] | None = None

    def check(self) -> None:
        if self.benchmark == "tofu":
            for name in ("forget", "retain", "holdout"):
                split = getattr(self, name)
                if split is not None and split not in TOFU_SPLITS:
                    raise ConfigError(f"must be a TOFU split ({', '.join(TOFU_SPLITS)}); got {split!r}", name)
        elif self.benchmark == "lume":
            for name, allowed in (("forget", ("forget", "retain")), ("retain", ("forget", "retain"))):
                split = getattr(self, name)
                if split is not None and split not in allowed:
                    raise ConfigError(f"must be one of {', '.join(allowed)}; got {split!r}", name)
            if self.holdout is not None:
                raise ConfigError("must be null for LUME (it has no holdout split)", "holdout")

    def tokenization_style(self) -> str:
        """``tokenization``, or the benchmark's default (see the class docstring)."""
        return self.tokenization or _DEFAULT_TOKENIZATION[self.benchmark]

    def resolved(self) -> "DataSpec":
        """This spec with ``tokenization`` filled in (what a run's config.yaml records)."""
        return self if self.tokenization else dataclasses.replace(self, tokenization=self.tokenization_style())

    def split_name(self, which: str) -> str | None:
        value = getattr(self, which)
        return value if value is not None else _DEFAULT_SPLITS[self.benchmark][which]


def qa_template(spec: DataSpec):
    """The :class:`simu_jax.data.QATemplate` of a data spec (benchmark defaults filled in)."""
    d = _DEFAULT_TEMPLATES[spec.benchmark]
    t = spec.template
    return QATemplate(
        question_start=d[0] if t.question_start is None else t.question_start,
        question_end=d[1] if t.question_end is None else t.question_end,
        answer_start=d[2] if t.answer_start is None else t.answer_start,
    )


@dataclass
class Benchmark:
    """QA records of one benchmark, by role.

    ``forget``/``retain``/``holdout`` are the training-side splits (``retain`` is the full
    retain set: e.g. TOFU retain90). ``retain_eval`` is the retain subset evaluated
    (TOFU: retain_perturbed, 400 records with paraphrases and perturbed answers; else
    ``retain``). ``general`` plays TOFU's real_authors/world_facts role.
    ``train_general``: whether fine-tuning a target mixes ``general`` into its data
    (only for the synthetic benchmark, whose model starts from scratch).
    """

    name: str
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    general: list[dict]
    refusals: list[str]
    retain_eval: list[dict]
    train_general: bool = False
    info: dict = field(default_factory=dict)


def _tofu_source(spec: DataSpec):
    if spec.source is not None:
        return spec.source
    local = default_data_dir() / "tofu"
    return str(local) if local.is_dir() else TOFU_HUB_NAME


def load_benchmark(spec: DataSpec) -> Benchmark:
    """Load the benchmark a :class:`DataSpec` names as lists of QA records.

    * synthetic: :func:`simu_jax.data.make_synthetic` (forget/retain/holdout/general/refusals).
    * TOFU: forget = ``<forget>_perturbed`` when that split exists (same questions, plus
      paraphrased and perturbed answers), holdout likewise, retain = ``<retain>`` (e.g.
      retain90), retain_eval = ``retain_perturbed``, general = ``real_authors_perturbed`` +
      ``world_facts_perturbed`` (``paraphrased_answer`` = the answer, as TOFU evaluates them;
      ``general_set`` names the source), refusals = ``idontknow.jsonl`` (local source only; else the
      synthetic refusal strings).
    * LUME: rows map ``input`` -> question, ``output`` -> answer (``input``, ``output``, ``id``,
      ``task``, ``kind``, ``doc_id`` kept); no holdout, no general.
    """
    name = spec.benchmark
    if name == "synthetic":
        bench = make_synthetic(spec.synthetic)
        return Benchmark(name, bench.forget, bench.retain, bench.holdout, bench.general, list(bench.refusals),
                         retain_eval=bench.retain, train_general=True,
                         info={"people": bench.people, "synthetic": dataclasses.asdict(spec.synthetic)})

    if name == "tofu":
        source = _tofu_source(spec)

        def with_perturbed(split: str | None) -> list[dict]:
            if split is None:
                return []
            perturbed = f"{split}_perturbed"
            return load_tofu(perturbed if perturbed in TOFU_SPLITS else split, source)

        forget = with_perturbed(spec.split_name("forget"))
        retain = load_tofu(spec.split_name("retain"), source)
        holdout = with_perturbed(spec.split_name("holdout"))
        retain_eval = load_tofu("retain_perturbed", source)
        # These two sets have no paraphrase; TOFU's evaluation uses the answer itself.
        general = [{"paraphrased_answer": r["answer"], **r, "general_set": s}
                   for s in ("real_authors_perturbed", "world_facts_perturbed") for r in load_tofu(s, source)]
        try:
            refusals = load_idontknow(source if Path(str(source)).is_dir() else None)
        except FileNotFoundError:
            refusals = list(REFUSALS)
        return Benchmark(name, forget, retain, holdout, general, refusals, retain_eval=retain_eval,
                         info={"source": str(source)})

    if name == "lume":
        def rows(split):
            # question/answer for training and QA scoring; LUME's own input/output kept for its scorer
            return [{"question": r["input"], "answer": r["output"], "input": r["input"], "output": r["output"],
                     "id": r["id"], "task": r["task"], "kind": r["kind"], "doc_id": r["doc_id"]}
                    for r in load_lume(split, spec.source)]

        forget, retain = rows(spec.split_name("forget")), rows(spec.split_name("retain"))
        return Benchmark(name, forget, retain, [], [], list(REFUSALS), retain_eval=retain,
                         info={"source": str(spec.source) if spec.source else "default"})
    raise ConfigError(f"must be one of synthetic, tofu, lume; got {name!r}", "data.benchmark")  # pragma: no cover


def benchmark_texts(bench: Benchmark) -> list[str]:
    """Every string of a benchmark (questions, answers, paraphrases, perturbed answers,
    refusals): the corpus a local BPE tokenizer is trained on."""
    out: list[str] = []
    seen: set[int] = set()
    for recs in (bench.forget, bench.retain, bench.holdout, bench.general, bench.retain_eval):
        if id(recs) in seen:
            continue
        seen.add(id(recs))
        for r in recs:
            for key in ("question", "answer", "paraphrased_question", "paraphrased_answer"):
                if isinstance(r.get(key), str):
                    out.append(r[key])
            out += [str(p) for p in r.get("perturbed_answer") or []]
    return out + list(bench.refusals)
