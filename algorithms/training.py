"""Local training and evaluation a node runs on its own data, plus feature moments.

Everything here is deterministic for a given seed and torch thread count, so a
round can be replayed when an audit asks how an update was produced. The only
randomness is batch shuffling, drawn from a private ``torch.Generator``.

Threads: library code never calls ``torch.set_num_threads`` behind the caller's
back (it is process-wide). The node's sandboxed trainer process picks its budget
once, e.g. with :func:`torch_threads`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "EvalReport",
    "TrainReport",
    "TrainSettings",
    "evaluate",
    "feature_moments",
    "moments_to_standardization",
    "torch_threads",
    "train_local",
]

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class TrainSettings:
    """How a node trains for one round.

    ``proximal_mu`` > 0 turns on FedProx: the loss gains ``mu/2 * ||w - w_global||^2``
    where ``w_global`` are the weights the round started from, which keeps clients
    with skewed data from drifting far from the shared model.
    """

    optimizer: Literal["sgd", "adam"]
    lr: float
    epochs: int
    batch_size: int
    seed: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ValueError("momentum applies to sgd only; adam has its own betas")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (math.isfinite(self.proximal_mu) and self.proximal_mu >= 0):
            raise ValueError(f"proximal_mu must be >= 0, got {self.proximal_mu!r}")


@dataclass(frozen=True)
class TrainReport:
    """What local training did; ``mean_loss`` is the cross-entropy only (no prox term)."""

    num_examples: int
    epochs: int
    mean_loss: float
    steps: int


@dataclass(frozen=True)
class EvalReport:
    """Additive evaluation sums, so reports from many nodes (or a masked sum) combine."""

    num_examples: int
    loss_sum: float
    correct: int

    @property
    def accuracy(self) -> float:
        """Fraction correct; NaN when there were no examples."""
        return self.correct / self.num_examples if self.num_examples else math.nan

    @property
    def mean_loss(self) -> float:
        """Mean cross-entropy; NaN when there were no examples."""
        return self.loss_sum / self.num_examples if self.num_examples else math.nan

    def __add__(self, other: EvalReport) -> EvalReport:
        return EvalReport(
            self.num_examples + other.num_examples,
            self.loss_sum + other.loss_sum,
            self.correct + other.correct,
        )


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (process-wide; not thread-safe)."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _tensors(x: ArrayLike, y: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies: the caller's arrays may be read-only (memory-mapped, safetensors).
    xt = torch.from_numpy(np.array(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x
    yt = torch.from_numpy(np.array(y, dtype=np.int64)) if isinstance(y, np.ndarray) else y
    xt, yt = xt.to(torch.float32), yt.to(torch.int64)
    if yt.ndim != 1 or xt.ndim < 1 or xt.shape[0] != yt.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of examples (y 1-D); got {tuple(xt.shape)} "
            f"and {tuple(yt.shape)}"
        )
    if yt.numel() and int(yt.min()) < 0:
        raise ValueError("labels must be class ids >= 0")
    return xt, yt


def _check_labels(model: nn.Module, xt: torch.Tensor, yt: torch.Tensor) -> None:
    with torch.no_grad():
        num_classes = model(xt[:1]).shape[1]
    if int(yt.max()) >= num_classes:
        raise ValueError(
            f"label {int(yt.max())} is out of range for a model with {num_classes} classes"
        )


def train_local(
    model: nn.Module, x: ArrayLike, y: ArrayLike, settings: TrainSettings
) -> TrainReport:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; return what happened.

    Raises ValueError for empty or mismatched data and FloatingPointError if the
    loss becomes non-finite (usually a learning rate that is too high), so a
    diverged update is never sent.
    """
    xt, yt = _tensors(x, y)
    n = int(yt.shape[0])
    if n == 0:
        raise ValueError("cannot train on zero examples")
    _check_labels(model, xt, yt)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []

    generator = torch.Generator().manual_seed(settings.seed)
    loss_total, steps = 0.0, 0
    model.train()
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            optimizer.zero_grad(set_to_none=True)
            data_loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss = data_loss
            if anchor:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                loss = data_loss + 0.5 * settings.proximal_mu * prox
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"training diverged (non-finite loss) in epoch {epoch + 1}; lower the lr"
                )
            loss.backward()
            optimizer.step()
            loss_total += float(data_loss.detach()) * int(idx.numel())
            steps += 1
    model.eval()
    return TrainReport(
        num_examples=n,
        epochs=settings.epochs,
        mean_loss=loss_total / (n * settings.epochs),
        steps=steps,
    )


def evaluate(model: nn.Module, x: ArrayLike, y: ArrayLike, batch_size: int = 1024) -> EvalReport:
    """Summed cross-entropy and correct count over ``(x, y)`` (model left in eval mode)."""
    xt, yt = _tensors(x, y)
    n = int(yt.shape[0])
    if n == 0:
        return EvalReport(0, 0.0, 0)
    _check_labels(model, xt, yt)
    model.eval()
    loss_sum, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, n, batch_size):
            logits = model(xt[start : start + batch_size])
            target = yt[start : start + batch_size]
            loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    return EvalReport(num_examples=n, loss_sum=loss_sum, correct=correct)


def feature_moments(x: ArrayLike) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-feature sum and sum of squares (float64, shape ``x.shape[1:]``) and the count.

    Sums, not means, because they add across nodes (and under secure aggregation):
    the coordinator gets the global mean/std without any node's own statistics.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim < 1:
        raise ValueError("x must have a leading example dimension")
    return arr.sum(axis=0), np.square(arr).sum(axis=0), int(arr.shape[0])


def moments_to_standardization(
    total: np.ndarray, total_sq: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std from summed moments; tiny negative variances clip to 0.

    The std may be 0 for constant features; :func:`~wharf.algorithms.models.set_standardization`
    replaces it with 1.
    """
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    s = np.asarray(total, dtype=np.float64)
    sq = np.asarray(total_sq, dtype=np.float64)
    if s.shape != sq.shape:
        raise ValueError(f"sum and sum of squares differ in shape: {s.shape} vs {sq.shape}")
    mean = s / count
    var = np.maximum(sq / count - mean**2, 0.0)
    return mean, np.sqrt(var)
