"""The fused masking kernel, the AES-CTR PRG, key derivation and share encryption."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from wharf.algorithms.secagg import AbortReason, SecAggAborted
from wharf.algorithms.secagg.keys import (
    Party,
    RoundKeys,
    decrypt_share,
    encrypt_share,
    pairwise_mask_key,
    self_mask_key,
    share_encryption_key,
)
from wharf.algorithms.secagg.mask import apply_masks, sum_into
from wharf.algorithms.secagg.prg import KeyStream, derive_prg_key, keystream_words


def test_keystream_is_aes_128_ctr_from_counter_zero() -> None:
    key = os.urandom(16)
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(enc.update(bytes(4 * 1000)), dtype="<u4")
    assert np.array_equal(keystream_words(key, 1000), ref)
    # random access: offset w starts at counter block w // 4
    assert np.array_equal(keystream_words(key, 100, start_word=400), ref[400:500])
    with pytest.raises(ValueError):
        KeyStream(key, 8)


def test_prg_keys_are_domain_separated() -> None:
    secret = os.urandom(32)
    assert derive_prg_key(secret, b"a") != derive_prg_key(secret, b"b")
    assert len(derive_prg_key(secret, b"a")) == 16
    with pytest.raises(ValueError):
        derive_prg_key(b"short", b"a")


@pytest.mark.parametrize("n", [1, 3, 4, 5, 16383, 16384, 16385, 50_001])
def test_kernel_matches_reference(n: int) -> None:
    keys = [os.urandom(16) for _ in range(5)]
    base = np.frombuffer(os.urandom(4 * n), dtype=np.uint32).copy()
    ref = base.copy()
    for k in keys[:3]:
        ref += keystream_words(k, n)
    for k in keys[3:]:
        ref -= keystream_words(k, n)
    for threads in (1, 2):
        out = base.copy()
        apply_masks(out, keys[:3], keys[3:], threads=threads, chunk_words=4096)
        assert np.array_equal(out, ref)
    # masks cancel: subtracting what was added restores the input
    apply_masks(out, keys[3:], keys[:3])
    assert np.array_equal(out, base)


def test_kernel_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.int64), [os.urandom(16)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(8, dtype=np.uint32)[::2], [os.urandom(16)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.uint32), [os.urandom(32)])
    with pytest.raises(ValueError):
        apply_masks(np.zeros(4, dtype=np.uint32), [os.urandom(16)], chunk_words=6)
    total = np.zeros(3, dtype=np.uint32)
    sum_into(total, np.array([1, 2, 2**32 - 1], dtype=np.uint32))
    sum_into(total, np.array([1, 2, 2], dtype=np.uint32))
    assert total.tolist() == [2, 4, 1]


def _parties() -> tuple[Party, Party]:
    return Party(3, "hospital-a"), Party(7, "bank-b")


def test_pairwise_keys_agree_and_are_separated_by_purpose_job_round() -> None:
    a, b = RoundKeys.generate(), RoundKeys.generate()
    pa, pb_ = _parties()
    kw = {"job_id": "job", "round_number": 4}
    ab = pairwise_mask_key(a.mask_key, b.mask_public, me=pa, peer=pb_, **kw)
    ba = pairwise_mask_key(b.mask_key, a.mask_public, me=pb_, peer=pa, **kw)
    assert ab == ba and len(ab) == 16
    enc_ab = share_encryption_key(a.encryption_key, b.encryption_public, me=pa, peer=pb_, **kw)
    enc_ba = share_encryption_key(b.encryption_key, a.encryption_public, me=pb_, peer=pa, **kw)
    assert enc_ab == enc_ba and len(enc_ab) == 32
    # the same key pair used for the other purpose gives an unrelated key
    cross = share_encryption_key(a.mask_key, b.mask_public, me=pa, peer=pb_, **kw)
    assert cross[:16] != ab
    assert pairwise_mask_key(a.mask_key, b.mask_public, me=pa, peer=pb_, job_id="job",
                             round_number=5) != ab  # fmt: skip
    assert pairwise_mask_key(a.mask_key, b.mask_public, me=pa, peer=pb_, job_id="job2",
                             round_number=4) != ab  # fmt: skip
    other = Party(7, "bank-c")
    assert pairwise_mask_key(a.mask_key, b.mask_public, me=pa, peer=other, **kw) != ab


def test_self_mask_key_is_bound_to_owner_and_round() -> None:
    seed = os.urandom(32)
    pa, pb_ = _parties()
    k = self_mask_key(seed, job_id="j", round_number=1, owner=pa)
    assert k != self_mask_key(seed, job_id="j", round_number=2, owner=pa)
    assert k != self_mask_key(seed, job_id="j", round_number=1, owner=pb_)


def test_small_order_public_key_is_refused() -> None:
    a = RoundKeys.generate()
    pa, pb_ = _parties()
    with pytest.raises(SecAggAborted) as err:
        pairwise_mask_key(a.mask_key, bytes(32), job_id="j", round_number=1, me=pa, peer=pb_)
    assert err.value.reason is AbortReason.BAD_MESSAGE


def test_share_encryption_binds_parties_job_round_and_context() -> None:
    key = os.urandom(32)
    ctx = os.urandom(32)
    kw = {"job_id": "j", "round_number": 2, "context_hash": ctx, "sender": 3, "receiver": 7}
    nonce, ct = encrypt_share(key, b"share bytes", **kw)
    assert decrypt_share(key, nonce, ct, **kw) == b"share bytes"
    for change in (
        {"sender": 7, "receiver": 3},
        {"round_number": 3},
        {"job_id": "k"},
        {"context_hash": os.urandom(32)},
    ):
        with pytest.raises(SecAggAborted):
            decrypt_share(key, nonce, ct, **{**kw, **change})
    with pytest.raises(SecAggAborted):
        decrypt_share(key, nonce, ct[:-1] + bytes([ct[-1] ^ 1]), **kw)


def test_no_numpy_random_generator_in_secret_code() -> None:
    import pathlib

    import wharf.algorithms.secagg as pkg

    root = pathlib.Path(pkg.__file__).parent
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "np.random" not in text and "numpy.random" not in text, path
        assert "pickle" not in text, path
        assert "import random" not in text, path


def test_scratch_buffers_shared_by_cursors_of_one_thread_are_safe() -> None:
    """Cursors of one thread share scratch buffers; interleaving them changes nothing."""
    from wharf.algorithms.secagg import Segment, VectorLayout

    n = 70_000
    layout = VectorLayout([Segment.real("u", n, 1.0, 20)], 10)
    rng = np.random.default_rng(1)
    a, b = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    ka, kb = os.urandom(16), os.urandom(16)
    cur_a = layout.source({"u": a}, ka).cursor(0)
    cur_b = layout.source({"u": b}, kb).cursor(0)
    out_a, out_b = np.empty(n, dtype=np.uint32), np.empty(n, dtype=np.uint32)
    for start in range(0, n, 8192):
        cur_a.fill(out_a[start : start + 8192])
        cur_b.fill(out_b[start : start + 8192])
    assert np.array_equal(out_a, layout.encode({"u": a}, ka))
    assert np.array_equal(out_b, layout.encode({"u": b}, kb))
    # and the kernel with different chunk sizes in turn (separate scratch per size)
    keys = [os.urandom(16) for _ in range(3)]
    ref = np.zeros(n, dtype=np.uint32)
    apply_masks(ref, keys, threads=1)
    for chunk in (4096, 32768, 4096, 131072):
        out = np.zeros(n, dtype=np.uint32)
        apply_masks(out, keys, threads=1, chunk_words=chunk)
        assert np.array_equal(out, ref)
