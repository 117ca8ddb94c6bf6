"""Orbax checkpoints of a training state, for exact resume (finetune and unlearn loops).

A training state is a dict::

    {"params": <trainable params pytree>, "opt_state": <optax state>, "step": int,
     "rng": <uint32 key data, e.g. jax.random.key_data(key)>, "data": {"epoch": 3, "index": 7, ...}}

Arrays (``params``, ``opt_state``, ``rng`` and any other array-valued entries) go through
orbax's ``StandardSave`` (sharded, async where available); the plain-Python part (``step``,
``data`` and any other JSON-able entries) goes into a JSON item of the same checkpoint, so
a step's arrays and its data position are committed together, atomically (orbax writes
to a temporary directory and renames it when complete; an interrupted save is ignored
and cleaned up on the next start).

Restoring needs the structure of the array part: pass ``target`` (a pytree of arrays or
``jax.ShapeDtypeStruct``, e.g. the freshly initialized state, or the output of
:func:`abstract_like`). Leaves that carry a ``sharding`` restore onto that sharding, which
may differ from the one the checkpoint was saved with (another mesh); ``shardings`` (a
pytree of ``jax.sharding.Sharding`` matching ``target``) overrides them.

The directory may be a ``gs://`` URL (:func:`simu_jax.base.as_path`): orbax takes it as an
``etils.epath.Path`` and TensorStore writes the arrays with its GCS driver, every process its
own shards into the one bucket, so a pod resumes from any worker. On GCS orbax cannot rename a
finished step directory into place; it marks a step complete with a commit file instead
(orbax ``_src/path/atomicity_defaults.py``), and an unmarked step is ignored as before.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np

from simu_jax.base import as_path, is_remote

__all__ = ["Checkpointer", "abstract_like", "split_state"]

_ARRAYS, _META = "arrays", "meta"


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
        hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, (int, float, bool)))


def split_state(state: Mapping[str, Any]) -> tuple[dict, dict]:
    """Top-level entries of a state dict -> (array pytrees, JSON-able values).

    An entry goes to the array part if it has at least one array leaf.
    """
    arrays, meta = {}, {}
    for k, v in state.items():
        leaves = jax.tree.leaves(v)
        if leaves and any(_is_array(x) for x in leaves):
            arrays[k] = v
        else:
            meta[k] = _to_json(v)
    return arrays, meta


def _to_json(v):
    if isinstance(v, Mapping):
        return {str(k): _to_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    return v


def abstract_like(tree, shardings=None):
    """``jax.ShapeDtypeStruct`` leaves with the shape/dtype (and sharding) of ``tree``'s leaves.

    ``shardings``: an optional pytree of shardings (same structure) to use instead of the
    leaves' own.
    """

    def one(x, s=None):
        sharding = s if s is not None else getattr(x, "sharding", None)
        if isinstance(x, np.ndarray) and s is None:
            sharding = None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(one, tree)
    return jax.tree.map(one, tree, shardings)


class Checkpointer:
    """An orbax ``CheckpointManager`` for training states (see module docstring).

    Args:
      directory: where step directories are written (created if needed).
      save_every: :meth:`maybe_save` saves when ``step % save_every == 0``.
      keep: how many recent checkpoints to keep (older ones are deleted).
      async_save: write in a background thread where orbax supports it; call
        :meth:`wait_until_finished` (done by :meth:`close`) before relying on the files.
      primary: only meaningful for logs; orbax coordinates multi-process writes itself.
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 100, keep: int = 2,
                 async_save: bool = True):
        import orbax.checkpoint as ocp

        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        directory = as_path(directory, "checkpoint directory", checkpoints=True)
        self.directory = directory if is_remote(directory) else directory.absolute()  # orbax wants absolute paths
        self.save_every = int(save_every)
        self.keep = int(keep)
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            create=True,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(_ARRAYS, _META))

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Mapping[str, Any], *, force: bool = True) -> bool:
        """Save ``state`` as checkpoint ``step`` (returns whether a save was started).

        Saving a step that already exists is a no-op (returns False).
        """
        step = int(step)
        if step in self.all_steps():
            return False
        arrays, meta = split_state(state)
        meta.setdefault("step", step)
        args = self._ocp.args.Composite(**{
            _ARRAYS: self._ocp.args.StandardSave(arrays),
            _META: self._ocp.args.JsonSave(meta),
        })
        return bool(self._manager.save(step, args=args, force=force))

    def maybe_save(self, step: int, state: Mapping[str, Any]) -> bool:
        """Save if ``step`` is a multiple of ``save_every``."""
        if step % self.save_every:
            return False
        return self.save(step, state)

    # ------------------------------------------------------------------ query
    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, target: Mapping[str, Any] | None = None, shardings=None) -> dict:
        """The state saved at ``step`` (default: the latest).

        ``target``: a state-shaped dict whose array entries give the pytree structure,
        shapes, dtypes and (optionally) shardings to restore onto (arrays or
        ``ShapeDtypeStruct``; non-array entries are ignored). ``shardings``: a pytree of
        shardings for the array part (same structure), overriding the target's. Without a
        target the arrays come back as orbax stores them (nested dicts/lists, no custom
        pytree nodes such as optax states).
        """
        self.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} "
                                    f"(available: {self.all_steps() or 'none'})")
        ocp = self._ocp
        if target is not None:
            arrays_target, _ = split_state(target)
            abstract = abstract_like(arrays_target, shardings)
            arrays_args = ocp.args.StandardRestore(abstract)
        else:
            arrays_args = ocp.args.StandardRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**{
            _ARRAYS: arrays_args, _META: ocp.args.JsonRestore()}))
        out = dict(restored[_META] or {})
        out.update(restored[_ARRAYS])
        out["step"] = int(out.get("step", step))
        return out

    # ------------------------------------------------------------------ lifecycle
    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
