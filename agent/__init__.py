"""headroom's in-process agent: `agent.attach(model)` observes a PyTorch LLM from the inside."""
