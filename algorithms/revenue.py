"""How a product's price is split among the data holders who trained it.

A buyer receives, in the product bundle, the :class:`RevenueRule`, each data holder's
contribution score (see :mod:`wharf.algorithms.contribution`) and usage (sample visits
counted from the signed usage receipts), and can recompute every payout with
:func:`split`. The rule is deterministic and exact, so every machine gets the same
integers.

The rule, for ``n`` data holders with scores ``score_i`` and usage ``usage_i``:

1. **Contribution share.** ``s_i = max(score_i, 0)`` (a harmful or useless holder earns
   nothing from contribution, but does not take money from others either);
   ``c_i = s_i / Σ s`` — or ``1/n`` for everyone if ``Σ s = 0``.
2. **Usage share.** ``u_i = usage_i / Σ usage`` — or ``1/n`` if ``Σ usage = 0``.
3. **Blend and floor.** With ``f = floor_fraction`` and ``α = usage_weight``::

       w_i = f + (1 − n·f) · ((1 − α)·c_i + α·u_i)

   Every holder is guaranteed at least ``f`` of the price; the rest is shared by the
   blend of contribution and usage. The ``w_i`` are non-negative and sum to exactly 1.
   ``f`` is capped at exactly ``1/n``, so a floor written as ``0.1`` for ten holders
   means an equal split even though the float ``0.1`` is a hair above 1/10.
4. **Integer amounts.** The price is ``total_minor_units`` in the currency's minor unit
   (cents: money is never a float). Holder ``i`` gets ``⌊w_i·total⌋``; the units left
   over (fewer than ``n``) go one each to the holders with the largest fractional parts
   ``w_i·total − ⌊w_i·total⌋``, ties broken by name (ascending code-point order). The
   amounts therefore sum to exactly ``total_minor_units``, and each holder receives at
   least ``⌊f·total⌋``.

Exactness. All arithmetic above is done with :class:`fractions.Fraction`: each float
(score, ``floor_fraction``, ``usage_weight``) is taken at its exact binary value, so no
rounding happens anywhere before the final integer amounts. A float written to JSON by
Python (shortest round-trip repr) and read back by any correctly rounding JSON parser
is the same binary value, so a buyer's recomputation matches the exchange's integers
bit for bit, in any language that has exact rationals or big integers.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = ["RULE_VERSION", "RevenueRule", "shares", "split"]

#: Version of the rule above, stored in :meth:`RevenueRule.to_dict`; a bundle written
#: under another version is refused rather than silently split by different arithmetic.
RULE_VERSION = 1

_CURRENCY = re.compile(r"[A-Z]{3}")
_FIELDS = frozenset({"version", "total_minor_units", "currency", "floor_fraction", "usage_weight"})


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fraction_field(name: str, value: object) -> float:
    if not _is_real(value) or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    out = float(value)  # type: ignore[arg-type]
    if not 0.0 <= out <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {out!r}")
    return out


@dataclass(frozen=True)
class RevenueRule:
    """The price of a product and how it is shared (see the module docstring for the rule).

    ``total_minor_units`` is the price in the currency's minor unit (e.g. cents), an int
    ``>= 0``; ``currency`` is an ISO-4217-style code of three uppercase letters;
    ``floor_fraction`` is each holder's guaranteed minimum share (``0 <= f``, and
    ``f·n <= 1`` is checked when the number of holders is known); ``usage_weight`` in
    ``[0, 1]`` blends contribution (0) with usage (1).
    """

    total_minor_units: int
    currency: str
    floor_fraction: float
    usage_weight: float

    def __post_init__(self) -> None:
        if not _is_int(self.total_minor_units) or self.total_minor_units < 0:
            raise ValueError(
                f"total_minor_units must be an int >= 0 (minor units, e.g. cents), "
                f"got {self.total_minor_units!r}"
            )
        if not isinstance(self.currency, str) or not _CURRENCY.fullmatch(self.currency):
            raise ValueError(
                f"currency must be three uppercase letters (ISO 4217), got {self.currency!r}"
            )
        # Normalised to plain int/float so NumPy scalars compare, hash and serialise alike.
        object.__setattr__(self, "total_minor_units", int(self.total_minor_units))
        object.__setattr__(
            self, "floor_fraction", _fraction_field("floor_fraction", self.floor_fraction)
        )
        object.__setattr__(self, "usage_weight", _fraction_field("usage_weight", self.usage_weight))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the bundle (floats survive JSON exactly via repr)."""
        return {
            "version": RULE_VERSION,
            "total_minor_units": self.total_minor_units,
            "currency": self.currency,
            "floor_fraction": self.floor_fraction,
            "usage_weight": self.usage_weight,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RevenueRule:
        """Strict inverse of :meth:`to_dict`: exact key set, known version, exact types.

        ``total_minor_units`` must be an int (``100.0`` is refused: an amount that went
        through a float may already be wrong); the fractions may be ints or floats.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"revenue rule must be a mapping, got {type(data).__name__}")
        if set(data) != _FIELDS:
            missing = sorted(_FIELDS - set(data))
            extra = sorted(set(data) - _FIELDS)
            raise ValueError(f"revenue rule fields: missing {missing}, unexpected {extra}")
        version = data["version"]
        if not _is_int(version) or version != RULE_VERSION:
            raise ValueError(
                f"revenue rule version {version!r} is not supported (expected {RULE_VERSION})"
            )
        return cls(
            total_minor_units=data["total_minor_units"],
            currency=data["currency"],
            floor_fraction=data["floor_fraction"],
            usage_weight=data["usage_weight"],
        )


def _nodes(scores: Mapping[str, float], usage: Mapping[str, int]) -> list[str]:
    for name in (*scores, *usage):
        if not isinstance(name, str) or not name:
            raise ValueError(f"node names must be non-empty strings, got {name!r}")
    if set(scores) != set(usage):
        only_scores = sorted(set(scores) - set(usage))
        only_usage = sorted(set(usage) - set(scores))
        raise ValueError(
            f"scores and usage must name the same nodes: only in scores {only_scores}, "
            f"only in usage {only_usage}"
        )
    if not scores:
        raise ValueError("cannot split revenue among zero nodes")
    return sorted(scores)


def _normalised(values: Mapping[str, Fraction], names: list[str]) -> dict[str, Fraction]:
    total = sum(values.values(), Fraction(0))
    if total == 0:
        return {name: Fraction(1, len(names)) for name in names}
    return {name: values[name] / total for name in names}


def shares(
    rule: RevenueRule, scores: Mapping[str, float], usage: Mapping[str, int]
) -> dict[str, Fraction]:
    """Each node's exact share ``w_i`` of the price (sums to exactly 1), sorted by name.

    Exact rationals, for display (``float(w)``, ``str(w)``) and audit; the payable
    amounts are :func:`split`. Raises ValueError when the nodes of ``scores`` and
    ``usage`` differ, a score is not a finite number (NaN included), a usage count is
    not an int ``>= 0``, or ``floor_fraction · n > 1``.
    """
    names = _nodes(scores, usage)
    n = len(names)
    if rule.floor_fraction * n > 1.0:
        raise ValueError(
            f"floor_fraction {rule.floor_fraction} for {n} nodes guarantees more than the "
            f"whole price (floor·n = {rule.floor_fraction * n})"
        )
    positive: dict[str, Fraction] = {}
    visits: dict[str, Fraction] = {}
    for name in names:
        score, used = scores[name], usage[name]
        if not _is_real(score) or not math.isfinite(float(score)):
            raise ValueError(f"score of {name!r} must be a finite number, got {score!r}")
        if not _is_int(used) or used < 0:
            raise ValueError(f"usage of {name!r} must be an int >= 0, got {used!r}")
        positive[name] = max(Fraction(float(score)), Fraction(0))
        visits[name] = Fraction(int(used))
    contribution = _normalised(positive, names)
    usage_share = _normalised(visits, names)
    floor = min(Fraction(rule.floor_fraction), Fraction(1, n))
    alpha = Fraction(rule.usage_weight)
    rest = 1 - n * floor
    return {
        name: floor + rest * ((1 - alpha) * contribution[name] + alpha * usage_share[name])
        for name in names
    }


def split(
    rule: RevenueRule, scores: Mapping[str, float], usage: Mapping[str, int]
) -> dict[str, int]:
    """Integer amounts (minor units) per node, summing exactly to ``rule.total_minor_units``.

    Largest-remainder rounding of ``w_i · total`` with ties broken by node name, as
    stated in the module docstring; input validation as in :func:`shares`. The result
    depends only on the mapping contents, never on their order.
    """
    weights = shares(rule, scores, usage)
    total = rule.total_minor_units
    exact = {name: w * total for name, w in weights.items()}
    amounts = {name: math.floor(value) for name, value in exact.items()}
    leftover = total - sum(amounts.values())
    # Σ w_i is exactly 1, so 0 <= leftover < n; anything else is a bug, not bad input.
    if not 0 <= leftover < len(amounts):
        raise AssertionError(f"largest-remainder leftover {leftover} out of range")
    by_remainder = sorted(exact, key=lambda name: (-(exact[name] - amounts[name]), name))
    for name in by_remainder[:leftover]:
        amounts[name] += 1
    return amounts
