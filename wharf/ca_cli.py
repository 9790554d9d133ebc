"""``wharf ca``: create a deployment CA and issue role certificates.

Mounted by the root CLI as ``wharf ca``::

    wharf ca init [--dir DIR] [--force]
    wharf ca issue --role node NAME [--dir CA_DIR] [--out OUT_DIR] [--host H ...]
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from rich.console import Console
from rich.markup import escape

from wharf.identity import ROLES, IdentityError, init_ca, issue

__all__ = ["ca_app"]

ca_app = typer.Typer(
    name="ca",
    help="Deployment CA: create it and issue role certificates (mTLS identities).",
    no_args_is_help=True,
    add_completion=False,
)

_out = Console(soft_wrap=True, highlight=False)
_err = Console(stderr=True, soft_wrap=True, highlight=False)

DEFAULT_CA_DIR = Path("wharf-ca")


def _fail(message: str) -> NoReturn:
    _err.print(f"[red]error:[/red] {escape(message)}", style="red")
    raise typer.Exit(code=2)


@ca_app.command("init")
def init_command(
    directory: Annotated[
        Path, typer.Option("--dir", help="Directory for ca.pem and ca.key.")
    ] = DEFAULT_CA_DIR,
    name: Annotated[str, typer.Option("--name", help="CA common name.")] = "Wharf deployment CA",
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 3650,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing CA.")] = False,
) -> None:
    """Create the deployment CA (ca.pem, and ca.key with mode 0600)."""
    try:
        files = init_ca(directory, name=name, days=days, force=force)
    except IdentityError as exc:
        _fail(str(exc))
    _out.print(f"Wrote CA certificate {escape(str(files.cert))} and key {escape(str(files.key))}")


@ca_app.command("issue")
def issue_command(
    name: Annotated[str, typer.Argument(help="Identity name (certificate CN).")],
    role: Annotated[
        str,
        typer.Option("--role", click_type=click.Choice(ROLES), help="Role put in the certificate."),
    ],
    ca_dir: Annotated[
        Path, typer.Option("--dir", help="CA directory (holds ca.pem and ca.key).")
    ] = DEFAULT_CA_DIR,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Where to write NAME.pem and NAME.key.")
    ] = Path("."),
    hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="DNS name or IP for a coordinator certificate (repeatable; "
            "default localhost, 127.0.0.1, ::1).",
        ),
    ] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity in days.")] = 825,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
) -> None:
    """Issue a role certificate signed by the deployment CA (NAME.pem, NAME.key 0600)."""
    try:
        files = issue(ca_dir, role, name, out_dir, hosts=hosts or (), days=days, force=force)
    except IdentityError as exc:
        _fail(str(exc))
    _out.print(
        f"Wrote {escape(role)} certificate {escape(str(files.cert))} "
        f"and key {escape(str(files.key))}"
    )
