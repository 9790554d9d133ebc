"""Secure vs clear-text contribution scores on the demo federation (same jobs).

What it measures. ``valuation.mode = "secure"`` scores each node by its leave-one-out
value computed from DP-noised coalition sums (:func:`wharf.valuation.secure_scores`);
``valuation.mode = "clear"`` scores it by its exact per-round Shapley value computed
from the clear updates (:func:`wharf.valuation.clear_text_scores`). This benchmark
asks how far the secure scores are from what clear mode would have reported *for the
very same updates*, per participant-level ε, and how much of the gap is the method
(leave-one-out on clipped uniform means instead of Shapley on example-weighted means)
and how much is the noise.

How. Everything runs in process, with the production code for every step that matters:

* data: the demo's non-IID breast-cancer split (:func:`wharf.demo.split_non_iid`) of
  features scaled by their published ranges (DP jobs need ``model.standardize =
  false``; as in :mod:`benchmarks.privacy_utility`); the demo's held-out test rows are
  the operator's validation set *and* the test set of the final model (nothing is tuned
  on them: valuation never feeds back into training);
* federations: the demo's three hospitals, and the same three plus ``noisy-lab``, a
  copy of ``hospital-b``'s rows with their labels permuted (fixed NumPy seed), so the
  hospitals' data are identical in both federations;
* the job: the demo's spec (MLP [32, 16], Adam lr 0.005, batch 16, 1 local epoch, seed
  ``0 + round`` as the node worker uses, rounds as the demo) with ``federation.secure``,
  ``[privacy.participant_level]`` (δ = 1e-5, clip 0.1 as in ``privacy_utility``),
  ``federation.max_nodes`` = the number of nodes (``min_nodes`` stays the demo's 3, so
  each noise share is sized for 3 contributors) and ``valuation.mode = "secure"``;
  the Skellam plan and its guarantee come from
  :func:`wharf.algorithms.privacy.plan.participant_plan` (rounds × max_nodes composed
  releases). "No noise" is the same job with ``noise_multiplier = 1e-5`` (a negligible
  share; its stated ε is astronomically large and means nothing);
* one secure job trajectory per (federation, ε, repeat): each round every node trains
  from the current global model; its SecAgg+ vector is
  :func:`~wharf.algorithms.secure_vectors.dp_coalition_inputs` (fresh ``os.urandom``
  Skellam noise in every segment); the coordinator's view is the per-segment integer
  sum (SecAgg+ reveals exactly that sum, so adding the int64 vectors is equivalent),
  decoded by :func:`~wharf.algorithms.secure_vectors.decode_coalitions`; the global
  model takes the FedAvg step with the noised ``all`` mean, as the coordinator does;
* on the same rounds: (a) **clear Shapley** — exact per-round Shapley of the clear,
  unclipped, example-weighted updates
  (:func:`~wharf.algorithms.contribution.round_utilities` +
  :func:`~wharf.algorithms.contribution.per_round_shapley`), what clear mode would
  have reported; (b) **secure** — :func:`wharf.valuation.secure_round_values` on the
  noised means; (c) **clear leave-one-out** — the same function on exact uniform means
  of the updates clipped as the Skellam encoder clips them, i.e. secure mode without
  noise. Utility is minus the mean cross-entropy on the validation rows; a node's score
  is the sum of its per-round values.

Reported per federation × ε, over the repeats: Spearman rank correlation of secure vs
clear Shapley scores (mean and minimum; also secure vs clear leave-one-out = the
noise's share of the error, and clear leave-one-out vs clear Shapley = the method's
share), the mean absolute error between the score vectors normalised to shares of
Σ|score| (and the raw error in neg-loss units), how often ``noisy-lab`` is ranked
strictly last, and the test accuracy of the final secure-job model.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.contribution_modes            # full, about 6 min on 2 cores
    .venv/bin/python -m benchmarks.contribution_modes --quick    # 3 rounds, no noise + eps 8

The full run: the demo's 20 rounds; no noise (2 repeats: nothing varies), ε ∈ {1, 4, 8,
32} (10 repeats each), and three *extra* fixed noise multipliers (0.3, 0.1, 0.01; 10 repeats)
whose stated ε guarantees nothing but which show how little noise secure mode tolerates.

Results: ``benchmarks/results/contribution.json`` and ``contribution.md``
(``quick-contribution.*`` for ``--quick``; ``--out DIR`` writes them elsewhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from torch import nn

    from wharf.algorithms.privacy.skellam import SkellamPlan
    from wharf.spec import JobSpec

RESULTS = Path(__file__).resolve().parent / "results"
LABEL = "diagnosis"
HIDDEN = [32, 16]
NUM_CLASSES = 2
DELTA = 1e-5
CLIP = 0.1
"""Participant-level clip, as ``benchmarks.privacy_utility`` uses."""
NO_NOISE_MULTIPLIER = 1e-5
"""The "no noise" row: a Skellam share this small is negligible next to the clipped update."""
NOISY = "noisy-lab"
NOISY_SOURCE = "hospital-b"
NOISY_SEED = 11
"""Seed of the label permutation of ``noisy-lab`` (data preparation, not secret material)."""
CLIP_MARGIN = 1.0 - 1e-9
"""The Skellam encoder clips to ``clip · (1 − 1e-9)`` (``skellam._CLIP_MARGIN``)."""

Weights = dict[str, np.ndarray]
Utility = Callable[[Mapping[str, np.ndarray]], float]
Data = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Setting:
    """One noise level: a participant-level ε target, or a fixed noise multiplier."""

    label: str
    epsilon: float | None = None
    noise_multiplier: float | None = None
    repeats: int | None = None
    """Overrides :attr:`Config.repeats` (the no-noise row needs few: nothing varies)."""
    extra: bool = False
    """Not one of the ε levels asked for: a fixed noise level to show where secure mode
    starts to track clear mode (its stated ε is far beyond any meaningful guarantee)."""


NO_NOISE = Setting("no noise", noise_multiplier=NO_NOISE_MULTIPLIER, repeats=2)


@dataclass(frozen=True)
class Config:
    """What one run covers."""

    rounds: int
    repeats: int
    settings: tuple[Setting, ...]
    federations: tuple[str, ...] = ("3 hospitals", f"3 hospitals + {NOISY}")
    stem: str = "contribution"


FULL = Config(
    rounds=20,
    repeats=10,
    settings=(
        NO_NOISE,
        *(Setting(f"ε = {e:g}", epsilon=e) for e in (1.0, 4.0, 8.0, 32.0)),
        *(Setting(f"z = {z:g}", noise_multiplier=z, extra=True) for z in (0.3, 0.1, 0.01)),
    ),
)
"""20 rounds as ``wharf demo``; 10 noise draws per ε (about 6 minutes on 2 cores)."""
QUICK = Config(
    rounds=3,
    repeats=2,
    settings=(NO_NOISE, Setting("ε = 8", epsilon=8.0)),
    stem="quick-contribution",
)


@dataclass
class Repeat:
    """One secure job trajectory and the three score vectors computed on its rounds."""

    clear_shapley: dict[str, float]
    secure: dict[str, float]
    clear_loo: dict[str, float]
    test_accuracy: float
    update_norm_median: float
    """Median L2 norm of the clear (unclipped) updates over nodes and rounds."""
    clipped_fraction: float
    """Share of the updates the Skellam encoder clipped (norm above the clip)."""
    seconds: float


@dataclass
class Cell:
    """One federation × ε: the plan, its guarantee and every repeat."""

    federation: str
    nodes: list[str]
    setting: Setting
    epsilon_stated: float
    noise_multiplier: float
    releases: int
    plan: dict[str, Any]
    repeats: list[Repeat] = field(default_factory=list)


# --------------------------------------------------------------------------- data and jobs


def load_data() -> tuple[dict[str, Data], np.ndarray, np.ndarray, dict[str, Any]]:
    """The two federations' node data, the validation/test rows, and how they were made."""
    from wharf.datasets import load_breast_cancer, scale_to_published_ranges
    from wharf.demo import HOSPITALS, split_non_iid

    split = split_non_iid(scale_to_published_ranges(load_breast_cancer()))
    features = [c for c in split.test.columns if c != LABEL]

    def arrays(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return frame[features].to_numpy(np.float32), frame[LABEL].to_numpy(np.int64)

    hospitals = {h: arrays(split.parts[h]) for h in HOSPITALS}
    x_src, y_src = hospitals[NOISY_SOURCE]
    rng = np.random.default_rng(NOISY_SEED)  # data preparation only
    noisy = (x_src.copy(), rng.permutation(y_src))
    feds = {"3 hospitals": dict(hospitals), f"3 hospitals + {NOISY}": {**hospitals, NOISY: noisy}}
    x_val, y_val = arrays(split.test)
    described = {
        name: {
            n: {"rows": len(y), "malignant": int((y == 0).sum()), "benign": int((y == 1).sum())}
            for n, (_, y) in data.items()
        }
        for name, data in feds.items()
    }
    info = {
        "split": "wharf.demo.split_non_iid(scale_to_published_ranges(load_breast_cancer()))",
        "nodes": described,
        "noisy_lab": (
            f"a copy of {NOISY_SOURCE}'s {len(y_src)} rows (features unchanged) with the "
            f"labels permuted by numpy.random.default_rng({NOISY_SEED}).permutation; "
            f"{int((noisy[1] == y_src).sum())} of {len(y_src)} labels happen to be unchanged"
        ),
        "validation": (
            f"the demo's {len(y_val)} held-out test rows: the operator's validation set for "
            "the utilities and the test set of the final model"
        ),
    }
    return feds, x_val, y_val, info


def job_spec(num_nodes: int, rounds: int, setting: Setting) -> JobSpec:
    """The demo's job as a secure participant-level job with secure valuation."""
    from wharf import spec as spec_mod
    from wharf.demo import job_spec as demo_spec

    raw = demo_spec(rounds, secure=True)
    model = dict(raw["model"])  # type: ignore[call-overload]
    model["standardize"] = False
    federation = dict(raw["federation"])  # type: ignore[call-overload]
    federation["max_nodes"] = num_nodes
    level: dict[str, float] = {"delta": DELTA, "clip": CLIP}
    if setting.epsilon is not None:
        level["epsilon"] = setting.epsilon
    else:
        assert setting.noise_multiplier is not None
        level["noise_multiplier"] = setting.noise_multiplier
    raw.update(
        model=model,
        federation=federation,
        privacy={"participant_level": level},
        valuation={"mode": "secure"},
    )
    return spec_mod.from_dict(raw)


def build_net() -> nn.Module:
    from wharf.algorithms import models

    return models.build_model("mlp", (30,), NUM_CLASSES, {"hidden": HIDDEN})


def make_utility(x_val: np.ndarray, y_val: np.ndarray) -> Utility:
    from wharf.algorithms import contribution

    def utility(weights: Mapping[str, np.ndarray]) -> float:
        return contribution.model_utility(weights, build_net, x_val, y_val, "neg_loss")

    return utility


# --------------------------------------------------------------------------- one trajectory


def _clip(flat: np.ndarray, clip: float) -> np.ndarray:
    """The update clipped as :func:`wharf.algorithms.privacy.skellam.encode_update` clips it."""
    x = np.asarray(flat, dtype=np.float64)
    norm = float(np.linalg.norm(x))
    limit = clip * CLIP_MARGIN
    return x * (limit / norm) if norm > limit else x


def run_job(
    spec: JobSpec,
    plan: SkellamPlan,
    data: Data,
    utility: Utility,
    x_test: np.ndarray,
    y_test: np.ndarray,
) -> Repeat:
    """Simulate one secure job; score its rounds three ways."""
    from wharf.algorithms import contribution, models, secure_vectors, training
    from wharf.valuation import secure_round_values

    t0 = time.perf_counter()
    t = spec.training
    roster = sorted(data)
    counts = {n: float(len(data[n][1])) for n in roster}
    net = models.init_model("mlp", (30,), NUM_CLASSES, {"hidden": HIDDEN}, t.seed)
    weights = models.model_to_arrays(net)
    _, layout = models.flatten(weights)
    shapley_tables: list[dict[frozenset[str], float]] = []
    secure_rounds: list[dict[str, float]] = []
    loo_rounds: list[dict[str, float]] = []
    norms: list[float] = []
    for rnd in range(1, spec.federation.rounds + 1):
        settings = training.TrainSettings(
            optimizer=t.optimizer,
            lr=t.lr,
            epochs=t.epochs,
            batch_size=t.batch_size,
            seed=t.seed + rnd,  # what the node worker uses in round rnd
        )
        deltas: dict[str, Weights] = {}
        for name in roster:
            local = models.arrays_to_model(build_net(), weights)
            training.train_local(local, data[name][0], data[name][1], settings)
            trained = models.model_to_arrays(local)
            deltas[name] = {k: trained[k] - weights[k] for k in weights}
        flats = {n: models.flatten(deltas[n])[0] for n in roster}
        norms += [float(np.linalg.norm(flats[n].astype(np.float64))) for n in roster]

        # (a) what clear mode reports for these updates: exact Shapley, example-weighted.
        shapley_tables.append(contribution.round_utilities(weights, deltas, utility, counts))

        # (b) secure mode: every node's coalition vector; the coordinator sees the sums.
        inputs = {n: secure_vectors.dp_coalition_inputs(flats[n], plan, roster, n) for n in roster}
        sums = {
            seg: sum((inputs[n][seg] for n in roster), np.zeros(plan.num_params, np.int64))
            for seg in inputs[roster[0]]
        }
        decoded = secure_vectors.decode_coalitions(sums, roster, roster, plan)
        means = {label: models.unflatten(m, layout) for label, (m, _) in decoded.items()}
        members = {label: k for label, (_, k) in decoded.items()}
        secure_rounds.append(secure_round_values(weights, means, members, utility))

        # (c) the same leave-one-out on exact uniform means of the clipped updates.
        clipped = {n: _clip(flats[n], plan.clip) for n in roster}
        groups = {secure_vectors.ALL_COALITION: roster}
        groups |= {secure_vectors.coalition_label(n): [o for o in roster if o != n] for n in roster}
        exact = {
            label: models.unflatten(
                np.mean([clipped[o] for o in group], axis=0).astype(np.float32), layout
            )
            for label, group in groups.items()
        }
        sizes = {label: len(group) for label, group in groups.items()}
        loo_rounds.append(secure_round_values(weights, exact, sizes, utility))

        # The coordinator's FedAvg step with the noised training mean.
        weights = contribution.coalition_from_sum(weights, means[secure_vectors.ALL_COALITION], 1.0)

    final = models.arrays_to_model(build_net(), weights)
    accuracy = float(training.evaluate(final, x_test, y_test).accuracy)
    return Repeat(
        clear_shapley=contribution.per_round_shapley(shapley_tables),
        secure=_sum_rounds(secure_rounds),
        clear_loo=_sum_rounds(loo_rounds),
        test_accuracy=accuracy,
        update_norm_median=float(np.median(norms)),
        clipped_fraction=float(np.mean([v > plan.clip * CLIP_MARGIN for v in norms])),
        seconds=time.perf_counter() - t0,
    )


def _sum_rounds(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    names = sorted({n for r in rounds for n in r})
    return {n: math.fsum(r.get(n, 0.0) for r in rounds) for n in names}


# --------------------------------------------------------------------------- comparison


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float | None:
    """Spearman's ρ of two score vectors (``None`` when one is constant)."""
    from scipy.stats import spearmanr

    names = sorted(a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: ρ undefined, reported as None
        rho = float(spearmanr([a[n] for n in names], [b[n] for n in names]).statistic)
    return rho if math.isfinite(rho) else None


def shares(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores as shares of Σ|score| (signs kept), so differently scaled vectors compare."""
    total = math.fsum(abs(v) for v in scores.values())
    return {n: (v / total if total > 0 else 0.0) for n, v in scores.items()}


def share_mae(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    sa, sb = shares(a), shares(b)
    return math.fsum(abs(sa[n] - sb[n]) for n in sa) / len(sa)


def raw_mae(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    return math.fsum(abs(a[n] - b[n]) for n in a) / len(a)


def ranked_last(scores: Mapping[str, float], node: str) -> bool:
    """Whether ``node`` scores strictly below every other node."""
    return all(scores[node] < v for n, v in scores.items() if n != node)


def _stats(values: Sequence[float | None]) -> dict[str, Any]:
    found = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(found)) if found else None,
        "min": float(np.min(found)) if found else None,
        "max": float(np.max(found)) if found else None,
        "undefined": len(values) - len(found),
        "values": list(values),
    }


PAIRS = {
    "secure_vs_clear_shapley": ("secure", "clear_shapley"),
    "secure_vs_clear_loo": ("secure", "clear_loo"),
    "clear_loo_vs_clear_shapley": ("clear_loo", "clear_shapley"),
}


def _clear_job_reference(cells: Sequence[Cell]) -> dict[str, dict[str, float]]:
    """Per federation, the clear Shapley scores of the no-noise job (mean over its
    repeats): what a clear-mode job of the same spec reports, whose model did not take
    the noised steps. Secure scores at each ε are also compared with these."""
    out = {}
    for c in cells:
        if c.setting == NO_NOISE and c.repeats:
            out[c.federation] = {
                n: float(np.mean([r.clear_shapley[n] for r in c.repeats])) for n in c.nodes
            }
    return out


def summarize(cell: Cell, clear_job: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Agreement statistics of one cell; ``clear_job`` is the federation's noise-free
    clear Shapley reference (:func:`_clear_job_reference`), if the run had one."""
    reps = [
        {"clear_shapley": r.clear_shapley, "secure": r.secure, "clear_loo": r.clear_loo}
        for r in cell.repeats
    ]
    out: dict[str, Any] = {
        "spearman": {
            k: _stats([spearman(s[a], s[b]) for s in reps]) for k, (a, b) in PAIRS.items()
        },
        "share_mae": {
            k: _stats([share_mae(s[a], s[b]) for s in reps]) for k, (a, b) in PAIRS.items()
        },
        "raw_mae_neg_loss": {
            k: _stats([raw_mae(s[a], s[b]) for s in reps]) for k, (a, b) in PAIRS.items()
        },
        "test_accuracy": _stats([r.test_accuracy for r in cell.repeats]),
        "update_norm_median": float(np.median([r.update_norm_median for r in cell.repeats])),
        "clipped_fraction": float(np.mean([r.clipped_fraction for r in cell.repeats])),
        "mean_scores": {
            kind: {n: float(np.mean([s[kind][n] for s in reps])) for n in cell.nodes}
            for kind in ("clear_shapley", "secure", "clear_loo")
        },
        "std_scores": {
            kind: {n: float(np.std([s[kind][n] for s in reps])) for n in cell.nodes}
            for kind in ("clear_shapley", "secure", "clear_loo")
        },
    }
    if clear_job is not None:
        out["secure_vs_clear_job"] = {
            "spearman": _stats([spearman(r.secure, clear_job) for r in cell.repeats]),
            "share_mae": _stats([share_mae(r.secure, clear_job) for r in cell.repeats]),
        }
    if NOISY in cell.nodes:
        out["noisy_lab_ranked_last"] = {
            kind: sum(ranked_last(s[kind], NOISY) for s in reps) / len(reps)
            for kind in ("secure", "clear_shapley", "clear_loo")
        }
    return out


# --------------------------------------------------------------------------- the run


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        return {}
    return {"commit": head, "uncommitted_changes": bool(dirty)}


def machine() -> dict[str, Any]:
    import scipy
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "torch": torch.__version__,
        "torch_threads": 1,
        **_git(),
    }


def run(
    cfg: Config, out_dir: Path = RESULTS, log: bool = True, command: str = ""
) -> dict[str, Any]:
    """Run every federation × setting × repeat, write ``<stem>.json`` and ``<stem>.md``."""
    from wharf.algorithms import models, training
    from wharf.algorithms.privacy.plan import participant_plan, releases_per_round

    started = time.perf_counter()
    feds, x_val, y_val, data_info = load_data()
    utility = make_utility(x_val, y_val)
    net = models.init_model("mlp", (30,), NUM_CLASSES, {"hidden": HIDDEN}, 0)
    num_params = models.flatten(models.model_to_arrays(net))[0].size
    cells: list[Cell] = []
    with training.torch_threads(1):
        for fed_name in cfg.federations:
            data = feds[fed_name]
            for setting in cfg.settings:
                spec = job_spec(len(data), cfg.rounds, setting)
                guarantee, plan = participant_plan(spec, num_params)
                cell = Cell(
                    federation=fed_name,
                    nodes=sorted(data),
                    setting=setting,
                    epsilon_stated=guarantee.epsilon,
                    noise_multiplier=plan.noise_multiplier,
                    releases=int(guarantee.mechanism["rounds"]),
                    plan={"releases_per_round": releases_per_round(spec), **plan.to_dict()},
                )
                for i in range(setting.repeats or cfg.repeats):
                    rep = run_job(spec, plan, data, utility, x_val, y_val)
                    cell.repeats.append(rep)
                    if log:
                        rho = spearman(rep.secure, rep.clear_shapley)
                        print(
                            f"[contribution] {fed_name}, {setting.label}, repeat {i + 1}: "
                            f"ρ(secure, clear Shapley) {_fmt(rho, '+.2f')}, "
                            f"accuracy {rep.test_accuracy:.3f} ({rep.seconds:.1f} s)",
                            flush=True,
                        )
                cells.append(cell)
    reference = _clear_job_reference(cells)
    result = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command or "python -m benchmarks.contribution_modes",
        "machine": machine(),
        "seconds_total": time.perf_counter() - started,
        "settings": {
            "rounds": cfg.rounds,
            "repeats": cfg.repeats,
            "noise_settings": [asdict(s) for s in cfg.settings],
            "delta": DELTA,
            "clip": CLIP,
            "num_params": num_params,
            "model": {"kind": "mlp", "hidden": HIDDEN, "standardize": False},
            "training": {
                "optimizer": "adam",
                "lr": 0.005,
                "epochs": 1,
                "batch_size": 16,
                "seed": "0 + round (rounds 1..R), as the node worker",
            },
            "federation": (
                "fedavg, secure = true, min_nodes = 3 (the demo's: Skellam shares are sized "
                "for 3 contributors, so a 4-node sum carries 4/3 of the planned noise "
                "variance), max_nodes = number of nodes, valuation.mode = secure"
            ),
            "utility": "neg_loss (minus mean cross-entropy) on the validation rows",
            "data": data_info,
        },
        "cells": [
            {
                "federation": c.federation,
                "nodes": c.nodes,
                "setting": c.setting.label,
                "extra": c.setting.extra,
                "epsilon_target": c.setting.epsilon,
                "epsilon_stated": c.epsilon_stated,
                "noise_multiplier": c.noise_multiplier,
                "releases": c.releases,
                "plan": c.plan,
                "summary": summarize(c, reference.get(c.federation)),
                "repeats": [asdict(r) for r in c.repeats],
            }
            for c in cells
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{cfg.stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / f"{cfg.stem}.md").write_text(markdown(result))
    return result


# --------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mean_min(s: Mapping[str, Any], spec: str = "+.2f") -> str:
    text = f"{_fmt(s['mean'], spec)} ({_fmt(s['min'], spec)})"
    if s["undefined"]:
        text += f", {s['undefined']} undefined"
    return text


def _span(values: Sequence[float], spec: str) -> str:
    lo, hi = format(min(values), spec), format(max(values), spec)
    return lo if lo == hi else f"{lo}–{hi}"


def _setting(c: Mapping[str, Any]) -> str:
    return c["setting"] + (" (extra)" if c["extra"] else "")


def markdown(result: Mapping[str, Any]) -> str:
    st = result["settings"]
    cells = result["cells"]
    norms = [c["summary"]["update_norm_median"] for c in cells]
    clipped = [c["summary"]["clipped_fraction"] for c in cells]
    few = {x["repeats"] for x in st["noise_settings"] if x["repeats"] is not None}
    lines = [
        "# Contribution scores: secure mode vs clear-text mode on the same jobs",
        "",
        f"Generated by `{result['command']}` on {result['generated']} "
        f"({result['machine']['cpu_model']}, {result['machine']['usable_cpus']} usable CPUs, "
        f"Python {result['machine']['python']}, torch {result['machine']['torch']}); "
        f"{result['seconds_total']:.0f} s in all.",
        "",
        f"Per federation and noise level: {st['repeats']} simulated secure jobs (fresh "
        f"Skellam noise in each; {'/'.join(map(str, sorted(few))) or st['repeats']} for the "
        "no-noise row, where nothing varies), "
        f"{st['rounds']} rounds each, the demo's model and training (MLP {HIDDEN}, "
        f"{st['num_params']} values per update, Adam lr 0.005, batch 16, 1 local epoch), "
        f"features scaled by their published ranges, participant-level clip {CLIP}, "
        f'δ = {DELTA:g}, `valuation.mode = "secure"`: the accountant composes rounds × '
        "max_nodes releases (`releases` below), and ε stated is the plan's "
        "`Guarantee.epsilon`. On the same rounds: **clear Shapley** = exact per-round "
        "Shapley values of the clear, unclipped, example-weighted updates (what clear mode "
        "would report for them); **secure** = leave-one-out values from the decoded, "
        "noised coalition means (what secure mode reports); **clear LOO** = the same "
        "leave-one-out on exact uniform means of the clipped updates (secure mode "
        "without noise). Utility: minus the mean cross-entropy on "
        f"{st['data']['validation']}. `{NOISY}`: {st['data']['noisy_lab']}. Clear updates "
        f"had a median L2 norm of {_span(norms, '.2g')} (per setting), and "
        f"{_span([c * 100 for c in clipped], '.0f')} % of them were clipped.",
        "",
        "ρ: Spearman's rank correlation over the nodes, mean (min) over the repeats. With 3 "
        "nodes it can only be −1, −0.5, 0.5 or 1; with 4 nodes a multiple of 0.2 (no ties). "
        "Share MAE: mean absolute difference over nodes between the two score vectors, each "
        "divided by its Σ|score| (so the absolute shares sum to 1). Raw MAE: the same on the "
        "scores themselves, in neg-loss units. Rows marked *extra* are fixed noise "
        "multipliers beyond the requested ε levels: their stated ε is no guarantee at all, "
        "they show how little noise secure mode tolerates. **Clear job**: the clear "
        "Shapley scores of the federation's no-noise job — what a clear-mode job of the "
        "same spec reports (its model never took a noised step); at small ε the noised "
        "trajectory wrecks the model, and clear Shapley computed on *those* rounds is "
        "itself erratic, so both references are shown.",
        "",
        "## Secure vs clear Shapley",
        "",
        "| federation | setting | ε stated | releases | noise multiplier "
        "| ρ secure vs clear Shapley | share MAE | raw MAE "
        "| ρ secure vs clear job (share MAE) "
        "| noisy-lab ranked last: secure / clear Shapley / clear LOO "
        "| final test accuracy, mean (min–max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        s = c["summary"]
        last = s.get("noisy_lab_ranked_last")
        last_text = (
            " / ".join(f"{last[k] * 100:.0f} %" for k in ("secure", "clear_shapley", "clear_loo"))
            if last
            else "—"
        )
        acc = s["test_accuracy"]
        job = s.get("secure_vs_clear_job")
        job_text = f"{_mean_min(job['spearman'])} ({job['share_mae']['mean']:.3f})" if job else "—"
        lines.append(
            f"| {c['federation']} | {_setting(c)} | {c['epsilon_stated']:.3g} "
            f"| {c['releases']} | {c['noise_multiplier']:.3g} "
            f"| {_mean_min(s['spearman']['secure_vs_clear_shapley'])} "
            f"| {s['share_mae']['secure_vs_clear_shapley']['mean']:.3f} "
            f"| {s['raw_mae_neg_loss']['secure_vs_clear_shapley']['mean']:.3g} "
            f"| {job_text} "
            f"| {last_text} "
            f"| {acc['mean'] * 100:.1f} % ({acc['min'] * 100:.1f}–{acc['max'] * 100:.1f}) |"
        )
    lines += [
        "",
        "## Where the gap comes from: noise (secure vs clear LOO) and method (clear LOO vs "
        "clear Shapley)",
        "",
        "| federation | setting | ρ secure vs clear LOO | share MAE "
        "| ρ clear LOO vs clear Shapley | share MAE |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        s = c["summary"]
        lines.append(
            f"| {c['federation']} | {_setting(c)} "
            f"| {_mean_min(s['spearman']['secure_vs_clear_loo'])} "
            f"| {s['share_mae']['secure_vs_clear_loo']['mean']:.3f} "
            f"| {_mean_min(s['spearman']['clear_loo_vs_clear_shapley'])} "
            f"| {s['share_mae']['clear_loo_vs_clear_shapley']['mean']:.3f} |"
        )
    lines += [
        "",
        "## Mean scores per node (neg-loss units): clear Shapley / secure (± std) / clear LOO",
        "",
    ]
    for fed in dict.fromkeys(c["federation"] for c in cells):
        fed_cells = [c for c in cells if c["federation"] == fed]
        nodes = fed_cells[0]["nodes"]
        lines += [
            f"**{fed}**",
            "",
            "| setting | " + " | ".join(nodes) + " |",
            "|---|" + "---|" * len(nodes),
        ]
        for c in fed_cells:
            m, sd = c["summary"]["mean_scores"], c["summary"]["std_scores"]
            row = [
                f"{m['clear_shapley'][n]:+.3f} / {m['secure'][n]:+.3f} (± {sd['secure'][n]:.2g})"
                f" / {m['clear_loo'][n]:+.3f}"
                for n in nodes
            ]
            lines.append(f"| {_setting(c)} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="3 rounds, 2 repeats, no noise and ε 8 only"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the results")
    parser.add_argument("--repeats", type=int, default=0, help="override the repeat count")
    parser.add_argument("--rounds", type=int, default=0, help="override the round count")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    if args.repeats or args.rounds:
        cfg = Config(
            rounds=args.rounds or cfg.rounds,
            repeats=args.repeats or cfg.repeats,
            settings=cfg.settings,
            federations=cfg.federations,
            stem=cfg.stem,
        )
    shown = list(sys.argv[1:] if argv is None else argv)
    if "--out" in shown:  # where the files went is not part of how they were made
        i = shown.index("--out")
        del shown[i : i + 2]
    return run(cfg, args.out, command=" ".join(["python -m benchmarks.contribution_modes", *shown]))


if __name__ == "__main__":
    main()
