"""The two-process masking kernel: bit-identical to ``apply_masks``, and safe when it fails."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wharf.algorithms.secagg import (
    SecAggClient,
    SecAggServer,
    Segment,
    VectorLayout,
    choose_params,
    parallel,
)
from wharf.algorithms.secagg.mask import DEFAULT_CHUNK_WORDS, apply_masks, mask_range
from wharf.algorithms.secagg.parallel import (
    SPLIT_ALIGN,
    MaskHelper,
    apply_masks_parallel,
)
from wharf.algorithms.secagg.prg import keystream_words

pytestmark = pytest.mark.skipif(parallel.usable_cpus() < 2, reason="needs two usable CPUs")


@pytest.fixture(scope="module")
def helper() -> Iterator[MaskHelper]:
    h = MaskHelper()
    assert h.start(), "the helper process did not start"
    yield h
    h.close()


def _keys(count: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(count)]


def _layout(n: int) -> tuple[VectorLayout, dict[str, Any]]:
    """An update in three tensors of mixed dtypes, an exact count and float64 metric sums."""
    rng = np.random.default_rng(n)  # test data, not secrets
    a = n // 3
    b = n - a - 4 - 1
    layout = VectorLayout(
        [
            Segment.real("update", n - 4, 2.0, 20),
            Segment.integer("num_examples", 1, 1 << 20),
            Segment.real("metrics", 3, 1e4, 20),
        ],
        100,
    )
    inputs: dict[str, Any] = {
        "update": [
            rng.uniform(-3, 3, a).astype(np.float32),
            rng.uniform(-2, 2, b),
            rng.uniform(-2, 2, 1).astype(np.float32),
        ],
        "num_examples": [int(rng.integers(1, 1 << 20))],
        "metrics": rng.uniform(0, 1e4, 3),
    }
    return layout, inputs


def _reference(
    n: int, add: list[bytes], sub: list[bytes], base: np.ndarray | None = None
) -> np.ndarray:
    ref = np.zeros(n, dtype=np.uint32) if base is None else base.copy()
    for k in add:
        ref += keystream_words(k, n)
    for k in sub:
        ref -= keystream_words(k, n)
    return ref


# Odd lengths, the smallest splittable vector, lengths next to chunk boundaries; the
# helper's share moves the split point across them.
SIZES = [2 * SPLIT_ALIGN, 2 * SPLIT_ALIGN + 3, 3 * DEFAULT_CHUNK_WORDS + 1, 100_003, 262_147]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("share", [0.15, 0.5, 0.85])
def test_encode_and_mask_is_bit_identical(helper: MaskHelper, n: int, share: float) -> None:
    layout, inputs = _layout(n)
    add, sub = _keys(3), _keys(2)
    key = os.urandom(16)
    ref = np.empty(n, dtype=np.uint32)
    apply_masks(ref, add, sub, source=layout.source(inputs, key), threads=1)
    assert np.array_equal(ref, layout.encode(inputs, key) + _reference(n, add, sub))
    helper.share = share
    calls = helper.calls
    out = np.empty(n, dtype=np.uint32)
    assert helper.apply(out, add, sub, source=layout.source(inputs, key))
    assert helper.calls == calls + 1
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("chunk_words", [4, 1000, 4096, DEFAULT_CHUNK_WORDS, 131072])
@pytest.mark.parametrize("keys", [(1, 0), (0, 1), (5, 4), (0, 0)])
def test_chunking_and_add_sub_keys_do_not_change_a_bit(
    helper: MaskHelper, chunk_words: int, keys: tuple[int, int]
) -> None:
    n = 70_001
    layout, inputs = _layout(n)
    add, sub = _keys(keys[0]), _keys(keys[1])
    key = os.urandom(16)
    ref = np.empty(n, dtype=np.uint32)
    apply_masks(ref, add, sub, source=layout.source(inputs, key), threads=1)
    helper.share = 0.5
    out = np.empty(n, dtype=np.uint32)
    assert helper.apply(out, add, sub, source=layout.source(inputs, key), chunk_words=chunk_words)
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("n", SIZES)
def test_unmasking_without_a_source_is_bit_identical(helper: MaskHelper, n: int) -> None:
    base = np.frombuffer(os.urandom(4 * n), dtype=np.uint32).copy()
    add, sub = _keys(2), _keys(7)
    out = base.copy()
    assert helper.apply(out, add, sub)
    assert np.array_equal(out, _reference(n, add, sub, base))
    assert helper.apply(out, sub, add)  # and the masks cancel
    assert np.array_equal(out, base)


def test_input_dtypes_byte_order_and_strides(helper: MaskHelper) -> None:
    n = 50_000
    rng = np.random.default_rng(5)
    layout = VectorLayout([Segment.real("update", n, 1.0, 20)], 10)
    big = rng.uniform(-1, 1, 2 * n)
    cases = [
        big[::2],  # strided view
        big[:n].astype(">f4"),  # non-native byte order
        big[:n].astype(np.float16),
        big[:n].astype(np.longdouble),
        (big[:n] * 4).astype(np.int32),  # integers in a real segment
    ]
    add, sub = _keys(2), _keys(1)
    key = os.urandom(16)
    for update in cases:
        ref = np.empty(n, dtype=np.uint32)
        apply_masks(ref, add, sub, source=layout.source({"update": update}, key), threads=1)
        out = np.empty(n, dtype=np.uint32)
        assert helper.apply(out, add, sub, source=layout.source({"update": update}, key))
        assert np.array_equal(out, ref), update.dtype


@pytest.mark.parametrize("where", ["parent", "helper"])
def test_nan_is_refused_as_in_process_and_the_helper_survives(
    helper: MaskHelper, where: str
) -> None:
    n = 40_000
    layout = VectorLayout([Segment.real("update", n, 1.0, 20)], 10)
    update = np.zeros(n)
    update[10 if where == "parent" else n - 10] = np.nan
    helper.share = 0.5
    with pytest.raises(ValueError, match="'update' contains NaN"):
        apply_masks(
            np.empty(n, dtype=np.uint32), _keys(1), source=layout.source({"update": update})
        )
    with pytest.raises(ValueError, match="'update' contains NaN"):
        helper.apply(
            np.empty(n, dtype=np.uint32), _keys(1), source=layout.source({"update": update})
        )
    assert helper.alive
    update[:] = 0.25
    key, add = os.urandom(16), _keys(1)
    ref = np.empty(n, dtype=np.uint32)
    apply_masks(ref, add, source=layout.source({"update": update}, key))
    out = np.empty(n, dtype=np.uint32)
    assert helper.apply(out, add, source=layout.source({"update": update}, key))
    assert np.array_equal(out, ref)


def test_clear_input_is_zeroed_and_never_named(helper: MaskHelper) -> None:
    n = 60_000
    layout = VectorLayout([Segment.real("update", n, 1.0, 20)], 10)
    update = np.full(n, 0.5, dtype=np.float32)
    before = set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()
    helper.share = 0.5
    assert helper.apply(
        np.empty(n, dtype=np.uint32), _keys(2), source=layout.source({"update": update})
    )
    if Path("/dev/shm").is_dir():
        assert set(os.listdir("/dev/shm")) - before == set()  # the segment has no name
    helper._await_idle()  # the helper has answered "input zeroed"
    shm = helper._shm
    assert shm is not None and shm.buf is not None
    words = np.frombuffer(shm.buf, dtype=np.float32)
    assert not np.any(words == np.float32(0.5))  # no copy of the clear update is left
    del words


def test_routing_small_explicit_threads_and_switch(
    helper: MaskHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    n = 20_000
    add = _keys(3)
    base = np.frombuffer(os.urandom(4 * n), dtype=np.uint32).copy()
    want = _reference(n, add, [], base)
    for kwargs, used in [
        ({"min_words": n}, True),
        ({"min_words": n + 1}, False),  # below the size threshold
        ({"min_words": 1, "threads": 1}, False),  # explicit threads: in process
    ]:
        calls = helper.calls
        out = base.copy()
        apply_masks_parallel(out, add, helper=helper, **kwargs)
        assert np.array_equal(out, want)
        assert helper.calls == calls + used, kwargs
    monkeypatch.setenv(parallel.ENV_SWITCH, "0")
    calls = helper.calls
    out = base.copy()
    apply_masks_parallel(out, add, helper=helper, min_words=1)
    assert np.array_equal(out, want) and helper.calls == calls


def test_argument_checks_match_apply_masks(helper: MaskHelper) -> None:
    with pytest.raises(ValueError):
        apply_masks_parallel(np.zeros(10_000, dtype=np.int64), _keys(1), helper=helper)
    with pytest.raises(ValueError):
        apply_masks_parallel(np.zeros(10_000, dtype=np.uint32), [os.urandom(32)], helper=helper)
    with pytest.raises(ValueError):
        apply_masks_parallel(np.zeros(20_000, dtype=np.uint32)[::2], _keys(1), helper=helper)


def test_helper_uses_spawn_and_closes_cleanly() -> None:
    h = MaskHelper()
    assert h.start()
    proc = h._proc
    assert type(proc).__name__ == "SpawnProcess"
    h.close()
    assert not h.alive and not proc.is_alive() and proc.exitcode == 0
    n = 3 * SPLIT_ALIGN
    out = np.zeros(n, dtype=np.uint32)
    assert not h.apply(out, _keys(1))  # closed: the caller masks in process
    assert not out.any()
    add = _keys(1)
    apply_masks_parallel(out, add, helper=h, min_words=1)
    assert np.array_equal(out, _reference(n, add, []))


def test_a_helper_that_dies_is_discarded_and_the_result_is_still_right() -> None:
    h = MaskHelper()
    assert h.start()
    n = 50_000
    layout, inputs = _layout(n)
    add, sub, key = _keys(2), _keys(2), os.urandom(16)
    ref = np.empty(n, dtype=np.uint32)
    apply_masks(ref, add, sub, source=layout.source(inputs, key))
    out = np.empty(n, dtype=np.uint32)
    assert h.apply(out, add, sub, source=layout.source(inputs, key))
    assert np.array_equal(out, ref)
    h._await_idle()
    h._proc.kill()
    h._proc.join(5)
    out = np.empty(n, dtype=np.uint32)
    used = h.apply(out, add, sub, source=layout.source(inputs, key))
    if used:  # the job was sent before the death was noticed: finished in process
        assert np.array_equal(out, ref)
    assert not h.alive
    out = np.empty(n, dtype=np.uint32)
    apply_masks_parallel(out, add, sub, source=layout.source(inputs, key), helper=h, min_words=1)
    assert np.array_equal(out, ref)
    h.close()


def test_mask_range_with_an_offset_masks_a_slice() -> None:
    n, lo, hi = 10_000, 4_096, 9_001
    layout, inputs = _layout(n)
    add, sub, key = _keys(2), _keys(1), os.urandom(16)
    ref = np.empty(n, dtype=np.uint32)
    apply_masks(ref, add, sub, source=layout.source(inputs, key), threads=1)
    part = np.empty(hi - lo, dtype=np.uint32)
    mask_range(part, lo, hi, add, sub, layout.source(inputs, key), 1000, offset=lo)
    assert np.array_equal(part, ref[lo:hi])


def _wire(msg: Any) -> Any:
    return type(msg).FromString(msg.SerializeToString())


def test_client_and_server_use_the_helper_for_large_vectors() -> None:
    """A whole round above the threshold, one node dropped after sharing keys: exact sum,
    and the helper masked for both surviving clients and unmasked for the server."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    ecdsa = ec.ECDSA(hashes.SHA256())
    names = ["node-1", "node-2", "node-3"]
    ids = {name: ec.generate_private_key(ec.SECP256R1()) for name in names}

    def verify(name: str, data: bytes, signature: bytes) -> bool:
        try:
            ids[name].public_key().verify(signature, data, ecdsa)
        except Exception:
            return False
        return True

    def signer(name: str) -> Any:
        return lambda data: ids[name].sign(data, ecdsa)

    assert parallel.start_helper(wait=True)
    h = parallel.default_helper()
    calls = h.calls
    params = choose_params(3)
    n = parallel.PARALLEL_MIN_WORDS + 5
    layout = VectorLayout.for_update(n, params, [Segment.integer("num_examples", 1, 1000)])
    server = SecAggServer(
        job_id="j",
        round_number=1,
        params=params,
        roster=names,
        num_values=layout.length,
        verify=verify,
    )
    clients = {
        i: SecAggClient(node_id=name, job_id="j", round_number=1, sign=signer(name), verify=verify)
        for i, name in enumerate(names, 1)
    }
    rng = np.random.default_rng(7)  # test data, not secrets
    inputs = {
        i: {"update": rng.uniform(-1, 1, n).astype(np.float32), "num_examples": [10 * i]}
        for i in clients
    }
    rounding = {i: os.urandom(16) for i in clients}
    for i, m in server.setup_messages().items():
        server.receive_advertisement(_wire(clients[i].setup(_wire(m))))
    for i, m in server.key_directories().items():
        server.receive_share_keys(_wire(clients[i].share_keys(_wire(m))))
    deliveries = server.share_deliveries()
    for i, m in deliveries.items():
        clients[i].receive_shares(_wire(m))
    survivors = [1, 3]  # node 2 drops after sharing keys: its pairwise masks are rebuilt
    for i in survivors:
        msg = clients[i].masked_input(inputs[i], layout, rounding_key=rounding[i])
        server.receive_masked_input(_wire(msg))
    for i, m in server.survivor_messages().items():
        server.receive_consistency_signature(_wire(clients[i].consistency_check(_wire(m))))
    for i, m in server.unmask_requests().items():
        server.receive_unmask_response(_wire(clients[i].unmask(_wire(m))))
    result = server.finish()
    expected = sum(layout.encode(inputs[i], rounding_key=rounding[i]) for i in survivors)
    assert np.array_equal(result.summed, expected)
    assert result.decode(layout)["num_examples"].tolist() == [40]
    assert h.calls == calls + 3  # two clients masked, the coordinator unmasked


def test_no_room_in_shared_memory_falls_back_and_keeps_the_helper(
    helper: MaskHelper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(parallel, "_room_for", lambda nbytes: False)
    # The helper's share adapts to its measured speed (0.15-0.85); earlier tests on a
    # loaded machine can leave it low enough that the helper's part would still fit
    # the old segment. Pin it so the helper's part surely needs a bigger segment.
    monkeypatch.setattr(helper, "share", 0.5)
    shm = helper._shm
    n = (shm.size if shm is not None else 0) + 4 * SPLIT_ALIGN  # helper part: ~2n bytes
    add = _keys(1)
    out = np.zeros(n, dtype=np.uint32)
    assert not helper.apply(out, add)
    assert not out.any() and helper.alive
    apply_masks_parallel(out, add, helper=helper, min_words=1)
    assert np.array_equal(out, _reference(n, add, []))


@pytest.mark.parametrize("with_source", [True, False])
def test_parent_steals_from_a_lagging_helper_bit_identically(
    helper: MaskHelper, with_source: bool
) -> None:
    """Give the helper far too much: the parent finishes early and takes blocks back from
    the end of the helper's range; the output is still exactly apply_masks'."""
    n = 1_500_001
    layout = VectorLayout([Segment.real("update", n, 2.0, 20)], 10)
    update = np.random.default_rng(9).uniform(-3, 3, n).astype(np.float32)
    add, sub, key = _keys(3), _keys(3), os.urandom(16)
    base = np.frombuffer(os.urandom(4 * n), dtype=np.uint32).copy()
    ref = base.copy()
    src = layout.source({"update": update}, key) if with_source else None
    apply_masks(ref, add, sub, source=src, threads=1)
    stolen = 0
    for _ in range(3):  # a slow machine could let the helper catch up once
        helper.share = 0.85
        out = base.copy()
        src = layout.source({"update": update}, key) if with_source else None
        assert helper.apply(out, add, sub, source=src)
        assert np.array_equal(out, ref)
        stolen = max(stolen, int(helper.last_timings["stolen_values"]))
    assert stolen > 0
    helper.share = 0.5
