"""Smoke test of ``benchmarks/``: the quick suite runs and Wharf's masked output is right.

Correctness only — CI machines are noisy, so no timing is ever asserted here
(DESIGN.md §8: performance claims live in ``benchmarks/``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import kernels  # noqa: E402
from benchmarks import wharf_paths as wh  # noqa: E402


@pytest.mark.parametrize("n", [1, 4097, 50_001])
def test_masked_update_unmasks_to_its_encoding(n: int) -> None:
    setup = wh.masking_setup(n, k=8)
    update = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    assert wh.masking_is_exact(setup, update)


def test_production_path_with_the_helper_process_is_exact() -> None:
    """Above the threshold the production path splits the work with the helper process:
    bit-identical to the in-process kernel, and it unmasks to the encoding."""
    from wharf.algorithms.secagg import parallel

    status = wh.start_helper()
    n = parallel.PARALLEL_MIN_WORDS + 3
    setup = wh.masking_setup(n, k=8)
    update = (np.random.default_rng(n).standard_normal(n) * 0.1).astype(np.float32)
    before = wh.helper_status()["calls"]
    assert wh.masking_is_exact(setup, update)
    if status["running"]:
        assert wh.path_used(n) == "2 processes"
        assert wh.helper_status()["calls"] > before


def test_recorded_round_unmasks_to_the_right_sum_with_a_dropout() -> None:
    rec = wh.record_round(6, 3000, drop_fraction=0.2)
    assert rec.dropped and len(rec.survivors) == 6 - len(rec.dropped)
    for _ in range(2):  # every replay of the recorded round gives the same exact sum
        result = wh.server_aggregate(wh.fresh_server(rec))
        assert list(result.contributors) == rec.survivors
        assert result.dropped_before_input == tuple(rec.dropped)
        assert wh.server_is_exact(rec, result)


def test_quick_suite_runs_and_everything_it_checks_is_exact(tmp_path: Path) -> None:
    cfg = kernels.Config.quick()
    cfg.repeats, cfg.mask_repeats, cfg.warmup = 1, 1, 0
    cfg.mask_sizes = [10_000, 100_000]
    cfg.server_values = 20_000
    results = kernels.run(cfg, tmp_path)
    assert all(r["correct"] for r in results["masking"]["rows"])
    assert all(r["correct"] for r in results["server"]["rows"])
    assert all(r["correct"] for r in results["shamir"]["kernel"])
    assert results["wire"]["wharf_bytes_per_param"] > 4.0  # the vector itself is 4 B/param
    assert {t["status"] for t in results["targets"]} <= {"PASS", "FAIL", "NOT RUN"}
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert saved["mode"] == "quick" and saved["targets"]
    assert (tmp_path / "quick.md").read_text().startswith("# Secure-aggregation kernels")
    assert (tmp_path / "quick-throughput.png").stat().st_size > 0
    assert "wharf_helper" in saved  # the production path's helper is reported
