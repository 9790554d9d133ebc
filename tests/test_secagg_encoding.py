"""Centred fixed-point encoding: error bound, headroom, exact integer segments."""

from __future__ import annotations

import os

import numpy as np
import pytest

from wharf.algorithms.secagg import Segment, VectorLayout, choose_params
from wharf.algorithms.secagg.mask import apply_masks
from wharf.algorithms.secagg.params import max_value_bits


def _layout(n: int, max_nodes: int = 1024, clip: float = 4.0) -> VectorLayout:
    return VectorLayout(
        [
            Segment.real("update", n, clip, max_value_bits(max_nodes)),
            Segment.integer("num_examples", 1, 1 << 20),
            Segment.real("metric_sums", 3, 1e4, max_value_bits(max_nodes)),
        ],
        max_nodes,
    )


def test_round_trip_error_is_below_one_step() -> None:
    lay = _layout(10_000)
    x = np.linspace(-4.0, 4.0, 10_000)
    enc = lay.encode({"update": x, "num_examples": [12], "metric_sums": [1.5, -2.25, 9999.0]})
    dec = lay.decode(enc, 1)
    step = lay.segments[0].resolution
    assert np.max(np.abs(dec["update"] - x)) < step
    assert dec["num_examples"].tolist() == [12]
    assert np.max(np.abs(dec["metric_sums"] - [1.5, -2.25, 9999.0])) < lay.segments[2].resolution


def test_values_beyond_the_clip_are_clipped_and_inf_too() -> None:
    lay = _layout(4)
    enc = lay.encode(
        {"update": [10.0, -10.0, np.inf, -np.inf], "num_examples": [0], "metric_sums": [0, 0, 0]}
    )
    assert lay.decode(enc, 1)["update"].tolist() == [4.0, -4.0, 4.0, -4.0]


def test_nan_is_refused() -> None:
    lay = _layout(3)
    with pytest.raises(ValueError, match="NaN"):
        lay.encode({"update": [0.0, np.nan, 1.0], "num_examples": [0], "metric_sums": [0, 0, 0]})


def test_stochastic_rounding_is_unbiased() -> None:
    lay = VectorLayout([Segment.real("v", 200_000, 1.0, 4)], 2)  # step = 1/8
    value = 0.3 / 8  # 0.3 of a step
    enc = lay.encode({"v": np.full(200_000, value)})
    dec = lay.decode(enc, 1)["v"]
    assert set(np.unique(dec).tolist()) == {0.0, 0.125}
    # mean of Bernoulli(0.3) over 2e5 draws: sd 0.001; 8 sd margin
    assert abs(dec.mean() * 8 - 0.3) < 0.008


def test_float32_inputs_are_scaled_in_double_precision() -> None:
    # y = x * 2**20 / 3 has fraction 0.666... only in float64; a float32 product
    # would round it to 0.75 and bias every rounding of values near the clip.
    lay = VectorLayout([Segment.real("v", 200_000, 3.0, 21)], 1024)
    x = np.float32(2.9999998)
    exact = float(x) * lay.segments[0].scale
    assert abs(float(np.float32(exact)) - exact) > 0.02  # float32 cannot hold it
    dec = lay.decode(lay.encode({"v": np.full(200_000, x)}), 1)["v"] * lay.segments[0].scale
    frac = exact - np.floor(exact)
    sd = (frac * (1 - frac) / 200_000) ** 0.5
    assert abs(dec.mean() - exact) < 8 * sd


def test_rounding_key_fixes_the_result_and_default_is_fresh() -> None:
    lay = _layout(1000)
    inputs = {"update": np.random.default_rng(0).normal(size=1000), "num_examples": [1],
              "metric_sums": [0, 0, 0]}  # fmt: skip
    key = os.urandom(16)
    assert np.array_equal(lay.encode(inputs, key), lay.encode(inputs, key))
    assert not np.array_equal(lay.encode(inputs), lay.encode(inputs))


@pytest.mark.parametrize("max_nodes", [2, 3, 1000, 1024, 1025, 60_000])
def test_no_wrap_for_max_nodes_inputs_at_the_clip_bound(max_nodes: int) -> None:
    bits = max_value_bits(max_nodes)
    lay = VectorLayout([Segment.real("v", 4, 2.0, bits), Segment.integer("n", 1, 1000)], max_nodes)
    one = lay.encode({"v": [2.0, -2.0, 5.0, -5.0], "n": [1000]})
    total = (one.astype(np.uint64) * max_nodes % (1 << 32)).astype(np.uint32)
    dec = lay.decode(total, max_nodes)
    assert dec["v"].tolist() == [2.0 * max_nodes, -2.0 * max_nodes] * 2
    assert dec["n"].tolist() == [1000 * max_nodes]
    assert abs(int(total.view(np.int32)[0])) <= 2**30


def test_layout_refuses_segments_that_could_wrap() -> None:
    with pytest.raises(ValueError, match="wrap"):
        VectorLayout([Segment.real("v", 1, 1.0, max_value_bits(1024) + 1)], 1024)
    with pytest.raises(ValueError, match="wrap"):
        VectorLayout([Segment.integer("n", 1, 1 << 22)], 1024)
    VectorLayout([Segment.integer("n", 1, (2**31 - 1) // 1024)], 1024)


def test_exact_integer_segment_sums_exactly() -> None:
    lay = VectorLayout([Segment.integer("count", 2, 1 << 20)], 1000)
    counts = [[123_456, 1], [1_048_576, 0], [7, 999_999], [0, 1_048_576]]
    total = np.zeros(2, dtype=np.uint32)
    for c in counts:
        total += lay.encode({"count": c})
    assert lay.decode(total, 4)["count"].tolist() == [sum(c[0] for c in counts),
                                                      sum(c[1] for c in counts)]  # fmt: skip
    assert lay.segments[0].scale == 1.0
    assert lay.encode({"count": [5.0, -3.0]}).view(np.int32).tolist() == [5, -3]


def test_exact_segment_refuses_non_integers_and_out_of_bound() -> None:
    lay = VectorLayout([Segment.integer("count", 1, 100)], 10)
    with pytest.raises(ValueError, match="integers"):
        lay.encode({"count": [1.5]})
    with pytest.raises(ValueError, match="bound"):
        lay.encode({"count": [101]})
    with pytest.raises(ValueError, match="integers"):
        lay.encode({"count": [np.nan]})


def test_decode_refuses_impossible_sums() -> None:
    lay = VectorLayout([Segment.integer("count", 1, 100)], 10)
    total = lay.encode({"count": [100]}) * 3
    assert lay.decode(total, 3)["count"].tolist() == [300]
    with pytest.raises(ValueError, match="exceeds"):
        lay.decode(total, 2)
    with pytest.raises(ValueError):
        lay.decode(total, 11)


def test_inputs_may_be_several_tensors() -> None:
    lay = VectorLayout([Segment.real("update", 70_000, 1.0, 20)], 100)
    rng = np.random.default_rng(3)
    parts: list[np.ndarray] = [
        rng.uniform(-1, 1, (100, 300)).astype(np.float32),
        rng.uniform(-1, 1, 40_000),
    ]
    flat = np.concatenate([p.reshape(-1) for p in parts])
    key = os.urandom(16)
    assert np.array_equal(lay.encode({"update": parts}, key), lay.encode({"update": flat}, key))


def test_missing_or_misshapen_inputs_are_refused() -> None:
    lay = _layout(10)
    with pytest.raises(ValueError, match="missing"):
        lay.encode({"update": np.zeros(10), "num_examples": [1]})
    with pytest.raises(ValueError, match="expects"):
        lay.encode({"update": np.zeros(9), "num_examples": [1], "metric_sums": [0, 0, 0]})
    with pytest.raises(ValueError, match="unknown"):
        lay.encode({"update": np.zeros(10), "num_examples": [1], "metric_sums": [0, 0, 0],
                    "extra": [1]})  # fmt: skip


def test_fused_encode_and_mask_is_chunking_and_thread_invariant() -> None:
    n = 100_003
    lay = VectorLayout([Segment.real("u", n - 1, 1.0, 20), Segment.integer("c", 1, 10)], 100)
    inputs = {"u": np.random.default_rng(4).uniform(-2, 2, n - 1), "c": [7]}
    key = os.urandom(16)
    masks = [os.urandom(16) for _ in range(3)]
    ref = lay.encode(inputs, key)
    ref = ref + _stream(masks[0], n) + _stream(masks[1], n) - _stream(masks[2], n)
    for chunk, threads in [(16384, 1), (4, 1), (1000, 2), (16384, 2), (65536, 2)]:
        out = np.empty(n, dtype=np.uint32)
        apply_masks(out, masks[:2], masks[2:], source=lay.source(inputs, key),
                    chunk_words=chunk, threads=threads)  # fmt: skip
        assert np.array_equal(out, ref), (chunk, threads)


def test_for_update_layout_uses_round_parameters() -> None:
    params = choose_params(10, clip=2.0)
    lay = VectorLayout.for_update(5, params, [Segment.integer("n", 1, 100)])
    assert lay.length == 6
    assert lay.segments[0].bound == 2 ** (params.value_bits - 1)
    assert lay.segments[0].scale == lay.segments[0].bound / 2.0


def _stream(key: bytes, n: int) -> np.ndarray:
    from wharf.algorithms.secagg.prg import keystream_words

    return keystream_words(key, n)
