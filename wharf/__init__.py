"""Wharf: privacy-preserving federated computation for data markets.

The top-level package holds what every party shares: the job spec, identity and
signatures, the tensor codec, chunked transfer, and the `wharf` CLI root.
"""

from __future__ import annotations

__version__ = "0.1.0"
