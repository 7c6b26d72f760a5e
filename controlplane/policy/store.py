"""PolicyStore: the policy set in force; a reload that fails keeps the last good set in force."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Optional

from headroom_sidecar.controlplane.policy.engine import Clock, evaluate
from headroom_sidecar.controlplane.policy.loader import read_policy_set
from headroom_sidecar.controlplane.policy.schema import PolicyError, PolicySet, Problem
from headroom_sidecar.controlplane.policy.types import Decision, Revision


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    revision: Revision          # the revision in force after the reload
    problems: tuple[Problem, ...]
    changed: bool               # a new revision is now in force


class PolicyStore:
    def __init__(self, folder: str, clock: Clock = time.time):
        """Loads folder now; PolicyError if it is bad, since there is no earlier set to fall back on."""
        policy_set, problems = read_policy_set(folder)
        if problems:
            raise PolicyError(problems)
        self.folder = folder
        self._clock = clock
        self._lock = threading.Lock()
        self._current: PolicySet = policy_set
        self.last_problems: tuple[Problem, ...] = ()

    @property
    def current(self) -> PolicySet:
        with self._lock:
            return self._current

    def reload(self) -> ReloadResult:
        policy_set, problems = read_policy_set(self.folder)
        with self._lock:
            self.last_problems = tuple(problems)
            if problems:
                return ReloadResult(False, self._current.revision, tuple(problems), False)
            changed = policy_set.revision != self._current.revision
            self._current = policy_set
            return ReloadResult(True, policy_set.revision, (), changed)

    def evaluate(self, plan, evidence, model, context, clock: Optional[Clock] = None) -> Decision:
        return evaluate(self.current, plan, evidence, model, context, clock=clock or self._clock)
