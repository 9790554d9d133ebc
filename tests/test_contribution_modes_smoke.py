"""Smoke test of ``benchmarks/contribution_modes.py``: the quick comparison runs and is right.

Correctness only, never timings (CI machines are noisy). With a negligible noise share
(the "no noise" row) secure mode is leave-one-out on the clipped uniform means, so its
scores must rank the nodes exactly as clear leave-one-out does.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import contribution_modes as cm  # noqa: E402


def _ranking(scores: dict[str, float]) -> list[str]:
    return sorted(scores, key=lambda n: (scores[n], n))


def test_quick_comparison_runs_and_no_noise_secure_ranks_like_clear_loo(tmp_path: Path) -> None:
    result = cm.main(["--quick", "--out", str(tmp_path)])

    saved = json.loads((tmp_path / "quick-contribution.json").read_text())
    assert saved["cells"] == json.loads(json.dumps(result["cells"]))
    assert (tmp_path / "quick-contribution.md").read_text().startswith("# Contribution scores")
    assert saved["settings"]["rounds"] == cm.QUICK.rounds
    assert saved["machine"]["cpu_model"]

    cells = saved["cells"]
    assert [(c["federation"], c["setting"]) for c in cells] == [
        (fed, s.label) for fed in cm.QUICK.federations for s in cm.QUICK.settings
    ]
    for c in cells:
        n = len(c["nodes"])
        assert c["plan"]["max_nodes"] == n
        assert c["releases"] == cm.QUICK.rounds * n  # rounds × max_nodes under secure valuation
        assert math.isfinite(c["epsilon_stated"]) and c["epsilon_stated"] > 0
        if c["epsilon_target"] is not None:  # calibrated to within 1 % below the target
            assert 0.99 * c["epsilon_target"] <= c["epsilon_stated"] <= c["epsilon_target"]
        assert len(c["repeats"]) >= 2
        for r in c["repeats"]:
            for kind in ("clear_shapley", "secure", "clear_loo"):
                assert sorted(r[kind]) == c["nodes"]
                assert all(math.isfinite(v) for v in r[kind].values())
            assert 0.0 <= r["test_accuracy"] <= 1.0
        s = c["summary"]
        for table in ("spearman", "share_mae", "raw_mae_neg_loss"):
            assert set(s[table]) == set(cm.PAIRS)
        assert ("noisy_lab_ranked_last" in s) == (cm.NOISY in c["nodes"])

    no_noise = [c for c in cells if c["setting"] == cm.NO_NOISE.label]
    assert len(no_noise) == len(cm.QUICK.federations)
    for c in no_noise:
        for r in c["repeats"]:
            assert _ranking(r["secure"]) == _ranking(r["clear_loo"])
        assert c["summary"]["spearman"]["secure_vs_clear_loo"]["min"] == 1.0
