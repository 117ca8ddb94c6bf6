"""The one run loop of every training command (``finetune``, ``unlearn``, experiment drivers).

A run is three phases, the same for every pipeline:

* **start** (:class:`RunDirectory`): a finished run is returned as is under ``--resume``; a
  resumed run's saved ``config.yaml`` must equal the new config outside the keys that do not
  change the trajectory; the directory is prepared by process 0 only (the others wait for its
  verdict and fail with it); ``config.yaml`` and ``run.json`` (status ``running``) are written.
* **steps** (:func:`run_steps`): one step per iteration, the NaN/Inf guard naming the first
  non-finite term (primary terms first), the pipeline's hook (logging, eval curves, keep-best,
  early stop), checkpoints every ``checkpoint_every`` steps, SIGINT/SIGTERM (and
  ``debug.stop_after_step``) end with a checkpoint and status ``interrupted``; with several
  processes all of them agree to stop after the same step (else the others would wait forever
  in the next step's collectives).
* **finish** (:meth:`RunDirectory.complete`): results written atomically by the pipeline, then
  ``run.json`` with the final status, then ``COMPLETE`` last; then every process waits for the
  others (:meth:`RunDirectory.end`, also after an interruption), so none exits while another
  still works.

The run-directory contract is :mod:`simu_jax.runio`'s.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from simu_jax.base import ConfigError, NonFiniteLossError, as_path
from simu_jax.config import dump_yaml, to_dict
from simu_jax.runio import (GracefulSignals, NanGuard, is_complete, mark_complete, prepare_output_dir, progress,
                            run_metadata, write_json_atomic, write_text_atomic)

__all__ = ["DebugSpec", "RunDirectory", "StepHook", "prepare_on_process_0", "run_steps"]

POS = (1, None)


@dataclass(frozen=True)
class DebugSpec:
    """Test knobs of every run loop (``debug:`` in a run config).

    ``inject_nan_at_step``: the loss of that step (1-based, the step number the NaN guard
    reports) is multiplied by NaN, so the guard must stop the run before anything is saved.
    ``stop_after_step``: behave as if SIGTERM arrived after that step (checkpoint + clean exit,
    status ``interrupted``). ``sleep_per_step``: seconds to sleep after each step (to test
    signals and kills)."""

    inject_nan_at_step: int | None = field(default=None, metadata={"range": POS})
    stop_after_step: int | None = field(default=None, metadata={"range": POS})
    sleep_per_step: float = field(default=0.0, metadata={"range": (0.0, None)})


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    items = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "config":  # model.config is one value (a dict of fields)
            items.update(_flat(v, key + "."))
        else:
            items[key] = v
    return items


def check_resume_config(cfg, out: Path, free_keys: tuple[str, ...]) -> None:
    """Refuse to resume ``out`` with a config that changes the trajectory (one line naming the key).

    Keys whose first component is in ``free_keys`` may differ; keys added to the schema since
    the run started compare against their defaults."""
    import yaml

    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return
    saved = _flat(yaml.safe_load(saved_path.read_text()) or {})
    now = _flat(to_dict(cfg))
    defaults = _flat(to_dict(type(cfg)()))
    for key in sorted(set(saved) | set(now)):
        if key.split(".")[0] in free_keys:
            continue
        if saved.get(key, defaults.get(key)) != now.get(key):
            raise ConfigError(f"differs from the run being resumed in {out} ({saved.get(key)!r} there, "
                              f"{now.get(key)!r} here); resume with the same config or start a new run", key)


def prepare_on_process_0(out: Path, overwrite: bool, resume: bool) -> Path:
    """``runio.prepare_output_dir`` by process 0 only (with several processes the others would
    find the directory it just created and refuse it, or delete it under ``--overwrite``); the
    others wait for its verdict and raise too if it failed."""
    import jax

    if jax.process_count() == 1:
        return prepare_output_dir(out, overwrite=overwrite, resume=resume)
    import numpy as np
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            prepare_output_dir(out, overwrite=overwrite, resume=resume)
        except Exception as e:  # reported to every process below, raised here after
            error = e
    ok = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(error is None))))
    if error is not None:
        raise error
    if not ok:
        raise FileExistsError(f"process 0 could not prepare the output directory {out} (see its error)")
    return out


class RunDirectory:
    """One run's output directory and its ``run.json`` status (written by process 0 only).

    ``RunDirectory.finished(out, resume, result_file)`` returns a complete run's stored result
    (``--resume`` of a finished run) or ``None``; the constructor checks the config against a
    resumed run's and prepares the directory."""

    def __init__(self, out_dir, *, overwrite: bool, resume: bool, config=None, resume_free_keys: tuple[str, ...] = ()):
        import jax

        self.path = as_path(out_dir, checkpoints=True)  # local or gs:// (orbax writes checkpoints/ there)
        if resume and config is not None and self.path.is_dir():
            check_resume_config(config, self.path, resume_free_keys)
        self.path = prepare_on_process_0(self.path, overwrite, resume)
        self.primary = jax.process_index() == 0
        self.multi = jax.process_count() > 1
        self.meta: dict[str, Any] = {}

    @staticmethod
    def finished(out_dir, resume: bool, result_file: str) -> dict | None:
        out = as_path(out_dir, checkpoints=True)
        if resume and is_complete(out):
            return json.loads((out / result_file).read_text())
        return None

    def start(self, config, **extra) -> None:
        """``config.yaml`` and ``run.json`` (status running) at the start of the run."""
        if self.primary:
            write_text_atomic(self.path / "config.yaml", dump_yaml(config))
            self.meta = run_metadata(config, {**extra, "status": "running"})
            write_json_atomic(self.path / "run.json", self.meta)

    def update(self, **fields) -> None:
        if self.primary:
            self.meta.update(fields)
            write_json_atomic(self.path / "run.json", self.meta)

    def complete(self, step: int, **fields) -> None:
        """Final status, then ``COMPLETE`` last (results must already be written)."""
        if self.primary:
            self.update(status="complete", **fields)
            mark_complete(self.path, {"step": step})
        self.end("complete")

    def end(self, status: str) -> None:
        """Every process waits here for the others (a no-op with one process), the last
        collective of a run: no process exits while another still works (process 0 writing the
        results), so none waits at JAX's shutdown barrier past its timeout, after which every
        process aborts with exit 134 (``sharding.SHUTDOWN_TIMEOUT_ENV``, 300 s by default)."""
        from simu_jax.sharding import sync_processes

        sync_processes(f"simu_jax.run.{status}")


# A pipeline's per-step hook: (step just finished, its guarded loss terms, progress bar) -> True to
# stop here (a target was reached: the run completes at this step).
StepHook = Callable[[int, dict, Any], bool]


def run_steps(run: RunDirectory, ckpt, *, total: int, start: int, step_fn: Callable[[int], Mapping[str, Any]],
              state_fn: Callable[[int], dict], debug: DebugSpec, desc: str, quiet: bool,
              after_step: StepHook | None = None,
              postfix: Callable[[dict], Mapping[str, Any]] | None = None) -> tuple[str, int]:
    """Run steps ``start + 1 .. total``; returns ``(status, last step)``, status ``complete``
    or ``interrupted``.

    ``step_fn(step)`` runs the step after ``step`` (0-based count of steps done) and returns its
    loss terms (primary terms first; values may be device scalars): they are checked for NaN/Inf
    (:class:`simu_jax.base.NonFiniteLossError`, ``run.json`` status ``failed`` with the last good
    checkpoint). ``after_step`` may log, evaluate and end the run early. ``state_fn(step)`` is the
    checkpoint state. ``postfix(terms)``: what the progress bar shows after each step.
    """
    import jax

    from simu_jax.sharding import any_process

    def last_good() -> str:
        last = ckpt.latest_step()
        return (f"last good checkpoint: step {last} in {ckpt.directory}" if last is not None
                else "no checkpoint was written yet")

    guard = NanGuard(hint=last_good)
    multi = jax.process_count() > 1
    step, status, finished = start, "complete", False
    try:
        with GracefulSignals() as sig, progress(total, desc, quiet, initial=step) as bar:
            while step < total:
                terms = guard.check(step + 1, step_fn(step))
                step += 1
                bar.update(1, **(postfix(terms) if postfix is not None else {}))
                reached = after_step(step, terms, bar) if after_step is not None else False
                if debug.sleep_per_step:
                    time.sleep(debug.sleep_per_step)
                if reached:
                    break
                if step < total:
                    ckpt.maybe_save(step, state_fn(step))
                if debug.stop_after_step is not None and step == debug.stop_after_step and step < total:
                    sig.request_stop("debug.stop_after_step")
                # a signal may reach the processes at different steps: stop together
                stop = any_process(sig.stop) if multi else sig.stop
                if stop and step < total:
                    ckpt.save(step, state_fn(step))
                    ckpt.wait_until_finished()
                    status = "interrupted"
                    bar.write(f"{sig.signal_name or 'another process was signalled'}: checkpoint at step {step} "
                              f"written; rerun with --resume")
                    break
        finished = True
    except NonFiniteLossError as e:
        run.update(status="failed", error=str(e), last_checkpoint=ckpt.latest_step())
        raise
    finally:
        if finished:
            ckpt.close()
        else:
            try:
                ckpt.close()
            except Exception:  # pragma: no cover - never mask the original error
                pass
    if status == "interrupted":
        run.update(status="interrupted", stopped_at_step=step)
        run.end("interrupted")
    return status, step
