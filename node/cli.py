"""``wharf node``: run a node daemon and manage its datasets."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from wharf.console import fail, out

node_app = typer.Typer(
    name="node",
    help="Run a node daemon and manage its datasets.",
    no_args_is_help=True,
    add_completion=False,
)
dataset_app = typer.Typer(
    name="dataset",
    help="Register and list local datasets.",
    no_args_is_help=True,
    add_completion=False,
)
node_app.add_typer(dataset_app)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="node config TOML", envvar="WHARF_NODE_CONFIG")
]


def _config(path: Path):  # type: ignore[no-untyped-def]
    from wharf.node.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        fail(str(exc))


@node_app.command("start")
def start(
    config: ConfigOpt = Path("node.toml"),
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Start the node daemon: dial out to the coordinator and serve tasks."""
    import signal

    from wharf.identity import IdentityError
    from wharf.node.daemon import NodeDaemon

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = _config(config)
    try:
        daemon = NodeDaemon(cfg)
    except (IdentityError, ValueError) as exc:
        fail(str(exc))
    if not daemon.state.list_datasets():
        logging.getLogger("wharf.node").warning(
            "no datasets registered; add one with `wharf node dataset add`"
        )
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    daemon.run()


@dataset_app.command("add")
def dataset_add(
    name: Annotated[str, typer.Argument(help="name jobs use to select this dataset")],
    path: Annotated[Path, typer.Argument(help="CSV, Parquet or NPZ file")],
    label: Annotated[str, typer.Option(help="label column (NPZ: label array)")],
    features: Annotated[
        str, typer.Option(help="comma-separated feature columns (default: all but the label)")
    ] = "",
    replace: Annotated[bool, typer.Option(help="replace an existing registration")] = False,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Register a local dataset. Only its metadata is ever reported to the coordinator."""
    from wharf.node import datasets as ds
    from wharf.node.state import NodeState
    from wharf.spec import NAME_RE

    if not NAME_RE.match(name):
        fail("dataset name must be 1-64 characters of letters, digits, '.', '_' or '-'")
    cfg = _config(config)
    feats = [f.strip() for f in features.split(",") if f.strip()] or None
    try:
        desc = ds.describe(path, label, feats)
        state = NodeState(cfg.state_dir)
        reg = state.add_dataset(
            name,
            path,
            fmt=desc.format,
            label=desc.label,
            features=list(desc.features),
            feature_shape=list(desc.feature_shape),
            schema=[list(c) for c in desc.schema],
            schema_hash=desc.schema_hash,
            fingerprint=desc.fingerprint,
            rows=desc.num_rows,
            replace=replace,
        )
    except ValueError as exc:
        fail(str(exc))
    out.print(
        f"registered [bold]{reg.name}[/bold]: {reg.rows} rows, {len(reg.features)} features "
        f"{tuple(reg.feature_shape)}, label '{reg.label}', fingerprint {reg.fingerprint[:16]}…"
    )


@dataset_app.command("list")
def dataset_list(config: ConfigOpt = Path("node.toml")) -> None:
    """List registered datasets."""
    from wharf.node.state import NodeState

    cfg = _config(config)
    rows = NodeState(cfg.state_dir).list_datasets()
    if not rows:
        out.print("no datasets registered")
        return
    table = Table("name", "rows", "features", "label", "format", "fingerprint")
    for d in rows:
        table.add_row(
            d.name, str(d.rows), str(len(d.features)), d.label, d.format, d.fingerprint[:16] + "…"
        )
    out.print(table)


@dataset_app.command("remove")
def dataset_remove(name: str, config: ConfigOpt = Path("node.toml")) -> None:
    """Forget a registered dataset (the file itself is left alone)."""
    from wharf.node.state import NodeState

    cfg = _config(config)
    if not NodeState(cfg.state_dir).remove_dataset(name):
        fail(f"no dataset named {name!r} is registered")
    out.print(f"removed {name}")
