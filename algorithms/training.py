"""Local training and evaluation a node runs on its own data, plus feature moments.

Without differential privacy everything here is deterministic for a given seed and
torch thread count, so a round can be replayed when an audit asks how an update was
produced; the only randomness is batch shuffling, drawn from a private
``torch.Generator``. With record-level DP (:class:`DPSGDSettings`) training is
deliberately *not* replayable: Poisson sampling and the Gaussian noise are seeded from
``os.urandom``, because anyone who knew the seed could regenerate and subtract the noise.

Threads: library code never calls ``torch.set_num_threads`` behind the caller's
back (it is process-wide). The node's sandboxed trainer process picks its budget
once, e.g. with :func:`torch_threads`.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "DPSGDSettings",
    "EvalReport",
    "TrainReport",
    "TrainSettings",
    "evaluate",
    "feature_moments",
    "moments_to_standardization",
    "poisson_sample_rate",
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


def _is_number(value: object) -> bool:
    """A finite real (NumPy scalars included, bools excluded: ``True`` is no sample rate)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


@dataclass(frozen=True)
class DPSGDSettings:
    """Record-level differential privacy for local training: DP-SGD as Opacus does it.

    Each step draws a Poisson batch (every example independently with probability
    ``sample_rate``), clips each example's gradient to L2 norm ``max_grad_norm``, adds
    Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` to the sum
    and divides by the *expected* batch size ``sample_rate * num_examples``. One epoch is
    ``round(1 / sample_rate)`` steps. These are the quantities a privacy accountant (RDP /
    PLD for the subsampled Gaussian mechanism) needs, so they are exactly what the node
    accounts for; the node derives ``sample_rate`` with :func:`poisson_sample_rate`.

    ``noise_multiplier`` 0 gives clipping without privacy (useful for tests only).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float

    def __post_init__(self) -> None:
        if not (_is_number(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(
                f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier!r}"
            )
        if not (_is_number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm!r}"
            )
        if not (_is_number(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")

    @property
    def steps_per_epoch(self) -> int:
        """``round(1 / sample_rate)``: ``ceil(num_rows / batch_size)`` for the usual rate.

        Rounded, not truncated: ``int(1 / (1 / k))`` is ``k - 1`` for many ``k`` (93,
        99, ...) in floating point, which is what Opacus' own ``DPDataLoader`` does and
        would silently run fewer steps than the schedule the node accounted for.
        """
        return max(1, round(1.0 / self.sample_rate))


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """``1 / ceil(num_examples / batch_size)``: Opacus' DPDataLoader convention.

    The expected Poisson batch is then about ``batch_size`` and one epoch is
    ``ceil(num_examples / batch_size)`` steps, the same count as without DP.
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(
            f"num_examples and batch_size must be >= 1, got {num_examples} and {batch_size}"
        )
    return 1.0 / math.ceil(num_examples / batch_size)


@dataclass(frozen=True)
class TrainReport:
    """What local training did; ``mean_loss`` is the cross-entropy only (no prox term).

    ``dp_steps`` is the number of noisy DP-SGD steps taken (0 without DP), so the node
    can check that it ran the schedule it accounted for before releasing the update.
    Under DP, ``steps == dp_steps`` (empty Poisson batches are noisy steps too) and
    ``mean_loss`` averages over the examples Poisson sampling actually drew (0.0 in the
    vanishingly rare run that drew none). ``mean_loss`` is computed from the private
    data without noise: it is *not* covered by the DP guarantee.
    """

    num_examples: int
    epochs: int
    mean_loss: float
    steps: int
    dp_steps: int = 0


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


def _make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)


def _diverged(epoch: int) -> FloatingPointError:
    return FloatingPointError(
        f"training diverged (non-finite loss) in epoch {epoch + 1}; lower the lr"
    )


def train_local(
    model: nn.Module,
    x: ArrayLike,
    y: ArrayLike,
    settings: TrainSettings,
    dp: DPSGDSettings | None = None,
) -> TrainReport:
    """Train ``model`` in place on ``(x, y)`` with cross-entropy; return what happened.

    With ``dp``, training is DP-SGD (see :class:`DPSGDSettings` and :func:`_train_dp`):
    Poisson batches replace shuffled ones, so ``settings.batch_size`` and
    ``settings.seed`` are not used (the node folds the batch size into
    ``dp.sample_rate``), while the optimizer, lr, momentum, weight decay and epochs
    apply unchanged. FedProx (``proximal_mu`` > 0) is refused with DP: its proximal
    term is not a per-example loss, so Opacus cannot clip it per example.

    Raises ValueError for empty or mismatched data and FloatingPointError if the
    loss becomes non-finite (usually a learning rate that is too high), so a
    diverged update is never sent.
    """
    if dp is not None and settings.proximal_mu > 0:
        raise ValueError(
            "proximal_mu > 0 (FedProx) cannot be combined with record-level DP: the "
            "proximal term is not per-example, so it cannot be clipped per example"
        )
    xt, yt = _tensors(x, y)
    n = int(yt.shape[0])
    if n == 0:
        raise ValueError("cannot train on zero examples")
    _check_labels(model, xt, yt)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(params, settings)
    if dp is not None:
        return _train_dp(model, xt, yt, settings, dp, optimizer)
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
                raise _diverged(epoch)
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


def _import_opacus() -> tuple[Any, Any, Any]:
    """Opacus' GradSampleModule, DPOptimizer and Poisson sampler, imported on first use.

    Lazily, because importing Opacus costs one to two seconds and every process that
    merely evaluates or aggregates would pay it. ``opacus.utils.module_utils`` calls
    ``logging.basicConfig()`` at import time, which would attach a stderr handler to the
    *root* logger of whatever process imports us; the handlers it adds are removed again
    so the host's logging configuration stays its own.
    """
    root_handlers = list(logging.root.handlers)
    try:
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    finally:
        for handler in list(logging.root.handlers):
            if handler not in root_handlers:
                logging.root.removeHandler(handler)
    return GradSampleModule, DPOptimizer, UniformWithReplacementSampler


def _urandom_generator() -> torch.Generator:
    """A fresh torch generator seeded with 64 bits from the OS CSPRNG (never a fixed seed)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))


#: Opacus' per-parameter bookkeeping; GradSampleModule.cleanup removes all but ``summed_grad``
#: (set by DPOptimizer), which is removed here too so the parameters look untouched.
_OPACUS_PARAM_ATTRS = (
    "grad_sample",
    "summed_grad",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
)
#: Per-module state Opacus' hooks leave behind (an emptied activations list, for instance).
_OPACUS_MODULE_ATTRS = ("activations", "max_batch_len", "ft_compute_sample_grad")


def _strip_opacus_state(model: nn.Module) -> None:
    for p in model.parameters():
        for attr in _OPACUS_PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for module in model.modules():
        for attr in _OPACUS_MODULE_ATTRS:
            if attr in module.__dict__:
                delattr(module, attr)


def _train_dp(
    model: nn.Module,
    xt: torch.Tensor,
    yt: torch.Tensor,
    settings: TrainSettings,
    dp: DPSGDSettings,
    base_optimizer: torch.optim.Optimizer,
) -> TrainReport:
    """DP-SGD with Opacus' GradSampleModule, DPOptimizer and Poisson sampler.

    Lower-level pieces rather than ``PrivacyEngine.make_private``: the engine would add
    an accountant (the node accounts for the whole job itself), build a ``DPDataLoader``
    that collates row by row and truncates ``1 / sample_rate`` to an int (see
    :attr:`DPSGDSettings.steps_per_epoch`), and hand back a wrapped model. Here
    :class:`~opacus.utils.uniform_sampler.UniformWithReplacementSampler` (the sampler
    inside ``DPDataLoader``) draws Poisson batches that index the tensors directly,
    ``GradSampleModule`` computes per-example gradients (Linear and Conv2d have exact
    grad samplers; the Standardize buffers sit in a parameter-free module and are never
    touched) and ``DPOptimizer`` clips, noises and divides by the expected batch size
    ``sample_rate * n`` (the exact expectation; ``make_private`` truncates it to an
    int, which only rescales the learning rate), then runs the caller's optimizer on
    the result. The loss is summed over the batch (``loss_reduction="sum"`` in the
    module), which gives the same per-example gradients as Opacus' default
    mean-then-rescale and stays finite on an empty batch. Empty batches still take a
    (pure-noise) step: the accountant counts every step, and skipping one would change
    the sampling distribution.

    Afterwards the model is unwrapped in place: hooks removed and every attribute
    Opacus put on parameters or modules deleted, so ``state_dict`` keys, evaluation and
    export are exactly as without DP.

    Randomness, and its limits: sampling and noise use two separate ``torch.Generator``
    (Mersenne Twister) objects, each seeded with 64 bits from ``os.urandom``. Opacus'
    ``secure_mode`` in ``PrivacyEngine`` would use torchcsprng, which is not available
    for this torch, so the generator state is not cryptographically protected: the
    guarantee assumes an adversary cannot recover it. ``DPOptimizer`` is given
    ``secure_mode=True``, which needs no torchcsprng and only changes *how* the Gaussian
    is drawn (sum of four draws, the Holohan & Braghin 2021 mitigation of floating-point
    attacks). Floating-point Gaussian sampling is still not an exact Gaussian, so the
    known caveat of Mironov (CCS 2012) on floating-point noise applies: the formal
    guarantee holds for the idealised real-valued mechanism.
    """
    grad_sample_module, dp_optimizer, poisson_sampler = _import_opacus()
    n = int(yt.shape[0])
    with warnings.catch_warnings():
        # The first trainable layer's input (data after Standardize) does not require
        # grad, so torch warns that its full backward hook sees only output gradients.
        # Those are all Opacus' grad samplers need; the warning is expected every step.
        # (catch_warnings is process-wide state: fine in the node's one-job trainer process.)
        warnings.filterwarnings(
            "ignore",
            message="Full backward hook is firing when gradients are computed with respect "
            "to module outputs",
            category=UserWarning,
        )
        try:
            wrapped = grad_sample_module(model, loss_reduction="sum", strict=True)
        except NotImplementedError as exc:
            # Validation runs after Opacus has already tagged the parameters.
            _strip_opacus_state(model)
            raise ValueError(
                f"model is not compatible with per-example gradients (DP-SGD): {exc}"
            ) from exc
        optimizer = None
        try:
            optimizer = dp_optimizer(
                base_optimizer,
                noise_multiplier=dp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                expected_batch_size=dp.sample_rate * n,
                loss_reduction="mean",
                generator=_urandom_generator(),
                secure_mode=True,
            )
            sampler = poisson_sampler(
                num_samples=n,
                sample_rate=dp.sample_rate,
                generator=_urandom_generator(),
                steps=dp.steps_per_epoch,
            )
            loss_total, drawn, steps = 0.0, 0, 0
            wrapped.train()
            for epoch in range(settings.epochs):
                for indices in sampler:
                    idx = torch.tensor(indices, dtype=torch.int64)
                    optimizer.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(wrapped(xt[idx]), yt[idx], reduction="sum")
                    if not torch.isfinite(loss):
                        raise _diverged(epoch)
                    loss.backward()
                    optimizer.step()
                    loss_total += float(loss.detach())
                    drawn += int(idx.numel())
                    steps += 1
        finally:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            wrapped.to_standard_module()
            _strip_opacus_state(model)
    model.eval()
    return TrainReport(
        num_examples=n,
        epochs=settings.epochs,
        mean_loss=loss_total / drawn if drawn else 0.0,
        steps=steps,
        dp_steps=steps,
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
