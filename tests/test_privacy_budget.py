"""The node's privacy budget: DP plans signed into grants, per-dataset budgets enforced
at grant time (surviving a restart), policy levels that require DP, the release limit
that keeps the accountant's assumptions true whatever the coordinator asks, and
``wharf node budget``.

Real parts: the node's SQLite state and ledger, keys from the test CA, the CLI, the
real accountants (dp-accounting) and, for the training task, the real worker process
running Opacus. :class:`StubCoordinator` plays the coordinator's side of the wire.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import Pki
from test_node_grants import (
    StubCoordinator,
    cli,
    make_node,
    model_blob,
    offer_of,
    offer_task,
    train_task,
)

from wharf import spec as spec_mod
from wharf.algorithms.privacy.accounting import Guarantee
from wharf.algorithms.privacy.plan import JobPrivacy
from wharf.identity import Identity
from wharf.ledger import verify_path
from wharf.node import config as node_config
from wharf.node.daemon import NodeDaemon
from wharf.node.grants import GrantBook
from wharf.node.state import NodeState
from wharf.records import Grant, SignedRecord

BUDGET_POLICY = """
allowed_purposes = ["medical-research"]

[levels.general]
secure_aggregation = false

[levels.important]
secure_aggregation = false
dp_required = true
max_epsilon = 6.0

[budget]
epsilon = 100.0
delta = 1e-3

[budget.datasets.cancer]
epsilon = 5.0
delta = 1e-4

[[auto_approve]]
requester = "alice"
purpose = "medical-research"
max_level = "important"
"""


def dp_spec(
    *,
    record: dict[str, Any] | None = None,
    participant: dict[str, Any] | None = None,
    features: tuple[str, ...] = ("age",),
    rounds: int = 2,
    secure: bool = False,
) -> spec_mod.JobSpec:
    privacy: dict[str, Any] = {}
    if record is not None:
        privacy["record_level"] = record
    if participant is not None:
        privacy["participant_level"] = participant
    raw: dict[str, Any] = {
        "name": "dp-study",
        "purpose": "medical-research",
        "data": {"dataset": "cancer", "features": list(features)},
        "model": {"kind": "mlp", "num_classes": 2, "hidden": [3], "standardize": False},
        "training": {"epochs": 1, "batch_size": 8},
        "federation": {"rounds": rounds, "min_nodes": 2 if secure else 1, "secure": secure},
    }
    if privacy:
        raw["privacy"] = privacy
    return spec_mod.from_dict(raw)


@pytest.fixture
def config(pki: Pki, tmp_path: Path) -> Path:
    return make_node(pki, tmp_path / "node", policy=BUDGET_POLICY)


def book_on(config: Path, pki: Pki) -> tuple[NodeState, GrantBook]:
    """The node's state and grant book, opened afresh (as after a restart)."""
    cfg = node_config.load(config)
    assert cfg.cert and cfg.key and cfg.ca
    identity = Identity.load(cfg.cert, cfg.key, cfg.ca)
    signer = identity.signer()
    state = NodeState(cfg.state_dir, signer)
    return state, GrantBook(
        state, identity.name, signer=signer, ca_pem=identity.ca_pem, policy_path=cfg.policy
    )


def granted_plan(state: NodeState, job_id: str, ca_pem: bytes) -> tuple[Grant, JobPrivacy]:
    row = state.get_grant(job_id)
    assert row is not None and row.outcome == "granted", row
    grant = Grant.verified(SignedRecord.from_json(row.grant_json), ca_pem)
    assert grant.protections.dp_plan is not None
    return grant, JobPrivacy.from_dict(grant.protections.dp_plan)


def test_a_dp_job_is_granted_with_its_plan_signed_and_charged(pki: Pki, config: Path) -> None:
    state, book = book_on(config, pki)
    spec = dp_spec(record={"epsilon": 3.0, "delta": 1e-5, "clip": 1.0})
    row = book.offer(offer_of("job-a", spec))
    assert row.outcome == "granted", row.reason
    grant, plan = granted_plan(state, "job-a", pki.coordinator.ca_pem)
    g = plan.record_level
    assert g is not None and plan.participant_level is None
    # Calibrated on this dataset (40 rows, batch 8, 2 rounds x 1 epoch) to the target.
    assert 0.99 * 3.0 <= g.epsilon <= 3.0
    assert g.mechanism["sample_rate"] == pytest.approx(1 / 5)
    assert g.mechanism["steps"] == 2 * 5
    assert g.recompute() == pytest.approx(g.epsilon, rel=1e-6)
    assert grant.protections.dp_epsilon == pytest.approx(g.epsilon)
    assert grant.protections.dp_delta == pytest.approx(1e-5)
    (spend,) = state.spends("cancer")
    assert spend.job_id == "job-a" and spend.epsilon == pytest.approx(g.epsilon)
    (entry,) = state.ledger.entries(kind="privacy_spend")
    assert entry.payload["dataset"] == "cancer"
    assert entry.payload["spent_after"]["epsilon"] == pytest.approx(g.epsilon)
    assert verify_path(state.db_path, pki.coordinator.ca_pem).ok


def test_a_job_over_the_remaining_budget_is_refused_with_the_numbers_even_after_a_restart(
    pki: Pki, config: Path
) -> None:
    state, book = book_on(config, pki)
    first = dp_spec(record={"epsilon": 3.0, "delta": 1e-5})
    assert book.offer(offer_of("job-1", first)).outcome == "granted"
    spent = state.spends("cancer")[0].epsilon
    state.close()

    # The node restarts: a fresh process opens the same database.
    state, book = book_on(config, pki)
    second = dp_spec(record={"epsilon": 3.0, "delta": 1e-5}, rounds=3)
    row = book.offer(offer_of("job-2", second))
    assert row.outcome == "refused"
    assert "privacy budget of dataset 'cancer' exceeded" in row.reason
    assert f"only {5.0 - spent:.4g} is left" in row.reason, row.reason
    assert "budget epsilon 5" in row.reason and "job-1" in row.reason
    assert [s.job_id for s in state.spends("cancer")] == ["job-1"]  # nothing charged
    # What is left can still be spent.
    third = dp_spec(record={"epsilon": 1.5, "delta": 1e-5}, rounds=3)
    assert book.offer(offer_of("job-3", third)).outcome == "granted"
    # And `wharf node budget` shows it (the daemon need not run).
    res = cli(config, "budget", "--json")
    assert res.exit_code == 0, res.output
    (status,) = json.loads(res.output)
    assert status["dataset"] == "cancer" and status["budget"]["epsilon"] == 5.0
    assert [j["job_id"] for j in status["jobs"]] == ["job-1", "job-3"]
    assert (
        status["remaining"]["epsilon"] == pytest.approx(5.0 - status["spent"]["epsilon"])
        and status["remaining"]["epsilon"] < 0.6
    )
    table = cli(config, "budget")
    assert table.exit_code == 0 and "cancer" in table.output and "job-3" in table.output


def test_a_job_without_dp_on_a_budgeted_dataset_is_refused(pki: Pki, config: Path) -> None:
    _, book = book_on(config, pki)
    row = book.offer(offer_of("plain", dp_spec()))
    assert row.outcome == "refused"
    assert "a job without differential privacy would exceed any budget" in row.reason


def test_a_level_that_requires_dp_refuses_jobs_without_it_and_caps_epsilon(
    pki: Pki, config: Path
) -> None:
    _, book = book_on(config, pki)
    # bmi is registered 'important': DP required, epsilon at most 6.
    too_loose = dp_spec(record={"epsilon": 8.0, "delta": 1e-5}, features=("bmi",))
    row = book.offer(offer_of("loose", too_loose))
    assert row.outcome == "refused" and "allow epsilon <= 6" in row.reason
    ok = dp_spec(record={"epsilon": 2.0, "delta": 1e-5}, features=("bmi",))
    assert book.offer(offer_of("ok", ok)).outcome == "granted"


def test_a_noise_level_is_reported_as_its_epsilon_and_charged_as_such(
    pki: Pki, config: Path
) -> None:
    state, book = book_on(config, pki)
    spec = dp_spec(record={"noise_multiplier": 1.5, "delta": 1e-5})
    assert book.offer(offer_of("nm", spec)).outcome == "granted"
    _, plan = granted_plan(state, "nm", pki.coordinator.ca_pem)
    g = plan.record_level
    assert g is not None and g.mechanism["noise_multiplier"] == 1.5
    assert state.spends("cancer")[0].epsilon == pytest.approx(g.epsilon)


def test_participant_level_plan_is_signed_and_the_tighter_guarantee_is_charged(
    pki: Pki, config: Path
) -> None:
    state, book = book_on(config, pki)
    spec = dp_spec(
        record={"epsilon": 4.0, "delta": 1e-5},
        participant={"epsilon": 2.0, "delta": 1e-5, "clip": 0.5},
        secure=True,
    )
    row = book.offer(offer_of("both", spec))
    assert row.outcome == "granted", row.reason
    _, plan = granted_plan(state, "both", pki.coordinator.ca_pem)
    assert plan.record_level is not None and plan.participant_level is not None
    assert plan.skellam is not None and plan.skellam.clip == 0.5
    assert plan.skellam.min_contributors == 2
    assert 0.99 * 2.0 <= plan.participant_level.epsilon <= 2.0
    assert plan.spend() == (plan.participant_level.epsilon, plan.participant_level.delta)
    assert state.spends("cancer")[0].epsilon == pytest.approx(plan.participant_level.epsilon)
    assert Guarantee.from_dict(plan.participant_level.to_dict()) == plan.participant_level


def test_the_node_trains_with_its_own_plan_and_releases_at_most_once_per_round(
    pki: Pki, config: Path, tmp_path: Path
) -> None:
    daemon = NodeDaemon(node_config.load(config))
    try:
        spec = dp_spec(record={"epsilon": 4.0, "delta": 1e-5}, rounds=2)
        stub = StubCoordinator(pki)
        daemon._handle(stub, offer_task("dpjob", spec))  # type: ignore[arg-type]
        (decision,) = stub.decisions
        assert decision.outcome == "granted", decision.reason
        path, ref = model_blob(tmp_path)
        stub.blobs[ref.sha256] = path
        daemon._handle(stub, train_task("dpjob", spec, 1, ref))  # type: ignore[arg-type]
        header, payload = stub.uploads[-1]
        assert header.ok, header.error
        assert payload and not header.metrics  # only the update leaves under DP
        assert daemon.state.released_rounds("dpjob") == [1]
        # The worker got the node's own plan (from its signed grant).
        task_json = next((daemon.state.work_dir / "dpjob").glob("*/task.json"))
        sent = json.loads(task_json.read_text())["dp_sgd"]
        _, plan = granted_plan(daemon.state, "dpjob", pki.coordinator.ca_pem)
        assert plan.dpsgd is not None and sent == dict(plan.dpsgd)
        # Round 1 again (a coordinator retrying a released round): refused, nothing read.
        again = train_task("dpjob", spec, 1, ref)
        again.task_id = "again"
        daemon._handle(stub, again)  # type: ignore[arg-type]
        header, payload = stub.uploads[-1]
        assert not header.ok and "already released its update for round 1" in header.error
        # A round beyond the accounted ones: refused (by the grant, before the DP check).
        daemon._handle(stub, train_task("dpjob", spec, 3, ref))  # type: ignore[arg-type]
        header, _ = stub.uploads[-1]
        assert not header.ok and "round 3 is beyond the 2 granted" in header.error
    finally:
        daemon.stop()
    # The release record survives a restart.
    state, _ = book_on(config, pki)
    assert state.released_rounds("dpjob") == [1]
