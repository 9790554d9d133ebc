"""Privacy accounting: the numbers equal what dp-accounting computes directly, calibration
hits its targets, and guarantees round-trip and recompute.

Each expected epsilon is computed in the test itself by building the dp-accounting event
and accountant by hand, so a change in the event, the schedule, the sensitivities or the
accountant settings in the module under test makes these tests fail.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import dp_accounting as dpa
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

from wharf.algorithms.privacy.accounting import (
    RDP_ORDERS,
    Guarantee,
    calibrate_participant_level,
    calibrate_record_level,
    participant_level_epsilon,
    participant_level_guarantee,
    participant_level_rho,
    record_level_discretization,
    record_level_epsilon,
    record_level_guarantee,
    record_level_schedule,
)
from wharf.algorithms.privacy.skellam import make_plan

DELTA = 1e-5


def _pld_epsilon(sigma: float, q: float, steps: int, delta: float, interval: float) -> float:
    acc = PLDAccountant(value_discretization_interval=interval)
    event = dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma))
    return acc.compose(dpa.SelfComposedDpEvent(event, steps)).get_epsilon(delta)


# ------------------------------------------------------------------------ record level


@pytest.mark.parametrize(
    "rows, batch, epochs, rounds, per_epoch",
    [(1000, 32, 1, 10, 32), (1024, 32, 2, 3, 32), (99, 1, 1, 1, 99), (10, 64, 3, 2, 1)],
)
def test_schedule_is_opacus_poisson_loader(
    rows: int, batch: int, epochs: int, rounds: int, per_epoch: int
) -> None:
    q, steps = record_level_schedule(rows, batch, epochs, rounds)
    assert q == 1 / per_epoch and steps == rounds * epochs * per_epoch


def test_schedule_matches_opacus_dp_data_loader() -> None:
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    for rows, batch in [(1000, 32), (250, 50), (7, 3)]:
        loader = DataLoader(TensorDataset(torch.zeros(rows, 1)), batch_size=batch)
        dp_loader = DPDataLoader.from_data_loader(loader)
        q, steps = record_level_schedule(rows, batch, 1, 1)
        assert q == dp_loader.sample_rate
        assert steps == len(loader) == round(1 / dp_loader.sample_rate)


@pytest.mark.parametrize(
    "sigma, q, steps",
    [(1.1, 1 / 32, 320), (0.8, 0.01, 2000), (3.0, 0.001, 5000), (0.6, 0.25, 40)],
)
def test_record_epsilon_equals_dp_accounting_pld(sigma: float, q: float, steps: int) -> None:
    interval = record_level_discretization(sigma, q, steps, DELTA)
    assert 1e-5 <= interval <= 1e-2
    want = _pld_epsilon(sigma, q, steps, DELTA, interval)
    assert record_level_epsilon(sigma, q, steps, DELTA) == want
    # An explicit interval is used as given.
    assert record_level_epsilon(
        sigma, q, steps, DELTA, value_discretization_interval=1e-3
    ) == _pld_epsilon(sigma, q, steps, DELTA, 1e-3)


def test_record_epsilon_is_close_to_a_fine_grid() -> None:
    """The chosen discretisation overstates ε (pessimistic) by well under 1 %."""
    sigma, q, steps = 3.0, 0.01, 1000
    got = record_level_epsilon(sigma, q, steps, DELTA)
    fine = _pld_epsilon(sigma, q, steps, DELTA, 2e-5)
    assert fine <= got <= fine * 1.005


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
def test_record_calibration_hits_the_target(target: float) -> None:
    rows, batch, epochs, rounds = 1000, 32, 1, 10
    g = record_level_guarantee(
        epsilon=target,
        delta=DELTA,
        clip=1.0,
        num_rows=rows,
        batch_size=batch,
        epochs=epochs,
        rounds=rounds,
    )
    assert 0.99 * target <= g.epsilon <= target
    m = g.mechanism
    q, steps = record_level_schedule(rows, batch, epochs, rounds)
    assert (m["sample_rate"], m["steps"]) == (q, steps)
    # Independently: the calibrated σ really spends that ε under dp-accounting's PLD.
    direct = _pld_epsilon(
        float(m["noise_multiplier"]), q, steps, DELTA, float(m["value_discretization_interval"])
    )
    assert direct == g.epsilon
    if target == 1.0:  # the public calibration function gives the same σ
        sigma = calibrate_record_level(target, DELTA, q, steps)
        assert sigma == pytest.approx(float(m["noise_multiplier"]), rel=1e-9)


def test_record_guarantee_from_a_noise_multiplier() -> None:
    g = record_level_guarantee(
        noise_multiplier=1.5,
        delta=DELTA,
        clip=0.7,
        num_rows=500,
        batch_size=25,
        epochs=2,
        rounds=3,
    )
    q, steps = 1 / 20, 3 * 2 * 20
    assert g.mechanism["noise_multiplier"] == 1.5 and g.mechanism["clip"] == 0.7
    assert g.epsilon == _pld_epsilon(
        1.5, q, steps, DELTA, float(g.mechanism["value_discretization_interval"])
    )
    assert int(g.mechanism["steps"]) // int(g.mechanism["rounds"]) == 40


def test_more_noise_means_less_epsilon() -> None:
    q, steps = 1 / 32, 320
    eps = [record_level_epsilon(s, q, steps, DELTA) for s in (0.7, 1.0, 2.0, 5.0)]
    assert eps == sorted(eps, reverse=True) and eps[-1] < eps[0] / 10
    plans = [make_plan(1.0, 1000, 2, 10, z) for z in (0.5, 1.0, 2.0, 8.0)]
    peps = [participant_level_epsilon(p, 10, DELTA) for p in plans]
    assert peps == sorted(peps, reverse=True) and peps[-1] < peps[0] / 10
    # ... and more rounds (steps) cost more.
    assert participant_level_epsilon(plans[1], 20, DELTA) > peps[1]
    assert record_level_epsilon(1.0, q, 2 * steps, DELTA) > eps[1]


# ------------------------------------------------------------------- participant level


def _skellam_rdp(alpha: int, l2, l1, mu):  # floats or Fractions
    """Agarwal, Kairouz & Liu (NeurIPS 2021) Thm 3.5 for Poisson(μ) − Poisson(μ)
    (variance V = 2μ): αΔ2²/(2V) + min(((2α−1)Δ2² + 6Δ1)/(4V²), 3Δ1/(2V))."""
    v = 2 * mu
    return alpha * l2**2 / (2 * v) + min(
        ((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * v**2), 3 * l1 / (2 * v)
    )


@pytest.mark.parametrize(
    "clip, d, m, n_max, z, rounds",
    [(1.0, 1000, 2, 10, 1.0, 1), (0.5, 50_000, 3, 64, 2.0, 100), (2.0, 10, 2, 2, 0.3, 1000)],
)
def test_participant_epsilon_equals_dp_accounting_rdp(
    clip: float, d: int, m: int, n_max: int, z: float, rounds: int
) -> None:
    plan = make_plan(clip, d, m, n_max, z)
    # Sensitivities in integer units, from the plan's scale (stochastic rounding: +sqrt(d)).
    l2 = plan.scale * clip + math.sqrt(d)
    l1 = min(l2 * l2, math.sqrt(d) * l2)
    std = z * plan.scale * clip  # aggregate noise std in integers: z γ C
    mu = std * std / 2
    assert (plan.l2_sensitivity, plan.l1_sensitivity, plan.mu_total) == (l2, l1, mu)
    rho = l2**2 / (4 * mu) + (2 * l2**2 + 6 * l1) / (16 * mu**2)
    assert participant_level_rho(plan) == rho
    # The zCDP line dominates the Skellam RDP bound at every integer order used (checked
    # in exact rational arithmetic: in floats the second term is below one ulp).
    fl2, fl1, fmu = Fraction(l2), Fraction(l1), Fraction(mu)
    frho = fl2**2 / (4 * fmu) + (2 * fl2**2 + 6 * fl1) / (16 * fmu**2)
    assert all(a * frho >= _skellam_rdp(a, fl2, fl1, fmu) for a in RDP_ORDERS)
    assert abs(float(frho) - rho) <= 1e-15 * rho
    assert all(float(a).is_integer() and a >= 2 for a in RDP_ORDERS)
    acc = RdpAccountant(orders=RDP_ORDERS)
    want = acc.compose(dpa.SelfComposedDpEvent(dpa.ZCDpEvent(rho), rounds)).get_epsilon(DELTA)
    assert participant_level_epsilon(plan, rounds, DELTA) == want
    # ... and the zCDP reduction costs almost nothing against the raw Skellam curve.
    raw = [rounds * _skellam_rdp(a, l2, l1, mu) for a in RDP_ORDERS]
    tight, _ = compute_epsilon(RDP_ORDERS, raw, DELTA)
    assert tight <= want <= tight * 1.001


@pytest.mark.parametrize("target", [1.0, 4.0, 8.0])
@pytest.mark.parametrize("rounds", [1, 50])
def test_participant_calibration_hits_the_target(target: float, rounds: int) -> None:
    plan = calibrate_participant_level(
        target, DELTA, rounds, clip=0.5, num_params=20_000, min_contributors=3, max_nodes=20
    )
    assert (plan.clip, plan.num_params, plan.min_contributors, plan.max_nodes) == (
        0.5,
        20_000,
        3,
        20,
    )
    eps = participant_level_epsilon(plan, rounds, DELTA)
    assert 0.99 * target <= eps <= target
    g = participant_level_guarantee(plan, rounds, DELTA)
    assert g.epsilon == eps and g.skellam_plan() == plan
    assert g.mechanism["rounds"] == rounds and g.mechanism["min_contributors"] == 3


def test_participant_target_out_of_reach_is_explained() -> None:
    with pytest.raises(ValueError, match="out of reach"):
        calibrate_participant_level(
            0.5, DELTA, 1000, clip=1.0, num_params=10_000_000, min_contributors=2, max_nodes=64
        )


# --------------------------------------------------------------------------- guarantee


def test_guarantees_round_trip_and_recompute() -> None:
    record = record_level_guarantee(
        noise_multiplier=1.2,
        delta=DELTA,
        clip=1.0,
        num_rows=800,
        batch_size=40,
        epochs=1,
        rounds=5,
    )
    participant = Guarantee.for_participant_level(make_plan(1.0, 5000, 2, 8, 1.4), 30, DELTA)
    for g in (record, participant):
        raw = json.loads(json.dumps(g.to_dict()))
        back = Guarantee.from_dict(raw)
        assert back == g and hash(back) == hash(g)
        assert back.recompute() == pytest.approx(g.epsilon, rel=1e-9)
        with pytest.raises(TypeError):
            g.mechanism["clip"] = 2.0  # type: ignore[index]
    assert record.accountant.startswith("dp-accounting ") and "PLD" in record.accountant
    assert "RDP" in participant.accountant


def _raw(g: Guarantee) -> dict:
    return json.loads(json.dumps(g.to_dict()))


@pytest.fixture(scope="module")
def record_raw() -> dict:
    return _raw(
        record_level_guarantee(
            noise_multiplier=2.0,
            delta=DELTA,
            clip=1.0,
            num_rows=100,
            batch_size=10,
            epochs=1,
            rounds=1,
        )
    )


@pytest.fixture(scope="module")
def participant_raw() -> dict:
    return _raw(participant_level_guarantee(make_plan(1.0, 100, 2, 4, 1.0), 3, DELTA))


@pytest.mark.parametrize(
    "change",
    [
        {"kind": "item_level"},
        {"epsilon": math.nan},
        {"epsilon": -1.0},
        {"delta": 0.0},
        {"delta": 1.5},
        {"accountant": ""},
        {"extra": 1},
    ],
)
def test_from_dict_refuses_malformed_guarantees(record_raw: dict, change: dict) -> None:
    with pytest.raises(ValueError):
        Guarantee.from_dict({**record_raw, **change})


@pytest.mark.parametrize(
    "change",
    [
        {"steps": 11},  # not the Poisson schedule of the stated rows and batch
        {"steps": 10.0},  # wrong type
        {"rounds": True},
        {"noise_multiplier": "2"},
        {"noise_multiplier": 0.0},
        {"sampling": 1},
        {"unknown": 1},
    ],
)
def test_from_dict_refuses_bad_record_mechanisms(record_raw: dict, change: dict) -> None:
    with pytest.raises(ValueError):
        Guarantee.from_dict({**record_raw, "mechanism": {**record_raw["mechanism"], **change}})
    mech = dict(record_raw["mechanism"])
    del mech["clip"]
    with pytest.raises(ValueError):
        Guarantee.from_dict({**record_raw, "mechanism": mech})


@pytest.mark.parametrize(
    "change",
    [{"mu_total": 1.0}, {"node_bound": 7}, {"rho": 0.001}, {"rounds": 0}, {"scale": 1.0}],
)
def test_from_dict_refuses_inconsistent_participant_mechanisms(
    participant_raw: dict, change: dict
) -> None:
    with pytest.raises(ValueError):
        Guarantee.from_dict(
            {**participant_raw, "mechanism": {**participant_raw["mechanism"], **change}}
        )


def test_kinds_do_not_mix(record_raw: dict) -> None:
    g = Guarantee.from_dict(record_raw)
    with pytest.raises(ValueError):
        g.skellam_plan()
    with pytest.raises(ValueError):
        Guarantee.from_dict({**record_raw, "kind": "participant_level"})


# ----------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    "call",
    [
        lambda: record_level_schedule(0, 32, 1, 1),
        lambda: record_level_schedule(100, 0, 1, 1),
        lambda: record_level_schedule(100, 32, 1.5, 1),  # type: ignore[arg-type]
        lambda: record_level_epsilon(0.0, 0.1, 10, DELTA),
        lambda: record_level_epsilon(math.inf, 0.1, 10, DELTA),
        lambda: record_level_epsilon(1.0, 0.0, 10, DELTA),
        lambda: record_level_epsilon(1.0, 1.5, 10, DELTA),
        lambda: record_level_epsilon(1.0, 0.1, 0, DELTA),
        lambda: record_level_epsilon(1.0, 0.1, 10, 0.0),
        lambda: record_level_epsilon(1.0, 0.1, 10, 1.0),
        lambda: calibrate_record_level(0.0, DELTA, 0.1, 10),
        lambda: calibrate_record_level(-1.0, DELTA, 0.1, 10),
        lambda: record_level_guarantee(
            epsilon=1.0,
            noise_multiplier=1.0,
            delta=DELTA,
            clip=1.0,
            num_rows=10,
            batch_size=2,
            epochs=1,
            rounds=1,
        ),
        lambda: record_level_guarantee(
            delta=DELTA, clip=1.0, num_rows=10, batch_size=2, epochs=1, rounds=1
        ),
        lambda: record_level_guarantee(
            epsilon=1.0, delta=DELTA, clip=0.0, num_rows=10, batch_size=2, epochs=1, rounds=1
        ),
        lambda: participant_level_epsilon(make_plan(1.0, 10, 2, 4, 1.0), 0, DELTA),
        lambda: participant_level_epsilon(make_plan(1.0, 10, 2, 4, 1.0), 1, 2.0),
        lambda: calibrate_participant_level(
            0.0, DELTA, 1, clip=1.0, num_params=10, min_contributors=2, max_nodes=4
        ),
        lambda: calibrate_participant_level(
            1.0, DELTA, 1, clip=1.0, num_params=10, min_contributors=5, max_nodes=4
        ),
    ],
)
def test_bad_arguments_are_refused(call) -> None:
    with pytest.raises(ValueError):
        call()
