"""The bottom layer: constants, error types and the argument parser every command uses.

Nothing here imports another module of the package, so every layer may import it
(see ``docs/architecture.md``).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

__all__ = [
    "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_KEYBOARD", "EXIT_OK", "EXIT_USAGE", "IGNORE_INDEX",
    "ArgumentParser", "ConfigError", "NonFiniteLossError", "UsageError", "as_path", "is_remote", "pad_token_id",
    "url_scheme",
]

# Exit codes of every command (simu_jax.cli turns exceptions into them).
EXIT_OK = 0
EXIT_ERROR = 1  # any other error: missing files, NaN/Inf loss, bad weights, ...
EXIT_USAGE = 2  # bad flags, unknown/mistyped/out-of-range config keys
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; rerun with --resume
EXIT_KEYBOARD = 130  # interrupted without a checkpoint (second Ctrl-C)

# labels[t] == IGNORE_INDEX: token t carries no loss (the Hugging Face / PyTorch convention).
IGNORE_INDEX = -100


_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# The URL schemes etils.epath knows (``gpath._URI_SCHEMES``), each through an fsspec filesystem
# whose package is an optional extra (epath uses tf.io.gfile instead when tensorflow is installed).
REMOTE_PACKAGES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}
# Orbax writes checkpoint arrays with TensorStore, natively only on local disks and gs:// (its
# GCS driver; orbax/checkpoint/_src/serialization/tensorstore_utils.py `_use_gcs_driver`): a run
# directory (which holds checkpoints/) may be local or gs:// only.
CHECKPOINT_SCHEMES = ("gs",)


def url_scheme(path: "str | os.PathLike") -> str | None:
    """``"gs"`` for ``gs://bucket/x`` (also an ``epath.Path`` of it); ``None`` for a local path."""
    text = os.fspath(path)
    return text.split("://", 1)[0] if isinstance(text, str) and _URL_SCHEME.match(text) else None


def is_remote(path: "str | os.PathLike") -> bool:
    return url_scheme(path) is not None


def as_path(path: "str | os.PathLike", what: str = "output directory", *, checkpoints: bool = False):
    """The one place a user's path becomes a path object: a local path is ``pathlib.Path(path)``
    (unchanged); a URL (``gs://bucket/run``, ``s3://``, ``az://``, ``hf://``) is an
    ``etils.epath.Path``, whose file operations go to the object store (``pathlib.Path`` would
    silently make ``gs://bucket/run`` the local ``gs:/bucket/run``, and on a TPU pod every worker
    would write its own disk). A path object passed in is returned as is, so every layer may
    call this again.

    Refused in one line naming the path (:class:`UsageError`, exit 2), before anything is
    written: a scheme epath does not know (``memory://``, ``ftp://``, ...), a scheme whose
    filesystem package is not installed (``gs:// needs gcsfs: pip install gcsfs``), and with
    ``checkpoints`` (a run directory) a scheme orbax cannot write checkpoints to (anything but
    ``gs://``). Writes under a URL: see :func:`simu_jax.runio.write_bytes_atomic` (what stays
    atomic on an object store).
    """
    scheme = url_scheme(path)
    if scheme is None:
        return path if isinstance(path, Path) else Path(os.fspath(path))
    text = os.fspath(path)
    if scheme not in REMOTE_PACKAGES:
        raise UsageError(f"{what} {text}: {scheme}:// is not a supported storage scheme (supported: local paths, "
                         + ", ".join(f"{s}://" for s in REMOTE_PACKAGES) + ")")
    if checkpoints and scheme not in CHECKPOINT_SCHEMES:
        raise UsageError(f"{what} {text}: orbax checkpoints (in every run directory) can be written to local paths "
                         f"and gs:// only, not {scheme}://; use gs:// or a mount every process sees")
    _check_backend(scheme, text, what)
    from etils import epath

    return path if isinstance(path, epath.Path) else epath.Path(text)


def _check_backend(scheme: str, text: str, what: str) -> None:
    """Refuse a URL whose filesystem package is missing (one line naming the package), instead of
    an ImportError deep inside the first write."""
    try:
        import etils.epath  # noqa: F401
    except ImportError:
        raise UsageError(f"{what} {text}: {scheme}:// paths need etils[epath]: pip install 'etils[epath]'") from None
    if scheme == "gs":
        import importlib.util

        if importlib.util.find_spec("tensorflow") is not None:  # epath then uses tf.io.gfile
            return
    try:
        import fsspec

        fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
    except (ImportError, ValueError):
        package = REMOTE_PACKAGES[scheme]
        raise UsageError(f"{what} {text}: {scheme}:// needs {package}: pip install {package}") from None


def pad_token_id(tokenizer) -> int | None:
    """The id used for padding: the tokenizer's pad token, else its EOS (LLaMA has no pad token)."""
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


class UsageError(ValueError):
    """Bad command-line usage (exit code 2)."""


class ConfigError(ValueError):
    """A configuration value is unknown, mistyped or out of range (one-line message).

    ``key`` is the dotted path of the offending key (``None`` for file-level errors).
    """

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        self.detail = message
        super().__init__(f"config key '{key}' {message}" if key else message)

    def prefixed(self, prefix: str) -> "ConfigError":
        if not prefix:
            return self
        return ConfigError(self.detail, f"{prefix}.{self.key}" if self.key else prefix)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf; ``step`` and ``term`` say where."""

    def __init__(self, step: int, term: str, value: float, hint: str = ""):
        self.step, self.term, self.value = step, term, value
        super().__init__(f"non-finite loss at step {step}: term '{term}' = {value}" + (f"; {hint}" if hint else ""))


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UsageError(f"{self.prog}: {message}")
