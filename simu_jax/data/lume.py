"""LUME / SemEval-2025 Task 4 loaders.

Rows are dicts with ``id``, ``input``, ``output``, ``task`` (``Task1``/``Task2``/``Task3``),
``kind`` (``"sc"`` sentence completion or ``"qa"`` question answering, from the id
suffix ``sc<k>``/``qa<k>``) and ``doc_id`` (the id without that suffix and without
the literal quotes some ids carry).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .tofu import default_data_dir

__all__ = [
    "LUME_SPLITS",
    "MIA_SETS",
    "SEMEVAL_SPLITS",
    "load_lume",
    "load_mia_documents",
    "load_semeval",
    "parse_lume_id",
]

LUME_SPLITS = ("forget", "retain")
SEMEVAL_SPLITS = ("forget_train", "forget_validation", "retain_train", "retain_validation")
MIA_SETS = ("member", "nonmember")

_ID_SUFFIX = re.compile(r"^(?P<doc>.*?)(?P<kind>sc|qa)(?P<k>\d+)$")


def parse_lume_id(row_id: str) -> tuple[str, str, int]:
    """Split a LUME id into ``(doc_id, kind, k)``, e.g. ``'"ab-12"qa3' -> ('ab-12', 'qa', 3)``."""
    m = _ID_SUFFIX.match(row_id)
    if m is None:
        raise ValueError(f"LUME id {row_id!r} does not end with sc<k> or qa<k>")
    return m["doc"].strip('"'), m["kind"], int(m["k"])


def _row(raw: dict[str, Any]) -> dict[str, Any]:
    doc_id, kind, _ = parse_lume_id(str(raw["id"]))
    return {
        "id": str(raw["id"]),
        "input": str(raw["input"]),
        "output": str(raw["output"]),
        "task": str(raw["task"]),
        "kind": kind,
        "doc_id": doc_id,
    }


def _find_dir(source: str | os.PathLike | None, name: str, marker: str) -> Path:
    """Resolve ``source`` (a data directory, its parent, or None = default) to a directory
    containing ``marker``."""
    base = Path(source).expanduser() if source is not None else default_data_dir() / name
    if not base.is_dir():
        raise FileNotFoundError(f"{name} directory not found: {base}")
    if not any(base.glob(marker)) and (base / name).is_dir():
        base = base / name  # accept the shared data root as well
    return base


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_lume(split: str = "forget", source: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Load the LUME ``forget`` or ``retain`` set (``<source>/<split>.jsonl``)."""
    if split not in LUME_SPLITS:
        raise ValueError(f"unknown LUME split {split!r}; valid splits: {', '.join(LUME_SPLITS)}")
    directory = _find_dir(source, "lume", "*.jsonl")
    return [_row(r) for r in _read_jsonl(directory / f"{split}.jsonl")]


def load_semeval(split: str, source: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Load a public SemEval-2025 Task 4 split from its parquet shard(s)."""
    if split not in SEMEVAL_SPLITS:
        raise ValueError(
            f"unknown SemEval split {split!r}; valid splits: {', '.join(SEMEVAL_SPLITS)}"
        )
    import pyarrow.parquet as pq

    directory = _find_dir(source, "semeval25_task4", "*.parquet")
    shards = sorted(directory.glob(f"{split}-*.parquet")) or sorted(directory.glob(f"{split}.parquet"))
    if not shards:
        raise FileNotFoundError(f"no parquet file for split {split!r} in {directory}")
    rows: list[dict[str, Any]] = []
    for shard in shards:
        rows.extend(pq.read_table(shard).to_pylist())
    return [_row(r) for r in rows]


def load_mia_documents(which: str = "member", source: str | os.PathLike | None = None) -> list[dict[str, str]]:
    """Load the SemEval MIA documents (``member`` = in the forget set, ``nonmember`` = not).

    ``source`` may be the ``mia_data`` folder, the SemEval folder containing it, or the
    shared data root. Returns dicts with ``id`` and ``document``.
    """
    if which not in MIA_SETS:
        raise ValueError(f"unknown MIA set {which!r}; valid sets: {', '.join(MIA_SETS)}")
    base = Path(source).expanduser() if source is not None else default_data_dir() / "semeval25_task4"
    candidates = [base, base / "mia_data", base / "semeval25_task4" / "mia_data"]
    path = next((c / f"{which}.jsonl" for c in candidates if (c / f"{which}.jsonl").is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{which}.jsonl not found under {base}")
    return [{"id": str(r["id"]), "document": str(r["document"])} for r in _read_jsonl(path)]
