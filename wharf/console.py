"""Shared terminal output for the CLI: one-line user errors, no tracebacks."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one red line saying what to fix, and exit."""
    err.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code=code)
