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
    "ArgumentParser", "ConfigError", "NonFiniteLossError", "UsageError", "local_path", "pad_token_id",
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


def local_path(path: "str | os.PathLike", what: str = "output directory") -> Path:
    """``Path(path)``, refusing a URL (``gs://bucket/run``, ``s3://...``): run directories,
    checkpoints and models are local paths here, and ``Path`` would silently turn
    ``gs://bucket/run`` into a local ``gs:/bucket/run`` (on a TPU pod each worker would then
    write its own disk). Use a directory every process sees (a shared mount)."""
    text = os.fspath(path)
    if isinstance(text, str) and _URL_SCHEME.match(text):
        scheme = text.split("://", 1)[0]
        raise UsageError(f"{what} {text}: {scheme}:// paths are not supported yet; use a local or shared-mount "
                         "directory that every process sees (NFS, Filestore, gcsfuse)")
    return Path(text)


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
