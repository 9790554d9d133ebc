"""Keeps one runner thread per active job, including jobs found at start-up."""

from __future__ import annotations

import logging
import threading

from wharf.coordinator.runner import Context, JobRunner

log = logging.getLogger("wharf.coordinator")


class Scheduler:
    """Starts, cancels and stops job runners."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._lock = threading.Lock()
        self._runners: dict[str, JobRunner] = {}
        ctx.sessions.add_listener(ctx.broker.node_lost)

    def resume_all(self) -> int:
        """Restart runners for every job left active by a previous process."""
        count = 0
        for job in self.ctx.store.active_jobs():
            if job.state == "running":
                self.ctx.store.add_event(
                    job.job_id,
                    "message",
                    message=f"coordinator restarted; resuming after round {job.rounds_completed}",
                )
            self.start(job.job_id)
            count += 1
        return count

    def start(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._runners:
                return
            runner = JobRunner(self.ctx, job_id, self._forget)
            self._runners[job_id] = runner
        runner.start()

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._runners.pop(job_id, None)

    def cancel(self, job_id: str) -> None:
        with self._lock:
            runner = self._runners.get(job_id)
        if runner is not None:
            runner.cancel()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            runners = list(self._runners.values())
        for r in runners:
            r.stop()
        for r in runners:
            r.join(timeout)
