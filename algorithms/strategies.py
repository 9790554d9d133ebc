"""Server-side strategies: turn the round's average delta into the next global model.

Nodes send deltas (local weights minus the global weights they started from). The
coordinator averages them weighted by example count — from the individual deltas
with :func:`weighted_average`, or under secure aggregation from the masked sums
``Σ n_i·Δ_i`` and ``Σ n_i`` with :func:`average_from_sum` — and a strategy applies
that average.

Strategy state (server momentum etc.) is a flat ``dict[str, float32 array]`` so the
coordinator can store it as safetensors next to the global weights and resume
after a restart exactly where it stopped.

Frozen tensors. The Standardize buffers (``standardize.mean``/``.std``) are set
once by the coordinator from federated moments and must never be optimised, and
integer bookkeeping buffers (``num_batches_tracked``) are not weights at all.
Detecting "all-zero delta" would be fragile (a genuinely zero update would freeze a
weight, and server momentum would still move it otherwise), so strategies freeze
by *name*: every key matching :data:`DEFAULT_FROZEN` (fnmatch patterns) plus any
extra names or patterns given to :func:`make_strategy`. A frozen key is copied from
the current global weights unchanged, ignores whatever delta arrives for it, and
has no optimiser state.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import numpy as np

__all__ = [
    "DEFAULT_FROZEN",
    "STRATEGIES",
    "AdaptiveStrategy",
    "FedAvg",
    "Strategy",
    "Weights",
    "average_from_sum",
    "make_strategy",
    "weighted_average",
]

Weights = dict[str, np.ndarray]

STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad")

#: fnmatch patterns of state-dict keys no strategy ever changes.
DEFAULT_FROZEN: tuple[str, ...] = ("*.mean", "*.std", "mean", "std", "*num_batches_tracked")


def check_same(
    reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], what: str
) -> None:
    """``other`` has exactly ``reference``'s tensors, shapes, and only finite values
    (ValueError naming ``what`` otherwise): the check every update, average and
    coalition sum must pass before it is added to a model."""
    if set(reference) != set(other):
        missing = sorted(set(reference) - set(other))
        extra = sorted(set(other) - set(reference))
        raise ValueError(f"{what} does not match: missing {missing}, unexpected {extra}")
    for name, arr in other.items():
        if np.shape(arr) != np.shape(reference[name]):
            raise ValueError(
                f"{what}: tensor {name!r} has shape {np.shape(arr)}, "
                f"expected {np.shape(reference[name])}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{what}: tensor {name!r} contains NaN or infinite values")


def weighted_average(deltas: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """Example-weighted mean ``Σ n_i·Δ_i / Σ n_i`` (float64 accumulation, float32 out).

    All deltas must have the same names and shapes, finite values and ``n_i > 0``.
    """
    if not deltas:
        raise ValueError("cannot average zero deltas")
    reference = deltas[0][0]
    total = 0
    sums = {name: np.zeros(np.shape(arr), dtype=np.float64) for name, arr in reference.items()}
    for i, (delta, n) in enumerate(deltas):
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
            raise ValueError(f"delta {i}: example count must be a positive int, got {n!r}")
        check_same(reference, delta, f"delta {i}")
        for name, arr in delta.items():
            sums[name] += np.asarray(arr, dtype=np.float64) * int(n)
        total += int(n)
    return average_from_sum(sums, total)


def average_from_sum(weighted_sum: Mapping[str, np.ndarray], total_examples: float) -> Weights:
    """``Σ n_i·Δ_i / Σ n_i`` from the sums secure aggregation reveals."""
    if not (math.isfinite(total_examples) and total_examples > 0):
        raise ValueError(f"total example count must be positive, got {total_examples!r}")
    out: Weights = {}
    for name in sorted(weighted_sum):
        arr = np.asarray(weighted_sum[name], dtype=np.float64)
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"summed tensor {name!r} contains NaN or infinite values")
        out[name] = (arr / total_examples).astype(np.float32)
    return out


class Strategy(Protocol):
    """A server update rule. Implementations must not mutate their inputs."""

    name: str

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        avg_delta: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        round_index: int,
    ) -> tuple[Weights, Weights]:
        """Return ``(new_global_weights, new_state)``; ``state`` is ``{}`` before round 0."""
        ...


class _Base:
    name: str

    def __init__(self, frozen: Collection[str]) -> None:
        self.frozen_patterns: tuple[str, ...] = (*DEFAULT_FROZEN, *sorted(frozen))

    def is_frozen(self, key: str) -> bool:
        """Whether ``key`` is left untouched by this strategy."""
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.frozen_patterns)

    def _validate(
        self,
        global_weights: Mapping[str, np.ndarray],
        avg_delta: Mapping[str, np.ndarray],
        round_index: int,
    ) -> None:
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        check_same(global_weights, global_weights, "global weights")
        check_same(global_weights, avg_delta, "average delta")


class FedAvg(_Base):
    """``w ← w + server_lr·Δ`` (McMahan et al. 2017; server_lr 1 is plain FedAvg).

    Also serves ``fedprox`` (Li et al. 2020): FedProx changes the *client* objective
    (``TrainSettings.proximal_mu``); its server update is FedAvg's. ``proximal_mu``
    is kept here so the coordinator can read it from the strategy it built.
    """

    def __init__(
        self,
        name: str = "fedavg",
        server_lr: float = 1.0,
        proximal_mu: float = 0.0,
        frozen: Collection[str] = (),
    ) -> None:
        super().__init__(frozen)
        if not (math.isfinite(server_lr) and server_lr > 0):
            raise ValueError(f"server_lr must be positive, got {server_lr!r}")
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"mu must be >= 0, got {proximal_mu!r}")
        self.name = name
        self.server_lr = float(server_lr)
        self.proximal_mu = float(proximal_mu)

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        avg_delta: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        round_index: int,
    ) -> tuple[Weights, Weights]:
        self._validate(global_weights, avg_delta, round_index)
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)[:3]}")
        new: Weights = {}
        for name in sorted(global_weights):
            w = np.asarray(global_weights[name], dtype=np.float32)
            if self.is_frozen(name):
                new[name] = w.copy()
            else:
                step = self.server_lr * np.asarray(avg_delta[name], dtype=np.float64)
                new[name] = (w.astype(np.float64) + step).astype(np.float32)
        return new, {}


class AdaptiveStrategy(_Base):
    """FedAdagrad / FedYogi / FedAdam (Reddi et al. 2021, Algorithm 2).

    With Δ the average delta (the negative pseudo-gradient)::

        m ← β1·m + (1−β1)·Δ
        v ← v + Δ²                              (adagrad)
        v ← v − (1−β2)·Δ²·sign(v − Δ²)          (yogi)
        v ← β2·v + (1−β2)·Δ²                    (adam)
        w ← w + η·m / (√v + τ)

    As in the paper there is no bias correction, and ``v`` starts at ``τ²`` (the
    paper requires ``v_{-1} ≥ τ²``), ``m`` at 0. State keys are ``m/<name>`` and
    ``v/<name>`` for every non-frozen weight.
    """

    def __init__(
        self,
        name: str,
        eta: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        frozen: Collection[str] = (),
    ) -> None:
        super().__init__(frozen)
        if name not in ("fedadam", "fedyogi", "fedadagrad"):
            raise ValueError(f"{name!r} is not an adaptive strategy")
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be positive, got {eta!r}")
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be positive, got {tau!r}")
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{label} must be in [0, 1), got {beta!r}")
        self.name = name
        self.eta, self.beta1, self.beta2, self.tau = (
            float(eta),
            float(beta1),
            float(beta2),
            float(tau),
        )

    def _state_for(
        self, global_weights: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        trained = [n for n in sorted(global_weights) if not self.is_frozen(n)]
        if not state:
            fresh: dict[str, np.ndarray] = {}
            for n in trained:
                fresh[f"m/{n}"] = np.zeros(np.shape(global_weights[n]), dtype=np.float64)
                fresh[f"v/{n}"] = np.full(np.shape(global_weights[n]), self.tau**2)
            return fresh
        expected = {f"{p}/{n}": np.shape(global_weights[n]) for n in trained for p in ("m", "v")}
        if set(state) != set(expected):
            missing = sorted(set(expected) - set(state))[:3]
            extra = sorted(set(state) - set(expected))[:3]
            raise ValueError(
                f"{self.name} state does not match the model (missing {missing}, "
                f"unexpected {extra}); was it saved for another model or strategy?"
            )
        out = {}
        for key, shape in expected.items():
            arr = np.asarray(state[key], dtype=np.float64)
            if arr.shape != shape or not np.all(np.isfinite(arr)):
                raise ValueError(
                    f"{self.name} state {key!r} has a wrong shape or non-finite values"
                )
            out[key] = arr
        return out

    def apply(
        self,
        global_weights: Mapping[str, np.ndarray],
        avg_delta: Mapping[str, np.ndarray],
        state: Mapping[str, np.ndarray],
        round_index: int,
    ) -> tuple[Weights, Weights]:
        self._validate(global_weights, avg_delta, round_index)
        current = self._state_for(global_weights, state)
        new: Weights = {}
        new_state: Weights = {}
        for name in sorted(global_weights):
            w = np.asarray(global_weights[name], dtype=np.float32)
            if self.is_frozen(name):
                new[name] = w.copy()
                continue
            delta = np.asarray(avg_delta[name], dtype=np.float64)
            d2 = delta * delta
            m = self.beta1 * current[f"m/{name}"] + (1.0 - self.beta1) * delta
            v = current[f"v/{name}"]
            if self.name == "fedadagrad":
                v = v + d2
            elif self.name == "fedyogi":
                v = v - (1.0 - self.beta2) * d2 * np.sign(v - d2)
            else:
                v = self.beta2 * v + (1.0 - self.beta2) * d2
            step = self.eta * m / (np.sqrt(v) + self.tau)
            new[name] = (w.astype(np.float64) + step).astype(np.float32)
            new_state[f"m/{name}"] = m.astype(np.float32)
            new_state[f"v/{name}"] = v.astype(np.float32)
        return new, dict(sorted(new_state.items()))


_OPTIONS: Mapping[str, frozenset[str]] = {
    "fedavg": frozenset({"server_lr"}),
    "fedprox": frozenset({"server_lr", "mu"}),
    "fedadam": frozenset({"eta", "beta1", "beta2", "tau"}),
    "fedyogi": frozenset({"eta", "beta1", "beta2", "tau"}),
    "fedadagrad": frozenset({"eta", "beta1", "tau"}),
}


def make_strategy(
    name: str, options: Mapping[str, float] | None = None, frozen: Collection[str] = ()
) -> Strategy:
    """Build strategy ``name`` (see :data:`STRATEGIES`) from numeric ``options``.

    Options: fedavg ``server_lr`` (1.0); fedprox ``server_lr``, ``mu`` (0.0; used by
    the trainer); fedadam/fedyogi ``eta`` (1e-2), ``beta1`` (0.9), ``beta2`` (0.99),
    ``tau`` (1e-3); fedadagrad the same without ``beta2``. Unknown names or options
    raise ValueError so a typo in a job spec fails loudly. ``frozen`` adds key names
    or fnmatch patterns to :data:`DEFAULT_FROZEN`.
    """
    if name not in _OPTIONS:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    opts = dict(options or {})
    unknown = sorted(set(opts) - _OPTIONS[name])
    if unknown:
        raise ValueError(
            f"unknown {name} option(s) {unknown}; allowed: {', '.join(sorted(_OPTIONS[name]))}"
        )
    for key, value in opts.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name} option {key!r} must be a number, got {value!r}")
    values = {k: float(v) for k, v in opts.items()}
    if name in ("fedavg", "fedprox"):
        return FedAvg(
            name=name,
            server_lr=values.get("server_lr", 1.0),
            proximal_mu=values.get("mu", 0.0),
            frozen=frozen,
        )
    return AdaptiveStrategy(name, frozen=frozen, **values)
