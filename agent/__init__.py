"""headroom's in-process agent: `agent.attach(model)` observes a PyTorch LLM from the inside."""
from headroom_sidecar.agent.attach import attach
from headroom_sidecar.agent.settings import AgentSettings

__all__ = ["attach", "AgentSettings"]
