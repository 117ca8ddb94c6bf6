"""The ``simu-jax`` command line: ``simu-jax [--debug] COMMAND [ARGS...]``.

Commands are looked up lazily in :data:`COMMANDS` (``name -> "module:function"``); each
``cli_main(argv: list[str]) -> int`` parses its own arguments, ideally with
:class:`ArgumentParser` from this module (its usage errors become one-line messages).

Error handling (for every command): without ``--debug`` an expected error prints one line
``simu-jax: error: <message>`` to stderr. Exit codes:

* 0 success; 2 usage or configuration errors (bad flags, unknown/mistyped/out-of-range
  config keys); 1 any other error (missing files, NaN/Inf loss, bad weights, ...);
* 75 (EX_TEMPFAIL) a run stopped by SIGINT/SIGTERM after writing a checkpoint (continue
  it with ``--resume``); 130 a run interrupted without a checkpoint (second Ctrl-C).

``--debug`` (anywhere on the command line) re-raises with the full traceback instead.
Warnings are printed as ``simu-jax: warning: <message>``.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from simu_jax.base import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_KEYBOARD, EXIT_OK, EXIT_USAGE, ArgumentParser,
                           ConfigError, NonFiniteLossError, UsageError)

__all__ = ["COMMANDS", "ArgumentParser", "UsageError", "main"]

COMMANDS: dict[str, str] = {
    "finetune": "simu_jax.finetune:cli_main",
    "unlearn": "simu_jax.unlearn:cli_main",
    "attribute": "simu_jax.unlearn:attribute_main",
    "evaluate": "simu_jax.evaluate.runner:cli_main",
    "report": "simu_jax.evaluate.report:cli_main",
    "demo": "simu_jax.demo:cli_main",
    "bench": "simu_jax.bench:cli_main",
}

__all__ += ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_KEYBOARD", "EXIT_OK", "EXIT_USAGE"]


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _message(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted" + (f" ({_one_line(exc)})" if str(exc) else "")
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    text = _one_line(exc)
    if isinstance(exc, KeyError):
        text = f"missing key {text}"
    return text or type(exc).__name__


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, (UsageError, ConfigError)):
        return EXIT_USAGE
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_KEYBOARD
    return EXIT_ERROR


def _expected(exc: BaseException) -> bool:
    """Errors a user can cause and fix (one line, no traceback)."""
    return isinstance(exc, (UsageError, ValueError, OSError, KeyError, NonFiniteLossError, KeyboardInterrupt,
                            NotImplementedError, MemoryError, ImportError))


def _usage() -> str:
    names = ", ".join(COMMANDS)
    return (f"usage: simu-jax [--debug] COMMAND [ARGS...]\n\ncommands: {names}\n"
            f"run 'simu-jax COMMAND --help' for a command's options")


def _resolve(name: str):
    """The ``cli_main`` of command ``name`` (UsageError if unknown or not available)."""
    if name not in COMMANDS:
        raise UsageError(f"unknown command {name!r}; commands: {', '.join(COMMANDS)}")
    module_name, func_name = COMMANDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # Only "this command's module does not exist" means "not available"; a missing
        # dependency inside it is a real error.
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise UsageError(f"command {name!r} is not available in this installation "
                             f"(module {module_name} not found)") from None
        raise
    func = getattr(module, func_name, None)
    if func is None:
        raise UsageError(f"command {name!r} is not available in this installation "
                         f"({module_name} has no {func_name})")
    return func


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"simu-jax: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``simu-jax`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] == "--version":
        from simu_jax import __version__

        print(f"simu-jax {__version__}")
        return EXIT_OK

    previous_showwarning = warnings.showwarning
    if not debug:
        warnings.showwarning = _show_warning
    try:
        from simu_jax.host_memory import configure_host_allocator

        configure_host_allocator()  # SIMU_JAX_HOST_ALLOCATOR, before any JAX work (simu_jax.host_memory)
        func = _resolve(argv[0])
        code = func(argv[1:])
        return EXIT_OK if code is None else int(code)
    except SystemExit as e:  # a command's own argparse (--help, or a plain parser's error)
        code = e.code
        if code is None:
            return EXIT_OK
        if isinstance(code, int):
            return code
        print(f"simu-jax: error: {_one_line(code)}", file=sys.stderr)
        return EXIT_ERROR
    except BaseException as e:  # noqa: BLE001 - the one place that turns errors into exit codes
        if debug or not isinstance(e, Exception) and not isinstance(e, KeyboardInterrupt):
            raise
        if _expected(e):
            print(f"simu-jax: error: {_message(e)}", file=sys.stderr)
        else:
            print(f"simu-jax: error: internal error {type(e).__name__}: {_message(e)} "
                  f"(rerun with --debug for the traceback)", file=sys.stderr)
        return _exit_code(e)
    finally:
        warnings.showwarning = previous_showwarning


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
