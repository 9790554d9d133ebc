"""Crypto kernels of secure aggregation: Wharf vs Flower 1.41 vs the machine's limit (issue 4).

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.kernels                 # full suite, ~2 minutes
    .venv/bin/python -m benchmarks.kernels --quick         # smoke sizes, < 1 minute
    .venv/bin/python -m benchmarks.kernels --e2e           # + one secure vs plaintext round
    .venv/bin/python -m benchmarks.kernels --out DIR       # where results go

Sections (numbering follows issue 4):

1. ``limit`` — raw AES-128-CTR keystream through ``cryptography`` on one core,
   NumPy ``uint32`` add in and out of cache;
2. ``masking`` — quantise + self mask + k = 8 pairwise masks, 10^5..10^7 values;
3. ``server`` — sum N masked vectors, remove masks with 10 % dropped, N = 10, 100;
4. ``shamir`` — share / reconstruct one 32-byte secret, n = 10, 100 holders,
   and the secrets one round needs;
5. ``keys`` — key agreement per node per round;
6. ``wire`` — bytes per parameter of one node's masked upload;
7. ``e2e`` — one secure vs one plaintext round, 10 node processes (``--e2e``).

Every timed figure is the median of ≥ 5 runs (3 with ``--quick``) after a
warm-up, Wharf and Flower alternating on the same inputs (see
:mod:`.harness`). Results go to ``latest.json``, ``latest.md`` and
``throughput.png`` (``quick.*`` / ``quick-throughput.png`` with ``--quick``, so
a smoke run never overwrites the committed full results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from . import flower_paths as fl
from . import wharf_paths as wh
from .harness import Case, Timing, load_average, machine_info, measure

MASK_STREAMS = 9
"""Self mask + k = 8 pairwise masks: the keystream streams one client generates."""

AES_CHUNK_SMALL = 64 * 1024
AES_CHUNK_LARGE = 1024 * 1024


@dataclass
class Config:
    """Sizes and repeats of one run (``full`` is what issue 4 asks for)."""

    mode: str
    repeats: int
    warmup: int
    mask_sizes: list[int]
    server_nodes: list[int]
    server_values: int
    shamir_holders: list[int]
    round_nodes: list[int]
    key_degrees: list[int]
    wire_values: int
    aes_bytes: int
    add_out_of_cache_bytes: int
    e2e: bool = False
    mask_repeats: int = 9
    """Timed runs per client-masking figure: more than elsewhere, because this section
    holds the 70 %-of-AES target and two-core timings move most with the machine's load."""
    prototypes: bool = True
    e2e_params: int = 1_000_000
    e2e_nodes: int = 10
    sections: list[str] = field(default_factory=list)

    @classmethod
    def full(cls) -> Config:
        return cls(
            mode="full",
            repeats=5,
            warmup=1,
            mask_sizes=[10**5, 10**6, 10**7],
            server_nodes=[10, 100],
            server_values=10**6,
            shamir_holders=[10, 100],
            round_nodes=[10, 100],
            key_degrees=[8, 15],
            wire_values=10**6,
            aes_bytes=256 << 20,
            add_out_of_cache_bytes=64 << 20,
        )

    @classmethod
    def quick(cls) -> Config:
        return cls(
            mode="quick",
            repeats=3,
            warmup=1,
            mask_sizes=[10**5, 10**6],
            server_nodes=[10],
            server_values=10**5,
            shamir_holders=[10, 100],
            round_nodes=[10],
            key_degrees=[8],
            wire_values=10**5,
            aes_bytes=64 << 20,
            add_out_of_cache_bytes=64 << 20,
            prototypes=False,
            mask_repeats=3,
        )


def call(fn: Callable[..., object], *args: Any, **kwargs: Any) -> Callable[[Any], object]:
    """A :class:`Case` body that ignores the prepared state and calls ``fn(*args, **kwargs)``.

    Arguments are bound now, so a case built in a loop keeps its own inputs.
    """

    def run(_state: Any) -> object:
        return fn(*args, **kwargs)

    return run


def _collecting(results: list[Any], phases: dict[str, list[float]]) -> Callable[[Any], object]:
    """The timed Wharf server case: aggregate the replayed round, keep the result to check."""

    def run(state: Any) -> object:
        results.append(wh.server_aggregate(state, phases))
        return None

    return run


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _fraction(material: int, ts: dict[str, Timing], aes_gbps: float, name: str) -> float:
    """Mask-material rate of contender ``name`` as a fraction of the raw AES rate."""
    return (material / ts[name].median / 1e9) / aes_gbps


def _timings(ts: dict[str, Timing]) -> dict[str, Any]:
    return {name: t.to_json() for name, t in ts.items()}


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- 1. the limit


def _aes_fill(total: int, chunk: int) -> Callable[[Any], None]:
    """Raw AES-128-CTR keystream: zeros through ``update_into`` into one preallocated buffer."""
    zeros = bytes(chunk)
    out = bytearray(chunk)

    def run(_: Any) -> None:
        enc = Cipher(algorithms.AES(os.urandom(16)), modes.CTR(bytes(16))).encryptor()
        for _i in range(total // chunk):
            enc.update_into(zeros, out)

    return run


def _aes_two_threads(total: int, chunk: int) -> Callable[[Any], None]:
    """Two threads, each with its own encryptor and buffer, half the bytes each.

    Shows whether ``update_into`` releases the GIL (then this approaches twice
    the one-thread rate); it is context, not the limit the targets use.
    """
    import threading

    work = [_aes_fill(total // 2, chunk), _aes_fill(total // 2, chunk)]

    def run(_: Any) -> None:
        threads = [threading.Thread(target=w, args=(None,)) for w in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return run


def _add_loop(num_words: int, total_words: int) -> Callable[[Any], None]:
    a = np.ones(num_words, dtype=np.uint32)
    b = np.full(num_words, 3, dtype=np.uint32)
    reps = max(1, total_words // num_words)

    def run(_: Any) -> None:
        for _i in range(reps):
            np.add(a, b, out=a)

    return run


def section_limit(cfg: Config) -> dict[str, Any]:
    """What one core can do at best: AES-CTR keystream and a uint32 add."""
    total = cfg.aes_bytes
    aes = measure(
        [
            Case("aes_64KiB", _aes_fill(total, AES_CHUNK_SMALL)),
            Case("aes_1MiB", _aes_fill(total, AES_CHUNK_LARGE)),
            Case("aes_1MiB_2threads", _aes_two_threads(total, AES_CHUNK_LARGE)),
        ],
        cfg.repeats,
        cfg.warmup,
    )
    in_words = (64 << 10) // 4
    out_words = cfg.add_out_of_cache_bytes // 4
    add_total = 1 << 26
    adds = measure(
        [
            Case("add_in_cache_64KiB", _add_loop(in_words, add_total)),
            Case("add_out_of_cache", _add_loop(out_words, max(add_total, out_words))),
        ],
        cfg.repeats,
        cfg.warmup,
    )
    in_elems = max(1, add_total // in_words) * in_words
    out_elems = max(1, max(add_total, out_words) // out_words) * out_words
    aes_rates = {k: total / t.median / 1e9 for k, t in aes.items() if "threads" not in k}
    return {
        "aes_bytes_per_run": total,
        "aes_gbps": aes_rates,
        "aes_limit_gbps": max(aes_rates.values()),
        "aes_two_threads_gbps": total / aes["aes_1MiB_2threads"].median / 1e9,
        "numpy_add": {
            "in_cache_64KiB": {
                "gelem_per_s": in_elems / adds["add_in_cache_64KiB"].median / 1e9,
                "gbps_12B_per_elem": 12 * in_elems / adds["add_in_cache_64KiB"].median / 1e9,
            },
            "out_of_cache": {
                "array_bytes": cfg.add_out_of_cache_bytes,
                "gelem_per_s": out_elems / adds["add_out_of_cache"].median / 1e9,
                "gbps_12B_per_elem": 12 * out_elems / adds["add_out_of_cache"].median / 1e9,
            },
        },
        "timings": _timings({**aes, **adds}),
    }


# ------------------------------------------------------------ 2. client masking


def section_masking(cfg: Config) -> dict[str, Any]:
    """Quantise + self mask + 8 pairwise masks: Wharf's production path and in-process
    variants, Flower, and raw AES producing the same bytes, all in one alternation.

    With ``cfg.prototypes`` the earlier two-process prototype of :mod:`.prototypes`
    (now adopted as ``wharf.algorithms.secagg.parallel``) runs in the same
    alternation for comparison (reported apart, never as Wharf).
    """
    if not cfg.prototypes:
        return _masking(cfg, None)
    from .prototypes import TwoProcessMasker

    with TwoProcessMasker() as masker:
        return _masking(cfg, masker)


def _masking(cfg: Config, masker: Any) -> dict[str, Any]:
    k = MASK_STREAMS - 1
    rows = []
    for n in cfg.mask_sizes:
        _log(f"masking n={n:.0e}")
        rng = np.random.default_rng(n)  # benchmark data, not secrets
        update = (rng.standard_normal(n) * 0.05).astype(np.float32)
        wsetup = wh.masking_setup(n, k)
        fsetup = fl.masking_setup(k)
        material = MASK_STREAMS * 4 * n
        aes_bytes = -(-material // AES_CHUNK_LARGE) * AES_CHUNK_LARGE
        scratch = np.zeros(wsetup.layout.length, dtype=np.uint32)
        correct = wh.masking_is_exact(wsetup, update)  # also warms the helper's buffers
        before = wh.helper_status()
        cases = [
            Case("wharf", call(wh.mask_update, wsetup, update)),
            Case("flower", call(fl.mask_update, fsetup, [update])),
            Case("aes_limit_same_bytes", _aes_fill(aes_bytes, AES_CHUNK_LARGE)),
            Case("wharf_1thread", call(wh.mask_update, wsetup, update, threads=1)),
            Case("wharf_2threads", call(wh.mask_update, wsetup, update, threads=2)),
            Case("wharf_mask_only", call(wh.unmask_only, scratch, wsetup)),
        ]
        proto: dict[str, Any] = {}
        if masker is not None:
            from .prototypes import is_bit_identical, prototype_mask

            proto["bit_identical"] = is_bit_identical(masker, update, wsetup)
            cases.append(Case("prototype_2proc", call(prototype_mask, masker, wsetup, update)))
        ts = measure(cases, max(cfg.repeats, cfg.mask_repeats), cfg.warmup)
        after = wh.helper_status()
        tw, tf, taes = ts["wharf"].median, ts["flower"].median, ts["aes_limit_same_bytes"].median
        aes_rate = aes_bytes / taes / 1e9

        frac = partial(_fraction, material, ts, aes_rate)
        if masker is not None:
            tp = ts["prototype_2proc"].median
            proto.update(
                seconds=tp,
                material_gbps=material / tp / 1e9,
                fraction_of_aes=frac("prototype_2proc"),
                speedup_vs_wharf=_ratio(tw, tp),
                speedup_vs_flower=_ratio(tf, tp),
            )
        rows.append(
            {
                "n": n,
                "k": k,
                "wharf_path": wh.path_used(n),
                "helper_calls": after["calls"] - before["calls"],
                "helper_share": after["helper_share"],
                "correct": correct,
                "wharf_s": tw,
                "wharf_1thread_s": ts["wharf_1thread"].median,
                "wharf_1thread_fraction_of_aes": frac("wharf_1thread"),
                "wharf_2threads_s": ts["wharf_2threads"].median,
                "wharf_2threads_fraction_of_aes": frac("wharf_2threads"),
                "wharf_mask_only_s": ts["wharf_mask_only"].median,
                "flower_s": tf,
                "speedup_vs_flower": _ratio(tf, tw),
                "mask_material_bytes": material,
                "wharf_material_gbps": material / tw / 1e9,
                "flower_material_gbps": material / tf / 1e9,
                "aes_limit_gbps": aes_rate,
                "fraction_of_aes": frac("wharf"),
                "mask_only_fraction_of_aes": frac("wharf_mask_only"),
                "prototype_2proc": proto if "seconds" in proto else None,
                "timings": _timings(ts),
            }
        )
    return {"k": k, "streams": MASK_STREAMS, "rows": rows}


# --------------------------------------------------------------- 3. server side


def section_server(cfg: Config) -> dict[str, Any]:
    """Sum N masked vectors and unmask with 10 % dropped after sharing keys."""
    rows = []
    recordings: dict[int, wh.RecordedRound] = {}
    for nodes in cfg.server_nodes:
        _log(f"server N={nodes} n={cfg.server_values:.0e}: recording a real round")
        rec = wh.record_round(nodes, cfg.server_values)
        recordings[nodes] = rec
        frnd = fl.server_round(cfg.server_values, rec.neighbours, rec.dropped, rec.params.threshold)
        wphases: dict[str, list[float]] = {}
        fphases: dict[str, list[float]] = {}
        results: list[Any] = []
        cases = [
            Case("wharf", _collecting(results, wphases), prepare=partial(wh.fresh_server, rec)),
            Case("flower", call(fl.server_aggregate, frnd, fphases)),
        ]
        ts = measure(cases, cfg.repeats, cfg.warmup)
        skip = cfg.warmup
        rows.append(
            {
                "nodes": nodes,
                "values": cfg.server_values,
                "degree": rec.params.degree,
                "threshold": rec.params.threshold,
                "dropped": len(rec.dropped),
                "survivors": len(rec.survivors),
                "correct": all(wh.server_is_exact(rec, r) for r in results),
                "wharf_s": ts["wharf"].median,
                "flower_s": ts["flower"].median,
                "speedup_vs_flower": _ratio(ts["flower"].median, ts["wharf"].median),
                "wharf_phases_s": {k: float(np.median(v[skip:])) for k, v in wphases.items()},
                "flower_phases_s": {k: float(np.median(v[skip:])) for k, v in fphases.items()},
                "timings": _timings(ts),
            }
        )
    return {"rows": rows, "_recordings": recordings}


# ------------------------------------------------------------------- 4. shamir


def section_shamir(cfg: Config) -> dict[str, Any]:
    """One 32-byte secret among n holders, t = ceil(2n/3); then the secrets of a round."""
    kernel = []
    for n in cfg.shamir_holders:
        _log(f"shamir n={n}")
        t = wh.shamir_threshold(n)
        secret = os.urandom(32)
        wshares = wh.shamir_split(secret, t, n)
        wsub = {x: wshares[x] for x in sorted(wshares)[:t]}
        fshares = fl.shamir_split(secret, t, n)
        ok = (
            wh.shamir_reconstruct(wsub, t) == secret
            and fl.shamir_reconstruct(fshares[:t]) == secret
        )
        split = measure(
            [
                Case("wharf", call(wh.shamir_split, secret, t, n)),
                Case("flower", call(fl.shamir_split, secret, t, n)),
            ],
            cfg.repeats,
            cfg.warmup,
        )
        rec = measure(
            [
                Case("wharf_cold", call(wh.shamir_reconstruct, wsub, t, cold=True)),
                Case("flower", call(fl.shamir_reconstruct, fshares[:t])),
                Case("wharf_cached", call(wh.shamir_reconstruct, wsub, t, cold=False)),
            ],
            cfg.repeats,
            cfg.warmup,
        )
        kernel.append(
            {
                "holders": n,
                "threshold": t,
                "correct": ok,
                "split_wharf_s": split["wharf"].median,
                "split_flower_s": split["flower"].median,
                "split_speedup": _ratio(split["flower"].median, split["wharf"].median),
                "reconstruct_wharf_cold_s": rec["wharf_cold"].median,
                "reconstruct_wharf_cached_s": rec["wharf_cached"].median,
                "reconstruct_flower_s": rec["flower"].median,
                "reconstruct_speedup_cold": _ratio(rec["flower"].median, rec["wharf_cold"].median),
                "reconstruct_speedup_cached": _ratio(
                    rec["flower"].median, rec["wharf_cached"].median
                ),
                "timings": {"split": _timings(split), "reconstruct": _timings(rec)},
            }
        )
    per_round = [_shamir_round(cfg, nodes) for nodes in cfg.round_nodes]
    return {"kernel": kernel, "round": per_round}


def _shamir_round(cfg: Config, nodes: int) -> dict[str, Any]:
    """A round's Shamir work with DESIGN.md's graph: each node shares two secrets among its
    k + 1 holders; the coordinator rebuilds every survivor's seed and every dropped key."""
    from wharf.algorithms.secagg import choose_params
    from wharf.algorithms.secagg import shamir as wshamir

    _log(f"shamir round N={nodes}")
    params = choose_params(nodes)
    holders, t = params.degree + 1, params.threshold
    dropped = max(1, round(0.1 * nodes))
    survivors = nodes - dropped
    # Same holder x-coordinates for every secret is the complete-graph case; for a
    # k-regular graph every neighbourhood differs, so Wharf's Lagrange cache is
    # cleared per secret there (the conservative choice).
    same_holders = params.complete_graph
    secret = os.urandom(32)
    wshares = wh.shamir_split(secret, t, holders)
    wsub = {x: wshares[x] for x in sorted(wshares)[:t]}
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes

    pem = private_key_to_bytes(generate_key_pairs()[0])
    fseed = fl.shamir_split(secret, t, holders)[:t]
    fkey = fl.shamir_split(pem, t, holders)[:t]

    def wharf_node(_: Any) -> None:
        wh.shamir_split(os.urandom(32), t, holders)
        wh.shamir_split(os.urandom(32), t, holders)

    def flower_node(_: Any) -> None:
        fl.shamir_split(os.urandom(32), t, holders)
        fl.shamir_split(pem, t, holders)

    def wharf_server(_: Any) -> None:
        wshamir.lagrange_at_zero.cache_clear()
        for _i in range(nodes):
            if not same_holders:
                wshamir.lagrange_at_zero.cache_clear()
            wshamir.reconstruct(wsub, t)

    def flower_server(_: Any) -> None:
        for _i in range(survivors):
            fl.shamir_reconstruct(fseed)
        for _i in range(dropped):
            fl.shamir_reconstruct(fkey)

    node_t = measure(
        [Case("wharf", wharf_node), Case("flower", flower_node)], cfg.repeats, cfg.warmup
    )
    srv_t = measure(
        [Case("wharf", wharf_server), Case("flower", flower_server)], cfg.repeats, cfg.warmup
    )
    return {
        "nodes": nodes,
        "holders": holders,
        "threshold": t,
        "survivors": survivors,
        "dropped": dropped,
        "flower_key_secret_bytes": len(pem),
        "node_split_wharf_s": node_t["wharf"].median,
        "node_split_flower_s": node_t["flower"].median,
        "node_split_speedup": _ratio(node_t["flower"].median, node_t["wharf"].median),
        "server_reconstruct_wharf_s": srv_t["wharf"].median,
        "server_reconstruct_flower_s": srv_t["flower"].median,
        "server_reconstruct_speedup": _ratio(srv_t["flower"].median, srv_t["wharf"].median),
        "timings": {"node": _timings(node_t), "server": _timings(srv_t)},
    }


# ------------------------------------------------------------- 5. key agreement


def section_keys(cfg: Config) -> dict[str, Any]:
    """Per node per round: key generation, 2k agreements with HKDF (share key + mask seed)."""
    rows = []
    for k in cfg.key_degrees:
        _log(f"key agreement k={k}")
        wpeers, fpeers = wh.peer_keys(k), fl.peer_keys(k)
        ts = measure(
            [
                Case("wharf", call(wh.key_agreement_round, wpeers)),
                Case("flower", call(fl.key_agreement_round, fpeers)),
            ],
            max(cfg.repeats, 5),
            cfg.warmup,
        )
        rows.append(
            {
                "k": k,
                "wharf_s": ts["wharf"].median,
                "flower_s": ts["flower"].median,
                "speedup_vs_flower": _ratio(ts["flower"].median, ts["wharf"].median),
                "wharf": "2 X25519 key pairs; per neighbour X25519+HKDF (AES-GCM key) and "
                "X25519+HKDF+HKDF (AES-CTR mask key); 1 HKDF self-mask key",
                "flower": "2 SECP384R1 key pairs to PEM; per neighbour 2 x (PEM parse + ECDH + "
                "HKDF + base64), as secaggplus_mod does",
                "timings": _timings(ts),
            }
        )
    return {"rows": rows}


# ------------------------------------------------------------------ 6. the wire


def section_wire(cfg: Config, recordings: dict[int, wh.RecordedRound]) -> dict[str, Any]:
    """Bytes per model parameter of one node's masked upload."""
    n = cfg.wire_values
    rec = next((r for r in recordings.values() if r.layout.segments[0].length == n), None)
    if rec is None:
        rec = wh.record_round(3, n, drop_fraction=0.0)
    wharf_bytes = rec.masked_input_bytes()
    params = rec.layout.segments[0].length
    fsetup = fl.masking_setup(8)
    update = (np.random.default_rng(1).standard_normal(params) * 0.05).astype(np.float32)
    flower_bytes = fl.upload_bytes(fl.mask_update(fsetup, [update]))
    return {
        "params": params,
        "wharf_message_bytes": wharf_bytes,
        "wharf_vector_values": rec.layout.length,
        "wharf_bytes_per_param": wharf_bytes / params,
        "flower_record_bytes": flower_bytes,
        "flower_bytes_per_param": flower_bytes / params,
        "ratio_flower_over_wharf": _ratio(flower_bytes, wharf_bytes),
        "wharf_what": "serialized SecAggMaskedInput (header, uint32 vector inline incl. "
        "num_examples + 3 metric sums, SHA-256, ECDSA signature)",
        "flower_what": "serialized ConfigRecord{masked_params: [ndarray_to_bytes(int64)...]} "
        "as secaggplus_mod returns it",
    }


# --------------------------------------------------------------------- targets


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's bar, each with the measured value and PASS / FAIL (or NOT RUN)."""
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        measured: float | None,
        bar: float,
        higher_is_better: bool,
        unit: str,
        note: str = "",
    ) -> None:
        if measured is None or (isinstance(measured, float) and math.isnan(measured)):
            status = "NOT RUN"
        elif higher_is_better:
            status = "PASS" if measured >= bar else "FAIL"
        else:
            status = "PASS" if measured <= bar else "FAIL"
        out.append(
            {
                "target": name,
                "measured": measured,
                "bar": bar,
                "direction": ">=" if higher_is_better else "<=",
                "unit": unit,
                "status": status,
                "note": note,
            }
        )

    rows = {r["n"]: r for r in results.get("masking", {}).get("rows", [])}
    for n in (10**6, 10**7):
        r = rows.get(n)
        add(
            f"client masking speed-up vs Flower at n={n:.0e}",
            r["speedup_vs_flower"] if r else None,
            5.0,
            True,
            "x",
        )
    big = [r for n, r in rows.items() if n >= 10**6]
    worst = min(big, key=lambda r: r["fraction_of_aes"]) if big else None
    add(
        "mask material rate / raw AES-128-CTR rate (worst of n >= 1e6)",
        worst["fraction_of_aes"] if worst else None,
        0.70,
        True,
        "fraction",
        f"n={worst['n']:.0e}" if worst else "",
    )
    sh = {r["holders"]: r for r in results.get("shamir", {}).get("kernel", [])}
    r100 = sh.get(100)
    add(
        "Shamir reconstruction speed-up vs Flower, n=100 (cold cache)",
        r100["reconstruct_speedup_cold"] if r100 else None,
        50.0,
        True,
        "x",
        f"t={r100['threshold']}" if r100 else "",
    )
    wire = results.get("wire")
    add(
        "bytes per parameter on the wire (secure aggregation)",
        wire["wharf_bytes_per_param"] if wire else None,
        4.1,
        False,
        "B/param",
    )
    e2e = results.get("e2e") or {}
    add(
        "secure round / plaintext round, protocol time only",
        e2e.get("protocol_ratio"),
        1.5,
        False,
        "x",
        e2e.get("status", "run with --e2e"),
    )
    return out


# ------------------------------------------------------------------------ main


SECTIONS = ("limit", "masking", "server", "shamir", "keys", "wire", "e2e")


def run(cfg: Config, out_dir: Path | None, write: bool = True) -> dict[str, Any]:
    """Run the selected sections and (if ``write``) write JSON, markdown and the plot."""
    wanted = cfg.sections or [s for s in SECTIONS if s != "e2e" or cfg.e2e]
    results: dict[str, Any] = {
        "mode": cfg.mode,
        "machine": machine_info(),
        "config": {k: v for k, v in asdict(cfg).items()},
    }
    started = time.perf_counter()
    recordings: dict[int, wh.RecordedRound] = {}
    if {"masking", "server", "wire"} & set(wanted):
        # Started once, before any timing, as a node or coordinator keeps it for its life.
        results["wharf_helper"] = wh.start_helper()
        _log(f"masking helper process: {results['wharf_helper']}")
    if "limit" in wanted:
        _log("limit: raw AES-128-CTR and NumPy add")
        results["limit"] = section_limit(cfg)
    if "masking" in wanted:
        results["masking"] = section_masking(cfg)
    if "server" in wanted:
        srv = section_server(cfg)
        recordings = srv.pop("_recordings")
        results["server"] = srv
    if "shamir" in wanted:
        results["shamir"] = section_shamir(cfg)
    if "keys" in wanted:
        results["keys"] = section_keys(cfg)
    if "wire" in wanted:
        _log("wire bytes")
        results["wire"] = section_wire(cfg, recordings)
    recordings.clear()
    if "wharf_helper" in results:
        results["wharf_helper"].update(wh.helper_status())
        wh.stop_helper()  # clean shutdown; the e2e federation runs its own processes
    if "e2e" in wanted:
        from .e2e import section_e2e

        results["e2e"] = section_e2e(cfg.e2e_nodes, cfg.e2e_params)
    results["targets"] = targets(results)
    results["machine"]["load_average_end"] = load_average()
    results["elapsed_s"] = time.perf_counter() - started
    if write and out_dir is not None:
        from .report import write_outputs

        write_outputs(results, out_dir, prefix="quick" if cfg.mode == "quick" else "latest")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.kernels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke sizes, < 1 minute")
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="also run one secure vs one plaintext round (10 node processes)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results"),
        help="output directory (default benchmarks/results)",
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of sections: {','.join(SECTIONS)}"
    )
    parser.add_argument("--repeats", type=int, default=0, help="override timed runs per figure")
    parser.add_argument(
        "--no-prototypes",
        action="store_true",
        help="skip the proposed two-process masking prototype",
    )
    args = parser.parse_args(argv)
    cfg = Config.quick() if args.quick else Config.full()
    cfg.e2e = args.e2e
    if args.only:
        cfg.sections = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = set(cfg.sections) - set(SECTIONS)
        if unknown:
            parser.error(f"unknown sections: {sorted(unknown)}")
    if args.repeats:
        cfg.repeats = cfg.mask_repeats = args.repeats
    if args.no_prototypes:
        cfg.prototypes = False
    results = run(cfg, args.out)
    for t in results["targets"]:
        measured = t["measured"]
        shown = "—" if measured is None else f"{measured:.3g}"
        print(
            f"{t['status']:8} {t['target']}: {shown} {t['unit']} (bar {t['direction']} {t['bar']})"
        )
    print(json.dumps({"elapsed_s": round(results["elapsed_s"], 1), "out": str(args.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
