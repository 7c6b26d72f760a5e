"""Triton kernels run on CPU tensors under the interpreter; the flag must be set before
triton decorates them (at import of agent.kernels.triton_kernels).

Probe verdicts go to a folder of this test session, not the user's ~/.cache."""
import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"     # the tests hand the kernels CPU tensors


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("HEADROOM_KERNEL_CACHE_DIR")
    os.environ["HEADROOM_KERNEL_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield
    if old is None:
        os.environ.pop("HEADROOM_KERNEL_CACHE_DIR", None)
    else:
        os.environ["HEADROOM_KERNEL_CACHE_DIR"] = old
