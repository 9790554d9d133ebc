"""``wharf job``: submit, list, watch, cancel jobs and download their models."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from wharf.console import fail, out

job_app = typer.Typer(
    name="job",
    help="Submit and follow training jobs.",
    no_args_is_help=True,
    add_completion=False,
)

Coord = Annotated[
    str, typer.Option("--coordinator", envvar="WHARF_COORDINATOR", help="coordinator host:port")
]
Cert = Annotated[
    Path | None, typer.Option("--cert", envvar="WHARF_CERT", help="your certificate (PEM)")
]
Key = Annotated[Path | None, typer.Option("--key", envvar="WHARF_KEY", help="your key (PEM)")]
CA = Annotated[Path | None, typer.Option("--ca", envvar="WHARF_CA", help="deployment CA (PEM)")]

TERMINAL = {"completed", "failed", "cancelled"}


@contextmanager
def client_for(
    coordinator: str, cert: Path | None, key: Path | None, ca: Path | None
) -> Iterator[Any]:
    """Open a client and turn every expected failure into one clear line."""
    import os

    import grpc

    from wharf.chunks import TransferError
    from wharf.client import Client, describe_rpc_error
    from wharf.identity import IdentityError
    from wharf.spec import SpecError

    insecure = os.environ.get("WHARF_INSECURE_IDENTITY")
    try:
        if insecure:
            client = Client(coordinator, insecure_identity=insecure)
        else:
            if not (cert and key and ca):
                fail("give --cert, --key and --ca (or set WHARF_CERT, WHARF_KEY, WHARF_CA)")
            client = Client(coordinator, cert=cert, key=key, ca=ca)
    except (IdentityError, ValueError) as exc:
        fail(str(exc))
    try:
        with client:
            yield client
    except grpc.RpcError as exc:
        fail(describe_rpc_error(exc))
    except (SpecError, TransferError, ValueError, OSError) as exc:
        fail(str(exc))


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _fmt_metrics(metrics: Any) -> str:
    keys = ("global_accuracy", "global_loss", "train_loss")
    parts = [f"{k}={metrics[k]:.4f}" for k in keys if k in metrics]
    return "  ".join(parts)


def follow(
    client: Any, job_id: str, total_rounds: int, echo: Callable[[str], None] | None = None
) -> Any:
    """Show a live progress bar for a job until it ends; returns the final JobInfo."""
    columns = (
        TextColumn("[bold]{task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rounds"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=out, transient=False) as progress:
        bar = progress.add_task("job", total=total_rounds, name=job_id[:8], status="waiting…")
        for ev in client.watch(job_id):
            if ev.kind == "round_completed":
                progress.update(bar, completed=ev.round, status=_fmt_metrics(ev.metrics))
            elif ev.kind == "round_started":
                progress.update(bar, status=f"round {ev.round}: {ev.message}")
            elif ev.kind in ("round_failed", "node_dropped"):
                progress.console.print(f"[yellow]round {ev.round}: {ev.message}[/yellow]")
            elif ev.kind == "state":
                style = {"failed": "red", "completed": "green", "cancelled": "yellow"}.get(
                    ev.state, "cyan"
                )
                progress.console.print(f"[{style}]{ev.message}[/{style}]")
            elif ev.kind == "grant":
                style = (
                    "green"
                    if "granted" in ev.message
                    else "yellow"
                    if "awaiting" in ev.message
                    else "red"
                )
                progress.console.print(f"[{style}]{ev.message}[/{style}]")
            elif ev.kind == "message":
                style = "bold red" if ev.message.startswith("WARNING") else "dim"
                progress.console.print(f"[{style}]{ev.message}[/{style}]")
            if echo is not None:
                echo(ev.kind)
    return client.get(job_id)


@job_app.command("submit")
def submit(
    spec: Annotated[Path, typer.Argument(help="job spec (TOML)")],
    watch: Annotated[bool, typer.Option("--watch/--no-watch", help="follow progress")] = True,
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """Submit a job spec."""
    from wharf.spec import SpecError, load_toml

    try:
        parsed = load_toml(spec)
    except SpecError as exc:
        fail(str(exc))
    with client_for(coordinator, cert, key, ca) as client:
        info = client.submit(parsed)
        out.print(
            f"submitted job [bold]{info.job_id}[/bold] ({info.name}), hash {info.job_hash[:16]}…"
        )
        if watch:
            final = follow(client, info.job_id, info.rounds_total)
            _summary(final)
            if final.state != "completed":
                raise typer.Exit(1)


@job_app.command("watch")
def watch_cmd(
    job_id: str,
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """Follow a job's progress live until it ends."""
    with client_for(coordinator, cert, key, ca) as client:
        info = client.get(job_id)
        final = follow(client, job_id, info.rounds_total)
        _summary(final)


def _summary(info: Any) -> None:
    table = Table("round", "nodes", "global acc", "global loss", "train loss", title=None)
    for r in info.rounds:
        if r.state != "completed":
            continue
        m = r.metrics
        table.add_row(
            str(r.round),
            str(len(r.nodes)),
            f"{m['global_accuracy']:.4f}" if "global_accuracy" in m else "-",
            f"{m['global_loss']:.4f}" if "global_loss" in m else "-",
            f"{m['train_loss']:.4f}" if "train_loss" in m else "-",
        )
    if info.rounds:
        out.print(table)
    line = f"job {info.job_id}: [bold]{info.state}[/bold]"
    if info.reason:
        line += f" — {info.reason}"
    out.print(line)


@job_app.command("get")
def get_cmd(
    job_id: str,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """Show one job."""
    from google.protobuf.json_format import MessageToDict

    with client_for(coordinator, cert, key, ca) as client:
        info = client.get(job_id)
        if as_json:
            out.print_json(json.dumps(MessageToDict(info)))
        else:
            out.print(f"job {info.job_id} ({info.name}) by {info.owner}")
            out.print(f"  hash   {info.job_hash}")
            out.print(f"  rounds {info.rounds_completed}/{info.rounds_total}")
            out.print(f"  nodes  {', '.join(info.nodes) or '-'}")
            _privacy(info.privacy_json)
            _summary(info)


def _privacy(text: str) -> None:
    """The DP guarantee a finished job states (one line per guarantee)."""
    if not text:
        return
    report = json.loads(text)
    p = report.get("participant_level")
    if p:
        m = p.get("mechanism", {})
        out.print(
            f"  DP     participant level: ε={p['epsilon']:.4g}, δ={p['delta']:g} "
            f"({p['accountant']}; noise multiplier {m.get('noise_multiplier', 0):.4g}, "
            f"clip {m.get('clip', 0):g})"
        )
    for node, g in sorted(report.get("record_level", {}).items()):
        m = g.get("mechanism", {})
        out.print(
            f"  DP     record level at {node}: ε={g['epsilon']:.4g}, δ={g['delta']:g} "
            f"({g['accountant']}; σ {m.get('noise_multiplier', 0):.4g}, "
            f"q {m.get('sample_rate', 0):.3g}, {m.get('steps', 0)} steps)"
        )
    if report.get("worst_epsilon") is not None:
        out.print(f"  DP     worst dataset spend: ε={report['worst_epsilon']:.4g}")


@job_app.command("list")
def list_cmd(
    state: Annotated[str, typer.Option(help="only jobs in this state")] = "",
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """List your jobs (operators: all jobs)."""
    with client_for(coordinator, cert, key, ca) as client:
        jobs = client.list(state=state)
    table = Table("job", "name", "owner", "state", "rounds", "created")
    for j in jobs:
        table.add_row(
            j.job_id,
            j.name,
            j.owner,
            j.state,
            f"{j.rounds_completed}/{j.rounds_total}",
            _when(j.created),
        )
    out.print(table)


@job_app.command("cancel")
def cancel_cmd(
    job_id: str,
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """Cancel a job."""
    with client_for(coordinator, cert, key, ca) as client:
        info = client.cancel(job_id)
    out.print(f"job {info.job_id}: {info.state}")


@job_app.command("model")
def model_cmd(
    job_id: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="destination .safetensors")] = Path(
        "model.safetensors"
    ),
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """Download a completed job's model (hash-verified)."""
    with client_for(coordinator, cert, key, ca) as client:
        ref = client.download_model(job_id, output)
    out.print(f"wrote {output} ({ref.size} bytes, sha256 {ref.sha256[:16]}…)")


@job_app.command("nodes")
def nodes_cmd(
    coordinator: Coord = "127.0.0.1:7443",
    cert: Cert = None,
    key: Key = None,
    ca: CA = None,
) -> None:
    """List nodes and the datasets they offer (metadata only)."""
    with client_for(coordinator, cert, key, ca) as client:
        nodes = client.nodes()
    table = Table("node", "online", "dataset", "rows", "feature shape")
    for n in nodes:
        for d in n.datasets or [None]:
            table.add_row(
                n.name,
                "yes" if n.online else "no",
                d.name if d else "-",
                str(d.rows) if d else "-",
                str(tuple(d.feature_shape)) if d else "-",
            )
    out.print(table)
