"""Model products: a trained model with a signed passport anyone can verify offline.

A buyer of a federated model cannot ask the data holders whether they really
agreed, and should not have to trust the seller's word for what the model is.
A product (``NAME.wharf``) therefore carries the model *and* the evidence:

* ``model.safetensors`` — the weights (safetensors: no pickle, loadable anywhere);
* ``passport.json`` — the passport: the job (its spec and canonical hash), the
  model (hash, size, architecture, tensor names and shapes), training settings
  and per-round metrics, every data holder's dataset registration certificate
  and grant **verbatim with their signatures**, the usage receipts (node-signed,
  coordinator-countersigned) and what they add up to, the secure-aggregation
  parameters, the DP guarantee, contribution scores and the revenue split, the
  operator's licence terms and price, and the coordinator's signed ledger
  entries for the job with its ledger head;
* ``passport.sig.json`` — the operator's ECDSA P-256 signature over the
  passport, with the operator's certificate.

The archive is a deterministic zip (sorted names, fixed timestamps and modes),
so the same inputs give the same bytes. ``passport.json`` is stored as
canonical JSON (:func:`wharf.identity.canonical_json`) and the signature covers
``canonical_json({"domain": "wharf.passport.v1", "passport_sha256": …})``: a
separate domain, so a passport signature can never be replayed as a record,
ledger or protocol signature made with the same key.

The operator's signature only says "the operator states this". Everything that
matters is also checked against signatures of the parties who vouch for it,
with nothing but the deployment CA certificate (:func:`verify_product`, no
network): the weights against the coordinator's ``model_stored`` entry, the
spec against the job hash that every grant binds, each grant and registration
against its node's certificate, each receipt against its node and the
coordinator's countersignature, the DP guarantee against the accountant and
the nodes' signed plans, and the revenue split against the revenue rule. The
first failure is reported with the part it concerns (``"grant of hospital-b:
…"``), so a reader knows what is wrong, not only that something is.

The coordinator ledger is one chain across all jobs; a passport carries only
this job's entries, so each entry is verified on its own (hash, signature,
coordinator certificate) and the chain links are checked where consecutive
entries are present.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
import math
import os
import re
import struct
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, NoReturn

from wharf import spec as spec_mod
from wharf.identity import Identity, IdentityError, canonical_json, peer_from_pem, verify_signature
from wharf.ledger import LEDGER_DOMAIN, Entry, cert_fingerprint, entry_hash
from wharf.records import (
    CLOCK_SKEW_S,
    Grant,
    RecordError,
    RegistrationCertificate,
    SignedRecord,
    UsageReceipt,
    certified_peer,
)

__all__ = [
    "DOSSIER_FORMAT",
    "MEMBERS",
    "PASSPORT_FORMAT",
    "ProductContents",
    "ProductError",
    "VerifyResult",
    "architecture",
    "build_passport",
    "ledger_entry_to_dict",
    "model_card_markdown",
    "package_product",
    "product_members",
    "read_product",
    "revenue_rule",
    "revenue_split",
    "revenue_usage",
    "safetensors_tensors",
    "show_product",
    "show_text",
    "sign_passport",
    "usage_summary",
    "verify_product",
    "write_product",
]

PASSPORT_FORMAT = "wharf-passport/1"
DOSSIER_FORMAT = "wharf-dossier/1"
SIGNATURE_FORMAT = "wharf-passport-signature/1"
SIGNATURE_ALGORITHM = "ECDSA-P256-SHA256"
PASSPORT_DOMAIN = "wharf.passport.v1"

PASSPORT_MEMBER = "passport.json"
SIGNATURE_MEMBER = "passport.sig.json"
WEIGHTS_MEMBER = "model.safetensors"
MEMBERS: tuple[str, ...] = (WEIGHTS_MEMBER, PASSPORT_MEMBER, SIGNATURE_MEMBER)
"""Exactly the members of a product archive, in archive (sorted) order."""

MAX_WEIGHTS_BYTES = 2 << 30
"""Largest model a product may carry (2 GiB), so a verifier's work is bounded."""
MAX_PASSPORT_BYTES = 64 << 20
MAX_SIGNATURE_BYTES = 64 << 10
_MEMBER_LIMITS = {
    WEIGHTS_MEMBER: MAX_WEIGHTS_BYTES,
    PASSPORT_MEMBER: MAX_PASSPORT_BYTES,
    SIGNATURE_MEMBER: MAX_SIGNATURE_BYTES,
}
MAX_ARCHIVE_BYTES = sum(_MEMBER_LIMITS.values()) + (1 << 20)
"""Largest archive file worth opening: the members' limits plus room for zip headers."""
MAX_SAFETENSORS_HEADER = 100 << 20
"""The safetensors library's own limit on the JSON header."""

EPSILON_REL_TOL = 1e-6
"""A stated DP epsilon must match the accountant's recomputation this closely."""
USAGE_UNIT = "samples"
"""What the revenue rule's usage counts: sample visits (rows x epochs) from the receipts."""
EQUAL_CONTRIBUTION = "equal (no contribution scores supplied)"

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_CHUNK = 1 << 20

# safetensors dtypes and their item sizes in bytes.
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_PASSPORT_KEYS = frozenset(
    {
        "format",
        "created",
        "operator",
        "job",
        "model",
        "training",
        "participants",
        "usage",
        "secure_aggregation",
        "privacy",
        "contribution",
        "revenue",
        "licence",
        "ledger",
    }
)
_ENTRY_KEYS = frozenset(
    {"entry_hash", "job_id", "kind", "payload", "prev_hash", "seq", "signature", "signer", "time"}
)
_SUMMARY_KEYS = (
    "tasks",
    "rounds",
    "rows_used",
    "epochs",
    "samples",
    "compute_seconds",
    "bytes_sent",
)


# --------------------------------------------------------------------------- errors, results


class ProductError(Exception):
    """Something about a product (or its inputs) is wrong; ``part`` names what.

    ``str(exc)`` is ``"<part>: <problem>"``, e.g. ``"grant of hospital-b: bad
    signature on grant …"``, the form in which verification failures are shown.
    """

    def __init__(self, part: str, problem: str) -> None:
        super().__init__(f"{part}: {problem}")
        self.part = part
        self.problem = problem


def _fail(part: str, problem: str) -> NoReturn:
    raise ProductError(part, problem)


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify_product`.

    ``ok`` is True only when every check passed. Otherwise ``part`` and ``problem``
    describe the first failure (``failure`` is both together). ``summary`` lists
    what was established, as far as verification got.
    """

    ok: bool
    part: str = ""
    problem: str = ""
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def failure(self) -> str:
        return f"{self.part}: {self.problem}" if not self.ok else ""

    @property
    def message(self) -> str:
        """One line: ``OK: …summary`` or the precise first failure."""
        if not self.ok:
            return self.failure
        s = self.summary
        parts = [
            f"job {s.get('job_id')} ({str(s.get('job_hash', ''))[:12]}…)",
            f"model {str(s.get('model_sha256', ''))[:12]}… ({s.get('parameters')} parameters)",
            f"signed by operator {s.get('operator')}",
            f"{len(s.get('participants', []))} data holders",
            f"{s.get('receipts')} receipts",
            f"ledger head {s.get('ledger_head_seq')} ({s.get('ledger_entries')} entries)",
            "secure aggregation" if s.get("secure_aggregation") else "no secure aggregation",
        ]
        if s.get("dp_worst_epsilon") is not None:
            parts.append(f"DP ε≤{s['dp_worst_epsilon']:.4g} recomputed")
        if s.get("revenue_recomputed"):
            parts.append(f"revenue split of {s.get('price')} recomputed")
        return "OK: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "part": self.part,
            "problem": self.problem,
            "message": self.message,
            "summary": self.summary,
        }


# --------------------------------------------------------------------------- strict readers


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _obj(value: Any, part: str, where: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(part, f"{where} must be a JSON object, got {_short(value)}")
    if keys is not None:
        want = set(keys)
        missing = sorted(want - set(value))
        extra = sorted(set(value) - want)
        if missing:
            _fail(part, f"{where} is missing {', '.join(missing)}")
        if extra:
            _fail(part, f"{where} has unexpected field(s) {', '.join(extra)}")
    return value


def _list(value: Any, part: str, where: str) -> list[Any]:
    if not isinstance(value, list):
        _fail(part, f"{where} must be a list, got {_short(value)}")
    return value


def _text(value: Any, part: str, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty):
        _fail(part, f"{where} must be a {'' if empty else 'non-empty '}string, got {_short(value)}")
    return value


def _hex64(value: Any, part: str, where: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        _fail(part, f"{where} must be a SHA-256 hex digest, got {_short(value)}")
    return value


def _int(value: Any, part: str, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(part, f"{where} must be an integer >= {minimum}, got {_short(value)}")
    return value


def _num(value: Any, part: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(part, f"{where} must be a finite number, got {_short(value)}")
    return float(value)


def _flag(value: Any, part: str, where: str) -> bool:
    if not isinstance(value, bool):
        _fail(part, f"{where} must be true or false, got {_short(value)}")
    return value


def _strict_json(data: bytes, part: str, what: str) -> Any:
    """Parse JSON refusing duplicate keys and NaN/Infinity, which canonical JSON cannot hold."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in items:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not allowed")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=pairs, parse_constant=constant)
    except (UnicodeDecodeError, ValueError) as exc:
        _fail(part, f"{what} is not valid JSON: {exc}")


def _when(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError, TypeError):
        return repr(ts)


# --------------------------------------------------------------------------- safetensors


def safetensors_tensors(header_prefix: bytes, total_size: int) -> dict[str, dict[str, Any]]:
    """``{name: {"dtype", "shape"}}`` from a safetensors file's first bytes, strictly checked.

    ``header_prefix`` must hold at least the 8-byte length and the JSON header;
    ``total_size`` is the whole file's size. The tensors' byte ranges must tile the
    data section exactly (no gaps, overlaps or trailing bytes) and match their
    dtype and shape, so a header cannot describe tensors the file does not hold.
    Reading only the header keeps verification of a 2 GiB model cheap in memory.
    Raises ValueError saying what is wrong.
    """
    if total_size < 8 or len(header_prefix) < 8:
        raise ValueError("file is too short to be safetensors")
    (n,) = struct.unpack("<Q", header_prefix[:8])
    if n == 0 or n > MAX_SAFETENSORS_HEADER or 8 + n > total_size:
        raise ValueError(f"header length {n} is out of range")
    if len(header_prefix) < 8 + n:
        raise ValueError("header is truncated")
    try:
        header = json.loads(header_prefix[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and (
        not isinstance(meta, dict) or any(not isinstance(v, str) for v in meta.values())
    ):
        raise ValueError("__metadata__ must map strings to strings")
    data_size = total_size - 8 - n
    spans: list[tuple[int, int, str]] = []
    out: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"tensor {name!r} needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPE_SIZES:
            raise ValueError(f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape
        ):
            raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise ValueError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_SIZES[dtype]:
            raise ValueError(f"tensor {name!r}: its byte range does not fit dtype and shape")
        spans.append((offsets[0], offsets[1], name))
        out[name] = {"dtype": dtype, "shape": list(shape)}
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise ValueError(f"tensor {name!r} does not start where the previous one ends")
        end = stop
    if end != data_size:
        raise ValueError(f"the tensors cover {end} of the {data_size} data bytes")
    return {name: out[name] for name in sorted(out)}


def _header_prefix(weights: bytes) -> bytes:
    if len(weights) < 8:
        return weights
    (n,) = struct.unpack("<Q", weights[:8])
    return weights[: 8 + min(n, MAX_SAFETENSORS_HEADER)]


# --------------------------------------------------------------------------- model


def architecture(
    spec: spec_mod.JobSpec, tensors: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """What the model is, derived from the spec (and, for the input shape only, the weights).

    The input shape comes from ``model.input_shape`` if the spec sets it, else from
    the number of ``data.features``, else from the model's own standardisation
    buffer (every built-in model starts with one), which is how the coordinator
    learnt it from the nodes' dataset metadata.
    """
    m = spec.model
    if m.input_shape:
        shape, source = list(m.input_shape), "spec"
    elif spec.data.features:
        shape, source = [len(spec.data.features)], "features"
    elif "standardize.mean" in tensors:
        shape, source = list(tensors["standardize.mean"]["shape"]), "weights"
    else:
        shape, source = [], "unknown"
    return {
        "kind": m.kind,
        "num_classes": m.num_classes,
        "hidden": list(m.hidden) if m.kind == "mlp" else [],
        "input_shape": shape,
        "input_shape_source": source,
        "standardize": m.standardize,
        "bundle_sha256": spec.bundle.sha256 if spec.uses_bundle else "",
    }


def _expected_tensors(arch: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """Tensor names and shapes of the built-in model ``arch`` describes (None for bundles).

    Built on the ``meta`` device: nothing is allocated and no weights are drawn.
    """
    if arch["kind"] == "bundle":
        return None
    import torch

    from wharf.algorithms import models

    options = {"hidden": list(arch["hidden"])} if arch["kind"] == "mlp" else {}
    with torch.device("meta"):
        net = models.build_model(
            arch["kind"], tuple(arch["input_shape"]), int(arch["num_classes"]), options
        )
    return {k: list(v.shape) for k, v in sorted(net.state_dict().items())}


# --------------------------------------------------------------------------- records


def _signed(raw: Any, part: str) -> SignedRecord:
    try:
        return SignedRecord.from_dict(raw)
    except RecordError as exc:
        _fail(part, f"malformed signed record: {exc}")


def _as_of(signed: SignedRecord) -> float:
    """Verify an archived record as of when it was issued.

    A grant expires and a certificate is renewed; evidence must stay checkable
    years later, so expiry is judged at the record's own ``issued_at`` (the
    certificate's validity is judged there too) and the time of use is checked
    separately (a receipt must fall before its grant's expiry).
    """
    issued = signed.body.get("issued_at")
    if isinstance(issued, int | float) and not isinstance(issued, bool) and math.isfinite(issued):
        return float(issued)
    return time.time()


def usage_summary(receipts: Sequence[UsageReceipt]) -> dict[str, dict[str, Any]]:
    """Per node: tasks, rounds, rows used, epochs, sample visits, compute seconds and bytes.

    ``compute_seconds`` is summed with :func:`math.fsum`, which is exact to the last
    bit whatever the order, so a verifier's sum equals the packager's.
    """
    by_node: dict[str, list[UsageReceipt]] = {}
    for r in receipts:
        by_node.setdefault(r.node, []).append(r)
    return {
        node: {
            "tasks": len(rs),
            "rounds": sorted({r.round for r in rs}),
            "rows_used": sum(r.rows_used for r in rs),
            "epochs": sum(r.epochs for r in rs),
            "samples": sum(r.samples for r in rs),
            "compute_seconds": math.fsum(r.compute_seconds for r in rs),
            "bytes_sent": sum(r.bytes_sent for r in rs),
        }
        for node, rs in sorted(by_node.items())
    }


def ledger_entry_to_dict(entry: Entry) -> dict[str, Any]:
    """An entry in the dossier's form: :meth:`Entry.to_dict` plus ``signer_cert_pem``.

    :meth:`Entry.to_dict` names the signer certificate by fingerprint only (the
    JSONL export carries a certificate table); a dossier's entries carry the PEM
    so they verify on their own.
    """
    return {**entry.to_dict(), "signer_cert_pem": entry.signer_cert_pem.decode("ascii")}


# --------------------------------------------------------------------------- revenue


def _revenue_module() -> Any:
    """``wharf.algorithms.revenue``, imported only when a split is computed or checked."""
    try:
        return importlib.import_module("wharf.algorithms.revenue")
    except ImportError as exc:
        _fail(
            "revenue", f"cannot compute the split: wharf.algorithms.revenue is unavailable ({exc})"
        )


def revenue_rule(
    price_minor_units: int, currency: str, floor_fraction: float, usage_weight: float
) -> dict[str, Any]:
    """The rule's wire form, made by ``RevenueRule.to_dict`` (so its fields and version
    are the revenue module's, not a copy of them here)."""
    mod = _revenue_module()
    try:
        rule = mod.RevenueRule(
            total_minor_units=price_minor_units,
            currency=currency,
            floor_fraction=floor_fraction,
            usage_weight=usage_weight,
        )
    except (TypeError, ValueError) as exc:
        _fail("revenue", f"invalid revenue rule: {exc}")
    return dict(rule.to_dict())


def revenue_usage(
    summary: Mapping[str, Mapping[str, Any]], scores: Mapping[str, float]
) -> dict[str, int]:
    """Usage the split weighs: each scored node's sample visits from its receipts.

    The split is over the scored nodes (scores and usage must name the same
    nodes); a verifier separately requires every node whose data was used to be
    among them, so nobody whose data went into the model is left out.
    """
    return {n: int(summary.get(n, {}).get("samples", 0)) for n in sorted(scores)}


def revenue_split(
    rule: Mapping[str, Any], scores: Mapping[str, float], usage: Mapping[str, int]
) -> dict[str, int]:
    """The split of ``rule`` by ``wharf.algorithms.revenue.split`` (the one implementation
    both the packager and every verifier run, so their numbers agree)."""
    mod = _revenue_module()
    try:
        shares = mod.split(mod.RevenueRule.from_dict(dict(rule)), dict(scores), dict(usage))
    except (TypeError, ValueError, KeyError) as exc:
        _fail("revenue", f"the revenue rule cannot be applied: {exc}")
    return {str(k): int(v) for k, v in sorted(shares.items())}


# --------------------------------------------------------------------------- building


def _dossier_job(dossier: Mapping[str, Any]) -> tuple[dict[str, Any], spec_mod.JobSpec]:
    if not isinstance(dossier, Mapping):
        _fail("dossier", "must be a JSON object")
    if dossier.get("format") != DOSSIER_FORMAT:
        _fail("dossier", f"format must be {DOSSIER_FORMAT!r}, got {_short(dossier.get('format'))}")
    job = _obj(dossier.get("job"), "dossier", "job")
    if job.get("state") != "completed":
        _fail("dossier", f"job is {job.get('state')!r}; only a completed job can be packaged")
    try:
        spec = spec_mod.from_dict(_obj(job.get("spec"), "dossier", "job.spec"))
    except spec_mod.SpecError as exc:
        _fail("dossier", f"job.spec is invalid: {exc}")
    return dict(job), spec


def _dossier_receipts(dossier: Mapping[str, Any]) -> list[UsageReceipt]:
    """The dossier's receipts, parsed (not verified: the finished product is)."""
    out = []
    for i, raw in enumerate(_list(dossier.get("receipts", []), "dossier", "receipts"), start=1):
        try:
            out.append(UsageReceipt.from_record(SignedRecord.from_dict(raw)))
        except RecordError as exc:
            _fail("dossier", f"receipt {i} is malformed: {exc}")
    return out


def build_passport(
    dossier: Mapping[str, Any],
    *,
    weights: bytes,
    licence: str,
    price_minor_units: int,
    currency: str,
    contribution: Mapping[str, float] | None,
    contribution_method: str,
    revenue_rule: Mapping[str, Any] | None,
    revenue: Mapping[str, int] | None,
    operator_name: str,
    now: float | None = None,
) -> dict[str, Any]:
    """The (unsigned) passport of a completed job's model, from the coordinator's dossier.

    Records are embedded verbatim, so their own signatures keep proving who said
    what; derived sections (architecture, tensors, usage summary) are computed here
    the same way :func:`verify_product` recomputes them. Obvious mismatches (weights
    that are not the job's model, a job that did not complete) are refused here;
    :func:`package_product` also verifies the finished product before writing it.
    """
    job, spec = _dossier_job(dossier)
    model = _obj(job.get("model"), "dossier", "job.model")
    sha = hashlib.sha256(weights).hexdigest()
    if sha != model.get("sha256"):
        _fail(
            "weights",
            f"SHA-256 {sha} is not the job's model {model.get('sha256')} (wrong weights file?)",
        )
    if len(weights) > MAX_WEIGHTS_BYTES:
        _fail("weights", f"{len(weights)} bytes exceed the {MAX_WEIGHTS_BYTES}-byte limit")
    try:
        tensors = safetensors_tensors(_header_prefix(weights), len(weights))
    except ValueError as exc:
        _fail("weights", f"not a valid safetensors file: {exc}")
    if not isinstance(licence, str) or not licence.strip():
        _fail("licence", "licence terms must be non-empty text")
    if isinstance(price_minor_units, bool) or not isinstance(price_minor_units, int):
        _fail("licence", "price must be a whole number of minor units (e.g. cents)")
    if price_minor_units < 0:
        _fail("licence", "price must not be negative")
    if not isinstance(currency, str) or not _CURRENCY.fullmatch(currency):
        _fail("licence", f"currency must be an ISO 4217 code such as EUR, got {currency!r}")

    participants: dict[str, Any] = {}
    raw_participants = _obj(dossier.get("participants"), "dossier", "participants")
    for node in sorted(raw_participants):
        p = _obj(raw_participants[node], "dossier", f"participants[{node!r}]")
        if not p.get("grant"):
            _fail("dossier", f"participant {node!r} has no grant")
        participants[node] = {
            "dataset": spec.data.dataset,
            "registration": p.get("registration"),
            "grant": p["grant"],
        }
    receipts_raw = _list(dossier.get("receipts", []), "dossier", "receipts")
    summary = usage_summary(_dossier_receipts(dossier))

    contribution_section = None
    scores: dict[str, float] | None = None
    if contribution is not None:
        if not contribution_method:
            _fail("contribution", "say how the scores were computed (contribution method)")
        scores = {str(k): float(v) for k, v in sorted(contribution.items())}
        contribution_section = {"method": contribution_method, "scores": scores}
    revenue_section = None
    if revenue_rule is not None or revenue is not None:
        if revenue_rule is None or revenue is None:
            _fail("revenue", "give both the revenue rule and the resulting shares")
        if scores is None:
            _fail("revenue", "a revenue split needs contribution scores")
        revenue_section = {
            "rule": dict(revenue_rule),
            "usage_unit": USAGE_UNIT,
            "usage": revenue_usage(summary, scores),
            "shares": {str(k): int(v) for k, v in sorted(revenue.items())},
        }

    ledger = _obj(dossier.get("ledger"), "dossier", "ledger", ("entries", "head"))
    certs: dict[str, str] = {}
    entries: list[dict[str, Any]] = []
    for raw in _list(ledger["entries"], "dossier", "ledger.entries"):
        e = dict(_obj(raw, "dossier", "ledger entry"))
        pem = e.pop("signer_cert_pem", None)
        if isinstance(pem, str) and pem:
            fp = cert_fingerprint(pem.encode("ascii"))
            if e.get("signer") not in (None, fp):
                _fail("dossier", f"ledger entry {e.get('seq')}: signer_cert_pem is not its signer")
            e["signer"] = fp
            certs[fp] = pem
        entries.append(e)
    head = _obj(ledger["head"], "dossier", "ledger.head", ("seq", "hash"))

    created = time.time() if now is None else float(now)
    return {
        "format": PASSPORT_FORMAT,
        "created": created,
        "operator": {"name": operator_name, "role": "operator"},
        "job": {
            k: job.get(k)
            for k in (
                "job_id",
                "name",
                "owner",
                "job_hash",
                "state",
                "created",
                "updated",
                "rounds_completed",
            )
        }
        | {"spec": spec.to_dict()},
        "model": {
            "sha256": sha,
            "size": len(weights),
            "format": "safetensors",
            "architecture": architecture(spec, tensors),
            "tensors": tensors,
            "parameters": sum(math.prod(t["shape"]) for t in tensors.values()),
        },
        "training": {
            "settings": {
                "training": spec.to_dict()["training"],
                "federation": spec.to_dict()["federation"],
            },
            "rounds": list(_list(dossier.get("rounds", []), "dossier", "rounds")),
        },
        "participants": participants,
        "usage": {"summary": summary, "receipts": list(receipts_raw)},
        "secure_aggregation": dict(
            _obj(dossier.get("secure_aggregation"), "dossier", "secure_aggregation")
        ),
        "privacy": dossier.get("privacy"),
        "contribution": contribution_section,
        "revenue": revenue_section,
        "licence": {
            "terms": licence,
            "price_minor_units": price_minor_units,
            "currency": currency,
        },
        "ledger": {"head": dict(head), "certs": certs, "entries": entries},
    }


def _passport_message(passport_json: bytes) -> bytes:
    digest = hashlib.sha256(passport_json).hexdigest()
    return canonical_json({"domain": PASSPORT_DOMAIN, "passport_sha256": digest})


def sign_passport(passport: Mapping[str, Any], identity: Identity) -> dict[str, Any]:
    """The operator's signature envelope over the canonical passport.

    Only an ``operator`` may sign: a product is a market offer, and the role that
    sets licence and price is the one accountable for it. The passport must name
    the signing operator.
    """
    try:
        peer = peer_from_pem(identity.cert_pem, identity.ca_pem)
    except IdentityError as exc:
        _fail("operator", f"identity is not valid: {exc}")
    if peer.role != "operator":
        _fail(
            "operator",
            f"only an operator may package a product; {peer.name!r} is a {peer.role} "
            "(use an operator certificate, e.g. `wharf ca issue NAME --role operator`)",
        )
    named = passport.get("operator", {})
    if not isinstance(named, Mapping) or named.get("name") != peer.name:
        _fail("operator", f"the passport names operator {named!r}, but {peer.name!r} signs it")
    message = _passport_message(canonical_json(passport))
    return {
        "format": SIGNATURE_FORMAT,
        "algorithm": SIGNATURE_ALGORITHM,
        "signer_cert_pem": identity.cert_pem.decode("ascii"),
        "signature": base64.b64encode(identity.signer().sign(message)).decode("ascii"),
    }


def _write_zip(fh: BinaryIO, members: Mapping[str, bytes]) -> None:
    """A deterministic zip: sorted names, fixed date, mode 0644, Unix creator."""
    with zipfile.ZipFile(fh, "w") as zf:
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            # Weights barely compress and are large: store them, so they can be read
            # (or memory-mapped) straight out of the archive.
            info.compress_type = (
                zipfile.ZIP_STORED if name == WEIGHTS_MEMBER else zipfile.ZIP_DEFLATED
            )
            zf.writestr(info, members[name], compresslevel=9 if name != WEIGHTS_MEMBER else None)


def product_members(
    passport: Mapping[str, Any], signature_envelope: Mapping[str, Any], weights: bytes
) -> dict[str, bytes]:
    """The three members' bytes, exactly as they are stored."""
    return {
        PASSPORT_MEMBER: canonical_json(passport),
        SIGNATURE_MEMBER: canonical_json(signature_envelope),
        WEIGHTS_MEMBER: bytes(weights),
    }


def write_product(
    path: Path,
    passport: Mapping[str, Any],
    signature_envelope: Mapping[str, Any],
    weights: bytes,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``NAME.wharf``; refuse to replace an existing file unless ``overwrite``.

    The file appears atomically (written beside the target, then linked or
    renamed into place), so a reader never sees half a product.
    """
    path = Path(path)
    members = product_members(passport, signature_envelope, weights)
    if not overwrite and (path.exists() or path.is_symlink()):
        _fail("output", f"{path} already exists; refusing to overwrite it (use --force)")
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        _fail("output", f"cannot write in {path.parent}: {exc.strerror or exc}")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o644)
            _write_zip(fh, members)  # straight to disk: a large model is not copied again
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if the target appeared meanwhile: no clobbering
            except FileExistsError:
                _fail("output", f"{path} already exists; refusing to overwrite it (use --force)")
            except OSError:  # a filesystem without hard links
                if path.exists():
                    _fail("output", f"{path} already exists; refusing to overwrite it")
                os.replace(tmp, path)
    except OSError as exc:
        _fail("output", f"cannot write {path}: {exc.strerror or exc}")
    finally:
        tmp.unlink(missing_ok=True)
    return path


def package_product(
    dossier: Mapping[str, Any],
    weights: bytes,
    out: Path,
    identity: Identity,
    *,
    licence: str,
    price_minor_units: int,
    currency: str,
    contribution: Mapping[str, float] | None = None,
    contribution_method: str = "",
    floor_fraction: float = 0.05,
    usage_weight: float = 0.2,
    with_revenue: bool = True,
    overwrite: bool = False,
    now: float | None = None,
) -> Path:
    """Build, sign, self-verify and write a product; return its path.

    The revenue rule (:func:`revenue_rule`: the price, currency, floor fraction and
    usage weight) is split over the contribution scores and the scored nodes'
    sample visits from the receipts. Without scores, every node that took part in
    a round scores 1.0 and the method says so. The product is verified against the
    operator's own CA before it is written: an operator never signs evidence a
    buyer would reject.
    """
    if identity.role != "operator":
        _fail(
            "operator",
            f"only an operator may package a product; {identity.name!r} is a {identity.role}",
        )
    job, _spec = _dossier_job(dossier)
    scores = dict(contribution) if contribution is not None else None
    method = contribution_method
    rule: dict[str, Any] | None = None
    shares: dict[str, int] | None = None
    if with_revenue:
        if scores is None:
            rounds = dossier.get("rounds") or []
            took_part = sorted(
                {n for r in rounds if isinstance(r, dict) for n in r.get("nodes", [])}
            )
            scores = dict.fromkeys(took_part or sorted(dossier.get("participants", {})), 1.0)
            method = EQUAL_CONTRIBUTION
        rule = revenue_rule(price_minor_units, currency, floor_fraction, usage_weight)
        summary = usage_summary(_dossier_receipts(dossier))
        shares = revenue_split(rule, scores, revenue_usage(summary, scores))
    passport = build_passport(
        dossier,
        weights=weights,
        licence=licence,
        price_minor_units=price_minor_units,
        currency=currency,
        contribution=scores,
        contribution_method=method or "supplied by the operator",
        revenue_rule=rule,
        revenue=shares,
        operator_name=identity.name,
        now=now,
    )
    envelope = sign_passport(passport, identity)
    members = product_members(passport, envelope, weights)
    result = _Verifier(_contents_from_members(members), identity.ca_pem, now=now).run()
    if not result.ok:
        _fail(
            result.part,
            f"{result.problem} (refusing to sign a product that does not verify; job "
            f"{job.get('job_id')})",
        )
    return write_product(Path(out), passport, envelope, weights, overwrite=overwrite)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ProductContents:
    """A product archive's members, structurally checked but **not** verified.

    The weights are summarised (hash, size, header) rather than held, so a 2 GiB
    model is streamed through once and never kept in memory.
    """

    passport_bytes: bytes
    signature_bytes: bytes
    weights_sha256: str
    weights_size: int
    weights_header: bytes

    @property
    def passport(self) -> dict[str, Any]:
        """The passport object (ProductError if it is not a JSON object)."""
        return _obj(
            _strict_json(self.passport_bytes, "passport", PASSPORT_MEMBER), "passport", "passport"
        )


def _contents_from_members(members: Mapping[str, bytes]) -> ProductContents:
    weights = members[WEIGHTS_MEMBER]
    return ProductContents(
        passport_bytes=members[PASSPORT_MEMBER],
        signature_bytes=members[SIGNATURE_MEMBER],
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        weights_size=len(weights),
        weights_header=_header_prefix(weights),
    )


def _unsafe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return (
        name.startswith(("/", "\\"))
        or "\\" in name
        or ".." in p.parts
        or (len(name) > 1 and name[1] == ":")
        or "\x00" in name
    )


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Iterator[bytes]:
    """Stream a member, never yielding more than its declared (already bounded) size.

    zipfile stops at the declared size and checks the CRC at the end; a member
    that inflates beyond its declared size (a zip bomb) is cut off and fails the CRC.
    """
    limit = info.file_size
    seen = 0
    with zf.open(info) as fh:
        while chunk := fh.read(_CHUNK):
            seen += len(chunk)
            if seen > limit:
                _fail("archive", f"member {info.filename} expands beyond its declared size")
            yield chunk


def read_product(path: Path) -> ProductContents:
    """Open ``NAME.wharf`` and check it is a well-formed product archive (no signatures checked).

    Exactly the three expected members, each once, plain names only, stored or
    deflated, not encrypted, within their size limits and intact (CRC).
    Raises :class:`ProductError` with part ``archive``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        _fail("archive", f"{path} not found")
    except OSError as exc:
        _fail("archive", f"cannot read {path}: {exc.strerror or exc}")
    if not path.is_file():
        _fail("archive", f"{path} is not a file")
    if size > MAX_ARCHIVE_BYTES:
        _fail("archive", f"{size} bytes exceed the {MAX_ARCHIVE_BYTES}-byte limit of a product")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        _fail("archive", f"not a zip archive: {exc}")
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        for name in names:
            if _unsafe_name(name):
                _fail("archive", f"member name {name!r} is not a plain file name")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            _fail("archive", f"member {dupes[0]} appears more than once")
        extra = sorted(set(names) - set(MEMBERS))
        if extra:
            _fail("archive", f"unexpected member {extra[0]!r} (a product holds only {MEMBERS})")
        missing = [m for m in MEMBERS if m not in names]
        if missing:
            _fail("archive", f"missing member {missing[0]}")
        for info in infos:
            if info.flag_bits & 0x1:
                _fail("archive", f"member {info.filename} is encrypted")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                _fail("archive", f"member {info.filename} uses an unsupported compression")
            if info.file_size > _MEMBER_LIMITS[info.filename]:
                _fail(
                    "archive",
                    f"member {info.filename} declares {info.file_size} bytes, above its "
                    f"{_MEMBER_LIMITS[info.filename]}-byte limit",
                )
        try:
            small = {
                n: b"".join(_read_member(zf, zf.getinfo(n)))
                for n in (PASSPORT_MEMBER, SIGNATURE_MEMBER)
            }
            digest, total, head = hashlib.sha256(), 0, bytearray()
            want = 8  # the length field first, then the JSON header it announces
            for chunk in _read_member(zf, zf.getinfo(WEIGHTS_MEMBER)):
                digest.update(chunk)
                # While len(head) < want, head holds every byte before this chunk.
                head += chunk[: max(0, want - total)]
                if want == 8 and len(head) >= 8:
                    (n,) = struct.unpack("<Q", bytes(head[:8]))
                    want = 8 + min(n, MAX_SAFETENSORS_HEADER)
                    head += chunk[len(head) - total : want - total]
                total += len(chunk)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as exc:
            _fail("archive", f"a member is corrupt: {exc}")
        except (RuntimeError, NotImplementedError) as exc:
            _fail("archive", f"a member cannot be read: {exc}")
    return ProductContents(
        passport_bytes=small[PASSPORT_MEMBER],
        signature_bytes=small[SIGNATURE_MEMBER],
        weights_sha256=digest.hexdigest(),
        weights_size=total,
        weights_header=bytes(head),
    )


# --------------------------------------------------------------------------- verification


class _Verifier:
    """Runs the checks in order; the first failure ends verification.

    Order (most precise first): archive → passport signature (operator, CA, time) →
    passport structure → job hash over the spec → weights hash → weights vs the
    architecture → registrations, grants, receipts, usage summary, rounds → ledger
    entries and what the ledger attests (job hash, model hash, grants, rounds) →
    DP guarantee → contribution, licence and revenue split. The spec is checked
    before the weights' architecture because the architecture is read from it.
    """

    def __init__(
        self, contents: ProductContents, ca_pem: bytes | str, *, now: float | None = None
    ) -> None:
        self.c = contents
        self.ca = ca_pem.encode("ascii") if isinstance(ca_pem, str) else bytes(ca_pem)
        self.now = time.time() if now is None else now
        self.part = "passport"
        self.summary: dict[str, Any] = {}
        self.p: dict[str, Any] = {}
        self.grants: dict[str, Grant] = {}
        self.signed_grants: dict[str, SignedRecord] = {}
        self.receipts: list[UsageReceipt] = []
        self.countersigners: set[str] = set()

    def run(self) -> VerifyResult:
        try:
            for step in (
                self.signature,
                self.structure,
                self.job,
                self.weights,
                self.model,
                self.participants,
                self.receipts_and_usage,
                self.rounds,
                self.secure_aggregation,
                self.ledger,
                self.privacy,
                self.revenue,
            ):
                step()
        except ProductError as exc:
            return VerifyResult(False, exc.part, exc.problem, self.summary)
        except Exception as exc:  # hostile input must give a failure, never a crash
            return VerifyResult(
                False, self.part, f"malformed ({type(exc).__name__}: {exc})", self.summary
            )
        return VerifyResult(True, summary=self.summary)

    # -- 2. operator signature ------------------------------------------------------
    def signature(self) -> None:
        self.part = "passport"
        raw = self.c.passport_bytes
        passport = self.c.passport
        if canonical_json(passport) != raw:
            _fail("passport", f"{PASSPORT_MEMBER} is not in canonical JSON form")
        self.p = passport
        self.part = part = "passport signature"
        env = _obj(
            _strict_json(self.c.signature_bytes, part, SIGNATURE_MEMBER),
            part,
            SIGNATURE_MEMBER,
            ("format", "algorithm", "signer_cert_pem", "signature"),
        )
        if env["format"] != SIGNATURE_FORMAT:
            _fail(part, f"format must be {SIGNATURE_FORMAT!r}, got {_short(env['format'])}")
        if env["algorithm"] != SIGNATURE_ALGORITHM:
            _fail(part, f"algorithm {_short(env['algorithm'])} is not {SIGNATURE_ALGORITHM}")
        pem = _text(env["signer_cert_pem"], part, "signer_cert_pem").encode("ascii", "replace")
        try:
            sig = base64.b64decode(_text(env["signature"], part, "signature"), validate=True)
        except (binascii.Error, ValueError):
            _fail(part, "signature is not valid base64")
        created = _num(passport.get("created"), "passport", "created")
        try:
            peer = certified_peer(pem, self.ca, created)
        except RecordError as exc:
            _fail(part, f"operator certificate: {exc}")
        if peer.role != "operator":
            _fail(part, f"signed by {peer.role} {peer.name!r}; only an operator may sign")
        if not verify_signature(pem, _passport_message(raw), sig):
            _fail(
                part,
                f"the signature by {peer.name!r} does not verify over {PASSPORT_MEMBER} "
                "(the passport or its signature was altered)",
            )
        if created > self.now + CLOCK_SKEW_S:
            _fail(part, f"the passport claims to be created in the future ({_when(created)})")
        operator = passport.get("operator")
        if not isinstance(operator, dict) or operator.get("name") != peer.name:
            _fail(part, f"the passport names operator {_short(operator)}, signed by {peer.name!r}")
        self.summary.update(operator=peer.name, created=created)

    # -- passport structure -----------------------------------------------------------
    def structure(self) -> None:
        self.part = "passport"
        _obj(self.p, "passport", "passport", _PASSPORT_KEYS)
        if self.p["format"] != PASSPORT_FORMAT:
            _fail("passport", f"format {_short(self.p['format'])} is not {PASSPORT_FORMAT!r}")
        _obj(self.p["operator"], "passport", "operator", ("name", "role"))
        if self.p["operator"]["role"] != "operator":
            _fail("passport", "operator.role must be 'operator'")

    # -- 4. job hash ------------------------------------------------------------------
    def job(self) -> None:
        self.part = part = "job"
        job = _obj(
            self.p["job"],
            part,
            "job",
            (
                "job_id",
                "name",
                "owner",
                "job_hash",
                "state",
                "created",
                "updated",
                "rounds_completed",
                "spec",
            ),
        )
        self.job_id = _text(job["job_id"], part, "job_id")
        self.job_hash = _hex64(job["job_hash"], part, "job_hash")
        self.owner = _text(job["owner"], part, "owner")
        if job["state"] != "completed":
            _fail(part, f"state is {_short(job['state'])}, not 'completed'")
        _int(job["rounds_completed"], part, "rounds_completed")
        try:
            self.spec = spec_mod.from_dict(_obj(job["spec"], part, "spec"))
        except spec_mod.SpecError as exc:
            _fail(part, f"the embedded spec is invalid: {exc}")
        actual = self.spec.job_hash()
        if actual != self.job_hash:
            _fail(
                part,
                f"the embedded spec hashes to {actual}, not the stated job hash {self.job_hash} "
                "(the spec was altered)",
            )
        if job["name"] != self.spec.name:
            _fail(part, f"name {_short(job['name'])} is not the spec's {self.spec.name!r}")
        self.summary.update(job_id=self.job_id, job_hash=self.job_hash, job_name=self.spec.name)

    # -- 3. weights -------------------------------------------------------------------
    def weights(self) -> None:
        self.part = part = "weights"
        m = _obj(
            self.p["model"],
            "model",
            "model",
            ("sha256", "size", "format", "architecture", "tensors", "parameters"),
        )
        stated = _hex64(m["sha256"], "model", "sha256")
        if self.c.weights_sha256 != stated:
            _fail(
                part,
                f"SHA-256 of {WEIGHTS_MEMBER} is {self.c.weights_sha256}, which does not match "
                f"the passport's model hash {stated} (the weights were altered or replaced)",
            )
        if self.c.weights_size != _int(m["size"], "model", "size"):
            _fail(part, f"{self.c.weights_size} bytes, the passport states {m['size']}")
        self.model_sha = stated
        self.summary.update(model_sha256=stated, model_size=self.c.weights_size)

    def model(self) -> None:
        self.part = part = "model"
        m = self.p["model"]
        if m["format"] != "safetensors":
            _fail(part, f"format {_short(m['format'])} is not 'safetensors'")
        try:
            tensors = safetensors_tensors(self.c.weights_header, self.c.weights_size)
        except ValueError as exc:
            _fail("weights", f"{WEIGHTS_MEMBER} is not a valid safetensors file: {exc}")
        if m["tensors"] != tensors:
            diff = _first_difference(m["tensors"], tensors)
            _fail(part, f"the stated tensors differ from the weights' header: {diff}")
        arch = architecture(self.spec, tensors)
        if m["architecture"] != arch:
            diff = _first_difference(m["architecture"], arch)
            _fail(part, f"the stated architecture differs from the spec's: {diff}")
        params = sum(math.prod(t["shape"]) for t in tensors.values())
        if m["parameters"] != params:
            _fail(part, f"states {_short(m['parameters'])} parameters, the weights hold {params}")
        try:
            expected = _expected_tensors(arch)
        except ValueError as exc:
            _fail(part, f"the stated architecture cannot be built: {exc}")
        if expected is not None:
            got = {k: v["shape"] for k, v in tensors.items()}
            if got != expected:
                _fail(
                    part,
                    f"the weights do not fit a {arch['kind']} model with hidden "
                    f"{arch['hidden']} on input {arch['input_shape']} and "
                    f"{arch['num_classes']} classes: {_first_difference(got, expected)}",
                )
            odd = sorted(k for k, v in tensors.items() if v["dtype"] != "F32")
            if odd:
                _fail(part, f"tensor {odd[0]!r} is {tensors[odd[0]]['dtype']}, not F32")
        self.summary.update(parameters=params, architecture=arch["kind"])

    # -- 5. records -------------------------------------------------------------------
    def participants(self) -> None:
        self.part = "participants"
        participants = _obj(self.p["participants"], "participants", "participants")
        if not participants:
            _fail("participants", "the passport names no data holder")
        spec = self.spec
        dataset = spec.data.dataset
        for node in sorted(participants):
            entry = _obj(
                participants[node],
                "participants",
                f"participant {node!r}",
                ("dataset", "registration", "grant"),
            )
            if entry["dataset"] != dataset:
                _fail(
                    "participants",
                    f"{node} is listed with dataset {_short(entry['dataset'])}, the job "
                    f"uses {dataset!r}",
                )
            reg: RegistrationCertificate | None = None
            if entry["registration"] is not None:
                self.part = part = f"registration of {node}"
                signed_reg = _signed(entry["registration"], part)
                try:
                    reg = RegistrationCertificate.verified(
                        signed_reg, self.ca, expect_name=node, now=_as_of(signed_reg)
                    )
                except RecordError as exc:
                    _fail(part, str(exc))
                if reg.dataset != dataset:
                    _fail(part, f"certifies dataset {reg.dataset!r}, the job uses {dataset!r}")
            self.part = part = f"grant of {node}"
            signed = _signed(entry["grant"], part)
            try:
                grant = Grant.verified(signed, self.ca, expect_name=node, now=_as_of(signed))
            except RecordError as exc:
                _fail(part, str(exc))
            if grant.job_id != self.job_id:
                _fail(part, f"is for job {grant.job_id!r}, not {self.job_id!r}")
            if grant.job_hash != self.job_hash:
                _fail(
                    part,
                    f"binds job hash {grant.job_hash}, not this job's {self.job_hash} "
                    "(the node authorised a different spec)",
                )
            if dataset not in grant.datasets:
                _fail(part, f"grants dataset(s) {', '.join(grant.datasets)}, not {dataset!r}")
            if grant.purpose != spec.purpose:
                _fail(part, f"grants purpose {grant.purpose!r}, the job's is {spec.purpose!r}")
            if grant.requester != self.owner:
                _fail(part, f"was given to {grant.requester!r}, the job's owner is {self.owner!r}")
            missing = sorted(set(spec.data.features) - set(grant.columns))
            if missing:
                _fail(part, f"does not grant column(s) {', '.join(missing)} the job uses")
            if grant.protections.secure_aggregation and not spec.federation.secure:
                _fail(part, "requires secure aggregation, but the job ran without it")
            if reg is not None:
                unknown = sorted(set(grant.columns) - set(reg.columns))
                if unknown:
                    _fail(part, f"grants column(s) {', '.join(unknown)} not in the registration")
                banned = sorted(set(grant.columns) & set(reg.prohibited_columns))
                if banned:
                    _fail(part, f"grants prohibited column(s) {', '.join(banned)}")
                if reg.allowed_purposes and grant.purpose not in reg.allowed_purposes:
                    _fail(part, f"purpose {grant.purpose!r} is not allowed for the dataset")
            self.grants[node] = grant
            self.signed_grants[node] = signed
        self.summary["participants"] = sorted(self.grants)

    def receipts_and_usage(self) -> None:
        self.part = "usage"
        usage = _obj(self.p["usage"], "usage", "usage", ("summary", "receipts"))
        seen: set[str] = set()
        samples: dict[str, int] = {}
        for i, raw in enumerate(_list(usage["receipts"], "usage", "receipts"), start=1):
            body = raw.get("body") if isinstance(raw, dict) else None
            body = body if isinstance(body, dict) else {}
            self.part = part = (
                f"receipt {i} ({body.get('node', '?')}, round {body.get('round', '?')})"
            )
            signed = _signed(raw, part)
            try:
                r = UsageReceipt.verified(signed, self.ca, now=_as_of(signed))
                peers = signed.verify_countersignatures(self.ca, expect_role="coordinator")
            except RecordError as exc:
                _fail(part, str(exc))
            self.countersigners.update(p.name for p in peers if p.role == "coordinator")
            if r.job_id != self.job_id:
                _fail(part, f"is for job {r.job_id!r}, not {self.job_id!r}")
            grant = self.grants.get(r.node)
            if grant is None:
                _fail(part, f"{r.node} has no grant in the passport")
            if r.grant_id != grant.grant_id:
                _fail(part, f"cites grant {r.grant_id}, not {r.node}'s grant {grant.grant_id}")
            if r.receipt_id in seen:
                _fail(part, f"receipt {r.receipt_id} appears twice")
            seen.add(r.receipt_id)
            if r.issued_at > grant.expires_at + CLOCK_SKEW_S:
                _fail(part, f"was issued after the grant expired ({_when(grant.expires_at)})")
            if r.round > grant.quotas.rounds:
                _fail(part, f"round {r.round} is beyond the {grant.quotas.rounds} granted")
            if r.epochs > grant.quotas.epochs:
                _fail(part, f"{r.epochs} epochs exceed the granted {grant.quotas.epochs}")
            samples[r.node] = samples.get(r.node, 0) + r.samples
            if samples[r.node] > grant.quotas.samples:
                _fail(
                    part,
                    f"{r.node}'s receipts reach {samples[r.node]} samples, above the "
                    f"{grant.quotas.samples} granted",
                )
            self.receipts.append(r)
        self.part = "usage"
        expected = usage_summary(self.receipts)
        stated = _obj(usage["summary"], "usage", "summary")
        if stated != expected:
            _fail(
                "usage",
                "the stated summary differs from what the receipts add up to: "
                + _first_difference(stated, expected),
            )
        self.usage_samples = {n: expected.get(n, {}).get("samples", 0) for n in sorted(self.grants)}
        self.summary["receipts"] = len(self.receipts)

    def rounds(self) -> None:
        self.part = part = "training"
        t = _obj(self.p["training"], part, "training", ("settings", "rounds"))
        d = self.spec.to_dict()
        want = {"training": d["training"], "federation": d["federation"]}
        if t["settings"] != want:
            _fail(
                part,
                f"stated settings differ from the spec: {_first_difference(t['settings'], want)}",
            )
        self.round_nodes: dict[int, set[str]] = {}
        self.round_metrics: dict[int, dict[str, Any]] = {}
        for i, raw in enumerate(_list(t["rounds"], part, "rounds"), start=1):
            r = _obj(
                raw,
                part,
                f"rounds[{i}]",
                ("round", "attempt", "nodes", "metrics", "started", "finished"),
            )
            rnd = _int(r["round"], part, f"rounds[{i}].round", 1)
            _int(r["attempt"], part, f"rounds[{i}].attempt")
            _num(r["started"], part, f"rounds[{i}].started")
            _num(r["finished"], part, f"rounds[{i}].finished")
            for k, v in _obj(r["metrics"], part, f"round {rnd} metrics").items():
                _num(v, part, f"round {rnd} metric {k!r}")
            nodes = _list(r["nodes"], part, f"round {rnd} nodes")
            for n in nodes:
                if n not in self.grants:
                    _fail(
                        part, f"round {rnd} lists {_short(n)}, which has no grant in the passport"
                    )
            if rnd in self.round_nodes:
                _fail(part, f"round {rnd} is listed twice (list each completed round once)")
            self.round_nodes[rnd] = set(nodes)
            self.round_metrics[rnd] = dict(r["metrics"])
        completed = self.p["job"]["rounds_completed"]
        if len(self.round_nodes) != completed:
            _fail(
                part,
                f"{len(self.round_nodes)} rounds are listed, the job completed {completed}",
            )

    def secure_aggregation(self) -> None:
        self.part = part = "secure aggregation"
        s = _obj(self.p["secure_aggregation"], part, "secure_aggregation")
        enabled = _flag(s.get("enabled"), part, "enabled")
        if enabled != self.spec.federation.secure:
            _fail(
                part,
                f"stated {'on' if enabled else 'off'}, the spec says federation.secure = "
                f"{str(self.spec.federation.secure).lower()}",
            )
        self.summary["secure_aggregation"] = enabled

    # -- 6. ledger --------------------------------------------------------------------
    def ledger(self) -> None:
        self.part = part = "ledger"
        led = _obj(self.p["ledger"], part, "ledger", ("head", "certs", "entries"))
        head = _obj(led["head"], part, "head", ("seq", "hash"))
        certs = _obj(led["certs"], part, "certs")
        entries = _list(led["entries"], part, "entries")
        if not entries:
            _fail(part, "the passport holds no coordinator ledger entries for the job")
        owner: tuple[str, str] | None = None
        prev: tuple[int, str, float] | None = None
        good: list[tuple[int, str, str, dict[str, Any]]] = []
        for i, raw in enumerate(entries, start=1):
            seq_label = raw.get("seq") if isinstance(raw, dict) else None
            self.part = part = f"ledger entry {seq_label if seq_label is not None else f'#{i}'}"
            e = _obj(raw, part, "entry", _ENTRY_KEYS)
            seq = _int(e["seq"], part, "seq", 1)
            at = _num(e["time"], part, "time")
            payload = _obj(e["payload"], part, "payload")
            if e["job_id"] != self.job_id:
                _fail(part, f"belongs to job {_short(e['job_id'])}, not {self.job_id!r}")
            pem_text = certs.get(_text(e["signer"], part, "signer"))
            if not isinstance(pem_text, str):
                _fail(part, "its signer certificate is not in the passport")
            pem = pem_text.encode("ascii", "replace")
            if cert_fingerprint(pem) != e["signer"]:
                _fail(part, "the certificate filed under its signer fingerprint is another one")
            try:
                digest = entry_hash(
                    seq,
                    at,
                    _text(e["kind"], part, "kind"),
                    e["job_id"],
                    payload,
                    _text(e["prev_hash"], part, "prev_hash"),
                )
            except (TypeError, ValueError) as exc:
                _fail(part, f"cannot be hashed: {exc}")
            if digest != e["entry_hash"]:
                _fail(part, "entry hash mismatch: the entry was edited")
            try:
                peer = certified_peer(pem, self.ca, at)
            except RecordError as exc:
                _fail(part, str(exc))
            if peer.role != "coordinator":
                _fail(part, f"signed by {peer.role} {peer.name!r}, not a coordinator")
            if owner is None:
                owner = (peer.role, peer.name)
            elif owner != (peer.role, peer.name):
                _fail(part, f"signed by {peer.name!r}, the other entries by {owner[1]!r}")
            try:
                sig = base64.b64decode(_text(e["signature"], part, "signature"), validate=True)
            except (binascii.Error, ValueError):
                _fail(part, "signature is not valid base64")
            message = canonical_json({"domain": LEDGER_DOMAIN, "entry_hash": digest})
            if not verify_signature(pem, message, sig):
                _fail(part, "bad signature")
            if prev is not None:
                if seq <= prev[0]:
                    _fail(part, f"comes after entry {prev[0]}: entries out of order")
                if at < prev[2]:
                    _fail(part, "its time is earlier than the previous entry's")
                if seq == prev[0] + 1 and e["prev_hash"] != prev[1]:
                    _fail(part, f"prev_hash does not link to entry {prev[0]}: the chain is broken")
            prev = (seq, digest, at)
            good.append((seq, digest, e["kind"], payload))
        self.part = part = "ledger"
        assert owner is not None
        head_seq = _int(head["seq"], part, "head.seq", 1)
        head_hash = _hex64(head["hash"], part, "head.hash")
        if not any(seq == head_seq and digest == head_hash for seq, digest, _, _ in good):
            _fail(
                part,
                f"the stated head (entry {head_seq}, {head_hash[:12]}…) is not one of the "
                "job's signed entries",
            )
        # Nodes sign the coordinator head they last saw into their receipts: an entry
        # the passport holds at such a position must be that very entry, or the
        # coordinator rewrote history the nodes had witnessed.
        by_seq = {seq: digest for seq, digest, _, _ in good}
        for i, r in enumerate(self.receipts, start=1):
            seen_hash = by_seq.get(r.coordinator_chain_seq)
            if seen_hash is not None and seen_hash != r.coordinator_chain_head:
                _fail(
                    part,
                    f"entry {r.coordinator_chain_seq} is not the coordinator head "
                    f"{r.coordinator_chain_head[:12]}… that {r.node} signed into receipt {i}: "
                    "the coordinator's history was rewritten",
                )
        stray = sorted(self.countersigners - {owner[1]})
        if stray:
            _fail(
                part,
                f"receipts are countersigned by {stray[0]!r}, but the ledger is signed by "
                f"{owner[1]!r}",
            )
        self.ledger_payloads = [(kind, seq, p) for seq, _, kind, p in good]
        self._ledger_attests(owner[1])
        self.summary.update(
            coordinator=owner[1],
            ledger_head_seq=head_seq,
            ledger_head_hash=head_hash,
            ledger_entries=len(good),
        )

    def _ledger_attests(self, coordinator: str) -> None:
        """What the coordinator's signed entries say must agree with the passport."""
        part = "ledger"
        by_kind: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for kind, seq, payload in self.ledger_payloads:
            by_kind.setdefault(kind, []).append((seq, payload))
        submitted = by_kind.get("job_submitted", [])
        if not submitted:
            _fail(part, f"coordinator {coordinator!r} logged no job_submitted entry for the job")
        for seq, payload in submitted:
            if payload.get("job_hash") != self.job_hash:
                _fail(
                    part,
                    f"entry {seq} (job_submitted) records job hash "
                    f"{_short(payload.get('job_hash'))}, not {self.job_hash}",
                )
        stored = by_kind.get("model_stored", [])
        if not stored:
            _fail(part, "the coordinator logged no model_stored entry for the job")
        seq, payload = stored[-1]
        if payload.get("model_sha256") != self.model_sha:
            _fail(
                part,
                f"entry {seq} (model_stored) records model {_short(payload.get('model_sha256'))}, "
                f"not the weights' {self.model_sha}",
            )
        logged_grants = {
            p.get("record", {}).get("record_hash")
            for _, p in by_kind.get("grant_issued", [])
            if isinstance(p.get("record"), dict)
        }
        for node, signed in sorted(self.signed_grants.items()):
            if signed.record_hash not in logged_grants:
                _fail(part, f"the grant of {node} is not in the coordinator's ledger")
        finished: dict[int, list[tuple[set[str], Any]]] = {}
        for _, p in by_kind.get("round_finished", []):
            if isinstance(p.get("round"), int) and isinstance(p.get("nodes"), list):
                finished.setdefault(p["round"], []).append((set(p["nodes"]), p.get("metrics")))
        for rnd, nodes in sorted(self.round_nodes.items()):
            logged = [m for n, m in finished.get(rnd, []) if n == nodes]
            if not logged:
                _fail(
                    part,
                    f"round {rnd} with {', '.join(sorted(nodes)) or 'no nodes'} has no matching "
                    "round_finished entry",
                )
            # The coordinator signs each round's metrics into its round_finished entry
            # (entries from before it did carry none); stated metrics must be those.
            signed_metrics = [m for m in logged if m is not None]
            if signed_metrics and self.round_metrics[rnd] not in signed_metrics:
                _fail(
                    "training",
                    f"round {rnd} metrics differ from the coordinator's signed round_finished "
                    "entry",
                )

    # -- 7. privacy -------------------------------------------------------------------
    def _participant_level_signed(self, stated: Any) -> None:
        """The stated participant-level guarantee must be the one every data holder with
        such a plan signed into its grant: its ε alone recomputes from whatever mechanism
        it claims (for example fewer composed releases than secure valuation needs)."""
        from wharf.algorithms.privacy.accounting import Guarantee

        signed = 0
        for node in sorted(self.grants):
            plan = self.grants[node].protections.dp_plan or {}
            for raw in plan.get("guarantees", []):
                if not (isinstance(raw, dict) and raw.get("kind") == "participant_level"):
                    continue
                try:
                    same = Guarantee.from_dict(raw).to_dict() == stated.to_dict()
                except ValueError:
                    same = False
                if not same:
                    _fail(
                        "privacy",
                        "the participant-level guarantee is not the one "
                        f"{node} signed into its grant",
                    )
                signed += 1
        if not signed:
            _fail(
                "privacy",
                "states a participant-level guarantee that no data holder signed into its grant",
            )

    def privacy(self) -> None:
        self.part = part = "privacy"
        report = self.p["privacy"]
        if report is None:
            if self.spec.privacy.enabled:
                _fail(part, "the spec asks for differential privacy but no guarantee is stated")
            self.summary["dp_worst_epsilon"] = None
            return
        if not self.spec.privacy.enabled:
            _fail(part, "a DP guarantee is stated for a job whose spec has no privacy section")
        report = _obj(
            report,
            part,
            "privacy",
            (
                "participant_level",
                "record_level",
                "dataset_spend",
                "worst_epsilon",
                "metrics_released",
            ),
        )
        from wharf.algorithms.privacy.accounting import Guarantee

        def recomputed(raw: Any, kind: str, who: str) -> Any:
            try:
                g = Guarantee.from_dict(raw)
            except ValueError as exc:
                _fail(part, f"the {who} guarantee is malformed: {exc}")
            if g.kind != kind:
                _fail(part, f"the {who} guarantee is of kind {g.kind!r}")
            try:
                eps = g.recompute()
            except ValueError as exc:
                _fail(part, f"the {who} guarantee cannot be recomputed: {exc}")
            if not math.isclose(eps, g.epsilon, rel_tol=EPSILON_REL_TOL):
                _fail(
                    part,
                    f"the {who} guarantee states ε={g.epsilon!r}, the accountant recomputes "
                    f"ε={eps!r} from its mechanism",
                )
            return g

        if report["participant_level"] is not None:
            g = recomputed(report["participant_level"], "participant_level", "participant-level")
            self._participant_level_signed(g)
        elif self.spec.privacy.participant_level is not None:
            _fail(part, "the spec asks for participant-level DP but no such guarantee is stated")
        record = _obj(report["record_level"], part, "record_level")
        for node in sorted(record):
            g = recomputed(record[node], "record_level", f"record-level ({node})")
            grant = self.grants.get(node)
            if grant is None:
                _fail(part, f"states a guarantee for {node}, which has no grant in the passport")
            signed_plan = grant.protections.dp_plan or {}
            in_grant = [
                x
                for x in signed_plan.get("guarantees", [])
                if isinstance(x, dict) and x.get("kind") == "record_level"
            ]
            if not in_grant or Guarantee.from_dict(in_grant[0]).to_dict() != g.to_dict():
                _fail(
                    part,
                    f"the record-level guarantee of {node} is not the one {node} signed into "
                    "its grant",
                )
        spend = _obj(report["dataset_spend"], part, "dataset_spend")
        for node in sorted(spend):
            s = _obj(spend[node], part, f"dataset_spend[{node!r}]", ("epsilon", "delta"))
            grant = self.grants.get(node)
            if grant is None or grant.protections.dp_epsilon is None:
                _fail(part, f"states a dataset spend for {node}, whose grant carries no DP")
            if (s["epsilon"], s["delta"]) != (
                grant.protections.dp_epsilon,
                grant.protections.dp_delta,
            ):
                _fail(
                    part,
                    f"states that {node}'s dataset spent ε={_short(s['epsilon'])}, "
                    f"δ={_short(s['delta'])}; its grant says ε={grant.protections.dp_epsilon!r}, "
                    f"δ={grant.protections.dp_delta!r}",
                )
        eps = [float(v["epsilon"]) for v in spend.values()]
        worst = max(eps) if eps else None
        if report["worst_epsilon"] != worst:
            _fail(
                part,
                f"worst_epsilon is {_short(report['worst_epsilon'])}, the dataset spends give "
                f"{worst!r}",
            )
        _flag(report["metrics_released"], part, "metrics_released")
        logged = [(seq, p) for kind, seq, p in self.ledger_payloads if kind == "privacy_guarantee"]
        if not logged:
            _fail(part, "the coordinator's ledger holds no privacy_guarantee entry for the job")
        if logged[-1][1] != report:
            _fail(
                part,
                f"the stated report differs from the coordinator's (ledger entry {logged[-1][0]}): "
                + _first_difference(report, logged[-1][1]),
            )
        self.summary["dp_worst_epsilon"] = worst

    # -- 8. contribution, licence, revenue ----------------------------------------------
    def revenue(self) -> None:
        self.part = part = "licence"
        lic = _obj(self.p["licence"], part, "licence", ("terms", "price_minor_units", "currency"))
        _text(lic["terms"], part, "terms")
        price = _int(lic["price_minor_units"], part, "price_minor_units")
        currency = _text(lic["currency"], part, "currency")
        if not _CURRENCY.fullmatch(currency):
            _fail(part, f"currency {currency!r} is not an ISO 4217 code")
        self.summary["price"] = _money(price, currency)
        self.part = part = "contribution"
        scores: dict[str, float] | None = None
        if self.p["contribution"] is not None:
            c = _obj(self.p["contribution"], part, "contribution", ("method", "scores"))
            _text(c["method"], part, "method")
            scores = {}
            for node, v in _obj(c["scores"], part, "scores").items():
                if node not in self.grants:
                    _fail(part, f"scores {node!r}, which has no grant in the passport")
                scores[node] = _num(v, part, f"score of {node}")
        self.part = part = "revenue"
        if self.p["revenue"] is None:
            self.summary["revenue_recomputed"] = False
            return
        rev = _obj(self.p["revenue"], part, "revenue", ("rule", "usage_unit", "usage", "shares"))
        if scores is None:
            _fail(part, "a revenue split is stated without contribution scores")
        rule = _obj(rev["rule"], part, "rule")
        if rule.get("total_minor_units") != price or rule.get("currency") != currency:
            _fail(
                part,
                f"the rule splits {_short(rule.get('total_minor_units'))} "
                f"{_short(rule.get('currency'))}, the price is {price} {currency}",
            )
        if rev["usage_unit"] != USAGE_UNIT:
            _fail(part, f"usage_unit must be {USAGE_UNIT!r}")
        unpaid = sorted(n for n, used in self.usage_samples.items() if used and n not in scores)
        if unpaid:
            _fail(
                part,
                f"{unpaid[0]} contributed {self.usage_samples[unpaid[0]]} samples but is not "
                "among the scored nodes the price is split over",
            )
        usage = revenue_usage({n: {"samples": v} for n, v in self.usage_samples.items()}, scores)
        if rev["usage"] != usage:
            _fail(
                part,
                f"the stated usage {rev['usage']} is not the receipts' sample visits {usage}",
            )
        stated = _obj(rev["shares"], part, "shares")
        shares = revenue_split(rule, scores, usage)
        if stated != shares:
            _fail(part, f"recomputed split {shares} differs from the stated {stated}")
        self.summary["revenue_recomputed"] = True


def _first_difference(stated: Any, actual: Any, where: str = "") -> str:
    """Where two JSON values first differ, as ``path: stated X, actual Y``."""
    if isinstance(stated, dict) and isinstance(actual, dict):
        for k in sorted(set(stated) | set(actual)):
            if k not in stated:
                return f"{where}{k}: missing (expected {_short(actual[k])})"
            if k not in actual:
                return f"{where}{k}: unexpected (stated {_short(stated[k])})"
            if stated[k] != actual[k]:
                return _first_difference(stated[k], actual[k], f"{where}{k}.")
    if isinstance(stated, list) and isinstance(actual, list) and len(stated) == len(actual):
        for i, (a, b) in enumerate(zip(stated, actual, strict=True)):
            if a != b:
                return _first_difference(a, b, f"{where}[{i}].")
    return f"{where.rstrip('.') or 'value'}: stated {_short(stated)}, actual {_short(actual)}"


def verify_product(path: Path, ca_pem: bytes | str, *, now: float | None = None) -> VerifyResult:
    """Verify ``NAME.wharf`` offline against the deployment CA; never raises for bad input.

    Needs no network and no coordinator: every party's word is checked against
    its certificate from ``ca_pem``. See :class:`_Verifier` for the order of the
    checks; the result names the first failing part.
    """
    try:
        contents = read_product(Path(path))
    except ProductError as exc:
        return VerifyResult(False, exc.part, exc.problem)
    return _Verifier(contents, ca_pem, now=now).run()


# --------------------------------------------------------------------------- display


def _get(obj: Any, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return default
        obj = obj[k]
    return obj


def _record_body(raw: Any) -> dict[str, Any]:
    body = _get(raw, "body")
    return body if isinstance(body, dict) else {}


# ISO 4217 currencies whose minor unit is not a hundredth (display only: amounts are
# always stored and split in minor units).
_MINOR_DIGITS = {
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(), 0
    ),
    **dict.fromkeys("BHD IQD JOD KWD LYD OMR TND".split(), 3),
}


def _money(minor: Any, currency: Any) -> str:
    """``1000`` ``EUR`` → ``10.00 EUR``; ``1000`` ``JPY`` → ``1000 JPY``."""
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:
        return f"{minor} {currency} (minor units)"
    digits = _MINOR_DIGITS.get(str(currency), 2)
    if digits == 0:
        return f"{minor} {currency}"
    whole, frac = divmod(minor, 10**digits)
    return f"{whole}.{frac:0{digits}d} {currency}"


def _g(value: Any, fmt: str = ".4g") -> str:
    """A number formatted with ``fmt``; anything else as it is (passports shown unverified)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return format(value, fmt)
    return str(value)


def _dp_lines(passport: Mapping[str, Any]) -> list[str]:
    report = passport.get("privacy")
    if not isinstance(report, dict):
        return ["none (no differential privacy)"]
    lines = []
    pl = report.get("participant_level")
    if isinstance(pl, dict):
        lines.append(
            f"participant level: ε={_g(pl.get('epsilon'))}, δ={_g(pl.get('delta'), '.3g')}"
        )
    for node, g in sorted(_get(report, "record_level", default={}).items()):
        if isinstance(g, dict):
            m = g.get("mechanism", {})
            lines.append(
                f"record level at {node}: ε={_g(g.get('epsilon'))}, δ={_g(g.get('delta'), '.3g')} "
                f"(noise multiplier {m.get('noise_multiplier')}, clip {m.get('clip')}, "
                f"{m.get('steps')} steps)"
            )
    worst = report.get("worst_epsilon")
    if worst is not None:
        lines.append(f"worst dataset spend: ε={_g(worst)}")
    return lines or ["stated, with no guarantee"]


def _card_data(passport: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the text card and the markdown card show, read defensively."""
    spec = _get(passport, "job", "spec", default={}) or {}
    holders = []
    for node, p in sorted((_get(passport, "participants", default={}) or {}).items()):
        g = _record_body(_get(p, "grant"))
        r = _record_body(_get(p, "registration"))
        dp = _get(g, "protections", "dp")
        holders.append(
            {
                "node": node,
                "dataset": _get(p, "dataset", default="?"),
                "rows": r.get("row_count", "?"),
                "classification": r.get("classification", "?"),
                "purpose": g.get("purpose", "?"),
                "columns": g.get("columns", []),
                "quotas": g.get("quotas", {}),
                "expires": _when(g["expires_at"])
                if isinstance(g.get("expires_at"), int | float)
                else "?",
                "secure": _get(g, "protections", "secure_aggregation"),
                "dp": f"ε={_g(dp.get('epsilon'))}, δ={_g(dp.get('delta'), '.3g')}"
                if isinstance(dp, dict)
                else "none",
                "grant_id": g.get("grant_id", "?"),
            }
        )
    return {"spec": spec, "holders": holders}


def _displayed(render: Callable[[], str]) -> str:
    """Run a renderer over an unverified passport; a malformed one is a ProductError."""
    try:
        return render()
    except (AttributeError, TypeError, ValueError, KeyError) as exc:
        _fail("passport", f"cannot be displayed, it is malformed ({type(exc).__name__}: {exc})")


def show_text(passport: Mapping[str, Any], *, weights_sha256: str = "") -> str:
    """A human-readable card of a passport (as stated: verification is separate)."""
    return _displayed(lambda: _show_text(passport, weights_sha256))


def _show_text(passport: Mapping[str, Any], weights_sha256: str) -> str:
    d = _card_data(passport)
    spec, job, model = d["spec"], passport.get("job", {}), passport.get("model", {})
    arch = model.get("architecture", {})
    lic = passport.get("licence", {})
    lines = [
        f"Wharf model product — {job.get('name')} (job {job.get('job_id')})",
        f"  passport     {passport.get('format')}, created {_when(passport.get('created', 0))} "
        f"by operator {_get(passport, 'operator', 'name')}",
        f"  job          owner {job.get('owner')}, purpose {spec.get('purpose')}, "
        f"dataset {_get(spec, 'data', 'dataset')}",
        f"               job hash {job.get('job_hash')}",
        f"  model        {arch.get('kind')} hidden {arch.get('hidden')} "
        f"input {arch.get('input_shape')} "
        f"→ {arch.get('num_classes')} classes; {model.get('parameters')} parameters in "
        f"{len(model.get('tensors', {}))} tensors",
        f"               sha256 {model.get('sha256')} ({model.get('size')} bytes, safetensors)",
    ]
    if weights_sha256 and weights_sha256 != model.get("sha256"):
        lines.append(f"               WARNING: the weights in the archive hash to {weights_sha256}")
    fed, tr = _get(spec, "federation", default={}), _get(spec, "training", default={})
    lines.append(
        f"  training     {fed.get('rounds')} rounds of {fed.get('strategy')}, "
        f"{tr.get('optimizer')} lr {tr.get('lr')}, {tr.get('epochs')} epoch(s), "
        f"batch {tr.get('batch_size')}"
    )
    for r in _get(passport, "training", "rounds", default=[]) or []:
        metrics = ", ".join(
            f"{k}={_g(v)}" for k, v in sorted(_get(r, "metrics", default={}).items())
        )
        lines.append(
            f"               round {r.get('round')}: {', '.join(r.get('nodes', []))}  {metrics}"
        )
    lines.append("  data holders")
    usage = _get(passport, "usage", "summary", default={}) or {}
    for h in d["holders"]:
        q = h["quotas"]
        u = usage.get(h["node"], {})
        lines += [
            f"    {h['node']}: dataset {h['dataset']} ({h['rows']} rows, {h['classification']})",
            f"      authorised: purpose {h['purpose']}, columns {', '.join(h['columns'])}",
            f"                  ≤{q.get('rounds')} rounds, ≤{q.get('epochs')} epochs/round, "
            f"≤{q.get('samples')} samples, until {h['expires']}; DP {h['dp']}",
            f"      used: {u.get('tasks', 0)} tasks, {u.get('samples', 0)} samples, "
            f"{_g(u.get('compute_seconds', 0), '.1f')} s compute, "
            f"{u.get('bytes_sent', 0)} bytes sent",
        ]
    sa = passport.get("secure_aggregation", {})
    lines.append(
        "  protections  secure aggregation: "
        + ("on" if _get(sa, "enabled") else "off")
        + "".join(f", {k}={v}" for k, v in sorted(sa.items()) if k != "enabled")
    )
    for line in _dp_lines(passport):
        lines.append(f"               DP: {line}")
    contrib = passport.get("contribution")
    rev = passport.get("revenue")
    if isinstance(contrib, dict):
        shares = _get(rev, "shares", default={}) or {}
        lines.append(f"  contribution {contrib.get('method')}")
        for node, score in sorted((contrib.get("scores") or {}).items()):
            share = shares.get(node)
            paid = f" → {_money(share, lic.get('currency'))}" if share is not None else ""
            lines.append(f"               {node}: score {_g(score)}{paid}")
    if isinstance(rev, dict):
        rule = rev.get("rule", {})
        lines.append(
            f"  revenue      floor {rule.get('floor_fraction')}, usage weight "
            f"{rule.get('usage_weight')}, usage in {rev.get('usage_unit')}"
        )
    lines += [
        f"  licence      {lic.get('terms')}",
        f"  price        {_money(lic.get('price_minor_units'), lic.get('currency'))}",
        f"  ledger       head entry {_get(passport, 'ledger', 'head', 'seq')} "
        f"{_get(passport, 'ledger', 'head', 'hash')} "
        f"({len(_get(passport, 'ledger', 'entries', default=[]) or [])} entries of this job)",
        "  (as stated; check every signature with `wharf product verify NAME.wharf --ca ca.pem`)",
    ]
    return "\n".join(lines)


def show_product(path: Path) -> str:
    """The card of a product file (structure checked, signatures not: see verify)."""
    contents = read_product(Path(path))
    return show_text(contents.passport, weights_sha256=contents.weights_sha256)


def _md(text: Any) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def model_card_markdown(passport: Mapping[str, Any]) -> str:
    """A markdown model card: what the model is, who authorised what, how it is protected."""
    return _displayed(lambda: _model_card(passport))


def _model_card(passport: Mapping[str, Any]) -> str:
    d = _card_data(passport)
    spec, job, model = d["spec"], passport.get("job", {}), passport.get("model", {})
    arch = model.get("architecture", {})
    lic = passport.get("licence", {})
    fed, tr = _get(spec, "federation", default={}), _get(spec, "training", default={})
    out = [
        f"# Model card: {_md(job.get('name'))}",
        "",
        f"Federated model from Wharf job `{_md(job.get('job_id'))}`, owned by "
        f"{_md(job.get('owner'))}, for purpose `{_md(spec.get('purpose'))}`. Packaged by operator "
        f"{_md(_get(passport, 'operator', 'name'))} on {_when(passport.get('created', 0))}.",
        "",
        "Verify everything below offline with `wharf product verify NAME.wharf --ca ca.pem`.",
        "",
        "## Model",
        "",
        f"- Architecture: {_md(arch.get('kind'))}, hidden layers {_md(arch.get('hidden'))}, "
        f"input shape {_md(arch.get('input_shape'))}, {_md(arch.get('num_classes'))} classes, "
        f"standardised inputs: {_md(arch.get('standardize'))}",
        f"- Parameters: {_md(model.get('parameters'))}",
        f"- Weights: `model.safetensors`, {_md(model.get('size'))} bytes, "
        f"SHA-256 `{_md(model.get('sha256'))}`",
        f"- Job hash (canonical spec): `{_md(job.get('job_hash'))}`",
        "",
        "| tensor | dtype | shape |",
        "|---|---|---|",
    ]
    for name, t in sorted((model.get("tensors") or {}).items()):
        out.append(f"| `{_md(name)}` | {_md(t.get('dtype'))} | {_md(t.get('shape'))} |")
    out += [
        "",
        "## Training",
        "",
        f"- {_md(fed.get('rounds'))} rounds, strategy {_md(fed.get('strategy'))}, "
        f"at least {_md(fed.get('min_nodes'))} nodes per round",
        f"- Local training: {_md(tr.get('optimizer'))}, learning rate {_md(tr.get('lr'))}, "
        f"{_md(tr.get('epochs'))} epoch(s) per round, batch size {_md(tr.get('batch_size'))}",
        "",
    ]
    rounds = _get(passport, "training", "rounds", default=[]) or []
    names = sorted({k for r in rounds for k in (_get(r, "metrics", default={}) or {})})
    out += [
        "| round | nodes | " + " | ".join(_md(n) for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for r in rounds:
        m = _get(r, "metrics", default={}) or {}
        cells = [f"{m[n]:.4g}" if isinstance(m.get(n), int | float) else "" for n in names]
        out.append(
            f"| {_md(r.get('round'))} | {_md(', '.join(r.get('nodes', [])))} | "
            + " | ".join(cells)
            + " |"
        )
    usage = _get(passport, "usage", "summary", default={}) or {}
    out += [
        "",
        "## Data holders and what they authorised",
        "",
        "| node | dataset | rows | level | purpose | columns | quotas | DP | samples used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in d["holders"]:
        q = h["quotas"]
        out.append(
            f"| {_md(h['node'])} | {_md(h['dataset'])} | {_md(h['rows'])} | "
            f"{_md(h['classification'])} | {_md(h['purpose'])} | {_md(', '.join(h['columns']))} | "
            f"{_md(q.get('rounds'))} rounds, {_md(q.get('epochs'))} epochs, "
            f"{_md(q.get('samples'))} samples | {_md(h['dp'])} | "
            f"{_md(usage.get(h['node'], {}).get('samples', 0))} |"
        )
    out += [
        "",
        "Each row is backed by the node's signed registration certificate and grant, embedded "
        "verbatim in the passport, and by its usage receipts countersigned by the coordinator.",
        "",
        "## Protections",
        "",
        "- Secure aggregation: "
        + ("on" if _get(passport, "secure_aggregation", "enabled") else "off"),
    ]
    out += [f"- Differential privacy: {_md(line)}" for line in _dp_lines(passport)]
    contrib, rev = passport.get("contribution"), passport.get("revenue")
    if isinstance(contrib, dict):
        shares = _get(rev, "shares", default={}) or {}
        out += [
            "",
            "## Contribution and revenue",
            "",
            f"Contribution method: {_md(contrib.get('method'))}.",
        ]
        if isinstance(rev, dict):
            rule = rev.get("rule", {})
            out.append(
                f"Revenue rule: floor fraction {_md(rule.get('floor_fraction'))}, usage weight "
                f"{_md(rule.get('usage_weight'))} (usage in {_md(rev.get('usage_unit'))})."
            )
        out += ["", "| node | score | share |", "|---|---|---|"]
        for node, score in sorted((contrib.get("scores") or {}).items()):
            share = shares.get(node)
            out.append(
                f"| {_md(node)} | {_md(_g(score))} | "
                f"{_md(_money(share, lic.get('currency')) if share is not None else '')} |"
            )
    out += [
        "",
        "## Licence and price",
        "",
        f"- Price: {_md(_money(lic.get('price_minor_units'), lic.get('currency')))}",
        f"- Terms: {_md(lic.get('terms'))}",
        "",
        "## Provenance",
        "",
        f"- Coordinator ledger head: entry {_md(_get(passport, 'ledger', 'head', 'seq'))}, "
        f"`{_md(_get(passport, 'ledger', 'head', 'hash'))}`",
        f"- Passport format: {_md(passport.get('format'))}",
        "",
    ]
    return "\n".join(out)
