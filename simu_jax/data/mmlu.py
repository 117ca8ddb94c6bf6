"""MMLU (Hendrycks et al.) in its CSV layout, and the few-shot prompts SemEval-2025 Task 4 scored it with.

The SemEval scorer (``evaluate_generations.py:265-268``, read through
``ArjunDosajh/Mr.Snuffleupagus-SemEval-2025-Task-4`` @ 116bf41) does not compute MMLU: it reads
``average_acc`` from the ``metrics.json`` that ``--mmlu_metrics_file_path`` names, the file
written by open-instruct's ``eval/mmlu/run_eval.py`` (the participants' pipelines run that
script, ``--ntrain`` left at 5, on Hendrycks' data fetched by its ``prepare_eval_data.sh``).
The choices below follow that script, ``allenai/open-instruct`` @ d05effeb4:

* layout (``run_eval.py:176-182, 199-204``): subjects = the sorted names of
  ``test/<subject>_test.csv``; ``pd.read_csv(..., header=None)`` of ``test/<subject>_test.csv``
  and ``dev/<subject>_dev.csv``, rows ``question,A,B,C,D,answer``; the first ``ntrain`` dev rows
  are the shots. Cells are read by pandas as there (so a cell pandas parses as a number or as
  missing is written as the script writes it, e.g. ``nan``).
* prompt (``run_eval.py:24-51, 58-62``): ``"The following are multiple choice questions (with
  answers) about {subject}.\\n\\n"`` with ``subject`` = each ``_``-separated word preceded by a
  space (so two spaces after "about"), then per shot ``question\\nA. a\\nB. b\\nC. c\\nD. d\\nAnswer:
  X\\n\\n``, then the test row up to ``\\nAnswer:``.
* length (``run_eval.py:72-88``): while the prompt is over 2048 tokens (``add_special_tokens=False``)
  one shot fewer; here also at most the model's context (BOS included), and never below 0 shots
  (the script would go on to ``k = -1``, all shots).

A dev file with fewer than ``ntrain`` rows gives all its rows (the script would fail). A row
that is not ``question,A,B,C,D,answer`` with the answer one of A-D is refused (``ValueError``,
one line naming the file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["MMLU_CHOICES", "load_mmlu", "mmlu_prompts"]

MMLU_CHOICES = ("A", "B", "C", "D")
_PROMPT_TOKENS = 2048  # open-instruct run_eval.py:74


def _read_csv(path: Path) -> list[tuple[str, ...]]:
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"MMLU file not found: {path}")
    try:
        df = pd.read_csv(path, header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not an MMLU CSV ({' '.join(str(e).split())})") from None
    if df.shape[1] != 6:
        raise ValueError(f"{path}: {df.shape[1]} columns, expected 6 (question,A,B,C,D,answer)")
    rows = []
    for i, vals in enumerate(df.itertuples(index=False, name=None)):
        cells = tuple("{}".format(v) for v in vals)  # as run_eval.py:35-38 formats them
        if not isinstance(vals[0], str) or cells[5] not in MMLU_CHOICES:
            raise ValueError(f"{path}: row {i + 1} is not question,A,B,C,D,answer with the answer one of "
                             f"A, B, C, D: {','.join(cells)[:100]!r}")
        rows.append(cells)
    return rows


def load_mmlu(directory: str | os.PathLike, ntrain: int = 5, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """``{subject: {"dev": [rows], "test": [rows]}}`` from Hendrycks' layout (``directory/test``,
    ``directory/dev``), subjects sorted; a row is ``(question, A, B, C, D, answer)``. ``dev``: the
    first ``ntrain`` rows; ``limit``: the first ``limit`` test rows of each subject (the script's
    ``--n_instances`` draws a random sample instead)."""
    base = Path(directory).expanduser()
    test_dir = base / "test"
    if not test_dir.is_dir():
        raise FileNotFoundError(f"MMLU directory {base} has no test/ folder (Hendrycks' layout: "
                                "test/<subject>_test.csv and dev/<subject>_dev.csv)")
    subjects = sorted(f.name[: -len("_test.csv")] for f in test_dir.iterdir() if f.name.endswith("_test.csv"))
    if not subjects:
        raise FileNotFoundError(f"no <subject>_test.csv file in {test_dir}")
    out = {}
    for s in subjects:
        test = _read_csv(test_dir / f"{s}_test.csv")
        out[s] = {"dev": _read_csv(base / "dev" / f"{s}_dev.csv")[:ntrain],
                  "test": test if limit is None else test[:limit]}
    return out


def _example(row: tuple[str, ...], with_answer: bool = True) -> str:
    """run_eval.py:32-40 ``format_example``."""
    text = row[0] + "".join(f"\n{c}. {o}" for c, o in zip(MMLU_CHOICES, row[1:5])) + "\nAnswer:"
    return text + f" {row[5]}\n\n" if with_answer else text


def mmlu_prompts(data: dict[str, dict[str, Any]], tokenizer, max_tokens: int = _PROMPT_TOKENS) -> list[dict[str, str]]:
    """One ``{"subject", "prompt", "answer"}`` per test row of :func:`load_mmlu`'s ``data``, in order:
    the few-shot prompt (``gen_prompt`` + ``format_example(include_answer=False)``,
    ``run_eval.py:43-62``), with shots dropped from the end while it is over
    ``min(max_tokens, 2048)`` tokens."""
    limit = min(int(max_tokens), _PROMPT_TOKENS)
    out = []
    for subject, d in data.items():
        head = "The following are multiple choice questions (with answers) about {}.\n\n".format(
            "".join(" " + w for w in subject.split("_")))
        for row in d["test"]:
            k = len(d["dev"])
            while True:
                prompt = head + "".join(_example(r) for r in d["dev"][:k]) + _example(row, with_answer=False)
                if k == 0 or len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) <= limit:
                    break
                k -= 1
            out.append({"subject": subject, "prompt": prompt, "answer": row[5]})
    return out
