"""The ``wharf`` command: one root for every party's tools."""

from __future__ import annotations

import typer

from wharf.audit_cli import audit_app
from wharf.ca_cli import ca_app
from wharf.coordinator.cli import coordinator_app
from wharf.job_cli import job_app
from wharf.node.cli import node_app
from wharf.product_cli import product_app

app = typer.Typer(
    name="wharf",
    help="Wharf: privacy-preserving federated computation for data markets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(ca_app)
app.add_typer(coordinator_app)
app.add_typer(node_app)
app.add_typer(job_app)
app.add_typer(audit_app)
app.add_typer(product_app)


@app.command("demo")
def demo(
    rounds: int = typer.Option(20, help="federated rounds"),
    secure: bool = typer.Option(True, "--secure/--no-secure", help="secure aggregation"),
    keep: bool = typer.Option(False, help="keep the temporary directory"),
) -> None:
    """Run a local federation of three hospitals on the breast-cancer data."""
    from wharf.demo import run_demo

    raise typer.Exit(run_demo(rounds=rounds, secure=secure, keep=keep))


@app.command("version")
def version() -> None:
    """Print the version."""
    from wharf import __version__

    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
