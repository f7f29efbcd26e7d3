"""The `pstar` Typer app: registers one subcommand per module of `pstar_cli.commands`.

User mistakes (bad config, missing file, ...) are caught here, at the CLI boundary, and shown as
`error: ...` on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import typer

# `pstar <name>` is the `command` function of `pstar_cli/commands/<name with _>.py`.
COMMAND_NAMES = ("train", "profile", "validate", "estimate-memory", "export")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user must fix something" (pstar_cli's errors, DataError and
    ConfigError among them, derive from PstarError; the engine, importable alone, has its own).

    The file system errors are those of paths the user names, e.g. an --output-dir that is a file."""
    from engine.config import EngineConfigError
    from pstar_cli.errors import PstarError

    return (PstarError, EngineConfigError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def error_lines(exc: BaseException) -> list[str]:
    """The message of a user error, one entry per printed line."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return [f"file not found: {exc.filename}"]
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return [f"{exc.strerror[0].lower()}{exc.strerror[1:]}: {exc.filename}"]  # "not a directory: out/x"
    lines = exc.message_lines() if hasattr(exc, "message_lines") else str(exc).splitlines()
    return lines or [type(exc).__name__]


def report_user_errors(func: Callable) -> Callable:
    """Wrap a command so a user error prints `error: ...` to stderr and exits with code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            if not isinstance(exc, user_error_types()):
                raise
            lines = error_lines(exc)
            typer.echo(f"error: {lines[0]}", err=True)
            for line in lines[1:]:
                typer.echo(f"  {line}", err=True)
            raise typer.Exit(code=getattr(exc, "exit_code", 2)) from None

    return wrapper


def load_command(name: str) -> Callable:
    """The `command` function of `pstar <name>`'s module."""
    return importlib.import_module("pstar_cli.commands." + name.replace("-", "_")).command


def version_callback(value: bool) -> None:
    if value:
        from pstar_cli import __version__

        typer.echo(f"pstar {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="pstar",
        help="Train PyTorch models larger than GPU memory: chunks of model data on GPU and host.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def root(
        version: bool = typer.Option(
            False, "--version", callback=version_callback, is_eager=True, help="Print pstar's version."
        ),
    ) -> None:
        """pstar: heterogeneous CPU/GPU chunk-based training."""

    for name in COMMAND_NAMES:
        app.command(name)(report_user_errors(load_command(name)))
    return app


app = build_app()


def main() -> None:
    """Entry point of the `pstar` console script and of `python -m pstar_cli`."""
    app(prog_name="pstar")
