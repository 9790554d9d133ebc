"""``wharf audit``: verify and read an audit ledger, offline, with only the CA certificate.

Mounted by the root CLI as ``wharf audit``::

    wharf audit verify PATH --ca ca.pem [--table ledger] [--anchors FILE] [--signer NAME]
    wharf audit log PATH [--job JOB] [--kind KIND] [--json] [--table ledger]

``PATH`` is a coordinator's or a node's SQLite database (opened read-only) or a
JSONL export (``Ledger.export_jsonl``). ``verify`` exits 0 when the whole chain
checks out, 1 at the first bad entry (printing its sequence number and what is
wrong with it), and 2 for a user error such as a missing file.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from wharf.console import err, fail, out, read_ca_file
from wharf.ledger import (
    Entry,
    FileAnchor,
    LedgerError,
    LedgerUnreadable,
    load_entries,
    verify_path,
)

__all__ = ["audit_app"]

audit_app = typer.Typer(
    name="audit",
    help="Verify and read audit ledgers (a coordinator's or a node's database, or an export).",
    no_args_is_help=True,
    add_completion=False,
)

PathArg = Annotated[
    Path, typer.Argument(help="SQLite database of a coordinator or node, or a .jsonl export.")
]
TableOpt = Annotated[str, typer.Option("--table", help="Ledger table name in the database.")]


@audit_app.command("verify")
def verify_command(
    path: PathArg,
    ca: Annotated[Path, typer.Option("--ca", help="The deployment CA certificate (ca.pem).")],
    table: TableOpt = "ledger",
    anchors: Annotated[
        Path | None,
        typer.Option(
            "--anchors",
            help="A FileAnchor file of heads witnessed elsewhere; catches a truncated tail.",
        ),
    ] = None,
    signer: Annotated[
        str | None, typer.Option("--signer", help="Require the ledger to be signed by NAME.")
    ] = None,
) -> None:
    """Check every entry: hash chain, signatures, signer certificates. Exit 1 at the first fault."""
    ca_pem = read_ca_file(ca)
    try:
        heads = FileAnchor(anchors).heads() if anchors is not None else []
        report = verify_path(path, ca_pem, table_name=table, expect_heads=heads, expect_name=signer)
    except LedgerUnreadable as exc:
        fail(str(exc))
    except LedgerError as exc:  # an unreadable anchor file
        fail(str(exc))
    if report.ok:
        who = f", signed by {report.owner}" if report.owner else ""
        out.print(
            f"[green]OK[/green] {report.count} entries{who}; "
            f"head {report.head_seq} {report.head_hash}",
            markup=True,
        )
        return
    err.print(
        Text.assemble(
            ("FAILED", "bold red"),
            f" at entry {report.first_bad_seq}: {report.problem} "
            f"({report.count} entries before it verify)",
        )
    )
    raise typer.Exit(code=1)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _summary(e: Entry, width: int = 80) -> str:
    text = e.payload_json
    return text if len(text) <= width else text[: width - 1] + "…"


@audit_app.command("log")
def log_command(
    path: PathArg,
    job: Annotated[str | None, typer.Option("--job", help="Only this job's entries.")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Only entries of this kind.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    table: TableOpt = "ledger",
) -> None:
    """Show ledger entries (not verified: run `wharf audit verify` for that)."""
    shown: list[Entry] = []
    problem = ""
    try:
        for e in load_entries(path, table):
            if (job is None or e.job_id == job) and (kind is None or e.kind == kind):
                shown.append(e)
    except LedgerUnreadable as exc:
        fail(str(exc))
    except LedgerError as exc:
        problem = str(exc)
    if as_json:
        for e in shown:
            typer.echo(json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False))
    elif shown:
        grid = Table()
        for title in ("seq", "time (UTC)", "kind", "job", "payload", "hash"):
            grid.add_column(title, no_wrap=title != "payload")
        for e in shown:
            grid.add_row(
                str(e.seq),
                _when(e.time),
                Text(e.kind),
                Text(e.job_id),
                Text(_summary(e)),
                e.entry_hash[:12],
            )
        out.print(grid)
    else:
        out.print("no matching entries")
    if problem:
        err.print(Text.assemble(("error:", "red"), f" {problem}"))
        raise typer.Exit(code=1)
