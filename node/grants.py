"""One scenario, one authorisation: what this node decides about each offered job,
and the bookkeeping that proves afterwards what it allowed and what was used.

* **Offers** (:meth:`GrantBook.offer`): the node recomputes the job hash from the
  spec it was shown, evaluates its policy (:mod:`wharf.node.policy`) against the
  dataset's registration certificate and the requester's certified name, and
  either refuses (with every reason), signs a grant (a standing rule matched), or
  leaves the job *pending* for its operator. Answers are idempotent: the same
  offer again gets the stored decision.
* **Operator decisions** (:meth:`approve`, :meth:`deny`, :meth:`revoke`) change a
  stored decision; the daemon reports every change to the coordinator.
* **The check before every task and every upload** (:meth:`authorise`): an active
  grant, signed by this node and verified against the CA, for exactly this job
  hash, dataset, columns, round, epochs and remaining sample quota — or a
  :class:`GrantCheckError` saying ``no valid grant for job …: why``. Nothing reads
  the data before it passes.
* **Usage receipts** (:meth:`issue_receipt`, :meth:`settle_receipt`) and
  **destruction attestations** (:meth:`destroy`).

Every decision and record goes into the node's audit ledger in the same
transaction as its row: ``grant_issued`` (the signed grant), ``grant_refused``,
``grant_pending``, ``grant_revoked``, ``receipt`` (countersigned when the
coordinator accepted it) and ``destruction``.

Without a policy file the node's operator decides every job (see
:mod:`wharf.node.config`); the dataset's own registration (allowed purposes,
prohibited columns, ``core`` level) still refuses by itself. In plaintext mode
nothing is signed: grants and receipts are kept unsigned for the node's own
checks and the ledger stays empty.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from sqlalchemy.engine import Connection

from wharf import spec as spec_mod
from wharf.algorithms.privacy.plan import JobPrivacy, model_size, plan_job_privacy
from wharf.identity import Signer
from wharf.node.budget import BudgetStatus, budget_problem, budget_status
from wharf.node.policy import (
    DEFAULT_LEVELS,
    BudgetRule,
    Decision,
    LevelRule,
    Policy,
    PolicyError,
    evaluate,
    load_policy,
)
from wharf.node.state import (
    AttestationRow,
    GrantRow,
    NodeState,
    ReceiptRow,
    RegisteredDataset,
)
from wharf.records import (
    DestructionAttestation,
    Grant,
    GrantError,
    RecordError,
    RegistrationCertificate,
    SignedRecord,
    UsageReceipt,
    inventory,
)
from wharf.spec import NAME_RE, JobSpec

__all__ = [
    "APPROVED_BY_OPERATOR",
    "DENIED_BY_OPERATOR",
    "NO_POLICY_REASON",
    "REVOKED_BY_OPERATOR",
    "GrantBook",
    "GrantCheckError",
    "Offer",
    "Usage",
    "Verdict",
]

NO_POLICY_REASON = "this node has no policy file: its operator decides every job"
APPROVED_BY_OPERATOR = "approved by the node's operator"
DENIED_BY_OPERATOR = "denied by the operator"
REVOKED_BY_OPERATOR = "revoked by the operator"
DEFAULT_TTL_HOURS = 720.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


class GrantCheckError(Exception):
    """The node holds no grant covering this task; the message says which job and why."""


@dataclass(frozen=True)
class Offer:
    """A job offered to this node (the fields of a TASK_OFFER the decision depends on)."""

    job_id: str
    job_hash: str
    spec_json: str
    requester: str
    dataset: str
    bundle_sha256: str = ""


@dataclass(frozen=True)
class Verdict:
    """What the node's policy says about an offer, before anything is stored.

    ``decision`` is the policy's full answer (what a grant would bind); it is
    ``None`` when the offer could not even be evaluated (bad spec, hash mismatch,
    unknown dataset), which is always a refusal.
    """

    outcome: Literal["refuse", "auto_approve", "pending"]
    reasons: list[str]
    decision: Decision | None = None
    spec: JobSpec | None = None
    ttl_hours: float = DEFAULT_TTL_HOURS
    privacy: JobPrivacy | None = None
    """The job's DP plan on the dataset (signed into the grant; the trainer uses it)."""
    budget: BudgetRule | None = None
    """The dataset's privacy budget under the policy the verdict was made with."""


@dataclass(frozen=True)
class Usage:
    """What one task used: rows, local epochs (0 for statistics) and the worker's wall time."""

    rows_used: int
    epochs: int
    compute_seconds: float = 0.0

    @property
    def samples(self) -> int:
        return self.rows_used * self.epochs


@dataclass
class _Registration:
    cert: RegistrationCertificate | None = None
    problem: str = ""
    dataset: RegisteredDataset | None = field(default=None, repr=False)


def _operator_policy(purpose: str) -> Policy:
    """The policy used when there is none: only the registration's own limits refuse;
    protections and purpose are the operator's call (every job is pending)."""
    return Policy(
        allowed_purposes=(purpose,),
        levels={
            "general": LevelRule(secure_aggregation=False),
            "important": LevelRule(secure_aggregation=False),
            "core": DEFAULT_LEVELS["core"],
        },
    )


def used_columns(spec: JobSpec, label: str, features: Iterable[str]) -> list[str]:
    """The columns a job touches: its features (all registered ones if it names none) and
    the label — the same rule as :func:`wharf.node.policy.evaluate`."""
    return list(dict.fromkeys([*(spec.data.features or tuple(features)), label]))


class GrantBook:
    """This node's decisions, grants, receipts and attestations, over its :class:`NodeState`.

    ``signer``/``ca_pem`` are the node's key and the deployment CA; both ``None`` in
    plaintext mode (``ca_pem`` alone: a read-only view that verifies but cannot
    sign). ``policy_path`` is the policy file (``None``: the operator decides every
    job). The policy is re-read at every evaluation, so an edit takes effect
    without a restart.
    """

    def __init__(
        self,
        state: NodeState,
        node: str,
        *,
        signer: Signer | None = None,
        ca_pem: bytes | None = None,
        policy_path: Path | None = None,
    ) -> None:
        if signer is not None and ca_pem is None:
            raise ValueError("a signing node needs the CA certificate to verify its records")
        if signer is not None:
            state.attach_signer(signer)  # its decisions go into the ledger, signed
        self.state = state
        self.node = node
        self.signer = signer
        self.ca_pem = ca_pem
        self.policy_path = policy_path

    @property
    def signs(self) -> bool:
        return self.signer is not None

    # -- registration ----------------------------------------------------------------------
    def describe(
        self, ds: RegisteredDataset, *, issued_at: float | None = None
    ) -> RegistrationCertificate:
        """The (unsigned) registration certificate for a stored dataset row."""
        return RegistrationCertificate.describe(
            self.node,
            ds.name,
            ds,
            classification=ds.classification,
            column_levels=ds.column_levels or {},
            allowed_purposes=ds.purposes or (),
            prohibited_columns=ds.prohibited or (),
            issued_at=ds.added if issued_at is None else issued_at,
        )

    def registration(self, ds: RegisteredDataset) -> RegistrationCertificate:
        """The dataset's registration, from its signed certificate when there is one (which
        must verify, be this node's, and describe the registered file); RecordError if not."""
        signed = ds.certificate
        if signed is None or self.ca_pem is None:
            return self.describe(ds)
        cert = RegistrationCertificate.verified(signed, self.ca_pem, expect_name=self.node)
        ours = (ds.name, ds.fingerprint, ds.schema_hash, ds.rows)
        if (cert.dataset, cert.fingerprint, cert.schema_hash, cert.row_count) != ours:
            raise RecordError("the certificate does not describe the registered file")
        return cert

    def certify_missing(self) -> list[str]:
        """Sign a certificate for every dataset registered without one (e.g. before this
        node had registration certificates); returns their names."""
        if self.signer is None:
            return []
        done = []
        for ds in self.state.list_datasets():
            if not ds.certificate_json:
                cert = self.describe(ds, issued_at=time.time())
                self.state.set_certificate(ds.name, cert.sign(self.signer))
                done.append(ds.name)
        return done

    # -- evaluation ------------------------------------------------------------------------
    def load_policy(self) -> Policy | None:
        """The node's policy, or ``None`` when none is configured (PolicyError if broken)."""
        return None if self.policy_path is None else load_policy(self.policy_path)

    def judge(self, offer: Offer) -> Verdict:
        """Evaluate an offer against the policy and the dataset's registration."""

        def refuse(*why: str, spec: JobSpec | None = None) -> Verdict:
            return Verdict("refuse", list(why), spec=spec)

        try:
            spec = spec_mod.from_json(offer.spec_json)
        except spec_mod.SpecError as exc:
            return refuse(f"the offered job spec is invalid: {exc}")
        actual = spec.job_hash()
        if actual != offer.job_hash:
            return refuse(
                f"the offered job hash {offer.job_hash[:12]}… does not match its spec, which "
                f"hashes to {actual[:12]}…",
                spec=spec,
            )
        if offer.dataset and offer.dataset != spec.data.dataset:
            return refuse(
                f"the offer names dataset {offer.dataset!r} but the spec asks for "
                f"{spec.data.dataset!r}",
                spec=spec,
            )
        if offer.bundle_sha256 and offer.bundle_sha256 != spec.bundle.sha256:
            return refuse(
                f"the offered code bundle {offer.bundle_sha256[:12]}… is not the one the spec "
                f"binds ({spec.bundle.sha256[:12] or 'none'}…)",
                spec=spec,
            )
        if not NAME_RE.fullmatch(offer.requester):
            return refuse("the offer does not name the requester's certified identity", spec=spec)
        ds = self.state.get_dataset(spec.data.dataset)
        if ds is None:
            return refuse(
                f"dataset {spec.data.dataset!r} is not registered at this node", spec=spec
            )
        try:
            reg = self.registration(ds)
        except RecordError as exc:
            return refuse(
                f"the registration certificate of dataset {ds.name!r} does not verify ({exc}); "
                "the operator must re-register it",
                spec=spec,
            )
        note = ""
        try:
            policy = self.load_policy()
        except PolicyError as exc:
            policy, note = None, f"the policy file cannot be used ({exc}); the operator decides"
        ttl = policy.grant_ttl_hours if policy is not None else DEFAULT_TTL_HOURS
        privacy: JobPrivacy | None = None
        if spec.privacy.enabled:
            try:
                privacy = plan_job_privacy(
                    spec, num_rows=ds.rows, num_params=self.model_values(spec, ds)
                )
            except ValueError as exc:
                return refuse(
                    f"the job's privacy settings cannot be met on dataset {ds.name!r}: {exc}",
                    spec=spec,
                )
        dp = privacy.spend() if privacy is not None else None
        decision = evaluate(
            policy or _operator_policy(spec.purpose), reg, spec, offer.requester, dp=dp
        )
        if privacy is not None:
            protections = replace(decision.protections, dp_plan=privacy.to_dict())
            decision = replace(decision, protections=protections)
        status = budget_status(self.state, policy, ds.name)
        over = budget_problem(status, offer.job_id, dp)
        if over is not None:
            decision = replace(decision, outcome="refuse", reasons=[*decision.reasons, over])
        extra = {"privacy": privacy, "budget": status.budget}
        if decision.outcome == "refuse":
            return Verdict("refuse", decision.reasons, decision, spec, ttl, **extra)
        if policy is None:
            decision = replace(
                decision, outcome="pending", reasons=[note or NO_POLICY_REASON], rule=None
            )
        return Verdict(decision.outcome, decision.reasons, decision, spec, ttl, **extra)

    @staticmethod
    def model_values(spec: JobSpec, ds: RegisteredDataset) -> int:
        """Length of the update vector this job's model has on ``ds``."""
        shape = spec.model.input_shape or (
            (len(spec.data.features),) if spec.data.features else tuple(ds.feature_shape)
        )
        return model_size(spec, shape)

    def _charge(self, c: Connection, verdict: Verdict, job_id: str) -> str | None:
        """Charge a granted job's DP spend to its dataset in transaction ``c``; the reason it
        would overspend instead (another grant got there first), without charging."""
        if verdict.privacy is None or verdict.spec is None:
            return None
        name = verdict.spec.data.dataset
        spend = verdict.privacy.spend()
        status = BudgetStatus(name, verdict.budget, self.state.spends(name, c))
        over = budget_problem(status, job_id, spend)
        if over is not None:
            return over
        if any(s.job_id == job_id for s in status.spends):
            return None  # already charged: the same job decided again
        plan = json.dumps(verdict.privacy.to_dict(), sort_keys=True)
        self.state.add_spend(c, name, job_id, spend[0], spend[1], plan)
        after = BudgetStatus(name, verdict.budget, self.state.spends(name, c))
        self.state.log(
            c,
            "privacy_spend",
            job_id,
            {
                "dataset": name,
                "epsilon": spend[0],
                "delta": spend[1],
                "guarantees": [g.to_dict() for g in verdict.privacy.guarantees()],
                "budget": after.to_dict()["budget"],
                "spent_after": {"epsilon": after.spent_epsilon, "delta": after.spent_delta},
            },
        )
        return None

    # -- decisions -------------------------------------------------------------------------
    def _sign(self, verdict: Verdict, job_id: str) -> tuple[Grant, str]:
        assert verdict.decision is not None
        if self.signer is None and self.ca_pem is not None:
            raise ValueError("this read-only view of the node cannot sign a grant")
        grant = verdict.decision.grant(node=self.node, job_id=job_id, ttl_hours=verdict.ttl_hours)
        signed = grant.sign(self.signer).to_json() if self.signer is not None else ""
        return grant, signed

    def offer(self, offer: Offer) -> GrantRow:
        """Decide an offered job (or return the stored decision if it was offered before).

        A job offered again under the same id with a different hash is refused without
        touching the stored decision: a job's spec never changes under one id.
        """
        existing = self.state.get_grant(offer.job_id)
        if existing is not None:
            return self._same_job(existing, offer)
        verdict = self.judge(offer)
        grant, signed = (
            self._sign(verdict, offer.job_id) if verdict.outcome == "auto_approve" else (None, "")
        )
        outcome = {"refuse": "refused", "auto_approve": "granted", "pending": "pending"}[
            verdict.outcome
        ]
        spec = verdict.spec
        summary = {
            "dataset": offer.dataset or (spec.data.dataset if spec else ""),
            "job_hash": offer.job_hash,
            "purpose": spec.purpose if spec else "",
            "requester": offer.requester,
        }

        def write(c: Connection) -> GrantRow:
            nonlocal outcome, grant, signed
            again = self.state.get_grant(offer.job_id, c)
            if again is not None:
                return self._same_job(again, offer)
            if outcome == "granted":
                over = self._charge(c, verdict, offer.job_id)
                if over is not None:
                    outcome, grant, signed = "refused", None, ""
                    verdict.reasons.append(over)
            self.state.insert_grant(
                c,
                job_id=offer.job_id,
                job_hash=offer.job_hash,
                spec_json=offer.spec_json,
                requester=offer.requester,
                dataset=summary["dataset"],
                outcome=outcome,
                reason="; ".join(verdict.reasons),
                grant_json=signed,
                grant_body_json=json.dumps(grant.to_dict()) if grant else "",
                bundle_sha=spec.bundle.sha256 if spec else offer.bundle_sha256,
            )
            payload = {**summary, "by": "policy", "reasons": verdict.reasons}
            if outcome == "granted":
                assert grant is not None
                if signed:
                    rule = verdict.decision.rule if verdict.decision else None
                    self.state.log_record(
                        c,
                        SignedRecord.from_json(signed),
                        extra={"by": "policy", "reasons": verdict.reasons, "rule": rule},
                    )
            elif outcome == "refused":
                self.state.log(c, "grant_refused", offer.job_id, payload)
            else:
                self.state.log(c, "grant_pending", offer.job_id, payload)
            row = self.state.get_grant(offer.job_id, c)
            assert row is not None
            return row

        return self.state.transact(write)

    def _same_job(self, existing: GrantRow, offer: Offer) -> GrantRow:
        if existing.job_hash == offer.job_hash:
            return existing
        # Not stored: the stored decision stands for the job as first offered.
        return replace(
            existing,
            job_hash=offer.job_hash,
            outcome="refused",
            reason=(
                f"job {offer.job_id} was offered before with hash {existing.job_hash[:12]}…; "
                "a job's spec cannot change under the same id (submit a new job)"
            ),
            grant_json="",
            grant_body_json="",
            reported=False,
            version=-1,
        )

    def approve(self, job_id: str) -> GrantRow:
        """The operator approves a pending job: the node signs a grant for it.

        The job is evaluated again first, so a policy or registration change since the
        offer that now refuses it is reported (ValueError) instead of granted.
        """
        row = self._row(job_id)
        self._require(row, "pending", "approved")
        verdict = self.judge(self._offer_of(row))
        if verdict.outcome == "refuse" or verdict.decision is None:
            raise ValueError(
                f"job {row.job_id} cannot be approved: this node refuses it: "
                + "; ".join(verdict.reasons)
            )
        grant, signed = self._sign(verdict, row.job_id)

        def write(c: Connection) -> GrantRow:
            cur = self._row(job_id, c)
            self._require(cur, "pending", "approved")
            over = self._charge(c, verdict, row.job_id)
            if over is not None:
                raise ValueError(f"job {row.job_id} cannot be approved: {over}")
            self.state.update_grant(
                c,
                cur,
                outcome="granted",
                reason=APPROVED_BY_OPERATOR,
                grant_json=signed,
                grant_body_json=json.dumps(grant.to_dict()),
            )
            if signed:
                self.state.log_record(
                    c, SignedRecord.from_json(signed), extra={"by": "operator", "reasons": []}
                )
            return self._row(job_id, c)

        return self.state.transact(write)

    def deny(self, job_id: str, note: str = "") -> GrantRow:
        """The operator refuses a pending job."""
        reason = DENIED_BY_OPERATOR + (f": {note.strip()}" if note.strip() else "")

        def write(c: Connection) -> GrantRow:
            cur = self._row(job_id, c)
            self._require(cur, "pending", "denied")
            self.state.update_grant(c, cur, outcome="refused", reason=reason)
            self.state.log(
                c,
                "grant_refused",
                cur.job_id,
                {
                    "by": "operator",
                    "dataset": cur.dataset,
                    "job_hash": cur.job_hash,
                    "reasons": [reason],
                    "requester": cur.requester,
                },
            )
            return self._row(job_id, c)

        return self.state.transact(write)

    def revoke(self, job_id: str) -> GrantRow:
        """The operator withdraws a grant: the node stops taking part at its next task."""

        def write(c: Connection) -> GrantRow:
            cur = self._row(job_id, c)
            self._require(cur, "granted", "revoked")
            self.state.update_grant(c, cur, outcome="revoked", reason=REVOKED_BY_OPERATOR)
            grant_id = ""
            if cur.grant_body_json:
                grant_id = str(json.loads(cur.grant_body_json).get("grant_id", ""))
            self.state.log(
                c,
                "grant_revoked",
                cur.job_id,
                {"grant_id": grant_id, "job_hash": cur.job_hash, "reason": REVOKED_BY_OPERATOR},
            )
            return self._row(job_id, c)

        return self.state.transact(write)

    def _row(self, job_id: str, conn: Connection | None = None) -> GrantRow:
        row = self.state.get_grant(job_id, conn)
        if row is None:
            raise ValueError(f"no job {job_id!r} was offered to this node")
        return row

    @staticmethod
    def _require(row: GrantRow, outcome: str, verb: str) -> None:
        if row.outcome != outcome:
            hint = {
                ("approved", "granted"): "it is already granted",
                ("denied", "granted"): "it is granted; revoke it instead",
                ("revoked", "pending"): "it is pending; deny it instead",
            }.get((verb, row.outcome), f"it is {row.outcome}")
            raise ValueError(f"job {row.job_id} cannot be {verb}: {hint}")

    @staticmethod
    def _offer_of(row: GrantRow) -> Offer:
        return Offer(
            job_id=row.job_id,
            job_hash=row.job_hash,
            spec_json=row.spec_json,
            requester=row.requester,
            dataset=row.dataset,
            bundle_sha256=row.bundle_sha,
        )

    # -- the check before every task and upload ---------------------------------------------
    def grant_of(self, row: GrantRow, now: float | None = None) -> Grant:
        """The grant stored for ``row``: verified against the CA as this node's own (signed
        mode), or parsed (plaintext mode). RecordError if it is missing, forged or expired."""
        if self.ca_pem is not None:
            if not row.grant_json:
                raise RecordError("the stored grant is not signed")
            signed = SignedRecord.from_json(row.grant_json)
            return Grant.verified(signed, self.ca_pem, expect_name=self.node, now=now)
        if not row.grant_body_json:
            raise RecordError("no grant is stored")
        try:
            body = json.loads(row.grant_body_json)
        except json.JSONDecodeError:
            raise RecordError("the stored grant is not valid JSON") from None
        return Grant.from_dict(body)

    def authorise(
        self,
        job_id: str,
        job_hash: str,
        *,
        spec: JobSpec | None = None,
        dataset: str = "",
        round: int | None = None,
        epochs: int | None = None,
        new_samples: int = 0,
        now: float | None = None,
    ) -> Grant:
        """The grant that covers this task, or :class:`GrantCheckError`.

        Checks: a stored decision that is ``granted`` (not pending, refused or revoked);
        the grant verifies (this node's key, the CA, not expired); it covers this job
        hash — which, when ``spec`` is given, must also be the hash of that spec — and
        the spec's bundle, the dataset and the columns the job touches; ``round`` and
        ``epochs`` within the quotas; and the sample visits of every receipt of the job
        so far plus ``new_samples`` within the samples quota.
        """

        def fail(why: str) -> GrantCheckError:
            return GrantCheckError(f"no valid grant for job {job_id}: {why}")

        row = self.state.get_grant(job_id)
        if row is None:
            raise fail("this node holds no decision on it (it was never offered here)")
        if row.outcome == "pending":
            raise fail("it awaits the decision of the node's operator")
        if row.outcome == "refused":
            raise fail(f"this node refused it ({row.reason})")
        if row.outcome == "revoked":
            raise fail("the grant was revoked by the node's operator")
        try:
            grant = self.grant_of(row, now)
        except RecordError as exc:
            raise fail(f"the stored grant is invalid: {exc}") from None
        kw: dict[str, Any] = {}
        if spec is not None:
            actual = spec.job_hash()
            if actual != job_hash:
                raise fail(
                    f"the task's job hash {job_hash[:12]}… is not the hash of its spec "
                    f"({actual[:12]}…)"
                )
            kw["bundle_sha256"] = spec.bundle.sha256
            ds = self.state.get_dataset(dataset or spec.data.dataset)
            if ds is not None:
                kw["columns"] = used_columns(spec, ds.label, ds.features)
        if dataset:
            kw["dataset"] = dataset
        try:
            grant.ensure(
                job_id,
                job_hash,
                now,
                revoked=False,
                node=self.node,
                round=round,
                epochs=epochs,
                samples=self.state.samples_used(job_id) + new_samples,
                **kw,
            )
        except GrantError as exc:
            raise fail(str(exc)) from None
        return grant

    # -- usage receipts --------------------------------------------------------------------
    def issue_receipt(
        self,
        grant: Grant,
        *,
        round: int,
        usage: Usage,
        bytes_sent: int,
        sent_sha256: str,
        ledger_seq: int = 0,
        ledger_head: str = "",
    ) -> ReceiptRow:
        """Sign (signed mode) and store the usage receipt of one task.

        The receipt counts towards the job's samples quota from now on, whether or not
        the upload that carries it succeeds: the rows were used.
        """
        head_ok = bool(_HEX64.fullmatch(ledger_head))
        receipt = UsageReceipt(
            grant_id=grant.grant_id,
            job_id=grant.job_id,
            round=max(0, int(round)),
            node=self.node,
            rows_used=max(0, int(usage.rows_used)),
            epochs=max(0, int(usage.epochs)),
            compute_seconds=max(0.0, float(usage.compute_seconds)),
            bytes_sent=max(0, int(bytes_sent)),
            sent_sha256=sent_sha256 if _HEX64.fullmatch(sent_sha256) else "",
            coordinator_chain_head=ledger_head if head_ok else "",
            coordinator_chain_seq=max(0, int(ledger_seq)) if head_ok else 0,
        )
        if self.signer is not None:
            text, signed = receipt.sign(self.signer).to_json(), True
        else:
            text, signed = json.dumps(receipt.to_dict(), sort_keys=True), False
        row = ReceiptRow(
            receipt_id=receipt.receipt_id,
            job_id=receipt.job_id,
            round=receipt.round,
            samples=receipt.samples,
            json=text,
            signed=signed,
            countersigned=False,
            created=time.time(),
        )
        self.state.transact(lambda c: self.state.add_receipt(c, row))
        return row

    def settle_receipt(self, sent_json: str, ack_json: str, problem: str = "") -> bool:
        """Store the coordinator's countersigned copy of a receipt we sent and log it in
        the ledger; if none came back (or it does not verify) log our own copy, saying
        so. Returns whether a valid countersigned receipt was stored."""
        if self.ca_pem is None or not sent_json:
            return False
        sent = SignedRecord.from_json(sent_json)
        receipt_id = str(sent.body.get("receipt_id", ""))
        back: SignedRecord | None = None
        if ack_json:
            try:
                back = SignedRecord.from_json(ack_json)
                if (back.kind, back.record_hash, back.body) != (
                    sent.kind,
                    sent.record_hash,
                    sent.body,
                ):
                    raise RecordError("it is not the receipt this node sent")
                back.verify(self.ca_pem, expect_name=self.node)
                back.verify_countersignatures(self.ca_pem, expect_role="coordinator")
            except RecordError as exc:
                back, problem = None, f"the countersigned receipt was rejected: {exc}"
        elif not problem:
            problem = "the coordinator returned no countersigned receipt"

        def write(c: Connection) -> None:
            stored = self.state.get_receipt(receipt_id)
            if stored is not None and stored.countersigned:
                return
            if back is not None:
                self.state.set_countersigned(c, receipt_id, back.to_json())
                self.state.log_record(c, back)
            else:
                self.state.log_record(c, sent, extra={"countersigned": False, "problem": problem})

        self.state.transact(write)
        return back is not None

    # -- destruction -------------------------------------------------------------------------
    def destroy(self, job_id: str, workspace: Path) -> AttestationRow:
        """Delete a job's workspace and attest what was deleted (path, SHA-256, size).

        Files that could not be deleted are left out of the attestation (it lists only
        what is gone). Called again for a job already attested, with nothing left to
        delete, it returns the stored attestation.
        """
        existing = self.state.get_attestation(job_id)
        if existing is not None and not workspace.exists():
            return existing
        before = inventory(workspace) if workspace.is_dir() else ()
        if workspace.exists():
            shutil.rmtree(workspace, ignore_errors=True)
        left = {f.path for f in inventory(workspace)} if workspace.is_dir() else set()
        gone = tuple(f for f in before if f.path not in left)
        try:
            where = workspace.relative_to(self.state.state_dir).as_posix()
        except ValueError:
            where = f"work/{job_id}"
        attestation = DestructionAttestation(
            node=self.node, job_id=job_id, deleted=gone, workspace=where
        )
        if self.signer is not None:
            signed: SignedRecord | None = attestation.sign(self.signer)
            assert signed is not None
            text = signed.to_json()
        else:
            signed, text = None, json.dumps(attestation.to_dict(), sort_keys=True)

        def write(c: Connection) -> None:
            self.state.put_attestation(c, job_id, text, signed is not None)
            if signed is not None:
                extra = {"left_behind": sorted(left)} if left else None
                self.state.log_record(c, signed, extra=extra)

        self.state.transact(write)
        row = self.state.get_attestation(job_id)
        assert row is not None
        return row
