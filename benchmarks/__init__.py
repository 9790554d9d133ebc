"""Wharf's benchmark suites (not part of the installed package).

Run from the repository root::

    .venv/bin/python -m benchmarks.kernels            # full suite (issue 4)
    .venv/bin/python -m benchmarks.kernels --quick    # smoke-sized, < 1 minute
    .venv/bin/python -m benchmarks.kernels --e2e      # also the 10-process loopback round

Why a package beside ``wharf`` rather than inside it: benchmarks import the
peer (Flower) and matplotlib, which the product must never depend on, and
their results are data about one machine, not code that ships.

Modules:

* :mod:`.harness` — alternating A/B timing, medians, machine description;
* :mod:`.wharf_paths` — Wharf measured through its public ``wharf.algorithms.secagg`` API;
* :mod:`.flower_paths` — Flower 1.41 measured through ``flwr.common.secure_aggregation``;
* :mod:`.kernels` — the suite and its command line;
* :mod:`.e2e` — one secure vs one plaintext round over real gRPC + TLS;
* :mod:`.report` — JSON, markdown table, targets and the throughput plot;
* :mod:`.prototypes` — measured prototypes of kernel changes proposed to the secagg owner.
"""
