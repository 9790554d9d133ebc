"""Shamir sharing of 32-byte secrets over GF(2^127 - 1)."""

from __future__ import annotations

import itertools
import os
import random

import pytest

from wharf.algorithms.secagg import shamir
from wharf.algorithms.secagg.shamir import PRIME, ShamirError

P = PRIME

EDGE_SECRETS = [
    bytes(32),
    b"\xff" * 32,
    (P - 1).to_bytes(32, "big"),
    P.to_bytes(32, "big"),
    (P + 1).to_bytes(32, "big"),
    (P * P - 1).to_bytes(32, "big"),
    (P * P).to_bytes(32, "big"),
    ((1 << 256) - P * P).to_bytes(32, "big"),
    b"\xff" * 16 + bytes(16),  # a 16-byte half >= p: the naive two-element split fails here
    bytes(16) + b"\xff" * 16,
]


@pytest.mark.parametrize("secret", EDGE_SECRETS + [os.urandom(32) for _ in range(20)])
def test_every_32_byte_secret_round_trips(secret: bytes) -> None:
    assert shamir.elements_to_secret(shamir.secret_to_elements(secret)) == secret
    shares = shamir.split(secret, 3, range(1, 6))
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    assert shamir.reconstruct(shares, 3) == secret


def test_any_t_of_n_shares_reconstruct() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 3, [1, 2, 3, 4, 5, 6])
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, 3) == secret
    for five in itertools.combinations(shares, 5):
        assert shamir.reconstruct({x: shares[x] for x in five}, 3) == secret
    big = os.urandom(32)
    xs = list(range(1, 101))
    shares = shamir.split(big, 67, xs)
    rng = random.Random(1)
    for _ in range(10):
        sample = rng.sample(xs, 67)
        assert shamir.reconstruct({x: shares[x] for x in sample}, 67) == big


def test_x_coordinates_need_not_be_consecutive() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 4, [3, 17, 99, 250, 1024])
    assert shamir.reconstruct({x: shares[x] for x in (3, 99, 250, 1024)}, 4) == secret


def test_fewer_than_t_shares_give_nothing() -> None:
    secret = os.urandom(32)
    t = 5
    shares = shamir.split(secret, t, range(1, 9))
    few = {x: shares[x] for x in range(1, t)}
    with pytest.raises(ShamirError):
        shamir.reconstruct(few, t)
    # Interpolating t-1 shares as if they were enough yields a wrong secret (or no
    # 32-byte value at all).
    try:
        assert shamir.reconstruct(few, t - 1) != secret
    except ShamirError:
        pass
    # Perfect secrecy: t-1 shares are consistent with *every* secret. For any other
    # secret there is a degree-(t-1) polynomial through those shares; completing it
    # with one more point reconstructs the other secret.
    other = os.urandom(32)
    points = {x: shamir._decode_share(s) for x, s in few.items()}
    points[0] = shamir.secret_to_elements(other)
    xs = sorted(points)
    x_new = 100
    lam = _lagrange_at(xs, x_new)
    forged = tuple(
        sum(c * points[x][e] for x, c in zip(xs, lam, strict=True)) % P for e in range(3)
    )
    fake = dict(few)
    fake[x_new] = shamir._encode_share(forged)
    assert shamir.reconstruct(fake, t) == other


def _lagrange_at(xs: list[int], at: int) -> list[int]:
    out = []
    for j, xj in enumerate(xs):
        num = den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num = num * (at - xm) % P
                den = den * (xj - xm) % P
        out.append(num * pow(den, -1, P) % P)
    return out


def test_lagrange_coefficients_sum_to_one() -> None:
    for xs in [(1, 2, 3), (2, 5, 9, 11), tuple(range(1, 68))]:
        assert sum(shamir.lagrange_at_zero(xs)) % P == 1


def test_shares_of_one_secret_look_unrelated() -> None:
    secret = os.urandom(32)
    a = shamir.split(secret, 3, [1, 2, 3])
    b = shamir.split(secret, 3, [1, 2, 3])
    assert all(a[x] != b[x] for x in a)  # fresh random coefficients each time


def test_malformed_shares_are_refused() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, 2, [1, 2, 3])
    with pytest.raises(ShamirError):
        shamir.reconstruct({1: shares[1][:-1], 2: shares[2]}, 2)
    with pytest.raises(ShamirError):
        shamir.reconstruct({1: b"\xff" * 48, 2: shares[2]}, 2)  # element >= p
    with pytest.raises(ShamirError):
        shamir.split(secret, 2, [1, 1, 2])
    with pytest.raises(ShamirError):
        shamir.split(secret, 2, [0, 1, 2])
    with pytest.raises(ShamirError):
        shamir.split(secret, 4, [1, 2, 3])
    with pytest.raises(ShamirError):
        shamir.split(b"short", 2, [1, 2, 3])
    with pytest.raises(ShamirError):
        shamir.elements_to_secret([P - 1, P - 1, P - 1])
