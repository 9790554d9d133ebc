"""``wharf product``: package, verify and show signed model products (``NAME.wharf``).

Mounted by the root CLI as ``wharf product``::

    wharf product verify NAME.wharf --ca ca.pem [--json]
    wharf product show NAME.wharf [--markdown OUT.md]
    wharf product package-dossier DOSSIER.json --weights model.safetensors -o NAME.wharf \\
        --cert admin.pem --key admin.key --ca ca.pem --licence TEXT --price 1000 --currency EUR \\
        [--contribution scores.json] [--floor 0.05] [--usage-weight 0.2]

``verify`` needs only the deployment CA certificate — no coordinator, no network —
and exits 0 (``OK: …``), 1 at the first failed check (naming the part), or 2 for a
user error such as a missing file. ``package-dossier`` works from a dossier file so
the format can be produced and checked without a coordinator; the coordinator-backed
``package JOB`` command fetches the dossier and calls :func:`package_from_dossier`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from wharf.console import err, fail, out, read_ca_file
from wharf.identity import Identity, IdentityError
from wharf.product import (
    ProductError,
    model_card_markdown,
    package_product,
    read_product,
    show_text,
    verify_product,
)

__all__ = ["load_contribution", "package_from_dossier", "product_app"]

product_app = typer.Typer(
    name="product",
    help="Package, verify and show signed model products (NAME.wharf).",
    no_args_is_help=True,
    add_completion=False,
)


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProductError(what, f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProductError(what, f"cannot read {path}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProductError(what, f"{path} is not valid JSON: {exc}") from None


def load_contribution(
    source: Path | Mapping[str, Any], method: str = ""
) -> tuple[dict[str, float], str]:
    """Scores and method from ``{node: score}`` or ``{"method": …, "scores": {node: score}}``.

    The second form lets whatever computed the scores (leave-one-out, Shapley…)
    say so; ``method`` (the command-line option) overrides it.
    """
    raw = _read_json(source, "contribution") if isinstance(source, Path) else source
    if not isinstance(raw, Mapping):
        raise ProductError("contribution", "scores must be a JSON object of node: score")
    if "scores" in raw:
        stated = raw.get("method", "")
        scores_raw = raw["scores"]
        method = method or (stated if isinstance(stated, str) else "")
    else:
        scores_raw = raw
    if not isinstance(scores_raw, Mapping):
        raise ProductError("contribution", "scores must map node names to numbers")
    scores: dict[str, float] = {}
    for node, value in scores_raw.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProductError("contribution", f"score of {node!r} must be a number")
        scores[str(node)] = float(value)
    return scores, method or "supplied by the operator"


def package_from_dossier(
    dossier: Path | Mapping[str, Any],
    weights: Path | bytes,
    out: Path,
    *,
    cert: Path,
    key: Path,
    ca: Path,
    licence: str,
    price: int,
    currency: str,
    contribution: Path | Mapping[str, Any] | None = None,
    contribution_method: str = "",
    floor: float = 0.05,
    usage_weight: float = 0.2,
    revenue: bool = True,
    force: bool = False,
) -> Path:
    """Package a product from a dossier (a file or the object the coordinator returned).

    The identity files must be an operator's. Raises :class:`ProductError` (or
    :class:`wharf.identity.IdentityError` for unusable identity files) with a
    message naming what to fix; the product is verified before it is written.
    """
    identity = Identity.load(cert, key, ca)
    if isinstance(dossier, Path):
        dossier_obj = _read_json(dossier, "dossier")
    else:
        dossier_obj = dossier
    if not isinstance(dossier_obj, Mapping):
        raise ProductError("dossier", "must be a JSON object")
    if isinstance(weights, Path):
        try:
            weights_bytes = weights.read_bytes()
        except OSError as exc:
            raise ProductError("weights", f"cannot read {weights}: {exc.strerror or exc}") from None
    else:
        weights_bytes = bytes(weights)
    scores: dict[str, float] | None = None
    method = contribution_method
    if contribution is not None:
        scores, method = load_contribution(contribution, contribution_method)
    return package_product(
        dossier_obj,
        weights_bytes,
        out,
        identity,
        licence=licence,
        price_minor_units=price,
        currency=currency,
        contribution=scores,
        contribution_method=method,
        floor_fraction=floor,
        usage_weight=usage_weight,
        with_revenue=revenue,
        overwrite=force,
    )


ProductArg = Annotated[Path, typer.Argument(help="The product file (NAME.wharf).")]


# --------------------------------------------------------------------------- commands


@product_app.command("verify")
def verify_command(
    path: ProductArg,
    ca: Annotated[Path, typer.Option("--ca", help="The deployment CA certificate (ca.pem).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check every signature and hash offline; exit 1 at the first failure, naming the part."""
    ca_pem = read_ca_file(ca)
    if not path.is_file():
        fail(f"product file not found: {path}")
    result = verify_product(path, ca_pem)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), sort_keys=True, ensure_ascii=False))
    elif result.ok:
        out.print(Text.assemble(("OK", "green"), result.message[2:]))
    else:
        err.print(Text.assemble(("FAILED", "bold red"), f" {result.failure}"))
    if not result.ok:
        raise typer.Exit(code=1)


@product_app.command("show")
def show_command(
    path: ProductArg,
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Also write a markdown model card here.")
    ] = None,
) -> None:
    """Show what the passport states (run `verify` to check it)."""
    try:
        contents = read_product(path)
        passport = contents.passport
    except ProductError as exc:
        fail(str(exc))
    out.print(Text(show_text(passport, weights_sha256=contents.weights_sha256)))
    if markdown is not None:
        try:
            markdown.write_text(model_card_markdown(passport), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {markdown}: {exc.strerror or exc}")
        out.print(f"model card written to {markdown}", markup=False)


# Options both packaging commands take, declared once.
OutputOpt = Annotated[Path, typer.Option("-o", "--output", help="The product file to write.")]
LicenceOpt = Annotated[str, typer.Option("--licence", help="Licence terms, as text.")]
PriceOpt = Annotated[int, typer.Option("--price", help="Price in minor units (e.g. cents).")]
CurrencyOpt = Annotated[str, typer.Option("--currency", help="ISO 4217 code, e.g. EUR.")]
FloorOpt = Annotated[float, typer.Option("--floor", help="Fraction of the price shared equally.")]
UsageWeightOpt = Annotated[
    float, typer.Option("--usage-weight", help="Weight of measured usage in the split.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")]


@product_app.command("package-dossier")
def package_dossier_command(
    dossier: Annotated[Path, typer.Argument(help="The job's dossier (JSON) from the coordinator.")],
    weights: Annotated[Path, typer.Option("--weights", help="The job's model.safetensors.")],
    output: OutputOpt,
    cert: Annotated[Path, typer.Option("--cert", help="Operator certificate (PEM).")],
    key: Annotated[Path, typer.Option("--key", help="Operator private key (PEM).")],
    ca: Annotated[Path, typer.Option("--ca", help="The deployment CA certificate (ca.pem).")],
    licence: LicenceOpt,
    price: PriceOpt,
    currency: CurrencyOpt,
    contribution: Annotated[
        Path | None,
        typer.Option(
            "--contribution",
            help='Scores JSON: {"node": score} or {"method": "...", "scores": {...}}. '
            "Default: equal scores for every node that took part.",
        ),
    ] = None,
    contribution_method: Annotated[
        str, typer.Option("--contribution-method", help="How the scores were computed.")
    ] = "",
    floor: FloorOpt = 0.05,
    usage_weight: UsageWeightOpt = 0.2,
    revenue: Annotated[
        bool, typer.Option("--revenue/--no-revenue", help="State a revenue split.")
    ] = True,
    force: ForceOpt = False,
) -> None:
    """Package a product from a dossier file: passport, operator signature, weights."""
    try:
        path = package_from_dossier(
            dossier,
            weights,
            output,
            cert=cert,
            key=key,
            ca=ca,
            licence=licence,
            price=price,
            currency=currency,
            contribution=contribution,
            contribution_method=contribution_method,
            floor=floor,
            usage_weight=usage_weight,
            revenue=revenue,
            force=force,
        )
    except (ProductError, IdentityError) as exc:
        fail(str(exc))
    out.print(f"wrote {path}", markup=False)


@product_app.command("package")
def package_command(
    job_id: Annotated[str, typer.Argument(help="The completed job to package.")],
    output: OutputOpt,
    licence: LicenceOpt,
    price: PriceOpt,
    currency: CurrencyOpt,
    validation: Annotated[
        Path | None,
        typer.Option(
            "--validation",
            help="Operator's validation data (CSV) to compute contribution scores: "
            'exact per-round Shapley for valuation.mode = "clear", leave-one-out on '
            'DP-noised coalition sums for "secure".',
        ),
    ] = None,
    label: Annotated[str, typer.Option("--label", help="Label column of --validation.")] = "",
    contribution: Annotated[
        Path | None,
        typer.Option("--contribution", help="Scores JSON instead of computing them."),
    ] = None,
    floor: FloorOpt = 0.05,
    usage_weight: UsageWeightOpt = 0.2,
    force: ForceOpt = False,
    coordinator: Annotated[
        str, typer.Option(envvar="WHARF_COORDINATOR", help="Coordinator address.")
    ] = "127.0.0.1:7443",
    cert: Annotated[
        Path | None, typer.Option(envvar="WHARF_CERT", help="Operator certificate (PEM).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(envvar="WHARF_KEY", help="Operator private key (PEM).")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option(envvar="WHARF_CA", help="Deployment CA certificate.")
    ] = None,
) -> None:
    """Package a completed job (operator role): fetch its dossier and model, score, sign."""
    import tempfile

    from wharf.job_cli import client_for

    if not (cert and key and ca):
        fail("give --cert, --key and --ca of an operator identity")
    if validation is not None and contribution is not None:
        fail("give either --validation (compute scores) or --contribution (a scores file)")
    with client_for(coordinator, cert, key, ca) as client, tempfile.TemporaryDirectory() as tmp:
        dossier = client.dossier(job_id)
        weights = Path(tmp) / "model.safetensors"
        client.download_model(job_id, weights)
        scores: Mapping[str, Any] | Path | None = contribution
        if validation is not None:
            scores = _computed_scores(client, job_id, dossier, validation, label, Path(tmp))
        try:
            path = package_from_dossier(
                dossier,
                weights,
                output,
                cert=cert,
                key=key,
                ca=ca,
                licence=licence,
                price=price,
                currency=currency,
                contribution=scores,
                floor=floor,
                usage_weight=usage_weight,
                force=force,
            )
        except (ProductError, IdentityError) as exc:
            fail(str(exc))
    out.print(f"packaged job {job_id} as {path}", markup=False)


def _computed_scores(
    client: Any, job_id: str, dossier: Mapping[str, Any], validation: Path, label: str, tmp: Path
) -> dict[str, Any]:
    """Contribution scores from the job's valuation material and the operator's validation
    data: clear-text per-round Shapley or secure leave-one-out, as the job's spec chose."""
    import numpy as np
    import pandas as pd

    from wharf import spec as spec_mod
    from wharf.valuation import clear_text_scores, secure_scores

    job = dossier["job"]
    spec = spec_mod.from_dict(job["spec"])
    if spec.valuation.mode not in ("clear", "secure"):
        fail(
            f"job {job_id} kept no valuation material (valuation.mode is "
            f"{spec.valuation.mode!r}); pass --contribution with scores computed otherwise"
        )
    if not label:
        fail("give --label, the label column of the validation CSV")
    try:
        frame = pd.read_csv(validation)
    except (OSError, ValueError) as exc:
        fail(f"cannot read validation data {validation}: {exc}")
    features = list(spec.data.features) or [c for c in frame.columns if c != label]
    missing = [c for c in [*features, label] if c not in frame.columns]
    if missing:
        fail(f"validation data lacks column(s) {', '.join(missing)}")
    x = frame[features].to_numpy(np.float32)
    y = frame[label].to_numpy(np.int64)
    path = client.download_valuation(job_id, tmp / "valuation.safetensors")
    compute = clear_text_scores if spec.valuation.mode == "clear" else secure_scores
    try:
        result = compute(path, spec, job["job_hash"], x, y)
    except ValueError as exc:
        fail(f"cannot compute contribution scores: {exc}")
    out.print(
        "contribution ("
        + result.method
        + ", "
        + result.metric
        + "): "
        + ", ".join(f"{n} {s:+.4f}" for n, s in sorted(result.scores.items())),
        markup=False,
    )
    return {"method": f"{result.method}, metric {result.metric}", "scores": result.scores}
