"""A plan's status machine: which moves between statuses (proto/contract.py) are allowed."""
from __future__ import annotations

from headroom_sidecar.proto.contract import PlanStatus

_S = PlanStatus
# Allowed moves. Decisions:
# - approval needs evidence: proposed cannot jump to approved;
# - rolled_back -> applying is NOT allowed: a rolled-back plan was judged unsafe in production,
#   so it needs a fresh trial (-> trialled) and a fresh policy decision before it runs again;
# - failed -> applying is allowed: the agent applies atomically, so a failed apply changed
#   nothing and the approval still holds (a retry, e.g. after an agent restart);
# - rejected and superseded are terminal: a changed idea is a new plan with a new id.
TRANSITIONS: dict[PlanStatus, frozenset[PlanStatus]] = {
    _S.PROPOSED: frozenset({_S.TRIALLED, _S.REJECTED, _S.NEEDS_HUMAN, _S.SUPERSEDED}),
    _S.TRIALLED: frozenset({_S.TRIALLED, _S.APPROVED, _S.REJECTED, _S.NEEDS_HUMAN, _S.SUPERSEDED}),
    _S.NEEDS_HUMAN: frozenset({_S.APPROVED, _S.REJECTED, _S.SUPERSEDED}),
    _S.APPROVED: frozenset({_S.APPLYING, _S.REJECTED, _S.SUPERSEDED}),
    _S.APPLYING: frozenset({_S.APPLIED, _S.FAILED, _S.ROLLED_BACK}),
    _S.APPLIED: frozenset({_S.ROLLED_BACK, _S.SUPERSEDED}),
    _S.FAILED: frozenset({_S.APPLYING, _S.REJECTED, _S.SUPERSEDED}),
    _S.ROLLED_BACK: frozenset({_S.TRIALLED, _S.SUPERSEDED}),
    _S.REJECTED: frozenset(),
    _S.SUPERSEDED: frozenset(),
}


class IllegalTransition(ValueError):
    pass


def check_transition(plan_id: str, current: PlanStatus, to: PlanStatus) -> None:
    """Raises IllegalTransition naming the allowed moves unless current -> to is one."""
    if to in TRANSITIONS[current]:
        return
    allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none"
    raise IllegalTransition(f"plan {plan_id!r}: {current.value} -> {to.value} is not allowed "
                            f"(from {current.value}: {allowed})")
