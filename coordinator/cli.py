"""``wharf coordinator``: run the coordinator service."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from wharf.console import fail

coordinator_app = typer.Typer(
    name="coordinator", help="Run the coordinator.", no_args_is_help=True, add_completion=False
)


@coordinator_app.command("start")
def start(
    listen: Annotated[str, typer.Option(help="host:port to listen on")] = "127.0.0.1:7443",
    data_dir: Annotated[Path, typer.Option(help="store and blob directory")] = Path(
        "wharf-coordinator"
    ),
    cert: Annotated[Path | None, typer.Option(help="coordinator certificate (PEM)")] = None,
    key: Annotated[Path | None, typer.Option(help="coordinator private key (PEM)")] = None,
    ca: Annotated[Path | None, typer.Option(help="deployment CA certificate (PEM)")] = None,
    db_url: Annotated[str, typer.Option(help="SQLAlchemy URL (default: SQLite in data dir)")] = "",
    insecure: Annotated[
        bool, typer.Option("--insecure", help="PLAINTEXT, unauthenticated: experiments only")
    ] = False,
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
    port_file: Annotated[
        Path | None, typer.Option(help="write the bound port here once listening")
    ] = None,
) -> None:
    """Start the coordinator and serve until interrupted."""
    from wharf.coordinator.server import Coordinator, CoordinatorConfig
    from wharf.identity import Identity, IdentityError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    identity = None
    if not insecure:
        if not (cert and key and ca):
            fail(
                "give --cert, --key and --ca (see `wharf ca issue --role coordinator`), "
                "or --insecure for a plaintext experiment"
            )
        try:
            identity = Identity.load(cert, key, ca)
        except IdentityError as exc:
            fail(str(exc))
    try:
        coordinator = Coordinator(
            CoordinatorConfig(
                listen=listen,
                data_dir=data_dir,
                db_url=db_url,
                identity=identity,
                insecure=insecure,
            )
        )
    except (ValueError, OSError) as exc:
        fail(str(exc))
    coordinator.serve_forever(port_file)
