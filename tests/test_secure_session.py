"""The node's secure-aggregation sessions, driven by the real protocol server in-process."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wharf.algorithms import models, secure_vectors
from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.plan import JobPrivacy
from wharf.algorithms.privacy.skellam import SkellamPlan, make_plan
from wharf.algorithms.secagg import SecAggServer, choose_params
from wharf.identity import Identity, init_ca, issue, peer_verifier
from wharf.node.secure_session import LocalResult, SecureSessions, SecureTaskError
from wharf.node.state import NodeState
from wharf.proto import wharf_pb2 as pb

NAMES = ("node-a", "node-b", "node-c")
ROW_CAP = 100


@pytest.fixture
def identities(tmp_path: Path) -> dict[str, Identity]:
    init_ca(tmp_path / "ca")
    out = {}
    for n in NAMES:
        issue(tmp_path / "ca", "node", n, tmp_path / "certs")
        out[n] = Identity.load(
            tmp_path / "certs" / f"{n}.pem",
            tmp_path / "certs" / f"{n}.key",
            tmp_path / "ca" / "ca.pem",
        )
    return out


def _local_result(
    tmp_path: Path, name: str, delta: dict[str, np.ndarray], n: int
) -> Future[LocalResult]:
    path = tmp_path / f"{name}-result.safetensors"
    path.write_bytes(models.weights_to_bytes(delta))
    fut: Future[LocalResult] = Future()
    fut.set_result(LocalResult(num_examples=n, metrics={"train_loss_sum": 0.5 * n}, payload=path))
    return fut


def _task(kind: int, rnd: int, **fields: object) -> pb.Task:
    return pb.Task(task_id="t", job_id="job-1", round=rnd, kind=kind, deadline_unix=0, **fields)  # type: ignore[arg-type]


def run_round(
    identities: dict[str, Identity], sessions: dict[str, SecureSessions], tmp_path: Path, rnd: int
) -> dict[str, np.ndarray]:
    """One full secure round through SecureSessions; returns the coordinator's decoded sums."""
    rng = np.random.default_rng(rnd)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    counts = {"node-a": 10, "node-b": 30, "node-c": 60}
    params = choose_params(len(NAMES))
    layout = secure_vectors.update_layout(params, 12, ROW_CAP)
    certs = {n: identities[n].cert_pem for n in NAMES}
    ca = identities["node-a"].ca_pem
    server = SecAggServer(
        job_id="job-1",
        round_number=rnd,
        params=params,
        roster=list(NAMES),
        num_values=layout.length,
        verify=peer_verifier(certs.get, ca),
        certificates=[certs[n] for n in NAMES],
    )
    setups = server.setup_messages()
    for i, n in enumerate(NAMES, start=1):
        task = _task(
            pb.TASK_TRAIN,
            rnd,
            secure=True,
            weight_scale=ROW_CAP,
            secagg=setups[i].SerializeToString(),
        )
        work = _local_result(tmp_path, n, deltas[n], counts[n])
        server.receive_advertisement(sessions[n].start(task, work, tmp_path))
    phases = [
        ("key_directory", server.key_directories, server.receive_share_keys),
        ("share_delivery", server.share_deliveries, None),
        ("survivors", server.survivor_messages, server.receive_consistency_signature),
        ("unmask", server.unmask_requests, server.receive_unmask_response),
    ]
    from wharf.proto import secagg_pb2 as sa

    for kind, close, receive in phases:
        for i, msg in close().items():
            task = _task(pb.TASK_SECAGG, rnd, secagg_kind=kind, secagg=msg.SerializeToString())
            raw, vector = sessions[NAMES[i - 1]].phase(task, timeout=5)
            if kind == "share_delivery":
                server.receive_masked_input(sa.SecAggMaskedInput.FromString(raw), vector)
            else:
                assert receive is not None
                parsed = {
                    "key_directory": sa.SecAggShareKeys,
                    "survivors": sa.SecAggConsistencySignature,
                    "unmask": sa.SecAggUnmaskResponse,
                }[kind].FromString(raw)
                receive(parsed)
    mean, total, metrics = secure_vectors.decode_update(server.finish().decode(layout), ROW_CAP)
    expected = sum(deltas[n]["w"].astype(np.float64) * counts[n] for n in NAMES) / 100
    np.testing.assert_allclose(mean.reshape(4, 3), expected, atol=1e-5)
    assert total == 100 and metrics["train_loss_sum"] == pytest.approx(50.0, abs=1e-3)
    return {"mean": mean}


def test_full_round_through_node_sessions_gives_the_weighted_mean(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    run_round(identities, sessions, tmp_path, rnd=1)
    # The clear local result is deleted once it has been masked.
    assert not any(tmp_path.glob("*-result.safetensors"))


def test_a_node_never_contributes_twice_to_one_rounds_revealed_sum(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    run_round(identities, sessions, tmp_path, rnd=1)
    # A coordinator that "retries" round 1 after unmasking it is refused.
    retry = _task(pb.TASK_TRAIN, 1, secure=True, weight_scale=ROW_CAP, secagg=b"")
    with pytest.raises(SecureTaskError, match="already contributed"):
        sessions["node-a"].start(retry, Future(), tmp_path)
    # The next round is fine; and the end of the job does not make round 1 fair game.
    run_round(identities, sessions, tmp_path, rnd=2)
    sessions["node-a"].end("job-1")
    with pytest.raises(SecureTaskError, match="already contributed"):
        sessions["node-a"].start(retry, Future(), tmp_path)


def test_revealed_rounds_survive_a_restart_of_the_node(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    state = NodeState(tmp_path / "state")
    sessions = {
        n: SecureSessions(
            n,
            identities[n].signer().sign,
            identities[n].ca_pem,
            releases=state if n == "node-a" else None,
        )
        for n in NAMES
    }
    run_round(identities, sessions, tmp_path, rnd=1)
    assert state.released_rounds("job-1") == [1]
    state.close()
    # A new process, the same database: round 1 is still refused.
    again = SecureSessions(
        "node-a",
        identities["node-a"].signer().sign,
        identities["node-a"].ca_pem,
        releases=NodeState(tmp_path / "state"),
    )
    retry = _task(pb.TASK_TRAIN, 1, secure=True, weight_scale=ROW_CAP, secagg=b"")
    with pytest.raises(SecureTaskError, match="already contributed"):
        again.start(retry, Future(), tmp_path)


def run_dp_round(
    identities: dict[str, Identity],
    sessions: dict[str, SecureSessions],
    tmp_path: Path,
    deltas: dict[str, dict[str, np.ndarray]],
    plan: SkellamPlan,
    drop: str | None = None,
    *,
    coalitions: bool = False,
    node_plan: SkellamPlan | None = None,
) -> Any:
    """A participant-level DP round through SecureSessions; ``drop`` sends no masked input.
    Returns the coordinator's decoded mean update, or with ``coalitions`` (secure
    valuation) ``(decode_coalitions(...), raw integer sums)``."""
    from wharf.proto import secagg_pb2 as sa

    # The nodes use their own signed plan (``node_plan``), whatever the coordinator uses.
    privacy = JobPrivacy(None, None, node_plan or plan)
    params = choose_params(len(NAMES))
    if coalitions:
        layout = secure_vectors.dp_coalition_layout(params, plan, NAMES)
    else:
        layout = secure_vectors.dp_update_layout(params, plan)
    certs = {n: identities[n].cert_pem for n in NAMES}
    server = SecAggServer(
        job_id="job-1",
        round_number=1,
        params=params,
        roster=list(NAMES),
        num_values=layout.length,
        verify=peer_verifier(certs.get, identities["node-a"].ca_pem),
        certificates=[certs[n] for n in NAMES],
    )
    setups = server.setup_messages()
    for i, n in enumerate(NAMES, start=1):
        task = _task(
            pb.TASK_TRAIN,
            1,
            secure=True,
            weight_scale=ROW_CAP,
            secagg=setups[i].SerializeToString(),
        )
        work = _local_result(tmp_path, n, deltas[n], 10)
        advert = sessions[n].start(task, work, tmp_path, privacy, coalitions=coalitions)
        server.receive_advertisement(advert)
    phases = [
        ("key_directory", server.key_directories, server.receive_share_keys),
        ("share_delivery", server.share_deliveries, None),
        ("survivors", server.survivor_messages, server.receive_consistency_signature),
        ("unmask", server.unmask_requests, server.receive_unmask_response),
    ]
    for kind, close, receive in phases:
        for i, msg in close().items():
            name = NAMES[i - 1]
            if kind == "share_delivery" and name == drop:
                continue
            task = _task(pb.TASK_SECAGG, 1, secagg_kind=kind, secagg=msg.SerializeToString())
            raw, vector = sessions[name].phase(task, timeout=5)
            if kind == "share_delivery":
                server.receive_masked_input(sa.SecAggMaskedInput.FromString(raw), vector)
            else:
                assert receive is not None
                parsed = {
                    "key_directory": sa.SecAggShareKeys,
                    "survivors": sa.SecAggConsistencySignature,
                    "unmask": sa.SecAggUnmaskResponse,
                }[kind].FromString(raw)
                receive(parsed)
    sums = server.finish().decode(layout)
    survivors = [n for n in NAMES if n != drop]
    if coalitions:
        return secure_vectors.decode_coalitions(sums, survivors, NAMES, plan), sums
    return skellam.decode_sum(np.asarray(sums["update"], np.int64), len(survivors), plan)


def test_a_participant_level_round_releases_only_the_noised_uniform_mean(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    rng = np.random.default_rng(3)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    deltas["node-c"]["w"] *= 100  # far beyond the clip: clipped to norm 1
    plan = make_plan(1.0, 12, 2, 8, 1e-3)
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    mean = run_dp_round(identities, sessions, tmp_path, deltas, plan)
    clipped = []
    for n in NAMES:
        w = deltas[n]["w"].astype(np.float64).ravel()
        clipped.append(w * min(1.0, 1.0 / np.linalg.norm(w)))
    expected = np.mean(clipped, axis=0)  # uniform weights, not the example counts
    # Aggregate noise std in model units: z * C / 3 contributors (+ rounding 1/scale).
    tol = 6 * (plan.noise_multiplier * plan.clip / 3) + 3 / plan.scale
    np.testing.assert_allclose(mean, expected, atol=tol)
    assert abs(mean - expected).max() > 0  # noise is there


def test_nodes_refuse_to_unmask_a_sum_with_too_few_noise_shares(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    rng = np.random.default_rng(4)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    plan = make_plan(1.0, 12, 3, 8, 1.0)  # every one of the three shares is needed
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    with pytest.raises(SecureTaskError, match="needs at least 3 noise shares"):
        run_dp_round(identities, sessions, tmp_path, deltas, plan, drop="node-c")
    assert all(sessions[n].releases.released_rounds("job-1") == [] for n in NAMES)


def _clipped(deltas: dict[str, dict[str, np.ndarray]], clip: float) -> dict[str, np.ndarray]:
    out = {}
    for n, d in deltas.items():
        w = d["w"].astype(np.float64).ravel()
        out[n] = w * min(1.0, clip / np.linalg.norm(w))
    return out


def test_secure_valuation_reveals_the_training_mean_and_each_leave_one_out_mean(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    rng = np.random.default_rng(5)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    plan = make_plan(1.0, 12, 2, 8, 1e-3)
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    means, _ = run_dp_round(identities, sessions, tmp_path, deltas, plan, coalitions=True)
    clipped = _clipped(deltas, 1.0)
    tol = 6 * (plan.noise_multiplier * plan.clip / 2) + 3 / plan.scale
    assert set(means) == {"all", *(f"without.{n}" for n in NAMES)}
    np.testing.assert_allclose(means["all"][0], np.mean(list(clipped.values()), axis=0), atol=tol)
    assert means["all"][1] == 3
    for n in NAMES:
        others = [clipped[m] for m in NAMES if m != n]
        mean, members = means[f"without.{n}"]
        assert members == 2
        np.testing.assert_allclose(mean, np.mean(others, axis=0), atol=tol)
    # Still one release per round at each node: the round was revealed once.
    assert all(sessions[n].releases.released_rounds("job-1") == [1] for n in NAMES)


def test_every_coalition_sum_carries_its_own_full_noise(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    """Zero updates: each revealed sum is pure noise. Every one must have the planned
    variance (>= 2 mu_total, here 3 shares of a plan for 2) and be independent of the
    others — the same noise in two sums would cancel in their difference and reveal
    the left-out node's update exactly."""
    d = 4096
    deltas = {n: {"w": np.zeros(d, dtype=np.float32)} for n in NAMES}
    plan = make_plan(1.0, d, 2, 8, 0.5)
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    _, sums = run_dp_round(identities, sessions, tmp_path, deltas, plan, coalitions=True)
    names = ["update", *(f"without.{n}" for n in NAMES)]
    noise = {k: np.asarray(sums[k], dtype=np.float64) for k in names}
    per_node = 2 * plan.mu_total / plan.min_contributors  # variance of one node's share
    for k in names:
        var = float(noise[k].var())
        # 3 shares; the sample variance of 4096 values is within ~10 % (5 sigma ~ 11 %).
        assert abs(var / (3 * per_node) - 1) < 0.15, (k, var, 3 * per_node)
        assert var >= 2 * plan.mu_total
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            corr = float(np.corrcoef(noise[a], noise[b])[0, 1])
            assert abs(corr) < 0.1, (a, b, corr)  # 5 sigma for 4096 pairs is 0.08


def test_a_dropped_node_leaves_its_leave_one_out_sum_equal_to_the_training_sum(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    rng = np.random.default_rng(6)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    plan = make_plan(1.0, 12, 2, 8, 1e-3)
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    means, _ = run_dp_round(
        identities, sessions, tmp_path, deltas, plan, drop="node-c", coalitions=True
    )
    assert means["all"][1] == 2 and means["without.node-c"][1] == 2
    assert means["without.node-a"][1] == 1  # node-b alone, with the noise of two shares
    clipped = _clipped(deltas, 1.0)
    tol = 6 * (plan.noise_multiplier * plan.clip) + 3 / plan.scale
    np.testing.assert_allclose(means["without.node-a"][0], clipped["node-b"], atol=tol)


def test_secure_valuation_needs_a_participant_level_plan(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    s = SecureSessions("node-a", identities["node-a"].signer().sign, identities["node-a"].ca_pem)
    task = _task(pb.TASK_TRAIN, 1, secure=True, weight_scale=ROW_CAP, secagg=b"")
    with pytest.raises(SecureTaskError, match="participant-level plan"):
        s.start(task, Future(), tmp_path, None, coalitions=True)


def test_nodes_refuse_a_roster_larger_than_their_plan_pays_for(
    identities: dict[str, Identity], tmp_path: Path
) -> None:
    """A coordinator that lays out three leave-one-out sums when the nodes' signed plan
    pays for two releases a round gets no masked input, and nothing is released."""
    rng = np.random.default_rng(7)
    deltas = {n: {"w": rng.normal(0, 0.1, size=(4, 3)).astype(np.float32)} for n in NAMES}
    coordinator_plan = make_plan(1.0, 12, 2, 8, 1e-3)
    signed = make_plan(1.0, 12, 2, 2, 1e-3)  # max_nodes 2: two releases a round
    sessions = {
        n: SecureSessions(n, identities[n].signer().sign, identities[n].ca_pem) for n in NAMES
    }
    with pytest.raises(SecureTaskError, match="round of 3 nodes exceeds the 2"):
        run_dp_round(
            identities,
            sessions,
            tmp_path,
            deltas,
            coordinator_plan,
            coalitions=True,
            node_plan=signed,
        )
    assert all(sessions[n].releases.released_rounds("job-1") == [] for n in NAMES)
