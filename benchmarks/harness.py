"""Timing harness: alternating A/B runs, medians, and the machine they ran on.

Why alternate: this is a shared 2-core machine (other processes, turbo, page
cache). Running all of Wharf and then all of Flower lets a burst of noise land
on one side only. Interleaving ``A B A B …`` on the *same* inputs spreads any
noise over both, so the *ratio* of medians stays meaningful even when the
absolute numbers wobble. The median (not the mean) ignores the odd sample
hit by a context switch; the spread (min/max) is kept so a reader can see how
noisy a figure was.

Why ``prepare``: some work must not be timed but must be redone before every
sample (a fresh coordinator state machine, a cold Lagrange cache). ``prepare``
runs untimed and hands its result to ``run``.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class Timing:
    """Wall-clock samples (seconds) of one contender in one measurement."""

    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def best(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def worst(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.best,
            "max_s": self.worst,
            "runs": len(self.samples),
            "samples_s": [round(s, 9) for s in self.samples],
        }


@dataclass
class Case:
    """One contender: ``run(prepare())`` is timed, ``prepare()`` is not."""

    name: str
    run: Callable[[Any], object]
    prepare: Callable[[], Any] = field(default=lambda: None)


def measure(cases: Sequence[Case], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Time ``cases`` round-robin (A B A B …): ``warmup`` untimed rounds, then ``repeats``.

    The garbage collector is collected before and disabled during every timed
    call, so a collection triggered by one contender's garbage is never billed
    to the other.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    out = {c.name: Timing() for c in cases}
    for rnd in range(warmup + repeats):
        for case in cases:
            state = case.prepare()
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                case.run(state)
                dt = time.perf_counter() - t0
            finally:
                gc.enable()
            del state
            if rnd >= warmup:
                out[case.name].samples.append(dt)
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return sorted(have & {"aes", "vaes", "avx", "avx2", "avx512f", "sha_ni"})
    except OSError:
        pass
    return []


def _caches() -> dict[str, str]:
    """Per-core cache sizes as the kernel reports them (L1d, L2, L3)."""
    out: dict[str, str] = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in sorted(base.glob("index*")):
        try:
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        out[f"L{level}{'d' if kind == 'Data' else ''}"] = size
    return out


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:
        return "not installed"
    return str(getattr(mod, "__version__", "unknown"))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _git_commit(root: Path) -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip()


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare these numbers with theirs."""
    from cryptography.hazmat.backends.openssl.backend import backend

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "caches": _caches(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": _version("numpy"),
        "cryptography": _version("cryptography"),
        "openssl": backend.openssl_version_text(),
        "flwr": _version("flwr"),
        "pycryptodome": _version("Crypto"),
        "git_commit": _git_commit(Path(__file__).resolve().parent.parent),
        "date_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_start": load_average(),
    }
