"""``wharf node``: run a node daemon, register its datasets, decide on offered jobs.

::

    wharf node start
    wharf node dataset add NAME FILE --label COL [--level general|important|core]
                           [--column-level COL=LEVEL ...] [--purpose P ...] [--prohibit COL ...]
    wharf node dataset show NAME [--ca ca.pem] [--json]
    wharf node dataset list | remove NAME
    wharf node grants [--outcome pending|granted|refused|revoked]
    wharf node grant show JOB | approve JOB | deny JOB [--reason TEXT] | revoke JOB
    wharf node budget [DATASET] [--json]
    wharf node ledger verify | log [--job JOB] [--kind KIND] [--json]

``JOB`` may be a unique prefix of the job id. The grant commands only edit the
node's database; the running daemon tells the coordinator within a second.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table

from wharf.console import err, fail, out

if TYPE_CHECKING:
    from wharf.node.config import NodeConfig
    from wharf.node.grants import GrantBook
    from wharf.node.state import GrantRow, NodeState, RegisteredDataset

node_app = typer.Typer(
    name="node",
    help="Run a node daemon, register its datasets and decide on offered jobs.",
    no_args_is_help=True,
    add_completion=False,
)
dataset_app = typer.Typer(
    name="dataset",
    help="Register, list and show local datasets and their registration certificates.",
    no_args_is_help=True,
    add_completion=False,
)
grant_app = typer.Typer(
    name="grant",
    help="Read an offered job, and approve, deny or revoke it.",
    no_args_is_help=True,
    add_completion=False,
)
ledger_app = typer.Typer(
    name="ledger",
    help="Verify and read this node's audit ledger.",
    no_args_is_help=True,
    add_completion=False,
)
node_app.add_typer(dataset_app)
node_app.add_typer(grant_app)
node_app.add_typer(ledger_app)

ConfigOpt = Annotated[
    Path, typer.Option("--config", "-c", help="node config TOML", envvar="WHARF_NODE_CONFIG")
]
JobArg = Annotated[str, typer.Argument(help="job id (or a unique prefix of it)")]


def _config(path: Path) -> NodeConfig:
    from wharf.node.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as exc:
        fail(str(exc))


def _grid() -> Table:
    """A two-column key/value grid that folds long values (hashes) instead of cutting them."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    return grid


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _open(cfg: NodeConfig, *, sign: bool) -> tuple[NodeState, GrantBook]:
    """The node's state and grant book; with ``sign`` the node's key is loaded so that
    decisions are signed and logged (the daemon need not be running)."""
    from wharf.identity import Identity, IdentityError
    from wharf.node.grants import GrantBook
    from wharf.node.state import NodeState

    if cfg.insecure:
        assert cfg.insecure_name
        state = NodeState(cfg.state_dir)
        return state, GrantBook(state, cfg.insecure_name, policy_path=cfg.policy)
    assert cfg.cert and cfg.key and cfg.ca
    try:
        identity = Identity.load(cfg.cert, cfg.key, cfg.ca)
    except IdentityError as exc:
        fail(str(exc))
    if identity.role != "node":
        fail(f"certificate {cfg.cert} has role '{identity.role}'; a node needs a 'node' one")
    signer = identity.signer() if sign else None
    state = NodeState(cfg.state_dir, signer)
    book = GrantBook(
        state, identity.name, signer=signer, ca_pem=identity.ca_pem, policy_path=cfg.policy
    )
    return state, book


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


# --------------------------------------------------------------------------- datasets


def _column_levels(specs: list[str], columns: list[str]) -> dict[str, str]:
    from wharf.records import LEVELS

    levels: dict[str, str] = {}
    for item in specs:
        col, sep, level = item.rpartition("=")
        if not sep or not col:
            fail(f"--column-level {item!r}: write COLUMN=LEVEL, e.g. --column-level bmi=important")
        if col not in columns:
            fail(f"--column-level {item!r}: {col!r} is not a column of the registered data")
        if level not in LEVELS:
            fail(f"--column-level {item!r}: the level must be one of {', '.join(LEVELS)}")
        levels[col] = level
    return levels


@dataset_app.command("add")
def dataset_add(
    name: Annotated[str, typer.Argument(help="name jobs use to select this dataset")],
    path: Annotated[Path, typer.Argument(help="CSV, Parquet or NPZ file")],
    label: Annotated[str, typer.Option(help="label column (NPZ: label array)")],
    features: Annotated[
        str, typer.Option(help="comma-separated feature columns (default: all but the label)")
    ] = "",
    level: Annotated[
        str,
        typer.Option("--level", help="classification of the dataset: general, important or core"),
    ] = "general",
    column_level: Annotated[
        list[str] | None,
        typer.Option(
            "--column-level",
            help="COL=LEVEL: classify one column above the dataset's level (repeatable)",
        ),
    ] = None,
    purpose: Annotated[
        list[str] | None,
        typer.Option(
            "--purpose",
            help="a purpose jobs on this dataset may declare (repeatable; none: any purpose "
            "the node's policy allows)",
        ),
    ] = None,
    prohibit: Annotated[
        list[str] | None,
        typer.Option("--prohibit", help="a column no job may ever use (repeatable)"),
    ] = None,
    replace: Annotated[bool, typer.Option(help="replace an existing registration")] = False,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Register a local dataset and sign its registration certificate.

    The certificate (fingerprint, schema, row count, classification, allowed
    purposes, prohibited columns — never rows) is what the coordinator receives.
    """
    from wharf.node import datasets as ds
    from wharf.records import LEVELS, RecordError, RegistrationCertificate
    from wharf.spec import NAME_RE, PURPOSE_RE

    if not NAME_RE.match(name):
        fail("dataset name must be 1-64 characters of letters, digits, '.', '_' or '-'")
    if level not in LEVELS:
        fail(f"--level must be one of {', '.join(LEVELS)}, got {level!r}")
    for p in purpose or []:
        if not PURPOSE_RE.match(p):
            fail(f"--purpose {p!r} is not a purpose code such as 'medical-research'")
    cfg = _config(config)
    feats = [f.strip() for f in features.split(",") if f.strip()] or None
    try:
        desc = ds.describe(path, label, feats)
    except ValueError as exc:
        fail(str(exc))
    columns = [c for c, _ in desc.schema]
    levels = _column_levels(column_level or [], columns)
    for col in prohibit or []:
        if col not in columns:
            fail(
                f"--prohibit {col!r} is not a column of the registered data ({', '.join(columns)})"
            )
    state, book = _open(cfg, sign=True)
    try:
        cert = RegistrationCertificate.describe(
            book.node,
            name,
            desc,
            classification=level,
            column_levels=levels,
            allowed_purposes=list(dict.fromkeys(purpose or [])),
            prohibited_columns=list(dict.fromkeys(prohibit or [])),
        )
        signed = cert.sign(book.signer) if book.signer is not None else None
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
            classification=level,
            column_levels=levels,
            purposes=list(cert.allowed_purposes),
            prohibited=list(cert.prohibited_columns),
            certificate=signed,
        )
    except (ValueError, RecordError) as exc:
        fail(str(exc))
    out.print(
        f"registered [bold]{escape(reg.name)}[/bold]: {reg.rows} rows, {len(reg.features)} "
        f"features {tuple(reg.feature_shape)}, label '{escape(reg.label)}', "
        f"fingerprint {reg.fingerprint[:16]}…"
    )
    if signed is not None:
        out.print(
            f"registration certificate signed by node {escape(book.node)} "
            f"(record {signed.record_hash[:16]}…): level {level}"
            + (f", purposes {', '.join(cert.allowed_purposes)}" if cert.allowed_purposes else "")
            + (f", prohibited {', '.join(cert.prohibited_columns)}" if prohibit else "")
        )
    else:
        err.print("[yellow]plaintext mode: the registration certificate is not signed[/yellow]")


@dataset_app.command("list")
def dataset_list(config: ConfigOpt = Path("node.toml")) -> None:
    """List registered datasets."""
    from wharf.node.state import NodeState

    cfg = _config(config)
    rows = NodeState(cfg.state_dir).list_datasets()
    if not rows:
        out.print("no datasets registered")
        return
    table = Table("name", "rows", "features", "label", "level", "format", "fingerprint", "cert")
    for d in rows:
        table.add_row(
            d.name,
            str(d.rows),
            str(len(d.features)),
            d.label,
            d.classification,
            d.format,
            d.fingerprint[:16] + "…",
            "signed" if d.certificate_json else "—",
        )
    out.print(table)


@dataset_app.command("show")
def dataset_show(
    name: str,
    ca: Annotated[
        Path | None,
        typer.Option("--ca", help="CA certificate to verify against (default: the config's)"),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the signed certificate as JSON")
    ] = False,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Print a dataset's registration certificate and verify it against the CA.

    Exits 1 if the certificate does not verify or does not describe the registered
    file (e.g. it was edited).
    """
    from wharf.node.state import NodeState
    from wharf.records import RecordError, RegistrationCertificate, SignedRecord

    cfg = _config(config)
    state = NodeState(cfg.state_dir)
    reg = state.get_dataset(name)
    if reg is None:
        fail(f"no dataset named {name!r} is registered")
    if not reg.certificate_json:
        if as_json:
            fail(f"dataset {name!r} has no signed registration certificate")
        out.print(
            f"dataset [bold]{escape(name)}[/bold] has no signed registration certificate "
            "(plaintext mode, or registered before certificates existed: `wharf node start` "
            "signs one)"
        )
        _print_registration(reg)
        return
    ca_path = ca or cfg.ca
    problem = ""
    cert: RegistrationCertificate | None = None
    signer = ""
    try:
        signed = SignedRecord.from_json(reg.certificate_json)
        cert = RegistrationCertificate.from_record(signed)
    except RecordError as exc:
        problem = str(exc)
    else:
        if ca_path is None:
            problem = "no CA certificate to verify against: pass --ca ca.pem"
        else:
            try:
                ca_pem = ca_path.read_bytes()
            except OSError as exc:
                fail(f"cannot read CA certificate {ca_path}: {exc.strerror or exc}")
            try:
                signer = signed.verify(ca_pem).name
                ours = (reg.name, reg.fingerprint, reg.schema_hash, reg.rows)
                if (cert.dataset, cert.fingerprint, cert.schema_hash, cert.row_count) != ours:
                    raise RecordError("it does not describe the registered file")
            except RecordError as exc:
                problem = str(exc)
    if as_json:
        typer.echo(reg.certificate_json)
    elif cert is not None:
        _print_certificate(cert, signed.record_hash)
    if problem:
        err.print(f"[bold red]NOT VERIFIED[/bold red]: {escape(problem)}")
        raise typer.Exit(code=1)
    if not as_json:
        out.print(
            f"[green]verified[/green]: signed by node {escape(signer)}, whose certificate the "
            f"CA {escape(str(ca_path))} issued"
        )


def _print_registration(reg: RegisteredDataset) -> None:
    levels = reg.column_levels or {}
    table = Table("column", "dtype", "role", "level", "usable")
    for col, dtype in reg.schema:
        table.add_row(
            escape(col),
            escape(dtype),
            "label" if col == reg.label else "feature",
            levels.get(col, reg.classification),
            "[red]prohibited[/red]" if col in (reg.prohibited or []) else "yes",
        )
    out.print(f"{escape(reg.name)}: {reg.rows} rows, fingerprint {reg.fingerprint}")
    out.print(table)


def _print_certificate(cert: object, record_hash: str) -> None:
    from wharf.records import RegistrationCertificate

    assert isinstance(cert, RegistrationCertificate)
    info = _grid()
    info.add_row("node", escape(cert.node))
    info.add_row("dataset", escape(cert.dataset))
    info.add_row("rows", str(cert.row_count))
    info.add_row("fingerprint", cert.fingerprint)
    info.add_row("schema hash", cert.schema_hash)
    info.add_row("classification", cert.classification)
    info.add_row(
        "allowed purposes", escape(", ".join(cert.allowed_purposes)) or "(any the policy allows)"
    )
    info.add_row("prohibited", escape(", ".join(cert.prohibited_columns)) or "—")
    info.add_row("issued", _when(cert.issued_at))
    info.add_row("record hash", record_hash)
    out.print(info)
    table = Table("column", "dtype", "role", "level", "usable")
    for col, dtype in cert.schema:
        table.add_row(
            escape(col),
            escape(dtype),
            "label" if col == cert.label else "feature",
            cert.level_of(col),
            "[red]prohibited[/red]" if col in cert.prohibited_columns else "yes",
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


# --------------------------------------------------------------------------- grants

_OUTCOME_STYLE = {
    "pending": "yellow",
    "granted": "green",
    "refused": "red",
    "revoked": "magenta",
}


def _purpose(row: GrantRow) -> str:
    try:
        raw = json.loads(row.spec_json)
    except json.JSONDecodeError:
        return "?"
    return str(raw.get("purpose", "?")) if isinstance(raw, dict) else "?"


@node_app.command("grants")
def grants_list(
    outcome: Annotated[
        str | None,
        typer.Option(help="only jobs with this outcome: pending, granted, refused, revoked"),
    ] = None,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """List offered jobs: pending first, then granted, refused and revoked."""
    from wharf.node.state import OUTCOMES, NodeState

    if outcome is not None and outcome not in OUTCOMES:
        fail(f"--outcome must be one of {', '.join(OUTCOMES)}")
    cfg = _config(config)
    rows = NodeState(cfg.state_dir).list_grants(outcome)
    if not rows:
        out.print("no jobs offered to this node" + (f" are {outcome}" if outcome else ""))
        return
    rows.sort(key=lambda r: (OUTCOMES.index(r.outcome), -r.updated))
    table = Table()
    table.add_column("job", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    for title in ("requester", "dataset", "purpose"):
        table.add_column(title, overflow="fold")
    table.add_column("updated", no_wrap=True)
    table.add_column("told", no_wrap=True)
    for r in rows:
        style = _OUTCOME_STYLE.get(r.outcome, "")
        table.add_row(
            r.job_id,
            f"[{style}]{r.outcome}[/{style}]",
            escape(r.requester),
            escape(r.dataset),
            escape(_purpose(r)),
            datetime.fromtimestamp(r.updated, UTC).strftime("%m-%d %H:%M"),
            "yes" if r.reported else "no",
        )
    out.print(table)
    for r in rows:
        if r.reason:
            out.print(f"[bold]{r.job_id}[/bold] {r.outcome}: {escape(r.reason)}")
    out.print("(told: whether the coordinator has been told the current outcome; times UTC)")
    pending = sum(r.outcome == "pending" for r in rows)
    if pending:
        out.print(
            f"{pending} job(s) await your decision: `wharf node grant show JOB`, then "
            "`wharf node grant approve JOB` or `wharf node grant deny JOB`"
        )


@node_app.command("budget")
def budget_show(
    dataset: Annotated[
        str | None, typer.Argument(help="one dataset (default: every registered dataset)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Each dataset's differential-privacy budget: spent, remaining, and by which jobs."""
    from wharf.node.budget import budget_status
    from wharf.node.policy import PolicyError, load_policy
    from wharf.node.state import NodeState

    cfg = _config(config)
    state = NodeState(cfg.state_dir)
    policy = None
    if cfg.policy is not None:
        try:
            policy = load_policy(cfg.policy)
        except PolicyError as exc:
            fail(str(exc))
    names = [d.name for d in state.list_datasets()]
    names += sorted({s.dataset for s in state.spends()} - set(names))
    if dataset is not None:
        if dataset not in names:
            fail(f"no dataset {dataset!r} is registered at this node")
        names = [dataset]
    statuses = [budget_status(state, policy, name) for name in names]
    if as_json:
        out.print_json(json.dumps([st.to_dict() for st in statuses]))
        return
    if not statuses:
        out.print("no datasets registered at this node")
        return

    def num(x: float) -> str:
        return "no limit" if x == float("inf") else f"{x:.4g}"

    table = Table(title="privacy budget per dataset (basic composition over jobs)")
    table.add_column("dataset", overflow="fold")
    for title in ("budget ε", "spent ε", "left ε", "budget δ", "spent δ", "left δ", "jobs"):
        table.add_column(title, justify="right", no_wrap=True)
    for st in statuses:
        b = st.budget
        table.add_row(
            escape(st.dataset),
            num(b.epsilon) if b else "no limit",
            num(st.spent_epsilon),
            num(st.remaining_epsilon),
            num(b.delta) if b else "no limit",
            num(st.spent_delta),
            num(st.remaining_delta),
            str(len(st.spends)),
        )
    out.print(table)
    for st in statuses:
        for sp in st.spends:
            out.print(
                f"  {escape(st.dataset)}: job {sp.job_id} spent ε={sp.epsilon:.4g}, "
                f"δ={sp.delta:.3g} ({_when(sp.created)})"
            )
    if policy is None or (policy.budget is None and not policy.dataset_budgets):
        out.print("no budget is set: add [budget] to the node's policy to limit what jobs spend")


def _find(state: NodeState, job: str) -> GrantRow:
    try:
        return state.find_grant(job)
    except ValueError as exc:
        fail(str(exc))


def _decided(row: GrantRow) -> None:
    style = _OUTCOME_STYLE.get(row.outcome, "")
    out.print(
        f"job {row.job_id}: [{style}]{row.outcome}[/{style}] ({escape(row.reason)}); "
        "the running node daemon tells the coordinator within a second"
    )


@grant_app.command("approve")
def grant_approve(job: JobArg, config: ConfigOpt = Path("node.toml")) -> None:
    """Approve a pending job: the node signs a grant bound to its exact hash."""
    state, book = _open(_config(config), sign=True)
    row = _find(state, job)
    try:
        row = book.approve(row.job_id)
    except ValueError as exc:
        fail(str(exc))
    _decided(row)
    if row.grant_body_json:
        body = json.loads(row.grant_body_json)
        out.print(
            f"grant {body['grant_id']} for {escape(row.requester)}: purpose {body['purpose']}, "
            f"{body['quotas']['rounds']} round(s), expires {_when(body['expires_at'])}"
        )


@grant_app.command("deny")
def grant_deny(
    job: JobArg,
    reason: Annotated[str, typer.Option(help="why, shown to the developer")] = "",
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Refuse a pending job."""
    state, book = _open(_config(config), sign=True)
    row = _find(state, job)
    try:
        row = book.deny(row.job_id, reason)
    except ValueError as exc:
        fail(str(exc))
    _decided(row)


@grant_app.command("revoke")
def grant_revoke(job: JobArg, config: ConfigOpt = Path("node.toml")) -> None:
    """Withdraw a grant: the node stops taking part in the job at its next task."""
    state, book = _open(_config(config), sign=True)
    row = _find(state, job)
    try:
        row = book.revoke(row.job_id)
    except ValueError as exc:
        fail(str(exc))
    _decided(row)


@grant_app.command("show")
def grant_show(job: JobArg, config: ConfigOpt = Path("node.toml")) -> None:
    """Everything to decide on a job: spec, requester, purpose, columns and their levels,
    protections, quotas, this node's policy verdict, and the code bundle's files."""
    from wharf.bundle import BundleError, list_files
    from wharf.node.grants import Offer
    from wharf.records import RecordError
    from wharf.spec import SpecError, from_json

    state, book = _open(_config(config), sign=False)
    row = _find(state, job)
    style = _OUTCOME_STYLE.get(row.outcome, "")
    head = _grid()
    head.add_row("job", row.job_id)
    head.add_row("job hash", row.job_hash)
    head.add_row("outcome", f"[{style}]{row.outcome}[/{style}]  {escape(row.reason)}")
    head.add_row("requester", escape(row.requester) + "  (from the requester's certificate)")
    head.add_row("dataset", escape(row.dataset))
    head.add_row("offered", _when(row.created))
    head.add_row("coordinator told", "yes" if row.reported else "not yet")
    out.print(head)

    try:
        spec = from_json(row.spec_json)
    except SpecError as exc:
        out.print(f"[red]the offered spec is invalid:[/red] {escape(str(exc))}")
        out.print(escape(row.spec_json))
        return
    s = _grid()
    s.add_row("name", escape(spec.name))
    s.add_row("purpose", f"[bold]{escape(spec.purpose)}[/bold]")
    if spec.description:
        s.add_row("description", escape(spec.description))
    s.add_row("features", escape(", ".join(spec.data.features)) or "(all registered features)")
    m = spec.model
    model = f"{m.kind}, {m.num_classes} classes"
    if m.kind == "mlp":
        model += f", hidden {list(m.hidden)}"
    if m.input_shape:
        model += f", input {list(m.input_shape)}"
    s.add_row("model", model)
    t = spec.training
    s.add_row(
        "training", f"{t.optimizer} lr {t.lr:g}, {t.epochs} epoch(s)/round, batch {t.batch_size}"
    )
    f = spec.federation
    s.add_row(
        "federation",
        f"{f.rounds} round(s), {f.strategy}, min {f.min_nodes} node(s), secure aggregation "
        + ("[green]on[/green]" if f.secure else "[red]off[/red]"),
    )
    v = spec.valuation.mode
    if v == "clear":
        s.add_row(
            "valuation",
            "[red]clear[/red]: the coordinator keeps each of your updates for contribution scores",
        )
    elif v == "secure":
        s.add_row(
            "valuation",
            "secure: each round also reveals DP-noised leave-one-out sums; the participant-level "
            f"guarantee composes {f.rounds} rounds x max_nodes {f.max_nodes} releases",
        )
    out.print("\n[bold]the job[/bold]")
    out.print(s)

    verdict = book.judge(
        Offer(
            job_id=row.job_id,
            job_hash=row.job_hash,
            spec_json=row.spec_json,
            requester=row.requester,
            dataset=row.dataset,
            bundle_sha256=row.bundle_sha,
        )
    )
    out.print("\n[bold]what it would use here[/bold]")
    d = verdict.decision
    if d is not None:
        reg_row = state.get_dataset(d.dataset)
        levels: dict[str, str] = {}
        if reg_row is not None:
            try:
                reg = book.registration(reg_row)
                levels = {c: reg.level_of(c) for c in d.columns}
            except RecordError:
                levels = {}
        u = _grid()
        u.add_row(
            "columns",
            escape(", ".join(f"{c} ({levels.get(c, '?')})" for c in d.columns)),
        )
        u.add_row("most sensitive level", d.level)
        dp = (
            f"DP ε={d.protections.dp_epsilon:.4g}, δ={d.protections.dp_delta:g} on this dataset"
            if d.protections.dp_epsilon is not None
            else "no differential privacy"
        )
        if verdict.privacy is not None:
            for g in verdict.privacy.guarantees():
                mech = ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sorted(g.mechanism.items())
                )
                u.add_row(
                    g.kind.replace("_", "-") + " DP",
                    f"ε={g.epsilon:.4g}, δ={g.delta:g} ({escape(g.accountant)}; {escape(mech)})",
                )
        u.add_row(
            "protections",
            ("secure aggregation" if d.protections.secure_aggregation else "no secure aggregation")
            + f", {dp}",
        )
        u.add_row(
            "quotas",
            f"{d.quotas.rounds} round(s), {d.quotas.epochs} epoch(s)/round, "
            f"{d.quotas.samples} sample visits",
        )
        out.print(u)
    vstyle = {"refuse": "red", "auto_approve": "green", "pending": "yellow"}[verdict.outcome]
    out.print(f"policy verdict now: [{vstyle}]{verdict.outcome}[/{vstyle}]")
    for reason in verdict.reasons:
        out.print(f"  - {escape(reason)}")

    if row.outcome in ("granted", "revoked") and (row.grant_json or row.grant_body_json):
        out.print("\n[bold]the grant[/bold]")
        try:
            grant = book.grant_of(row)
            status = "[green]signature verified[/green]" if book.ca_pem else "unsigned (plaintext)"
        except RecordError as exc:
            grant, status = None, f"[red]does not verify: {escape(str(exc))}[/red]"
        if grant is not None:
            out.print(
                f"grant {grant.grant_id}: issued {_when(grant.issued_at)}, expires "
                f"{_when(grant.expires_at)}; {status}"
            )
        else:
            out.print(status)
        used = state.samples_used(row.job_id)
        receipts = state.receipts_for(row.job_id)
        out.print(f"{len(receipts)} usage receipt(s), {used} sample visits so far")

    if not row.bundle_sha:
        out.print("\nno code bundle: the job runs only built-in Wharf code")
        return
    out.print(f"\n[bold]code bundle[/bold] {row.bundle_sha}")
    path = state.bundle_path(row.bundle_sha)
    if not path.exists():
        out.print(
            "[yellow]not fetched yet[/yellow]: the running daemon fetches it when the job is "
            "offered; read it before approving"
        )
        return
    try:
        files = list_files(path.read_bytes())
    except BundleError as exc:
        out.print(f"[red]the bundle cannot be read: {escape(str(exc))}[/red]")
        return
    listing = Table("file", "bytes")
    for fname, data in files.items():
        listing.add_row(escape(fname), str(len(data)))
    out.print(listing)
    for fname, data in files.items():
        if fname.endswith(".py"):
            out.print(f"\n[bold]{escape(fname)}[/bold]")
            out.print(Syntax(data.decode("utf-8", errors="replace"), "python", line_numbers=True))


# --------------------------------------------------------------------------- ledger


@ledger_app.command("verify")
def ledger_verify(
    ca: Annotated[
        Path | None, typer.Option("--ca", help="CA certificate (default: the config's)")
    ] = None,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Verify this node's audit ledger (same as `wharf audit verify STATE_DIR/node.db`)."""
    from wharf.audit_cli import verify_command

    cfg = _config(config)
    ca_path = ca or cfg.ca
    if ca_path is None:
        fail("give the CA certificate with --ca")
    verify_command(cfg.state_dir / "node.db", ca_path, table="ledger", anchors=None, signer=None)


@ledger_app.command("log")
def ledger_log(
    job: Annotated[str | None, typer.Option("--job", help="only this job's entries")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="only entries of this kind")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    config: ConfigOpt = Path("node.toml"),
) -> None:
    """Show this node's audit ledger entries."""
    from wharf.audit_cli import log_command

    cfg = _config(config)
    log_command(cfg.state_dir / "node.db", job=job, kind=kind, as_json=as_json, table="ledger")
