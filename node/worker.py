"""The training worker: one short-lived process per task.

The daemon prepares a task directory holding only what the task may see — the
job spec, the global weights, the selected dataset as tensors, and the
developer's bundle if any — and runs ``python -m wharf.node.worker TASKDIR``
with that directory as its working directory and a scrubbed environment. The
node's keys and database are never passed in, and a crash here (including in
developer code) only fails the task; the daemon keeps serving.

Outputs: ``result.safetensors`` + ``result.json``, or ``error.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from wharf.algorithms.models import weights_from_bytes

    return weights_from_bytes(path.read_bytes())


def _build(spec: Any, task_dir: Path, input_shape: tuple[int, ...]) -> Any:
    """The model the job describes, before loading the global weights."""
    from wharf.algorithms import models

    m = spec.model
    if spec.uses_bundle:
        from wharf.bundle import load_entry

        build = load_entry(task_dir / "bundle", spec.bundle.model)
        return build(tuple(m.input_shape or input_shape), m.num_classes)
    options = {"hidden": list(m.hidden)} if m.kind == "mlp" else {}
    return models.build_model(m.kind, input_shape, m.num_classes, options)


def _custom_training(
    model: Any, x: np.ndarray, y: np.ndarray, settings: Any, step: Any
) -> tuple[int, float]:
    """Run the bundle's own ``train_step(model, xb, yb, optimizer) -> loss`` per batch."""
    import torch

    gen = torch.Generator().manual_seed(settings.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if settings.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(yt)
    losses: list[float] = []
    model.train()
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            loss = float(step(model, xt[idx], yt[idx], opt))
            if not math.isfinite(loss):
                raise ValueError("bundle train_step returned a non-finite loss")
            losses.append(loss)
    return n, float(np.mean(losses)) if losses else 0.0


def run(task_dir: Path) -> None:
    """Execute the task described in ``task_dir/task.json``."""
    import torch

    from wharf import spec as spec_mod
    from wharf.algorithms import models, training

    torch.set_num_threads(1)
    task = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
    spec = spec_mod.from_dict(task["spec"])
    data = _load_tensors(task_dir / "data.safetensors")
    x, y = data["x"].astype(np.float32), data["y"].astype(np.int64)

    if task["kind"] == "stats":
        total, total_sq, count = training.feature_moments(x)
        blob = models.weights_to_bytes({"sum": total, "sumsq": total_sq})
        (task_dir / "result.safetensors").write_bytes(blob)
        _write_json(task_dir / "result.json", {"num_examples": int(count), "metrics": {}})
        return

    global_weights = _load_tensors(task_dir / "model.safetensors")
    model = _build(spec, task_dir, tuple(x.shape[1:]))
    models.arrays_to_model(model, global_weights)

    # Federated evaluation of the incoming global model on local data.
    if int(y.max(initial=0)) >= spec.model.num_classes:
        raise ValueError(
            f"dataset has label {int(y.max())} but the job declares "
            f"model.num_classes = {spec.model.num_classes}"
        )
    report = training.evaluate(model, x, y)

    t = spec.training
    settings = training.TrainSettings(
        optimizer=t.optimizer,
        lr=t.lr,
        epochs=t.epochs,
        batch_size=t.batch_size,
        seed=t.seed + int(task["round"]),
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        proximal_mu=t.proximal_mu,
    )
    started = time.perf_counter()
    if spec.uses_bundle and spec.bundle.train_step:
        from wharf.bundle import load_entry

        step = load_entry(task_dir / "bundle", spec.bundle.train_step)
        n, mean_loss = _custom_training(model, x, y, settings, step)
    else:
        dp = None
        if "dp_sgd" in task:  # the node's own DP plan from its grant, never the coordinator's
            d = task["dp_sgd"]
            dp = training.DPSGDSettings(
                noise_multiplier=float(d["noise_multiplier"]),
                max_grad_norm=float(d["max_grad_norm"]),
                sample_rate=float(d["sample_rate"]),
            )
        train = training.train_local(model, x, y, settings, dp=dp)
        n, mean_loss = train.num_examples, train.mean_loss
        if dp is not None and train.dp_steps != int(task["dp_sgd"]["steps_per_round"]):
            # The accountant composed exactly this many noisy steps per round.
            raise ValueError(
                f"DP-SGD took {train.dp_steps} steps, the node's plan accounted for "
                f"{task['dp_sgd']['steps_per_round']}; the update is not released"
            )
    local = models.model_to_arrays(model)
    delta = {k: (local[k] - global_weights[k]).astype(np.float32) for k in global_weights}
    for k, v in delta.items():
        if not np.all(np.isfinite(v)):
            raise ValueError(f"training diverged: update of {k!r} is not finite")
    (task_dir / "result.safetensors").write_bytes(models.weights_to_bytes(delta))
    metrics = {
        "train_loss_sum": mean_loss * n,
        "eval_loss_sum": float(report.loss_sum),
        "eval_correct": float(report.correct),
        "eval_count": float(report.num_examples),
        "train_seconds": time.perf_counter() - started,
    }
    _write_json(task_dir / "result.json", {"num_examples": int(n), "metrics": metrics})


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: python -m wharf.node.worker TASKDIR", file=sys.stderr)
        return 2
    task_dir = Path(sys.argv[1])
    try:
        run(task_dir)
    except Exception as exc:
        _write_json(
            task_dir / "error.json",
            {"error": f"{type(exc).__name__}: {exc}"[:500], "trace": traceback.format_exc()},
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
