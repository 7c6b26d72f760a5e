"""Triton kernels run on CPU tensors under the interpreter; the flag must be set before
triton decorates them (at import of agent.kernels.triton_kernels).

Probe verdicts go to a folder of this test session (tests/conftest.py)."""
import os

os.environ["TRITON_INTERPRET"] = "1"     # the tests hand the kernels CPU tensors
