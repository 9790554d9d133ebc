"""Shared terminal output for the CLI: one-line user errors, no tracebacks."""

from __future__ import annotations

from pathlib import Path
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


def read_ca_file(path: Path) -> bytes:
    """The deployment CA certificate from ``--ca``, or one line saying what is wrong."""
    from cryptography import x509

    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        fail(f"CA certificate file not found: {path}")
    except OSError as exc:
        fail(f"cannot read CA certificate {path}: {exc.strerror or exc}")
    try:
        if not x509.load_pem_x509_certificates(pem):
            raise ValueError
    except ValueError:
        fail(f"{path} is not a PEM certificate; pass the deployment's ca.pem with --ca")
    return pem
