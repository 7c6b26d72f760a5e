"""Plan statuses and audit kinds live in the contract: their strings are stored in DuckDB and
read back by the dashboard, so a renamed value would orphan every stored row."""
from __future__ import annotations

from headroom_sidecar.controlplane import audit, plan_status
from headroom_sidecar.proto.contract import AuditKind, PlanStatus


def test_plan_status_values_are_the_stored_strings():
    assert [s.value for s in PlanStatus] == [
        "proposed", "trialled", "approved", "rejected", "needs_human", "applying", "applied",
        "failed", "rolled_back", "superseded"]


def test_audit_kind_values_are_the_stored_strings():
    assert all(k.value == k.name for k in AuditKind)
    assert len(AuditKind) == 17 and AuditKind("ROLLED_BACK") is AuditKind.ROLLED_BACK


def test_the_control_plane_uses_the_contract_s_enums():
    assert audit.AuditKind is AuditKind                      # one definition, not a copy
    assert set(plan_status.TRANSITIONS) == set(PlanStatus)
    for targets in plan_status.TRANSITIONS.values():
        assert targets <= set(PlanStatus)
