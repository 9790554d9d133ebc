"""Secure-mode contribution (valuation.mode = "secure"): the spec's rules, what the
accountant charges, decoding the coalition sums, and scoring from a valuation file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from wharf import spec as spec_mod
from wharf.algorithms import contribution, secure_vectors
from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.accounting import participant_level_epsilon
from wharf.algorithms.privacy.plan import (
    participant_plan,
    participant_releases,
    releases_per_round,
)
from wharf.algorithms.privacy.skellam import make_plan
from wharf.algorithms.secagg import choose_params
from wharf.valuation import load_rounds, secure_round_values, secure_scores


def _raw(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "v",
        "purpose": "medical-research",
        "data": {"dataset": "cancer"},
        "model": {"kind": "logreg", "num_classes": 2, "standardize": False},
        "training": {"batch_size": 10, "epochs": 1, "optimizer": "sgd", "lr": 0.1},
        "federation": {"rounds": 5, "min_nodes": 3, "max_nodes": 4, "secure": True},
        "privacy": {"participant_level": {"epsilon": 4.0, "delta": 1e-5, "clip": 1.0}},
        "valuation": {"mode": "secure"},
    }
    for key, value in over.items():
        raw[key] = value
    return raw


def test_spec_rules_for_secure_valuation() -> None:
    spec = spec_mod.from_dict(_raw())
    assert spec.valuation.mode == "secure"
    with pytest.raises(spec_mod.SpecError, match=r"needs \[privacy\.participant_level\]"):
        spec_mod.from_dict(_raw(privacy={}))
    with pytest.raises(spec_mod.SpecError, match=r"needs federation\.max_nodes"):
        spec_mod.from_dict(_raw(federation={"rounds": 5, "min_nodes": 3, "secure": True}))
    with pytest.raises(spec_mod.SpecError, match=r"valuation\.mode must be one of"):
        spec_mod.from_dict(_raw(valuation={"mode": "shapley"}))
    # The mode is part of what every node grants: it changes the job hash.
    plain = spec_mod.from_dict(_raw(valuation={"mode": "none"}))
    assert plain.job_hash() != spec.job_hash()


def test_the_accountant_charges_max_nodes_releases_per_round() -> None:
    spec = spec_mod.from_dict(_raw())
    plain = spec_mod.from_dict(_raw(valuation={"mode": "none"}))
    assert releases_per_round(spec) == 4 and participant_releases(spec) == 20
    assert releases_per_round(plain) == 1 and participant_releases(plain) == 5
    g, plan = participant_plan(spec, 31)
    g0, plan0 = participant_plan(plain, 31)
    # Both calibrated to the same target; secure valuation needs more noise for it.
    assert 0.99 * 4.0 <= g.epsilon <= 4.0 and 0.99 * 4.0 <= g0.epsilon <= 4.0
    assert g.mechanism["rounds"] == 20 and g0.mechanism["rounds"] == 5
    assert plan.noise_multiplier > 1.5 * plan0.noise_multiplier
    assert g.recompute() == pytest.approx(g.epsilon, rel=1e-9)
    # The plain job's noise, spent on 20 releases instead of 5, would overshoot.
    assert participant_level_epsilon(plan0, 20, 1e-5) > 1.5 * g0.epsilon


def test_decode_coalitions_checks_noise_shares_and_range() -> None:
    plan = make_plan(1.0, 6, 2, 4, 1e-3)
    layout = secure_vectors.dp_coalition_layout(choose_params(3), plan, ["c", "a", "b"])
    assert [s.name for s in layout.segments] == ["update", "without.a", "without.b", "without.c"]
    rng = np.random.default_rng(1)
    updates = {n: rng.normal(0, 0.2, 6) for n in "abc"}
    inputs = {n: secure_vectors.dp_coalition_inputs(updates[n], plan, "abc", n) for n in "abc"}
    sums = {k: sum(inputs[n][k] for n in "abc") for k in inputs["a"]}
    means = secure_vectors.decode_coalitions(sums, list("abc"), "abc", plan)
    tol = 1e-2
    np.testing.assert_allclose(means["all"][0], np.mean(list(updates.values()), axis=0), atol=tol)
    np.testing.assert_allclose(means["without.b"][0], (updates["a"] + updates["c"]) / 2, atol=tol)
    assert {k: m for k, (_, m) in means.items()} == {
        "all": 3, "without.a": 2, "without.b": 2, "without.c": 2
    }  # fmt: skip
    # A node's own segment carries zeros (and its noise): it never appears in its own sum.
    own = inputs["b"]["without.b"]
    other = inputs["b"]["without.a"]
    assert abs(own).max() / plan.scale < 0.01 < 0.05 < abs(other).max() / plan.scale
    # Too few noise shares in a revealed sum: refused like the training sum.
    strict = make_plan(1.0, 6, 3, 4, 1e-3)
    with pytest.raises(ValueError, match="less noise"):
        secure_vectors.decode_coalitions(sums, ["a", "b"], "abc", strict)
    # A leave-one-out sum is judged by its noise shares (every contributor's), not its
    # members: two members with three shares is fine, two shares are not.
    skellam.decode_sum(sums["without.a"], 2, strict, noise_shares=3)
    with pytest.raises(ValueError, match="2 contributions carry less noise"):
        skellam.decode_sum(sums["without.a"], 2, strict, noise_shares=2)
    with pytest.raises(ValueError, match="exceeds"):
        bad = dict(sums, **{"without.a": sums["without.a"] + 10 * plan.node_bound})
        secure_vectors.decode_coalitions(bad, list("abc"), "abc", plan)
    with pytest.raises(secure_vectors.VectorError, match="distinct"):
        secure_vectors.dp_coalition_layout(choose_params(3), plan, ["a", "a", "b"])
    with pytest.raises(secure_vectors.VectorError, match="exceeds the 4"):
        secure_vectors.dp_coalition_layout(choose_params(3), plan, list("abcde"))
    with pytest.raises(secure_vectors.VectorError, match="not in the round's roster"):
        secure_vectors.dp_coalition_inputs(updates["a"], plan, "abc", "z")
    # decode_sum's own checks on the member/share counts.
    with pytest.raises(ValueError, match="num_contributors"):
        skellam.decode_sum(sums["update"], 4, plan, noise_shares=3)


# ----------------------------------------------------------------------- scoring


def _logreg_problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)  # test data, not secret material
    x = rng.normal(0, 1, (400, 5)).astype(np.float32)
    w = np.array([2.0, -1.0, 0.5, 0.0, 1.5])
    y = (x @ w + rng.normal(0, 0.3, 400) > 0).astype(np.int64)
    return x, y


def _spec_for(n_features: int, mode: str = "secure") -> spec_mod.JobSpec:
    raw = _raw()
    raw["model"]["input_shape"] = [n_features]
    if mode == "clear":  # consented clear text: a plaintext job without DP
        raw["federation"]["secure"] = False
        raw["valuation"] = {"mode": "clear"}
        del raw["privacy"]
    return spec_mod.from_dict(raw)


def _start(spec: spec_mod.JobSpec) -> dict[str, np.ndarray]:
    from wharf.algorithms import models

    net = models.init_model("logreg", (5,), 2, {}, seed=0)
    return models.model_to_arrays(net)


def _good_delta(start: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Any:
    """One real local training pass from ``start``: the delta an honest node sends."""
    from wharf.algorithms import models
    from wharf.algorithms.training import TrainSettings, torch_threads, train_local

    net = models.arrays_to_model(models.init_model("logreg", (5,), 2, {}, seed=0), start)
    with torch_threads(1):
        train_local(net, x, y, TrainSettings("sgd", 0.5, 2, 16, seed=0))
    trained = models.model_to_arrays(net)
    return {k: trained[k] - start[k] for k in start}


def _write(
    path: Path,
    job_hash: str,
    rounds: dict[int, tuple[Any, dict[str, Any], dict[str, int]]],
    mode: str,
) -> None:
    tensors: dict[str, np.ndarray] = {}
    counts = {}
    kind = "node" if mode == "clear" else "coalition"
    for rnd, (start, items, members) in rounds.items():
        for k, v in start.items():
            tensors[f"r{rnd}/global/{k}"] = v
        for label, d in items.items():
            for k, v in d.items():
                tensors[f"r{rnd}/{kind}/{label}/{k}"] = np.asarray(v, dtype=np.float32)
        counts[str(rnd)] = members
    meta = {
        "format": "wharf-valuation/1",
        "job_id": "j",
        "job_hash": job_hash,
        "mode": mode,
        "rounds": json.dumps(counts, sort_keys=True),
    }
    path.write_bytes(save(tensors, metadata=meta))


def test_secure_scores_rank_a_noise_node_last(tmp_path: Path) -> None:
    """Known answer: two nodes train on real labels, one on shuffled labels. From the
    coalition means alone (what the coordinator keeps), the shuffled node scores
    lowest, and below zero; a node that dropped scores exactly zero for that round."""
    x, y = _logreg_problem()
    spec = _spec_for(5)
    start = _start(spec)
    rng = np.random.default_rng(1)
    deltas = {
        "a": _good_delta(start, x[:100], y[:100]),
        "b": _good_delta(start, x[100:200], y[100:200]),
        "noise": _good_delta(start, x[200:300], rng.permutation(y[200:300])),
    }

    def mean(names: list[str]) -> dict[str, np.ndarray]:
        return {k: np.mean([deltas[n][k] for n in names], axis=0) for k in start}

    means = {
        "all": mean(["a", "b", "noise"]),
        "without.a": mean(["b", "noise"]),
        "without.b": mean(["a", "noise"]),
        "without.noise": mean(["a", "b"]),
    }
    members = {"all": 3, "without.a": 2, "without.b": 2, "without.noise": 2}
    # Round 2: "noise" dropped before sending: its leave-one-out sum is the training sum.
    means2 = {"all": mean(["a", "b"]), "without.a": mean(["b"]), "without.b": mean(["a"])}
    means2["without.noise"] = means2["all"]
    members2 = {"all": 2, "without.a": 1, "without.b": 1, "without.noise": 2}
    path = tmp_path / "valuation.safetensors"
    _write(
        path, spec.job_hash(), {1: (start, means, members), 2: (start, means2, members2)}, "secure"
    )
    result = secure_scores(path, spec, spec.job_hash(), x[300:], y[300:])
    s = result.scores
    assert s["noise"] < 0 < min(s["a"], s["b"]), s
    assert result.per_round[2]["noise"] == 0.0
    assert result.method.startswith("secure leave-one-out")

    # Round 1 by hand: U(all) - U(all without i).
    def util(w: Mapping[str, np.ndarray]) -> float:
        from wharf.algorithms import models

        build = lambda: models.build_model("logreg", (5,), 2, {})  # noqa: E731
        return contribution.model_utility(w, build, x[300:], y[300:], "neg_loss")

    full = util(contribution.coalition_from_sum(start, means["all"], 1.0))
    want = full - util(contribution.coalition_from_sum(start, means["without.a"], 1.0))
    assert result.per_round[1]["a"] == pytest.approx(want, abs=1e-9)
    # The file must be of this job and of secure mode.
    with pytest.raises(ValueError, match="another job"):
        secure_scores(path, spec, "ab" * 32, x, y)
    with pytest.raises(ValueError, match="secure-mode valuation material, not clear"):
        load_rounds(path, spec.job_hash())
    direct = secure_round_values(start, means, members, util)
    assert direct == pytest.approx(result.per_round[1])


def test_clear_text_rounds_above_the_exact_limit_use_gtg_shapley(tmp_path: Path) -> None:
    """17 nodes in a round: 2^17 coalitions is too many for exact Shapley, so the round
    is estimated with GTG-Shapley; the node pushing the model the wrong way is last."""
    from wharf.valuation import clear_text_scores

    x, y = _logreg_problem()
    spec = _spec_for(5, "clear")
    start = _start(spec)
    good = _good_delta(start, x[:200], y[:200])
    rng = np.random.default_rng(2)  # test data, not secret material
    deltas = {
        f"n{i:02d}": {k: v * (1 + 0.1 * rng.normal()) for k, v in good.items()}
        for i in range(contribution.MAX_EXACT_PLAYERS)
    }
    deltas["wrong"] = {k: -3 * v for k, v in good.items()}
    counts = dict.fromkeys(deltas, 10)
    path = tmp_path / "valuation.safetensors"
    _write(path, spec.job_hash(), {1: (start, deltas, counts)}, "clear")
    result = clear_text_scores(path, spec, spec.job_hash(), x[300:], y[300:])
    assert "GTG-Shapley" in result.method
    assert min(result.scores, key=result.scores.__getitem__) == "wrong"
    assert result.scores["wrong"] < 0 < min(v for k, v in result.scores.items() if k != "wrong")
