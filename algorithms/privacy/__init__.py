"""Differential privacy: accountants (:mod:`.accounting`) and distributed noise (:mod:`.skellam`).

Pure math, like the rest of :mod:`wharf.algorithms`: nothing here imports
``wharf.coordinator`` or ``wharf.node``, and every secret random bit comes from
``os.urandom``-keyed AES-CTR keystreams, never from NumPy's generators.
"""
