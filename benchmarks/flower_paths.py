"""Flower 1.41 SecAgg+ paths, built only from ``flwr``'s own public functions.

Why mimic Flower's client mod and server workflow step by step instead of
running a Flower simulation: a simulation would bill Flower's scheduler,
Ray/threads and message plumbing to "secure aggregation". Here each path is
the same sequence of calls that ``flwr.client.mod.secaggplus_mod`` (client)
and ``flwr.server.workflow.SecAggPlusWorkflow.unmask_stage`` (server) make, on
the same inputs Wharf gets, so the comparison is kernel against kernel.

Deliberately *left out* of Flower's timings (so the comparison is, if
anything, kind to Flower):

* client: ``parameters_multiply`` (the sample-count weighting) and the
  per-neighbour ECDH that Flower redoes inside the masking stage — key
  agreement is measured on its own in section 5;
* server: dequantisation (Wharf's timing stops at the unmasked ``uint32`` sum
  too), and masks between two *dropped* neighbours (Flower would regenerate
  them; equal work means we only regenerate survivor–dropped masks).

Flower's defaults are used: clipping range 8.0, quantisation range 2**22,
modulus 2**32, SECP384R1 key pairs in PEM, Fernet for shares.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.common.serde import config_record_to_proto
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)
from numpy.typing import NDArray

CLIPPING_RANGE = 8.0
TARGET_RANGE = 1 << 22
MOD_RANGE = 1 << 32

NDArrays = list[NDArray[Any]]


# ------------------------------------------------------------- client masking


@dataclass
class FlowerMaskingSetup:
    """One client's secrets after key exchange: its own seed and ``k`` pairwise shared keys."""

    nid: int
    rd_seed: bytes
    pairwise: list[tuple[int, bytes]]
    q_ratio: int


def masking_setup(k: int = 8) -> FlowerMaskingSetup:
    """Node in the middle of ``k + 1`` ids, with real ECDH(P-384)+HKDF shared keys (untimed)."""
    me = k // 2 + 1
    sk1, _ = generate_key_pairs()
    pairwise = []
    for j in range(1, k + 2):
        if j == me:
            continue
        _, pk = generate_key_pairs()
        pairwise.append((j, generate_shared_key(sk1, pk)))
    return FlowerMaskingSetup(me, os.urandom(32), pairwise, q_ratio=TARGET_RANGE)


def mask_update(setup: FlowerMaskingSetup, params: NDArrays) -> NDArrays:
    """``_collect_masked_vectors`` of Flower's client mod, from quantisation to ``mod``."""
    quantized = quantize(params, CLIPPING_RANGE, TARGET_RANGE)
    quantized = factor_combine(setup.q_ratio, quantized)
    dims = [a.shape for a in quantized]
    private_mask = pseudo_rand_gen(setup.rd_seed, MOD_RANGE, dims)
    quantized = parameters_addition(quantized, private_mask)
    for node_id, shared_key in setup.pairwise:
        pairwise_mask = pseudo_rand_gen(shared_key, MOD_RANGE, dims)
        if setup.nid > node_id:
            quantized = parameters_addition(quantized, pairwise_mask)
        else:
            quantized = parameters_subtraction(quantized, pairwise_mask)
    return parameters_mod(quantized, MOD_RANGE)


def upload_bytes(masked: NDArrays) -> int:
    """Serialized size of the ConfigRecord Flower's client returns (``ndarray_to_bytes``, int64)."""
    record = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in masked]})
    return len(config_record_to_proto(record).SerializeToString())


# ------------------------------------------------------------------ shamir


def shamir_split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    return create_shares(secret, threshold, holders)


def shamir_reconstruct(shares: Sequence[bytes]) -> bytes:
    return combine_shares(list(shares))


# --------------------------------------------------------------- key agreement


@dataclass
class FlowerPeers:
    """Neighbours' advertised public keys as Flower carries them (PEM)."""

    pk1: list[bytes]
    pk2: list[bytes]


def peer_keys(k: int) -> FlowerPeers:
    pk1, pk2 = [], []
    for _ in range(k):
        pk1.append(public_key_to_bytes(generate_key_pairs()[1]))
        pk2.append(public_key_to_bytes(generate_key_pairs()[1]))
    return FlowerPeers(pk1, pk2)


def key_agreement_round(peers: FlowerPeers) -> int:
    """One client's key work per round in Flower's mod: two P-384 pairs to PEM (setup);
    per neighbour one share-encryption key (share-keys stage) and one mask seed
    (masking stage), each ``generate_shared_key`` on keys parsed back from PEM."""
    sk1, pk1 = generate_key_pairs()
    sk2, pk2 = generate_key_pairs()
    sk1b, _ = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
    sk2b, _ = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
    made = 0
    for pk in peers.pk2:
        generate_shared_key(bytes_to_private_key(sk2b), bytes_to_public_key(pk))
        made += 1
    for pk in peers.pk1:
        generate_shared_key(bytes_to_private_key(sk1b), bytes_to_public_key(pk))
        made += 1
    return made


# ------------------------------------------------------------------ server side


@dataclass
class FlowerRound:
    """What Flower's server holds before its unmask stage, for the same graph and dropouts."""

    masked: list[list[bytes]]
    seed_shares: dict[int, list[bytes]]
    key_shares: dict[int, list[bytes]]
    pk1: dict[int, bytes]
    neighbours: dict[int, list[int]]
    survivors: list[int]
    dropped: list[int]
    extra: dict[str, Any] = field(default_factory=dict)


def server_round(
    num_values: int,
    neighbours: dict[int, list[int]],
    dropped: Sequence[int],
    threshold: int,
    seed: int = 0,
) -> FlowerRound:
    """Build Flower's server-side inputs (untimed): masked int64 vectors as ``ndarray_to_bytes``,
    Shamir shares of survivors' seeds and of dropped nodes' PEM ``sk1`` as Flower creates them.

    The masked vectors are uniform in ``[0, 2**32)`` (what a masked vector looks
    like); their content does not change the work Flower's arithmetic does.
    """
    rng = np.random.default_rng(seed)  # stand-in masked data, not secrets
    nodes = sorted(neighbours)
    survivors = [i for i in nodes if i not in set(dropped)]
    keys = {i: generate_key_pairs() for i in nodes}
    pk1 = {i: public_key_to_bytes(keys[i][1]) for i in nodes}
    masked = [
        [
            ndarray_to_bytes(np.array([TARGET_RANGE])),
            ndarray_to_bytes(rng.integers(0, MOD_RANGE, num_values, dtype=np.int64)),
        ]
        for _ in survivors
    ]
    seed_shares: dict[int, list[bytes]] = {}
    key_shares: dict[int, list[bytes]] = {}
    alive = set(survivors)
    for i in nodes:
        holders = sorted({i, *neighbours[i]})
        answering = [pos for pos, h in enumerate(holders) if h in alive]
        if i in alive:
            shares = create_shares(os.urandom(32), threshold, len(holders))
            seed_shares[i] = [shares[pos] for pos in answering]
        else:
            shares = create_shares(private_key_to_bytes(keys[i][0]), threshold, len(holders))
            key_shares[i] = [shares[pos] for pos in answering]
    return FlowerRound(masked, seed_shares, key_shares, pk1, neighbours, survivors, list(dropped))


def server_aggregate(fr: FlowerRound, phases: dict[str, list[float]] | None = None) -> NDArrays:
    """Flower's collect-masked-vectors sum and unmask stage, up to the final ``mod``."""
    t0 = time.perf_counter()
    masked_vector: NDArrays | None = None
    for blobs in fr.masked:
        client_vec = [bytes_to_ndarray(b) for b in blobs]
        masked_vector = (
            client_vec if masked_vector is None else parameters_addition(masked_vector, client_vec)
        )
    assert masked_vector is not None
    masked_vector = parameters_mod(masked_vector, MOD_RANGE)
    t1 = time.perf_counter()
    shapes = get_parameters_shape(masked_vector)
    shamir_s = 0.0
    alive = set(fr.survivors)
    for nid in sorted(fr.neighbours):
        ts = time.perf_counter()
        if nid in alive:
            secret = combine_shares(fr.seed_shares[nid])
            shamir_s += time.perf_counter() - ts
            private_mask = pseudo_rand_gen(secret, MOD_RANGE, shapes)
            masked_vector = parameters_subtraction(masked_vector, private_mask)
        else:
            secret = combine_shares(fr.key_shares[nid])
            shamir_s += time.perf_counter() - ts
            for nb in fr.neighbours[nid]:
                if nb not in alive:
                    continue
                shared_key = generate_shared_key(
                    bytes_to_private_key(secret), bytes_to_public_key(fr.pk1[nb])
                )
                pairwise_mask = pseudo_rand_gen(shared_key, MOD_RANGE, shapes)
                if nid > nb:
                    masked_vector = parameters_addition(masked_vector, pairwise_mask)
                else:
                    masked_vector = parameters_subtraction(masked_vector, pairwise_mask)
    recon = parameters_mod(masked_vector, MOD_RANGE)
    t2 = time.perf_counter()
    if phases is not None:
        phases.setdefault("sum", []).append(t1 - t0)
        phases.setdefault("shamir", []).append(shamir_s)
        phases.setdefault("unmask", []).append(t2 - t1)
    return recon
