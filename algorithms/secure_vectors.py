"""What a node puts in its masked vector, and how the coordinator reads the sum.

Under secure aggregation the coordinator sees only the sum of the nodes'
vectors, so everything it needs — the example-weighted update, the number of
examples, the metric sums, the feature moments for standardisation — travels
*inside* the vector and is revealed only in aggregate.

Two kinds of content:

* **Training round** (:func:`update_layout`): the update weighted by
  ``w_i = n_i / row_cap`` (``row_cap`` is a public bound on any node's row
  count, so ``w_i <= 1`` and the clip range stays meaningful), the exact
  example count ``n_i``, and metric sums scaled by ``1 / row_cap``. The
  coordinator recovers ``Σ n_i Δ_i / Σ n_i`` = the FedAvg mean.
* **Training round with participant-level DP** (:func:`dp_update_layout`):
  one exact integer segment holding the node's clipped, scaled, rounded update
  plus its Skellam noise share (:mod:`wharf.algorithms.privacy.skellam`). No
  example count and no metrics: with uniform weights the coordinator divides by
  the (public) number of contributors, and every extra data-dependent value
  would be a release outside the guarantee.
* **Participant-level DP round with secure valuation** (:func:`dp_coalition_layout`):
  the same noised ``update`` segment, then one segment per roster node ``j``
  (``without.<j>``) holding the node's update again — or zeros in its own — each
  with a *fresh* encoding and noise share. The one unmasking reveals the training
  sum and every leave-one-out sum, each carrying the full participant-level noise;
  the accountant composes them as separate releases
  (:func:`wharf.algorithms.privacy.plan.releases_per_round`).
* **Training round with record-level DP only**: :func:`update_layout` with
  ``metrics=False`` — the update (DP-SGD output) weighted by the dataset's row
  count, which the registration certificate already makes public, and no
  metrics, for the same reason.
* **Statistics round** (:func:`stats_layout`): per-feature sums and sums of
  squares have no public magnitude bound, so they are sent as *exact* fixed
  point integers split into several limbs (``q = Σ_j limb_j · 2^(k·j)``). Each
  limb sums without wrapping thanks to the headroom, and the coordinator
  recombines the limb sums exactly with Python integers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.skellam import SkellamPlan
from wharf.algorithms.secagg.encoding import Segment, VectorLayout
from wharf.algorithms.secagg.params import SecAggParams

METRIC_NAMES = ("train_loss_sum", "eval_loss_sum", "eval_correct", "eval_count", "train_seconds")
METRIC_CLIP = 64.0
"""Metric sums are sent divided by ``row_cap``; a mean loss above 64 nats is clipped."""

STATS_FRACTION_BITS = 20
"""Feature moments are sent as integers at resolution 2^-20 (about 1e-6)."""
STATS_MAX_ABS = float(1 << 42)
"""Largest per-node feature sum or sum of squares the statistics vector accepts."""


class VectorError(ValueError):
    """A node's values do not fit the agreed vector layout."""


def update_layout(
    params: SecAggParams, num_params: int, row_cap: int, *, metrics: bool = True
) -> VectorLayout:
    """Layout for one training round: update, example count, metric sums (unless DP)."""
    if row_cap < 1:
        raise ValueError("row_cap must be positive")
    extras = [Segment.integer("num_examples", 1, row_cap)]
    if metrics:
        extras.append(Segment.real("metrics", len(METRIC_NAMES), METRIC_CLIP, params.value_bits))
    return VectorLayout.for_update(num_params, params, extras)


def update_inputs(
    flat_delta: NDArray[np.float32],
    num_examples: int,
    metrics: Mapping[str, float] | None,
    row_cap: int,
) -> dict[str, NDArray[np.floating] | NDArray[np.integer]]:
    """A node's inputs for :func:`update_layout` (``metrics=None`` for a layout without)."""
    if not 0 < num_examples <= row_cap:
        raise VectorError(f"example count {num_examples} outside (0, {row_cap}]")
    w = num_examples / row_cap
    out: dict[str, NDArray[np.floating] | NDArray[np.integer]] = {
        "update": np.asarray(flat_delta, dtype=np.float64) * w,
        "num_examples": np.array([num_examples], dtype=np.int64),
    }
    if metrics is not None:
        out["metrics"] = np.array([metrics.get(k, 0.0) / row_cap for k in METRIC_NAMES])
    return out


def decode_update(
    sums: Mapping[str, NDArray[np.float64] | NDArray[np.int64]], row_cap: int
) -> tuple[NDArray[np.float32], int, dict[str, float]]:
    """The FedAvg mean update, total examples, and total metric sums (empty if none)."""
    total = int(sums["num_examples"][0])
    if total <= 0:
        raise VectorError("aggregate reports no examples")
    mean = (np.asarray(sums["update"]) * (row_cap / total)).astype(np.float32)
    metrics = {}
    if "metrics" in sums:
        metrics = {
            k: float(v) * row_cap for k, v in zip(METRIC_NAMES, sums["metrics"], strict=True)
        }
    return mean, total, metrics


def dp_update_layout(params: SecAggParams, plan: SkellamPlan) -> VectorLayout:
    """Layout for a participant-level DP round: the noised integer update only.

    ``plan.node_bound`` bounds each node's values, and the plan was sized so that
    ``plan.max_nodes`` of them never wrap; a round larger than that is refused here.
    """
    if params.max_nodes > plan.max_nodes:
        raise VectorError(
            f"a round of {params.max_nodes} nodes exceeds the {plan.max_nodes} the "
            "participant-level noise plan was sized for"
        )
    return VectorLayout(
        [Segment.integer("update", plan.num_params, plan.node_bound)], params.max_nodes
    )


COALITION_PREFIX = "without."
"""Segment (and valuation-file) name of a leave-one-out sum: ``without.<node>``."""
ALL_COALITION = "all"
"""Valuation-file name of the training sum itself (every contributor)."""


def coalition_label(node: str) -> str:
    """Name of the leave-one-out sum over every contributor except ``node``."""
    return COALITION_PREFIX + node


def _roster(roster: Sequence[str], plan: SkellamPlan) -> list[str]:
    names = sorted(roster)
    if len(set(names)) != len(names) or not all(names):
        raise VectorError("the roster must name distinct nodes")
    if len(names) > plan.max_nodes:
        raise VectorError(
            f"a roster of {len(names)} nodes exceeds the {plan.max_nodes} leave-one-out sums "
            "per round the participant-level plan pays for"
        )
    return names


def dp_coalition_layout(
    params: SecAggParams, plan: SkellamPlan, roster: Sequence[str]
) -> VectorLayout:
    """Layout for a participant-level DP round that also carries secure valuation:
    ``update`` then ``without.<node>`` for each roster node (sorted by name)."""
    dp_update_layout(params, plan)  # the same round-size check
    segments = [Segment.integer("update", plan.num_params, plan.node_bound)]
    segments += [
        Segment.integer(coalition_label(n), plan.num_params, plan.node_bound)
        for n in _roster(roster, plan)
    ]
    return VectorLayout(segments, params.max_nodes)


def dp_coalition_inputs(
    flat: NDArray[np.floating], plan: SkellamPlan, roster: Sequence[str], me: str
) -> dict[str, NDArray[np.int64]]:
    """A node's values for :func:`dp_coalition_layout`: every segment its own fresh
    clip-scale-round-noise encoding (:func:`.skellam.encode_update`), zeros in its own
    leave-one-out segment — which still gets a full noise share, so every revealed sum
    holds as many noise shares as the round has contributors."""
    names = _roster(roster, plan)
    if me not in names:
        raise VectorError(f"{me!r} is not in the round's roster")
    zero = np.zeros(plan.num_params, dtype=np.float64)
    out = {"update": skellam.encode_update(flat, plan)[0]}
    for n in names:
        out[coalition_label(n)] = skellam.encode_update(zero if n == me else flat, plan)[0]
    return out


def decode_coalitions(
    sums: Mapping[str, NDArray[np.int64]],
    contributors: Sequence[str],
    roster: Sequence[str],
    plan: SkellamPlan,
) -> dict[str, tuple[NDArray[np.float32], int]]:
    """``{label: (noised mean update, members)}`` for the training sum (``"all"``) and
    each leave-one-out sum with at least one member.

    Every sum holds ``len(contributors)`` noise shares, so each is refused (ValueError)
    below the plan's ``min_contributors`` exactly like the training sum.
    """
    s = len(contributors)
    present = set(contributors)
    out = {ALL_COALITION: (skellam.decode_sum(np.asarray(sums["update"]), s, plan), s)}
    for n in _roster(roster, plan):
        members = s - (n in present)
        if members < 1:
            continue
        total = np.asarray(sums[coalition_label(n)])
        out[coalition_label(n)] = (
            skellam.decode_sum(total, members, plan, noise_shares=s),
            members,
        )
    return out


def _limb_bits(params: SecAggParams) -> int:
    # max_nodes * 2^k must stay below 2^31 (no wrap in Z_2^32, signed decode).
    return 30 - math.ceil(math.log2(max(params.max_nodes, 2)))


def _num_limbs(k: int) -> int:
    return math.ceil(63 / k)


def stats_layout(params: SecAggParams, num_features: int, row_cap: int) -> VectorLayout:
    """Layout for the statistics round: limbs of per-feature sums and squares, and the count."""
    k = _limb_bits(params)
    limbs = _num_limbs(k)
    segments = [
        Segment.integer(f"{name}.{j}", num_features, 1 << k)
        for name in ("sum", "sumsq")
        for j in range(limbs)
    ]
    segments.append(Segment.integer("count", 1, row_cap))
    return VectorLayout(segments, params.max_nodes)


def _to_limbs(values: NDArray[np.float64], k: int, limbs: int) -> list[NDArray[np.int64]]:
    if not np.all(np.isfinite(values)) or np.any(np.abs(values) > STATS_MAX_ABS):
        raise VectorError(
            f"feature moments exceed {STATS_MAX_ABS:.3g}; rescale the features before registering"
        )
    q = np.rint(values * (1 << STATS_FRACTION_BITS)).astype(np.int64)
    out = []
    mask = (1 << k) - 1
    for _ in range(limbs - 1):
        out.append(q & mask)  # non-negative low limb (two's complement for negatives)
        q = q >> k  # arithmetic shift: floor division
    out.append(q)
    return out


def stats_inputs(
    params: SecAggParams,
    total: NDArray[np.float64],
    total_sq: NDArray[np.float64],
    count: int,
) -> dict[str, NDArray[np.int64]]:
    """A node's inputs for :func:`stats_layout`."""
    k = _limb_bits(params)
    limbs = _num_limbs(k)
    out: dict[str, NDArray[np.int64]] = {}
    for name, values in (("sum", total), ("sumsq", total_sq)):
        for j, limb in enumerate(_to_limbs(np.asarray(values, np.float64).ravel(), k, limbs)):
            out[f"{name}.{j}"] = limb
    out["count"] = np.array([count], dtype=np.int64)
    return out


def decode_stats(
    params: SecAggParams,
    sums: Mapping[str, NDArray[np.float64] | NDArray[np.int64]],
) -> tuple[NDArray[np.float64], NDArray[np.float64], int]:
    """Exact recombination of the limb sums: (Σ sums, Σ squares, Σ count)."""
    k = _limb_bits(params)
    limbs = _num_limbs(k)
    result = []
    for name in ("sum", "sumsq"):
        parts = [sums[f"{name}.{j}"] for j in range(limbs)]
        combined = [
            sum(int(parts[j][i]) << (k * j) for j in range(limbs)) for i in range(len(parts[0]))
        ]
        result.append(
            np.array([c / (1 << STATS_FRACTION_BITS) for c in combined], dtype=np.float64)
        )
    return result[0], result[1], int(sums["count"][0])
