"""The planner: candidates from the traces (SQL), then an experiment loop over plans."""
from controlplane.planner.candidates import Candidates, CandidateScope, load_candidates
from controlplane.planner.search import (EvidenceKey, Phase, Planner, QualityBudget, SearchResult,
                                         TrialError, TrialRecord)
from controlplane.planner.settings import PlannerSettings

__all__ = ["Candidates", "CandidateScope", "load_candidates", "EvidenceKey", "Phase", "Planner",
           "QualityBudget", "SearchResult", "TrialError", "TrialRecord", "PlannerSettings"]
