"""TOFU (Task of Fictitious Unlearning) loaders.

Records are plain dicts with at least ``question`` and ``answer``. Depending on the
split they also carry ``paraphrased_answer`` (str), ``paraphrased_question`` (str),
``perturbed_answer`` (list[str]) and, for the plain ``real_authors``/``world_facts``
files, ``option1`` .. ``option4``.

``source`` is either a Hugging Face dataset name (default ``"locuslab/TOFU"``, loaded
with :func:`datasets.load_dataset`) or a local directory holding the JSON files as
shipped in ``shared/data/tofu`` (see its SOURCE.md for the format quirks handled here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "TOFU_HUB_NAME",
    "TOFU_SPLITS",
    "default_data_dir",
    "load_idontknow",
    "load_tofu",
    "read_json_records",
]

TOFU_HUB_NAME = "locuslab/TOFU"

TOFU_SPLITS: tuple[str, ...] = (
    "full",
    "forget01",
    "forget05",
    "forget10",
    "retain90",
    "retain95",
    "retain99",
    "holdout01",
    "holdout05",
    "holdout10",
    "real_authors",
    "world_facts",
    "forget01_perturbed",
    "forget05_perturbed",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
)

# Alternative key names found in some TOFU copies -> canonical names.
_KEY_ALIASES = {"prompt": "question", "response": "answer"}

_DATA_DIR_ENV = "SIMU_JAX_DATA_DIR"


def default_data_dir() -> Path:
    """Directory holding the shared data sets (``tofu/``, ``lume/``, ``semeval25_task4/``).

    Looks, in order, at ``$SIMU_JAX_DATA_DIR``, ``<repo>/../shared/data`` (the checkout's
    sibling ``shared/`` folder) and ``<repo>/shared/data``. Returns the first candidate
    that exists, else the sibling location (so error messages show where data is expected).
    """
    repo = Path(__file__).resolve().parents[2]
    candidates = []
    if os.environ.get(_DATA_DIR_ENV):
        candidates.append(Path(os.environ[_DATA_DIR_ENV]).expanduser())
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand
    return candidates[0]


def _is_local(source: str | os.PathLike) -> bool:
    """True if ``source`` names a local path rather than a hub dataset ``owner/name``."""
    if isinstance(source, os.PathLike):
        return True
    s = str(source)
    return (
        Path(s).expanduser().exists()
        or s.startswith(("/", ".", "~"))
        or s.count("/") != 1
        or os.sep != "/" and os.sep in s
    )


def read_json_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON file holding records in any of the layouts seen in the wild.

    Handles a single JSON array, JSON Lines (one object per line) and several JSON
    arrays one per line (``datasets.Dataset.to_json(lines=False)`` output).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        return list(data) if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        pass
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not JSON / JSON Lines ({e})") from None
        records.extend(item if isinstance(item, list) else [item])
    return records


def _normalize(record: dict[str, Any]) -> dict[str, Any]:
    """Rename prompt/response to question/answer and fix field types."""
    out = {_KEY_ALIASES.get(k, k): v for k, v in record.items()}
    if "question" not in out or "answer" not in out:
        raise ValueError(f"TOFU record without question/answer: keys={sorted(record)}")
    if "perturbed_answer" in out:
        p = out["perturbed_answer"]
        out["perturbed_answer"] = [str(x) for x in p] if isinstance(p, (list, tuple)) else [str(p)]
    for key in ("paraphrased_answer", "paraphrased_question"):
        v = out.get(key)
        if isinstance(v, (list, tuple)):  # some copies store a one-element list
            out[key] = str(v[0]) if v else ""
    return out


def _check_split(split: str) -> None:
    if split not in TOFU_SPLITS:
        raise ValueError(f"unknown TOFU split {split!r}; valid splits: {', '.join(TOFU_SPLITS)}")


def load_tofu(split: str, source: str | os.PathLike = TOFU_HUB_NAME) -> list[dict[str, Any]]:
    """Load one TOFU split as a list of normalized records.

    Args:
      split: one of :data:`TOFU_SPLITS` (e.g. ``"forget10"``, ``"forget10_perturbed"``).
      source: hub dataset name, or a local directory containing ``<split>.json``.
    """
    _check_split(split)
    if _is_local(source):
        directory = Path(source).expanduser()
        if not directory.is_dir():
            raise FileNotFoundError(f"TOFU directory not found: {directory}")
        rows = read_json_records(directory / f"{split}.json")
    else:  # pragma: no cover - needs network access to the hub
        import datasets

        rows = list(datasets.load_dataset(str(source), split, split="train"))
    return [_normalize(r) for r in rows]


def load_idontknow(source: str | os.PathLike | None = None) -> list[str]:
    """TOFU's refusal strings ("I don't know" answers), one per non-empty line.

    ``source`` is the TOFU directory (containing ``idontknow.jsonl``) or the file
    itself; default: ``default_data_dir() / "tofu"``. Despite its name the file is
    plain text; lines that happen to be JSON strings are decoded.
    """
    path = Path(source).expanduser() if source is not None else default_data_dir() / "tofu"
    if path.is_dir():
        path = path / "idontknow.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"idontknow file not found: {path}")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith('"') and line.endswith('"'):
            try:
                line = json.loads(line)
            except json.JSONDecodeError:
                pass
        out.append(line)
    return out
