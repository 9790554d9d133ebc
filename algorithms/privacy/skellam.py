"""Distributed discrete noise for participant-level DP: the Skellam mechanism under SecAgg.

Pipeline at each node, per round (:func:`encode_update`):

1. **clip** the model update to L2 norm ``C`` (``plan.clip``);
2. **scale** by ``γ`` (``plan.scale``, integers per model unit);
3. **stochastically round** each coordinate to an integer (unbiased);
4. **add a noise share** ``Sk(μ_total / m)`` per coordinate (``Sk(μ)`` is
   ``Poisson(μ) − Poisson(μ)``, variance ``2μ``);
5. hand the integers to secure aggregation, which sums them in ``Z_2^32``; the
   coordinator views the ``uint32`` sum as ``int32`` and divides by
   ``γ · s`` for ``s`` contributors (:func:`decode_sum`).

Why Skellam (Agarwal, Kairouz & Liu, "The Skellam Mechanism for Differentially
Private Federated Learning", NeurIPS 2021): it is integer-valued, so it passes
through modular secure aggregation unchanged, and it is *closed under
summation* — the sum of ``s`` independent ``Sk(μ_i)`` shares is exactly
``Sk(Σ μ_i)`` — so the noise in the revealed sum is a Skellam mechanism whose
privacy is accounted in :mod:`.accounting` (no approximation of "a sum of
discrete Gaussians" is needed). Sampling needs only a Poisson sampler.

**Shares of μ_total / m.** Each node adds ``Sk(μ_total / m)`` where ``m`` is
``min_contributors``. A sum of ``s ≥ m`` contributions carries
``Sk(s · μ_total / m)``: variance ``2 μ_total s / m ≥ 2 μ_total``, i.e. at least
the full noise the guarantee was computed for (more noise only helps: the RDP
bound decreases in μ). A sum of fewer than ``m`` contributions carries too
little noise and must never be revealed; nodes refuse to help unmask it and
:func:`decode_sum` refuses to decode it.

**Sensitivity without conditional rounding.** Stochastic rounding moves each
coordinate by strictly less than 1, so the rounded vector of a clipped update
has L2 norm at most ``γC + sqrt(d)`` — *deterministically*. That is the L2
sensitivity ``Δ2`` we account with; the L1 sensitivity of an integer vector is
``Δ1 = min(Δ2², sqrt(d)·Δ2)`` (``|v| ≤ v²`` for integers, and Cauchy–Schwarz).
The distributed discrete Gaussian paper (Kairouz, Liu & Steinke, ICML 2021)
instead re-rounds until the norm is below a smaller, probabilistic bound
("conditional rounding" with a failure probability β); with a 32-bit ring we
can afford ``γC ≥ 100 sqrt(d)`` (enforced by :func:`make_plan`), where the
deterministic bound costs at most 1 % extra sensitivity, so we keep the simpler
unconditional rounding and no β enters the guarantee.

**No modular wrap (headroom).** A node's integers satisfy
``|v_j| ≤ node_bound = ceil(γC) + 1 + ceil(τ · sqrt(2 μ_per_node))``: its
rounded update has ``|round(γ x_j)| ≤ ceil(γC)`` in *every* coordinate (a
coordinate is at most the norm), and its noise is below ``τ`` standard
deviations except with probability ≤ ``2 exp(−τ²/2)``-ish per coordinate
(:attr:`SkellamPlan.tail_probability` gives the exact Chernoff bound; about
1e-31 for the default ``τ = 12``). :func:`make_plan` picks ``γ`` so that
``max_nodes · node_bound ≤ 2^31 − 1``: even if every node put its whole norm
and an extreme noise value in the same coordinate, the signed sum cannot wrap.
A node whose values would exceed ``node_bound`` aborts *before* releasing
anything (:class:`NoiseBoundExceeded`). Even a wrap would not break privacy —
reducing modulo ``2^32`` is post-processing of the noisy sum — it would only
corrupt the model, which is why the coordinator also refuses sums outside
``s · node_bound``.

**Why no random rotation.** DDG and the Skellam paper rotate the update
(randomised Hadamard) before quantising so that no coordinate is much larger
than ``||x|| / sqrt(d)``; that lets them use small rings (e.g. 16–20 bits) with
modular clipping. Our ring is 32 bits and we size the headroom for the worst
case ``|x_j| ≤ ||x||`` instead. Since ``node_bound ≈ γC (1 + τ z / sqrt(m))``,
``γC ≥ 100 sqrt(d)`` is reachable whenever roughly
``z ≤ (sqrt(m)/τ) · (2^31 / (100 · max_nodes · sqrt(d)) − 1)`` — e.g. z ≤ 12 for
10^7 parameters, 64 nodes and m = 2; z ≤ 56 for 10^6 parameters, 100 nodes and
m = 10 — and :func:`make_plan` raises a clear error beyond. No rotation means no
wrap analysis, no padding to a power of two and no shared rotation seed; a
rotation (or a smaller τ) is the way to go further.

**Randomness.** All randomness (rounding and noise) comes from AES-128-CTR
keystreams (:class:`wharf.algorithms.secagg.prg.KeyStream`) under a fresh
16-byte ``os.urandom`` key per update, never from NumPy's generators: anyone who
could reproduce a node's noise could subtract it from the sum. Uniforms are
53-bit (``(w >> 11) + 1/2) · 2^-53`` from 64-bit keystream words, never exactly
0 or 1). The Poisson sampler is exact up to float64 arithmetic: inversion below
``μ = 10``, Hörmann's PTRS above ("The transformed rejection method for
generating Poisson random variables", Insurance: Mathematics and Economics 12,
1993), with the acceptance test evaluated through Loader's saddle-point form
(``bd0``/Stirling error) so it stays accurate for ``μ`` up to ``2^52``, where
``−μ + k log μ − log k!`` computed naively would lose every significant digit.

**What the guarantee does not cover.**

* *Participation.* The coordinator learns which nodes contributed to a sum
  (secure aggregation reveals the survivor set), so the guarantee is about
  *what* a participant contributed: the neighbouring relation is "one
  participant's update replaced by zero" (zero-out), not add/remove.
* *Collusion.* Colluding nodes know their own shares and can subtract them.
  With ``c`` colluders among ``s`` contributors the honest noise is
  ``2 μ_total (s − c) / m``; the full guarantee needs ``s − c ≥ m`` (choose
  ``min_contributors`` with the tolerated collusion in mind).
* *Nodes that skip their noise* lower the noise of everyone's sum in the same
  way; each node only trusts the share it adds itself.
* *Anything outside the summed vector*: metrics, timings, sample counts, the
  number of rounds actually run (the coordinator must stop at the planned
  ``rounds``), and the node's own local logs (the norm reported by
  :func:`encode_update` is for local logs only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import gammaln

from wharf.algorithms.secagg.prg import PRG_KEY_BYTES, KeyStream, derive_prg_key

__all__ = [
    "DEFAULT_TAIL_FACTOR",
    "MAX_MU",
    "MIN_SCALE_RATIO",
    "NoiseBoundExceeded",
    "SkellamPlan",
    "decode_sum",
    "derive_update_keys",
    "encode_update",
    "make_plan",
    "poisson",
    "skellam_noise",
]

DEFAULT_TAIL_FACTOR = 12.0
"""``τ``: a node's noise share is budgeted up to ``τ`` standard deviations per coordinate."""

MIN_TAIL_FACTOR = 8.0
"""Smaller ``τ`` would make over-the-bound aborts a practical nuisance for large models."""

MIN_SCALE_RATIO = 100.0
"""``γC`` must be at least this many times ``sqrt(d)`` (quantisation must not dominate)."""

MAX_MU = float(2**52)
"""Largest Poisson mean sampled: every sample (about μ ± 100 sqrt(μ)) stays an exact float64
integer, which the PTRS arithmetic relies on."""

PTRS_MIN_MU = 10.0
"""Hörmann's PTRS is valid for μ ≥ 10; below we use inversion."""

_CLIP_MARGIN = 1.0 - 1e-9
"""Clip to ``C (1 − 1e-9)`` so float rounding in the norm can never leave a clipped update
above ``C`` (the deterministic sensitivity bound relies on ``||γ x|| ≤ γC``)."""

_BLOCK = 1 << 18
"""Values per sampling/rounding block: bounds scratch memory for 10^7-parameter models."""

_ZEROS = bytes(16 * _BLOCK)
"""Zero plaintext for the keystream (two 8-byte words per value at most)."""

_TWO_M53 = 2.0**-53
_BD0_SERIES = tuple(1.0 / (2 * j + 1) for j in range(8, 0, -1))
"""1/17, 1/15, ..., 1/3: with |v| < 0.1 the next term is below 2e-17 of the first."""
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class NoiseBoundExceeded(ValueError):
    """A noised value exceeded ``plan.node_bound``; nothing was released (see encode_update)."""


# ------------------------------------------------------------------------ the plan


def _node_bound(scale: float, clip: float, mu_per_node: float, tail_factor: float) -> int:
    return math.ceil(scale * clip) + 1 + math.ceil(tail_factor * math.sqrt(2.0 * mu_per_node))


def _derived(
    clip: float,
    num_params: int,
    min_contributors: int,
    noise_multiplier: float,
    scale: float,
    tail_factor: float,
) -> dict[str, Any]:
    """The plan's derived values, from IEEE-exact operations only (``+ − × ÷ sqrt``, ceil).

    Every party — the nodes and the coordinator — recomputes the plan independently, so
    these must be bit-identical on every platform; no ``log``/``exp`` here.
    """
    std = noise_multiplier * scale * clip  # x * x, not x ** 2: pow() may differ by an ulp
    mu_total = std * std / 2.0
    mu_per_node = mu_total / min_contributors
    root_d = math.sqrt(num_params)
    l2 = scale * clip + root_d
    return {
        "mu_total": mu_total,
        "mu_per_node": mu_per_node,
        "l2_sensitivity": l2,
        "l1_sensitivity": min(l2 * l2, root_d * l2),
        "node_bound": _node_bound(scale, clip, mu_per_node, tail_factor),
    }


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SkellamPlan:
    """Everything a node needs to noise its update, and a verifier to check the noise.

    Units: ``clip`` is in model units; ``scale`` (γ) converts model units to integers;
    ``noise_multiplier`` (z) is the standard deviation of the *aggregate* noise divided
    by ``clip`` in model units, so the aggregate standard deviation in integers is
    ``z · γ · C`` and ``mu_total = (z γ C)² / 2`` (``Sk(μ)`` has variance ``2μ``). The
    sensitivities are in integer units. Derived fields are checked on construction, so
    a plan read with :meth:`from_dict` is internally consistent or refused.
    """

    clip: float
    num_params: int
    min_contributors: int
    max_nodes: int
    noise_multiplier: float
    scale: float
    mu_total: float
    mu_per_node: float
    l2_sensitivity: float
    l1_sensitivity: float
    node_bound: int
    tail_factor: float = DEFAULT_TAIL_FACTOR
    ring_bits: int = 32

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid Skellam plan: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        out: list[str] = []
        if not (_is_real(self.clip) and self.clip > 0):
            out.append(f"clip must be a positive finite number, got {self.clip!r}")
        if not (_is_int(self.num_params) and self.num_params >= 1):
            out.append(f"num_params must be an integer >= 1, got {self.num_params!r}")
        if not (_is_int(self.min_contributors) and self.min_contributors >= 1):
            out.append(f"min_contributors must be an integer >= 1, got {self.min_contributors!r}")
        if not (_is_int(self.max_nodes) and self.max_nodes >= 1):
            out.append(f"max_nodes must be an integer >= 1, got {self.max_nodes!r}")
        if not (_is_real(self.noise_multiplier) and self.noise_multiplier > 0):
            out.append(
                f"noise_multiplier must be positive and finite, got {self.noise_multiplier!r}"
            )
        if not (_is_real(self.scale) and self.scale > 0):
            out.append(f"scale must be positive and finite, got {self.scale!r}")
        if not (_is_real(self.tail_factor) and self.tail_factor >= MIN_TAIL_FACTOR):
            out.append(f"tail_factor must be >= {MIN_TAIL_FACTOR}, got {self.tail_factor!r}")
        if not (_is_int(self.ring_bits) and 8 <= self.ring_bits <= 32):
            out.append(f"ring_bits must be an integer in [8, 32], got {self.ring_bits!r}")
        if out:
            return out
        if self.min_contributors > self.max_nodes:
            out.append(f"min_contributors {self.min_contributors} > max_nodes {self.max_nodes}")
        want = _derived(
            self.clip,
            self.num_params,
            self.min_contributors,
            self.noise_multiplier,
            self.scale,
            self.tail_factor,
        )
        for name, value in want.items():
            if getattr(self, name) != value:
                out.append(f"{name} is {getattr(self, name)!r}, the parameters give {value!r}")
        if out:
            return out
        limit = (1 << (self.ring_bits - 1)) - 1
        if self.max_nodes * self.node_bound > limit:
            out.append(
                f"{self.max_nodes} nodes x bound {self.node_bound} could wrap Z_2^{self.ring_bits}"
            )
        if self.scale * self.clip < MIN_SCALE_RATIO * math.sqrt(self.num_params):
            out.append(
                f"scale x clip = {self.scale * self.clip:.4g} < {MIN_SCALE_RATIO:g} x "
                f"sqrt(num_params) = {MIN_SCALE_RATIO * math.sqrt(self.num_params):.4g}"
            )
        if self.mu_per_node > MAX_MU:
            out.append(f"mu_per_node {self.mu_per_node:.4g} exceeds the sampler's {MAX_MU:.4g}")
        return out

    @property
    def aggregate_std(self) -> float:
        """Standard deviation of the minimal aggregate noise, in integer units (``z γ C``)."""
        return math.sqrt(2.0 * self.mu_total)

    @property
    def tail_probability(self) -> float:
        """Chernoff bound on ``P(|Sk(μ_per_node)| > node_bound − ceil(γC) − 1)`` per coordinate.

        ``E[e^{tX}] = exp(2μ(cosh t − 1))`` for ``X ~ Sk(μ)``, so
        ``P(X ≥ a) ≤ exp(2μ(cosh t − 1) − t a)`` at ``t = asinh(a / 2μ)``; doubled for
        both tails. For large μ this is about ``2 exp(−τ²/2)`` (≈ 1e-31 at τ = 12).
        """
        a = self.node_bound - math.ceil(self.scale * self.clip) - 1
        mu = self.mu_per_node
        t = math.asinh(a / (2.0 * mu))
        return min(1.0, 2.0 * math.exp(2.0 * mu * (math.cosh(t) - 1.0) - t * a))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats survive a JSON round trip exactly)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> SkellamPlan:
        """Strict inverse of :meth:`to_dict`: exactly the fields, right types, consistent."""
        if not isinstance(raw, Mapping):
            raise ValueError("a Skellam plan must be a mapping")
        names = {f.name for f in fields(cls)}
        if set(raw) != names:
            missing, extra = sorted(names - set(raw)), sorted(set(raw) - names)
            raise ValueError(f"Skellam plan fields: missing {missing}, unknown {extra}")
        values = dict(raw)
        for name in _REAL_FIELDS:
            v = values[name]
            if not _is_real(v):
                raise ValueError(f"Skellam plan {name} must be a finite number, got {v!r}")
            values[name] = float(v)
        for name in _INT_FIELDS:
            if not _is_int(values[name]):
                raise ValueError(f"Skellam plan {name} must be an integer, got {values[name]!r}")
        return cls(**values)


_REAL_FIELDS = tuple(f.name for f in fields(SkellamPlan) if f.type in ("float", float))
_INT_FIELDS = tuple(f.name for f in fields(SkellamPlan) if f.type in ("int", int))


def make_plan(
    clip: float,
    num_params: int,
    min_contributors: int,
    max_nodes: int,
    noise_multiplier: float,
    ring_bits: int = 32,
    *,
    tail_factor: float = DEFAULT_TAIL_FACTOR,
) -> SkellamPlan:
    """The plan with the largest scale γ whose worst case still fits the ring.

    Larger γ means finer quantisation *and* relatively smaller rounding inflation of
    the sensitivity (``sqrt(d) / γC``); the noise scales with γ, so privacy in ratio
    terms is unchanged. ``node_bound(γ)`` is non-decreasing in γ, so a fixed-length
    bisection finds the largest γ with ``max_nodes · node_bound ≤ 2^(ring_bits−1) − 1``
    (and ``mu_per_node ≤ MAX_MU``) — deterministically, so every party gets the same γ.

    Raises ValueError if that γ leaves ``γC < 100 sqrt(d)``: the rounding term
    ``sqrt(d)`` in ``Δ2 = γC + sqrt(d)`` would then inflate the sensitivity by more
    than 1 % (ε grows with ``Δ2²``), and the rounding error (up to ``sqrt(d)/2`` in
    norm) would no longer be small against the clipped signal ``γC``. The fix is
    fewer ``max_nodes``, less noise, or a smaller model.
    """
    if not (_is_real(clip) and clip > 0):
        raise ValueError(f"clip must be a positive finite number, got {clip!r}")
    if not (_is_int(num_params) and num_params >= 1):
        raise ValueError(f"num_params must be an integer >= 1, got {num_params!r}")
    if not (_is_int(min_contributors) and min_contributors >= 1):
        raise ValueError(f"min_contributors must be an integer >= 1, got {min_contributors!r}")
    if not (_is_int(max_nodes) and max_nodes >= min_contributors):
        raise ValueError(
            f"max_nodes must be an integer >= min_contributors ({min_contributors}), "
            f"got {max_nodes!r}"
        )
    if not (_is_real(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be positive and finite, got {noise_multiplier!r}")
    if not (_is_int(ring_bits) and 8 <= ring_bits <= 32):
        raise ValueError(f"ring_bits must be an integer in [8, 32], got {ring_bits!r}")
    if not (_is_real(tail_factor) and tail_factor >= MIN_TAIL_FACTOR):
        raise ValueError(f"tail_factor must be >= {MIN_TAIL_FACTOR}, got {tail_factor!r}")
    clip, noise_multiplier, tail_factor = float(clip), float(noise_multiplier), float(tail_factor)
    limit = (1 << (ring_bits - 1)) - 1

    def fits(scale: float) -> bool:
        std = noise_multiplier * scale * clip
        mu_pn = std * std / 2.0 / min_contributors
        if mu_pn > MAX_MU:
            return False
        return max_nodes * _node_bound(scale, clip, mu_pn, tail_factor) <= limit

    lo, hi = 0.0, limit / (max_nodes * clip)  # node_bound > scale * clip: hi never fits
    for _ in range(1100):  # reaches adjacent floats long before; fixed count = deterministic
        mid = lo + (hi - lo) / 2.0
        if mid <= lo or mid >= hi:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    scale = lo
    root_d = math.sqrt(num_params)
    if scale * clip < MIN_SCALE_RATIO * root_d:
        raise ValueError(
            f"participant-level noise does not fit the {ring_bits}-bit ring: with "
            f"max_nodes={max_nodes}, noise_multiplier={noise_multiplier:g}, "
            f"min_contributors={min_contributors} the largest scale gives "
            f"scale x clip = {scale * clip:.4g} integers, but {num_params} parameters need "
            f">= {MIN_SCALE_RATIO:g} x sqrt(d) = {MIN_SCALE_RATIO * root_d:.4g} so rounding "
            "does not dominate; lower max_nodes or the noise, or use a smaller model"
        )
    return SkellamPlan(
        clip=clip,
        num_params=num_params,
        min_contributors=min_contributors,
        max_nodes=max_nodes,
        noise_multiplier=noise_multiplier,
        scale=scale,
        tail_factor=tail_factor,
        ring_bits=ring_bits,
        **_derived(clip, num_params, min_contributors, noise_multiplier, scale, tail_factor),
    )


# ------------------------------------------------------------------ randomness


def _uniforms(stream: KeyStream, n: int) -> NDArray[np.float64]:
    """``n`` uniforms ``((w >> 11) + 1/2) · 2^-53`` in (0, 1) from the next 8n keystream bytes."""
    out = np.empty(n, dtype=np.float64)
    done = 0
    while done < n:
        take = min(n - done, len(_ZEROS) // 8)
        buf = bytearray(8 * take)
        stream.fill(memoryview(_ZEROS)[: 8 * take], memoryview(buf))
        words = np.frombuffer(buf, dtype="<u8") >> np.uint64(11)
        np.multiply(words.astype(np.float64) + 0.5, _TWO_M53, out=out[done : done + take])
        done += take
    return out


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes | bytearray) or len(key) != PRG_KEY_BYTES:
        raise ValueError(f"keys are {PRG_KEY_BYTES} bytes (AES-128)")


def _stirlerr(k: NDArray[np.float64]) -> NDArray[np.float64]:
    """``log k! − [(k + 1/2) log k − k + log(2π)/2]`` for ``k ≥ 1`` (Stirling's error)."""
    out = np.empty_like(k)
    small = k < 16.0
    if small.any():
        ks = k[small]
        out[small] = gammaln(ks + 1.0) - (ks + 0.5) * np.log(ks) + ks - _HALF_LOG_2PI
    big = ~small
    if big.any():
        r = 1.0 / k[big]
        r2 = r * r
        # 1/12k − 1/360k³ + 1/1260k⁵ − 1/1680k⁷ + 1/1188k⁹: below 1e-16 from k = 16.
        out[big] = r * (
            1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 * (1.0 / 1680 - r2 / 1188)))
        )
    return out


def _bd0(k: NDArray[np.float64], mu: float, delta: NDArray[np.float64]) -> NDArray[np.float64]:
    """Loader's ``bd0(k, μ) = k log(k/μ) + μ − k`` without cancellation (``delta = k − μ``).

    Near ``k ≈ μ`` both ``k log(k/μ)`` and ``k − μ`` are huge and nearly equal; with
    ``v = (k − μ)/(k + μ)``, ``bd0 = (k − μ) v + 2k Σ_{j≥1} v^(2j+1)/(2j+1)``, which is
    accurate to a few ulps of the result.
    """
    out = np.empty_like(k)
    near = np.abs(delta) < 0.1 * (k + mu)
    if near.any():
        kn, dn = k[near], delta[near]
        v = dn / (kn + mu)
        v2 = v * v
        series = np.zeros_like(v)
        for c in _BD0_SERIES:  # Horner in v²: Σ_{j=1..8} v^(2j+1)/(2j+1), |v| < 0.1
            series = series * v2 + c
        series *= v * v2
        out[near] = dn * v + 2.0 * kn * series
    far = ~near
    if far.any():
        kf = k[far]
        out[far] = kf * np.log(kf / mu) + mu - kf
    return out


class _Poisson:
    """An exact Poisson(μ) sampler reading uniforms from one keystream, block by block."""

    def __init__(self, mu: float, stream: KeyStream) -> None:
        self.mu = mu
        self.stream = stream
        if mu < PTRS_MIN_MU:
            top = int(mu + 20.0 * math.sqrt(mu) + 40.0)  # P(X > top) < 1e-40 for μ < 10
            if mu == 0.0:
                self.cdf = np.ones(1)
            else:
                k = np.arange(top + 1, dtype=np.float64)
                self.cdf = np.cumsum(np.exp(k * math.log(mu) - mu - gammaln(k + 1.0)))
        else:
            slam = math.sqrt(mu)
            self.b = 0.931 + 2.53 * slam
            self.a = -0.059 + 0.02483 * self.b
            self.log_alpha = math.log(1.1239 + 1.1328 / (self.b - 3.4))
            self.vr = 0.9277 - 3.6224 / (self.b - 2.0)
            self.mu_int = math.floor(mu)
            self.mu_frac = mu - self.mu_int
            # Candidates this far from μ are rejected by PTRS anyway: their log-pmf is below
            # −150 while the test's left side is at least about −128 (uniforms >= 2^-54).
            self.cap = 100.0 * slam + 200.0

    def sample(self, n: int) -> NDArray[np.int64]:
        out = np.empty(n, dtype=np.int64)
        if n == 0:
            return out
        if self.mu < PTRS_MIN_MU:
            return self._inversion(out)
        return self._ptrs(out)

    def _inversion(self, out: NDArray[np.int64]) -> NDArray[np.int64]:
        """``k = min{k : U < F(k)}``; a U beyond the table's float cdf is drawn again."""
        pending = np.arange(out.size)
        while pending.size:
            u = _uniforms(self.stream, pending.size)
            k = np.searchsorted(self.cdf, u, side="right")
            ok = k < self.cdf.size
            out[pending[ok]] = k[ok]
            pending = pending[~ok]
        return out

    def _ptrs(self, out: NDArray[np.int64]) -> NDArray[np.int64]:
        """Hörmann's PTRS, vectorised: each pass draws (U, V) for every pending value.

        Candidates are kept as float offsets ``j = k − floor(μ)`` (exact integers below
        2^53) so ``floor(μ)`` never passes through float addition at 10^15.
        """
        a, b, vr = self.a, self.b, self.vr
        pending = np.arange(out.size)
        with np.errstate(divide="ignore"):
            while pending.size:
                m = pending.size
                uv = _uniforms(self.stream, 2 * m)
                u = uv[:m] - 0.5
                v = uv[m:]
                us = 0.5 - np.abs(u)
                j = np.floor((2.0 * a / us + b) * u + (self.mu_frac + 0.43))
                accept = (us >= 0.07) & (v <= vr)
                slow = ~accept & ~(
                    (j < -self.mu_int) | ((us < 0.013) & (v > us)) | (np.abs(j) > self.cap)
                )
                if slow.any():
                    js, uss, vs = j[slow], us[slow], v[slow]
                    lhs = np.log(vs) + self.log_alpha - np.log(a / (uss * uss) + b)
                    accept[slow] = lhs <= self._log_pmf(js)
                out[pending[accept]] = self.mu_int + j[accept].astype(np.int64)
                pending = pending[~accept]
        return out

    def _log_pmf(self, j: NDArray[np.float64]) -> NDArray[np.float64]:
        """``log P(X = floor(μ) + j)`` via ``−bd0 − log(2πk)/2 − stirlerr(k)``."""
        k = self.mu_int + j
        res = np.full_like(k, -self.mu)  # k = 0
        pos = k >= 1.0
        if pos.any():
            kp = k[pos]
            delta = j[pos] - self.mu_frac
            res[pos] = -_bd0(kp, self.mu, delta) - 0.5 * np.log(kp) - _HALF_LOG_2PI - _stirlerr(kp)
        return res


def _check_mu(mu: float) -> float:
    if not (_is_real(mu) and 0.0 <= mu <= MAX_MU):
        raise ValueError(f"mu must be a finite number in [0, {MAX_MU:g}], got {mu!r}")
    return float(mu)


def _check_size(size: int) -> None:
    if not (_is_int(size) and size >= 0):
        raise ValueError(f"size must be a non-negative integer, got {size!r}")


def poisson(mu: float, size: int, key: bytes) -> NDArray[np.int64]:
    """``size`` Poisson(μ) samples driven by the AES-128-CTR keystream of ``key``."""
    mu = _check_mu(mu)
    _check_size(size)
    _check_key(key)
    sampler = _Poisson(mu, KeyStream(bytes(key)))
    out = np.empty(size, dtype=np.int64)
    for start in range(0, size, _BLOCK):
        stop = min(size, start + _BLOCK)
        out[start:stop] = sampler.sample(stop - start)
    return out


def skellam_noise(mu: float, size: int, key: bytes) -> NDArray[np.int64]:
    """``size`` samples of ``Sk(μ) = Poisson(μ) − Poisson(μ)`` (mean 0, variance ``2μ``).

    Deterministic for a given ``key`` (16 bytes; ``os.urandom`` in production), so a
    test or an auditor holding the key can regenerate the noise exactly. Blocks of
    2^18 values alternate the two Poisson draws on one keystream.
    """
    mu = _check_mu(mu)
    _check_size(size)
    _check_key(key)
    sampler = _Poisson(mu, KeyStream(bytes(key)))
    out = np.empty(size, dtype=np.int64)
    for start in range(0, size, _BLOCK):
        stop = min(size, start + _BLOCK)
        first = sampler.sample(stop - start)
        np.subtract(first, sampler.sample(stop - start), out=out[start:stop])
    return out


# ------------------------------------------------------------------ encode / decode


def derive_update_keys(key: bytes) -> tuple[bytes, bytes]:
    """The (rounding, noise) AES keys :func:`encode_update` derives from its ``key``.

    HKDF with distinct labels keeps the two keystreams independent. Public so a test
    or an audit holding ``key`` can regenerate the noise share and check an encoding.
    """
    _check_key(key)
    return (
        derive_prg_key(bytes(key), b"wharf/dp/skellam|rounding"),
        derive_prg_key(bytes(key), b"wharf/dp/skellam|noise"),
    )


def _l2_norm(x: NDArray[np.float64]) -> float:
    """L2 norm that neither overflows nor underflows (scaled by the largest magnitude)."""
    if x.size == 0:
        return 0.0
    top = float(np.max(np.abs(x)))
    if top == 0.0:
        return 0.0
    y = x / top
    return top * math.sqrt(float(np.dot(y, y)))


def encode_update(
    delta: ArrayLike, plan: SkellamPlan, key: bytes | None = None
) -> tuple[NDArray[np.int64], dict[str, Any]]:
    """Clip, scale, stochastically round and noise one model update (flat, ``num_params``).

    Returns the integers for the ``"update"`` segment (``|v| ≤ plan.node_bound``) and
    ``{"norm": ..., "clipped": ...}`` — the update's original L2 norm and whether it
    was clipped, **for the node's local logs only** (they are not covered by the
    guarantee and must never be sent).

    ``key`` (16 bytes) fixes the rounding and noise for tests; leave it ``None`` in
    production so a fresh ``os.urandom`` key is drawn and forgotten.

    Raises ValueError on NaN/inf or a wrong length, and :class:`NoiseBoundExceeded` if a
    value would exceed ``node_bound``. That needs a noise value beyond ``τ`` standard
    deviations (probability ``plan.tail_probability`` per coordinate, about 1e-31), and
    it is raised *before* anything leaves the node: the round only sees a dropout,
    an event of the noise alone up to that negligible probability (it can be counted
    in δ), and resampling instead would truncate the noise distribution the accounting
    assumes.
    """
    x = np.asarray(delta, dtype=np.float64).reshape(-1)
    if x.size != plan.num_params:
        raise ValueError(f"the update has {x.size} values, the plan is for {plan.num_params}")
    if not bool(np.isfinite(x).all()):
        raise ValueError("the update contains NaN or infinity")
    master = os.urandom(PRG_KEY_BYTES) if key is None else bytes(key)
    rounding_key, noise_key = derive_update_keys(master)
    norm = _l2_norm(x)
    limit = plan.clip * _CLIP_MARGIN
    factor = plan.scale * (limit / norm if norm > limit else 1.0)
    rounding = KeyStream(rounding_key)
    out = np.empty(x.size, dtype=np.int64)
    for start in range(0, x.size, _BLOCK):
        stop = min(x.size, start + _BLOCK)
        y = x[start:stop] * factor
        low = np.floor(y)
        # floor(y) + [u < frac(y)]: P(round up) = frac(y) exactly (to 2^-53); y − floor(y)
        # is exact in float64, unlike floor(y + u) for large |y|.
        up = _uniforms(rounding, stop - start) < (y - low)
        out[start:stop] = low.astype(np.int64) + up
    out += skellam_noise(plan.mu_per_node, x.size, noise_key)
    if out.size and int(np.max(np.abs(out))) > plan.node_bound:
        raise NoiseBoundExceeded(
            f"a noised value exceeds the plan's bound {plan.node_bound} (a noise draw beyond "
            f"{plan.tail_factor:g} standard deviations); nothing was sent, the node drops out "
            "of this round"
        )
    return out, {"norm": norm, "clipped": bool(norm > plan.clip)}


def decode_sum(
    total: ArrayLike,
    num_contributors: int,
    plan: SkellamPlan,
    *,
    noise_shares: int | None = None,
) -> NDArray[np.float32]:
    """The mean update ``total / (γ · s)`` from the signed integer sum of ``s`` encodings.

    ``noise_shares`` (default ``s``) is how many encodings the sum holds when some
    carry noise only (a leave-one-out coalition sum: every survivor noises every
    segment, the left-out node adds a zero update); the noise and range checks use it,
    the mean divides by the ``s`` members.

    Uniform weights (every contributor counts 1/s, not by its sample count): the
    guarantee bounds what *one participant* can change in the sum, ``Δ2 = γC + sqrt(d)``.
    Weighting by data size would scale a large node's contribution — and so the
    sensitivity — by its weight, and the weights themselves are private.

    Refuses fewer than ``min_contributors`` contributions (the sum would carry less noise
    than planned: it must not be used) and sums outside ``s · node_bound`` (corrupt).
    """
    arr = np.asarray(total)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError("the aggregate must be integers (the signed view of the ring sum)")
    arr = arr.astype(np.int64).reshape(-1)
    if arr.size != plan.num_params:
        raise ValueError(f"the sum has {arr.size} values, the plan is for {plan.num_params}")
    shares = num_contributors if noise_shares is None else noise_shares
    if not _is_int(shares) or not 1 <= shares <= plan.max_nodes:
        raise ValueError(f"noise_shares {shares!r} outside [1, {plan.max_nodes}]")
    if not _is_int(num_contributors) or not 1 <= num_contributors <= shares:
        raise ValueError(f"num_contributors {num_contributors!r} outside [1, {shares}]")
    if shares < plan.min_contributors:
        raise ValueError(
            f"{shares} contributions carry less noise than the plan's "
            f"{plan.min_contributors}; this sum is not covered by the guarantee"
        )
    if arr.size and int(np.max(np.abs(arr))) > shares * plan.node_bound:
        raise ValueError(
            f"the sum exceeds {shares} x node_bound: wrong contributor count or a corrupt aggregate"
        )
    return (arr.astype(np.float64) / (plan.scale * num_contributors)).astype(np.float32)
