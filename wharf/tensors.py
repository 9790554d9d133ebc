"""Tensor codec: numpy arrays <-> ``wharf.v1.Tensor`` (raw little-endian bytes).

Used for small vectors inside messages; whole models travel as safetensors
blobs. Decoding validates dtype, shape and byte length, and can refuse
non-finite values, so malformed input never reaches the math.
"""

from __future__ import annotations

import numpy as np

from wharf.proto import wharf_pb2 as pb

ALLOWED_DTYPES = {"float32", "float64", "uint32", "int64", "int32", "uint8"}


class TensorError(ValueError):
    """A tensor on the wire is malformed."""


def encode(name: str, array: np.ndarray) -> pb.Tensor:
    """Encode an array as little-endian raw bytes with dtype and shape."""
    dtype = np.dtype(array.dtype)
    if dtype.name not in ALLOWED_DTYPES:
        raise TensorError(f"dtype {dtype.name} is not supported on the wire")
    data = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    return pb.Tensor(name=name, dtype=dtype.name, shape=list(array.shape), data=data)


def decode(tensor: pb.Tensor, *, finite: bool = True) -> np.ndarray:
    """Decode and validate a wire tensor."""
    if tensor.dtype not in ALLOWED_DTYPES:
        raise TensorError(f"tensor {tensor.name!r}: unsupported dtype {tensor.dtype!r}")
    if any(d < 0 for d in tensor.shape):
        raise TensorError(f"tensor {tensor.name!r}: negative dimension in {list(tensor.shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    count = int(np.prod(tensor.shape, dtype=np.int64)) if tensor.shape else 1
    if count * dtype.itemsize != len(tensor.data):
        raise TensorError(
            f"tensor {tensor.name!r}: {len(tensor.data)} bytes do not match "
            f"shape {list(tensor.shape)} of {tensor.dtype}"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
    array = array.astype(dtype.newbyteorder("="), copy=True)
    if finite and array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise TensorError(f"tensor {tensor.name!r} contains NaN or Inf")
    return array
