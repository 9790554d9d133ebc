"""Running one job: wait for nodes, prepare the model, run rounds, finish.

One :class:`JobRunner` thread per active job. Everything it decides is
written to the store before it moves on, so a coordinator restarted at any
point picks the job up at its last completed round (see ``Store.complete_round``).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wharf import bundle as bundle_mod
from wharf import spec as spec_mod
from wharf.algorithms import models, secure_vectors, strategies, training
from wharf.algorithms.privacy import skellam
from wharf.algorithms.privacy.accounting import Guarantee
from wharf.algorithms.privacy.plan import dp_max_nodes, participant_plan
from wharf.algorithms.privacy.skellam import SkellamPlan
from wharf.algorithms.secagg import SecAggParams, VectorLayout
from wharf.coordinator.audit import Audit
from wharf.coordinator.blobs import BlobStore
from wharf.coordinator.secure_round import SecureOutcome, SecureRound, SecureRoundFailed
from wharf.coordinator.sessions import NodeSession, SessionRegistry
from wharf.coordinator.store import Store
from wharf.coordinator.tasks import ResultRejected, RoundCollector, TaskBroker, TaskResult
from wharf.proto import wharf_pb2 as pb

log = logging.getLogger("wharf.coordinator")

MAX_MODEL_PARAMS = 1 << 28
"""A built-in model above 268 M parameters (1 GiB of float32) is refused."""


class JobFailed(Exception):
    """The job cannot continue; the message is the reason shown to the developer."""


class RoundFailed(Exception):
    """This round attempt failed; it may be retried."""


class JobCancelled(Exception):
    """The developer cancelled the job."""


@dataclass
class Context:
    """What every runner shares."""

    store: Store
    blobs: BlobStore
    sessions: SessionRegistry
    broker: TaskBroker
    poll_s: float = 0.5
    ca_pem: bytes | None = None
    """The deployment CA (None in plaintext mode, where secure aggregation is unavailable)."""
    audit: Audit | None = None


def model_options(spec: spec_mod.JobSpec) -> dict[str, object]:
    """The built-in model's options from the spec (only ``mlp`` takes ``hidden``)."""
    return {"hidden": list(spec.model.hidden)} if spec.model.kind == "mlp" else {}


def load_weights_blob(blobs: BlobStore, sha: str) -> dict[str, np.ndarray]:
    if not sha:
        return {}
    return models.weights_from_bytes(blobs.get_bytes(sha))


def metrics_summary(results: list[TaskResult]) -> dict[str, float]:
    """Example-weighted round metrics from the sums nodes report."""
    n = sum(r.num_examples for r in results)
    sums: Counter[str] = Counter()
    for r in results:
        sums.update(r.metrics)
    out: dict[str, float] = {"num_examples": float(n), "nodes": float(len(results))}
    if n and "train_loss_sum" in sums:
        out["train_loss"] = sums["train_loss_sum"] / n
    if sums["eval_count"]:
        out["global_loss"] = sums["eval_loss_sum"] / sums["eval_count"]
        out["global_accuracy"] = sums["eval_correct"] / sums["eval_count"]
    if results and "train_seconds" in sums:
        out["train_seconds_mean"] = sums["train_seconds"] / len(results)
    return out


class JobRunner(threading.Thread):
    """Drives one job to a terminal state."""

    def __init__(self, ctx: Context, job_id: str, on_exit: Callable[[str], None]) -> None:
        super().__init__(name=f"job-{job_id[:8]}", daemon=True)
        self.ctx = ctx
        self.job_id = job_id
        self.cancelled = threading.Event()
        self.stopping = threading.Event()
        self._on_exit = on_exit
        self._participants: set[str] = set()
        job = ctx.store.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        self.spec = spec_mod.from_json(job.spec_json)
        self.job_hash = job.job_hash
        self.bundle_sha = job.bundle_sha
        self.owner = job.owner
        self._offered: dict[str, int] = {}
        self._plan: tuple[Guarantee, SkellamPlan] | None = None

    # -- lifecycle -------------------------------------------------------------
    def run(self) -> None:
        store = self.ctx.store
        try:
            self._run()
        except JobCancelled:
            log.info("job %s cancelled", self.job_id)
        except JobFailed as exc:
            store.set_state(self.job_id, "failed", str(exc))
        except _Stopping:
            log.info("job %s paused for coordinator shutdown", self.job_id)
            return
        except Exception as exc:
            log.exception("job %s crashed", self.job_id)
            store.set_state(self.job_id, "failed", f"internal error: {exc}")
        finally:
            self._on_exit(self.job_id)
        self._end_job()

    def stop(self) -> None:
        """Coordinator shutdown: leave the job as it is in the store."""
        self.stopping.set()

    def cancel(self) -> None:
        self.cancelled.set()

    def _check(self) -> None:
        if self.stopping.is_set():
            raise _Stopping
        if self.cancelled.is_set():
            raise JobCancelled

    def _run(self) -> None:
        store = self.ctx.store
        job = store.get_job(self.job_id)
        assert job is not None
        if job.state == "pending_grants":
            self._wait_for_nodes(
                self.spec.federation.min_nodes, self.spec.federation.wait_for_nodes_s
            )
            if not store.set_state(self.job_id, "running"):
                raise JobCancelled
        job = store.get_job(self.job_id)
        assert job is not None
        if not job.model_sha:
            self._prepare_initial_model()
        fed = self.spec.federation
        while True:
            job = store.get_job(self.job_id)
            assert job is not None
            if job.state != "running":
                raise JobCancelled
            rnd = job.rounds_completed + 1
            if rnd > fed.rounds:
                break
            for attempt in range(fed.max_round_retries + 1):
                self._check()
                try:
                    self._run_round(rnd, attempt, job.model_sha, job.strategy_state_sha)
                    break
                except RoundFailed as exc:
                    store.fail_round(self.job_id, rnd, str(exc))
                    if attempt == fed.max_round_retries:
                        raise JobFailed(
                            f"round {rnd} failed {attempt + 1} times; last reason: {exc}"
                        ) from None
                    self._wait_for_nodes(fed.min_nodes, fed.wait_for_nodes_s, quiet=True)
        job = store.get_job(self.job_id)
        assert job is not None
        self._log("model_stored", {"model_sha256": job.model_sha, "size": job.model_size})
        if self.spec.privacy.enabled:
            report = self._privacy_report(job.model_sha)
            store.set_privacy(self.job_id, json.dumps(report, sort_keys=True))
            self._log("privacy_guarantee", report)
        store.set_state(self.job_id, "completed")

    def _privacy_report(self, model_sha: str) -> dict[str, object]:
        """The DP guarantee the finished job states: the participant-level guarantee (the
        plan every node computed alike), each contributing node's own record-level
        guarantee and what the job cost its dataset, all from the nodes' signed grants."""
        participant = None
        if self.spec.privacy.participant_level is not None:
            size = models.flatten(load_weights_blob(self.ctx.blobs, model_sha))[0].size
            self._skellam_plan(size)
            assert self._plan is not None
            participant = self._plan[0].to_dict()
        contributors = set()
        for r in self.ctx.store.list_rounds(self.job_id):
            if r.state == "completed":
                contributors.update(r.nodes)
        record: dict[str, object] = {}
        spends: dict[str, object] = {}
        for node, d in sorted(self.ctx.store.decisions(self.job_id).items()):
            if node not in contributors or not d.get("grant_json"):
                continue
            dp = _grant_dp(d)
            if not dp:
                continue
            spends[node] = {"epsilon": dp["epsilon"], "delta": dp["delta"]}
            for g in (dp.get("plan") or {}).get("guarantees", []):
                if g.get("kind") == "record_level":
                    record[node] = g
        eps = [float(v["epsilon"]) for v in spends.values()]  # type: ignore[index]
        return {
            "participant_level": participant,
            "record_level": record,
            "dataset_spend": spends,
            "worst_epsilon": max(eps) if eps else None,
            "metrics_released": False,
        }

    def _end_job(self) -> None:
        for name in sorted(self._participants):
            self.ctx.sessions.send(
                name,
                pb.Task(task_id=uuid.uuid4().hex, job_id=self.job_id, kind=pb.TASK_END_JOB),
            )

    # -- node selection ----------------------------------------------------------
    def _candidates(self) -> list[NodeSession]:
        """Online nodes holding the dataset with the job's feature layout."""
        nodes = self.ctx.sessions.holding(self.spec.data.dataset)
        if not nodes:
            return []

        # Nodes must agree on the feature layout; keep the most common one.
        def layout(s: NodeSession) -> str:
            meta = s.datasets[self.spec.data.dataset]
            feats = list(self.spec.data.features) or list(meta.get("features", []))
            return repr((feats, list(meta.get("feature_shape", []))))

        common, _ = Counter(layout(s) for s in nodes).most_common(1)[0]
        chosen = [s for s in nodes if layout(s) == common]
        if self.spec.data.features:
            wanted = set(self.spec.data.features)
            chosen = [
                s
                for s in chosen
                if wanted <= set(s.datasets[self.spec.data.dataset].get("features", []))
            ]
        return chosen

    def _eligible(self) -> list[NodeSession]:
        """Candidates whose current decision on this job is a valid grant."""
        decisions = self.ctx.store.decisions(self.job_id)
        chosen = [
            s for s in self._candidates() if decisions.get(s.name, {}).get("outcome") == "granted"
        ]
        cap = self.spec.federation.max_nodes
        if self.spec.privacy.participant_level is not None:
            cap = dp_max_nodes(self.spec)  # the noise plan's headroom is sized for this many
        if cap:
            chosen = chosen[:cap]
        return chosen

    def _offer(self) -> None:
        """Offer the job to candidates that have not decided yet (again after a reconnect)."""
        decisions = self.ctx.store.decisions(self.job_id)
        seq, head = self.ctx.audit.head() if self.ctx.audit else (0, "")
        bundle_ref = self.ctx.blobs.ref(self.bundle_sha) if self.bundle_sha else pb.BlobRef()
        owner = self.owner
        for s in self._candidates():
            outcome = decisions.get(s.name, {}).get("outcome")
            if outcome in ("granted", "refused", "revoked"):
                continue
            if self._offered.get(s.name) == s.session_id:
                continue
            task_id = uuid.uuid4().hex
            self.ctx.store.create_task(
                task_id=task_id,
                job_id=self.job_id,
                rnd=0,
                attempt=0,
                node=s.name,
                kind="TASK_OFFER",
            )
            task = pb.Task(
                task_id=task_id,
                job_id=self.job_id,
                kind=pb.TASK_OFFER,
                job_spec_json=self.spec.canonical_json(),
                job_hash=self.job_hash,
                dataset=self.spec.data.dataset,
                bundle=bundle_ref,
                requester=owner,
                ledger_seq=seq,
                ledger_head=head,
            )
            if self.ctx.sessions.send(s.name, task):
                self._offered[s.name] = s.session_id
                self._participants.add(s.name)

    def _decision_summary(self) -> str:
        decisions = self.ctx.store.decisions(self.job_id)
        parts = []
        for node, d in sorted(decisions.items()):
            if d["outcome"] == "pending":
                parts.append(f"{node}: awaiting its operator's approval")
            elif d["outcome"] != "granted":
                parts.append(f"{node} {d['outcome']}: {d['reason']}")
        return "; ".join(parts)

    def _wait_for_nodes(self, need: int, timeout: float, quiet: bool = False) -> list[NodeSession]:
        deadline = time.time() + timeout
        announced = quiet
        while True:
            self._check()
            self._offer()
            nodes = self._eligible()
            if len(nodes) >= need:
                return nodes
            if time.time() >= deadline:
                summary = self._decision_summary()
                raise JobFailed(
                    f"only {len(nodes)} of the {need} required nodes holding dataset "
                    f"'{self.spec.data.dataset}' were online with a grant within {timeout:.0f} s"
                    + (f" ({summary})" if summary else "")
                )
            if not announced:
                self.ctx.store.add_event(
                    self.job_id,
                    "message",
                    message=f"waiting for {need} nodes holding '{self.spec.data.dataset}' "
                    f"to grant the job ({len(nodes)} so far)",
                )
                announced = True
            time.sleep(self.ctx.poll_s)

    def _log(self, kind: str, payload: dict[str, object]) -> None:
        if self.ctx.audit is not None:
            self.ctx.audit.log(kind, self.job_id, payload)

    # -- model preparation -------------------------------------------------------
    def _input_shape(self, nodes: list[NodeSession]) -> tuple[int, ...]:
        if self.spec.model.input_shape:
            return tuple(self.spec.model.input_shape)
        if self.spec.data.features:
            return (len(self.spec.data.features),)
        meta = nodes[0].datasets[self.spec.data.dataset]
        return tuple(int(d) for d in meta["feature_shape"])

    def _prepare_initial_model(self) -> None:
        """Build round-0 weights; standardise features from federated moments."""
        nodes = self._wait_for_nodes(
            self.spec.federation.min_nodes, self.spec.federation.wait_for_nodes_s, quiet=True
        )
        m = self.spec.model
        if self.spec.uses_bundle:
            files = bundle_mod.list_files(self.ctx.blobs.get_bytes(self.bundle_sha))
            weights = models.weights_from_bytes(files[bundle_mod.INITIAL_WEIGHTS])
        else:
            shape = self._input_shape(nodes)
            if m.kind in ("mlp", "logreg"):
                dims = [int(np.prod(shape)), *(m.hidden if m.kind == "mlp" else ()), m.num_classes]
                params = sum(a * b + b for a, b in itertools.pairwise(dims))
                if params > MAX_MODEL_PARAMS:
                    raise JobFailed(
                        f"the model would have {params:,} parameters; the limit is "
                        f"{MAX_MODEL_PARAMS:,}"
                    )
            net = models.init_model(
                m.kind, shape, m.num_classes, model_options(self.spec), self.spec.training.seed
            )
            if m.standardize:
                mean, std = self._federated_moments(shape)
                models.set_standardization(net, mean, std)
            weights = models.model_to_arrays(net)
        ref = self.ctx.blobs.put_bytes(models.weights_to_bytes(weights))
        self.ctx.store.set_initial_model(self.job_id, ref.sha256, ref.size)

    def _federated_moments(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Round 0: every node reports per-feature sums; only totals are used."""
        fed = self.spec.federation
        for attempt in range(fed.max_round_retries + 1):
            self._check()
            nodes = self._wait_for_nodes(fed.min_nodes, fed.wait_for_nodes_s, quiet=True)
            if fed.secure:
                n_features = int(np.prod(shape))
                try:
                    outcome = self._secure(
                        0,
                        attempt,
                        pb.TASK_STATS,
                        nodes,
                        "",
                        functools.partial(
                            secure_vectors.stats_layout,
                            num_features=n_features,
                            row_cap=self._row_cap(nodes),
                        ),
                    )
                    total, total_sq, count = secure_vectors.decode_stats(
                        outcome.params, outcome.sums
                    )
                except RoundFailed as exc:
                    reason = str(exc)
                    self.ctx.store.add_event(
                        self.job_id, "message", message=f"statistics round: {reason}"
                    )
                    continue
                self.ctx.store.add_event(
                    self.job_id,
                    "message",
                    message=f"feature statistics securely aggregated over "
                    f"{len(outcome.contributors)} nodes ({count} rows)",
                )
                return training.moments_to_standardization(
                    total.reshape(shape), total_sq.reshape(shape), count
                )

            def validate(result: TaskResult) -> object:
                arrays = _read_arrays(result)
                for key in ("sum", "sumsq"):
                    if key not in arrays or arrays[key].shape != shape:
                        raise ResultRejected(f"moments must carry '{key}' of shape {shape}")
                    if not np.all(np.isfinite(arrays[key])):
                        raise ResultRejected(f"moments '{key}' contain NaN or Inf")
                if result.num_examples <= 0:
                    raise ResultRejected("moments need a positive example count")
                return arrays

            results = self._dispatch(0, attempt, pb.TASK_STATS, nodes, "", validate)
            for r in results:
                r.discard()  # the validated arrays are in r.payload
            ok = [r for r in results if r.ok]
            if len(ok) >= fed.min_nodes:
                total = sum(np.asarray(r.payload["sum"], np.float64) for r in ok)  # type: ignore[index]
                total_sq = sum(np.asarray(r.payload["sumsq"], np.float64) for r in ok)  # type: ignore[index]
                count = sum(r.num_examples for r in ok)
                self.ctx.store.add_event(
                    self.job_id,
                    "message",
                    message=f"feature statistics from {len(ok)} nodes ({count} rows)",
                )
                return training.moments_to_standardization(total, total_sq, count)
            reason = _shortfall(results, fed.min_nodes)
            self.ctx.store.add_event(self.job_id, "message", message=f"statistics round: {reason}")
        raise JobFailed(f"could not compute feature statistics: {reason}")

    # -- rounds ------------------------------------------------------------------
    def _dispatch(
        self,
        rnd: int,
        attempt: int,
        kind: int,
        nodes: list[NodeSession],
        model_sha: str,
        validator: Callable[[TaskResult], object],
        *,
        customize: Callable[[pb.Task, str], None] | None = None,
        deadline: float | None = None,
    ) -> list[TaskResult]:
        """Send one task per node, wait for answers until the deadline.

        ``customize(task, node_name)`` fills in per-node fields (secure
        aggregation phase messages); ``deadline`` defaults to the round timeout.
        """
        ctx = self.ctx
        fed = self.spec.federation
        if deadline is None:
            deadline = time.time() + fed.round_timeout_s
        model_ref = ctx.blobs.ref(model_sha) if model_sha else pb.BlobRef()
        bundle_ref = ctx.blobs.ref(self.bundle_sha) if self.bundle_sha else pb.BlobRef()
        assignment = {uuid.uuid4().hex: s.name for s in nodes}
        collector = RoundCollector(assignment, validator)
        ctx.broker.register(collector, self.job_id, kind, assignment)
        kind_name = pb.TaskKind.Name(kind)
        ledger_seq, ledger_head = ctx.audit.head() if ctx.audit else (0, "")
        try:
            for task_id, name in assignment.items():
                ctx.store.create_task(
                    task_id=task_id,
                    job_id=self.job_id,
                    rnd=rnd,
                    attempt=attempt,
                    node=name,
                    kind=kind_name,
                )
                self._participants.add(name)
                task = pb.Task(
                    task_id=task_id,
                    job_id=self.job_id,
                    round=rnd,
                    kind=kind,
                    job_spec_json=self.spec.canonical_json(),
                    job_hash=self.job_hash,
                    model=model_ref,
                    bundle=bundle_ref,
                    dataset=self.spec.data.dataset,
                    deadline_unix=deadline,
                    secure=False,
                    ledger_seq=ledger_seq,
                    ledger_head=ledger_head,
                )
                if customize is not None:
                    customize(task, name)
                if not ctx.sessions.send(name, task):
                    collector.node_lost(name)
            # A node that disconnects now fails its task at once.
            for name in assignment.values():
                if ctx.sessions.get(name) is None:
                    collector.node_lost(name)
            collector.wait(deadline, self.cancelled)
            collector.close()
            if self.cancelled.is_set() or self.stopping.is_set():
                collector.discard_all()
            self._check()
            results = []
            for task_id, name in assignment.items():
                r = collector.results.get(task_id) or TaskResult(
                    task_id=task_id,
                    node=name,
                    ok=False,
                    error=f"no answer within the deadline ({kind_name})",
                )
                ctx.store.finish_task(
                    task_id,
                    ok=r.ok,
                    error=r.error,
                    result_sha=r.blob_sha,
                    num_examples=r.num_examples,
                )
                if not r.ok:
                    ctx.store.add_event(
                        self.job_id,
                        "node_dropped",
                        round=rnd,
                        message=f"{name}: {r.error}",
                    )
                results.append(r)
            return results
        finally:
            ctx.broker.unregister(list(assignment))

    def _run_round(self, rnd: int, attempt: int, model_sha: str, state_sha: str) -> None:
        ctx = self.ctx
        fed = self.spec.federation
        self._offer()  # nodes that came online since: they decide before they take part
        nodes = self._eligible()
        if len(nodes) < fed.min_nodes:
            raise RoundFailed(f"only {len(nodes)} eligible nodes online, {fed.min_nodes} required")
        global_weights = load_weights_blob(ctx.blobs, model_sha)
        layout = {k: v.shape for k, v in global_weights.items()}
        ctx.store.start_round(self.job_id, rnd, attempt, [s.name for s in nodes])
        self._log(
            "round_started", {"round": rnd, "attempt": attempt, "nodes": [s.name for s in nodes]}
        )
        if fed.secure:
            self._run_secure_round(rnd, attempt, nodes, model_sha, state_sha, global_weights)
            return

        def validate(result: TaskResult) -> object:
            delta = _read_arrays(result)
            if set(delta) != set(layout):
                raise ResultRejected("update tensors do not match the model's tensors")
            for k, arr in delta.items():
                want = global_weights[k].dtype
                if arr.dtype != want:
                    raise ResultRejected(f"update {k!r} has dtype {arr.dtype}, expected {want}")
                if arr.shape != layout[k]:
                    raise ResultRejected(
                        f"update tensor {k!r} has shape {arr.shape}, expected {layout[k]}"
                    )
                if not np.all(np.isfinite(arr)):
                    raise ResultRejected(f"update tensor {k!r} contains NaN or Inf")
            if result.num_examples <= 0:
                raise ResultRejected("an update must report a positive number of examples")
            for k, v in result.metrics.items():
                if not np.isfinite(v):
                    raise ResultRejected(f"metric {k!r} is not finite")
            return delta

        results = self._dispatch(rnd, attempt, pb.TASK_TRAIN, nodes, model_sha, validate)
        try:
            ok = [r for r in results if r.ok]
            if len(ok) < fed.min_nodes:
                raise RoundFailed(_shortfall(results, fed.min_nodes))
            avg = strategies.weighted_average(
                [(r.payload, r.num_examples) for r in ok]  # type: ignore[misc]
            )
            new_weights, new_state = self._apply_strategy(global_weights, avg, state_sha, rnd)
            model_ref = ctx.blobs.put_bytes(models.weights_to_bytes(new_weights))
            state_ref_sha = (
                ctx.blobs.put_bytes(models.weights_to_bytes(new_state)).sha256 if new_state else ""
            )
            self._check()
            if self.spec.valuation.mode == "clear":
                # Consented in every grant (the spec says so): keep each update for valuation.
                kept = {
                    r.node: (
                        ctx.blobs.put_bytes(Path(r.blob_path).read_bytes()).sha256,
                        r.num_examples,
                    )
                    for r in ok
                    if r.blob_path is not None
                }
                ctx.store.set_valuation_updates(self.job_id, rnd, model_sha, kept)
            summary = metrics_summary(ok)
            ctx.store.complete_round(
                self.job_id,
                rnd,
                model_sha=model_ref.sha256,
                model_size=model_ref.size,
                strategy_state_sha=state_ref_sha,
                metrics=summary,
                node_names=[r.node for r in ok],
            )
            self._log(
                "round_finished",
                {
                    "round": rnd,
                    "model_sha256": model_ref.sha256,
                    "nodes": [r.node for r in ok],
                    "metrics": summary,
                },
            )
        finally:
            for r in results:
                r.discard()

    def _secure(
        self,
        rnd: int,
        attempt: int,
        kind: int,
        nodes: list[NodeSession],
        model_sha: str,
        make_layout: Callable[[SecAggParams], VectorLayout],
    ) -> SecureOutcome:
        """Run one secure-aggregation round; any protocol failure fails the round."""
        if self.ctx.ca_pem is None:
            raise JobFailed(
                "secure aggregation needs mTLS identities; this coordinator runs in plaintext "
                "mode (submit with federation.secure = false for plaintext experiments)"
            )
        row_cap = self._row_cap(nodes)
        try:
            outcome = SecureRound(
                dispatch=self._dispatch,
                job_id=self.job_id,
                rnd=rnd,
                attempt=attempt,
                kind=kind,
                nodes=nodes,
                model_sha=model_sha,
                ca_pem=self.ctx.ca_pem,
                make_layout=make_layout,
                weight_scale=row_cap,
                deadline=time.time() + self.spec.federation.round_timeout_s,
            ).run()
        except SecureRoundFailed as exc:
            raise RoundFailed(str(exc)) from None
        need = self.spec.federation.min_nodes
        if len(outcome.contributors) < need:
            raise RoundFailed(
                f"only {len(outcome.contributors)} nodes contributed to the secure sum, "
                f"{need} required"
            )
        return outcome

    def _skellam_plan(self, num_values: int) -> SkellamPlan:
        """The participant-level plan the nodes signed into their grants.

        Every node calibrates the plan from the spec and the model size; the coordinator
        computes it too, but decodes with the nodes' own signed plan so that a
        floating-point difference between machines can never make it read the sum
        with a scale the nodes did not use. Nodes that disagree fail the job.
        """
        if self._plan is None or self._plan[1].num_params != num_values:
            try:
                own = participant_plan(self.spec, num_values)
            except ValueError as exc:
                raise JobFailed(
                    f"the job's participant-level privacy cannot be met: {exc}"
                ) from None
            signed = self._granted_plans()
            if len(set(signed.values())) > 1:
                raise JobFailed(
                    "the nodes' signed participant-level plans differ ("
                    + ", ".join(sorted(signed))
                    + "); they must agree on the noise and scale"
                )
            if signed:
                guarantee = next(iter(signed.values()))
                plan = guarantee.skellam_plan()
                if plan.num_params != num_values:
                    raise JobFailed(
                        f"the nodes' plan is for {plan.num_params} values, the model has "
                        f"{num_values}"
                    )
                own = (guarantee, plan)
            self._plan = own
        return self._plan[1]

    def _granted_plans(self) -> dict[str, Guarantee]:
        """Participant-level guarantees (with their Skellam plans) from the nodes' grants."""
        out: dict[str, Guarantee] = {}
        for node, d in self.ctx.store.decisions(self.job_id).items():
            if d.get("outcome") != "granted":
                continue
            for g in (_grant_dp(d).get("plan") or {}).get("guarantees", []):
                if g.get("kind") == "participant_level":
                    try:
                        out[node] = Guarantee.from_dict(g)
                    except ValueError:
                        continue
        return out

    def _row_cap(self, nodes: list[NodeSession]) -> int:
        """Public bound on a node's example count: the largest registered row count."""
        rows = [int(s.datasets[self.spec.data.dataset].get("rows", 0)) for s in nodes]
        return max(1, *rows)

    def _run_secure_round(
        self,
        rnd: int,
        attempt: int,
        nodes: list[NodeSession],
        model_sha: str,
        state_sha: str,
        global_weights: dict[str, np.ndarray],
    ) -> None:
        """A training round under SecAgg+: the coordinator sees only the sums."""
        ctx = self.ctx
        flat, layout = models.flatten(global_weights)
        row_cap = self._row_cap(nodes)
        privacy = self.spec.privacy
        plan = self._skellam_plan(flat.size) if privacy.participant_level is not None else None
        make_layout: Callable[[SecAggParams], VectorLayout]
        roster = sorted(s.name for s in nodes)
        coalitions = plan is not None and self.spec.valuation.mode == "secure"
        if plan is not None and coalitions:
            make_layout = functools.partial(
                secure_vectors.dp_coalition_layout, plan=plan, roster=roster
            )
        elif plan is not None:
            make_layout = functools.partial(secure_vectors.dp_update_layout, plan=plan)
        else:
            make_layout = functools.partial(
                secure_vectors.update_layout,
                num_params=flat.size,
                row_cap=row_cap,
                metrics=not privacy.enabled,
            )
        outcome = self._secure(rnd, attempt, pb.TASK_TRAIN, nodes, model_sha, make_layout)
        try:
            if plan is not None:
                if len(outcome.contributors) < plan.min_contributors:
                    raise RoundFailed(
                        f"only {len(outcome.contributors)} nodes contributed; the "
                        f"participant-level noise needs {plan.min_contributors}"
                    )
                total = len(outcome.contributors)
                metric_sums: dict[str, float] = {}
                if coalitions:
                    # Decodes the training sum ("all") along with the leave-one-out sums.
                    means = secure_vectors.decode_coalitions(
                        outcome.sums, outcome.contributors, roster, plan
                    )
                    mean = means[secure_vectors.ALL_COALITION][0]
                else:
                    mean = skellam.decode_sum(
                        np.asarray(outcome.sums["update"], dtype=np.int64), total, plan
                    )
            else:
                mean, total, metric_sums = secure_vectors.decode_update(outcome.sums, row_cap)
        except (secure_vectors.VectorError, ValueError) as exc:
            raise RoundFailed(str(exc)) from None
        if coalitions:
            # Secure valuation: keep the noised coalition means (never an update) for the
            # operator, next to the model the round started from.
            kept = {
                label: (
                    ctx.blobs.put_bytes(
                        models.weights_to_bytes(
                            {
                                k: v.astype(global_weights[k].dtype)
                                for k, v in models.unflatten(m, layout).items()
                            }
                        )
                    ).sha256,
                    members,
                )
                for label, (m, members) in means.items()
            }
            ctx.store.set_valuation_updates(self.job_id, rnd, model_sha, kept)
        avg = models.unflatten(mean, layout)
        # Keep the reference dtypes (the vector carries float32 deltas).
        avg = {k: v.astype(global_weights[k].dtype) for k, v in avg.items()}
        new_weights, new_state = self._apply_strategy(global_weights, avg, state_sha, rnd)
        model_ref = ctx.blobs.put_bytes(models.weights_to_bytes(new_weights))
        state_ref_sha = (
            ctx.blobs.put_bytes(models.weights_to_bytes(new_state)).sha256 if new_state else ""
        )
        metrics: dict[str, float] = {"nodes": float(len(outcome.contributors))}
        if plan is None:
            metrics["num_examples"] = float(total)
        if metric_sums:
            metrics["train_loss"] = metric_sums["train_loss_sum"] / total
            metrics["train_seconds_mean"] = metric_sums["train_seconds"] / len(outcome.contributors)
        metrics.update(outcome.timings)
        if metric_sums and metric_sums["eval_count"] > 0.5:
            metrics["global_loss"] = metric_sums["eval_loss_sum"] / metric_sums["eval_count"]
            metrics["global_accuracy"] = metric_sums["eval_correct"] / metric_sums["eval_count"]
        self._check()
        ctx.store.complete_round(
            self.job_id,
            rnd,
            model_sha=model_ref.sha256,
            model_size=model_ref.size,
            strategy_state_sha=state_ref_sha,
            metrics=metrics,
            node_names=sorted(outcome.contributors),
        )
        self._log(
            "round_finished",
            {
                "round": rnd,
                "model_sha256": model_ref.sha256,
                "secure": True,
                "nodes": sorted(outcome.contributors),
                "metrics": metrics,
            },
        )

    def _apply_strategy(
        self,
        global_weights: Mapping[str, np.ndarray],
        avg_delta: Mapping[str, np.ndarray],
        state_sha: str,
        rnd: int,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        fed = self.spec.federation
        if fed.strategy in ("fedavg", "fedprox"):
            options = {"server_lr": fed.server_lr}
        else:
            options = {"eta": fed.eta, "beta1": fed.beta1, "beta2": fed.beta2, "tau": fed.tau}
        strategy = strategies.make_strategy(fed.strategy, options)
        state = load_weights_blob(self.ctx.blobs, state_sha)
        new_weights, new_state = strategy.apply(dict(global_weights), dict(avg_delta), state, rnd)
        return dict(new_weights), dict(new_state)


class _Stopping(Exception):
    """Internal: the coordinator is shutting down."""


def _grant_dp(decision: Mapping[str, Any]) -> dict[str, Any]:
    """The ``protections.dp`` table of a node's stored grant ({} if none or unreadable)."""
    try:
        dp = json.loads(decision.get("grant_json") or "{}")["body"]["protections"]["dp"]
    except (ValueError, KeyError, TypeError):
        return {}
    return dp if isinstance(dp, dict) else {}


def _read_arrays(result: TaskResult) -> dict[str, np.ndarray]:
    if result.blob_path is None:
        raise ResultRejected("result carries no payload")
    try:
        return models.weights_from_bytes(Path(result.blob_path).read_bytes())
    except ResultRejected:
        raise
    except Exception as exc:
        raise ResultRejected(f"payload is not a valid safetensors file: {exc}") from None


def _shortfall(results: list[TaskResult], need: int) -> str:
    ok = sum(r.ok for r in results)
    failures = "; ".join(f"{r.node}: {r.error}" for r in results if not r.ok)
    return f"{ok} of {len(results)} nodes answered, {need} required" + (
        f" ({failures})" if failures else ""
    )
