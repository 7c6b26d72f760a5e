"""headroom's in-process agent: `agent.attach(model)` observes a PyTorch LLM from the inside."""
from agent.attach import attach
from agent.settings import AgentSettings

__all__ = ["attach", "AgentSettings"]
