"""Models, prompts and text used by the demo, the benchmarks and the tests (not by the agent)."""
