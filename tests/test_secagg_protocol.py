"""SecAgg+ protocol runs in process, with real crypto (X25519, AES, ECDSA P-256 identities).

The coordinator and nodes exchange the real protobuf messages (serialized and
parsed at every hop, as over the wire); only the transport is a function call.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cache
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from wharf.algorithms.secagg import (
    AbortReason,
    MessageRejected,
    SecAggAborted,
    SecAggClient,
    SecAggParams,
    SecAggServer,
    Segment,
    VectorLayout,
    choose_params,
)
from wharf.algorithms.secagg.canonical import Phase, transcript
from wharf.algorithms.secagg.client import ClientState, unmask_body
from wharf.proto import secagg_pb2 as pb

ECDSA = ec.ECDSA(hashes.SHA256())


@cache
def _identity(name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def verify(name: str, data: bytes, signature: bytes) -> bool:
    try:
        _identity(name).public_key().verify(signature, data, ECDSA)
    except Exception:
        return False
    return True


def signer(name: str):
    key = _identity(name)
    return lambda data: key.sign(data, ECDSA)


def wire(msg):
    """Serialize and parse, as the transport would."""
    return type(msg).FromString(msg.SerializeToString())


class Round:
    """One round: a real server, real clients, messages passed through protobuf bytes."""

    def __init__(
        self,
        n: int,
        *,
        num_params: int = 50,
        job: str = "job-1",
        round_number: int = 1,
        params: SecAggParams | None = None,
        names: list[str] | None = None,
        graph_seed: bytes | None = None,
    ) -> None:
        self.names = names or [f"node-{i:03d}" for i in range(1, n + 1)]
        self.params = params or choose_params(n)
        self.layout = VectorLayout.for_update(
            num_params,
            self.params,
            [Segment.integer("num_examples", 1, 1 << 16), Segment.real("loss_sum", 2, 1e3, 16)],
        )
        self.job, self.round_number = job, round_number
        self.server = SecAggServer(
            job_id=job,
            round_number=round_number,
            params=self.params,
            roster=self.names,
            num_values=self.layout.length,
            verify=verify,
            graph_seed=graph_seed,
        )
        self.clients = {
            i: SecAggClient(
                node_id=name,
                job_id=job,
                round_number=round_number,
                sign=signer(name),
                verify=verify,
            )
            for i, name in enumerate(self.names, 1)
        }
        rng = np.random.default_rng(round_number * 1000 + n)  # test data, not secrets
        self.inputs: dict[int, dict[str, Any]] = {
            i: {
                "update": rng.uniform(-1.5, 1.5, num_params).astype(np.float32),
                "num_examples": [int(rng.integers(1, 5000))],
                "loss_sum": rng.uniform(0, 100, 2),
            }
            for i in self.clients
        }
        self.rounding = {i: os.urandom(16) for i in self.clients}

    def expected(self, contributors: Iterable[int]) -> np.ndarray:
        total = np.zeros(self.layout.length, dtype=np.uint32)
        for i in contributors:
            total += self.layout.encode(self.inputs[i], rounding_key=self.rounding[i])
        return total

    # phases, each returning the coordinator's outgoing messages -----------------

    def advertise(self, skip: Iterable[int] = ()) -> dict[int, pb.SecAggKeyDirectory]:
        for i, m in self.server.setup_messages().items():
            if i in set(skip):
                continue
            self.server.receive_advertisement(wire(self.clients[i].setup(wire(m))))
        return self.server.key_directories()

    def share(self, dirs, skip: Iterable[int] = ()) -> dict[int, pb.SecAggShareDelivery]:
        for i, m in dirs.items():
            if i in set(skip):
                continue
            self.server.receive_share_keys(wire(self.clients[i].share_keys(wire(m))))
        return self.server.share_deliveries()

    def mask(self, deliveries, skip: Iterable[int] = ()) -> dict[int, pb.SecAggSurvivors]:
        for i, m in deliveries.items():
            self.clients[i].receive_shares(wire(m))
        for i in deliveries:
            if i in set(skip):
                continue
            msg = self.clients[i].masked_input(
                self.inputs[i], self.layout, rounding_key=self.rounding[i]
            )
            self.server.receive_masked_input(wire(msg))
        return self.server.survivor_messages()

    def consistency(self, survivors, skip: Iterable[int] = ()) -> dict[int, pb.SecAggUnmaskRequest]:
        for i, m in survivors.items():
            if i in set(skip):
                continue
            self.server.receive_consistency_signature(
                wire(self.clients[i].consistency_check(wire(m)))
            )
        return self.server.unmask_requests()

    def unmask(self, requests, skip: Iterable[int] = ()):
        for i, m in requests.items():
            if i in set(skip):
                continue
            self.server.receive_unmask_response(wire(self.clients[i].unmask(wire(m))))
        return self.server.finish()

    def run(
        self,
        *,
        never: Iterable[int] = (),
        after_advertise: Iterable[int] = (),
        after_share: Iterable[int] = (),
        after_input: Iterable[int] = (),
        in_unmask: Iterable[int] = (),
    ):
        dirs = self.advertise(skip=never)
        deliveries = self.share(dirs, skip=after_advertise)
        survivors = self.mask(deliveries, skip=after_share)
        requests = self.consistency(survivors, skip=after_input)
        return self.unmask(requests, skip=in_unmask)


def _check_exact(rnd: Round, result, dropped: Iterable[int] = ()) -> None:
    contributors = sorted(set(rnd.clients) - set(dropped))
    assert list(result.contributors) == contributors
    assert np.array_equal(result.summed, rnd.expected(contributors))
    decoded = result.decode(rnd.layout)
    assert int(decoded["num_examples"][0]) == sum(
        rnd.inputs[i]["num_examples"][0] for i in contributors
    )
    plain = sum(rnd.inputs[i]["update"].astype(np.float64) for i in contributors)
    step = rnd.layout.segments[0].resolution
    assert np.max(np.abs(decoded["update"] - plain)) <= len(contributors) * step


# --------------------------------------------------------------- exact sums


@pytest.mark.parametrize("n", [2, 3, 10])
@pytest.mark.parametrize("num_params", [1, 7, 1000, 40_000])
def test_secure_sum_equals_plain_sum(n: int, num_params: int) -> None:
    rnd = Round(n, num_params=num_params)
    result = rnd.run()
    _check_exact(rnd, result)
    assert all(c.state is ClientState.DONE for c in rnd.clients.values())


def test_two_hundred_nodes_regular_graph_with_dropouts() -> None:
    rnd = Round(200, num_params=64)
    assert rnd.params.degree == 17 and rnd.params.threshold == 12
    assert not rnd.params.complete_graph
    result = rnd.run(after_advertise=[5], after_share=[17, 90], after_input=[33], in_unmask=[150])
    assert result.dropped_before_sharing == (5,)
    assert result.dropped_before_input == (17, 90)
    assert result.silent_in_unmask == (33, 150)
    _check_exact(rnd, result, dropped=[5, 17, 90])


def test_large_vector_uses_threads_and_stays_exact() -> None:
    rnd = Round(3, num_params=600_000)
    for c in rnd.clients.values():
        c.threads = 2
    rnd.server.threads = 2
    _check_exact(rnd, rnd.run(after_share=[]))


# ------------------------------------------------------------------ dropouts


@pytest.mark.parametrize(
    "phase", ["never", "after_advertise", "after_share", "after_input", "in_unmask"]
)
def test_dropout_after_each_phase_gives_exact_sum_over_survivors(phase: str) -> None:
    rnd = Round(10)
    result = rnd.run(**{phase: [3, 8]})
    in_sum = phase in ("after_input", "in_unmask")
    _check_exact(rnd, result, dropped=[] if in_sum else [3, 8])


def test_dropouts_in_every_phase_at_once() -> None:
    rnd = Round(15)  # t = ceil(2*15/3) = 10: five may go
    result = rnd.run(
        never=[1], after_advertise=[2], after_share=[3], after_input=[4], in_unmask=[5]
    )
    _check_exact(rnd, result, dropped=[1, 2, 3])


def test_below_threshold_before_input_aborts_cleanly() -> None:
    rnd = Round(10)  # t = 7
    dirs = rnd.advertise()
    deliveries = rnd.share(dirs)
    with pytest.raises(SecAggAborted) as err:
        rnd.mask(deliveries, skip=[1, 2, 3, 4])
    assert err.value.reason is AbortReason.BELOW_THRESHOLD
    with pytest.raises(MessageRejected):
        rnd.server.finish()


def test_below_threshold_at_advertise_aborts() -> None:
    rnd = Round(5)  # t = 4
    with pytest.raises(SecAggAborted) as err:
        rnd.advertise(skip=[1, 2])
    assert err.value.reason is AbortReason.BELOW_THRESHOLD


def test_below_threshold_in_unmask_returns_nothing() -> None:
    rnd = Round(10)
    requests = rnd.consistency(rnd.mask(rnd.share(rnd.advertise())))
    with pytest.raises(SecAggAborted) as err:
        rnd.unmask(requests, skip=[1, 2, 3, 4])
    assert err.value.reason is AbortReason.BELOW_THRESHOLD
    assert "threshold" in str(err.value) or "t=" in str(err.value)


def test_client_aborts_when_too_few_neighbours_shared() -> None:
    rnd = Round(5)  # t = 4
    short = wire(rnd.share(rnd.advertise())[1])
    del short.shares[2:]  # the coordinator withholds two neighbours' shares
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].receive_shares(short)
    assert err.value.reason is AbortReason.BELOW_THRESHOLD


# ------------------------------------------------------- a cheating coordinator


def _until_unmask(rnd: Round):
    return rnd.consistency(rnd.mask(rnd.share(rnd.advertise()), skip=[2]))


def test_request_for_both_shares_of_one_peer_is_refused() -> None:
    rnd = Round(6)
    requests = _until_unmask(rnd)
    req = requests[1]
    # Node 2 dropped after sharing keys, so node 1 is asked for its mask-key share;
    # the cheating coordinator also asks for its self-mask-seed share.
    assert 2 in req.mask_key_share_owners
    req.self_mask_share_owners.append(2)
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].unmask(wire(req))
    assert err.value.reason is AbortReason.FORBIDDEN_REVEAL
    assert rnd.clients[1].state is ClientState.ABORTED


def test_request_for_mask_key_share_of_a_survivor_is_refused() -> None:
    rnd = Round(6)
    req = _until_unmask(rnd)[1]
    req.mask_key_share_owners.append(3)  # node 3 survived: its pairwise masks are in the sum
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].unmask(wire(req))
    assert err.value.reason is AbortReason.FORBIDDEN_REVEAL


def test_request_for_self_mask_share_of_a_dropped_node_is_refused() -> None:
    rnd = Round(6)
    req = _until_unmask(rnd)[1]
    del req.mask_key_share_owners[:]
    req.self_mask_share_owners.append(2)
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].unmask(wire(req))
    assert err.value.reason is AbortReason.FORBIDDEN_REVEAL


def test_second_unmask_request_is_refused() -> None:
    rnd = Round(6)
    requests = _until_unmask(rnd)
    first = requests[1]
    rnd.clients[1].unmask(wire(first))
    second = wire(first)
    del second.mask_key_share_owners[:]
    second.self_mask_share_owners.append(2)
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].unmask(second)
    assert err.value.reason is AbortReason.OUT_OF_ORDER


def test_different_survivor_sets_are_detected_and_nothing_is_revealed() -> None:
    rnd = Round(10)  # t = 7
    rnd.mask(rnd.share(rnd.advertise()))
    everyone = list(range(1, 11))
    without_1 = everyone[1:]
    server = rnd.server
    sigs: dict[int, pb.SecAggConsistencySignature] = {}
    # Split view: nodes 1-5 are told everyone survived, nodes 6-10 that node 1 dropped
    # (hoping for node 1's self-mask share from the first group and its mask-key share
    # from the second).
    for i in everyone:
        shown = everyone if i <= 5 else without_1
        msg = pb.SecAggSurvivors(header=server.header(Phase.MASKED_INPUT), survivors=shown)
        sigs[i] = rnd.clients[i].consistency_check(wire(msg))
    refused = 0
    for i in everyone:
        shown = everyone if i <= 5 else without_1
        req = pb.SecAggUnmaskRequest(
            header=server.header(Phase.CONSISTENCY_CHECK),
            survivors=shown,
            signatures=[
                pb.SecAggSurvivorSignature(signer=j, signature=sigs[j].signature) for j in everyone
            ],
            self_mask_share_owners=shown if i != 1 else everyone,
            mask_key_share_owners=[1] if i > 5 else [],
        )
        with pytest.raises(SecAggAborted) as err:
            rnd.clients[i].unmask(wire(req))
        assert err.value.reason is AbortReason.INCONSISTENT_SURVIVORS
        refused += 1
    assert refused == 10


def test_unmask_request_with_other_survivor_set_than_signed_is_refused() -> None:
    rnd = Round(6)
    req = _until_unmask(rnd)[1]
    del req.survivors[-1]
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].unmask(wire(req))
    assert err.value.reason is AbortReason.INCONSISTENT_SURVIVORS


def test_forged_consistency_signatures_do_not_count() -> None:
    rnd = Round(6)  # t = 4
    req = _until_unmask(rnd)[1]
    for sig in req.signatures:
        if sig.signer != 1:
            sig.signature = _identity("node-001").sign(b"something else", ECDSA)
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].unmask(wire(req))
    assert err.value.reason is AbortReason.INCONSISTENT_SURVIVORS


def test_replayed_previous_round_messages_are_refused() -> None:
    old = Round(4, round_number=7)
    old_dirs = old.advertise()
    old_setup = old.server.setup_messages()[1]
    new = Round(4, round_number=8)
    new.advertise()
    # 1. a whole coordinator message from round 7 sent in round 8
    with pytest.raises(SecAggAborted) as err:
        new.clients[1].share_keys(wire(old_dirs[1]))
    assert err.value.reason is AbortReason.WRONG_CONTEXT
    # 2. a round-7 advertisement of a neighbour inside a round-8 directory
    fresh = Round(4, round_number=8)
    dirs = fresh.advertise()
    stale = wire(old_dirs[1].advertisements[0])
    stale.header.CopyFrom(dirs[1].advertisements[0].header)  # relabelled as round 8
    dirs[1].advertisements[0].CopyFrom(stale)
    with pytest.raises(SecAggAborted) as err:
        fresh.clients[1].share_keys(wire(dirs[1]))
    assert err.value.reason is AbortReason.BAD_SIGNATURE
    # 3. a client of round 8 given round 7's setup
    late = Round(4, round_number=8)
    with pytest.raises(SecAggAborted) as err:
        late.clients[1].setup(wire(old_setup))
    assert err.value.reason is AbortReason.WRONG_CONTEXT


def test_server_refuses_replayed_and_forged_node_messages() -> None:
    # node 1's round-1 masked input, replayed into a round-2 server collecting inputs
    other = Round(3, round_number=2)
    deliveries = other.share(other.advertise())
    for i, m in deliveries.items():
        other.clients[i].receive_shares(wire(m))
    old_input = Round(3, round_number=1)
    d = old_input.share(old_input.advertise())
    for i, m in d.items():
        old_input.clients[i].receive_shares(wire(m))
    stale = old_input.clients[1].masked_input(
        old_input.inputs[1], old_input.layout, rounding_key=old_input.rounding[1]
    )
    with pytest.raises(MessageRejected) as err:
        other.server.receive_masked_input(wire(stale))
    assert err.value.reason is AbortReason.WRONG_CONTEXT
    relabelled = wire(stale)
    relabelled.header.round = 2
    relabelled.header.context_hash = other.server.context
    with pytest.raises(MessageRejected) as err:
        other.server.receive_masked_input(relabelled)
    assert err.value.reason is AbortReason.BAD_SIGNATURE
    good = other.clients[1].masked_input(
        other.inputs[1], other.layout, rounding_key=other.rounding[1]
    )
    tampered = wire(good)
    tampered.masked_vector = bytes(len(tampered.masked_vector))
    with pytest.raises(MessageRejected) as err:
        other.server.receive_masked_input(tampered)
    assert err.value.reason is AbortReason.BAD_MESSAGE
    other.server.receive_masked_input(wire(good))
    with pytest.raises(MessageRejected):
        other.server.receive_masked_input(wire(good))  # duplicate


@pytest.mark.parametrize("n", [10, 100])
def test_lowered_threshold_is_refused(n: int) -> None:
    rnd = Round(n)
    setup = rnd.server.setup_messages()[1]
    setup.params.threshold -= 1
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].setup(wire(setup))
    assert err.value.reason is AbortReason.BAD_PARAMETERS


def test_wrong_degree_is_refused() -> None:
    rnd = Round(100)
    setup = rnd.server.setup_messages()[1]
    setup.params.degree = 6
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].setup(wire(setup))
    assert err.value.reason is AbortReason.BAD_PARAMETERS


def test_semi_honest_threshold_refused_by_a_node_that_assumes_malice() -> None:
    params = choose_params(10, malicious=False)
    rnd = Round(10, params=params)
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].setup(wire(rnd.server.setup_messages()[1]))
    assert err.value.reason is AbortReason.BAD_PARAMETERS
    trusting = SecAggClient(
        node_id=rnd.names[0],
        job_id=rnd.job,
        round_number=1,
        sign=signer(rnd.names[0]),
        verify=verify,
        require_malicious=False,
    )
    assert trusting.setup(wire(rnd.server.setup_messages()[1])).signature


def test_graph_not_derived_from_the_seed_is_refused() -> None:
    rnd = Round(100)
    setup = rnd.server.setup_messages()[1]
    others = sorted(set(range(2, 101)) - set(setup.neighbours))
    setup.neighbours[0] = others[0]  # swap one neighbour for a (colluding) stranger
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].setup(wire(setup))
    assert err.value.reason is AbortReason.BAD_GRAPH


def test_changed_parameters_under_the_same_context_hash_are_refused() -> None:
    rnd = Round(10)
    setup = rnd.server.setup_messages()[1]
    setup.params.value_bits -= 1  # still within the rules, but not what others see
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].setup(wire(setup))
    assert err.value.reason is AbortReason.WRONG_CONTEXT


def test_forged_or_duplicate_keys_are_refused() -> None:
    rnd = Round(4)
    dirs = rnd.advertise()
    forged = wire(dirs[1])
    forged.advertisements[0].mask_public_key = os.urandom(32)
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].share_keys(forged)
    assert err.value.reason is AbortReason.BAD_SIGNATURE

    rnd = Round(4)
    dirs = rnd.advertise()
    dup = wire(dirs[1])
    dup.advertisements.append(dup.advertisements[0])
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].share_keys(dup)
    assert err.value.reason is AbortReason.BAD_MESSAGE


def test_moved_ciphertext_fails_authentication() -> None:
    rnd = Round(4)
    deliveries = rnd.share(rnd.advertise())
    to_1 = wire(deliveries[1])
    to_2 = deliveries[2]
    from_3_to_2 = next(s for s in to_2.shares if s.sender == 3)
    for s in to_1.shares:
        if s.sender == 3:
            s.nonce, s.ciphertext = from_3_to_2.nonce, from_3_to_2.ciphertext
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].receive_shares(to_1)
    assert err.value.reason is AbortReason.BAD_MESSAGE


def test_survivor_set_without_the_node_is_refused() -> None:
    rnd = Round(4)
    survivors = rnd.mask(rnd.share(rnd.advertise()))
    msg = wire(survivors[1])
    del msg.survivors[0]
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].consistency_check(msg)
    assert err.value.reason is AbortReason.BAD_MESSAGE


def test_out_of_order_messages_abort_the_client() -> None:
    rnd = Round(3)
    dirs = rnd.advertise()
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].receive_shares(pb.SecAggShareDelivery(header=dirs[1].header))
    assert err.value.reason is AbortReason.OUT_OF_ORDER
    with pytest.raises(SecAggAborted):
        rnd.clients[1].share_keys(wire(dirs[1]))  # aborted for good


# ---------------------------------------------------------- a lying node


@pytest.mark.parametrize("dropped", [[], [2]])
def test_wrong_share_from_one_node_is_detected_and_routed_around(dropped: list[int]) -> None:
    rnd = Round(10)  # t = 7, 9 or 10 holders: spare shares
    requests = rnd.consistency(rnd.mask(rnd.share(rnd.advertise()), skip=dropped))
    for i, m in requests.items():
        resp = rnd.clients[i].unmask(wire(m))
        if i == 1:  # node 1 lies about every share it reveals (and re-signs)
            for s in resp.shares:
                s.share = bytes(48)
            resp = _resign(rnd, 1, resp)
        rnd.server.receive_unmask_response(wire(resp))
    _check_exact(rnd, rnd.server.finish(), dropped=dropped)


def test_wrong_shares_without_spares_fail_cleanly() -> None:
    rnd = Round(4)  # t = ceil(8/3) = 3 of 4 holders; node 4 goes silent: no spare share
    requests = rnd.consistency(rnd.mask(rnd.share(rnd.advertise())))
    for i, m in requests.items():
        if i == 4:
            continue
        resp = rnd.clients[i].unmask(wire(m))
        if i == 1:
            resp.shares[0].share = os.urandom(16) * 3
            resp = _resign(rnd, 1, resp)
        rnd.server.receive_unmask_response(wire(resp))
    with pytest.raises(SecAggAborted) as err:
        rnd.server.finish()
    assert err.value.reason is AbortReason.RECONSTRUCTION_FAILED


def _resign(rnd: Round, index: int, resp: pb.SecAggUnmaskResponse) -> pb.SecAggUnmaskResponse:
    data = transcript(
        Phase.UNMASK,
        job_id=rnd.job,
        round_number=rnd.round_number,
        sender=index,
        context=rnd.server.context,
        body=unmask_body(resp.shares),
    )
    resp.signature = signer(rnd.names[index - 1])(data)
    return resp


# ------------------------------------------------------------ what leaves a node


def _chi_square_bound(dof: int, x: float) -> float:
    """Laurent-Massart: P(chi2_dof >= dof + 2 sqrt(dof x) + 2x) <= exp(-x)."""
    return dof + 2 * (dof * x) ** 0.5 + 2 * x


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_masked_vector_looks_uniform_while_the_plain_encoding_does_not() -> None:
    rnd = Round(3, num_params=1 << 16)
    rnd.run()
    node = rnd.clients[2]
    masked = node.masked_vector
    plain = rnd.layout.encode(rnd.inputs[2], rounding_key=rnd.rounding[2])
    assert masked is not None and masked.shape == plain.shape
    # Threshold: a false failure has probability below exp(-50) ~ 2e-22 per histogram.
    limit = _chi_square_bound(255, 50.0)
    for vec, uniform in ((masked, True), (plain, False)):
        byte_hist = np.bincount(vec.view(np.uint8), minlength=256)
        top_hist = np.bincount((vec >> 24).astype(np.uint8), minlength=256)
        stats = (_chi_square(byte_hist), _chi_square(top_hist))
        if uniform:
            assert max(stats) < limit, stats
        else:
            assert min(stats) > 100 * limit, stats
    assert np.count_nonzero(masked == plain) < 10  # ~65536 / 2**32 expected


def test_no_message_a_node_sends_carries_its_plain_input() -> None:
    """Unit-level canary (the gRPC-level capture belongs to the integration tests)."""
    rnd = Round(3, num_params=4096)
    canary = np.float32(1.2345678)
    rnd.inputs[1]["update"][:] = canary
    rnd.inputs[1]["num_examples"] = [0xC0DE]
    sent: list[bytes] = []
    setup = rnd.server.setup_messages()
    for i in rnd.clients:
        ad = rnd.clients[i].setup(wire(setup[i]))
        sent.append(ad.SerializeToString()) if i == 1 else None
        rnd.server.receive_advertisement(wire(ad))
    for i, m in rnd.server.key_directories().items():
        sk = rnd.clients[i].share_keys(wire(m))
        sent.append(sk.SerializeToString()) if i == 1 else None
        rnd.server.receive_share_keys(wire(sk))
    for i, m in rnd.server.share_deliveries().items():
        rnd.clients[i].receive_shares(wire(m))
    for i in rnd.clients:
        mi = rnd.clients[i].masked_input(rnd.inputs[i], rnd.layout, rounding_key=rnd.rounding[i])
        sent.append(mi.SerializeToString()) if i == 1 else None
        rnd.server.receive_masked_input(wire(mi))
    for i, m in rnd.server.survivor_messages().items():
        cs = rnd.clients[i].consistency_check(wire(m))
        sent.append(cs.SerializeToString()) if i == 1 else None
        rnd.server.receive_consistency_signature(wire(cs))
    for i, m in rnd.server.unmask_requests().items():
        um = rnd.clients[i].unmask(wire(m))
        sent.append(um.SerializeToString()) if i == 1 else None
        rnd.server.receive_unmask_response(wire(um))
    _check_exact(rnd, rnd.server.finish())
    blob = b"".join(sent)
    encoded = rnd.layout.encode(rnd.inputs[1], rounding_key=rnd.rounding[1])
    assert canary.tobytes() * 2 not in blob
    assert encoded[:4].tobytes() not in blob  # the quantised canary run
    assert encoded[-3:-2].tobytes() not in blob  # the encoded sample count


def test_abort_message_names_phase_and_reason() -> None:
    rnd = Round(10)
    setup = rnd.server.setup_messages()[1]
    setup.params.threshold = 2
    with pytest.raises(SecAggAborted) as err:
        rnd.clients[1].setup(wire(setup))
    msg = rnd.clients[1].abort_message(err.value)
    assert msg.reason == "bad_parameters" and "threshold" in msg.detail
    assert msg.header.phase == pb.SECAGG_PHASE_SETUP


def test_relayed_certificates_reach_nodes_and_are_bound_to_the_round() -> None:
    from cryptography.hazmat.primitives import serialization

    names = [f"node-{i:03d}" for i in range(1, 5)]
    pems = [
        _identity(n)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        for n in names
    ]
    params = choose_params(4)
    server = SecAggServer(
        job_id="j", round_number=1, params=params, roster=names, num_values=8,
        verify=verify, certificates=pems,
    )  # fmt: skip
    clients = [
        SecAggClient(node_id=n, job_id="j", round_number=1, sign=signer(n), verify=verify)
        for n in names
    ]
    setups = server.setup_messages()
    clients[0].setup(wire(setups[1]))
    assert clients[0].certificates == dict(zip(names, pems, strict=True))
    swapped = wire(setups[2])
    swapped.roster[2].certificate = pems[0]  # a different view of node 3's certificate
    with pytest.raises(SecAggAborted) as err:
        clients[1].setup(swapped)
    assert err.value.reason is AbortReason.WRONG_CONTEXT
    partial = wire(setups[3])
    partial.roster[0].certificate = b""
    with pytest.raises(SecAggAborted) as err:
        clients[2].setup(partial)
    assert err.value.reason is AbortReason.BAD_PARAMETERS
