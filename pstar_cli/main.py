"""The `pstar` Typer app: registers one subcommand per module of `pstar_cli.commands`.

Errors end here, at the CLI boundary, as `error: ...` lines on stderr: a user mistake (bad config,
missing file, ...) with its message and exit code 2 (or the code the error names); anything else
(a bug) as one line saying what failed, with the full traceback written to a file under the
command's output directory (`outputs/` for commands without one), and exit code 1.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import os
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import click
import typer

from pstar_cli.errors import PstarError

# `pstar <name>` is the `command` function of `pstar_cli/commands/<name with _>.py`.
COMMAND_NAMES = ("train", "profile", "validate", "estimate-memory", "export")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the user must fix something" (pstar_cli's errors, DataError and
    ConfigError among them, derive from PstarError; the engine's and the models' config errors from
    engine.config.ConfigProblems).

    The file system errors are those of paths the user names, e.g. an --output-dir that is a file."""
    from engine.config import ConfigProblems

    return (PstarError, ConfigProblems, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError)


def error_lines(exc: BaseException) -> list[str]:
    """The message of a user error, one entry per printed line."""
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return [f"file not found: {exc.filename}"]
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return [f"{exc.strerror[0].lower()}{exc.strerror[1:]}: {exc.filename}"]  # "not a directory: out/x"
    lines = exc.message_lines() if isinstance(exc, PstarError) else str(exc).splitlines()
    return lines or [type(exc).__name__]


def report_user_errors(func: Callable, name: str = "") -> Callable:
    """Wrap a command so that a user error prints `error: ...` to stderr and exits with its code
    (2 unless it names another), and any other exception prints one `error:` line naming the file
    its traceback was written to, and exits with code 1."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.Exit, click.exceptions.ClickException,
                click.exceptions.Abort):
            raise  # a command's own exit code or a usage error: click reports them
        except Exception as exc:
            if not isinstance(exc, user_error_types()):
                path = write_traceback(exc, traceback_dir(kwargs), name or func.__name__)
                typer.echo(f"error: `pstar {name}` failed unexpectedly ({type(exc).__name__}: "
                           f"{first_line(exc)}); the traceback is in {path}", err=True)
                raise typer.Exit(code=1) from None
            lines = error_lines(exc)
            typer.echo(f"error: {lines[0]}", err=True)
            for line in lines[1:]:
                typer.echo(f"  {line}", err=True)
            raise typer.Exit(code=exc.exit_code if isinstance(exc, PstarError) else 2) from None

    return wrapper


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def traceback_dir(arguments: dict) -> Path:
    """Where a command's traceback goes: its --output-dir, else `outputs/<config name>` for a
    command given a config (the default output directory of `pstar train`), else `outputs/`."""
    if arguments.get("output_dir") is not None:
        return Path(arguments["output_dir"])
    if isinstance(arguments.get("config"), str):
        return Path("outputs") / Path(arguments["config"]).stem
    return Path("outputs")


def write_traceback(exc: BaseException, directory: Path, name: str) -> Path:
    """Write the exception's full traceback to `directory/traceback-<command>-<time>.txt` (or to
    the temporary directory when that one cannot be written); returns the file's path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = "".join(traceback.format_exception(exc))
    for where in (directory, Path(tempfile.gettempdir())):
        path = where / f"traceback-{name or 'pstar'}-{stamp}-{os.getpid()}.txt"
        try:
            where.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return Path("(not written: no writable directory)")


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
        app.command(name)(report_user_errors(load_command(name), name))
    return app


app = build_app()


def main() -> None:
    """Entry point of the `pstar` console script and of `python -m pstar_cli`."""
    app(prog_name="pstar")
