"""Evaluation protocols: whose choices an evaluation follows (``--protocol``, ``eval.protocol``).

The metric *formulas* are the same under every protocol (``docs/metrics.md``); what differs is
which rows are scored, which tokens carry the loss, how question and answer are tokenized, how
answers are generated and how the MIA family is set up. Sources: ``locuslab/tofu`` @ bdc209e
and ``locuslab/open-unlearning`` @ d3d7cf9 (file:line in ``docs/metrics.md`` and below).

=====================  ===============================  ================================  ===========================
choice                 ``tofu``                         ``open-unlearning``               ``simu`` (before issue 17)
=====================  ===============================  ================================  ===========================
rows                   first 300 of each set            all                               all (``--limit``: random)
scored tokens          answer tag + answer + EOS        answer + EOS                      answer + EOS
tokenization           question + answer as one string  prompt + answer as one string     prompt, answer apart
scored-length cap      200 tokens                       512 tokens                        the model's context
generation prompt      question only (no answer tag)    prompt with the answer tag        prompt with the answer tag
generation budget      200 tokens in total (batch 30)   200 new tokens                    200 new tokens
MIA Min-K% k           0.4 (open-unlearning's)          0.4                               0.2
zlib text              decoded label tokens             decoded label tokens              the answer string
parameter dtype        bfloat16                         the model's                       the model's
decoded generations    the tokenizer's decode           the tokenizer's decode            the tokenizer's decode
benchmarks             synthetic, tofu                  synthetic, tofu                   all
=====================  ===============================  ================================  ===========================

``semeval`` (SemEval-2025 Task 4's ``evaluate_generations.py``, the default for LUME; LUME only)
runs the model in bfloat16 and decodes generations with ``clean_up_tokenization_spaces=True``;
its other fields (QA tokenization, rows, ...) are ``simu``'s and unused by the LUME evaluation.
``simu`` on LUME keeps the evaluation as it was before (the model's dtype, the tokenizer's
plain decode).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = ["PROTOCOLS", "PROTOCOL_NAMES", "PROTOCOL_OF_TOKENIZATION", "Protocol", "check_protocol", "default_protocol", "get_protocol"]


@dataclass(frozen=True)
class Protocol:
    """One protocol's choices (see the module table).

    * ``rows``: score the first ``rows`` records of each set (TOFU ``ds_size: 300``,
      ``config/eval_everything.yaml``; ``evaluate_util.py:130-133`` ``data.select(range(min(ds_size,
      len)))``); ``None`` = all.
    * ``random_limit``: ``--limit N`` draws a seeded random subset (else: the first N).
    * ``tokenization``: ``"split"`` (prompt and answer encoded apart, ids concatenated, labels on
      the answer + EOS), ``"tofu"`` (``data_module.py:8-32``) or ``"open-unlearning"``
      (``src/data/utils.py:92-124``); see :func:`simu_jax.data.tokenize.tokenize_qa_joint`.
    * ``qa_max_length``: token cap of a scored sequence (TOFU: ``max_length=cfg.generation.max_length``
      = 200, ``evaluate_util.py:105``; open-unlearning ``max_length: 512``,
      ``configs/data/datasets/TOFU_QA_forget.yaml:10``).
    * ``generation_prompt``: ``"question"`` = ``question_start + question + question_end`` (TOFU
      ``run_generation``, ``evaluate_util.py:307-312``: the decoded input split at ``'Answer: '``;
      the tag is re-appended only for llama2, whose answer tag is empty), ``"prompt"`` = with the
      answer tag (open-unlearning ``predict_with_generate``, ``src/data/utils.py:119-120``).
    * ``generation_total``: total length budget (prompt + new tokens) of HF ``generate(max_length=)``
      (TOFU ``generation.max_length: 200``, ``max_new_tokens: null``; ``evaluate_util.py:330``),
      counted, as there, from the left-padded batch of ``generation_batch`` consecutive rows
      (TOFU ``batch_size: 30``, ``evaluate_util.py:136-138``). ``None`` = a new-token budget.
    * ``max_new_tokens``: default new-token budget (open-unlearning
      ``configs/generation/default.yaml:4``: 200); ``None`` = only the total budget.
    * ``mia_k``: Min-K% / Min-K%++ fraction (open-unlearning ``configs/eval/tofu_metrics/mia_min_k.yaml:7``,
      ``mia_min_k_plus_plus.yaml:6``: 0.4). TOFU itself has no MIA; under ``tofu`` the MIA family
      follows open-unlearning's TOFU configs.
    * ``dtype``: the parameter dtype the model is scored and generates in (TOFU:
      ``torch_dtype=torch.bfloat16``, ``evaluate_util.py:237``); ``None`` = the model's own
      (open-unlearning: per model config, ``src/model/__init__.py:20-39``: bfloat16 for its Llama
      configs, float32 for ``phi-1_5.yaml``).
    * ``zlib_text``: ``"labels"`` = the decoded label tokens (open-unlearning ``zlib.py:22``,
      ``extract_target_texts_from_processed_data``, ``utils.py:333-340``), ``"answer"`` = the
      answer string.
    * ``clean_up_spaces``: generations are decoded as ``tokenizer.decode(ids,
      skip_special_tokens=True, clean_up_tokenization_spaces=True)`` did in transformers 4.x,
      whatever the tokenizer (SemEval ``evaluate_generations.py:114-117``, read through
      ``ArjunDosajh/Mr.Snuffleupagus-SemEval-2025-Task-4`` @ 116bf41): HF's
      ``clean_up_tokenization`` (``" ," -> ","``, ``" ." -> "."``, ``" n't" -> "n't"``, ...)
      on the decoded text. transformers 5 skips that step for BPE tokenizers
      (``tokenization_utils_tokenizers.py:1174-1197`` in 5.24), so it is applied here
      explicitly. ``False``: the tokenizer's own decode (no argument passed), as before.
    * ``benchmarks``: the benchmarks the protocol applies to (:func:`check_protocol`).
    """

    name: str
    rows: int | None
    random_limit: bool
    tokenization: Literal["split", "tofu", "open-unlearning"]
    qa_max_length: int | None
    generation_prompt: Literal["question", "prompt"]
    generation_total: int | None
    generation_batch: int | None
    max_new_tokens: int | None
    mia_k: float
    zlib_text: Literal["labels", "answer"]
    dtype: str | None = None
    clean_up_spaces: bool = False
    benchmarks: tuple[str, ...] = ("synthetic", "tofu", "lume")

    def with_(self, **kw) -> "Protocol":
        return replace(self, **kw)


PROTOCOLS: dict[str, Protocol] = {
    "tofu": Protocol("tofu", rows=300, random_limit=False, tokenization="tofu", qa_max_length=200,
                     generation_prompt="question", generation_total=200, generation_batch=30, max_new_tokens=None,
                     mia_k=0.4, zlib_text="labels", dtype="bfloat16", benchmarks=("synthetic", "tofu")),
    "open-unlearning": Protocol("open-unlearning", rows=None, random_limit=False, tokenization="open-unlearning",
                                qa_max_length=512, generation_prompt="prompt", generation_total=None,
                                generation_batch=None, max_new_tokens=200, mia_k=0.4, zlib_text="labels",
                                benchmarks=("synthetic", "tofu")),
    "simu": Protocol("simu", rows=None, random_limit=True, tokenization="split", qa_max_length=None,
                     generation_prompt="prompt", generation_total=None, generation_batch=None, max_new_tokens=200,
                     mia_k=0.2, zlib_text="answer"),
}
# SemEval-2025 Task 4 (LUME): AutoModelForCausalLM.from_pretrained(..., torch_dtype=torch.bfloat16)
# (evaluate_generations.py:313) and the decode of evaluate_generations.py:114-117; the rest is simu's.
PROTOCOLS["semeval"] = PROTOCOLS["simu"].with_(name="semeval", dtype="bfloat16", clean_up_spaces=True,
                                               benchmarks=("lume",))
PROTOCOL_NAMES: tuple[str, ...] = tuple(PROTOCOLS)


# The protocol a benchmark is evaluated with unless one is named: TOFU's own for TOFU and the
# synthetic benchmark (whose targets `simu-jax finetune` trains TOFU-style by default,
# `data.tokenization: tofu`), SemEval's script for LUME (`semeval`).
DEFAULT_PROTOCOL: dict[str, str] = {"tofu": "tofu", "synthetic": "tofu", "lume": "semeval"}
# A QA model trained with another tokenization (data.tokenization) is scored the way it was
# trained: the protocol whose scored tokens match its labels.
PROTOCOL_OF_TOKENIZATION: dict[str, str] = {"tofu": "tofu", "open-unlearning": "open-unlearning", "split": "simu"}


def default_protocol(benchmark: str, tokenization: str | None = None) -> str:
    """The protocol name :data:`DEFAULT_PROTOCOL` gives ``benchmark`` (``simu`` when unlisted);
    for a QA benchmark whose model was trained with ``tokenization`` (``data.tokenization``),
    the protocol scoring the same tokens (:data:`PROTOCOL_OF_TOKENIZATION`)."""
    if tokenization is not None and benchmark != "lume":
        return PROTOCOL_OF_TOKENIZATION[tokenization]
    return DEFAULT_PROTOCOL.get(benchmark, "simu")


def get_protocol(protocol: "str | Protocol | None", default: str = "simu") -> Protocol:
    """A :class:`Protocol` from its name (``None`` = ``default``); unknown names raise ``ValueError``."""
    if isinstance(protocol, Protocol):
        return protocol
    name = default if protocol is None else str(protocol)
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {name!r}; expected one of {', '.join(PROTOCOL_NAMES)}")
    return PROTOCOLS[name]


def check_protocol(protocol: "str | Protocol", benchmark: str) -> Protocol:
    """The :class:`Protocol` named ``protocol``, refused (``ValueError``, one line) when it does not
    apply to ``benchmark`` (its ``benchmarks``)."""
    proto = get_protocol(protocol)
    if benchmark not in proto.benchmarks:
        fits = [n for n, p in PROTOCOLS.items() if benchmark in p.benchmarks]
        raise ValueError(f"protocol {proto.name!r} does not apply to the {benchmark} benchmark; "
                         f"use one of {', '.join(fits)}")
    return proto
