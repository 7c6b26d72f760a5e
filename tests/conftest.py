"""Every test session keeps machine state to itself: kernel probe verdicts go to a folder of
this session, never the user's ~/.cache (agent/kernels/probe.py)."""
import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _kernel_cache_dir(tmp_path_factory):
    old = os.environ.get("HEADROOM_KERNEL_CACHE_DIR")
    os.environ["HEADROOM_KERNEL_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield
    if old is None:
        os.environ.pop("HEADROOM_KERNEL_CACHE_DIR", None)
    else:
        os.environ["HEADROOM_KERNEL_CACHE_DIR"] = old
