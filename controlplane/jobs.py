"""Control-plane jobs (planning runs, rollouts) and their table, so they outlive the process.

A job is written on every change (state, stage, trials, plan, message). A job that was
running when the process died cannot go on (its thread and the agent's answers it waited for
are gone): the next start marks it `interrupted`, with the stage it was in, before anything
else runs. plan.status reads this table, so a job id from before a restart still answers.
"""
from __future__ import annotations

import dataclasses
import enum
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from headroom_sidecar.controlplane.schema import JOBS_DDL


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    INTERRUPTED = "interrupted"   # the control plane stopped (crash, kill -9) while it ran


class Stage(str, enum.Enum):
    PLANNING = "planning"
    DECIDING = "deciding"
    ROLLING_OUT = "rolling_out"
    FINISHED = "finished"


@dataclass
class Job:
    job_id: str
    kind: str                       # "plan" or "rollout"
    fingerprint: str
    agent_id: str
    query_class: str
    actor: str
    state: JobState = JobState.RUNNING
    stage: Stage = Stage.PLANNING
    started_at_s: float = field(default_factory=time.time)
    finished_at_s: Optional[float] = None
    trials: int = 0                 # progress: trials answered so far
    plan_id: Optional[str] = None   # the best plan (planning) or the plan rolled out
    decision: Optional[str] = None
    plan_status: Optional[str] = None
    message: str = ""
    last_error: Optional[str] = None
    objective: Optional[str] = None   # planning: what "best" meant (latency, or a policy's trade)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(state=self.state.value, stage=self.stage.value)
        return d


_COLUMNS = ("job_id, kind, state, stage, fingerprint, agent_ids, query_class, actor, plan_id, "
            "decision, plan_status, trials, message, last_error, started_at_us, updated_at_us, "
            "finished_at_us, objective")


def _us(seconds: Optional[float]) -> Optional[int]:
    return None if seconds is None else int(seconds * 1_000_000)


def _row(job: Job) -> list:
    return [job.job_id, job.kind, job.state.value, job.stage.value, job.fingerprint,
            [job.agent_id] if job.agent_id else [], job.query_class, job.actor, job.plan_id,
            job.decision, job.plan_status, job.trials, job.message, job.last_error,
            _us(job.started_at_s), time.time_ns() // 1000, _us(job.finished_at_s), job.objective]


def _job(r: tuple) -> Job:
    return Job(job_id=r[0], kind=r[1], state=JobState(r[2]), stage=Stage(r[3]), fingerprint=r[4],
               agent_id=r[5][0] if r[5] else "", query_class=r[6], actor=r[7], plan_id=r[8],
               decision=r[9], plan_status=r[10], trials=int(r[11]), message=r[12],
               last_error=r[13], started_at_s=r[14] / 1e6,
               finished_at_s=None if r[16] is None else r[16] / 1e6, objective=r[17])


class JobStore:
    """The jobs table on the control cursor; everything that uses `con` shares `lock`."""

    def __init__(self, con, lock: Optional[threading.RLock] = None):
        self._con = con
        self._lock = lock if lock is not None else threading.RLock()
        with self._lock:
            con.execute(JOBS_DDL)   # the store creates it too; here for a bare connection

    def save(self, job: Job) -> None:
        """Inserts or replaces the job's row: called on every change the job goes through."""
        updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS.split(", ")[1:])
        with self._lock:
            self._con.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * len(_COLUMNS.split(', ')))}) "
                              f"ON CONFLICT (job_id) DO UPDATE SET {updates}", _row(job))

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            r = self._con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?",
                                  [job_id]).fetchone()
        return None if r is None else _job(r)

    def list(self, limit: int = 100) -> list[Job]:
        """Newest first."""
        with self._lock:
            rows = self._con.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY started_at_us DESC, "
                                     "job_id DESC LIMIT ?", [limit]).fetchall()
        return [_job(r) for r in rows]

    def prune(self, keep_finished: int) -> int:
        """Drops all but the newest `keep_finished` finished jobs; running ones always stay."""
        with self._lock:
            deleted = self._con.execute(
                "DELETE FROM jobs WHERE state != ? AND job_id NOT IN (SELECT job_id FROM jobs "
                "WHERE state != ? ORDER BY started_at_us DESC, job_id DESC LIMIT ?) RETURNING 1",
                [JobState.RUNNING.value, JobState.RUNNING.value, keep_finished]).fetchall()
        return len(deleted)

    def interrupt_running(self) -> list[Job]:
        """At start, before any job runs: every job still `running` belonged to a process that
        died; each becomes interrupted, saying the stage it was in. Returns them."""
        with self._lock:
            rows = self._con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = ?",
                                     [JobState.RUNNING.value]).fetchall()
            jobs = [_job(r) for r in rows]
            for job in jobs:
                reason = (f"control plane restarted while this job was {job.stage.value} "
                          f"({job.trials} trial(s) done)")
                job.state, job.last_error, job.finished_at_s = JobState.INTERRUPTED, reason, time.time()
                job.message = reason if not job.message else f"{reason}; last: {job.message}"
                self.save(job)
        return jobs

    def set_plan_status(self, plan_id: str, status: str) -> None:
        """A plan settled after its job ended (a rollout reconciled after a restart)."""
        with self._lock:
            self._con.execute("UPDATE jobs SET plan_status = ?, updated_at_us = ? WHERE plan_id = ?",
                              [status, time.time_ns() // 1000, plan_id])
