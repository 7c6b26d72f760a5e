"""The planner: candidates from the traces (SQL), then an experiment loop over plans."""
from headroom_sidecar.controlplane.planner.candidates import Candidates, CandidateScope, load_candidates
from headroom_sidecar.controlplane.planner.search import (EvidenceKey, Phase, Planner, QualityBudget, SearchResult,
                                         TrialError, TrialRecord)
from headroom_sidecar.controlplane.planner.settings import PlannerSettings

__all__ = ["Candidates", "CandidateScope", "load_candidates", "EvidenceKey", "Phase", "Planner",
           "QualityBudget", "SearchResult", "TrialError", "TrialRecord", "PlannerSettings"]
