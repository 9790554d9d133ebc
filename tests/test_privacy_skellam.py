"""Distributed Skellam noise: the sampler, the plan, encode/decode, and real SecAgg rounds.

Statistical tests use fixed keys, so they are deterministic; thresholds are 5 standard
errors (or p < 1e-6), so a correct implementation passes with overwhelming margin and a
wrong variance, share size or sampler shape fails. NumPy's generator makes test *data*
only; every noise and rounding bit comes from the AES-CTR keystreams under test.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from functools import cache

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from scipy import stats

from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.skellam import (
    MAX_MU,
    NoiseBoundExceeded,
    SkellamPlan,
    decode_sum,
    derive_update_keys,
    encode_update,
    make_plan,
    poisson,
    skellam_noise,
)
from wharf.algorithms.secagg import (
    AggregateResult,
    SecAggClient,
    SecAggServer,
    Segment,
    VectorLayout,
    choose_params,
)

INT32_MAX = 2**31 - 1
Z = 5.0
"""Standard errors a correct statistic may stray (false alarm ~6e-7 per test)."""


def key(label: str) -> bytes:
    """A fixed 16-byte test key (tests must be reproducible; production uses os.urandom)."""
    return label.encode().ljust(16, b".")[:16]


# --------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("mu", [1.0, 50.0, 1e4, 1e12, 1e15])
def test_skellam_mean_and_variance(mu: float) -> None:
    n = 400_000
    x = skellam_noise(mu, n, key(f"moments-{mu:g}")).astype(np.float64)
    var = 2 * mu
    # Mean: z-test against 0.
    assert abs(x.mean()) / math.sqrt(var / n) < Z
    # Variance: Var(S²) = (κ4 + 2κ2²)/n with κ2 = κ4 = 2μ for Sk(μ) (normal approximation).
    s2 = x.var(ddof=1)
    se = math.sqrt((2 * var * var + 2 * mu) / n)
    assert abs(s2 - var) / se < Z, (s2, var)


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    assert expected.min() >= 5
    chi = float(((counts - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(chi, counts.size - 1))


def _gof_p(samples: np.ndarray, dist) -> float:
    """Chi-square p-value of integer samples against a scipy distribution: ~40 bins
    spread by the normal approximation, the exact cdf for their probabilities, and only
    edges whose tails hold at least 1e-4 of the mass (so every bin expects >= 30)."""
    z = stats.norm.ppf(np.linspace(0.0005, 0.9995, 41))
    edges = np.unique(np.round(dist.mean() + dist.std() * z)).astype(np.int64)
    cdf = dist.cdf(edges)
    edges = edges[(cdf > 1e-4) & (cdf < 1 - 1e-4)]
    idx = np.searchsorted(edges, samples, side="left")  # bin i: (e[i-1], e[i]]
    counts = np.bincount(idx, minlength=edges.size + 1)
    probs = np.diff(np.concatenate(([0.0], dist.cdf(edges), [1.0])))
    return _chi_square_p(counts, probs)


@pytest.mark.parametrize("mu", [1.0, 3.0, 50.0, 1e4])
def test_skellam_matches_the_exact_distribution(mu: float) -> None:
    x = skellam_noise(mu, 300_000, key(f"gof-sk-{mu:g}"))
    assert _gof_p(x, stats.skellam(mu, mu)) > 1e-6


@pytest.mark.parametrize("mu", [0.7, 9.99, 10.0, 30.0, 1e4, 1e12, 2e15])
def test_poisson_matches_the_exact_distribution(mu: float) -> None:
    """Both sampler branches (inversion below 10, PTRS above), including μ where the
    acceptance test would lose all precision if log k! were computed naively."""
    x = poisson(mu, 300_000, key(f"gof-po-{mu:g}"))
    assert _gof_p(x, stats.poisson(mu)) > 1e-6


def test_noise_is_a_function_of_the_key() -> None:
    a = skellam_noise(1e6, 10_000, key("a"))
    assert np.array_equal(a, skellam_noise(1e6, 10_000, key("a")))
    b = skellam_noise(1e6, 10_000, key("b"))
    assert np.count_nonzero(a == b) < 100  # P(equal) ~ 1/sqrt(4 pi mu) per value


def test_zero_mu_and_empty_draws() -> None:
    assert not skellam_noise(0.0, 100, key("z")).any()
    assert skellam_noise(5.0, 0, key("z")).shape == (0,)


@pytest.mark.parametrize(
    "mu, size, k",
    [
        (-1.0, 10, key("x")),
        (math.nan, 10, key("x")),
        (MAX_MU * 2, 10, key("x")),
        (1.0, -1, key("x")),
        (1.0, 10, b"short"),
        (True, 10, key("x")),
    ],
)
def test_sampler_refuses_bad_arguments(mu: float, size: int, k: bytes) -> None:
    with pytest.raises(ValueError):
        skellam_noise(mu, size, k)


# ----------------------------------------------------------------------------- plan


def test_plan_keeps_the_worst_case_sum_inside_int32_and_uses_all_of_it() -> None:
    for n_max, m, z, d in [(5, 3, 1.0, 10_000), (64, 2, 0.7, 100_000), (1000, 10, 3.0, 1000)]:
        plan = make_plan(1.0, d, m, n_max, z)
        assert n_max * plan.node_bound <= INT32_MAX
        assert plan.scale * plan.clip >= 100 * math.sqrt(d)
        # γ is the largest that fits: a hair more would overflow the worst case.
        bigger = plan.scale * (1 + 1e-9)
        mu_pn = (z * bigger * plan.clip) ** 2 / 2 / m
        nb = math.ceil(bigger * plan.clip) + 1 + math.ceil(plan.tail_factor * math.sqrt(2 * mu_pn))
        assert n_max * nb > INT32_MAX
        # Units: aggregate std in integers is z γ C; shares add up to μ_total at m nodes.
        assert plan.aggregate_std == pytest.approx(z * plan.scale * plan.clip)
        assert plan.mu_per_node * m == pytest.approx(plan.mu_total)
        assert plan.l2_sensitivity == plan.scale * plan.clip + math.sqrt(d)
        assert plan.tail_probability < 1e-30
        # The layout secure aggregation will use accepts it.
        VectorLayout([Segment.integer("update", d, plan.node_bound)], n_max)
        assert make_plan(1.0, d, m, n_max, z) == plan  # deterministic: every party agrees


def test_plan_round_trips_and_refuses_tampering() -> None:
    plan = make_plan(0.5, 1234, 3, 7, 1.3)
    raw = json.loads(json.dumps(plan.to_dict()))
    assert SkellamPlan.from_dict(raw) == plan
    for name, value in [
        ("node_bound", plan.node_bound * 2),
        ("mu_per_node", plan.mu_total),
        ("scale", plan.scale * 3),
        ("min_contributors", 1),
    ]:
        with pytest.raises(ValueError):
            SkellamPlan.from_dict({**raw, name: value})
    with pytest.raises(ValueError):
        SkellamPlan.from_dict({k: v for k, v in raw.items() if k != "scale"})
    with pytest.raises(ValueError):
        SkellamPlan.from_dict({**raw, "extra": 1})
    with pytest.raises(ValueError):
        SkellamPlan.from_dict({**raw, "num_params": 1234.0})


def test_plan_refuses_when_quantisation_would_dominate() -> None:
    # 10^9 parameters with 1000 nodes: 1000 * 100 * sqrt(1e9) > 2^31.
    with pytest.raises(ValueError, match="sqrt"):
        make_plan(1.0, 10**9, 2, 1000, 1.0)


@pytest.mark.parametrize(
    "args",
    [
        (0.0, 10, 2, 5, 1.0),
        (1.0, 0, 2, 5, 1.0),
        (1.0, 10, 0, 5, 1.0),
        (1.0, 10, 6, 5, 1.0),
        (1.0, 10, 2, 5, 0.0),
        (1.0, 10, 2, 5, math.inf),
        (math.nan, 10, 2, 5, 1.0),
    ],
)
def test_make_plan_refuses_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError):
        make_plan(*args)


# ---------------------------------------------------------------------- encode/decode


def _noise_share(plan: SkellamPlan, k: bytes) -> np.ndarray:
    return skellam_noise(plan.mu_per_node, plan.num_params, derive_update_keys(k)[1])


def test_encode_clips_to_the_norm_bound() -> None:
    d = 5000
    plan = make_plan(1.0, d, 2, 4, 1.0)
    rng = np.random.default_rng(1)
    x = rng.normal(size=d) * 0.5  # norm ~ 35: clipped
    enc, info = encode_update(x.astype(np.float32), plan, key("clip"))
    assert info["clipped"] and info["norm"] == pytest.approx(np.linalg.norm(x), rel=1e-6)
    signal = (enc - _noise_share(plan, key("clip"))).astype(np.float64)
    assert np.linalg.norm(signal) / plan.scale <= plan.clip + math.sqrt(d) / plan.scale
    clipped = x.astype(np.float32).astype(np.float64) * (plan.clip / info["norm"])
    assert np.max(np.abs(signal - plan.scale * clipped)) < 1.0 + 1e-3
    assert np.max(np.abs(enc)) <= plan.node_bound


def test_encode_does_not_touch_small_updates_and_rounds_without_bias() -> None:
    d = 200_000
    plan = make_plan(1.0, d, 2, 4, 1.0)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, d) / math.sqrt(d)  # norm ~ 0.58 < C: not clipped
    enc, info = encode_update(x, plan, key("round"))
    assert not info["clipped"]
    y = x * plan.scale  # the same float product the encoder forms
    up = (enc - _noise_share(plan, key("round"))) - np.floor(y)
    assert set(np.unique(up)) <= {0, 1}  # floor or ceil, nothing else
    frac = y - np.floor(y)
    # Σ(up − frac) has mean 0 and variance Σ frac(1 − frac) if rounding is unbiased.
    z = (up - frac).sum() / math.sqrt((frac * (1 - frac)).sum())
    assert abs(z) < Z


def test_encode_uses_a_fresh_key_by_default() -> None:
    plan = make_plan(1.0, 1000, 2, 4, 1.0)
    x = np.full(1000, 0.01)
    a, _ = encode_update(x, plan)
    b, _ = encode_update(x, plan)
    assert not np.array_equal(a, b)
    c, _ = encode_update(x, plan, key("fixed"))
    assert np.array_equal(c, encode_update(x, plan, key("fixed"))[0])
    rounding, noise = derive_update_keys(key("fixed"))
    assert len({rounding, noise, key("fixed")}) == 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_encode_refuses_non_finite_updates(bad: float) -> None:
    plan = make_plan(1.0, 10, 2, 4, 1.0)
    x = np.zeros(10)
    x[3] = bad
    with pytest.raises(ValueError, match="NaN"):
        encode_update(x, plan)


def test_encode_refuses_a_wrong_length_and_a_bad_key() -> None:
    plan = make_plan(1.0, 10, 2, 4, 1.0)
    with pytest.raises(ValueError):
        encode_update(np.zeros(11), plan)
    with pytest.raises(ValueError):
        encode_update(np.zeros(10), plan, b"too short")


def test_encode_aborts_before_release_beyond_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(1.0, 10, 2, 4, 1.0)
    extreme = np.zeros(10, dtype=np.int64)
    extreme[7] = plan.node_bound  # plus any rounded signal: over the bound
    monkeypatch.setattr(skellam, "skellam_noise", lambda mu, size, k: extreme.copy())
    with pytest.raises(NoiseBoundExceeded):
        encode_update(np.full(10, 0.3), plan)


def test_decode_sum_is_the_uniform_mean_and_refuses_too_few_contributors() -> None:
    plan = make_plan(1.0, 4, 3, 5, 1.0)
    total = np.array([10, -20, 0, 3], dtype=np.int64) * int(plan.scale)
    mean = decode_sum(total, 4, plan)
    assert mean.dtype == np.float32
    np.testing.assert_allclose(mean, total / (plan.scale * 4), rtol=1e-6)
    with pytest.raises(ValueError, match="noise"):
        decode_sum(total, 2, plan)  # fewer than min_contributors = 3
    with pytest.raises(ValueError):
        decode_sum(total, 6, plan)  # more than max_nodes
    with pytest.raises(ValueError):
        decode_sum(np.full(4, 3 * plan.node_bound + 1), 3, plan)  # corrupt
    with pytest.raises(ValueError):
        decode_sum(total.astype(np.float64), 4, plan)
    with pytest.raises(ValueError):
        decode_sum(total[:3], 4, plan)


# ------------------------------------------- distributed DP through real SecAgg rounds

ECDSA = ec.ECDSA(hashes.SHA256())


@cache
def _identity(name: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _verify(name: str, data: bytes, signature: bytes) -> bool:
    try:
        _identity(name).public_key().verify(signature, data, ECDSA)
    except Exception:
        return False
    return True


def _signer(name: str):
    return lambda data: _identity(name).sign(data, ECDSA)


def _wire(msg):
    return type(msg).FromString(msg.SerializeToString())


def secure_round(
    inputs: dict[int, np.ndarray],
    layout: VectorLayout,
    round_number: int,
    *,
    after_share: Iterable[int] = (),
    in_unmask: Iterable[int] = (),
) -> AggregateResult:
    """One SecAgg+ round with real crypto; nodes in ``after_share`` never send input,
    nodes in ``in_unmask`` send input but go silent when asked to unmask."""
    n = len(inputs)
    names = [f"dp-node-{i}" for i in range(1, n + 1)]
    params = choose_params(n, max_nodes=layout.max_nodes)
    server = SecAggServer(
        job_id="dp-job",
        round_number=round_number,
        params=params,
        roster=names,
        num_values=layout.length,
        verify=_verify,
    )
    clients = {
        i: SecAggClient(
            node_id=name,
            job_id="dp-job",
            round_number=round_number,
            sign=_signer(name),
            verify=_verify,
        )
        for i, name in enumerate(names, 1)
    }
    for i, m in server.setup_messages().items():
        server.receive_advertisement(_wire(clients[i].setup(_wire(m))))
    for i, m in server.key_directories().items():
        server.receive_share_keys(_wire(clients[i].share_keys(_wire(m))))
    for i, m in server.share_deliveries().items():
        clients[i].receive_shares(_wire(m))
    for i in clients:
        if i not in set(after_share):
            msg = clients[i].masked_input({"update": inputs[i]}, layout)
            server.receive_masked_input(_wire(msg))
    for i, m in server.survivor_messages().items():
        server.receive_consistency_signature(_wire(clients[i].consistency_check(_wire(m))))
    for i, m in server.unmask_requests().items():
        if i not in set(in_unmask):
            server.receive_unmask_response(_wire(clients[i].unmask(_wire(m))))
    return server.finish()


@pytest.mark.parametrize(
    "nodes, after_share, in_unmask, survivors",
    [
        (5, [], [], 5),  # no dropouts
        (5, [2], [], 4),  # one never sends its input
        (6, [2], [5], 5),  # one never sends its input, one goes silent after sending it
        (4, [1], [], 3),  # down to exactly min_contributors
    ],
)
def test_aggregate_noise_variance_matches_the_plan_through_secagg(
    nodes: int, after_share: list[int], in_unmask: list[int], survivors: int
) -> None:
    """The issue's distributed-DP check: over several real rounds, the noise in the
    decoded sum has variance 2·μ_per_node·s for s survivors (so ≥ 2·μ_total when
    s ≥ m), with and without dropouts."""
    d, m, n_max, rounds = 8192, 3, 6, 3
    plan = make_plan(1.0, d, m, n_max, 1.0)
    layout = VectorLayout([Segment.integer("update", d, plan.node_bound)], n_max)
    rng = np.random.default_rng(nodes * 100 + survivors)  # test data only
    residuals = []
    for r in range(1, rounds + 1):
        updates = {
            i: rng.normal(size=d) * rng.choice([0.002, 0.05]) for i in range(1, nodes + 1)
        }  # norms ~0.18 (kept) or ~4.5 (clipped)
        keys = {i: key(f"r{r}n{i}s{survivors}") for i in updates}
        encoded = {i: encode_update(updates[i], plan, keys[i])[0] for i in updates}
        result = secure_round(encoded, layout, r, after_share=after_share, in_unmask=in_unmask)
        contributors = sorted(set(updates) - set(after_share))
        assert list(result.contributors) == contributors and len(contributors) == survivors
        total = result.decode(layout)["update"]  # int64, signed view of the Z_2^32 sum
        assert np.array_equal(total, sum(encoded[i] for i in contributors))
        signal = sum(
            plan.scale * updates[i] * min(1.0, plan.clip / np.linalg.norm(updates[i]))
            for i in contributors
        )
        residuals.append(total - signal)  # noise shares + rounding (each |.| < 1)
        mean = decode_sum(total, survivors, plan)
        np.testing.assert_allclose(mean, total / (plan.scale * survivors), rtol=1e-6)
    noise = np.concatenate(residuals)
    n = noise.size
    expected = 2 * plan.mu_per_node * survivors
    assert abs(noise.mean()) / math.sqrt(expected / n) < Z
    ratio = noise.var(ddof=1) / expected
    se = math.sqrt(2 / (n - 1))  # the noise is Gaussian to ~1e-14 at this μ
    assert abs(ratio - 1) < Z * se, ratio
    # Any s >= m survivors carry at least the configured aggregate noise.
    assert noise.var(ddof=1) >= 2 * plan.mu_total * (1 - Z * se)


def test_secagg_sum_of_worst_case_inputs_does_not_wrap() -> None:
    """Every node at +node_bound in the same coordinate: the Z_2^32 sum still decodes."""
    d, n_max = 16, 4
    plan = make_plan(1.0, d, 2, n_max, 1.0)
    layout = VectorLayout([Segment.integer("update", d, plan.node_bound)], n_max)
    worst = np.zeros(d, dtype=np.int64)
    worst[0], worst[1] = plan.node_bound, -plan.node_bound
    result = secure_round({i: worst for i in range(1, n_max + 1)}, layout, 1)
    total = result.decode(layout)["update"]
    assert total[0] == n_max * plan.node_bound and total[1] == -n_max * plan.node_bound


def test_keys_never_come_from_numpy() -> None:
    """Regression guard for the module's rule: no NumPy generator anywhere in the module."""
    import inspect

    source = inspect.getsource(skellam)
    assert "default_rng" not in source and "np.random" not in source
    assert "os.urandom" in source
    assert len(os.urandom(16)) == 16
