"""The ``anomalygen`` command line (typer + rich).

Commands keep only argument parsing here; the work lives in library modules. Errors a user can
act on (``AnomalygenError``) print as one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console

from anomalygen.errors import AnomalygenError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
datasets_app = typer.Typer(no_args_is_help=True, help="Inspect datasets.")
app.add_typer(datasets_app, name="datasets")
console = Console(stderr=True)


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``AnomalygenError`` into one red line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except AnomalygenError as error:
            console.print(f"[red]error:[/red] {error}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


if __name__ == "__main__":
    app()
