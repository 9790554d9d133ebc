"""Shamir secret sharing of 32-byte secrets over GF(2^127 - 1).

Why this field: ``p = 2**127 - 1`` is a Mersenne prime, so field elements are
Python integers of at most 127 bits (fast native big-int arithmetic) and
shares are short.

Why three field elements per secret (not two): a 32-byte secret has 256 bits
but two elements below ``p`` hold fewer than 254, and 16-byte halves are
``>= p`` about half of the time, so a naive 16+16 split would silently corrupt
some secrets. The secret is read as a big-endian integer ``v < 2**256`` and
written in base ``p``: ``v = e0 + e1*p + e2*p**2`` with ``e0, e1 < p`` and
``e2 <= 4``. Every 32-byte value round-trips; each digit is shared with an
independent random polynomial, so ``t - 1`` shares reveal nothing about any
digit. A share is the three evaluations, 16 bytes each big-endian (48 bytes);
its x-coordinate is the holder's roster index and travels beside it.

Reconstruction is Lagrange interpolation at 0. The coefficients depend only on
the holders' x-coordinates, so they are computed once per holder set with one
modular inversion (Montgomery's batch-inversion trick) and cached: a
coordinator reconstructing many secrets held by the same neighbourhoods pays
for interpolation only once per neighbourhood. Coefficients come from
``secrets`` (the OS CSPRNG).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = (1 << 127) - 1
SECRET_BYTES = 32
ELEMENTS_PER_SECRET = 3
ELEMENT_BYTES = 16
SHARE_BYTES = ELEMENTS_PER_SECRET * ELEMENT_BYTES


class ShamirError(ValueError):
    """Malformed shares, too few shares, or shares that do not agree."""


def secret_to_elements(secret: bytes) -> tuple[int, int, int]:
    """Base-``p`` digits of the 32-byte big-endian ``secret``."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secrets are {SECRET_BYTES} bytes, got {len(secret)}")
    v = int.from_bytes(secret, "big")
    v, e0 = divmod(v, PRIME)
    e2, e1 = divmod(v, PRIME)
    return e0, e1, e2


def elements_to_secret(elements: Sequence[int]) -> bytes:
    """Inverse of :func:`secret_to_elements`; refuses digits that encode no 32-byte value."""
    e0, e1, e2 = elements
    v = e0 + PRIME * (e1 + PRIME * e2)
    if v >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("shares do not reconstruct a 32-byte secret (inconsistent shares)")
    return v.to_bytes(SECRET_BYTES, "big")


def _encode_share(values: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(ELEMENT_BYTES, "big") for v in values)


def _decode_share(share: bytes) -> tuple[int, ...]:
    if len(share) != SHARE_BYTES:
        raise ShamirError(f"shares are {SHARE_BYTES} bytes, got {len(share)}")
    out = tuple(
        int.from_bytes(share[i : i + ELEMENT_BYTES], "big")
        for i in range(0, SHARE_BYTES, ELEMENT_BYTES)
    )
    if any(v >= PRIME for v in out):
        raise ShamirError("share element outside the field")
    return out


def _check_xs(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ShamirError("share x-coordinates must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share x-coordinates must be non-zero field elements")


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` so that any ``threshold`` of the holders ``xs`` can rebuild it."""
    xs = list(xs)
    _check_xs(xs)
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold {threshold} not in [1, {len(xs)}]")
    polys = [
        [e] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
        for e in secret_to_elements(secret)
    ]
    out: dict[int, bytes] = {}
    p = PRIME
    for x in xs:
        values = []
        for coeffs in polys:
            acc = 0
            for c in reversed(coeffs):  # Horner
                acc = (acc * x + c) % p
            values.append(acc)
        out[x] = _encode_share(values)
    return out


@lru_cache(maxsize=4096)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Coefficients ``l_j`` with ``f(0) = sum_j l_j f(x_j)`` for polynomials of degree < len(xs)."""
    _check_xs(xs)
    p = PRIME
    k = len(xs)
    nums = []
    dens = []
    for j, xj in enumerate(xs):
        num = 1
        den = 1
        for m, xm in enumerate(xs):
            if m != j:
                num *= xm
                den *= xm - xj
        nums.append(num % p)
        dens.append(den % p)
    # Montgomery batch inversion: one pow() for all denominators.
    prefix = [1] * (k + 1)
    for i, d in enumerate(dens):
        prefix[i + 1] = prefix[i] * d % p
    inv = pow(prefix[k], -1, p)
    inverses = [0] * k
    for i in range(k - 1, -1, -1):
        inverses[i] = inv * prefix[i] % p
        inv = inv * dens[i] % p
    return tuple(n * d % p for n, d in zip(nums, inverses, strict=True))


def reconstruct(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (uses the ``threshold`` lowest x)."""
    if threshold < 1:
        raise ShamirError("threshold must be at least 1")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, have {len(shares)}")
    xs = tuple(sorted(shares)[:threshold])
    lam = lagrange_at_zero(xs)
    p = PRIME
    acc = [0] * ELEMENTS_PER_SECRET
    for x, coeff in zip(xs, lam, strict=True):
        values = _decode_share(shares[x])
        for e in range(ELEMENTS_PER_SECRET):
            acc[e] += coeff * values[e]
    return elements_to_secret([a % p for a in acc])


def interpolate_elements(points: Mapping[int, Sequence[int]]) -> tuple[int, ...]:
    """Field-level interpolation at 0 of element vectors (for tests and analysis)."""
    xs = tuple(sorted(points))
    lam = lagrange_at_zero(xs)
    width = len(next(iter(points.values())))
    return tuple(
        sum(c * points[x][e] for x, c in zip(xs, lam, strict=True)) % PRIME for e in range(width)
    )
