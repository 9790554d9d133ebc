"""Model zoo for federated jobs, and the weight formats models travel in.

A job names a model by ``kind`` plus a few options instead of shipping code, so
every node builds the same architecture from a small, auditable list. Every model
starts with a :class:`Standardize` layer whose buffers the coordinator fills from
federated feature moments: nodes never agree on a scaler out of band, and the
delivered model works on raw features.

Weights leave a model as a name-sorted ``dict[str, numpy.ndarray]`` of float32
(the tensor codec and secure aggregation work on plain arrays), are stored with
safetensors (no pickle), and can be flattened to one vector for masking.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import safetensors.numpy
import torch
from safetensors import SafetensorError
from torch import nn

__all__ = [
    "MODEL_KINDS",
    "STANDARDIZE_KEYS",
    "Layout",
    "Standardize",
    "arrays_to_model",
    "build_model",
    "flatten",
    "init_model",
    "model_to_arrays",
    "set_standardization",
    "unflatten",
    "weights_from_bytes",
    "weights_to_bytes",
]

MODEL_KINDS: tuple[str, ...] = ("logreg", "mlp", "cnn")

#: State-dict names of the standardisation buffers in every model built here.
STANDARDIZE_KEYS: tuple[str, str] = ("standardize.mean", "standardize.std")

#: ``[(name, shape), ...]`` in sorted-name order: how a flat vector maps back to tensors.
Layout = list[tuple[str, tuple[int, ...]]]

_MIN_STD = 1e-8
_DEFAULT_HIDDEN = (64, 32)
_DEFAULT_CHANNELS = (16, 32)
_OPTIONS: Mapping[str, frozenset[str]] = {
    "logreg": frozenset(),
    "mlp": frozenset({"hidden"}),
    "cnn": frozenset({"channels"}),
}

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class Standardize(nn.Module):
    """``(x - mean) / std`` with non-trainable buffers (saved in the state dict).

    Buffers rather than parameters: the optimiser must not touch them, yet they are
    part of the delivered weights so a buyer's model works on raw features.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.register_buffer("mean", torch.zeros(self.shape))
        self.register_buffer("std", torch.ones(self.shape))

    def reset(self) -> None:
        """Back to the identity transform (mean 0, std 1)."""
        with torch.no_grad():
            self.mean.zero_()
            self.std.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class _Reshape(nn.Module):
    """Per-sample reshape (batch dim kept): flat or (H, W) inputs become (C, H, W)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(s, int | np.integer) and s > 0 for s in shape):
        raise ValueError(f"input_shape must be a non-empty list of positive ints, got {shape!r}")
    return tuple(int(s) for s in shape)


def _int_list(kind: str, key: str, value: Any, length: int | None = None) -> tuple[int, ...]:
    ok = isinstance(value, list | tuple) and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and v > 0 for v in value
    )
    if not ok or (length is not None and len(value) != length):
        need = f"{length} positive ints" if length is not None else "a list of positive ints"
        raise ValueError(f"{kind} option {key!r} must be {need}, got {value!r}")
    return tuple(int(v) for v in value)


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) for the CNN; a flat perfect square (e.g. 64) becomes (1, 8, 8)."""
    if len(shape) == 3:
        c, h, w = shape
    elif len(shape) == 2:
        c, (h, w) = 1, shape
    elif len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        c, h, w = 1, math.isqrt(shape[0]), math.isqrt(shape[0])
    else:
        raise ValueError(
            f"cnn needs input_shape (C, H, W), (H, W) or a flat perfect square, got {shape}"
        )
    if h < 2 or w < 2:
        raise ValueError(f"cnn needs images of at least 2x2 pixels, got {h}x{w}")
    return c, h, w


def _layers(
    kind: str, shape: tuple[int, ...], num_classes: int, options: Mapping[str, Any]
) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [("standardize", Standardize(shape))]
    flat = math.prod(shape)
    if kind == "logreg":
        layers += [("flatten", nn.Flatten()), ("head", nn.Linear(flat, num_classes))]
    elif kind == "mlp":
        hidden = _int_list(kind, "hidden", options.get("hidden", list(_DEFAULT_HIDDEN)))
        layers.append(("flatten", nn.Flatten()))
        width = flat
        for i, h in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
            width = h
        layers.append(("head", nn.Linear(width, num_classes)))
    else:  # cnn
        c1, c2 = _int_list(kind, "channels", options.get("channels", _DEFAULT_CHANNELS), 2)
        c, h, w = _image_shape(shape)
        if (c, h, w) != shape:
            layers.append(("reshape", _Reshape((c, h, w))))
        pooled = (min(4, h // 2), min(4, w // 2))
        layers += [
            ("conv1", nn.Conv2d(c, c1, kernel_size=3, padding=1)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(c1, c2, kernel_size=3, padding=1)),
            ("relu2", nn.ReLU()),
            # Adaptive pooling fixes the head size, so 8x8 and 28x28 share one design.
            ("pool2", nn.AdaptiveAvgPool2d(pooled)),
            ("flatten", nn.Flatten()),
            ("head", nn.Linear(c2 * pooled[0] * pooled[1], num_classes)),
        ]
    return layers


def build_model(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a ``kind`` model (``logreg``, ``mlp`` or ``cnn``) for ``input_shape`` inputs.

    Parameters are initialised by PyTorch's default rules from the *global* torch
    RNG, so ``torch.manual_seed(s); build_model(...)`` is reproducible. Prefer
    :func:`init_model`, which leaves the global RNG alone.

    Options: ``mlp`` takes ``hidden`` (list of widths, default ``[64, 32]``);
    ``cnn`` takes ``channels`` (two conv widths, default ``[16, 32]``); unknown
    options are rejected so a typo in a job spec fails instead of being ignored.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")
    shape = _check_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    opts = dict(options or {})
    unknown = sorted(set(opts) - _OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise ValueError(f"unknown {kind} option(s) {unknown}; allowed: {allowed}")
    return nn.Sequential(OrderedDict(_layers(kind, shape, num_classes, opts)))


def init_model(
    kind: str,
    input_shape: Sequence[int],
    num_classes: int,
    options: Mapping[str, Any] | None,
    seed: int,
) -> nn.Module:
    """Build a model initialised from ``seed`` without touching the global torch RNG.

    The modules are created on the ``meta`` device (no default init, no RNG draws),
    then every Linear/Conv2d is initialised with PyTorch's default distributions
    drawn from a private ``torch.Generator``, in module order. The result equals
    ``torch.manual_seed(seed); build_model(...)`` and is safe to call from threads
    that train other models concurrently.
    """
    with torch.device("meta"):
        model = build_model(kind, input_shape, num_classes, options)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                # Same rule as nn.Linear/nn.Conv2d.reset_parameters.
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = nn.init._calculate_fan_in_and_fan_out(module.weight)[0]
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)
            elif isinstance(module, Standardize):
                module.reset()
    return model


def _standardizer(model: nn.Module) -> Standardize:
    for module in model.modules():
        if isinstance(module, Standardize):
            return module
    raise ValueError("model has no Standardize layer; build it with build_model/init_model")


def set_standardization(model: nn.Module, mean: np.ndarray, std: np.ndarray) -> None:
    """Fill the model's Standardize buffers; std below 1e-8 becomes 1.

    Constant features (e.g. always-blank pixels) have std 0; dividing by 1 keeps
    them at ``x - mean`` = 0 instead of producing inf/NaN.
    """
    layer = _standardizer(model)
    values = {}
    for name, arr in (("mean", mean), ("std", std)):
        a = np.asarray(arr, dtype=np.float64)
        if a.shape != layer.shape:
            raise ValueError(f"standardization {name} has shape {a.shape}, expected {layer.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"standardization {name} contains NaN or infinite values")
        values[name] = a
    safe_std = np.where(values["std"] < _MIN_STD, 1.0, values["std"])
    with torch.no_grad():
        layer.mean.copy_(torch.from_numpy(values["mean"].astype(np.float32)))
        layer.std.copy_(torch.from_numpy(safe_std.astype(np.float32)))


def model_to_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The full state dict (parameters and buffers) as fresh float32 arrays, sorted by name.

    Arrays are copies: training the model afterwards does not change them.
    """
    state = model.state_dict()
    return {
        name: np.ascontiguousarray(state[name].detach().cpu().numpy(), dtype=np.float32).copy()
        for name in sorted(state)
    }


def arrays_to_model(model: ModuleT, arrays: Mapping[str, np.ndarray]) -> ModuleT:
    """Load ``arrays`` into ``model`` in place (and return it), strictly.

    Every state-dict entry must be present with the same shape, dtype float32 and
    only finite values; anything else raises ValueError naming the tensor, so a
    corrupt or mismatched update is refused before it touches the model.
    """
    state = model.state_dict()
    missing = sorted(set(state) - set(arrays))
    extra = sorted(set(arrays) - set(state))
    if missing or extra:
        raise ValueError(f"weights do not match the model: missing {missing}, unexpected {extra}")
    tensors: dict[str, torch.Tensor] = {}
    for name, target in state.items():
        arr = arrays[name]
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise ValueError(f"tensor {name!r} must be a float32 array, got {got}")
        if arr.shape != tuple(target.shape):
            raise ValueError(
                f"tensor {name!r} has shape {arr.shape}, model expects {tuple(target.shape)}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"tensor {name!r} contains NaN or infinite values")
        tensors[name] = torch.from_numpy(np.array(arr, copy=True)).to(target.dtype)
    model.load_state_dict(tensors, strict=True)
    return model


def weights_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Serialise named arrays as safetensors bytes (no pickle, loadable anywhere)."""
    return safetensors.numpy.save(
        {name: np.ascontiguousarray(arrays[name]) for name in sorted(arrays)}
    )


def weights_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Parse safetensors bytes into writable arrays sorted by name; bad bytes -> ValueError."""
    try:
        loaded = safetensors.numpy.load(data)
    except (SafetensorError, ValueError) as exc:
        raise ValueError(f"weights are not a valid safetensors blob: {exc}") from exc
    return {name: np.array(loaded[name], copy=True) for name in sorted(loaded)}


def flatten(arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Layout]:
    """Concatenate arrays (sorted by name) into one float32 vector plus its layout.

    Secure aggregation masks a single flat vector; the layout lets the receiver cut
    the sum back into named tensors.
    """
    names = sorted(arrays)
    layout: Layout = [(name, tuple(int(d) for d in np.shape(arrays[name]))) for name in names]
    if not names:
        return np.zeros(0, dtype=np.float32), layout
    vec = np.concatenate([np.asarray(arrays[n], dtype=np.float32).ravel() for n in names])
    return vec, layout


def unflatten(
    vec: np.ndarray, layout: Sequence[tuple[str, Sequence[int]]]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`: cut ``vec`` into named float32 arrays (copies)."""
    flat = np.asarray(vec)
    if flat.ndim != 1:
        raise ValueError(f"flat weight vector must be 1-D, got shape {flat.shape}")
    sizes = [math.prod(shape) for _, shape in layout]
    if sum(sizes) != flat.size:
        raise ValueError(f"flat weight vector has {flat.size} values, layout needs {sum(sizes)}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for (name, shape), size in zip(layout, sizes, strict=True):
        if name in out:
            raise ValueError(f"layout names tensor {name!r} twice")
        chunk = flat[offset : offset + size]
        out[name] = chunk.astype(np.float32, copy=True).reshape(tuple(shape))
        offset += size
    return dict(sorted(out.items()))
